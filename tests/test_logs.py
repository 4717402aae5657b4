"""Per-module logs: each worker's log records, stdout and stderr in state_dir/logs/<module>.log,
rotated by size; each worker's start and end in its module's log; the supervisor's own log;
`cmactor logs` (--supervisor); owner-only files; a log directory that cannot be written."""

import contextlib
import logging
import os
import queue
import re
import signal
import stat
import subprocess
import threading

import psutil
import pytest
from helpers import agent, fill, small_disk, tmpfs, wait_for
from processes import Run, cmactor_cmd

import cmactor
from cmsupervisor.cli import program as cli
from cmsupervisor.cli.tail import last_lines
from cmsupervisor.front.server import default_socket_path
from cmsupervisor.observability import SUPERVISOR_LOG
from cmsupervisor.observability.logs import RotatingFile
from cmsupervisor.supervision.workers import MAX_LINE

CHATTY = agent("chatty.py:main")
ECHO = agent("echo.py:main")


def log_path(sup, name="chatty"):
    return os.path.join(sup.state_dir, "logs", f"{name}.log")


def read_log(sup, name="chatty"):
    with open(log_path(sup, name), encoding="utf-8") as f:
        return f.read()


def logged(sup, text, name="chatty"):
    """Wait until ``text`` is in the module's log; the log."""
    return wait_for(lambda: (lambda log: log if text in log else None)(read_log(sup, name)))


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_records_stdout_and_stderr_land_in_each_modules_own_log(supervisor, caplog):
    sup = supervisor({"chatty": CHATTY, "echo": ECHO})
    cur = sup.connect().cursor()
    cur.execute("set chatty.say", {"text": "out {n} Zürich ☃", "count": "2"})
    cur.execute("set chatty.say", {"text": "err {n}", "to": "stderr"})
    cur.execute("set chatty.say", {"text": "record {n}", "to": "log"})
    cur.execute("get echo.log", {"msg": "hi"})
    log = logged(sup, "record 0")
    pid = sup.status()["chatty"]["pid"]
    # What the supervisor says of the module is in its log too.
    assert f"INFO    cmactor.supervisor: module chatty READY (pid {pid})" in log
    # In the order written, each line stamped; stdout and stderr alike are OUTPUT.
    lines = [line.split(" ", 2)[2] for line in log.splitlines() if " cmactor.supervisor: " not in line]
    assert lines == [
        f"OUTPUT  chatty pid {pid} started",
        "OUTPUT  out 0 Zürich ☃",
        "OUTPUT  out 1 Zürich ☃",
        "OUTPUT  err 0",
        "WARNING chatty: record 0",
    ]
    assert "WARNING echo.agent: log_get called with hi" in logged(sup, "log_get called", "echo")
    assert "log_get" not in log
    # The supervisor's own log still gets the records, tagged with the module.
    assert "[chatty] record 0" in [r.getMessage() for r in caplog.records if r.name == "cmactor.agent.chatty"]


def restart(sup, cur, **last_words):
    """Have chatty's worker die (saying ``last_words``, chatty.die's params); wait for the next one."""
    pid = sup.status()["chatty"]["pid"]
    with pytest.raises(cmactor.OperationalError, match="crashed"):
        cur.execute("set chatty.die", last_words)
    wait_for(lambda: sup.status()["chatty"]["state"] == "READY" and sup.status()["chatty"]["pid"] != pid)
    return pid, sup.status()["chatty"]["pid"]


def test_a_crashed_workers_last_words_reach_the_log_before_its_restart(supervisor):
    sup = supervisor({"chatty": CHATTY})
    cur = sup.connect().cursor()
    for n in range(3):
        # 50 printed lines, then 300 kB in one write ending without a newline: more than
        # the socket holds, so the worker is gone before the supervisor has read it all.
        burst = "".join(f"burst {n}.{i} " + "-" * 1000 + "\n" for i in range(300)) + f"unended {n}"
        pid, new_pid = restart(sup, cur, text=f"bye {n}.{{n}}", count="50", tail=burst)
        log = logged(sup, f"chatty pid {new_pid} started")
        said = [line.split("OUTPUT  ")[1] for line in log.splitlines() if "OUTPUT  " in line]
        last_words = said[said.index(f"chatty pid {pid} started") + 1 : said.index(f"chatty pid {new_pid} started")]
        assert last_words == [f"bye {n}.{i}" for i in range(50)] + burst.split("\n")
        # Its crash, and the restart, are reported in its own log after its last words.
        assert (
            log.index(f"unended {n}")
            < log.index(f"module chatty: worker pid {pid} exit code")
            < log.index(f"chatty pid {new_pid} started")
        )


def test_a_process_holding_the_output_open_does_not_keep_a_dead_worker_or_its_descriptors(supervisor):
    sup = supervisor({"chatty": CHATTY})
    cur = sup.connect().cursor()
    restart(sup, cur)  # the first restart grows multiprocessing's shared memory heap: fds then stay level
    cur.execute("set chatty.spawn", {"secs": "30"})
    child = int(cur.fetchone()[0])
    try:
        logged(sup, "child says hi")
        me = psutil.Process()
        fds = me.num_fds()
        restart(sup, cur, text="leaving my child behind")
        # The child left the worker's process group and still holds the output's other end.
        assert psutil.pid_exists(child)
        cur.execute("set chatty.say", {"text": "new worker"})
        assert "leaving my child behind" in logged(sup, "new worker")
        assert me.num_fds() == fds  # the old worker's output was closed, the new one's opened
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_an_entry_that_exits_at_start_leaves_its_stderr_in_its_log_and_says_so(supervisor):
    sup = supervisor({"app": {"entry": agent("exos_app.py"), "args": ["--exit", "not-a-number"]}}, start=False)
    with pytest.raises(cmactor.StartupError, match=r"exited with status 2 .*stderr.* in its log: cmactor logs app\)"):
        sup.start()
    assert "error: argument --exit: invalid int value: 'not-a-number'" in read_log(sup, "app")


def test_output_without_newlines_is_cut_into_lines_of_the_cap(supervisor):
    sup = supervisor({"chatty": CHATTY})
    cur = sup.connect().cursor()
    cur.execute("set chatty.say", {"text": "x" * 1000, "to": "raw", "count": "100"})  # 100 kB, no newline
    cur.execute("set chatty.say", {"text": "end"})
    log = logged(sup, "end")
    # The worker's "started" line and the supervisor's READY line reach the log in either order.
    output = [line.split("OUTPUT  ", 1)[1] for line in log.splitlines() if "OUTPUT  " in line]
    assert re.fullmatch(r"chatty pid \d+ started", output.pop(0))
    assert "".join(output) == "x" * 100_000 + "end"
    assert max(map(len, output)) == MAX_LINE


def test_logs_and_the_audit_log_rotate_by_size_and_every_file_is_owner_only(supervisor):
    sup = supervisor({"chatty": CHATTY, "echo": ECHO}, log_max_bytes=4096, log_backups=2)
    cur = sup.connect().cursor()
    cur.execute("set chatty.say", {"text": "line {n} " + "-" * 60, "count": "300"})  # 25 kB
    logged(sup, "line 299 ")
    logs = os.path.join(sup.state_dir, "logs")
    assert sorted(os.listdir(logs)) == [SUPERVISOR_LOG, "chatty.log", "chatty.log.1", "chatty.log.2", "echo.log"]
    numbers = []
    for name in ("chatty.log.2", "chatty.log.1", "chatty.log"):
        path = os.path.join(logs, name)
        assert os.path.getsize(path) <= 4096 and mode(path) == 0o600
        with open(path) as f:
            numbers += [int(line.split()[4]) for line in f if " line " in line]
    assert numbers == list(range(numbers[0], 300))  # the newest lines, none lost or split
    assert mode(logs) == 0o700

    for n in range(100):  # about 250 bytes of audit line each
        cur.execute("set echo.kv", {"key": f"k{n}", "value": "v"})
    sup.save()
    audit = os.path.join(sup.state_dir, "audit.log")
    wait_for(lambda: os.path.exists(audit + ".2"))
    for path in (audit, audit + ".1", audit + ".2"):
        assert os.path.getsize(path) <= 4096 and mode(path) == 0o600
    for path in (os.path.join(sup.state_dir, "config.jsonl"), os.path.join(sup.state_dir, "journal", "echo.jsonl")):
        assert mode(path) == 0o600
    assert mode(os.path.join(sup.state_dir, "journal")) == 0o700


def test_the_supervisors_own_log_rotates_as_the_modules_do_and_ends_with_the_supervisor(supervisor):
    sup = supervisor({"echo": ECHO}, log_max_bytes=4096, log_backups=2)
    own = os.path.join(sup.state_dir, "logs", SUPERVISOR_LOG)
    logger = logging.getLogger("cmactor.supervisor")
    for n in range(200):  # about 100 bytes each: 20 kB, from a thread of the test's
        logger.warning("said %d %s", n, "-" * 40)
    numbers = []
    for path in (own + ".2", own + ".1", own):
        assert os.path.getsize(path) <= 4096 and mode(path) == 0o600
        with open(path) as f:
            numbers += [int(line.split()[5]) for line in f if " said " in line]
    assert numbers == list(range(numbers[0], 200)) and numbers[0] > 0  # the newest lines, whole and in order
    with open(own) as f:
        assert f.readline().split(" ", 2)[2].startswith("WARNING cmactor.supervisor: said ")
    sup.stop()
    logger.warning("after the stop")
    with open(own) as f:
        assert "after the stop" not in f.read()  # the handler went with the supervisor


def test_cmactor_run_keeps_its_own_log_and_each_workers_start_and_end_in_its_modules(tmp_path, capsys):
    config = tmp_path / "cmactor.toml"
    config.write_text(f'[supervisor]\nstate_dir = "state"\n[agents.chatty]\nentry = "{CHATTY}"\n')
    run = Run(config)
    try:
        with cmactor.connect(socket=default_socket_path(str(tmp_path / "state"))) as conn:
            pid = conn.request({"op": "status"})["status"]["chatty"]["pid"]
            os.kill(pid, signal.SIGKILL)
            new_pid = wait_for(
                lambda: (lambda e: e["state"] == "READY" and e["pid"] != pid and e["pid"])(
                    conn.request({"op": "status"})["status"]["chatty"]
                )
            )
        assert cli.main(["-c", str(config), "logs", "--supervisor", "-n", "100"]) == 0
        own = capsys.readouterr().out
        # What the supervisor says, at cmactor run's log_level (INFO), with each worker's pid.
        for said in (
            f"INFO    cmactor.supervisor: module chatty: worker pid {pid} started",
            f"INFO    cmactor.supervisor: module chatty READY (pid {pid})",
            "INFO    cmactor.supervisor: all 1 modules READY; listening on ",
            f"ERROR   cmactor.supervisor: module chatty: worker pid {pid} killed by SIGKILL; restarting in ",
            f"INFO    cmactor.supervisor: module chatty: worker pid {new_pid} started",
        ):
            assert said in own
        assert mode(tmp_path / "state" / "logs" / SUPERVISOR_LOG) == 0o600
        # The module's own log has its workers' starts and ends too, in order.
        chatty = (tmp_path / "state" / "logs" / "chatty.log").read_text()
        assert (
            chatty.index(f"module chatty: worker pid {pid} started")
            < chatty.index(f"module chatty: worker pid {pid} killed by SIGKILL; restarting in ")
            < chatty.index(f"module chatty: worker pid {new_pid} started")
        )
    finally:
        run.stop()
    assert run.proc.returncode == 0
    # Stopped: found through the config file's state_dir.
    assert cli.main(["-c", str(config), "logs", "--supervisor", "-n", "5"]) == 0
    assert f"module chatty: worker pid {new_pid} ended (exit code 0) in the stop" in capsys.readouterr().out


def test_a_workers_end_is_in_its_modules_log_however_the_module_ends(supervisor):
    # A worker ended once its module is FAILED (config_deps names no module of this
    # supervisor), and one whose crash at start quarantines its module.
    sup = supervisor(
        {
            "echo": ECHO,
            "orphan": {"entry": ECHO, "env": {"ECHO_DEPS": "nosuch"}},
            "bad": agent("broken.py:raises"),
        },
        start=False,
    )
    sup.start(strict=False)
    status = sup.status()
    assert status["orphan"]["state"] == status["bad"]["state"] == "FAILED"
    for name, ended in (("orphan", "ended (killed by SIGKILL after: config_deps"), ("bad", "exit code 1 after: entry")):
        pid = int(re.search(rf"module {name}: worker pid (\d+) started", read_log(sup, name))[1])
        log = logged(sup, f"module {name}: worker pid {pid} {ended}", name)
        assert log.index(f"worker pid {pid} started") < log.index(f"worker pid {pid} {ended}")


def test_files_and_directories_left_readable_by_others_are_made_owner_only(tmp_path, supervisor):
    state = tmp_path / "state"
    for directory in (state / "logs", state / "journal"):
        directory.mkdir(parents=True)
        directory.chmod(0o755)
    for path in (state / "logs" / "echo.log", state / "audit.log"):
        path.write_text("old\n")
        path.chmod(0o644)
    sup = supervisor({"echo": ECHO}, state_dir=state)
    sup.connect().cursor().execute("set echo.kv", {"key": "a", "value": "1"})
    wait_for(lambda: "set" in (state / "audit.log").read_text())
    assert [mode(p) for p in (state / "logs", state / "journal")] == [0o700, 0o700]
    assert [mode(p) for p in (state / "logs" / "echo.log", state / "audit.log")] == [0o600, 0o600]


def test_a_log_directory_that_is_a_file_stops_the_start_naming_it(tmp_path, supervisor):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "logs").write_text("not a directory")
    sup = supervisor({"echo": ECHO}, start=False)
    with pytest.raises(
        cmactor.StartupError, match=r"log directory \S+/state/logs cannot be made: a file is in the way; remove"
    ):
        sup.start()


@contextlib.contextmanager
def read_only_dir(path):
    """A directory this process cannot write: 0500 for a user, a read-only tmpfs for root."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        path.chmod(0o500)
        yield path
        return
    with tmpfs(path, "ro,mode=0700", "read-only"):
        yield path


def test_a_log_directory_that_cannot_be_written_stops_the_start_naming_the_file(tmp_path, supervisor):
    with read_only_dir(tmp_path / "state" / "logs"):
        sup = supervisor({"echo": ECHO}, start=False)
        with pytest.raises(
            cmactor.StartupError, match=r"log file \S+/logs/echo.log cannot be written: .*; make \S+/logs a directory"
        ):
            sup.start()


def test_a_full_disk_while_logging_is_counted_logged_once_and_never_stops_the_supervisor(tmp_path, supervisor, caplog):
    with small_disk(tmp_path / "disk") as disk:
        sup = supervisor({"chatty": CHATTY}, state_dir=disk / "state")
        cur = sup.connect().cursor()
        filler = fill(disk)
        for n in range(20):
            cur.execute("set chatty.say", {"text": f"lost {n} " + "-" * 200, "count": "5"})
        wait_for(lambda: sup.supervisor_status()["log_failures"] >= 20)
        assert "No space left on device" in sup.supervisor_status()["log_error"]
        complaints = [r for r in caplog.records if "its log" in r.getMessage()]
        assert len(complaints) == 1 and "module chatty" in complaints[0].getMessage()
        assert sup.status()["chatty"]["state"] == "READY"
        filler.unlink()
        cur.execute("set chatty.say", {"text": "room again"})
        logged(sup, "room again")


def test_log_rotation_keys_are_checked(supervisor):
    for options, message in (
        (
            {"log_max_bytes": 100},
            r"log_max_bytes: expected a size in bytes of at least 4096 \(or 0: never rotate\), got 100",
        ),
        ({"log_max_bytes": "10MiB"}, r"log_max_bytes: expected a whole number >= 0, got '10MiB'"),
        ({"log_backups": 1000}, r"log_backups: expected how many rotated files to keep, 0 to 100; got 1000"),
        ({"log_backups": -1}, r"log_backups: expected a whole number >= 0, got -1"),
    ):
        with pytest.raises(cmactor.ConfigError, match=message):
            supervisor({"echo": ECHO}, start=False, **options)


def test_rotating_file_without_backups_starts_over_and_with_no_bound_never_rotates(tmp_path):
    bounded = RotatingFile(str(tmp_path / "a.log"), 4096, 0)
    unbounded = RotatingFile(str(tmp_path / "b.log"), 0, 3)
    for _ in range(10):
        bounded.write(b"x" * 1000 + b"\n")
        unbounded.write(b"x" * 1000 + b"\n")
    bounded.close()
    unbounded.close()
    assert sorted(os.listdir(tmp_path)) == ["a.log", "b.log"]
    assert os.path.getsize(tmp_path / "a.log") == 2 * 1001  # 4 lines, then 4, then the last 2
    assert os.path.getsize(tmp_path / "b.log") == 10 * 1001


def test_last_lines_take_from_the_rotated_file_what_the_new_one_lacks(tmp_path):
    (tmp_path / "m.log.1").write_bytes(b"".join(b"old %d\n" % n for n in range(5)))
    (tmp_path / "m.log").write_bytes(b"new 0\nnew 1\n")
    lines, f = last_lines(str(tmp_path / "m.log"), 4)
    f.close()
    assert lines == [b"old 3\n", b"old 4\n", b"new 0\n", b"new 1\n"]
    lines, f = last_lines(str(tmp_path / "m.log"), 0)
    f.close()
    assert lines == []


def test_cmactor_logs_shows_the_last_lines_of_a_running_module(supervisor, capsys):
    sup = supervisor({"chatty": CHATTY, "echo": ECHO})
    sup.connect().cursor().execute("set chatty.say", {"text": "said {n}", "count": "30"})
    logged(sup, "said 29")
    assert cli.main(["--socket", sup.socket_path, "logs", "chatty", "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert [line.split("OUTPUT  ")[1] for line in out.splitlines()] == ["said 27", "said 28", "said 29"]
    assert cli.main(["--socket", sup.socket_path, "logs", "chatty"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 20
    assert cli.main(["--socket", sup.socket_path, "logs", "nope"]) == 1
    assert (
        capsys.readouterr().err
        == "cmactor: ProgrammingError: unknown module 'nope'; the supervisor runs: chatty, echo\n"
    )


def test_cmactor_logs_reads_a_stopped_supervisors_logs_through_its_config_file(tmp_path, capsys):
    config = tmp_path / "cmactor.toml"
    config.write_text(f'[supervisor]\nstate_dir = "state"\n[agents.chatty]\nentry = "{CHATTY}"\n')
    with cmactor.Supervisor.from_toml(config) as sup:
        sup.connect().cursor().execute("set chatty.say", {"text": "before the stop"})
        logged(sup, "before the stop")
    assert cli.main(["-c", str(config), "logs", "chatty", "-n", "3"]) == 0
    last = capsys.readouterr().out.splitlines()
    assert last[0].endswith("OUTPUT  before the stop")
    assert last[1].endswith("module chatty stopping") and "worker pid" in last[2] and "in the stop" in last[2]
    assert cli.main(["-c", str(config), "logs", "other"]) == 1
    assert (
        capsys.readouterr().err == f"cmactor: ProgrammingError: unknown module 'other'; {config} configures: chatty\n"
    )
    assert cli.main(["--socket", str(tmp_path / "none.sock"), "logs", "chatty"]) == 1
    assert "cannot reach a cmactor supervisor" in capsys.readouterr().err  # and says to give -c
    (tmp_path / "state" / "logs" / "chatty.log").unlink()
    assert cli.main(["-c", str(config), "logs", "chatty"]) == 1
    assert "module 'chatty' has no log at" in capsys.readouterr().err


def test_cmactor_logs_follow_goes_on_across_a_rotation(supervisor):
    sup = supervisor({"chatty": CHATTY}, log_max_bytes=4096, log_backups=1)
    cur = sup.connect().cursor()
    follower = subprocess.Popen(
        cmactor_cmd() + ["--socket", sup.socket_path, "logs", "chatty", "-n", "1", "-f"],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True).start()

    def next_said():
        while True:
            line = lines.get(timeout=10)
            if "OUTPUT  " in line:
                return line.split("OUTPUT  ")[1].strip()

    try:
        first = lines.get(timeout=10)  # the last line so far: it follows from here
        assert "module chatty READY" in first or "OUTPUT  chatty pid" in first
        cur.execute("set chatty.say", {"text": "said {n} " + "-" * 60})
        assert next_said() == "said 0 " + "-" * 60
        cur.execute("set chatty.say", {"text": "burst {n} " + "-" * 60, "count": "50"})  # one rotation
        assert [next_said().split()[1] for _ in range(50)] == [str(n) for n in range(50)]
        assert os.path.exists(log_path(sup) + ".1")
    finally:
        follower.terminate()
        follower.wait(10)


LINE = 64  # bytes a line of the follow tests takes
PER_FILE = 4096 // LINE  # lines a log of log_max_bytes 4096 holds


def numbered(n):
    return (b"line %08d " % n).ljust(LINE - 1, b"-") + b"\n"


@pytest.mark.parametrize(
    "backups, bursts",
    [
        (5, [3, 1, 5, 2, 6, 4]),  # 6: the file followed is rotated past the 5 kept, and read from its open fd
        (2, [3, 1, 3]),
        (0, [1, 1, 1]),  # each rotation removes the file and starts over: one file a burst, none lost
    ],
)
def test_cmactor_logs_follow_reads_every_file_rotated_between_two_looks(tmp_path, backups, bursts):
    config = tmp_path / "cmactor.toml"
    config.write_text(f'[supervisor]\nstate_dir = "state"\n[agents.chatty]\nentry = "{CHATTY}"\n')
    logs = tmp_path / "state" / "logs"
    logs.mkdir(parents=True)
    stale = logs / "chatty.log.9"  # left by a config that kept more: older than all, never shown
    stale.write_bytes(b"stale\n")
    os.utime(stale, (1, 1))
    # The supervisor's own writer, in this process: the lines go in as fast as it rotates.
    log = RotatingFile(str(logs / "chatty.log"), 4096, backups)
    log.write(b"start".ljust(LINE - 1, b"-") + b"\n")
    follower = subprocess.Popen(
        cmactor_cmd() + ["-c", str(config), "logs", "chatty", "-n", "1", "-f"], stdout=subprocess.PIPE
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True).start()
    try:
        assert lines.get(timeout=10).startswith(b"start-")  # it holds the log open: bursts can begin
        written, seen = 0, []
        for rotations in bursts:
            # One write of that many files' worth of lines (the log holds one line more: that
            # many rotations exactly): the renames come microseconds apart, well within one
            # of the follower's looks, 0.2 s apart.
            count = rotations * PER_FILE
            log.write(b"".join(numbered(n) for n in range(written, written + count)))
            written += count
            while not seen or seen[-1] < written - 1:  # its last line: the follower caught up
                seen.append(int(lines.get(timeout=10).split()[1]))
        assert seen == list(range(written))  # in order, none skipped, none twice
        assert len(os.listdir(logs)) == 2 + backups  # the log, the rotated ones kept, the stale one
    finally:
        follower.terminate()
        follower.wait(10)
        log.close()
