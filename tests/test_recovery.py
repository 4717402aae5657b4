"""Crashed agents come back with the config they had; nobody waiting on them hangs."""

import array
import json
import logging
import os
import signal
import threading
import time

import psutil
import pytest
from fakes import Reports, RouterLoop, module
from helpers import agent, kv_rows, wait_for

import cmactor
from cmactor.wire import protocol as P
from cmactor.wire.validate import Request
from cmsupervisor.supervision.modules import Pending
from cmsupervisor.supervision.recovery import Recovery, RestartPolicy, split_started
from cmsupervisor.supervision.states import FAILED, RESTARTING
from cmsupervisor.supervision.workers import SpawnFailed

ECHO = agent("echo.py:main")


def kill_and_wait_ready(sup, name="echo", sig=signal.SIGKILL):
    before = sup.status()[name]
    os.kill(before["pid"], sig)
    return wait_for(
        lambda: (s := sup.status()[name])["state"] == "READY" and s["restarts"] == before["restarts"] + 1 and s
    )


def test_sigkill_with_unsaved_sets_comes_back_with_all_of_them(supervisor):
    sup = supervisor({"echo": ECHO})
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "saved", "value": "s"})
    sup.save()
    for i in range(50):
        cur.execute("set echo.kv", {"key": f"k{i:02}", "value": i})
    cur.execute("set echo.kv", {"key": "saved", "value": "changed"})
    cur.execute("set echo.kv", {"key": "clean", "value": "x", "clean": 1})  # dirty False: not journaled
    status = kill_and_wait_ready(sup)
    assert status["unsaved"] is True  # as it was before the crash
    got = kv_rows(cur)
    assert got["saved"] == "changed" and all(got[f"k{i:02}"] == str(i) for i in range(50))
    assert "clean" not in got
    names = [n for n in cur.execute("get echo.events") and cur.fetchone()[0].split(",")]
    assert names[0] == "event_load_start" and names.index("load:saved") < names.index("load:k00")


def test_big_saved_config_and_journal_load_after_a_restart(supervisor, tmp_path):
    """A LOAD message far bigger than a socket buffer still reaches the worker whole."""
    import socket as _socket

    from cmactor.wire import protocol as P

    state = tmp_path / "state"
    sup = supervisor({"echo": ECHO}, state_dir=state)
    raw = _socket.socket(_socket.AF_UNIX)
    raw.connect(sup.socket_path)
    reader = P.FrameReader(None)

    def pipelined_sets(prefix, count):
        raw.sendall(
            b"".join(
                P.pack(
                    {
                        "id": i,
                        "op": "set",
                        "module": "echo",
                        "table": "kv",
                        "params": {"key": f"{prefix}{i:05}", "value": "x" * 20},
                    }
                )
                for i in range(count)
            )
        )
        replies = []
        while len(replies) < count:
            replies += reader.feed(raw.recv(65536))
        assert all(r["ok"] for r in replies)

    pipelined_sets("saved", 20000)
    sup.save()
    pipelined_sets("journaled", 10000)
    raw.close()
    status = kill_and_wait_ready(sup)
    assert status["unsaved"] is True
    got = kv_rows(sup.connect().cursor())
    assert len(got) == 30001 and got["journaled09999"] == "x" * 20


def test_save_folds_the_journal_into_the_config_file(supervisor):
    sup = supervisor({"echo": ECHO})
    cur = sup.connect().cursor()
    journal = os.path.join(sup.state_dir, "journal", "echo.jsonl")
    for i in range(5):
        cur.execute("set echo.kv", {"key": f"k{i}", "value": i})
    with open(journal) as f:
        assert len(f.readlines()) == 5
    sup.save()
    assert os.path.getsize(journal) == 0
    cur.execute("set echo.kv", {"key": "after", "value": "save"})
    kill_and_wait_ready(sup)
    got = kv_rows(cur)
    assert got["after"] == "save" and got["k4"] == "4"


def test_journal_records_are_durable_before_the_reply(supervisor):
    sup = supervisor({"echo": ECHO})
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "k", "value": "v"})
    with open(os.path.join(sup.state_dir, "journal", "echo.jsonl"), "rb") as f:
        line = f.read()
    crc, _, data = line.rstrip(b"\n").partition(b" ")
    assert json.loads(data) == ["set", "kv", {"key": "k", "value": "v"}] and len(crc) == 8


def test_every_start_replays_the_journal_and_only_saved_only_moves_it_aside(supervisor, tmp_path, caplog):
    state = tmp_path / "state"
    sup = supervisor({"echo": ECHO}, state_dir=state)
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "saved", "value": "1"})
    sup.save()
    for key in ("j1", "j2", "j3"):
        cur.execute("set echo.kv", {"key": key, "value": key})
    sup.stop()  # a clean stop: the running config survives it as a crash's does
    journal = state / "journal" / "echo.jsonl"
    with open(journal, "ab") as f:
        f.write(b'0badc0de ["set","kv",{"key":"to')  # torn: the supervisor died mid-write
    again = supervisor({"echo": ECHO}, state_dir=state)  # a plain start
    got = kv_rows(again.connect().cursor())
    assert {k: got[k] for k in ("saved", "j1", "j2", "j3")} == {"saved": "1", "j1": "j1", "j2": "j2", "j3": "j3"}
    assert not any(k.startswith("to") for k in got)
    assert again.status()["echo"]["unsaved"] is True
    again.stop()
    recovered = supervisor({"echo": ECHO}, state_dir=state, recover=True)  # --recover: accepted, the same
    assert sorted(kv_rows(recovered.connect().cursor())) == ["default", "j1", "j2", "j3", "saved"]
    recovered.stop()
    kept = journal.read_bytes()
    with caplog.at_level(logging.WARNING, logger="cmactor.supervisor"):
        saved_only = supervisor({"echo": ECHO}, state_dir=state, recover=False)  # --saved-only
    assert sorted(kv_rows(saved_only.connect().cursor())) == ["default", "saved"]
    assert saved_only.status()["echo"]["unsaved"] is False
    [aside] = (state / "journal").glob("echo.jsonl.aside-*")
    assert aside.read_bytes() == kept  # moved, never deleted
    message = next(r.getMessage() for r in caplog.records if "moved aside" in r.getMessage())
    assert f"moved aside to {aside}" in message and f"cmactor journal {aside} | cmactor apply -" in message


def test_a_damaged_record_in_the_middle_drops_it_and_the_rest(tmp_path, caplog):
    from cmsupervisor.persistence import journal as J

    path = tmp_path / "j.jsonl"
    good = J.Journal(str(path))
    good.open(recover=True)
    for i in range(4):
        good.append("set", "kv", {"key": str(i)})
    good.sync()
    good.close()
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"2"', b'"X"')
    path.write_bytes(b"\n".join(lines))
    assert [r[2]["key"] for r in J.read(str(path))] == ["0", "1"]
    assert "record 3 is damaged; it and the 1 after it are dropped" in caplog.text


def test_a_torn_tail_is_cut_off_at_open_so_that_later_records_are_not_lost_behind_it(tmp_path, caplog):
    from cmsupervisor.persistence import journal as J

    path = tmp_path / "j.jsonl"
    first = J.Journal(str(path))
    first.open(recover=True)
    first.append("set", "kv", {"key": "a"})
    first.sync()
    first.close()
    with open(path, "ab") as f:
        f.write(b'0badc0de ["set","kv",{"key":"torn')  # a crash in the middle of a write
    again = J.Journal(str(path))
    again.open(recover=True)
    assert [r[2]["key"] for r in again.records] == ["a"]
    again.append("set", "kv", {"key": "b"})  # acknowledged after the restart
    again.sync()
    again.close()
    assert [r[2]["key"] for r in J.read(str(path))] == ["a", "b"]  # not dropped behind the torn bytes
    [kept] = tmp_path.glob("j.jsonl.damaged-*")
    assert kept.read_bytes() == b'0badc0de ["set","kv",{"key":"torn'
    assert f"its damaged end (33 bytes) is cut off and kept as {kept}" in caplog.text


def test_a_save_walk_covers_the_serial_changes_sent_before_it_and_no_async_one_answered_during_it(tmp_path):
    from cmsupervisor.persistence import journal as J

    journal = J.Journal(str(tmp_path / "j.jsonl"))
    journal.open(recover=True)
    journal.append("set", "kv", {"key": "before"}, sid=3)
    walk_start = journal.position()  # the Save is sent: sid 10
    journal.append("setop", "kv", {"key": "serial"}, sid=7)  # in flight then: ran on the lane before the walk
    journal.append("setop", "kv", {"key": "async"}, sid=8, is_async=True)  # ran beside the walk
    journal.append("set", "kv", {"key": "after"}, sid=12)  # sent once the walk was over
    assert journal.covered(10, walk_start) == [True, True, False, False]
    journal.drop_covered(10, walk_start, b"{}")
    assert [r[2]["key"] for r in journal.records] == ["async", "after"]
    assert [r[2]["key"] for r in J.read(journal.path)] == ["async", "after"]
    journal.close()


def test_crash_inside_an_action_fails_that_client_and_a_queued_request_runs_after_the_restart(supervisor):
    sup = supervisor({"echo": ECHO})
    results = {}

    def crasher():
        try:
            sup.connect().cursor().execute("set echo.exit", {"delay": 0.4})
        except cmactor.Error as exc:
            results["crasher"] = exc

    def queued():
        cur = sup.connect().cursor()
        cur.execute("get echo.kv", {"key": "default"})
        results["queued"] = cur.fetchone()

    first = threading.Thread(target=crasher)
    first.start()
    time.sleep(0.15)
    second = threading.Thread(target=queued)  # waits in the serial lane's mailbox, not started
    second.start()
    first.join(20)
    second.join(20)
    assert isinstance(results["crasher"], cmactor.OperationalError)
    assert "module 'echo' crashed (exit code 3) while handling set echo.exit" in str(results["crasher"])
    assert results["queued"] == ("default", "yes")
    assert sup.status()["echo"]["restarts"] == 1


def test_a_running_async_action_fails_when_its_worker_dies(supervisor):
    sup = supervisor({"echo": ECHO})
    with pytest.raises(cmactor.OperationalError, match="crashed \\(exit code 4\\) while handling set echo.aexit"):
        sup.connect().cursor().execute("set echo.aexit", {"delay": 0.1})


def test_sigsegv_is_seen_and_restarted(supervisor, caplog):
    sup = supervisor({"echo": ECHO})
    with pytest.raises(cmactor.OperationalError, match="killed by SIGSEGV"):
        sup.connect().cursor().execute("set echo.segv")
    status = wait_for(lambda: (s := sup.status()["echo"])["state"] == "READY" and s)
    assert status["last_exit"] == "killed by SIGSEGV" and status["restarts"] == 1
    assert sum("killed by SIGSEGV; restarting" in r.getMessage() for r in caplog.records) == 1


def test_an_infinite_loop_times_out_then_the_worker_is_restarted(supervisor):
    sup = supervisor({"echo": {"entry": ECHO, "action_timeout": 0.5, "hang_timeout": 1.5}, "other": ECHO})
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "kept", "value": "1"})
    start = time.monotonic()
    with pytest.raises(cmactor.OperationalError, match="get echo.spin timed out: not done within action_timeout=0.5s"):
        cur.execute("get echo.spin")
    assert 0.4 < time.monotonic() - start < 5
    status = wait_for(lambda: (s := sup.status()["echo"])["state"] == "READY" and s["restarts"] == 1 and s)
    assert "stuck in one action for more than hang_timeout=1.5s" in status["last_exit"]
    assert kv_rows(cur)["kept"] == "1"
    cur.execute("get other.kv", {"key": "default"})


def test_stop_waits_for_in_flight_requests(supervisor):
    sup = supervisor({"echo": ECHO})
    result = {}

    def slow():
        cur = sup.connect().cursor()
        cur.execute("get echo.sleep", {"secs": 0.5})
        result["row"] = cur.fetchone()

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.1)
    sup.stop()
    thread.join(10)
    assert result["row"] is not None


def test_stop_kills_what_outlives_stop_timeout(supervisor):
    sup = supervisor({"echo": ECHO}, stop_timeout=0.3)
    errors = []

    def stuck():
        try:
            sup.connect().cursor().execute("get echo.sleep", {"secs": 30})
        except cmactor.Error as exc:
            errors.append(exc)

    thread = threading.Thread(target=stuck)
    thread.start()
    time.sleep(0.1)
    start = time.monotonic()
    sup.stop()
    assert time.monotonic() - start < 5
    thread.join(10)
    assert errors and isinstance(errors[0], cmactor.OperationalError)


def _running(pid):
    """Whether ``pid`` is a process that has not ended (a zombie has; so has one that is gone
    between two looks at it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("busy", [False, True])
def test_workers_are_gone_within_a_second_of_the_supervisor_dying(tmp_path, busy):
    """Idle or busy in a long serial action (nothing reads its socket then), a worker
    exits with its supervisor."""
    import subprocess
    import sys

    serial_only = agent("serial_only.py:main")
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, threading, cmactor\n"
        "if __name__ == '__main__':\n"
        f"    sup = cmactor.Supervisor({{'a': {ECHO!r}, 's': {serial_only!r}}}, state_dir={str(tmp_path / 's')!r})\n"
        "    sup.start()\n"
        f"    if {busy}:\n"
        "        cur = sup.connect().cursor()\n"
        "        threading.Thread(target=cur.execute, args=('get s.sleep', {'secs': 60}), daemon=True).start()\n"
        "        threading.Thread(target=sup.connect().cursor().execute, args=('get a.sleep', {'secs': 60}), daemon=True).start()\n"
        "        import time; time.sleep(0.3)\n"
        "    print(' '.join(str(s['pid']) for s in sup.status().values()), flush=True)\n"
        "    sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        proc.kill()
        proc.wait(10)
        killed = time.monotonic()
        while any(_running(p) for p in pids):
            assert time.monotonic() - killed < 1.0, "workers outlived their supervisor by a second"
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()


def test_status_reports_health_figures_and_the_last_exit(supervisor):
    sup = supervisor({"echo": ECHO})
    kill_and_wait_ready(sup)
    time.sleep(0.2)
    status = sup.status()["echo"]
    assert status["last_exit"] == "killed by SIGKILL" and status["restarts"] == 1
    assert status["rss"] > 1_000_000 and status["threads"] >= 3 and status["cpu"] >= 0
    assert status["uptime"] >= 0.1 and status["queue"] == 0 and status["inflight"] == 0


def test_journal_files_are_replayed_in_the_order_their_changes_were_made():
    from cmsupervisor.persistence.journal import replay_order

    named = [  # as a shell glob lists them
        "j/kv.jsonl",
        "j/kv.jsonl.aside-20261205T100000",
        "j/kv.jsonl.aside-20261205T090000",
        "j/kv.jsonl.old",
        "j/kv.snapshot",
        "j/kv.snapshot.aside-20261205T100000",
        "j/kv.snapshot.old",
    ]
    assert replay_order(named) == [
        "j/kv.snapshot.old",
        "j/kv.jsonl.old",
        "j/kv.jsonl.aside-20261205T090000",
        "j/kv.snapshot.aside-20261205T100000",
        "j/kv.jsonl.aside-20261205T100000",
        "j/kv.snapshot",
        "j/kv.jsonl",
    ]


# The part on its own, with fakes.


def pend(sid, is_async):
    p = Pending(None, sid, Request(id=sid, op="get", module="m", table="t"), 0.0)
    p.sid, p.is_async = sid, is_async
    return p


def inflight_of(*items):
    return {sid: pend(sid, is_async) for sid, is_async in items}


def sids(pendings):
    return [p.sid for p in pendings]


@pytest.mark.parametrize("make", [lambda: [0] * P.SLOTS_SIZE, lambda: array.array("q", [0] * P.SLOTS_SIZE)])
def test_split_started_by_the_progress_slots(make):
    slots = make()
    # dict order is dispatch order; not sorted on purpose
    inflight = inflight_of((6, False), (3, False), (8, True), (4, True), (5, False), (7, True), (9, True))
    slots[P.SLOT_SERIAL_SID] = 5
    slots[P.async_slot(0)] = 8
    slots[P.async_slot(0) + 1] = 7  # a start time that happens to equal sid 7: not a sid
    slots[P.async_slot(P.ASYNC_SLOTS - 1)] = 4  # the last slot counts too
    started, waiting = split_started(inflight, slots)
    assert sids(started) == [3, 8, 4, 5]
    assert sids(waiting) == [6, 7, 9]
    slots[P.SLOT_OVERFLOW] = 1
    started, waiting = split_started(inflight, slots)
    assert sids(started) == [3, 8, 4, 5, 7, 9]
    assert sids(waiting) == [6]


class SpawnFails:
    """Workers whose every start of a process fails, as with one that cannot be made (a
    shortage of descriptors is retried by Recovery.launch itself, never reaching here)."""

    def spawn(self, mod):
        raise SpawnFailed("could not start a worker process: PicklingError: cannot pickle the agent's options", False)


class Quarantines:
    """The lifecycle as recovery reaches it, with the quarantines it was asked for."""

    starting = stopping = False

    def __init__(self):
        self.quarantined = []

    def quarantine(self, mod, reason):
        self.quarantined.append(reason)
        mod.state = FAILED


def test_a_restart_that_cannot_start_a_process_backs_off_then_quarantines():
    policy = RestartPolicy(
        {"max_restarts": 3, "restart_window": 60, "restart_delay": 0.1, "restart_delay_max": 5, "stable_after": 10}
    )
    mod = module("m", RESTARTING, policy=policy, started_at=time.monotonic() - 100)  # it had run for long
    loop, lifecycle = RouterLoop(), Quarantines()
    recovery = Recovery({"m": mod}, loop, SpawnFails(), None, None, None, lifecycle, Reports())
    for expected in (0.1, 0.2, 0.4):  # the backoff grows: a failed start has no uptime
        recovery._respawn(mod)
        assert mod.state == RESTARTING and "cannot pickle" in mod.last_exit
        delay, fn, args = loop.timers.pop()
        assert delay == expected and fn == recovery._respawn and args == (mod,)
    recovery._respawn(mod)
    assert mod.state == FAILED and "crashed more than 3 times" in lifecycle.quarantined[0]
    assert mod.restarts == 4 and loop.timers == []


def test_split_started_with_idle_slots_starts_nothing():
    slots = [0] * P.SLOTS_SIZE
    inflight = inflight_of((1, False), (2, True))
    assert tuple(map(sids, split_started(inflight, slots))) == ([], [1, 2])
    assert split_started({}, slots) == ([], [])
