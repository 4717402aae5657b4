"""cmactor.exos_dbapi, the original platform's client module, against real worker processes."""

import json
import os
import signal
import time

import pytest
from helpers import agent, wait_for

from cmactor import cmfrontend, exos_dbapi as db
from cmactor.exos_dbapi import Column, Table, request

AGENT = agent("dbapi_agents.py:main")
MEMBER = Table("vlan", "member")
VLAN = Column(MEMBER, "vlan")
PORT = Column(MEMBER, "port")


@pytest.fixture
def sup(supervisor):
    return supervisor({"vlan": AGENT})


@pytest.fixture
def conn(sup):
    with db.connect(socket=sup.socket_path) as conn:
        yield conn


def member_walk(**params):
    """A GET of vlan.member with both index columns and these params."""
    req = request(db.CM_OP_GET)
    req.add_index(VLAN)
    req.add_index("port")
    for name, value in params.items():
        req.add_param(name, value)
    return req


def keys(cur):
    return [(row.field_values["vlan"], row.field_values["port"]) for row in cur.iterrow()]


def agent_calls(conn):
    """The params of every member_get call since the last one, and clear the record."""
    cur = conn.cursor()
    req = request()
    req.add_field("calls", Column("vlan", "calls", "calls"))
    cur.execute(req)
    calls = json.loads(cur.fetchone()[0])
    clear = request(db.CM_OP_SET)
    clear.add_param(Column("vlan", "calls", "all"), 1)
    cur.execute(clear)
    return calls


def set_vlan(cur, name, tag):
    req = request(db.CM_OP_SET)
    req.add_param(Column("vlan", "vlan", "name"), name)
    req.add_param("tag", tag)
    return cur.execute(req)


# -- shapes, without a supervisor --------------------------------------------------


def test_tables_and_columns_in_every_shape_compare_and_hash():
    shapes = [Column(("vlan", "member"), "port"), Column(MEMBER, "port"), Column("vlan", "member", "port")]
    assert len(set(shapes)) == 1 and shapes[0] == shapes[1] == shapes[2]
    col = shapes[0]
    assert (col.module_name, col.table_name, col.column_name) == ("vlan", "member", "port")
    assert col.table == MEMBER and (MEMBER.module_name, MEMBER.table_name) == ("vlan", "member")
    assert {MEMBER: 1}[Table("vlan", "member")] == 1
    assert sorted([PORT, VLAN]) == [PORT, VLAN] and PORT < VLAN
    assert Column(MEMBER, "a") != Column("vlan", "other", "a")
    assert repr(PORT) == "Column('vlan', 'member', 'port')" and str(PORT) == "vlan.member.port"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Column("vlan", "port"), r"Column\('vlan', 'port'\): a column is Column\(\(module, table\), name\)"),
        (lambda: Column(("vlan",), "port"), r"Column\(\('vlan',\), 'port'\): a column is"),
        (lambda: Column(MEMBER), r"Column\(Table\('vlan', 'member'\)\): a column is"),
        (lambda: Column(MEMBER, ""), r"Column\(Table\('vlan', 'member'\), ''\): the column name must be a non-empty"),
        (lambda: Column("vlan", "mem-ber", "port"), r"table 'mem-ber' in Column\('vlan', 'mem-ber', 'port'\)"),
        (lambda: Table("vlan", None), r"table None in Table\('vlan', None\) is not a name"),
        (lambda: Table("", "member"), r"module '' in Table\('', 'member'\) is not a name"),
    ],
)
def test_bad_shapes_are_programming_errors_naming_what_was_given(make, message):
    with pytest.raises(db.ProgrammingError, match=message):
        make()


def test_constants_flags_and_module_attributes():
    flags = [db.CM_FLAG_GETONE, db.CM_FLAG_GETNEXT, db.CM_FLAG_DYNAMIC, db.CM_FLAG_SNMP, db.CM_FLAG_CLI]
    assert all(flag and flag & (flag - 1) == 0 for flag in flags)  # each one bit
    assert len(set(flags)) == len(flags)
    assert db.CM_OP_GET != db.CM_OP_SET
    assert len({db.CM_OP_STATUS_SUCCESS, db.CM_OP_STATUS_MORE, db.CM_OP_STATUS_ERROR}) == 3
    assert (db.paramstyle, db.apilevel, db.threadsafety) == ("pyformat", "2.0", 1)
    assert db.Connection.paramstyle == "pyformat"
    for name in (
        "Error",
        "Warning",
        "InterfaceError",
        "DatabaseError",
        "DataError",
        "OperationalError",
        "IntegrityError",
        "InternalError",
        "ProgrammingError",
        "NotSupportedError",
        "ModuleUnavailable",
        "DeadlockDetectedError",
    ):
        assert getattr(db, name) is getattr(cmfrontend, name)


def test_request_flags_are_ored_into_op_flag():
    req = request()
    req._op_flag |= db.CM_FLAG_GETNEXT
    req.as_cli()
    req.as_snmp()
    req.dynamic()
    assert req._op_flag == db.CM_FLAG_GETNEXT | db.CM_FLAG_CLI | db.CM_FLAG_SNMP | db.CM_FLAG_DYNAMIC


def test_request_building_errors_name_tables_and_columns():
    with pytest.raises(db.ProgrammingError, match=r"request\(op=7\): op must be CM_OP_GET"):
        request(7)
    req = request()
    with pytest.raises(db.ProgrammingError, match="bare column name 'port' needs a main table"):
        req.add_index("port")
    req.add_index(("vlan", "member", "vlan"))  # a tuple is a column too
    req.add_index("port")
    assert req.table == MEMBER and req.index == ["vlan", "port"]
    wrong_table = r"column 'name' is of vlan\.vlan, but this request is for vlan\.member"
    with pytest.raises(db.ProgrammingError, match=wrong_table):
        req.add_param(Column("vlan", "vlan", "name"), "v10")
    with pytest.raises(db.ProgrammingError, match=r"column 'x' is of other\.t, but this request is for vlan\.member"):
        req.add_field("x", Column("other", "t", "x"))
    req.add_field("port", PORT)
    with pytest.raises(db.ProgrammingError, match="the label 'port' is already a field"):
        req.add_field("port", VLAN)
    with pytest.raises(db.ProgrammingError, match=r"add_index\(3\): expected a Column"):
        req.add_index(3)


# -- against a supervisor ----------------------------------------------------------


def test_execute_refuses_a_request_without_a_table_a_set_without_params_and_other_things(conn):
    cur = conn.cursor()
    with pytest.raises(db.ProgrammingError, match="names no table: add_index, add_param or add_field a Column"):
        cur.execute(request())
    empty_set = request(db.CM_OP_SET)
    empty_set.add_field("name", Column("vlan", "vlan", "name"))
    with pytest.raises(db.ProgrammingError, match=r"set vlan\.vlan: a SET needs at least one add_param"):
        cur.execute(empty_set)
    both = member_walk()
    both._op_flag |= db.CM_FLAG_GETONE | db.CM_FLAG_GETNEXT
    with pytest.raises(db.ProgrammingError, match="CM_FLAG_GETONE and CM_FLAG_GETNEXT are both set"):
        cur.execute(both)
    with pytest.raises(db.ProgrammingError, match="execute\\(\\) takes an exos_dbapi.request, got str"):
        cur.execute("get vlan.member")
    with pytest.raises(db.NotSupportedError, match="no fetchmany"):
        cur.fetchmany(2)
    with pytest.raises(db.NotSupportedError, match="no executemany"):
        cur.executemany(both, [{}])


def test_getone_when_every_index_has_a_value(conn):
    cur = conn.cursor()
    assert cur.rowcount == -1 and cur.description is None and cur.fetchrow() is None
    cur.execute(member_walk(vlan="v20", port="p4"))
    assert cur.rowcount == 1
    row = cur.fetchrow()
    assert (row.rowid, row.opStatus, row.opMsg) == (0, db.CM_OP_STATUS_SUCCESS, "")
    assert row.field_values == {"vlan": "v20", "port": "p4", "tagged": "0", "descr": "printer"}
    assert cur.fetchrow() is None
    assert agent_calls(conn) == [{"op": "get", "params": {"vlan": "v20", "port": "p4"}}]


def test_a_filtered_walk_returns_exactly_that_vlan_and_stops(conn):
    cur = conn.cursor()
    cur.execute(member_walk(vlan="v10"))
    assert keys(cur) == [("v10", "p1"), ("v10", "p2"), ("v10", "p3")]
    # The first call carries the request's params only; each next one adds the
    # previous row's moving index column; the agent's v20 row ends the walk.
    assert [call["params"] for call in agent_calls(conn)] == [
        {"vlan": "v10"},
        {"vlan": "v10", "port": "p1"},
        {"vlan": "v10", "port": "p2"},
        {"vlan": "v10", "port": "p3"},
    ]


def test_a_walk_with_no_params_returns_every_row(conn):
    cur = conn.cursor()
    cur.execute(member_walk())
    assert keys(cur) == [("v10", "p1"), ("v10", "p2"), ("v10", "p3"), ("v20", "p1"), ("v20", "p4"), ("v30", "p2")]
    first, second = agent_calls(conn)[:2]
    assert first == {"op": "getnext", "params": {}}
    assert second == {"op": "getnext", "params": {"vlan": "v10", "port": "p1"}}


def test_getnext_flag_with_every_index_set_walks_on_from_that_key(conn):
    cur = conn.cursor()
    req = member_walk(vlan="v10", port="p2")
    req._op_flag |= db.CM_FLAG_GETNEXT
    cur.execute(req)
    assert keys(cur) == [("v10", "p3"), ("v20", "p1"), ("v20", "p4"), ("v30", "p2")]


def test_a_param_that_is_not_an_index_filters_every_call(conn):
    cur = conn.cursor()
    cur.execute(member_walk(vlan="v10", tagged=1))
    assert keys(cur) == [("v10", "p1"), ("v10", "p3")]
    assert all(call["params"]["tagged"] == "1" for call in agent_calls(conn))


def test_a_getnext_without_index_is_one_row_as_on_the_original(conn):
    cur = conn.cursor()
    for name, tag in (("b", 2), ("a", 1), ("c", 3)):
        set_vlan(cur, name, tag)
    req = request()
    req.add_field("name", Column("vlan", "vlan", "name"))
    req._op_flag |= db.CM_FLAG_GETNEXT
    req.add_field("seen", Column("vlan", "vlan", "seen"))
    cur.execute(req)
    # No key to carry: the first row, and the walk stops.
    assert cur.fetchall() == [["a", ""]] and cur.rowcount == 1


def test_field_values_follow_add_field_order_labels_literals_and_missing_columns(conn):
    cur = conn.cursor()
    req = member_walk(vlan="v10")
    req.add_field("Port", PORT)
    req.add_field("kind", "member")  # a literal, echoed back
    req.add_field("Descr", Column(MEMBER, "descr"))  # null on p2
    req.add_field("speed", Column(MEMBER, "speed"))  # no such field in the agent's rows
    req.add_field("Vlan", ("vlan", "member", "vlan"))
    cur.execute(req)
    assert cur.description == (("Port", str), ("kind", str), ("Descr", str), ("speed", str), ("Vlan", str))
    rows = cur.fetchrows()
    assert [list(row.field_values) for row in rows] == [["Port", "kind", "Descr", "speed", "Vlan"]] * 3
    assert rows[1].field_values == {"Port": "p2", "kind": "member", "Descr": "", "speed": "", "Vlan": "v10"}
    assert [row.rowid for row in rows] == [0, 1, 2]
    assert [row.opStatus for row in rows] == [db.CM_OP_STATUS_MORE, db.CM_OP_STATUS_MORE, db.CM_OP_STATUS_SUCCESS]


def test_without_add_field_a_row_is_every_field_of_the_agent(conn):
    cur = conn.cursor()
    cur.execute(member_walk(vlan="v10"))
    assert cur.description == (("vlan", str), ("port", str), ("tagged", str), ("descr", str))
    assert cur.fetchone() == ["v10", "p1", "1", "uplink"]
    row = cur.fetchrow()
    assert row.rowid == 1 and row.field_values == {"vlan": "v10", "port": "p2", "tagged": "0", "descr": ""}
    assert cur.fetchall() == [["v10", "p3", "1", "server"]]
    assert cur.fetchone() is None and cur.fetchrows() == [] and cur.fetchall() == []


def test_iterrow_is_lazy_and_iteration_gives_value_lists(conn):
    cur = conn.cursor()
    cur.execute(member_walk(vlan="v20"))
    rows = cur.iterrow()
    first = next(rows)
    assert first.field_values["port"] == "p1" and cur.fetchone() == ["v20", "p4", "0", "printer"]
    assert list(rows) == []  # the generator shares the cursor's position
    cur.execute(member_walk(vlan="v20"))
    assert [values[1] for values in cur] == ["p1", "p4"]
    assert cur.rowcount == 2


def test_set_and_read_back_with_the_vr_name(conn):
    cur = conn.cursor(vr_name="VR-Default")
    set_vlan(cur, "v10", 10)
    assert cur.rowcount == 1 and cur.fetchrow().field_values == {"name": "v10", "tag": "10"}
    req = request()
    req.add_index(Column("vlan", "vlan", "name"))
    req.add_param("name", "v10")
    cur.execute(req)
    assert cur.fetchrow().field_values["vr"] == "VR-Default"
    req.set_vr_name("VR-Mgmt")  # the request's own VR wins over the cursor's
    cur.execute(req)
    assert cur.fetchrow().field_values == {"name": "v10", "tag": "10", "vr": "VR-Mgmt", "seen": "name"}


def test_agent_errors_and_unknown_tables_name_module_and_table(conn):
    cur = conn.cursor()
    with pytest.raises(db.DatabaseError, match="vlan 'v99' has no member port 'p1'"):
        cur.execute(member_walk(vlan="v99", port="p1"))
    assert cur.rowcount == -1 and cur.fetchrow() is None
    req = request()
    req.add_param(Column("vlan", "nosuch", "x"), 1)
    with pytest.raises(db.ProgrammingError, match="module 'vlan' has no table 'nosuch'"):
        cur.execute(req)


def test_notify_text_reaches_print_callback_and_messages(sup):
    printed = []
    with db.connect("admin", print_callback=printed.append, socket=sup.socket_path) as conn:
        cur = conn.cursor()
        set_vlan(cur, "v10", 10)
        assert printed == cur.messages == ["vlan v10 created", "vlan v10 tag 10"]
    with db.connect(socket=sup.socket_path) as conn:
        cur = conn.cursor()
        set_vlan(cur, "v20", 20)
        assert cur.messages == []  # no callback, not a CLI request: dropped
        req = request(db.CM_OP_SET)
        req.add_param(Column("vlan", "vlan", "name"), "v30")
        req.as_cli()
        cur.execute(req)
        assert cur.messages == ["vlan v30 created", "vlan v30 tag "]


def test_a_walk_past_max_rows_delivers_them_then_raises_too_many_instances(conn):
    cur = conn.cursor()
    assert cur.max_rows == 5000  # the original's cap
    req = request()
    req.add_index(Column("vlan", "many", "n"))
    req.add_param("count", 12)
    cur.max_rows = 5
    cur.batch_size = 2
    cur.execute(req)
    assert cur.rowcount == 5
    rows = cur.iterrow()
    assert [row.field_values["n"] for _, row in zip(range(5), rows)] == ["0", "1", "2", "3", "4"]
    with pytest.raises(db.OperationalError, match=r"too many instances: getnext vlan\.many stopped after 5 rows"):
        next(rows)
    assert cur.fetchrow() is None  # raised once, like the original's error row
    cur.max_rows = 12  # exactly the table: no error
    cur.execute(req)
    assert len(cur.fetchrows()) == 12 and cur.fetchrow() is None


def test_closed_connection_and_cursor(sup):
    conn = db.connect(socket=sup.socket_path)
    cur = conn.cursor()
    conn.commit()
    cur.close()
    with pytest.raises(db.InterfaceError, match="the cursor is closed"):
        cur.execute(member_walk())
    conn.close()
    assert conn.closed
    with pytest.raises(db.InterfaceError, match="the connection is closed"):
        conn.cursor().execute(member_walk())


def test_a_module_restarting_is_retried_when_ready(supervisor):
    # hold_timeout 0: requests to a module that is not READY fail at once, as on the
    # original platform; the restart delay keeps it down long enough to see that.
    sup = supervisor({"vlan": {"entry": AGENT, "restart_delay": 0.5}}, hold_timeout=0)
    with db.connect(socket=sup.socket_path) as conn:
        cur = conn.cursor()
        os.kill(sup.status()["vlan"]["pid"], signal.SIGKILL)
        wait_for(lambda: sup.status()["vlan"]["state"] != "READY")
        with pytest.raises(db.ModuleUnavailable) as caught:
            cur.execute(member_walk())
        assert caught.value.module_name == "vlan"
        cur.retries, cur.retry_timeout = 1, 20
        cur.execute(member_walk())
        assert cur.rowcount == 6
        assert sup.status()["vlan"]["restarts"] == 1


def test_when_ready_on_a_quarantined_module_gives_up_after_its_timeout(supervisor):
    sup = supervisor({"vlan": {"entry": AGENT, "max_restarts": 0}})
    os.kill(sup.status()["vlan"]["pid"], signal.SIGKILL)
    wait_for(lambda: sup.status()["vlan"]["state"] == "FAILED")
    with db.connect(socket=sup.socket_path) as conn:
        cur = conn.cursor()
        with pytest.raises(db.ModuleUnavailable, match="quarantined") as caught:
            cur.execute(member_walk())
        called = []
        t0 = time.monotonic()
        assert caught.value.when_ready(callback=lambda: called.append(1), timeout=0.5) is False
        assert 0.4 < time.monotonic() - t0 < 5 and called == [1]
        cur.retries, cur.retry_timeout = 2, 0.3
        t0 = time.monotonic()
        with pytest.raises(db.ModuleUnavailable, match="quarantined"):
            cur.execute(member_walk())
        assert 0.5 < time.monotonic() - t0 < 5
