"""Save, load, the dirty bit, dependency-gated loading and the audit log, on real processes."""

import json
import os
import shutil
import signal
import threading
import time

import pytest
from helpers import agent, kv_rows, wait_for

import cmactor

ECHO = agent("echo.py:main")


def echo_with(**env):
    return {"entry": ECHO, "env": {k.upper(): v for k, v in env.items()}}


def events(cur, module):
    cur.execute(f"get {module}.events")
    row = dict(zip([d[0] for d in cur.description], cur.fetchone()))
    return row["events"].split(","), [float(t) for t in row["times"].split(",")]


def test_fresh_state_dir_generates_defaults(supervisor):
    sup = supervisor({"echo": ECHO})
    cur = sup.connect().cursor()
    assert events(cur, "echo")[0] == ["event_generate_default", "ready"]
    assert not os.path.exists(sup.config_path)


def test_save_stop_start_replays_the_rows_in_saved_order(supervisor, tmp_path):
    state = tmp_path / "state"
    sup = supervisor({"echo": ECHO, "other": ECHO}, state_dir=state)
    cur = sup.connect().cursor()
    for key in ("m", "c", "x", "a"):
        cur.execute("set echo.kv", {"key": key, "value": f"v-{key}"})
    assert sup.status()["echo"]["unsaved"] is True
    result = sup.save()
    assert result == {"file": sup.config_path, "modules": ["echo", "other"], "rows": 6}
    assert not any(s["unsaved"] for s in sup.status().values())
    saved_events = events(cur, "echo")[0]
    assert saved_events[-2:] == ["event_save_start", "event_save_complete"]
    sup.stop()

    again = supervisor({"echo": ECHO, "other": ECHO}, state_dir=state)
    cur = again.connect().cursor()
    names, _ = events(cur, "echo")
    assert names == [
        "event_load_start",
        "load:a",
        "load:c",
        "load:default",
        "load:m",
        "load:x",
        "event_load_complete",
        "ready",
    ]
    assert list(kv_rows(cur).items()) == [("a", "v-a"), ("c", "v-c"), ("default", "yes"), ("m", "v-m"), ("x", "v-x")]
    assert events(cur, "other")[0][:3] == ["event_load_start", "load:default", "event_load_complete"]
    assert again.status()["echo"]["unsaved"] is False  # rows loaded from the file leave it clean


def test_unsaved_changes_survive_a_clean_stop_and_still_show_as_unsaved(supervisor, tmp_path):
    state = tmp_path / "state"
    sup = supervisor({"echo": ECHO}, state_dir=state)
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "saved", "value": "1"})
    sup.save()
    cur.execute("set echo.kv", {"key": "unsaved", "value": "1"})
    sup.stop()
    again = supervisor({"echo": ECHO}, state_dir=state)
    assert list(kv_rows(again.connect().cursor())) == ["default", "saved", "unsaved"]
    assert again.status()["echo"]["unsaved"] is True
    again.stop()
    saved_only = supervisor({"echo": ECHO}, state_dir=state, recover=False)
    assert list(kv_rows(saved_only.connect().cursor())) == ["default", "saved"]


def test_the_file_has_format_version_time_modules_and_checksum(supervisor):
    sup = supervisor({"echo": ECHO})
    sup.connect().cursor().execute("set echo.kv", {"key": "k", "value": "ü"})
    sup.save()
    with open(sup.config_path, "rb") as f:
        header, body = f.read().split(b"\n")[:2]
    header = json.loads(header)
    assert header["format"] == "cmactor-config" and header["version"] == 1
    assert set(header["modules"]) == {"echo"} and header["saved_at"].endswith("+00:00")
    assert len(header["sha256"]) == 64
    assert json.loads(body) == {"echo": {"kv": [{"key": "default", "value": "yes"}, {"key": "k", "value": "ü"}]}}


def test_save_over_the_socket_and_the_cli_command(supervisor):
    sup = supervisor({"echo": ECHO})
    with sup.connect("alice") as conn:
        conn.cursor().execute("set echo.kv", {"key": "k", "value": "1"})
        saved = conn.request({"op": "save"})["saved"]
    assert saved["modules"] == ["echo"] and saved["rows"] == 2
    from processes import cli

    result = cli("--socket", sup.socket_path, "save")
    assert result.returncode == 0 and result.stdout.startswith("saved 2 rows of echo to ")


def test_concurrent_saves_are_coalesced_and_all_answered(supervisor):
    sup = supervisor({"echo": ECHO})
    sup.connect().cursor().execute("set echo.ctl", {"save_fault": "0.2"})
    results = []
    threads = [threading.Thread(target=lambda: results.append(sup.save())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(results) == 4 and all(r["modules"] == ["echo"] for r in results)
    names, _ = events(sup.connect().cursor(), "echo")
    assert names.count("event_save_start") <= 2  # the first run, then one for all who waited


@pytest.mark.parametrize(
    "fault, message",
    [
        ("fail", "event_save_start raised RuntimeError: disk on fire"),
        ("stop", "kv_get stopped the save: refusing to be saved"),
    ],
)
def test_a_failed_save_names_the_module_and_keeps_the_previous_file(supervisor, fault, message):
    sup = supervisor({"echo": ECHO, "other": ECHO})
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "first", "value": "1"})
    sup.save()
    with open(sup.config_path, "rb") as f:
        before = f.read()
    cur.execute("set echo.kv", {"key": "second", "value": "2"})
    cur.execute("set echo.ctl", {"save_fault": fault})
    with pytest.raises(cmactor.DatabaseError, match=f"save failed: module 'echo': {message}; .* was not changed"):
        sup.save()
    with open(sup.config_path, "rb") as f:
        assert f.read() == before
    assert sup.status()["echo"]["unsaved"] is True
    assert events(cur, "echo")[0][-2:] == ["event_save_start", "event_save_complete"]  # complete always follows start
    cur.execute("get echo.kv", {"key": "second"})  # the module serves again after the failed save
    assert not [p for p in os.listdir(os.path.dirname(sup.config_path)) if p.endswith(".tmp")]


def test_requests_are_held_while_a_module_saves(supervisor):
    sup = supervisor({"echo": ECHO})
    cur = sup.connect().cursor()
    cur.execute("set echo.ctl", {"save_fault": "0.5"})
    saver = threading.Thread(target=sup.save)
    saver.start()
    wait_for(lambda: sup.status()["echo"]["saving"])
    start = time.monotonic()
    cur.execute("get echo.kv", {"key": "default"})
    assert time.monotonic() - start > 0.1
    saver.join(10)


def test_a_module_not_ready_keeps_its_last_saved_rows(supervisor, tmp_path):
    state = tmp_path / "state"
    sup = supervisor({"echo": {"entry": ECHO, "restart_delay": 5}, "other": ECHO}, state_dir=state)
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "keep", "value": "me"})
    sup.save()
    os.kill(sup.status()["echo"]["pid"], signal.SIGKILL)
    wait_for(lambda: sup.status()["echo"]["state"] == "RESTARTING")
    assert sup.save()["modules"] == ["other"]
    sup.stop()
    again = supervisor({"echo": ECHO, "other": ECHO}, state_dir=state)
    assert ("keep", "me") in kv_rows(again.connect().cursor()).items()


def test_a_restarted_module_comes_back_with_its_saved_config(supervisor):
    sup = supervisor({"echo": ECHO})
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "saved", "value": "1"})
    sup.save()
    os.kill(sup.status()["echo"]["pid"], signal.SIGKILL)
    wait_for(lambda: (s := sup.status()["echo"])["state"] == "READY" and s["restarts"] == 1)
    assert ("saved", "1") in kv_rows(cur).items()


def corrupt_checksum(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


def corrupt_truncate(path):
    path.write_bytes(path.read_bytes()[:-20])


def corrupt_not_json(path):
    path.write_bytes(b"this is not json\n{}")


def corrupt_version(path):
    header, body = path.read_bytes().split(b"\n", 1)
    fields = json.loads(header)
    fields["version"] = 99
    path.write_bytes(json.dumps(fields).encode() + b"\n" + body)


def corrupt_unreadable(path):
    path.unlink()
    path.mkdir()  # reading a directory fails even for root


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (corrupt_checksum, "fails its checksum"),
        (corrupt_truncate, "is truncated: its body has"),
        (corrupt_not_json, "is not a cmactor config file: its first line is not JSON"),
        (corrupt_version, "has format version 99; this cmactor reads version 1"),
        (corrupt_unreadable, "cannot be read: Is a directory"),
    ],
)
def test_a_corrupt_config_file_is_refused_by_name(supervisor, tmp_path, corrupt, message):
    state = tmp_path / "state"
    sup = supervisor({"echo": ECHO}, state_dir=state)
    sup.connect().cursor().execute("set echo.kv", {"key": "k", "value": "v"})
    sup.save()
    sup.stop()
    path = state / "config.jsonl"
    corrupt(path)
    with pytest.raises(cmactor.StartupError, match=f"config file {path} {message}.*--ignore-config"):
        supervisor({"echo": ECHO}, state_dir=state)
    if path.is_file():
        aside_before = path.read_bytes()
    else:
        shutil.rmtree(path)
        path.write_bytes(b"garbage")
        aside_before = b"garbage"
    started = supervisor({"echo": ECHO}, state_dir=state, ignore_config=True)
    assert list(kv_rows(started.connect().cursor())) == ["default"]
    [aside] = [p for p in state.iterdir() if p.name.startswith("config.jsonl.bad-")]
    assert aside.read_bytes() == aside_before


def test_cli_run_ignore_config(tmp_path):
    import subprocess

    from processes import cmactor_cmd

    state = tmp_path / "state"
    state.mkdir()
    (state / "config.jsonl").write_bytes(b"garbage\n")
    config = tmp_path / "c.toml"
    config.write_text(f'[supervisor]\nstate_dir = "state"\n[agents.echo]\nentry = "{ECHO}"\n')
    refused = subprocess.run(cmactor_cmd() + ["run", str(config)], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "config.jsonl is not a cmactor config file" in refused.stderr
    proc = subprocess.Popen(cmactor_cmd() + ["run", "--ignore-config", str(config)], stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "modules READY" in line:
                break
        assert any(p.name.startswith("config.jsonl.bad-") for p in state.iterdir())
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0


def test_a_row_that_fails_to_load_is_reported_and_the_load_goes_on(supervisor, tmp_path, caplog):
    state = tmp_path / "state"
    sup = supervisor({"echo": ECHO}, state_dir=state)
    cur = sup.connect().cursor()
    for key, value in (("a", "1"), ("b", "fail-on-load"), ("c", "3")):
        cur.execute("set echo.kv", {"key": key, "value": value})
    sup.save()
    sup.stop()
    again = supervisor({"echo": ECHO}, state_dir=state)
    status = again.status()["echo"]
    assert status["state"] == "READY" and status["load_errors"] == 1
    assert "1 saved rows did not load; first: table kv: ValueError: cannot load this row" in status["error"]
    assert list(kv_rows(again.connect().cursor())) == ["a", "c", "default"]
    logged = [r.getMessage() for r in caplog.records if "did not load" in r.getMessage()]
    assert any(
        "module echo: saved row of table kv did not load: ValueError: cannot load this row" in m and "'b'" in m
        for m in logged
    )


def test_dependencies_load_only_after_they_are_ready(supervisor, tmp_path):
    # declared dependents first; each dependency is slow to load
    state = tmp_path / "state"
    agents = {
        "c": echo_with(echo_deps="b", echo_load_delay="0.2"),
        "b": echo_with(echo_deps="a", echo_load_delay="0.2"),
        "a": echo_with(echo_load_delay="0.2"),
        "free": echo_with(echo_load_delay="0.2"),
    }
    sup = supervisor(agents, state_dir=state)
    sup.save()
    sup.stop()
    sup = supervisor(agents, state_dir=state)
    cur = sup.connect().cursor()
    times = {}
    for name in agents:
        names, stamps = events(cur, name)
        times[name] = dict(zip(names, stamps))
    assert times["a"]["ready"] <= times["b"]["event_load_start"]
    assert times["b"]["ready"] <= times["c"]["event_load_start"]
    assert times["free"]["event_load_start"] < times["b"]["event_load_start"]  # no deps: loads at once, in parallel


def test_a_module_that_never_calls_ready_is_reported_stuck(supervisor, caplog):
    sup = supervisor({"echo": ECHO}, start=False)
    sup.stop()
    state = sup.state_dir
    first = supervisor({"echo": ECHO}, state_dir=state)
    first.save()
    first.stop()
    stuck = supervisor({"echo": {**echo_with(echo_never_ready="1"), "load_timeout": 0.3}}, state_dir=state, start=False)
    with pytest.raises(
        cmactor.StartupError, match="echo: LOADING: event_load_complete returned but ready\\(\\) was never called"
    ):
        stuck.start(timeout=1.5)
    assert any(
        "stuck: ready() not called within 0.3s; last event event_load_complete" in r.getMessage()
        for r in caplog.records
    )


def test_audit_log_records_sets_setops_and_saves_with_user_and_outcome(supervisor):
    sup = supervisor({"echo": ECHO})
    cur = sup.connect("alice").cursor()
    cur.execute("set echo.kv", {"key": "k", "value": 1})
    with pytest.raises(cmactor.DatabaseError):
        cur.execute("set echo.boom", {"why": "nope"})
    with pytest.raises(cmactor.ProgrammingError):
        cur.execute("setop echo.kv")
    cur.execute("get echo.kv", {"key": "k"})  # reads are not audited
    sup.save(user="bob")
    sup.stop()
    with open(os.path.join(sup.state_dir, "audit.log")) as f:
        lines = [json.loads(line) for line in f]
    assert [(e["user"], e["op"], e["module"], e["table"]) for e in lines] == [
        ("alice", "set", "echo", "kv"),
        ("alice", "set", "echo", "boom"),
        ("alice", "setop", "echo", "kv"),
        ("bob", "save", None, None),
    ]
    assert lines[0]["params"] == {"key": "k", "value": "1"} and lines[0]["outcome"] == "ok"
    assert lines[1]["outcome"] == "DatabaseError: refused: nope"
    assert lines[2]["outcome"].startswith("ProgrammingError: module 'echo' table 'kv' has no 'setop' action")
    assert lines[3]["outcome"] == "ok" and lines[0]["time"].endswith("+00:00")
