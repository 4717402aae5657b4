"""What an operator does must lose nothing acknowledged: a second `cmactor run` on a live
state_dir, a plain start after a crash, a state_dir another user could tamper with, a
start summary that must tell the truth. Real `cmactor` processes, real signals."""

import logging
import os
import pwd
import resource
import stat
import subprocess
import sys

import psutil
import pytest
from helpers import agent, kv_rows, wait_for
from processes import Run, cli

import cmactor
from cmactor.errors import StartupError
from cmsupervisor.persistence import state

ECHO = agent("echo.py:main")
NOBODY = pwd.getpwnam("nobody").pw_uid


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cmactor.toml"
    path.write_text(f'[supervisor]\nstate_dir = "state"\n[agents.echo]\nentry = "{ECHO}"\n')
    return path


def files_under(directory):
    """Every path under ``directory`` with its size: what a second run must not touch."""
    found = {}
    for root, dirs, names in os.walk(directory):
        for name in dirs + names:
            path = os.path.join(root, name)
            found[path] = os.lstat(path).st_size
    return found


def test_a_second_run_touches_nothing_and_a_plain_start_after_sigkill_has_every_acknowledged_set(config, tmp_path):
    state_dir = tmp_path / "state"
    first = Run(config)
    try:
        for key in ("a1", "a2"):
            assert cli("-c", config, "set", "echo.kv", f"key={key}", "value=acked").returncode == 0
        before = files_under(state_dir)
        second = cli("run", config)
        assert second.returncode == 1
        assert f"is in use: the supervisor pid {first.pid} holds its lock" in second.stderr
        assert "nothing was changed" in second.stderr
        assert files_under(state_dir) == before  # no journal renamed, no file made, no socket removed
        assert cli("-c", config, "set", "echo.kv", "key=a3", "value=acked").returncode == 0
    finally:
        first.kill()  # SIGKILL of its process group: no stop, no save
    again = Run(config)  # the same plain command, as systemd's Restart= would run it
    try:
        with cmactor.connect(socket=str(state_dir / "run" / "cm.sock")) as conn:
            rows = kv_rows(conn.cursor())
            assert {key: rows.get(key) for key in ("a1", "a2", "a3")} == dict.fromkeys(("a1", "a2", "a3"), "acked")
            assert conn.request({"op": "status"})["status"]["echo"]["unsaved"] is True
    finally:
        again.stop()
    assert again.proc.returncode == 0


LOCK_AND_SLEEP = """
import sys, time
from cmsupervisor.persistence import state
held = state.lock(sys.argv[1], 0o700)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_lock_held_by_a_process_that_died_never_blocks(tmp_path):
    state_dir = tmp_path / "state"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_AND_SLEEP, str(state_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(StartupError, match=f"is in use: the supervisor pid {holder.pid} holds its lock"):
            cmactor.Supervisor({"echo": ECHO}, state_dir=state_dir).start()
        assert sorted(os.listdir(state_dir)) == ["supervisor.lock"]  # refused before anything else
    finally:
        holder.kill()
        holder.wait()
    with cmactor.Supervisor({"echo": ECHO}, state_dir=state_dir) as sup:  # the kernel dropped the dead one's lock
        assert sup.status()["echo"]["state"] == "READY"
        assert (state_dir / "supervisor.lock").read_text() == f"{os.getpid()}\n"


# -- a state_dir nobody else may tamper with -------------------------------------------


def test_a_state_dir_others_can_write_is_refused_and_left_as_it_is(supervisor, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    sup = supervisor({"echo": ECHO}, state_dir=shared, start=False)
    with pytest.raises(StartupError, match=rf"state_dir {shared} can be written by others \(mode 0777\).*chmod go-w"):
        sup.start()
    assert os.listdir(shared) == [] and mode(shared) == 0o777


def test_a_state_dir_of_another_user_is_refused(supervisor, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    sup = supervisor({"echo": ECHO}, state_dir=theirs, start=False)
    with pytest.raises(StartupError, match=f"state_dir {theirs} belongs to uid {NOBODY}, not to uid {os.geteuid()}"):
        sup.start()
    assert os.listdir(theirs) == []


@pytest.mark.parametrize(
    "planted, refusal",
    [
        ("journal/echo.jsonl", r"journal \S+/journal/echo.jsonl cannot be read: it is a symbolic link"),
        ("logs/echo.log", r"log file \S+/logs/echo.log cannot be written: .*symbolic link"),
        ("audit.log", r"audit log \S+/audit.log cannot be written: it is a symbolic link"),
        ("config.jsonl", r"config file \S+/config.jsonl cannot be read: it is a symbolic link"),
    ],
)
def test_a_symbolic_link_planted_in_the_state_dir_is_never_followed(supervisor, tmp_path, planted, refusal):
    state_dir = tmp_path / "state"
    (state_dir / "journal").mkdir(parents=True)
    (state_dir / "logs").mkdir()
    target = tmp_path / "precious"
    target.write_text("not cmactor's\n")
    target.chmod(0o644)
    os.symlink(target, state_dir / planted)
    sup = supervisor({"echo": ECHO}, state_dir=state_dir, start=False)
    with pytest.raises(StartupError, match=refusal):
        sup.start()
    assert target.read_text() == "not cmactor's\n" and mode(target) == 0o644  # neither written nor chmodded


def test_every_file_cmactor_makes_is_owner_only_the_socket_and_its_pointer_too(supervisor, tmp_path):
    state_dir = tmp_path / "state"
    sup = supervisor({"echo": ECHO}, state_dir=state_dir)
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "secret", "value": "hunter2"})
    sup.save()
    cur.execute("set echo.kv", {"key": "unsaved", "value": "x"})
    wait_for(lambda: "unsaved" in (state_dir / "audit.log").read_text())
    modes = {os.path.relpath(path, state_dir): mode(path) for path in files_under(state_dir)}
    for path, bits in modes.items():
        assert bits & 0o077 == 0, f"{path} is mode {bits:04o}"
    assert {"run/socket.path", "run/cm.sock", "supervisor.lock", "config.jsonl", "journal/echo.jsonl"} <= set(modes)


# -- what a start says ---------------------------------------------------------------


def test_the_start_summary_counts_a_stopped_module_as_stopped(supervisor, tmp_path, caplog):
    done = tmp_path / "done.py"
    done.write_text("import sys\nsys.exit(0)\n")
    with caplog.at_level(logging.INFO, logger="cmactor.supervisor"):
        sup = supervisor(
            {"echo": ECHO, "done": {"entry": str(done), "restart": "on-failure"}}, state_dir=tmp_path / "s"
        )
    assert sup.status()["done"]["state"] == "STOPPED"
    messages = [r.getMessage() for r in caplog.records]
    assert not any("all 2 modules READY" in m for m in messages)
    summary = next(m for m in messages if "modules READY" in m)
    assert summary.startswith(
        "1 of 2 modules READY; done: STOPPED: its worker ended (exit code 0) and restart = 'on-failure' leaves it so"
    )


def test_journals_an_earlier_version_kept_as_old_are_named_with_the_command_that_replays_them(
    supervisor, tmp_path, caplog
):
    state_dir = tmp_path / "state"
    first = supervisor({"echo": ECHO}, state_dir=state_dir)
    first.connect().cursor().execute("set echo.kv", {"key": "kept", "value": "old"})
    first.stop()
    journal = state_dir / "journal" / "echo.jsonl"
    os.rename(journal, f"{journal}.old")  # what an earlier cmactor's fresh start did
    with caplog.at_level(logging.WARNING, logger="cmactor.supervisor"):
        again = supervisor({"echo": ECHO}, state_dir=state_dir)
    assert "kept" not in kv_rows(again.connect().cursor())
    warning = next(r.getMessage() for r in caplog.records if ".old" in r.getMessage())
    assert f"{journal}.old holds changes an earlier cmactor set aside" in warning
    assert f"cmactor journal {journal}.old | cmactor apply -" in warning
    printed = cli("journal", f"{journal}.old")  # the command it names, as an operator runs it
    assert printed.returncode == 0 and printed.stdout == "set echo.kv key=kept value=old\n"
    applied = cli("--socket", again.socket_path, "apply", "-", input=printed.stdout)
    assert applied.returncode == 0, applied.stderr
    assert kv_rows(again.connect().cursor())["kept"] == "old"


def test_state_lock_refuses_a_second_lock_in_the_same_process(tmp_path):
    held = state.lock(str(tmp_path / "s"), 0o700)
    try:
        with pytest.raises(StartupError, match=f"the supervisor pid {os.getpid()} holds its lock"):
            state.lock(str(tmp_path / "s"), 0o700)
    finally:
        held.release()
    state.lock(str(tmp_path / "s"), 0o700).release()


def test_cmactor_run_prints_why_a_start_failed_with_its_traceback(tmp_path):
    typo = tmp_path / "typo.py"
    typo.write_text(TYPO_AGENT)
    config = tmp_path / "cmactor.toml"
    config.write_text(
        f'[supervisor]\nstate_dir = "state"\n[agents.echo]\nentry = "{ECHO}"\n[agents.typo]\nentry = "{typo}:main"\n'
    )
    run = Run(config)
    try:
        text = run.text
        assert "1 of 2 modules READY" in text
        assert "NameError: name 'vlasn' is not defined" in text and "Traceback (most recent call last)" in text
        assert "returned" not in text
    finally:
        run.stop()
    log = (tmp_path / "state" / "logs" / "typo.log").read_text()
    assert "Traceback (most recent call last)" in log and "module typo FAILED: start failed" in log


TYPO_AGENT = """
import os
from cmactor import ready
from cmactor.cmbackend import CmAgent, cmbackend_init


class Typo(CmAgent):
    def event_generate_default(self):
        if os.environ.get("TYPO_ONLY_WHEN") and not os.path.exists(os.environ["TYPO_ONLY_WHEN"]):
            self.kv = {}
            ready()
            return
        self.kv = {"default": vlasn}
        ready()

    def kv_get(self, ctx):
        ctx.fields = {"key": "default"}


def main():
    cmbackend_init(Typo())
"""


def test_an_event_that_raises_before_ready_fails_the_start_at_once_naming_the_exception(supervisor, tmp_path):
    typo = tmp_path / "typo.py"
    typo.write_text(TYPO_AGENT)
    sup = supervisor({"echo": ECHO, "typo": f"{typo}:main"}, state_dir=tmp_path / "s", start=False, start_timeout=30)
    sup.start(strict=False)  # within a few seconds: not after start_timeout
    status = sup.status()["typo"]
    assert status["state"] == "FAILED"
    assert status["error"] == (
        "start failed: event_generate_default raised NameError: name 'vlasn' is not defined, before ready() was called"
    )
    assert status["traceback"].startswith("Traceback (most recent call last)")
    assert status["traceback"].endswith("NameError: name 'vlasn' is not defined")
    log = (tmp_path / "s" / "logs" / "typo.log").read_text()
    assert "Traceback (most recent call last)" in log and "module typo FAILED: start failed" in log


def test_a_restart_whose_start_fails_follows_the_restart_policy_then_fails(supervisor, tmp_path):
    typo = tmp_path / "typo.py"
    typo.write_text(TYPO_AGENT)
    flag = tmp_path / "broken-now"
    options = {"entry": f"{typo}:main", "env": {"TYPO_ONLY_WHEN": str(flag)}, "max_restarts": 2, "restart_delay": 0.01}
    sup = supervisor({"typo": options}, state_dir=tmp_path / "s")
    flag.write_text("")
    os.kill(sup.status()["typo"]["pid"], 9)
    status = wait_for(lambda: (s := sup.status()["typo"])["state"] == "FAILED" and s, timeout=15)
    assert status["restarts"] == 2
    assert (
        "crashed more than 2 times" in status["error"]
        and "start failed: event_generate_default raised NameError" in status["error"]
    )
    log = (tmp_path / "s" / "logs" / "typo.log").read_text()
    assert log.count("killed by SIGKILL; restarting in") >= 1  # crash reports are in the module's own log
    assert log.count("NameError: name 'vlasn' is not defined") >= 2


# -- file descriptors ------------------------------------------------------------------


def many_modules(tmp_path, count):
    config = tmp_path / "cmactor.toml"
    agents = "".join(f'[agents.m{n}]\nentry = "{ECHO}"\n' for n in range(count))
    config.write_text(f'[supervisor]\nstate_dir = "state"\nstart_timeout = 120\n{agents}')
    return config


def limited(soft, hard):
    """preexec_fn: the descriptor limits a shell's `ulimit -Sn SOFT -Hn HARD` would set."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_200_modules_start_under_the_common_soft_limit_of_1024(tmp_path):
    run = Run(many_modules(tmp_path, 200), preexec_fn=limited(1024, 8192), timeout=180)
    try:
        assert "200 of 200 modules READY" in run.text
        assert psutil.Process(run.pid).rlimit(psutil.RLIMIT_NOFILE) == (8192, 8192)  # raised to the hard limit
    finally:
        run.stop()


def test_a_start_that_cannot_fit_its_modules_in_the_descriptors_says_so_with_the_numbers(tmp_path):
    refused = cli("run", many_modules(tmp_path, 200), preexec_fn=limited(1024, 1024))
    assert refused.returncode == 1
    assert (
        "StartupError: 200 modules need about 1,632 file descriptors in the supervisor (32 + 8 a module), "
        "and it may open 1,024 (hard limit 1,024): raise the hard limit"
    ) in refused.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was made


def test_a_set_acknowledged_after_a_start_on_a_torn_journal_survives_the_next_start(supervisor, tmp_path):
    state_dir = tmp_path / "state"
    first = supervisor({"echo": ECHO}, state_dir=state_dir)
    first.connect().cursor().execute("set echo.kv", {"key": "a", "value": "1"})
    first.stop()
    with open(state_dir / "journal" / "echo.jsonl", "ab") as f:
        f.write(b'0badc0de ["set","kv",{"key":"to')  # the supervisor was killed in the middle of a write
    second = supervisor({"echo": ECHO}, state_dir=state_dir)
    second.connect().cursor().execute("set echo.kv", {"key": "b", "value": "2"})
    second.stop()
    third = supervisor({"echo": ECHO}, state_dir=state_dir)
    rows = kv_rows(third.connect().cursor())
    assert (rows.get("a"), rows.get("b")) == ("1", "2")
    assert len(list((state_dir / "journal").glob("echo.jsonl.damaged-*"))) == 1


def test_an_event_that_raises_after_ready_leaves_the_module_ready_and_says_so(supervisor, tmp_path):
    late = tmp_path / "late.py"
    late.write_text(
        "from cmactor import ready\nfrom cmactor.cmbackend import CmAgent, cmbackend_init\n\n\n"
        "class Late(CmAgent):\n    def event_generate_default(self):\n        ready()\n"
        "        raise KeyError('after ready')\n\n\ndef main():\n    cmbackend_init(Late())\n"
    )
    sup = supervisor({"late": f"{late}:main"}, state_dir=tmp_path / "s")
    status = sup.status()["late"]
    assert status["state"] == "READY"
    assert status["error"] == "event_generate_default raised KeyError: 'after ready'"


def test_a_start_that_fails_after_taking_the_lock_lets_go_of_everything(tmp_path, monkeypatch):
    import cmsupervisor.supervisor as facade

    class NoDescriptors(facade.Workers):  # the class stays (its kill is handed out first), its making fails
        def __init__(self, *args, **kwargs):
            raise OSError(24, "Too many open files")

    state_dir = tmp_path / "state"
    fds = len(os.listdir("/proc/self/fd"))
    with monkeypatch.context() as patched:
        patched.setattr(facade, "Workers", NoDescriptors)
        with pytest.raises(OSError, match="Too many open files"):
            cmactor.Supervisor({"echo": ECHO}, state_dir=state_dir).start()
    assert len(os.listdir("/proc/self/fd")) == fds  # socket, journal, audit log, loop: all closed
    assert not (state_dir / "run" / "cm.sock").exists()
    with cmactor.Supervisor({"echo": ECHO}, state_dir=state_dir) as sup:  # the lock was let go
        assert sup.status()["echo"]["state"] == "READY"


def test_cmactor_journal_refuses_what_is_not_a_journal_in_one_line(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("not a journal\n")
    lying = tmp_path / "kv.jsonl.old"
    lying.write_text("not a record\n")
    for path, problem in (
        (other, "is neither a journal (MODULE.jsonl...) nor a snapshot (MODULE.snapshot...)"),
        (lying, "is not a cmactor journal: its first line is not a record"),
        (tmp_path / "gone.jsonl", "gone.jsonl: no such file"),
    ):
        refused = cli("journal", path)
        assert refused.returncode == 1 and refused.stdout == ""
        assert refused.stderr.count("\n") == 1 and problem in refused.stderr, refused.stderr
