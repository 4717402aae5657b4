"""A test agent for exec_cli and the CLI's paging; one file plays every module.

Tables:
- ``item``: 25 rows item00..item24 walked by name, no declared index. Its ``size``
  (i % 3) is a filter when given, as real agents treat params, so a walk that
  carried the previous row's size along would skip rows: only the index may ride.
- ``pair``: (group, member) rows, some with spaces, with a declared index; the saved table.
- ``fail``: always refuses with raise_error.
- ``ask`` (serial lane) and ``aask`` (@async_action): run ``exec_cli([cmd])`` from
  inside this worker and answer its output.
"""

from cmactor import async_action, ready
from cmactor.cmbackend import CmAgent, cmbackend_init
from cmactor.exos.cli import exec_cli

ITEMS = {f"item{i:02d}": str(i % 3) for i in range(25)}
PAIRS = {("a b", "x"), ("a b", "y z"), ("c", "1"), ("c", "2"), ("c", "3")}


class Catalog(CmAgent):
    index_columns = {"pair": ("group", "member")}

    def event_generate_default(self):
        self.items = dict(ITEMS)
        self.pairs = set(PAIRS)
        ready()

    def event_load_start(self):
        self.items = dict(ITEMS)
        self.pairs = set(PAIRS)

    def event_load_complete(self):
        ready()

    def item_get(self, ctx):
        name, size = ctx.params.get("name"), ctx.params.get("size")
        if ctx.is_getnext:
            names = [n for n in sorted(self.items) if (name is None or n > name) and size in (None, self.items[n])]
            if not names:
                return
            if len(names) > 1:
                ctx.more()
            name = names[0]
        elif name not in self.items:
            ctx.raise_error(f"no item {name!r}")
        ctx.fields = {"name": name, "size": self.items[name]}

    def pair_set(self, ctx):
        self.pairs.add((ctx.params["group"], ctx.params["member"]))

    def pair_get(self, ctx):
        group, member = ctx.params.get("group"), ctx.params.get("member")
        if ctx.is_getnext:
            rows = sorted(self.pairs)
            if group is not None:  # a group alone starts at that group, with a member after that row
                rows = [r for r in rows if (r > (group, member) if member is not None else r[0] >= group)]
            if not rows:
                return
            if len(rows) > 1:
                ctx.more()
            group, member = rows[0]
        elif (group, member) not in self.pairs:
            ctx.raise_error(f"{member!r} is not in group {group!r}")
        ctx.fields = {"group": group, "member": member}

    def fail_get(self, ctx):
        ctx.raise_error("fail refuses every request")

    def ask_get(self, ctx):
        ctx.fields = {"output": exec_cli([ctx.params["cmd"]])}

    @async_action
    def aask_get(self, ctx):
        ctx.fields = {"output": exec_cli([ctx.params["cmd"]])}


def main():
    cmbackend_init(Catalog(), persistent_list=["pair"])
