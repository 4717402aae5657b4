"""EXOS apps as the platform starts them: python-module entries, argv, plain processes,
restart policies, `exos.api` inside workers, and what the real apps get wrong."""

import json
import logging
import os
import signal
import sys

import pytest
from helpers import AGENTS, agent, wait_for

import cmactor
from cmactor import exos
from cmactor.errors import ConfigError, ModuleUnavailable, ProgrammingError, StartupError
from cmsupervisor.persistence import store

APP = agent("exos_app.py")


def info(sup, module="app"):
    cur = sup.connect().cursor()
    cur.execute(f"get {module}.info")
    return dict(zip([d[0] for d in cur.description], cur.fetchone()))


def state(sup, module):
    return sup.status()[module]


# -- python-module launch ------------------------------------------------------------


def test_a_file_entry_without_a_function_runs_as_main_with_args_as_argv(supervisor):
    sup = supervisor({"app": {"entry": APP, "args": ["--trace", "a b"]}})
    row = info(sup)
    assert row["argv"] == "app --trace a b"  # [<module name>, *args]: not the supervisor's argv
    assert row["name"] == "__main__"
    # Its main thread blocks forever after cmbackend_init; the worker keeps serving.
    assert state(sup, "app")["state"] == "READY"


def test_a_dotted_module_entry_runs_as_main_inside_its_package(supervisor):
    sup = supervisor({"pkg": {"entry": "pmpkg.app", "args": ["-v"]}}, base_dir=AGENTS)
    assert info(sup, "pkg") == {"argv": "pkg -v", "name": "__main__", "package": "pmpkg", "helper": "from the package"}


def test_args_set_argv_for_a_function_entry_too(supervisor, tmp_path):
    entry = tmp_path / "argv_agent.py"
    entry.write_text(
        "import sys\n"
        "from cmactor.cmbackend import CmAgent, cmbackend_init, ready\n"
        "class A(CmAgent):\n"
        "    def event_generate_default(self):\n"
        "        ready()\n"
        "    def info_get(self, ctx):\n"
        "        ctx.fields = {'argv': repr(sys.argv)}\n"
        "def main():\n"
        "    cmbackend_init(A())\n"
    )
    sup = supervisor({"fn": {"entry": f"{entry}:main", "args": ["--port", "1:1"]}, "bare": f"{entry}:main"})
    assert info(sup, "fn")["argv"] == repr(["fn", "--port", "1:1"])
    assert info(sup, "bare")["argv"] == repr(["bare"])


def test_a_python_module_that_does_not_exist_is_a_startup_error_naming_it(supervisor):
    with pytest.raises(StartupError) as caught:
        supervisor({"ghost": "no_such_app_module"})
    assert "ghost" in str(caught.value)
    assert "ModuleNotFoundError" in str(caught.value) and "no_such_app_module" in str(caught.value)
    with pytest.raises(ConfigError, match=r"agents.ghost.entry: entry file .*missing_app.py does not exist"):
        supervisor({"ghost": "missing_app.py"}, start=False)


def test_a_python_module_that_raises_at_import_is_a_startup_error_naming_the_exception(supervisor):
    with pytest.raises(StartupError) as caught:
        supervisor({"bad": "pmpkg.broken"}, base_dir=AGENTS)
    assert "bad: FAILED" in str(caught.value)
    assert "ValueError: no config for this box" in str(caught.value)


def test_a_package_without_main_is_a_startup_error_saying_what_to_add(supervisor):
    with pytest.raises(
        StartupError, match=r"'nomain' is a package with no __main__ module to run: add nomain/__main__.py"
    ):
        supervisor({"pkg": "nomain"}, base_dir=AGENTS)


def test_sys_exit_with_a_message_puts_it_in_the_startup_error(supervisor, tmp_path):
    entry = tmp_path / "licensed.py"
    entry.write_text("import sys\nsys.exit('fatal: no license for this box')\n")
    with pytest.raises(StartupError, match=r"exited with status 1: fatal: no license for this box"):
        supervisor({"lic": str(entry)})


def test_a_bad_argv_makes_argparse_exit_2_which_is_a_startup_error_not_a_crash_loop(supervisor):
    with pytest.raises(StartupError) as caught:
        supervisor({"app": {"entry": APP, "args": ["--exit", "not-a-number"]}})
    assert "exited with status 2" in str(caught.value)


@pytest.mark.parametrize(
    ("args", "problem"),
    [("--plain", "'--plain'"), (["--plain", 3], "[" + "'--plain', 3]"), ({"a": "b"}, "{'a': 'b'}")],
)
def test_args_that_are_not_a_list_of_strings_are_a_config_error_naming_the_key(supervisor, args, problem):
    with pytest.raises(ConfigError) as caught:
        supervisor({"app": {"entry": APP, "args": args}}, start=False)
    assert "agents.app.args: expected a list of strings" in str(caught.value)
    assert problem in str(caught.value)


@pytest.mark.parametrize(("key", "value"), [("restart", "sometimes"), ("exos_compat", "yes")])
def test_bad_restart_and_exos_compat_values_are_config_errors_naming_the_key(supervisor, key, value):
    with pytest.raises(ConfigError, match=rf"agents.app.{key}: expected .*got '{value}'"):
        supervisor({"app": {"entry": APP, key: value}}, start=False)


# -- plain processes and the restart policy ---------------------------------------------


def test_ready_without_cmbackend_init_is_a_ready_module_with_no_tables(supervisor):
    sup = supervisor({"plain": {"entry": APP, "args": ["--plain"]}})
    status = state(sup, "plain")
    assert status["state"] == "READY" and status["persistent_list"] == []
    with pytest.raises(ProgrammingError, match="module 'plain' serves no tables: it is a plain process"):
        sup.connect().cursor().execute("get plain.anything")
    sup.save()  # nothing to save, nothing fails


def test_cmbackend_init_after_ready_ends_the_worker_saying_so(supervisor):
    sup = supervisor({"app": {"entry": APP, "args": ["--init-after-ready"], "restart": "never"}}, start=False)
    try:  # the worker may end before or after the supervisor has seen it READY
        sup.start()
    except cmactor.StartupError as exc:
        assert "cmbackend_init() called after ready() in module 'app'" in str(exc)
    wait_for(lambda: state(sup, "app")["state"] == "FAILED")
    assert "RuntimeError: cmbackend_init() called after ready() in module 'app'" in state(sup, "app")["error"]


def plain(status, after=0.3, **options):
    return {"entry": APP, "args": ["--plain", "--exit", str(status), "--after", str(after)], **options}


def test_on_failure_leaves_a_clean_exit_stopped_and_says_why_requests_fail(supervisor):
    sup = supervisor({"once": plain(0, restart="on-failure")})
    wait_for(lambda: state(sup, "once")["state"] == "STOPPED")
    status = state(sup, "once")
    assert status["last_exit"] == "exit code 0" and status["restarts"] == 0 and status["pid"] is None
    with pytest.raises(ModuleUnavailable, match=r"module 'once' is STOPPED: its worker ended \(exit code 0\)"):
        sup.connect().cursor().execute("get once.t")
    sup.restart("once")  # an operator can start it again
    wait_for(lambda: state(sup, "once")["restarts"] == 1 and state(sup, "once")["state"] == "STOPPED")


def test_on_failure_restarts_a_failed_exit(supervisor):
    sup = supervisor({"flaky": plain(3, restart="on-failure", restart_delay=0.05)})
    wait_for(lambda: state(sup, "flaky")["restarts"] >= 1)
    assert "exit code 3" in state(sup, "flaky")["last_exit"]


def test_always_restarts_even_a_clean_exit(supervisor):
    sup = supervisor({"loop": plain(0, restart_delay=0.05)})
    wait_for(lambda: state(sup, "loop")["restarts"] >= 1)


def test_never_restarts_nothing(supervisor):
    sup = supervisor({"clean": plain(0, restart="never"), "dirty": plain(4, restart="never")})
    wait_for(lambda: state(sup, "clean")["state"] == "STOPPED" and state(sup, "dirty")["state"] == "FAILED")
    assert state(sup, "clean")["restarts"] == state(sup, "dirty")["restarts"] == 0
    assert "restart = 'never'" in state(sup, "dirty")["error"] and "exit code 4" in state(sup, "dirty")["error"]


def test_a_kill_is_a_failure_for_on_failure(supervisor):
    sup = supervisor({"app": {"entry": APP, "restart": "on-failure", "restart_delay": 0.05}})
    os.kill(state(sup, "app")["pid"], signal.SIGKILL)
    wait_for(lambda: state(sup, "app")["restarts"] == 1 and state(sup, "app")["state"] == "READY")


def test_a_module_that_runs_once_and_ends_before_ready_does_not_fail_the_start(supervisor, tmp_path):
    entry = tmp_path / "oneshot.py"
    entry.write_text("print('did its job')\n")
    sup = supervisor({"oneshot": {"entry": str(entry), "restart": "on-failure"}, "app": APP})
    wait_for(lambda: state(sup, "oneshot")["state"] == "STOPPED")
    assert state(sup, "app")["state"] == "READY"


# -- exos.api inside workers -------------------------------------------------------------


def test_exos_api_resolves_to_cmactor_inside_a_worker(supervisor):
    row = info(supervisor({"app": APP}))
    assert row["same_cmbackend"] == "True" and row["same_dbapi"] == "True"
    assert row["exos_api"] == "True"


def test_an_api_cmactor_does_not_provide_is_an_import_error_naming_it(supervisor):
    sup = supervisor({"app": APP, "fromimp": {"entry": APP, "args": ["--unprovided", "exos.api.acl"]}})
    assert info(sup)["unprovided"].startswith("exos.api.vlan is an EXOS platform API that cmactor does not provide")
    assert "exos.api.acl is an EXOS platform API" in info(sup, "fromimp")["unprovided"]


def test_exos_compat_false_leaves_the_exos_name_alone(supervisor):
    with pytest.raises(StartupError, match="ModuleNotFoundError: No module named 'exos'"):
        supervisor({"app": {"entry": APP, "exos_compat": False}})


def test_cmactor_exos_imports_anywhere_and_install_is_what_workers_do():
    from cmactor.exos import api
    from cmactor.exos.api import cmbackend, exos_dbapi

    assert api.CmAgent is cmactor.CmAgent and cmbackend is cmactor.cmbackend and exos_dbapi is cmactor.exos_dbapi
    before = list(sys.meta_path)
    try:
        exos.install()
        exos.install()  # idempotent
        assert len(sys.meta_path) == len(before) + 1
        with pytest.raises(ImportError, match="exos.api.acl is an EXOS platform API that cmactor does not provide"):
            __import__("exos.api.acl")
        with pytest.raises(ImportError, match="exos.api.ssl is an EXOS platform API"):
            exec("from exos.api import ssl", {})
        import exos.api.cmbackend as aliased

        assert aliased is cmactor.cmbackend
    finally:
        sys.meta_path[:] = before
        for name in [n for n in sys.modules if n == "exos" or n.startswith("exos.")]:
            del sys.modules[name]


def test_trace_buffer_handler_keeps_the_last_bytes_and_records_reach_the_module_log(supervisor, caplog):
    sup = supervisor({"app": APP})
    cur = sup.connect().cursor()
    with caplog.at_level(logging.INFO, logger="cmactor.agent.app"):
        cur.execute("set app.trace", {"logger": "ezapp", "propagate": "yes", "text": "through the hierarchy"})
        assert cur.fetchone() == ("through the hierarchy",)
        cur.execute("set app.trace", {"logger": "loner", "propagate": "no", "text": "by the handler"})
        wait_for(lambda: sum("by the handler" in r.getMessage() for r in caplog.records) >= 1)
        wait_for(lambda: sum("through the hierarchy" in r.getMessage() for r in caplog.records) >= 1)
    logged = [r.getMessage() for r in caplog.records if r.name == "cmactor.agent.app"]
    assert sum("through the hierarchy" in m for m in logged) == 1  # once, not once per path
    assert sum("by the handler" in m for m in logged) == 1


def test_trace_buffer_handler_drops_the_oldest_records_past_its_size():
    handler = exos.api.TraceBufferHandler("t", 21)  # three lines of 6 bytes and a newline each
    logger = logging.getLogger("cmactor.test.trace")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for n in range(10):
            logger.warning("line %d", n)
    finally:
        logger.removeHandler(handler)
    assert handler.lines() == ["line 7", "line 8", "line 9"]
    with pytest.raises(ValueError, match="size must be a number of bytes >= 1"):
        exos.api.TraceBufferHandler("t", 0)


# -- persistent tables that cannot be loaded ---------------------------------------------


def test_a_persistent_table_without_set_is_warned_about_once_and_not_saved(supervisor, tmp_path, caplog):
    agents = {"stats": agent("persistent_stats.py:main")}
    with caplog.at_level(logging.WARNING, logger="cmactor.agent.stats"):
        sup = supervisor(agents, state_dir=tmp_path / "s")
        wait_for(lambda: any("counters" in r.getMessage() for r in caplog.records))
    warnings = [r.getMessage() for r in caplog.records if "persistent table" in r.getMessage()]
    assert len(warnings) == 1
    assert "persistent table 'counters' has no counters_set method" in warnings[0] and "not saved" in warnings[0]
    assert state(sup, "stats")["persistent_list"] == ["name"]
    cur = sup.connect().cursor()
    cur.execute("set stats.name", {"key": "k", "value": "v"})
    sup.save()
    sup.stop()
    saved = store.read(str(tmp_path / "s" / store.FILENAME))
    assert json.loads(saved["stats"]) == {"name": [{"key": "k", "value": "v"}]}
    again = supervisor(agents, state_dir=tmp_path / "s")  # loads with nothing failing
    assert state(again, "stats")["load_errors"] == 0 and state(again, "stats")["error"] is None
    cur = again.connect().cursor()
    cur.execute("getnext stats.name")
    assert cur.fetchall() == [("k", "v")]
