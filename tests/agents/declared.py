"""Agents that declare their tables for RESTCONF (CmAgent.columns, delete_tables), and
entries that declare them wrong, each refused by cmbackend_init().

``main``: table ``kv`` a list keyed by key (get, set, setop with action=delete; in
delete_tables), ``uptime`` a container (get only: config false), ``hidden`` no columns
(not exposed, though it has a setop). ``from_file``: its columns read from the JSON file named by
DECLARED_COLUMNS at registration ({table: [column, ...]}, each table a get), so a
test can change them between two workers (tables kv, a and b).
"""

import json
import os

from cmactor import ready
from cmactor.cmbackend import CmAgent, cmbackend_init


class Declared(CmAgent):
    index_columns = {"kv": ("key",)}
    columns = {"kv": ("key", "value"), "uptime": ("seconds",)}
    delete_tables = ("kv",)

    def __init__(self):
        super().__init__()
        self.kv = {}

    def event_generate_default(self):
        ready()

    def kv_get(self, ctx):
        key = ctx.params.get("key")
        if key not in self.kv:
            ctx.raise_error(f"no key {key!r}")
        ctx.fields = {"key": key, "value": self.kv[key]}

    def kv_set(self, ctx):
        self.kv[ctx.params["key"]] = ctx.params.get("value", "")

    def kv_setop(self, ctx):
        if ctx.params.get("action") != "delete":
            ctx.raise_error("the only action is action=delete")
        self.kv.pop(ctx.params.get("key"), None)

    def uptime_get(self, ctx):
        ctx.fields = {"seconds": "1"}

    def hidden_get(self, ctx):
        ctx.fields = {"x": "1"}

    def hidden_setop(self, ctx):
        pass


def main():
    cmbackend_init(Declared())


class Plain(CmAgent):
    """Declares nothing."""

    def event_generate_default(self):
        ready()

    def kv_get(self, ctx):
        ctx.fields = {"key": "k"}


def undeclared():
    cmbackend_init(Plain())


def plain_process():
    """ready() without cmbackend_init(): no tables at all."""
    ready()


class FromFile(Plain):
    """Tables kv, a and b, each a get: the file says which of them are declared, with which columns."""

    a_get = b_get = Plain.kv_get


def from_file():
    agent = FromFile()
    with open(os.environ["DECLARED_COLUMNS"]) as file:
        agent.columns = {table: tuple(columns) for table, columns in json.load(file).items()}
    cmbackend_init(agent)


def _bad(**declared):
    """An agent whose class declares ``declared`` (columns, index_columns, delete_tables)."""
    cmbackend_init(type("Bad", (Declared,), declared)())


def columns_not_a_mapping():
    _bad(columns=["key", "value"])


def columns_not_a_list():
    _bad(columns={"kv": "key"})


def column_not_a_str():
    _bad(columns={"kv": ("key", 3)})


def column_not_a_name():
    _bad(columns={"kv": ("key", "the value")})


def column_xml():
    _bad(columns={"kv": ("key", "XMLvalue")})


def table_xml():
    _bad(columns={"kv": ("key",), "xmltab": ("a",)})


def column_message():
    _bad(columns={"kv": ("key", "message")})


def column_twice():
    _bad(columns={"kv": ("key", "value", "key")})


def no_column():
    _bad(columns={"kv": ()})


def table_without_get():
    _bad(columns={"kv": ("key", "value"), "ghost": ("a",)})


def index_not_a_column():
    _bad(columns={"kv": ("value",)})


def delete_tables_not_a_list():
    _bad(delete_tables="kv")


def delete_without_setop():
    _bad(delete_tables=("kv", "uptime"))


def delete_without_columns():
    _bad(delete_tables=("kv", "hidden"))
