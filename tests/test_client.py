"""The PEP-249 client's own paths: timeouts, closed objects, fetch variants."""

import os
import signal
import threading
import time

import pytest
from helpers import agent, wait_for

import cmactor

ECHO = agent("echo.py:main")


@pytest.fixture
def echo(supervisor):
    return supervisor({"echo": ECHO})


def test_module_attributes_follow_pep_249():
    from cmactor import cmfrontend

    assert (cmfrontend.apilevel, cmfrontend.threadsafety, cmfrontend.paramstyle) == ("2.0", 1, "named")
    assert issubclass(cmactor.ModuleUnavailable, cmactor.OperationalError)
    assert issubclass(cmactor.DeadlockDetectedError, cmactor.OperationalError)


def test_a_reply_slower_than_the_connection_timeout_is_an_operational_error(echo):
    conn = echo.connect(timeout=0.3)
    with pytest.raises(cmactor.OperationalError, match="timed out during get"):
        conn.cursor().execute("get echo.sleep", {"secs": 2})
    assert conn.closed
    with pytest.raises(cmactor.InterfaceError, match="the connection is closed"):
        conn.cursor().execute("get echo.kv", {"key": "default"})


def test_closed_cursor_rollback_and_commit(echo):
    conn = echo.connect()
    conn.commit()
    with pytest.raises(cmactor.NotSupportedError, match="no transactions"):
        conn.rollback()
    cur = conn.cursor()
    cur.close()
    with pytest.raises(cmactor.InterfaceError, match="the cursor is closed"):
        cur.execute("get echo.kv", {"key": "default"})
    conn.close()
    conn.close()  # twice is fine


def test_fetchmany_executemany_and_context_managers(echo):
    with echo.connect() as conn, conn.cursor() as cur:
        cur.executemany("set echo.kv", [{"key": f"k{i}", "value": i} for i in range(5)])
        cur.execute("getnext echo.kv")
        cur.arraysize = 2
        assert cur.fetchmany() == [("default", "yes"), ("k0", "0")]
        assert cur.fetchmany(10) == [("k1", "1"), ("k2", "2"), ("k3", "3"), ("k4", "4")]
        assert cur.fetchone() is None and cur.fetchall() == []
    assert conn.closed


def test_a_connection_shared_by_threads_serialises_its_requests(echo):
    conn = echo.connect()
    errors = []

    def work(n):
        try:
            cur = conn.cursor()
            for i in range(30):
                cur.execute("set echo.kv", {"key": f"t{n}-{i}", "value": i})
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    cur = conn.cursor()
    cur.execute("getnext echo.kv")
    assert cur.rowcount == 4 * 30 + 1


def test_stop_lets_a_running_save_finish(echo):
    conn = echo.connect()
    conn.cursor().execute("set echo.ctl", {"save_fault": "0.5"})
    results = []
    saver = threading.Thread(target=lambda: results.append(conn.request({"op": "save"})))
    saver.start()
    wait_for(lambda: echo.status()["echo"]["saving"])  # the save is under way (0.5 s in the agent)
    echo.stop()  # the running save finishes first; the supervisor then stops
    saver.join(10)
    assert results and results[0]["saved"]["modules"] == ["echo"]


@pytest.fixture
def filters(supervisor):
    return supervisor({"sw": agent("filters.py:main")})


def members(cur):
    return [(vlan, port) for vlan, port, _ in cur.fetchall()]


def test_a_none_param_makes_the_params_the_walks_index_columns(filters):
    cur = filters.connect().cursor()
    # Without an index the previous row's "tagged" becomes a filter: rows are skipped.
    cur.execute("getnext sw.member")
    assert members(cur) == [("v10", "1"), ("v10", "3"), ("v20", "4")]
    cur.execute("getnext sw.member", {"vlan": None, "port": None})
    assert members(cur) == [("v10", "1"), ("v10", "2"), ("v10", "3"), ("v20", "1"), ("v20", "4")]
    cur.batch_size = 1  # the index rides along across batches too
    cur.execute("getnext sw.member", {"vlan": "v10", "port": None})
    assert members(cur) == [("v10", "1"), ("v10", "2"), ("v10", "3"), ("v20", "1"), ("v20", "4")]
    # Cursor.index names them when every one has a value: that is where the walk starts.
    cur.index = ("vlan", "port")
    cur.execute("getnext sw.member", {"vlan": "v10", "port": "2"})
    assert members(cur) == [("v10", "3"), ("v20", "1"), ("v20", "4")]
    cur.execute("getnext sw.member", {"vlan": "v10", "port": "2", "tagged": "yes"})  # not an index column: a filter
    assert members(cur) == [("v20", "1")]


def test_a_limit_pages_a_walk_and_says_whether_the_table_goes_on(filters):
    cur = filters.connect().cursor()
    cur.limit = 2
    cur.index = ("vlan", "port")
    pages, start = [], {}
    while True:
        cur.execute("getnext sw.member", start)
        pages.append(members(cur))
        if not cur.more:
            break
        start = dict(zip(("vlan", "port"), pages[-1][-1]))
    assert pages == [[("v10", "1"), ("v10", "2")], [("v10", "3"), ("v20", "1")], [("v20", "4")]]
    cur.limit = 5  # exactly the table: the agent said no more after the last row
    cur.execute("getnext sw.member", {"vlan": None})
    assert cur.rowcount == 5 and cur.more is False


def test_module_unavailable_names_its_module_and_when_ready_waits_for_it(supervisor):
    sup = supervisor({"echo": {"entry": ECHO, "restart_delay": 1.0}})
    conn = sup.connect()
    pid = sup.status()["echo"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: sup.status()["echo"]["state"] == "RESTARTING")
    with pytest.raises(cmactor.ModuleUnavailable) as caught:
        conn.request({"op": "get", "module": "echo", "table": "kv", "params": {"key": "a"}, "hold": 0})
    exc = caught.value
    assert exc.module_name == "echo" and exc.socket_path == sup.socket_path
    # Each call returns at the module's next state change (RESTARTING, then starting,
    # loading, READY): the platform's callers retry in a loop, as this one does.
    called, changes = [], 0
    started = time.monotonic()
    while not exc.when_ready(callback=lambda: called.append(True), timeout=10):
        changes += 1
        assert time.monotonic() - started < 25
    assert sup.status()["echo"]["state"] == "READY" and len(called) == changes + 1
    exc.module_name = "nosuch"  # never READY: waits out its timeout, never longer
    started = time.monotonic()
    assert exc.when_ready(timeout=0.3) is False
    assert 0.3 <= time.monotonic() - started < 5


def test_module_unavailable_built_as_the_original_builds_it():
    assert cmactor.ModuleUnavailable("vlanmgr").module_name == "vlanmgr"
    assert cmactor.ModuleUnavailable("module 'x' is not READY").module_name is None
    assert cmactor.ModuleUnavailable("any text", module_name="x").module_name == "x"
    called = []
    started = time.monotonic()
    # No module to ask about: it waits out its timeout, calls back, never raises.
    assert cmactor.ModuleUnavailable("no name here").when_ready(lambda: called.append(1), timeout=0.2) is False
    assert called == [1] and time.monotonic() - started >= 0.2


def test_when_ready_with_no_supervisor_to_ask_waits_out_its_timeout(tmp_path):
    exc = cmactor.ModuleUnavailable("vlanmgr")
    exc.socket_path = str(tmp_path / "nobody.sock")  # nothing listens: not ready, never an error
    started = time.monotonic()
    assert exc.when_ready(timeout=0.3) is False
    assert 0.3 <= time.monotonic() - started < 5
