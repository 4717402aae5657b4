"""A full disk, a frozen worker, a stuck pool: the supervisor goes on and loses nothing acknowledged.

The full-disk tests mount a small tmpfs as the state directory (they run as root,
as CI does; elsewhere they are skipped, saying why).
"""

import json
import os
import signal
import stat
import threading

import pytest
from helpers import agent, fill, small_disk, wait_for
from rawsocket import raw, read_frames

import cmactor
from cmactor.wire import protocol as P
from cmsupervisor.persistence import store
from cmsupervisor.persistence.journal import encode as journal_record

ECHO = agent("echo.py:main")


def test_a_change_that_cannot_be_journaled_is_refused_and_undone(tmp_path, supervisor):
    with small_disk(tmp_path / "disk") as disk:
        sup = supervisor({"echo": ECHO}, state_dir=disk / "state")
        cur = sup.connect().cursor()
        cur.execute("set echo.kv", {"key": "kept", "value": "1"})
        filler = fill(disk)
        pid = sup.status()["echo"]["pid"]
        with pytest.raises(cmactor.OperationalError) as refused:
            cur.execute("set echo.kv", {"key": "lost", "value": "x" * 20000})
        message = str(refused.value)
        assert "set echo.kv was not committed" in message and "No space left on device" in message
        assert "free the disk and send it again" in message
        # The worker had applied it: it is restarted from its config and journal, without it.
        wait_for(lambda: sup.status()["echo"]["state"] == "READY" and sup.status()["echo"]["pid"] != pid)
        with pytest.raises(cmactor.DatabaseError, match="no key 'lost'"):
            cur.execute("get echo.kv", {"key": "lost"})
        cur.execute("get echo.kv", {"key": "kept"})
        assert tuple(cur.fetchone()) == ("kept", "1")
        # Reads and changes that need no journal go on meanwhile.
        cur.execute("set echo.order", {"n": "1"})
        filler.unlink()
        cur.execute("set echo.kv", {"key": "later", "value": "2"})
        sup.stop()
        # Acknowledged changes survive a restart of the supervisor itself.
        again = supervisor({"echo": ECHO}, state_dir=disk / "state", recover=True)
        cur = again.connect().cursor()
        cur.execute("getnext echo.kv")
        assert dict(cur.fetchall()) == {"default": "yes", "kept": "1", "later": "2"}
        again.stop()


def test_a_full_disk_fails_a_save_and_the_audit_log_without_stopping_anything(tmp_path, supervisor):
    with small_disk(tmp_path / "disk") as disk:
        sup = supervisor({"echo": ECHO}, state_dir=disk / "state")
        cur = sup.connect().cursor()
        cur.execute("set echo.kv", {"key": "a", "value": "1"})
        sup.save()
        saved = (disk / "state" / "config.jsonl").read_bytes()
        cur.execute("set echo.kv", {"key": "b", "value": "x" * 1000})
        filler = fill(disk)
        with pytest.raises(cmactor.OperationalError, match="save failed: cannot write .*config.jsonl"):
            sup.save()
        assert (disk / "state" / "config.jsonl").read_bytes() == saved
        assert not [n for n in os.listdir(disk / "state") if n.endswith(".tmp")]
        for n in range(20):  # audit lines for sets on a table that is not journaled
            cur.execute("set echo.order", {"n": str(n)})
        wait_for(lambda: sup.supervisor_status()["audit_failures"] > 0)
        assert "No space left on device" in sup.supervisor_status()["audit_error"]
        filler.unlink()
        sup.save()
        cur.execute("getnext echo.kv")
        assert dict(cur.fetchall())["b"] == "x" * 1000


def test_a_stopped_worker_fails_its_heartbeat_and_is_restarted(supervisor):
    sup = supervisor({"echo": {"entry": ECHO, "heartbeat_timeout": 1}})
    pid = sup.status()["echo"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: sup.status()["echo"]["restarts"] == 1 and sup.status()["echo"]["state"] == "READY", timeout=15)
    status = sup.status()["echo"]
    assert "did not answer a heartbeat within heartbeat_timeout=1s" in status["last_exit"]
    cur = sup.connect().cursor()
    cur.execute("get echo.kv", {"key": "default"})
    assert tuple(cur.fetchone()) == ("default", "yes")


def test_a_busy_serial_lane_still_answers_heartbeats(supervisor):
    sup = supervisor({"echo": {"entry": ECHO, "heartbeat_timeout": 0.5}})
    cur = sup.connect().cursor()
    cur.execute("get echo.sleep", {"secs": "2"})  # the reading thread runs it; the doorbell wakes the other
    assert sup.status()["echo"]["restarts"] == 0


def test_a_pool_stuck_past_hang_timeout_restarts_the_worker(supervisor):
    # Through the supervisor: a direct read of an @async_action takes no pool thread.
    sup = supervisor({"echo": {"entry": ECHO, "pool_size": 2, "hang_timeout": 1}}, direct_reads=False)
    conns = [sup.connect() for _ in range(2)]
    errors = []

    def hang(conn):
        try:
            conn.cursor().execute("get echo.asleep", {"secs": "60"})
        except cmactor.Error as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hang, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    wait_for(lambda: sup.status()["echo"]["restarts"] == 1, timeout=15)
    for t in threads:
        t.join(10)
    assert len(errors) == 2 and all("crashed" in str(e) for e in errors)
    assert "all 2 threads of its pool were stuck" in sup.status()["echo"]["last_exit"]
    wait_for(lambda: sup.status()["echo"]["state"] == "READY")
    cur = sup.connect().cursor()
    cur.execute("get echo.asleep", {"secs": "0"})  # the pool serves again


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_file_and_directory_cmactor_creates_is_owner_only(tmp_path, supervisor):
    state = tmp_path / "state"
    sup = supervisor({"echo": ECHO}, state_dir=state)
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "enable_secret", "value": "s3cr3t"})
    sup.save()
    cur.execute("set echo.kv", {"key": "after", "value": "save"})
    assert {name: _mode(state / name) for name in ("", "journal", "run")} == {"": 0o700, "journal": 0o700, "run": 0o700}
    for name in ("config.jsonl", "audit.log", "journal/echo.jsonl"):
        assert _mode(state / name) == 0o600, name


def test_the_audit_line_names_the_peer_uid_and_pid(tmp_path, supervisor):
    sup = supervisor({"echo": ECHO}, state_dir=tmp_path / "state")
    with sup.connect("mallory") as conn:
        conn.cursor().execute("set echo.kv", {"key": "k", "value": "v"})
    wait_for(lambda: (tmp_path / "state" / "audit.log").read_text())
    line = json.loads((tmp_path / "state" / "audit.log").read_text().splitlines()[-1])
    assert (line["user"], line["uid"], line["pid"], line["outcome"]) == ("mallory", os.getuid(), os.getpid(), "ok")


def test_temporary_files_left_by_a_killed_write_are_removed_at_start(tmp_path, supervisor):
    state = tmp_path / "state"
    (state / "journal").mkdir(parents=True)
    (state / ".config-abc123.tmp").write_text("half a save")
    (state / "journal" / "echo.jsonl.tmp").write_text("half a truncation")
    (state / "notes.tmp").write_text("not ours")
    supervisor({"echo": ECHO}, state_dir=state)
    assert not (state / ".config-abc123.tmp").exists() and not (state / "journal" / "echo.jsonl.tmp").exists()
    assert (state / "notes.tmp").exists()


def test_non_finite_numbers_in_the_config_are_refused(tmp_path):
    with pytest.raises(cmactor.ConfigError, match="hold_timeout: expected a finite number of seconds, got nan"):
        cmactor.Supervisor({"echo": ECHO}, state_dir=tmp_path, hold_timeout=float("nan"))
    path = tmp_path / "c.toml"
    path.write_text(f'[agents.echo]\nentry = "{ECHO}"\nhang_timeout = inf\n')
    with pytest.raises(
        cmactor.ConfigError,
        match=r"c.toml:3: \[agents\].echo.hang_timeout: expected a finite number of seconds, got inf",
    ):
        cmactor.Supervisor.from_toml(path)


def _journal_lines(state):
    return (state / "journal" / "echo.jsonl").read_bytes().count(b"\n")


def test_a_journal_past_its_bound_is_compacted_and_a_restart_loads_the_snapshot(tmp_path, supervisor):
    state = tmp_path / "state"
    options = {"entry": ECHO, "journal_max_records": 50}
    sup = supervisor({"echo": options}, state_dir=state)
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "saved", "value": "1"})
    sup.save()
    for n in range(600):
        cur.execute("set echo.kv", {"key": f"k{n % 10}", "value": str(n)})
    expected = {"default": "yes", "saved": "1", **{f"k{i}": str(590 + i) for i in range(10)}}
    wait_for(lambda: (state / "journal" / "echo.snapshot").exists() and _journal_lines(state) < 60)
    assert sup.status()["echo"]["unsaved"] is True
    # A crash: the new worker loads the snapshot and the records after it.
    os.kill(sup.status()["echo"]["pid"], signal.SIGKILL)
    wait_for(lambda: sup.status()["echo"]["restarts"] == 1 and sup.status()["echo"]["state"] == "READY")
    cur.execute("getnext echo.kv")
    assert dict(cur.fetchall()) == expected
    assert sup.status()["echo"]["unsaved"] is True
    sup.stop()
    # The supervisor stopped: the next start loads the snapshot too.
    again = supervisor({"echo": options}, state_dir=state)
    cur = again.connect().cursor()
    cur.execute("getnext echo.kv")
    assert dict(cur.fetchall()) == expected
    again.save()  # the config file now holds it all: the snapshot goes
    assert not (state / "journal" / "echo.snapshot").exists() and _journal_lines(state) == 0
    assert again.status()["echo"]["unsaved"] is False
    cur.execute("set echo.kv", {"key": "k0", "value": "after"})
    again.stop()
    plain = supervisor({"echo": options}, state_dir=state)
    cur = plain.connect().cursor()
    cur.execute("getnext echo.kv")
    assert dict(cur.fetchall()) == {**expected, "k0": "after"}
    plain.stop()
    saved_only = supervisor({"echo": options}, state_dir=state, recover=False)  # the saved config alone
    cur = saved_only.connect().cursor()
    cur.execute("getnext echo.kv")
    assert dict(cur.fetchall()) == expected


def test_saved_only_moves_an_unsaved_snapshot_aside(tmp_path, supervisor):
    state = tmp_path / "state"
    options = {"entry": ECHO, "journal_max_records": 5}
    sup = supervisor({"echo": options}, state_dir=state)
    cur = sup.connect().cursor()
    for n in range(20):
        cur.execute("set echo.kv", {"key": f"k{n}", "value": "v"})
    wait_for(lambda: (state / "journal" / "echo.snapshot").exists())
    sup.stop()
    fresh = supervisor({"echo": options}, state_dir=state, recover=False)
    cur = fresh.connect().cursor()
    cur.execute("getnext echo.kv")
    assert dict(cur.fetchall()) == {"default": "yes"}
    assert len(list((state / "journal").glob("echo.snapshot.aside-*"))) == 1
    assert not (state / "journal" / "echo.snapshot").exists()


def test_an_internal_error_fails_only_the_request_involved(supervisor, monkeypatch):
    sup = supervisor({"echo": ECHO}, direct_reads=False)  # the gets must pass through the router
    cur = sup.connect().cursor()
    route = sup._server.on_data  # the router's route, which the server hands data requests to

    def buggy(client, request):
        if request.table == "boom":
            raise RuntimeError("a bug in routing")
        return route(client, request)

    monkeypatch.setattr(sup._server, "on_data", buggy)
    with pytest.raises(cmactor.InternalError, match="internal error handling get: RuntimeError: a bug in routing"):
        cur.execute("get echo.boom")
    cur.execute("get echo.kv", {"key": "default"})
    assert tuple(cur.fetchone()) == ("default", "yes")


def test_an_audit_line_that_cannot_be_encoded_is_dropped_alone(tmp_path):
    from cmsupervisor.observability.audit import AuditLog

    audit = AuditLog(str(tmp_path / "audit.log"))
    audit.record("u", 0, 1, "set", "m", "t", {b"bin": "key"}, "ok")  # a bug upstream, not a stop
    audit.record("u", 0, 1, "set", "m", "t", {"k": "v"}, "ok")
    audit.flush()
    audit.record("u", 0, 1, "set", "m", "t", {"k": "w"}, "ok")
    audit.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [line["params"] for line in lines] == [{"k": "v"}, {"k": "w"}]
    assert audit.failures == 1 and "TypeError" in audit.last_error


def test_a_damaged_snapshot_stops_the_start_naming_it(tmp_path, supervisor):
    state = tmp_path / "state"
    (state / "journal").mkdir(parents=True)
    (state / "journal" / "echo.snapshot").write_text("not a snapshot\n")
    sup = supervisor({"echo": ECHO}, state_dir=state, start=False)
    with pytest.raises(cmactor.StartupError, match=r"echo.snapshot is not a cmactor config file.*--saved-only"):
        sup.start()


def test_what_compaction_writes_in_all_stays_within_three_times_what_the_sets_wrote(tmp_path, supervisor, monkeypatch):
    snapshots = []
    write = store.write

    def counted(path, sections):
        header = write(path, sections)
        snapshots.append(os.path.getsize(path))
        return header

    monkeypatch.setattr(store, "write", counted)
    options = {"entry": ECHO, "journal_max_bytes": 64 * 1024, "journal_max_records": 0}
    sup = supervisor({"echo": options}, state_dir=tmp_path / "state")
    cur = sup.connect().cursor()
    journaled = 0
    for n in range(400):  # the table grows to 3.2 MiB, 64 KiB of journal at a time
        params = {"key": f"k{n:03d}", "value": "v" * 8192}
        cur.execute("set echo.kv", params)
        journaled += len(journal_record("set", "kv", params))
    wait_for(lambda: not sup._loop.call(lambda: sup._saver.running))
    assert len(snapshots) >= 2, "the journal was never compacted"
    # Each compaction rewrites the whole table: one every 64 KiB wrote 25 times what the sets did.
    assert sum(snapshots) <= 3 * journaled, f"compaction wrote {sum(snapshots)} bytes for {journaled} journaled"
    os.kill(sup.status()["echo"]["pid"], signal.SIGKILL)  # and a restart still has it all
    wait_for(lambda: sup.status()["echo"]["restarts"] == 1 and sup.status()["echo"]["state"] == "READY")
    cur.execute("getnext echo.kv")
    assert len(cur.fetchall()) == 401


COUNTER = agent("counter.py:main")


def count(sup):
    cur = sup.connect().cursor()
    cur.execute("get counter.ctr", {"name": "c"})
    return int(cur.fetchone()[1])


def test_a_change_in_flight_when_a_save_starts_is_neither_lost_nor_replayed_twice(supervisor, tmp_path):
    state = tmp_path / "state"
    sup = supervisor({"counter": COUNTER}, state_dir=state)
    cur = sup.connect().cursor()
    cur.execute("setop counter.ctr", {"name": "c"})
    slow = threading.Thread(
        target=lambda: sup.connect().cursor().execute("setop counter.ctr", {"name": "c", "sleep": "0.5"})
    )
    slow.start()  # on the serial lane when the walk is sent: the walk runs after it, and sees it
    wait_for(lambda: sup.status()["counter"]["inflight"] == 1)
    sup.save()
    slow.join(10)
    assert count(sup) == 2
    restarted_twice(sup, state, {"counter": COUNTER}, supervisor)


def test_a_change_in_flight_when_a_compaction_starts_is_neither_lost_nor_replayed_twice(supervisor, tmp_path):
    state = tmp_path / "state"
    agents = {"counter": {"entry": COUNTER, "journal_max_records": 2}}
    sup = supervisor(agents, state_dir=state)
    sup.connect().cursor().execute("setop counter.ctr", {"name": "d"})
    sock = raw(sup)  # two setops in one write: the first's record fills the journal while the second runs
    sock.sendall(
        b"".join(
            P.pack({"id": n, "op": "setop", "module": "counter", "table": "ctr", "params": params})
            for n, params in ((1, {"name": "c"}), (2, {"name": "c", "sleep": "0.5"}))
        )
    )
    assert [reply["ok"] for reply in read_frames(sock, 2)] == [True, True]
    sock.close()
    wait_for(
        lambda: (state / "journal" / "counter.snapshot").exists() and not sup._loop.call(lambda: sup._saver.running)
    )
    assert count(sup) == 2
    restarted_twice(sup, state, agents, supervisor)


def restarted_twice(sup, state, agents, supervisor):
    """The count is still 2 after a worker crash, and after a new supervisor's start."""
    os.kill(sup.status()["counter"]["pid"], signal.SIGKILL)
    wait_for(lambda: sup.status()["counter"]["restarts"] == 1 and sup.status()["counter"]["state"] == "READY")
    assert count(sup) == 2  # the worker reloaded: the saved rows (or snapshot) and the journal after them
    sup.stop()
    assert count(supervisor(agents, state_dir=state)) == 2
