"""Direct reads: a client's get, getone and getnext go straight to the module's worker
(cmactor/direct.py), on a socket of its own; the supervisor stays the control plane.

Real supervisors, real workers, real signals. Each result a client sees is compared
with the same request through the supervisor (direct_reads = false)."""

import array
import os
import signal
import socket
import stat
import threading
import time

import pytest
from helpers import agent, kv_rows, wait_for
from rawsocket import read_frames

import cmactor
from cmactor.cmbackend import CmAgent
from cmactor.wire import protocol as P
from cmactor.worker import process as worker
from cmactor.worker.lanes import SUPERVISOR, Work

ECHO = agent("echo.py:main")
READER = agent("reader.py:main")
CALLER = agent("caller.py:main")


def direct_entry(sup, module="echo"):
    """The module's direct entry in status, once its worker serves direct reads."""
    return wait_for(lambda: (d := sup.status()[module]["direct"]) and d["serving"] and d)


def worker_socket(sup, module="echo"):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(direct_entry(sup, module)["path"])
    return sock


def ask(sock, message):
    sock.sendall(P.pack(message))
    [reply] = read_frames(sock)
    return reply


def outcome(cur, operation, params=None):
    """What a client sees of one request: rows and description, or the error."""
    try:
        cur.execute(operation, params)
    except cmactor.Error as exc:
        return type(exc).__name__, str(exc)
    return cur.fetchall(), cur.description, cur.rowcount, list(cur.messages)


CASES = [
    ("get echo.kv", {"key": "default"}),
    ("getone echo.kv", {"key": "default"}),
    ("get echo.kv", {"key": "missing"}),
    ("getnext echo.kv", None),
    ("getnext echo.gen", {"count": "2500"}),
    ("getnext echo.gen", {"count": "5", "index": None}),
    ("get echo.ctx", {"a": 1}),
    ("get echo.actx", {"b": "2"}),
    ("get echo.boom", None),
    ("get echo.weird", {"kind": "values"}),
    ("get echo.weird", {"kind": "badkey"}),
    ("get echo.nosuch", None),
    ("set echo.kv", {"key": "k1", "value": "v1"}),
    ("get echo.kv", {"key": "k1"}),
    ("get nosuch.kv", None),
    ("getnext echo.forever", None),
]


def _without_thread_and_pid(result):
    """ctx rows name the thread and pid that ran them: the only thing allowed to differ."""
    if isinstance(result[0], list):
        rows = [
            tuple(
                "-" if isinstance(v, str) and ("lane" in v or "pool" in v or "direct" in v or v.isdigit()) else v
                for v in row
            )
            for row in result[0]
        ]
        return (rows, *result[1:])
    return result


def test_a_client_sees_the_same_through_the_worker_as_through_the_supervisor(supervisor, tmp_path):
    direct = supervisor({"echo": ECHO}, state_dir=tmp_path / "direct")
    brokered = supervisor({"echo": ECHO}, state_dir=tmp_path / "brokered", direct_reads=False)
    seen, cursors = {}, {}
    for name, sup in (("direct", direct), ("brokered", brokered)):
        cur = cursors[name] = sup.connect().cursor(vr_name="VR-Default")
        cur.max_rows = 3000
        seen[name] = [_without_thread_and_pid(outcome(cur, op, params)) for op, params in CASES]
    for case, (a, b) in zip(CASES, zip(seen["direct"], seen["brokered"])):
        assert a == b, case
    assert direct_entry(direct)["connections"] == 1
    assert brokered.status()["echo"]["direct"] is None


def test_reads_go_to_the_worker_and_writes_to_the_supervisor(supervisor):
    sup = supervisor({"echo": ECHO})
    cur = sup.connect().cursor()
    before = sup.status()["echo"]["requests"]
    cur.execute("get echo.ctx")
    [row] = cur.fetchall()
    thread = dict(zip([d[0] for d in cur.description], row))["thread"]
    assert thread == "echo-direct-reader"  # run by the reader itself, the lane being free
    cur.execute("set echo.kv", {"key": "a", "value": "1"})
    after = sup.status()["echo"]
    assert after["requests"]["get"]["ok"] == before["get"]["ok"] + 1
    assert after["requests"]["set"]["ok"] == before["set"]["ok"] + 1
    assert after["direct"]["connections"] == 1


def test_reads_notify_the_client_from_either_lane(supervisor):
    sup = supervisor({"reader": READER})
    printed = []
    cur = sup.connect(print_callback=printed.append).cursor(vr_name="VR-Mgmt")
    cur.execute("get reader.say", {"times": 3})
    assert cur.fetchall() == [("3",)]
    assert cur.messages == printed == ["line 0 for VR-Mgmt", "line 1 for VR-Mgmt", "line 2 for VR-Mgmt"]
    cur.execute("get reader.asay")
    assert cur.messages == ["from the async lane"]
    assert sup.status()["reader"]["requests"]["get"]["ok"] == 2


def test_notify_text_arrives_as_it_is_sent_not_with_the_reply(supervisor):
    sup = supervisor({"reader": READER})
    seen = []
    cur = sup.connect(print_callback=lambda text: seen.append(time.monotonic())).cursor()
    cur.execute("get reader.say", {"times": 1})  # the route, and the worker's socket
    start = time.monotonic()
    cur.execute("get reader.slowsay", {"secs": 0.6})
    assert cur.messages == ["started"] and seen[-1] - start < 0.4 < time.monotonic() - start


def test_clients_that_keep_the_serial_lane_busy_do_not_starve_one_another(supervisor):
    # The thread of a client that finds the lane free runs its own read, then hands the
    # lane on: were it to run the mailbox, others keeping it full would keep it there.
    sup = supervisor({"a": CALLER})
    sup.connect().cursor().execute("get a.z", {"secs": 0})
    path = direct_entry(sup, "a")["path"]
    until = time.monotonic() + 2
    gaps = []

    def flood():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(path)
        reader, rid, out, last, longest = P.FrameReader(max_frame=None), 0, 0, time.monotonic(), 0.0
        while time.monotonic() < until:
            while out < 8:
                rid += 1
                out += 1
                sock.sendall(P.pack({"id": rid, "op": "get", "module": "a", "table": "z", "params": {"secs": "0.002"}}))
            got = len(reader.feed(sock.recv(65536)))
            out -= got
            now = time.monotonic()
            longest, last = max(longest, now - last), now
        sock.close()
        gaps.append(longest)

    threads = [threading.Thread(target=flood) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(gaps) == 3 and max(gaps) < 1.0, gaps


def test_a_direct_read_that_sets_dirty_marks_the_module_unsaved(supervisor):
    sup = supervisor({"reader": READER})
    cur = sup.connect().cursor()
    cur.execute("get reader.say", {"times": 0})
    assert sup.status()["reader"]["unsaved"] is False
    cur.execute("get reader.touch")
    wait_for(lambda: sup.status()["reader"]["unsaved"] is True)
    assert direct_entry(sup, "reader")["connections"] == 1


def test_a_get_after_a_set_sees_it(supervisor):
    sup = supervisor({"echo": ECHO})
    cur = sup.connect().cursor()
    for n in range(300):
        cur.execute("set echo.kv", {"key": "k", "value": str(n)})
        cur.execute("get echo.kv", {"key": "k"})
        assert cur.fetchone() == ("k", str(n))


def test_an_agents_own_call_goes_through_the_supervisor(supervisor):
    sup = supervisor({"a": ECHO, "b": ECHO})
    cur = sup.connect().cursor()
    cur.execute("get a.call", {"module": "b"})
    assert cur.fetchone()[0] == "yes"
    assert sup.status()["b"]["direct"]["connections"] == 0  # a's action asked the supervisor


def test_a_worker_killed_under_a_direct_read_is_retried_through_the_supervisor(supervisor):
    sup = supervisor({"echo": ECHO})
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "kept", "value": "1"})
    cur.execute("get echo.kv", {"key": "kept"})
    pid = sup.status()["echo"]["pid"]
    old_path = direct_entry(sup)["path"]
    result = {}

    def slow():
        result["rows"] = outcome(cur, "get echo.sleep", {"secs": 1})

    thread = threading.Thread(target=slow)
    thread.start()
    wait_for(lambda: sup.status()["echo"]["direct"]["inflight"] == 1)
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert isinstance(result["rows"][0], list), result  # a held request, never a crash error
    status = wait_for(lambda: (s := sup.status()["echo"])["state"] == "READY" and s)
    assert status["restarts"] == 1 and status["pid"] != pid
    assert not os.path.exists(old_path)  # the dead worker's socket is gone
    assert direct_entry(sup)["generation"] == 2
    cur.execute("get echo.kv", {"key": "kept"})  # the same connection reads from the new worker
    assert cur.fetchone() == ("kept", "1")
    wait_for(lambda: sup.status()["echo"]["direct"]["connections"] == 1)


def test_a_read_on_a_dead_workers_route_is_held_until_the_restart(supervisor):
    sup = supervisor({"echo": {"entry": ECHO, "env": {"ECHO_LOAD_DELAY": "0.5"}}})
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "journaled", "value": "1"})  # so that the next worker loads, slowly
    cur.execute("get echo.kv", {"key": "default"})
    os.kill(sup.status()["echo"]["pid"], signal.SIGKILL)
    start = time.monotonic()
    cur.execute("get echo.kv", {"key": "default"})  # the socket fails: through the supervisor, held
    assert cur.fetchone() == ("default", "yes")
    assert time.monotonic() - start > 0.4  # it waited for the new worker's load
    assert sup.status()["echo"]["restarts"] == 1


def test_a_worker_not_ready_sends_reads_to_the_supervisor(supervisor):
    sup = supervisor({"echo": {"entry": ECHO, "env": {"ECHO_LOAD_DELAY": "1"}}})
    path = direct_entry(sup)["path"]
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "journaled", "value": "1"})  # so that the next worker loads, slowly
    cur.execute("get echo.kv", {"key": "default"})
    os.kill(sup.status()["echo"]["pid"], signal.SIGKILL)
    loading = wait_for(lambda: (s := sup.status()["echo"])["state"] == "LOADING" and s)
    new = loading["direct"]
    assert new["path"] != path and not new["serving"]
    with sup.connect() as conn:
        assert conn.request({"op": "route", "module": "echo"})["route"] is None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(new["path"])
    reply = ask(sock, {"id": 7, "op": "get", "module": "echo", "table": "kv", "params": {"key": "default"}})
    assert reply["id"] == 7 and reply["redirect"] is True and "not READY" in reply["error"]["message"]
    sock.close()
    cur.execute("get echo.kv", {"key": "default"})  # held by the supervisor until READY
    assert cur.fetchone() == ("default", "yes")


def test_the_route_handed_out_as_the_module_goes_ready_is_served_at_once(supervisor):
    # READY means the worker serves its socket: the first route of each new worker, asked
    # for as fast as a client can, never finds the worker redirecting reads.
    sup = supervisor({"echo": ECHO})
    get = {"id": 1, "op": "get", "module": "echo", "table": "kv", "params": {"key": "default"}}
    with sup.connect() as conn:
        route = conn.request({"op": "route", "module": "echo"})["route"]
        for _ in range(3):
            os.kill(sup.status()["echo"]["pid"], signal.SIGKILL)
            old, route = route, None
            deadline = time.monotonic() + 10
            while route is None or route == old:
                assert time.monotonic() < deadline, "no new route"
                route = conn.request({"op": "route", "module": "echo"})["route"]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(route["path"])
                reply = ask(sock, get)
            assert reply.get("redirect") is None and reply["rows"], reply


class _Direct:
    """A worker's direct socket as its Runtime sees it: whether it is served."""

    serving = False


class _Agent(CmAgent):
    def __init__(self, runtime=None):
        super().__init__()
        self.runtime = runtime  # given: ready() is called from the load, as agents do

    def event_generate_default(self):
        if self.runtime is not None:
            self.runtime.ready()


def _worker(sent):
    """A worker's Runtime (no process) whose every message to the supervisor is noted in
    ``sent`` as (its kind, whether the direct socket was served as it left)."""
    runtime = worker.Runtime("m", None, None, 2, array.array("q", [0] * P.SLOTS_SIZE))
    runtime.direct = _Direct()
    runtime.send = lambda message: sent.append((type(message).__name__, runtime.direct.serving))
    return runtime


def test_a_plain_process_serves_its_socket_before_it_reports_ready():
    # Ready alone makes a plain process READY: the socket is served before it leaves, so a
    # route the supervisor hands out at once is never found redirecting (it was, with the
    # supervisor's Serve sent after READY: a race the first direct read could lose).
    sent = []
    _worker(sent).ready()
    assert sent == [("Ready", True)]


@pytest.mark.parametrize("ready_in_load", [False, True], ids=["ready-before-load", "ready-in-load"])
def test_an_agent_serves_its_socket_before_it_reports_the_last_of_ready_and_its_load(ready_in_load):
    sent = []
    runtime = _worker(sent)
    runtime.register(_Agent(runtime if ready_in_load else None), [], [])
    if not ready_in_load:
        runtime.ready()  # the module is READY only once its load is done too: not served yet
    runtime._run_serial(Work(P.Load(1, None, []), None, SUPERVISOR))
    assert sent == [("Init", False), ("Ready", False), ("Loaded", True)]


def test_a_direct_read_run_by_a_lane_thread_leaves_the_other_to_read(supervisor):
    # A lane thread busy with the supervisor's serial work leaves the socket unread (the
    # supervisor rings the doorbell for async work meanwhile). A direct read queued
    # behind that work is run next by the same thread; its call into the module's own
    # async action must still be read, though the supervisor knows of no serial work.
    sup = supervisor({"a": CALLER})
    conn = sup.connect(timeout=20)
    slow = threading.Thread(
        target=conn.request, args=({"op": "get", "module": "a", "table": "z", "params": {"secs": "0.5"}, "hold": 5},)
    )
    slow.start()  # held requests go through the supervisor: onto a lane thread
    wait_for(lambda: sup.status()["a"]["inflight"] == 1)
    reader = sup.connect(timeout=20).cursor()
    start = time.monotonic()
    reader.execute("get a.s", {"chain": "a:a"})  # queued behind the slow one; then calls a.a
    assert dict(zip([d[0] for d in reader.description], reader.fetchone())) == {"depth": "2"}
    assert time.monotonic() - start < 10
    slow.join(10)


def test_a_quarantined_module_is_unavailable(supervisor):
    sup = supervisor({"echo": {"entry": ECHO, "max_restarts": 0}})
    cur = sup.connect().cursor()
    cur.execute("get echo.kv", {"key": "default"})
    os.kill(sup.status()["echo"]["pid"], signal.SIGKILL)
    wait_for(lambda: sup.status()["echo"]["state"] == "FAILED")
    with pytest.raises(cmactor.ModuleUnavailable, match="echo") as caught:
        cur.execute("get echo.kv", {"key": "default"})
    assert caught.value.module_name == "echo"


def test_reads_during_a_save_wait_behind_it(supervisor):
    sup = supervisor({"echo": ECHO})
    cur = sup.connect().cursor()
    cur.execute("set echo.ctl", {"save_fault": "1.0"})  # the save walk's first event sleeps 1s
    cur.execute("get echo.kv", {"key": "default"})
    saver = threading.Thread(target=sup.save)
    saver.start()
    wait_for(lambda: sup.status()["echo"]["saving"])
    time.sleep(0.1)  # the Save is in the worker
    done = {}

    def read(name, operation):
        with sup.connect() as conn:
            reader = conn.cursor()
            reader.execute(operation, {"key": "default"})
            done[name] = time.monotonic()

    readers = [
        threading.Thread(target=read, args=(n, f"get echo.{t}")) for n, t in (("serial", "kv"), ("async", "actx"))
    ]
    for r in readers:
        r.start()
    status = wait_for(lambda: (s := sup.status()["echo"])["queue"] == 2 and s)
    assert status["direct"]["queue"] == 2 and status["direct"]["inflight"] == 2
    saver.join(10)
    saved_at = time.monotonic()
    for r in readers:
        r.join(10)
    assert set(done) == {"serial", "async"}
    assert all(t <= saved_at + 0.5 for t in done.values())
    cur.execute("get echo.events")
    events = cur.fetchone()[0].split(",")
    assert events[-2:] == ["event_save_start", "event_save_complete"]
    assert sup.status()["echo"]["queue"] == 0


def test_status_and_metrics_count_direct_reads_across_restarts(supervisor):
    from helpers import ANY_PORT, scrape, value

    sup = supervisor({"echo": ECHO}, metrics=ANY_PORT)
    cur = sup.connect().cursor()
    for _ in range(5):
        cur.execute("get echo.kv", {"key": "default"})
    with pytest.raises(cmactor.DatabaseError):
        cur.execute("get echo.boom")
    requests = sup.status()["echo"]["requests"]["get"]
    assert requests["ok"] == 5 and requests["errors"] == {"DatabaseError": 1}
    assert requests["seconds"]["count"] == 6 and requests["seconds"]["sum"] > 0
    samples = scrape(sup)
    assert value(samples, "cmactor_requests_total", module="echo", op="get", outcome="ok") == 5
    assert value(samples, "cmactor_module_direct_connections", module="echo") == 1
    os.kill(sup.status()["echo"]["pid"], signal.SIGKILL)
    wait_for(lambda: sup.status()["echo"]["restarts"] == 1 and sup.status()["echo"]["state"] == "READY")
    cur.execute("get echo.kv", {"key": "default"})
    requests = sup.status()["echo"]["requests"]["get"]
    assert requests["ok"] == 6 and requests["errors"] == {"DatabaseError": 1}  # the dead worker's kept


def test_status_shows_a_slow_direct_read_in_flight(supervisor):
    sup = supervisor({"echo": ECHO})
    thread = threading.Thread(target=lambda: sup.connect().cursor().execute("get echo.sleep", {"secs": 0.6}))
    thread.start()
    status = wait_for(lambda: (s := sup.status()["echo"])["inflight"] == 1 and s)
    assert status["direct"]["inflight"] == 1
    thread.join(10)
    assert sup.status()["echo"]["inflight"] == 0


@pytest.mark.parametrize("slow, fast", [("sleep", "actx"), ("asleep", "kv")])
def test_a_read_stuck_in_its_action_holds_up_no_other_client(supervisor, slow, fast):
    # The reader runs a read itself (a serial one holding the lane, or an async one);
    # one that stays in its action hands the other clients on to a new reader.
    sup = supervisor({"echo": {"entry": ECHO, "pool_size": 2}})
    stuck = threading.Thread(target=lambda: sup.connect().cursor().execute(f"get echo.{slow}", {"secs": 3}))
    stuck.start()
    wait_for(lambda: sup.status()["echo"]["direct"]["inflight"] == 1)
    cur = sup.connect().cursor()
    for _ in range(20):
        cur.execute(f"get echo.{fast}", {"key": "default"})
        assert cur.fetchall()
    assert sup.status()["echo"]["direct"]["inflight"] == 1  # all 20 were read while it slept
    stuck.join(10)
    assert sup.status()["echo"]["direct"]["inflight"] == 0


def test_a_reader_that_cannot_hand_on_reads_on_once_its_read_ends(supervisor, tmp_path):
    # No thread to be had for a new reader: the stuck one keeps the reading, so another
    # client's read waits for it rather than being lost, and the worker says why.
    sup = supervisor({"reader": READER})
    sup.connect().cursor().execute("get reader.threadless")
    pid = sup.status()["reader"]["pid"]
    stuck = threading.Thread(target=lambda: sup.connect().cursor().execute("get reader.slowsay", {"secs": 1}))
    stuck.start()
    wait_for(lambda: sup.status()["reader"]["direct"]["inflight"] == 1)
    other = sup.connect().cursor()
    other.execute("get reader.asay")  # async: a new reader would have answered it at once
    assert other.fetchall() == [("1",)]
    assert sup.status()["reader"]["direct"]["inflight"] == 0  # it was read only once the slow read ended
    stuck.join(10)
    log_path = tmp_path / "state" / "logs" / "reader.log"
    wait_for(lambda: "cannot start a reader (can't start new thread)" in log_path.read_text())
    assert log_path.read_text().count("cannot start a reader") == 1  # once for the stuck batch, not each look
    assert sup.status()["reader"]["pid"] == pid


def test_a_client_epoll_will_not_watch_is_dropped_and_reads_through_the_supervisor(supervisor, tmp_path):
    sup = supervisor({"reader": READER})
    first = sup.connect()
    first.cursor().execute("get reader.unwatchable")
    pid = sup.status()["reader"]["pid"]
    cur = sup.connect().cursor()
    cur.execute("get reader.say", {"times": 0})
    assert cur.fetchall() == [("0",)]  # answered all the same, by the supervisor
    log_path = tmp_path / "state" / "logs" / "reader.log"
    wait_for(lambda: "cannot watch a client ([Errno 12] Cannot allocate memory); dropped" in log_path.read_text())
    wait_for(lambda: direct_entry(sup, "reader")["connections"] == 1)  # the first client's alone
    assert sup.status()["reader"]["pid"] == pid


def test_direct_reads_off(supervisor):
    sup = supervisor({"echo": ECHO}, direct_reads=False)
    cur = sup.connect().cursor()
    cur.execute("get echo.ctx")
    thread = dict(zip([d[0] for d in cur.description], cur.fetchone()))["thread"]
    assert thread.startswith("echo-lane")
    assert sup.status()["echo"]["direct"] is None
    with sup.connect() as conn:
        reply = conn.request({"op": "route", "module": "echo"})
        assert reply["route"] is False and reply["direct_reads"] is False
    assert not [n for n in os.listdir(os.path.dirname(sup.socket_path)) if n.startswith("cm.sock.")]


def test_a_stuck_direct_read_times_out_and_the_module_serves_on(supervisor):
    sup = supervisor({"echo": {"entry": ECHO, "action_timeout": 0.5, "pool_size": 2}})
    cur = sup.connect().cursor()
    start = time.monotonic()
    with pytest.raises(
        cmactor.OperationalError, match="get echo.asleep timed out: not done within action_timeout=0.5s"
    ):
        cur.execute("get echo.asleep", {"secs": 5})
    assert time.monotonic() - start < 4
    status = sup.status()["echo"]
    assert status["requests"]["get"]["errors"] == {"OperationalError": 1}
    other = sup.connect().cursor()
    other.execute("get echo.kv", {"key": "default"})
    assert other.fetchone() == ("default", "yes")
    assert status["pid"] == sup.status()["echo"]["pid"]  # its pool was never taken: no restart


def test_a_route_for_an_unknown_module_is_the_usual_error(supervisor):
    sup = supervisor({"echo": ECHO})
    with sup.connect() as conn:
        with pytest.raises(cmactor.ProgrammingError, match="unknown module 'nope'; this supervisor runs: echo"):
            conn.request({"op": "route", "module": "nope"})
        with pytest.raises(cmactor.ProgrammingError, match="bad module name"):
            conn.request({"op": "route", "module": "no such"})


def test_worker_sockets_are_owner_only_and_go_with_their_worker(supervisor, tmp_path):
    run = tmp_path / "state" / "run"
    run.mkdir(parents=True, mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(run / "cm.sock.7"))  # left by a supervisor killed with SIGKILL
    stale.close()
    sup = supervisor({"echo": ECHO})
    path = direct_entry(sup)["path"]
    assert os.path.dirname(path) == str(run) and not (run / "cm.sock.7").exists()
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
    sup.stop()
    assert not os.path.exists(path)


def test_the_worker_refuses_what_it_does_not_serve(supervisor):
    sup = supervisor({"echo": ECHO})
    sock = worker_socket(sup)
    for message, words in (
        ({"id": 1, "op": "set", "module": "echo", "table": "kv", "params": {"key": "x"}}, "set is not a read"),
        ({"id": 2, "op": "status"}, "status is not a read"),
        ({"id": 3, "op": "get", "module": "echo", "table": "kv", "caller": ["echo", "serial", 1]}, "agent's call"),
        ({"id": 4, "op": "get", "module": "echo", "table": "kv", "hold": 1}, "held request"),
    ):
        reply = ask(sock, message)
        assert reply["id"] == message["id"] and reply["redirect"] is True and words in reply["error"]["message"]
    reply = ask(sock, {"id": 5, "op": "get", "module": "other", "table": "kv"})
    assert (
        reply["error"]["type"] == "ProgrammingError"
        and "serves module 'echo', not 'other'" in reply["error"]["message"]
    )
    reply = ask(sock, {"id": 6, "op": "get", "module": "echo", "table": "kv", "params": {"key": 1}})
    assert reply["error"]["type"] == "ProgrammingError" and "'params.key' must be a str" in reply["error"]["message"]
    reply = ask(sock, {"id": 8, "op": "get", "module": "echo", "table": "kv", "params": {"key": "default"}})
    assert reply == {"id": 8, "ok": True, "rows": [{"key": "default", "value": "yes"}], "more": False}
    sock.close()
    assert kv_rows(sup.connect().cursor())["default"] == "yes"


def test_stop_answers_the_direct_reads_under_way(supervisor):
    sup = supervisor({"echo": {"entry": ECHO, "pool_size": 2}})
    results = []

    def slow(table):
        results.append(outcome(sup.connect().cursor(), f"get echo.{table}", {"secs": 0.5}))

    threads = [threading.Thread(target=slow, args=(t,)) for t in ("sleep", "asleep")]
    for t in threads:
        t.start()
    wait_for(lambda: sup.status()["echo"]["direct"]["inflight"] == 2)
    sup.stop()
    for t in threads:
        t.join(10)
    assert len(results) == 2 and all(isinstance(r[0], list) for r in results), results
