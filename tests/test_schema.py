"""What agents declare for RESTCONF (CmAgent.columns, delete_tables), checked by
cmbackend_init(), sent by each worker in its Init, and answered by the supervisor's
``schema`` op (and Supervisor.schema())."""

import json
import os

import msgpack
import pytest
from helpers import agent

import cmactor
from cmactor.errors import ProgrammingError
from cmactor.wire import protocol as P
from cmactor.wire.validate import BadRequest, Request, decode_request, parse_request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DECLARED = {
    "tables": {
        "kv": {"index": ["key"], "columns": ["key", "value"], "config": True, "setop": True, "delete": True},
        "uptime": {"index": [], "columns": ["seconds"], "config": False, "setop": False, "delete": False},
    }
}


def table(columns, index=(), config=False, setop=False, delete=False):
    return {"index": list(index), "columns": list(columns), "config": config, "setop": setop, "delete": delete}


@pytest.fixture
def declared(supervisor):
    return supervisor(
        {
            "declared": agent("declared.py:main"),
            "undeclared": agent("declared.py:undeclared"),
            "plain": agent("declared.py:plain_process"),
        }
    )


def test_the_schema_op_answers_what_each_module_declares(declared):
    with declared.connect() as conn:
        reply = conn.request({"op": "schema"})
        assert reply["ok"] is True
        # A module that declares nothing has no tables; a plain process registered no agent: None.
        assert reply["schema"] == {"declared": DECLARED, "undeclared": {"tables": {}}, "plain": None}
        assert conn.request({"op": "schema", "module": "declared"})["schema"] == {"declared": DECLARED}
        assert conn.request({"op": "schema", "module": "plain"})["schema"] == {"plain": None}
    assert declared.schema() == reply["schema"]
    assert declared.schema("undeclared") == {"undeclared": {"tables": {}}}


def test_the_schema_answered_is_a_copy(declared):
    schema = declared.schema("declared")
    schema["declared"]["tables"]["kv"]["columns"].append("mine")
    del schema["declared"]["tables"]["uptime"]
    assert declared.schema("declared") == {"declared": DECLARED}


def test_the_schema_of_a_module_not_run_is_refused_naming_the_modules(declared):
    with declared.connect() as conn:
        with pytest.raises(
            ProgrammingError, match="unknown module 'nope'; this supervisor runs: declared, plain, undeclared"
        ):
            conn.request({"op": "schema", "module": "nope"})
        assert conn.request({"op": "ping"})["ok"] is True  # the connection carries on
    with pytest.raises(ProgrammingError, match="unknown module 'nope'; this supervisor runs: declared, plain"):
        declared.schema("nope")


def test_the_schema_op_is_checked_by_both_checks():
    message = {"id": 4, "op": "schema", "user": "me", "module": "vlan"}
    request = decode_request(msgpack.packb(message))
    assert request == parse_request(message) == Request(id=4, op="schema", user="me", module="vlan")
    assert decode_request(msgpack.packb({"id": 5, "op": "schema"})) == Request(id=5, op="schema")
    bad = {"id": 6, "op": "schema", "module": "no such"}
    assert type(decode_request(msgpack.packb(bad))) is dict  # not the fast check's
    with pytest.raises(BadRequest, match="schema: bad module name 'no such'"):
        parse_request(bad)


BAD = [
    ("columns_not_a_mapping", TypeError, "columns must map table names to lists of column names, got list"),
    ("columns_not_a_list", TypeError, "columns\\['kv'\\] must be a list of str, got str"),
    ("column_not_a_str", TypeError, "columns\\['kv'\\] must be a list of str, got item 3"),
    ("column_not_a_name", ValueError, "columns\\['kv'\\] has 'the value', not a column name RESTCONF can expose"),
    ("column_xml", ValueError, "columns\\['kv'\\] has 'XMLvalue', not a column name RESTCONF can expose"),
    ("table_xml", ValueError, "columns declares table 'xmltab', whose name starts with 'xml'"),
    ("column_message", ValueError, "columns\\['kv'\\] has 'message', which names the notify_cli lines kv_setop"),
    ("column_twice", ValueError, "columns\\['kv'\\] names 'key' twice: list each column once"),
    ("no_column", ValueError, "columns\\['kv'\\] declares no column: list every column of table 'kv'"),
    (
        "table_without_get",
        ValueError,
        "columns declares table 'ghost', but the agent has no ghost_get to serve it: define ghost_get",
    ),
    (
        "index_not_a_column",
        ValueError,
        "index_columns\\['kv'\\] names 'key', which columns\\['kv'\\] does not declare: add it to columns\\['kv'\\]",
    ),
    ("delete_tables_not_a_list", TypeError, "delete_tables must be a list of str, got str"),
    (
        "delete_without_setop",
        ValueError,
        "delete_tables names table 'uptime', but the agent has no uptime_setop to delete its entries with",
    ),
    (
        "delete_without_columns",
        ValueError,
        "delete_tables names table 'hidden', which columns does not declare: declare its columns",
    ),
]


@pytest.mark.parametrize("entry, kind, message", BAD, ids=[entry for entry, _, _ in BAD])
def test_a_bad_declaration_fails_the_start_naming_it(supervisor, entry, kind, message):
    with pytest.raises(cmactor.StartupError, match=f"x: FAILED: .*{kind.__name__}: cmbackend_init\\(\\): {message}"):
        supervisor({"x": agent(f"declared.py:{entry}")})


@pytest.mark.parametrize("entry, kind, message", BAD, ids=[entry for entry, _, _ in BAD])
def test_a_bad_declaration_is_refused_before_the_worker_is_asked(monkeypatch, entry, kind, message):
    # Outside a worker: refused for what it declares, before "must run inside a cmactor worker".
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tests", "agents"))
    import declared

    with pytest.raises(kind, match=f"^cmbackend_init\\(\\): {message}"):
        getattr(declared, entry)()


def test_the_schema_follows_the_agent_across_restarts(supervisor, tmp_path):
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"kv": ["key"]}))
    entry = {"entry": agent("declared.py:from_file"), "env": {"DECLARED_COLUMNS": str(columns)}}
    sup = supervisor({"m": entry})
    assert sup.schema() == {"m": {"tables": {"kv": table(["key"])}}}
    # The agent changes: its next worker declares otherwise.
    columns.write_text(json.dumps({"b": ["y", "z"], "a": ["x"]}))
    sup.restart("m", wait=True)
    assert sup.schema() == {"m": {"tables": {"b": table(["y", "z"]), "a": table(["x"])}}}
    assert list(sup.schema()["m"]["tables"]) == ["b", "a"]  # in the order declared
    # Stopped, or crashed into a worker that never registers, it keeps the last one registered.
    sup.stop_module("m")
    assert sup.schema("m") == {"m": {"tables": {"b": table(["y", "z"]), "a": table(["x"])}}}
    columns.write_text(json.dumps({}))
    sup.start_module("m")
    assert sup.schema("m") == {"m": {"tables": {}}}


def test_the_demo_declares_its_tables(tmp_path):
    config = os.path.join(ROOT, "examples", "switch", "cmactor.toml")
    with cmactor.Supervisor.from_toml(config, state_dir=str(tmp_path)) as sup:
        schema = sup.schema()
    assert schema == {
        "ports": {
            "tables": {
                "port": table(["name", "enabled", "speed", "description"], ["name"], config=True, setop=True),
            }
        },
        "vlan": {
            "tables": {
                "vlan": table(["name", "tag"], ["name"], config=True, setop=True, delete=True),
                "member": table(["vlan", "port"], ["vlan", "port"], config=True, setop=True, delete=True),
            }
        },
        "stats": {"tables": {"counters": table(["port", "rx_packets", "tx_packets"], ["port"])}},
    }


def test_the_exos_example_declares_its_tables(tmp_path):
    config = os.path.join(ROOT, "examples", "exos", "cmactor.toml")
    with cmactor.Supervisor.from_toml(config, state_dir=str(tmp_path)) as sup:
        schema = sup.schema()
    assert schema == {
        "vlanmgr": {
            "tables": {
                "vlan": table(["name", "tag"], ["name"], config=True, setop=True, delete=True),
                "member": table(["vlan", "port", "tagged"], ["vlan", "port"], config=True),
            }
        },
        "portsum": {
            "tables": {
                "watch": table(["name"], ["name"], config=True, setop=True, delete=True),
                "summary": table(["vlan", "ports", "count", "tagged"], ["vlan"], setop=True),
            }
        },
        "stpauto": {"tables": {"bound": table(["vlan", "stpd"], ["vlan"])}},
    }


def test_init_carries_the_tables_typed():
    tables = {"kv": P.TableSchema(["key"], ["key", "value"], True, True, False)}
    frame = P.pack(P.Init(["kv"], [], [], 4, tables))
    (init,) = P.FrameReader(decode=P.CHANNEL.decode).feed(frame)
    assert type(init) is P.Init and init.tables == tables
    assert type(init.tables["kv"]) is P.TableSchema
