"""An operator's stop, start, restart and reload of modules while the supervisor runs (admin.py)."""

import json
import logging
import os
import re
import stat
import threading
import time

import msgpack
import pytest
from helpers import agent, kv_rows, wait_for
from processes import Run, cli

import cmactor
from cmactor.errors import ConfigError, ModuleUnavailable, OperationalError, ProgrammingError
from cmactor.wire.validate import BadRequest, Request, decode_request, parse_request

ECHO = agent("echo.py:main")


def echo(deps="", **options):
    return {"entry": ECHO, "env": {"ECHO_DEPS": deps}, **options}


def state(sup, name):
    return sup.status()[name]


def slow_set(sup, outcome, secs="1"):
    """A thread sending a serial set that takes ``secs`` (brokered: through the supervisor);
    ``outcome`` gets "ok" or the exception."""

    def run():
        try:
            sup.connect().cursor().execute("set echo.order", {"n": "1", "delay": secs})
            outcome.append("ok")
        except cmactor.Error as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: state(sup, "echo")["inflight"] == 1)
    return thread


# -- the requests, checked -------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        {"id": 1, "op": "stop", "module": "echo"},
        {"id": 1, "op": "start", "module": "echo"},
        {"id": 1, "op": "restart", "module": "echo", "kill": True},
        {"id": 1, "op": "restart", "all": True, "rolling": True},
        {"id": 1, "op": "reload"},
    ],
)
def test_operator_requests_take_the_fast_check(message):
    decoded = decode_request(msgpack.packb(message))
    assert type(decoded) is Request and parse_request(msgpack.unpackb(msgpack.packb(message))) == decoded


@pytest.mark.parametrize(
    "message, words",
    [
        ({"id": 1, "op": "start"}, "start: bad module name None"),
        ({"id": 1, "op": "stop", "module": "../x"}, "stop: bad module name"),
        ({"id": 1, "op": "restart"}, "restart: bad module name None"),
        ({"id": 1, "op": "restart", "module": "echo", "all": True}, "name a 'module', or give 'all': true"),
        ({"id": 1, "op": "restart", "module": "echo", "rolling": True}, "name a 'module', or give 'all': true"),
        ({"id": 1, "op": "restart", "module": "echo", "kill": "yes"}, "restart: 'kill' must be true, false or nil"),
    ],
)
def test_bad_operator_requests_are_refused_the_same_by_both_checks(message, words):
    body = msgpack.packb(message)
    for decoded in (decode_request(body), msgpack.unpackb(body)):
        with pytest.raises(BadRequest, match=re.escape(words)):
            parse_request(decoded)


# -- stop and start ------------------------------------------------------------------------------


def test_a_stopped_module_refuses_requests_saying_who_stopped_it_and_starts_with_its_config(supervisor):
    sup = supervisor({"echo": echo(), "other": echo()})
    with sup.connect(username="alice") as conn:
        conn.cursor().execute("set echo.kv", {"key": "kept", "value": "1"})
        pid = state(sup, "echo")["pid"]
        stopped = conn.request({"op": "stop", "module": "echo"})["module"]
        assert (stopped["name"], stopped["state"], stopped["pid"], stopped["ok"]) == ("echo", "STOPPED", None, True)
        assert stopped["note"].startswith("stopped by alice (uid ")
        status = state(sup, "echo")
        assert status["state"] == "STOPPED" and status["stopped_by"].startswith(f"alice (uid {os.getuid()}) at ")
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        start = time.monotonic()
        with pytest.raises(ModuleUnavailable) as refused:
            # Through the supervisor, and with a hold, which does not make it wait.
            conn.request({"op": "get", "module": "echo", "table": "kv", "params": {"key": "kept"}, "hold": 5})
        assert time.monotonic() - start < 1
        assert "module 'echo' is STOPPED: stopped by alice" in str(refused.value)
        assert "`cmactor start echo` starts it" in str(refused.value)
        assert state(sup, "other")["state"] == "READY"  # the others are not touched
        started = conn.request({"op": "start", "module": "echo"})["module"]
        assert started["state"] == "READY" and started["ok"] and started["pid"] not in (None, pid)
        assert kv_rows(conn.cursor())["kept"] == "1"  # its config, journal included
    status = state(sup, "echo")
    assert status["stopped_by"] is None and status["error"] is None


def test_a_stopped_module_stays_stopped_across_a_supervisor_restart_until_started(supervisor, tmp_path):
    agents = {"echo": echo(), "dep": echo("echo")}
    first = supervisor(agents)
    assert first.stop_module("echo", user="bob")["state"] == "STOPPED"
    assert state(first, "dep")["state"] == "READY"  # a dependent keeps running, as through a crash
    first.stop()
    kept = tmp_path / "state" / "stopped.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert json.loads(kept.read_text())["stopped"]["echo"].startswith("bob (uid ")
    second = supervisor(agents, start=False)
    second.start(strict=False)  # its dependent waits for it, which a strict start would refuse
    status = second.status()
    assert status["echo"]["state"] == "STOPPED" and status["echo"]["stopped_by"].startswith("bob (uid ")
    assert status["dep"]["state"] == "WAITING_DEPS" and status["dep"]["waiting_on"] == "echo"
    with pytest.raises(ModuleUnavailable, match="stopped by bob"):
        second.connect().cursor().execute("get echo.kv", {"key": "default"})
    assert second.start_module("echo")["state"] == "READY"
    wait_for(lambda: state(second, "dep")["state"] == "READY")  # its dependent comes up after it
    assert json.loads(kept.read_text()) == {"stopped": {}}


def test_a_stopped_module_changed_by_a_reload_stays_stopped_and_starts_with_its_new_options(supervisor):
    sup = supervisor({"echo": echo()})
    sup.stop_module("echo")
    changed = sup.reload({"echo": echo("ghost")})  # its next worker names a module nobody runs
    assert changed["changed"] == ["echo"] and changed["restarted"] == [] and state(sup, "echo")["state"] == "STOPPED"
    with pytest.raises(OperationalError, match=r"module 'echo' is not READY: FAILED: config_deps names 'ghost'"):
        sup.start_module("echo")
    with pytest.raises(ProgrammingError, match="unknown module 'nosuch'"):
        sup.stop_module("nosuch")


def test_a_start_waiting_when_the_supervisor_stops_is_answered(supervisor):
    sup = supervisor({"echo": echo()}, stop_timeout=0.5)
    sup.connect().cursor().execute("set echo.kv", {"key": "k", "value": "1"})  # a load, not defaults, next
    sup.stop_module("echo")
    sup.reload({"echo": {**echo(), "env": {"ECHO_LOAD_DELAY": "30"}}})  # its next load takes 30s
    outcome = []

    def start():
        try:
            sup.start_module("echo")
        except OperationalError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    wait_for(lambda: state(sup, "echo")["state"] == "LOADING")
    sup.stop()
    thread.join(10)
    assert not thread.is_alive() and "module 'echo' is not READY: STOPPED" in str(outcome[0])


# -- restart -------------------------------------------------------------------------------------


def test_a_restart_lets_a_request_in_flight_finish_and_holds_those_that_come(supervisor, caplog):
    caplog.set_level(logging.INFO, "cmactor.supervisor")
    sup = supervisor({"echo": echo()})
    pid = state(sup, "echo")["pid"]
    outcome = []
    thread = slow_set(sup, outcome)
    with sup.connect() as conn:
        restarted = {}
        asked = threading.Thread(target=lambda: restarted.update(conn.request({"op": "restart", "module": "echo"})))
        asked.start()
        wait_for(lambda: state(sup, "echo")["state"] == "RESTARTING")
        assert state(sup, "echo")["pid"] == pid  # still answering the set
        # Sent while it restarts: held for the next worker, not refused.
        sup.connect().cursor().execute("set echo.kv", {"key": "during", "value": "1"})
        asked.join(20)
    thread.join(20)
    assert outcome == ["ok"]
    assert restarted["module"]["state"] == "READY" and restarted["module"]["pid"] != pid
    assert f"worker pid {pid} ended (exit code 0" in caplog.text  # it ended on its own, not killed
    assert kv_rows(sup.connect().cursor())["during"] == "1"


def test_a_restart_with_kill_fails_the_request_in_flight(supervisor):
    sup = supervisor({"echo": echo()})
    pid = state(sup, "echo")["pid"]
    outcome = []
    thread = slow_set(sup, outcome, secs="5")
    start = time.monotonic()
    restarted = sup.restart("echo", kill=True, wait=True)
    assert time.monotonic() - start < 4 and restarted["pid"] != pid
    thread.join(20)
    assert isinstance(outcome[0], OperationalError) and "killed by SIGKILL" in str(outcome[0])


def test_a_rolling_restart_goes_dependencies_first_each_ready_before_the_next(supervisor, caplog):
    sup = supervisor({"c": echo("b"), "b": echo("a"), "a": echo()})
    before = {name: entry["pid"] for name, entry in sup.status().items()}
    caplog.set_level(logging.INFO, "cmactor.supervisor")
    caplog.clear()
    with sup.connect() as conn:
        done = conn.request({"op": "restart", "all": True, "rolling": True})["modules"]
    assert [(e["name"], e["state"], e["ok"]) for e in done] == [
        ("a", "READY", True),
        ("b", "READY", True),
        ("c", "READY", True),
    ]
    assert all(e["pid"] != before[e["name"]] for e in done)
    steps = [
        ("stop", m[1]) if m[1] else ("ready", m[2])
        for m in re.finditer(r"module (\w+): worker pid \d+ stopping|module (\w+) READY \(pid", caplog.text)
    ]
    assert steps == [("stop", "a"), ("ready", "a"), ("stop", "b"), ("ready", "b"), ("stop", "c"), ("ready", "c")]


# -- reload --------------------------------------------------------------------------------------


def write_config(path, agents, supervisor_keys=""):
    lines = [f'[supervisor]\nstate_dir = "state"\n{supervisor_keys}']
    for name, (deps, extra) in agents.items():
        lines.append(f'[agents.{name}]\nentry = "{ECHO}"\nenv = {{ ECHO_DEPS = "{deps}" }}\n{extra}')
    path.write_text("\n".join(lines))


def test_a_reload_adds_removes_and_changes_modules_and_leaves_the_others_alone(tmp_path):
    config = tmp_path / "cmactor.toml"
    write_config(config, {"keep": ("", ""), "gone": ("", ""), "changed": ("", "")})
    sup = cmactor.Supervisor.from_toml(config, start_timeout=20)
    with sup:
        pids = {name: entry["pid"] for name, entry in sup.status().items()}
        stop, failures, done = threading.Event(), [], [0]

        def hammer():
            with sup.connect() as conn:
                cur = conn.cursor()
                while not stop.is_set():
                    try:
                        cur.execute("get keep.kv", {"key": "default"})  # a direct read
                        cur.execute("set keep.kv", {"key": "n", "value": str(done[0])})  # through the supervisor
                        done[0] += 1
                    except cmactor.Error as exc:
                        failures.append(exc)

        thread = threading.Thread(target=hammer)
        thread.start()
        wait_for(lambda: done[0] > 10)
        write_config(
            config,
            {"keep": ("", ""), "changed": ("", "action_timeout = 20.0"), "added": ("keep", "")},
            'hold_timeout = 3.0\nsocket = "elsewhere.sock"\n',
        )
        summary = sup.reload()
        at_reload = done[0]
        wait_for(lambda: done[0] > at_reload + 10)
        stop.set()
        thread.join(20)
        assert failures == [] and done[0] > 20
        status = sup.status()
        assert status["keep"]["pid"] == pids["keep"] and status["keep"]["restarts"] == 0
        assert sorted(status) == ["added", "changed", "keep"]
        assert status["added"]["state"] == "READY" and status["added"]["config_deps"] == ["keep"]
        assert status["changed"]["state"] == "READY" and status["changed"]["pid"] != pids["changed"]
        assert sup.modules["changed"].options["action_timeout"] == 20.0
        assert (summary["added"], summary["removed"], summary["restarted"], summary["unchanged"]) == (
            ["added"],
            ["gone"],
            ["changed"],
            ["keep"],
        )
        assert sorted(summary["needs_restart"]) == ["hold_timeout", "socket"]
        assert all(entry["ok"] for entry in summary["modules"])
        with pytest.raises(ProgrammingError, match="unknown module 'gone'"):
            sup.connect().cursor().execute("get gone.kv", {"key": "default"})


def test_a_reload_with_errors_changes_nothing_and_names_every_error(tmp_path):
    config = tmp_path / "cmactor.toml"
    write_config(config, {"one": ("", ""), "two": ("", "")})
    with cmactor.Supervisor.from_toml(config, start_timeout=20) as sup:
        before = sup.status()
        write_config(config, {"one": ("", "restart_delay = -1"), "three": ("", "pool_sise = 2")})
        with pytest.raises(ConfigError) as caught:
            sup.reload()
        assert len(caught.value.problems) == 2
        assert "restart_delay" in str(caught.value) and "pool_sise" in str(caught.value)
        after = sup.status()
        assert sorted(after) == ["one", "two"]
        assert [(e["state"], e["pid"]) for e in after.values()] == [(e["state"], e["pid"]) for e in before.values()]


def test_a_reload_of_an_embedded_supervisor_takes_the_new_agents(supervisor):
    sup = supervisor({"echo": echo(), "dep": echo("echo")})
    with pytest.raises(OperationalError, match="'echo' would be removed, but 'dep' declared it in config_deps"):
        sup.reload({"dep": echo("echo")})
    assert sorted(sup.status()) == ["dep", "echo"]
    with pytest.raises(ConfigError, match="was not made from a config file"):
        sup.reload()
    summary = sup.reload({"echo": echo(), "dep": echo("echo"), "more": ECHO})
    assert summary["added"] == ["more"] and summary["unchanged"] == ["echo", "dep"]
    assert state(sup, "more")["state"] == "READY"


# -- the command line ----------------------------------------------------------------------------


def test_the_operator_commands(tmp_path):
    config = tmp_path / "cmactor.toml"
    write_config(config, {"echo": ("", ""), "dep": ("echo", "")})
    run = Run(config)
    try:
        stopped = cli("-c", config, "stop", "echo", "nosuch")
        assert stopped.returncode == 1
        assert re.match(r"echo: STOPPED: stopped by \S+ \(uid \d+\) at ", stopped.stdout)
        assert "cmactor: nosuch: ProgrammingError: unknown module 'nosuch'" in stopped.stderr
        refused = cli("-c", config, "get", "echo.kv", "key=default")
        assert refused.returncode == 1 and "is STOPPED: stopped by" in refused.stderr
        started = cli("-c", config, "start", "echo")
        assert started.returncode == 0 and re.fullmatch(r"echo: READY \(pid \d+\)\n", started.stdout)
        everything = cli("-c", config, "restart", "--all", "--rolling")
        assert everything.returncode == 0, everything.stderr
        assert re.fullmatch(r"echo: READY \(pid \d+\)\ndep: READY \(pid \d+\)\n", everything.stdout)
        killed = cli("-c", config, "restart", "echo", "--kill")
        assert killed.returncode == 0 and killed.stdout.startswith("echo: READY (pid ")
        assert cli("-c", config, "restart").returncode == 2  # neither modules nor --all
        write_config(config, {"echo": ("", ""), "new": ("", "")})
        reloaded = cli("-c", config, "reload")
        assert reloaded.returncode == 0, reloaded.stderr
        assert re.fullmatch(
            r"added new: READY \(pid \d+\)\nremoved dep: STOPPED: .*\nunchanged: echo\n", reloaded.stdout
        )
        (tmp_path / "cmactor.toml").write_text(config.read_text() + "\n[agents.bad]\n")
        # Through its socket: -c would read the broken file here first, and refuse it as it does.
        socket = re.search(r"socket (\S+)", run.text)[1]
        broken = cli("--socket", socket, "reload")
        assert broken.returncode == 1 and "reload refused, nothing was changed" in broken.stderr
        assert "missing required key 'entry'" in broken.stderr
        assert cli("--socket", socket, "shutdown").returncode == 0
        assert run.proc.wait(20) == 0
    finally:
        run.kill()


def test_a_module_removed_while_a_save_walks_is_not_added_back_until_it_is_gone(supervisor):
    # echo's save takes 3 s; "gone" was removed by a reload meanwhile: its record stays
    # until the save run that names it ends, and a reload reading it as present would
    # take it for unchanged, then lose it.
    sup = supervisor({"gone": ECHO, "echo": echo()})  # the save walks gone first, then echo for 3 s
    sup.connect().cursor().execute("set echo.ctl", {"save_fault": "3"})
    sup.connect().cursor().execute("set gone.kv", {"key": "kept", "value": "1"})  # unsaved: the save walks it too
    saving = threading.Thread(target=sup.save)
    saving.start()
    try:
        time.sleep(0.5)  # the save has walked gone (first) and sleeps in echo's (3 s); requests to echo wait on it
        assert sup.reload({"echo": echo()})["removed"] == ["gone"]
        assert saving.is_alive()  # still walking echo: gone's record waits for the run to end
        with pytest.raises(OperationalError, match="'gone', removed by the last reload, is still being let go"):
            sup.reload({"echo": echo(), "gone": ECHO})
        assert "gone" not in sup.status() or sup.status()["gone"]["state"] != "READY"
    finally:
        saving.join()
    wait_for(lambda: "gone" not in sup.status() or None, timeout=10)
    assert sup.reload({"echo": echo(), "gone": ECHO})["added"] == ["gone"]
    assert state(sup, "gone")["state"] == "READY"
    cur = sup.connect().cursor()
    cur.execute("get gone.kv", {"key": "kept"})  # its config came back with it
    assert cur.fetchone()[-1] == "1"


SLOW_START = """
import time
from cmactor import ready
from cmactor.cmbackend import CmAgent, cmbackend_init

class Slow(CmAgent):
    def event_generate_default(self):
        time.sleep(3)
        ready()

def main():
    cmbackend_init(Slow())
"""


def test_a_module_stopped_while_the_supervisor_starts_does_not_hold_up_the_start(supervisor, tmp_path):
    (tmp_path / "slow.py").write_text(SLOW_START)
    sup = supervisor({"echo": echo(), "slow": str(tmp_path / "slow.py:main")}, start=False)
    started = threading.Thread(target=sup.start, kwargs={"timeout": 30, "strict": False})
    t0 = time.monotonic()
    started.start()

    def loading():
        try:
            return sup.status()["slow"]["state"] == "LOADING" or None
        except AttributeError:  # start() has not made its loop yet
            return None

    wait_for(loading)
    assert sup.stop_module("slow")["state"] == "STOPPED"
    started.join(timeout=25)
    assert not started.is_alive() and time.monotonic() - t0 < 15  # not start_timeout (30 s)
    assert state(sup, "echo")["state"] == "READY"


def test_a_user_name_that_does_not_print_is_escaped_in_notes_and_logs(supervisor):
    sup = supervisor({"echo": echo()})
    forged = "eve\x1b[2J\n2026-12-06 04:00:00,000 INFO    cmactor.supervisor: all fine"
    outcome = sup.stop_module("echo", user=forged)
    note = outcome["note"]
    assert "\n" not in note and "\x1b" not in note and "eve\\x1b[2J\\n2026-12-06" in note
    with open(os.path.join(sup.state_dir, "logs", "echo.log"), encoding="utf-8") as f:
        log = f.read()
    assert "eve\\x1b[2J\\n2026" in log and "\x1b" not in log
    assert "\n2026-12-06 04:00:00,000 INFO    cmactor.supervisor: all fine" not in log


def test_a_reload_says_once_what_state_a_module_is_in_and_why(supervisor):
    sup = supervisor({"echo": echo()})
    summary = sup.reload({"echo": echo(), "bad": {"entry": agent("broken.py:raises"), "max_restarts": 0}})
    [entry] = [entry for entry in summary["modules"] if entry["name"] == "bad"]
    assert (entry["change"], entry["state"], entry["ok"]) == ("added", "FAILED", False)
    assert "entry exploded" in entry["note"] and not entry["note"].startswith("FAILED")
