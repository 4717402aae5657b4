"""cmactor.testing, the pytest plugin for agent authors: its fixture, its helpers, its errors.

The fixture's own behaviour (teardown after a failure or a timeout, the errors a test
author sees) is checked in inner pytest runs (pytester, in a subprocess: the plugin is
then loaded from its entry point alone); the helpers are checked here directly, through
the same fixture, which the installed plugin provides to this suite too.
"""

import importlib.metadata
import os
import subprocess
import sys
import time

import psutil
import pytest

import cmactor
from cmactor.testing import get_row, get_rows, kill_worker, set_row, setop

pytest_plugins = ["pytester"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ECHO = {"echo": "agents/echo.py:main"}  # relative to this file's directory, as the fixture takes it
BROKEN = os.path.join(ROOT, "tests", "agents", "broken.py")


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_registered_as_a_pytest11_entry_point():
    (entry,) = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "cmactor"]
    assert entry.value == "cmactor.testing"


def test_import_cmactor_does_not_import_pytest():
    code = (
        "import sys, cmactor, cmactor.cmfrontend; cmactor.Supervisor; "
        "print(sorted(m for m in sys.modules if m.startswith(('pytest', '_pytest'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.timeout(120)
def test_the_switch_example_passes():
    command = [sys.executable, "-m", "pytest", "examples/switch/test_switch_agents.py", "-p", "no:cacheprovider", "-q"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "failed" not in result.stdout and "error" not in result.stdout


# -- the fixture, seen from a test author's run --------------------------------


@pytest.mark.timeout(90)
def test_a_failed_or_timed_out_test_still_stops_its_supervisors(pytester):
    pytester.makepyfile(
        f"""
        import time, psutil, pytest

        PIDS = []

        def _record(sup):
            PIDS.extend(status["pid"] for status in sup.status().values())

        def test_fails(cmactor_supervisor):
            _record(cmactor_supervisor({{"one": {BROKEN!r} + ":own_loop"}}))
            _record(cmactor_supervisor({{"two": {BROKEN!r} + ":own_loop"}}))
            assert False, "failing on purpose"

        @pytest.mark.timeout(3)
        def test_times_out(cmactor_supervisor):
            _record(cmactor_supervisor({{"three": {BROKEN!r} + ":own_loop"}}))
            time.sleep(60)

        def test_then_no_worker_is_left():
            # Runs after the teardown of both: every worker they started is gone.
            assert len(PIDS) == 3
            for pid in PIDS:
                try:
                    assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
                except psutil.NoSuchProcess:
                    pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--timeout=60", timeout=80)
    result.stdout.fnmatch_lines(["*failing on purpose*", "*Timeout*"])
    result.assert_outcomes(passed=1, failed=2)


@pytest.mark.timeout(90)
def test_what_a_test_author_sees_when_an_agent_does_not_start(pytester):
    pytester.makepyfile(
        f"""
        def test_entry_raises(cmactor_supervisor):
            cmactor_supervisor({{"bad": {BROKEN!r} + ":raises"}})

        def test_never_ready(cmactor_supervisor):
            cmactor_supervisor({{"quiet": {BROKEN!r} + ":never_ready"}}, start_timeout=1)

        def test_no_such_toml(cmactor_supervisor):
            cmactor_supervisor("missing/cmactor.toml")

        def test_no_such_entry_file(cmactor_supervisor):
            cmactor_supervisor({{"x": "nowhere.py:main"}})
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--timeout=60", timeout=80)
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(
        [
            "E *StartupError: modules not READY after start (timeout 30s): "
            "bad: FAILED: entry '*broken.py:raises' raised ValueError: entry exploded",
            "E * cmactor_supervisor: the agents' tracebacks and log records are in the captured log",
            "*Captured log*",
            "*ValueError: entry exploded",
            "E *StartupError: modules not READY after start (timeout 1s): "
            "quiet: LOADING: event_generate_default returned but ready() was never called",
            f"E *FileNotFoundError: cmactor_supervisor: no config file {pytester.path}/missing/cmactor.toml "
            "(a relative path is taken from the test file's directory); pass the path of a cmactor.toml, "
            "or a dict of agents",
            f"E *ConfigError: agents.x.entry: entry file {pytester.path}/nowhere.py does not exist",
        ]
    )


# -- the fixture and the helpers, used directly ---------------------------------


def test_each_supervisor_has_its_own_state_dir_and_socket(cmactor_supervisor, tmp_path):
    first, second = cmactor_supervisor(ECHO), cmactor_supervisor(ECHO)
    assert {first.state_dir, second.state_dir} == {str(tmp_path / "cmactor-0"), str(tmp_path / "cmactor-1")}
    assert first.socket_path != second.socket_path
    set_row(first, "echo.kv", key="a", value="1")
    assert get_rows(second, "echo.kv") == [{"key": "default", "value": "yes"}]  # echo's defaults only


def test_a_toml_socket_is_replaced_by_the_tests_own(cmactor_supervisor, tmp_path):
    config = tmp_path / "cmactor.toml"
    config.write_text(
        f'[supervisor]\nsocket = "/nonexistent/dir/cm.sock"\n\n[agents.echo]\nentry = "{ROOT}/tests/agents/echo.py:main"\n'
    )
    sup = cmactor_supervisor(config)
    assert sup.socket_path.startswith(str(tmp_path))
    with pytest.raises(TypeError, match="base_dir is for a dict of agents"):
        cmactor_supervisor(config, base_dir=ROOT)


def test_helpers_return_rows_as_dicts(cmactor_supervisor):
    sup = cmactor_supervisor(ECHO)
    assert set_row(sup, "echo.kv", key="b", value=2) == {"key": "b", "value": "2"}  # values go as str(value)
    set_row(sup, "echo.kv", key="a", value="x y")
    assert get_row(sup, "echo.kv", key="b") == {"key": "b", "value": "2"}
    assert get_rows(sup, "echo.kv", key="a") == [{"key": "b", "value": "2"}, {"key": "default", "value": "yes"}]
    assert get_rows(sup, "echo.gen", count=2) == [{"index": "0", "square": "0"}, {"index": "1", "square": "1"}]
    assert set_row(sup, "echo.order", n=1) == {}  # an action that replies with no fields
    with pytest.raises(cmactor.DatabaseError, match="stopped despite except Exception"):
        setop(sup, "echo.boom")  # sent as a setop: boom_setop ran
    with sup.connect("alice") as conn:  # a connection of the test's own is used as it is, and left open
        assert get_row(conn, "echo.kv", key="a") == {"key": "a", "value": "x y"}
        assert not conn.closed


def test_helpers_say_what_is_wrong(cmactor_supervisor):
    sup = cmactor_supervisor(ECHO)
    with pytest.raises(cmactor.DatabaseError, match="no key 'zz'"):
        get_row(sup, "echo.kv", key="zz")
    with pytest.raises(LookupError, match=r"get echo.gen count=1 index=5: the agent replied with no row"):
        get_row(sup, "echo.gen", count=1, index=5)
    with pytest.raises(ValueError, match="expected a table as 'MODULE.TABLE'.*got 'get echo.kv'"):
        get_row(sup, "get echo.kv")


def test_kill_worker_really_restarts_it(cmactor_supervisor):
    sup = cmactor_supervisor(ECHO)
    set_row(sup, "echo.kv", key="a", value="1")
    old = sup.status()["echo"]["pid"]
    new = kill_worker(sup, "echo")
    assert new != old and _gone(old)
    status = sup.status()["echo"]
    assert (status["state"], status["pid"], status["restarts"]) == ("READY", new, 1)
    assert status["last_exit"] == "killed by SIGKILL"
    assert get_row(sup, "echo.kv", key="a") == {"key": "a", "value": "1"}  # the journal brought it back
    assert kill_worker(sup, "echo") not in (old, new)


def test_kill_worker_fails_at_once_when_the_module_stays_down(cmactor_supervisor):
    sup = cmactor_supervisor({"once": {"entry": f"{BROKEN}:own_loop", "restart": "never"}})
    started = time.monotonic()
    refused = "module 'once' will not come back after SIGKILL.*state FAILED"
    with pytest.raises(cmactor.ModuleUnavailable, match=refused) as caught:
        kill_worker(sup, "once", timeout=30)
    assert time.monotonic() - started < 10
    assert caught.value.module_name == "once"
    with pytest.raises(cmactor.ModuleUnavailable, match="module 'once' has no worker to kill .*state FAILED"):
        kill_worker(sup, "once")


def test_kill_worker_times_out_naming_the_state(cmactor_supervisor):
    sup = cmactor_supervisor({"slow": {"entry": f"{BROKEN}:own_loop", "restart_delay": 30}})
    with pytest.raises(
        cmactor.ModuleUnavailable,
        match=r"module 'slow' is not READY within 0.5s after SIGKILL .*state RESTARTING.*pass a longer timeout=",
    ):
        kill_worker(sup, "slow", timeout=0.5)
    with pytest.raises(cmactor.ProgrammingError, match="unknown module 'nope'; this supervisor runs: slow"):
        kill_worker(sup, "nope")
