"""Starting, dependencies, crashes and stopping, with real worker processes."""

import os
import signal
import time

import psutil
import pytest
from helpers import agent, wait_for

import cmactor

ECHO = agent("echo.py:main")


def echo_with_deps(*deps):
    return {"entry": ECHO, "env": {"ECHO_DEPS": ",".join(deps)}}


def test_context_manager_starts_all_ready_and_stops_every_process(tmp_path):
    with cmactor.Supervisor({"a": ECHO, "b": ECHO}, state_dir=tmp_path) as sup:
        status = sup.status()
        assert {s["state"] for s in status.values()} == {"READY"}
        pids = [s["pid"] for s in status.values()]
        assert os.path.exists(sup.socket_path)
        assert oct(os.stat(os.path.dirname(sup.socket_path)).st_mode & 0o777) == "0o700"
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not os.path.exists(sup.socket_path)


def test_module_entry_as_package_path(supervisor, tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "agent.py").write_text(
        (os.path.dirname(ECHO.split(":")[0]) + "/echo.py") and open(ECHO.split(":")[0]).read()
    )
    sup = supervisor({"m": "mypkg.agent:main"}, base_dir=tmp_path)
    cur = sup.connect().cursor()
    cur.execute("get m.kv", {"key": "default"})
    assert cur.fetchone() == ("default", "yes")


def test_entry_may_run_its_own_loop(supervisor):
    sup = supervisor({"loop": agent("broken.py:own_loop")})
    assert sup.status()["loop"]["state"] == "READY"


def test_dependencies_load_in_dependency_order_whatever_the_declaration_order(supervisor):
    # declared c, b, a; c needs b, b needs a
    sup = supervisor({"c": echo_with_deps("b"), "b": echo_with_deps("a"), "a": echo_with_deps()})
    status = sup.status()
    assert status["c"]["config_deps"] == ["b"] and status["b"]["config_deps"] == ["a"]
    assert {s["state"] for s in status.values()} == {"READY"}


def test_unknown_dependency_is_a_startup_error_naming_it(supervisor):
    with pytest.raises(
        cmactor.StartupError, match="config_deps names 'ghost', which this supervisor does not run"
    ) as info:
        supervisor({"a": echo_with_deps("ghost"), "b": ECHO})
    assert set(info.value.reasons) == {"a"}


def test_dependency_cycle_is_a_startup_error_written_out(supervisor):
    with pytest.raises(cmactor.StartupError) as info:
        supervisor({"a": echo_with_deps("b"), "b": echo_with_deps("a"), "c": ECHO})
    assert set(info.value.reasons) == {"a", "b"}
    assert "config_deps cycle: a → b → a" in info.value.reasons["a"] or "b → a → b" in info.value.reasons["a"]


@pytest.mark.parametrize(
    "entry, message",
    [
        ("broken.py:raises", "entry '.*broken.py:raises' raised ValueError: entry exploded"),
        ("broken.py:no_init", "returned without calling cmbackend_init"),
        ("broken.py:bad_list", "persistent_list must be a list of str, got str"),
        ("broken.py:not_an_agent", "agent must be a CmAgent instance, got object"),
        ("broken.py:missing_function", "has no function 'missing_function'"),
        ("broken.py:NOT_CALLABLE", "has no function 'NOT_CALLABLE'"),
    ],
)
def test_broken_entry_fails_start_naming_module_and_exception(supervisor, entry, message):
    with pytest.raises(cmactor.StartupError, match=f"x: FAILED: .*{message}") as info:
        supervisor({"ok": ECHO, "x": agent(entry)})
    assert list(info.value.reasons) == ["x"]


def test_entry_failing_after_registering_is_a_crash(supervisor):
    # The first cmbackend_init() registers (the module may even reach READY) before
    # the second one raises, so the failure shows as a crash of the module.
    sup = supervisor({"ok": ECHO, "x": {"entry": agent("broken.py:init_twice"), "max_restarts": 0}}, start=False)
    try:
        sup.start()
    except cmactor.StartupError as exc:
        assert "cmbackend_init() called twice in module 'x'" in exc.reasons["x"]
    else:
        status = wait_for(lambda: (s := sup.status()["x"])["state"] == "FAILED" and s)
        assert "cmbackend_init() called twice in module 'x'" in status["error"]


def test_unimportable_module_entry_fails_start(supervisor):
    with pytest.raises(
        cmactor.StartupError, match="x: FAILED: entry 'no_such_pkg.agent:main' raised ModuleNotFoundError"
    ):
        supervisor({"x": "no_such_pkg.agent:main"})


def test_agent_that_never_calls_ready_times_out_naming_it(supervisor):
    start = time.monotonic()
    with pytest.raises(
        cmactor.StartupError, match="quiet: LOADING: event_generate_default returned but ready\\(\\) was never called"
    ):
        supervisor({"quiet": agent("broken.py:never_ready"), "ok": ECHO}, start_timeout=1.5)
    assert time.monotonic() - start < 10


def test_dependents_of_a_never_ready_module_report_what_they_wait_on(supervisor):
    with pytest.raises(cmactor.StartupError) as info:
        supervisor({"quiet": agent("broken.py:never_ready"), "d": echo_with_deps("quiet")}, start_timeout=1.5)
    assert info.value.reasons["d"] == "WAITING_DEPS on 'quiet' (LOADING)"


def test_cmbackend_init_and_ready_outside_a_worker_are_clear_errors():
    with pytest.raises(RuntimeError, match="must run inside a cmactor worker process"):
        cmactor.cmbackend_init(cmactor.CmAgent())
    with pytest.raises(RuntimeError, match="inside a cmactor worker process"):
        cmactor.ready()
    with pytest.raises(TypeError, match="config_deps must be a list of str"):
        cmactor.cmbackend_init(cmactor.CmAgent(), config_deps="ports")


def test_sigkill_restarts_the_module(supervisor):
    sup = supervisor({"echo": ECHO, "other": ECHO})
    before = sup.status()
    os.kill(before["echo"]["pid"], signal.SIGKILL)
    status = wait_for(lambda: (s := sup.status())["echo"]["state"] == "READY" and s["echo"]["restarts"] == 1 and s)
    assert status["echo"]["pid"] != before["echo"]["pid"]
    assert status["echo"]["last_exit"] == "killed by SIGKILL"
    assert status["other"]["pid"] == before["other"]["pid"]
    cur = sup.connect().cursor()
    cur.execute("get echo.kv", {"key": "default"})
    assert cur.fetchone() == ("default", "yes")


def test_crash_during_a_request_fails_that_request_and_others_go_on(supervisor):
    sup = supervisor({"echo": ECHO, "other": ECHO})
    cur = sup.connect().cursor()
    with pytest.raises(
        cmactor.OperationalError, match="module 'echo' crashed \\(exit code 3\\) while handling set echo.exit"
    ):
        cur.execute("set echo.exit", {"code": 3})
    cur.execute("get other.kv", {"key": "default"})
    cur.retries = 1  # the cursor waits for READY again
    cur.execute("get echo.kv", {"key": "default"})
    assert cur.fetchone() == ("default", "yes")


def test_requests_are_held_while_restarting(supervisor):
    sup = supervisor({"echo": {"entry": ECHO, "restart_delay": 0.5}})
    os.kill(sup.status()["echo"]["pid"], signal.SIGKILL)
    wait_for(lambda: sup.status()["echo"]["state"] != "READY")
    cur = sup.connect().cursor()
    start = time.monotonic()
    cur.execute("get echo.kv", {"key": "default"})  # held, then served
    assert cur.fetchone() == ("default", "yes")
    assert time.monotonic() - start > 0.2


def test_hold_timeout_zero_fails_at_once(supervisor):
    sup = supervisor({"echo": {"entry": ECHO, "restart_delay": 2}}, hold_timeout=0)
    os.kill(sup.status()["echo"]["pid"], signal.SIGKILL)
    wait_for(lambda: sup.status()["echo"]["state"] == "RESTARTING")
    with pytest.raises(cmactor.ModuleUnavailable, match="module 'echo' is not READY \\(state RESTARTING\\)"):
        sup.connect().cursor().execute("get echo.kv", {"key": "default"})


def test_held_request_fails_after_hold_timeout(supervisor):
    sup = supervisor({"echo": {"entry": ECHO, "restart_delay": 3}}, hold_timeout=0.3)
    os.kill(sup.status()["echo"]["pid"], signal.SIGKILL)
    wait_for(lambda: sup.status()["echo"]["state"] == "RESTARTING")
    with pytest.raises(cmactor.ModuleUnavailable, match="held 0.3s, the hold_timeout"):
        sup.connect().cursor().execute("get echo.kv", {"key": "default"})


def test_a_request_with_a_nil_hold_is_held_for_the_hold_timeout(supervisor):
    # "hold": nil on the wire means "the supervisor's hold_timeout", as a missing key does.
    sup = supervisor({"echo": {"entry": ECHO, "restart_delay": 3}}, hold_timeout=0.3)
    os.kill(sup.status()["echo"]["pid"], signal.SIGKILL)
    wait_for(lambda: sup.status()["echo"]["state"] == "RESTARTING")
    with sup.connect() as conn, pytest.raises(cmactor.ModuleUnavailable, match="held 0.3s, the hold_timeout"):
        conn.request({"op": "get", "module": "echo", "table": "kv", "params": {"key": "default"}, "hold": None})


def test_crash_loop_quarantines_and_restart_revives(supervisor):
    sup = supervisor(
        {
            "echo": {"entry": ECHO, "max_restarts": 2, "restart_delay": 0.01},
            "other": ECHO,
            "dependent": echo_with_deps("echo"),
        }
    )
    killed = set()
    for _ in range(3):
        pid = wait_for(lambda: (s := sup.status()["echo"])["state"] == "READY" and s["pid"] not in killed and s["pid"])
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    status = wait_for(lambda: (s := sup.status())["echo"]["state"] == "FAILED" and s)
    assert "crashed more than 2 times" in status["echo"]["error"] and "SIGKILL" in status["echo"]["error"]
    cur = sup.connect().cursor()
    with pytest.raises(cmactor.ModuleUnavailable, match="quarantined \\(FAILED\\).*cmactor restart echo"):
        cur.execute("get echo.kv", {"key": "default"})
    cur.execute("get other.kv", {"key": "default"})  # everyone else keeps serving
    cur.execute("get dependent.kv", {"key": "default"})  # modules that depend on it too
    assert sup.status()["dependent"]["state"] == "READY"
    sup.restart("echo")
    wait_for(lambda: sup.status()["echo"]["state"] == "READY")
    cur.execute("get echo.kv", {"key": "default"})
    assert cur.fetchone() == ("default", "yes")


def test_stop_stops_dependents_first_and_leaves_nothing(supervisor, caplog):
    sup = supervisor({"base": ECHO, "top": echo_with_deps("mid"), "mid": echo_with_deps("base")})
    pids = [s["pid"] for s in sup.status().values()]
    with caplog.at_level("INFO", logger="cmactor.supervisor"):
        sup.stop()
    stopping = [r.getMessage().split()[1] for r in caplog.records if r.getMessage().endswith(" stopping")]
    assert stopping == ["top", "mid", "base"]
    assert sup.wait(0)
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(RuntimeError, match="stopped"):
        sup.status()


def test_stop_request_over_the_socket(supervisor):
    sup = supervisor({"echo": ECHO})
    with sup.connect() as conn:
        conn.request({"op": "stop"})
    assert sup.wait(10)


def test_long_state_dir_moves_the_socket_to_a_short_private_dir(supervisor, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    sup = supervisor({"echo": ECHO}, state_dir=deep)
    assert not sup.socket_path.startswith(str(deep))
    assert len(sup.socket_path) < 108
    cur = sup.connect().cursor()
    cur.execute("get echo.kv", {"key": "default"})
    assert cur.fetchone() == ("default", "yes")
    with open(deep / "run" / "socket.path") as f:
        assert f.read() == sup.socket_path


def test_a_second_supervisor_on_the_same_state_dir_is_refused(supervisor, tmp_path):
    supervisor({"echo": ECHO}, state_dir=tmp_path / "shared")
    with pytest.raises(cmactor.StartupError, match=f"is in use: the supervisor pid {os.getpid()} holds its lock"):
        supervisor({"echo": ECHO}, state_dir=tmp_path / "shared")
