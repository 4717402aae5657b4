"""A test agent whose saved config is as large as asked: one setop of its `blob` table
replaces every row by ``rows`` rows of ``size`` characters each, each row's data its
own (a row saved or loaded under another row's name, or cut short, shows)."""

import hashlib

from rowwalk import next_name

from cmactor import ready
from cmactor.cmbackend import CmAgent, cmbackend_init


def data(tag, name, size):
    """The data of row ``name`` filled with ``tag``: ``size`` characters, its own."""
    seed = hashlib.sha256(f"{tag}/{name}".encode()).hexdigest()
    return (seed * (size // len(seed) + 1))[:size]


class Bulky(CmAgent):
    index_columns = {"blob": ("name",)}

    def __init__(self):
        super().__init__()
        self.rows = {}

    def event_generate_default(self):
        ready()

    def event_load_complete(self):
        ready()

    def blob_get(self, ctx):
        name = next_name(ctx, self.rows)
        if name is not None:
            ctx.fields = {"name": name, "data": self.rows.get(name, "")}

    def blob_set(self, ctx):  # a saved row, loaded back
        self.rows[ctx.params["name"]] = ctx.params["data"]

    def blob_setop(self, ctx):  # fill: every row replaced by `rows` rows of `size` characters
        tag, size = ctx.params.get("tag", "t"), int(ctx.params["size"])
        names = [f"{tag}-{n:05d}" for n in range(int(ctx.params["rows"]))]
        self.rows = {name: data(tag, name, size) for name in names}
        ctx.fields = {"rows": len(self.rows)}


def main():
    cmbackend_init(Bulky(), persistent_list=["blob"])
