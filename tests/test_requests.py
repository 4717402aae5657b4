"""Requests end to end: client -> supervisor -> worker process -> agent -> back."""

import os
import threading
import time

import pytest
from helpers import agent

import cmactor

ECHO = agent("echo.py:main")


@pytest.fixture
def echo(supervisor):
    return supervisor({"echo": ECHO})


def one(cur, operation, params=None):
    cur.execute(operation, params)
    return dict(zip([d[0] for d in cur.description], cur.fetchone()))


def test_get_set_getnext_roundtrip(echo):
    cur = echo.connect().cursor()
    cur.execute("set echo.kv", {"key": "b", "value": 2})
    assert cur.rowcount == 1
    assert cur.fetchone() == ("b", "2")  # values cross as str(value)
    cur.execute("set echo.kv", {"key": "a", "value": "one"})
    cur.execute("get echo.kv", {"key": "a"})
    assert [d[0] for d in cur.description] == ["key", "value"]
    assert cur.fetchall() == [("a", "one")]
    cur.execute("getone echo.kv", {"key": "b"})
    assert cur.fetchone() == ("b", "2")
    cur.execute("getnext echo.kv")
    assert list(cur) == [("a", "one"), ("b", "2"), ("default", "yes")]
    assert cur.rowcount == 3


def test_context_flags_per_op_and_lane(echo):
    cur = echo.connect().cursor()
    got = one(cur, "get echo.ctx", {"x": 1})
    assert got["is_getone"] == "True" and got["is_getnext"] == "False"
    assert got["is_async"] == "False" and got["dirty"] == "False"
    assert got["is_save"] == got["is_load"] == "False"
    assert got["params"] == "x=1" and got["vr_name"] is None
    assert int(got["pid"]) != os.getpid()
    got = one(cur, "set echo.ctx")
    assert got["dirty"] == "True" and got["is_getone"] == "False"
    got = one(cur, "get echo.actx")
    # Not the serial lane's thread (a set runs there; a get may run on a direct connection's).
    assert got["is_async"] == "True" and got["thread"] != one(cur, "set echo.ctx")["thread"]


def test_vr_name_reaches_the_agent(echo):
    cur = echo.connect().cursor(vr_name="VR-Mgmt")
    assert cur.vr_name == "VR-Mgmt"
    assert one(cur, "get echo.ctx")["vr_name"] == "VR-Mgmt"


def test_raise_error_stops_the_action_at_once(echo):
    cur = echo.connect().cursor()
    with pytest.raises(cmactor.DatabaseError, match="^refused: bad tag$"):
        cur.execute("set echo.boom", {"why": "bad tag"})
    with pytest.raises(cmactor.DatabaseError, match="stopped despite except Exception"):
        cur.execute("setop echo.boom")
    cur.execute("getnext echo.kv")
    keys = [row[0] for row in cur]
    assert "after_raise" not in keys and "swallowed" not in keys


def test_escaped_exception_is_an_error_reply_and_the_agent_keeps_serving(echo):
    cur = echo.connect().cursor()
    for _ in range(3):
        with pytest.raises(cmactor.DatabaseError, match="get echo.boom raised ValueError: kaboom"):
            cur.execute("get echo.boom")
    cur.execute("get echo.kv", {"key": "default"})
    assert cur.fetchone() == ("default", "yes")
    assert echo.status()["echo"]["restarts"] == 0


def test_values_are_sent_as_strings_and_none_stays_null(echo):
    cur = echo.connect().cursor()
    got = one(cur, "get echo.weird")
    assert got == {"int": "7", "float": "1.5", "none": None, "bool": "True", "list": "[1, 2]", "str": "s"}


@pytest.mark.parametrize(
    "kind, message",
    [
        ("badkey", "field name 3 is a int, not a str"),
        ("notdict", "ctx.fields must be a dict, got list"),
        ("badstr", "str\\(\\) of its value raised RuntimeError"),
    ],
)
def test_unsendable_fields_are_a_data_error(echo, kind, message):
    cur = echo.connect().cursor()
    with pytest.raises(cmactor.DataError, match=message):
        cur.execute("get echo.weird", {"kind": kind})
    assert one(cur, "get echo.kv", {"key": "default"})["value"] == "yes"


def test_logger_parameter_signature_works(echo):
    cur = echo.connect().cursor()
    assert one(cur, "get echo.log", {"msg": "hi"}) == {"logger": "None"}


def test_worker_log_records_reach_the_supervisor_tagged_with_the_module(echo, caplog):
    cur = echo.connect().cursor()
    with caplog.at_level("WARNING", logger="cmactor.agent.echo"):
        cur.execute("get echo.log", {"msg": "marker-123"})
        deadline = time.monotonic() + 5
        while "marker-123" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
    record = next(r for r in caplog.records if "marker-123" in r.getMessage())
    assert record.name == "cmactor.agent.echo"
    assert "echo.agent" in record.getMessage()


def test_missing_action_is_a_programming_error_naming_module_table_op(echo):
    cur = echo.connect().cursor()
    with pytest.raises(cmactor.ProgrammingError, match="module 'echo' table 'kv' has no 'setop' action"):
        cur.execute("setop echo.kv")
    with pytest.raises(cmactor.ProgrammingError, match="module 'echo' has no table 'nosuch'.*its tables: .*kv"):
        cur.execute("get echo.nosuch")


def test_unknown_module_is_a_programming_error_listing_modules(echo):
    cur = echo.connect().cursor()
    with pytest.raises(cmactor.ProgrammingError, match="unknown module 'nope'; this supervisor runs: echo"):
        cur.execute("get nope.kv")


@pytest.mark.parametrize(
    "operation", ["get", "get echo", "fetch echo.kv", "get echo.kv extra", "get .kv", "get echo._x", 42]
)
def test_malformed_operation_strings(echo, operation):
    cur = echo.connect().cursor()
    with pytest.raises(cmactor.ProgrammingError, match="malformed operation"):
        cur.execute(operation)


def test_bad_params_are_refused_client_side(echo):
    cur = echo.connect().cursor()
    with pytest.raises(cmactor.ProgrammingError, match="parameter name 1 is a int"):
        cur.execute("get echo.kv", {1: "x"})
    with pytest.raises(cmactor.ProgrammingError, match="params must be a mapping"):
        cur.execute("get echo.kv", ["key"])


def test_notify_cli_reaches_print_callback_and_messages(echo):
    printed = []
    cur = echo.connect(print_callback=printed.append).cursor()
    cur.execute("set echo.notify", {"times": 3})
    assert printed == ["step 0", "step 1", "step 2"]
    assert cur.messages == printed
    cur.execute("get echo.kv", {"key": "default"})
    assert cur.messages == []  # cleared on execute


def test_notify_cli_is_dropped_without_a_print_callback(echo):
    cur = echo.connect().cursor()
    cur.execute("set echo.notify", {"times": 2})
    assert cur.messages == []
    assert cur.fetchone() == ("1",)


def test_iterrow_gives_rows_with_status(echo):
    cur = echo.connect().cursor()
    cur.execute("getnext echo.gen", {"count": 3})
    rows = list(cur.iterrow())
    assert [r.rowid for r in rows] == [0, 1, 2]
    assert rows[2].field_values == {"index": "2", "square": "4"}
    assert all(r.opStatus == 0 and r.opMsg == "" for r in rows)


def test_getnext_walk_passes_previous_row_and_caller_params(echo):
    cur = echo.connect().cursor()
    cur.execute("getnext echo.gen", {"count": 5})
    assert [r[0] for r in cur.fetchall()] == ["0", "1", "2", "3", "4"]
    cur.execute("getnext echo.gen", {"count": 0})
    assert cur.fetchall() == [] and cur.rowcount == 0 and cur.description is None


def test_getnext_walk_runs_in_batches_in_the_worker(echo, monkeypatch):
    conn = echo.connect()
    sent = []
    original = conn.request

    def counting(message, on_notify=None):
        sent.append(message["op"])
        return original(message, on_notify)

    monkeypatch.setattr(conn, "request", counting)
    cur = conn.cursor()
    cur.execute("getnext echo.gen", {"count": 25000})
    assert cur.rowcount == 25000
    assert cur.fetchall()[-1] == ("24999", str(24999 * 24999))
    assert len(sent) == 25  # batches of 1000, not 25000 round trips
    cur.batch_size = 7
    cur.execute("getnext echo.gen", {"count": 20})
    assert [int(r[0]) for r in cur] == list(range(20)) and len(sent) == 25 + 3


def test_runaway_walk_is_cut_at_max_rows(echo):
    cur = echo.connect().cursor()
    cur.max_rows = 2500
    with pytest.raises(cmactor.OperationalError, match="stopped at max_rows=2500"):
        cur.execute("getnext echo.forever")
    cur.execute("getnext echo.gen", {"count": 2500})
    assert cur.rowcount == 2500  # exactly max_rows is fine


def test_serial_lane_runs_one_at_a_time_in_arrival_order(echo):
    def send(n, delay):
        echo.connect().cursor().execute("set echo.order", {"n": n, "delay": delay})

    threads = []
    for n in range(6):
        thread = threading.Thread(target=send, args=(n, 0.05 if n == 0 else 0))
        thread.start()
        threads.append(thread)
        time.sleep(0.02)  # arrival order 0..5
    for thread in threads:
        thread.join(10)
    cur = echo.connect().cursor()
    assert one(cur, "get echo.order")["order"] == "0,1,2,3,4,5"


def test_an_agent_without_async_actions_keeps_order_and_serves_many_clients(supervisor):
    sup = supervisor({"s": agent("serial_only.py:main")})

    def send(n):
        sup.connect().cursor().execute("set s.order", {"n": n, "delay": 0.02})

    threads = []
    for n in range(5):
        threads.append(threading.Thread(target=send, args=(n,)))
        threads[-1].start()
        time.sleep(0.01)
    for thread in threads:
        thread.join(10)
    assert one(sup.connect().cursor(), "get s.order")["order"] == "0,1,2,3,4"


def test_async_actions_run_concurrently_serial_ones_do_not(echo):
    def timed(table, count):
        def call():
            echo.connect().cursor().execute(f"get echo.{table}", {"secs": 0.3})

        threads = [threading.Thread(target=call) for _ in range(count)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        return time.monotonic() - start

    assert timed("asleep", 4) < 0.3 * 4 * 0.75  # overlapped on the pool
    assert timed("sleep", 3) >= 0.3 * 3 * 0.95  # one at a time


def test_an_async_request_is_served_while_a_serial_action_runs(echo):
    # The serial action runs on the thread that read it; the supervisor rings the
    # worker's doorbell so that another thread reads the async request meanwhile.
    slow = threading.Thread(target=lambda: echo.connect().cursor().execute("get echo.sleep", {"secs": 1.5}))
    slow.start()
    time.sleep(0.2)
    start = time.monotonic()
    cur = echo.connect().cursor()
    for _ in range(3):
        cur.execute("get echo.actx")
    assert time.monotonic() - start < 1.0
    slow.join(10)


def test_agent_to_agent_call_through_connect_without_arguments(supervisor):
    sup = supervisor({"a": ECHO, "b": ECHO})
    cur = sup.connect().cursor()
    cur.execute("set b.kv", {"key": "k", "value": "from-b"})
    got = one(cur, "get a.call", {"module": "b", "key": "k"})
    assert got == {"value": "from-b", "socket": sup.socket_path}


def test_dirty_bit_marks_unsaved_and_clean_sets_do_not(supervisor):
    sup = supervisor({"a": ECHO, "b": ECHO})
    cur = sup.connect().cursor()
    assert not any(s["unsaved"] for s in sup.status().values())
    cur.execute("get a.kv", {"key": "default"})
    cur.execute("set b.kv", {"key": "x", "value": 1, "clean": 1})  # the agent set ctx.dirty = False
    assert not any(s["unsaved"] for s in sup.status().values())
    cur.execute("set a.kv", {"key": "x", "value": 1})
    status = sup.status()
    assert status["a"]["unsaved"] is True and status["b"]["unsaved"] is False
    with pytest.raises(cmactor.DatabaseError):
        cur.execute("set b.boom")  # a failed set leaves the module clean
    assert sup.status()["b"]["unsaved"] is False


def test_status_reports_process_figures(echo):
    status = echo.status()["echo"]
    assert status["state"] == "READY" and status["restarts"] == 0
    assert status["pid"] != os.getpid() and status["rss"] > 0 and status["threads"] >= 3
    assert status["queue"] == 0 and status["inflight"] == 0 and status["uptime"] >= 0


def test_many_clients_at_once(echo):
    errors = []

    def client(n):
        try:
            cur = echo.connect(f"user{n}").cursor()
            for i in range(50):
                cur.execute("set echo.kv", {"key": f"c{n}-{i}", "value": i})
                cur.execute("get echo.kv", {"key": f"c{n}-{i}"})
                assert cur.fetchone() == (f"c{n}-{i}", str(i))
        except Exception as exc:  # reported below, with the thread's name
            errors.append((n, exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    cur = echo.connect().cursor()
    cur.execute("getnext echo.kv")
    assert cur.rowcount == 8 * 50 + 1
