"""The PEP-249 client's own paths: timeouts, closed objects, fetch variants."""

import threading

import pytest
from conftest import agent, wait_for

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
