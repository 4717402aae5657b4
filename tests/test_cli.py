"""The cmactor command, run as a real process with real signals."""

import contextlib
import importlib.util
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import agent
from processes import cli, cmactor_cmd, on_terminal

from cmsupervisor.cli import program as cli_module
from cmsupervisor.cli.commands import export_line

ECHO = agent("echo.py:main")


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cmactor.toml"
    path.write_text(
        "[supervisor]\n"
        'state_dir = "state"\n'
        "[agents.echo]\n"
        f'entry = "{ECHO}"\n'
        "[agents.other]\n"
        f'entry = "{ECHO}"\n'
        'env = { ECHO_DEPS = "echo" }\n'
    )
    return path


@contextlib.contextmanager
def serving(config):
    """A `cmactor run` process serving ``config``; stopped (and checked) on exit."""
    proc = subprocess.Popen(cmactor_cmd() + ["run", str(config)], stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "modules READY" in line:
                break
        else:
            pytest.fail("cmactor run exited early:\n" + "".join(lines))
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(20)


@pytest.fixture
def running(config):
    with serving(config) as proc:
        yield proc


@pytest.fixture
def catalog(tmp_path):
    """A `cmactor run` serving module "cat" (agents/cli_agents.py); its config file's path."""
    path = tmp_path / "catalog.toml"
    path.write_text(f'[supervisor]\nstate_dir = "state"\n[agents.cat]\nentry = "{agent("cli_agents.py:main")}"\n')
    with serving(path):
        yield str(path)


def test_run_status_get_set_and_ctrl_c(config, running):
    status = cli("status", "--format", "json", "-c", str(config))
    assert status.returncode == 0, status.stderr
    parsed = json.loads(status.stdout)
    assert {m["state"] for m in parsed.values()} == {"READY"}
    pids = [m["pid"] for m in parsed.values()]

    table = cli("-c", str(config), "status")
    assert table.stdout.splitlines()[0].split()[:3] == ["module", "state", "pid"]
    assert "READY" in table.stdout

    assert cli("-c", str(config), "set", "echo.kv", "key=a", "value=1").returncode == 0
    got = cli("-c", str(config), "--format", "json", "getnext", "echo.kv")
    assert json.loads(got.stdout) == [{"key": "a", "value": "1"}, {"key": "default", "value": "yes"}]
    plain = cli("-c", str(config), "get", "echo.kv", "key=a")
    assert plain.stdout.split() == ["key", "value", "a", "1"]
    assert json.loads(cli("-c", str(config), "status", "--format", "json").stdout)["echo"]["unsaved"] is True

    notified = cli("-c", str(config), "set", "echo.notify", "times=2")
    assert notified.stderr.splitlines() == ["step 0", "step 1"]
    assert cli("-c", str(config), "--format", "json", "get", "echo.ctx", "--vr", "VR-X").stdout.count('"VR-X"') == 1

    running.send_signal(signal.SIGINT)
    assert running.wait(20) == 0
    assert "stopped" in running.stderr.read()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_sigint_while_starting_still_stops_cleanly(config):
    proc = subprocess.Popen(cmactor_cmd() + ["run", str(config)], stderr=subprocess.PIPE, text=True)
    try:
        proc.stderr.readline()  # the first log line: start is under way
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert "SIGINT: stopping" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_socket_from_environment_and_stop_command(config, running):
    socket_path = (config.parent / "state" / "run" / "socket.path").read_text()
    env = dict(os.environ, CMACTOR_SOCKET=socket_path)
    result = subprocess.run(
        cmactor_cmd() + ["get", "echo.kv", "key=default", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert json.loads(result.stdout) == [{"key": "default", "value": "yes"}]
    stopped = subprocess.run(cmactor_cmd() + ["stop"], capture_output=True, text=True, env=env, timeout=30)
    assert stopped.returncode == 0
    assert running.wait(20) == 0


def test_config_in_the_working_directory_is_found(config, running):
    result = cli("get", "echo.kv", "key=default", cwd=config.parent)
    assert result.returncode == 0 and "yes" in result.stdout


def test_sigterm_stops_cleanly(config, running):
    pids = [m["pid"] for m in json.loads(cli("-c", str(config), "status", "--format", "json").stdout).values()]
    running.send_signal(signal.SIGTERM)
    assert running.wait(20) == 0
    deadline = time.monotonic() + 5
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, "workers outlived cmactor run"
        time.sleep(0.05)


def test_restart_command(config, running):
    before = json.loads(cli("-c", str(config), "status", "--format", "json").stdout)["echo"]["pid"]
    assert cli("-c", str(config), "restart", "echo").returncode == 0
    deadline = time.monotonic() + 10
    while True:
        now = json.loads(cli("-c", str(config), "status", "--format", "json").stdout)["echo"]
        if now["state"] == "READY" and now["pid"] != before:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    bad = cli("-c", str(config), "restart", "nosuch")
    assert bad.returncode == 1 and "unknown module 'nosuch'" in bad.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["get", "nope.kv"], "ProgrammingError: unknown module 'nope'"),
        (["get", "echo.boom"], "DatabaseError: get echo.boom raised ValueError: kaboom"),
        (["set", "echo.kv", "novalue"], "parameter 'novalue' is not key=value"),
        (["get", "echo"], "malformed operation 'get echo'"),
        (["setop", "echo.kv"], "module 'echo' table 'kv' has no 'setop' action"),
    ],
)
def test_errors_print_one_line_and_exit_non_zero(config, running, args, message):
    result = cli("-c", str(config), *args)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert result.stdout == ""


def test_no_supervisor_is_a_clear_error(tmp_path):
    result = cli("--socket", str(tmp_path / "none.sock"), "status")
    assert result.returncode == 1
    assert "cannot reach a cmactor supervisor at" in result.stderr and "cmactor run" in result.stderr


def test_run_with_a_broken_agent_exits_non_zero_naming_it(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(f'[agents.x]\nentry = "{agent("broken.py:raises")}"\n')
    result = subprocess.run(cmactor_cmd() + ["run", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "StartupError" in result.stderr and "x: FAILED: entry" in result.stderr and "entry exploded" in result.stderr


def test_run_with_a_bad_config_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[supervisor]\nhold_timeot = 3\n[agents.x]\nentry = "m:f"\n')
    result = cli("run", str(path))
    assert result.returncode == 1
    assert str(path) in result.stderr and "unknown key 'hold_timeot'; did you mean 'hold_timeout'?" in result.stderr


def test_run_serves_the_modules_that_came_up_and_shows_the_failed_one(tmp_path):
    path = tmp_path / "mixed.toml"
    path.write_text(
        f'[supervisor]\nstate_dir = "state"\n[agents.echo]\nentry = "{ECHO}"\n'
        f'[agents.x]\nentry = "{agent("broken.py:raises")}"\n'
    )
    proc = subprocess.Popen(cmactor_cmd() + ["run", str(path)], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "modules READY" in line:
                break
        assert "1 of 2 modules READY" in lines[-1], "".join(lines)
        assert any("x: FAILED: entry" in line and "entry exploded" in line for line in lines), "".join(lines)
        status = json.loads(cli("-c", str(path), "--format", "json", "status").stdout)
        assert status["echo"]["state"] == "READY" and status["x"]["state"] == "FAILED"
        assert "entry exploded" in status["x"]["error"]
        assert cli("-c", str(path), "get", "echo.kv", "key=default").returncode == 0
        assert "ModuleUnavailable" in cli("-c", str(path), "get", "x.kv").stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_run_strict_exits_non_zero_when_a_module_fails(tmp_path):
    path = tmp_path / "mixed.toml"
    path.write_text(
        f'[supervisor]\nstate_dir = "state"\n[agents.echo]\nentry = "{ECHO}"\n'
        f'[agents.x]\nentry = "{agent("broken.py:raises")}"\n'
    )
    result = subprocess.run(cmactor_cmd() + ["run", "--strict", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "StartupError" in result.stderr and "x: FAILED: entry" in result.stderr


def next_page(result):
    """The command a getnext page's last stderr line gives for the next page, ready to
    run (None when the page says nothing: the table ended)."""
    if not result.stderr:
        return None
    line = result.stderr.splitlines()[-1]
    assert line.startswith("cmactor: ") and "rows shown, the table goes on; next page, after the last row" in line, line
    words = shlex.split(line[line.index(": cmactor ") + 2 :])
    assert words[0] == "cmactor"
    return words[1:]


def test_getnext_max_rows_pages_and_says_how_to_go_on(catalog):
    args = ["-c", catalog, "getnext", "cat.item", "name=None", "--max-rows", "10", "--format", "json"]
    pages, names = [], []
    while args is not None:
        result = cli(*args)
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)  # the hint is on stderr: stdout stays JSON
        pages.append(len(rows))
        names += [row["name"] for row in rows]
        args = next_page(result)
        if args is not None:
            # The last row's key, and the page's own options, carry over.
            start = f"name={rows[-1]['name']}"
            assert args == [
                *("-c", catalog, "getnext", "cat.item", start),
                *("--index", "name", "--max-rows", "10", "--format", "json"),
            ]
    assert pages == [10, 10, 5]
    assert names == [f"item{i:02d}" for i in range(25)]

    table = cli("-c", catalog, "getnext", "cat.item", "name=None", "--max-rows", "3")
    assert table.stdout.split() == ["name", "size", "item00", "0", "item01", "1", "item02", "2"]
    assert "after the last row's name (the walk's index columns): cmactor -c" in table.stderr
    assert table.stderr.strip().endswith("getnext cat.item name=item02 --index name --max-rows 3")
    # A page that ends the table says nothing more.
    assert cli("-c", catalog, "getnext", "cat.item", "name=None", "--max-rows", "25").stderr == ""


def test_paging_a_two_column_index_quotes_values_and_names_the_columns(catalog):
    args = ["-c", catalog, "getnext", "cat.pair", "group=None", "member=None", "--max-rows", "2", "--format", "json"]
    first = cli(*args)
    assert "after the last row's group, member (the walk's index columns)" in first.stderr
    assert "'group=a b' 'member=y z' --index group,member --max-rows 2" in first.stderr
    seen = [(row["group"], row["member"]) for row in json.loads(first.stdout)]
    args = next_page(first)
    while args is not None:
        result = cli(*args)
        seen += [(row["group"], row["member"]) for row in json.loads(result.stdout)]
        args = next_page(result)
    assert seen == [("a b", "x"), ("a b", "y z"), ("c", "1"), ("c", "2"), ("c", "3")]

    # Nothing names the index, so the CLI cannot tell it: the hint gives every field.
    plain = cli("-c", catalog, "getnext", "cat.pair", "--max-rows", "2")
    assert "after the last row, all its fields as params (name the index with --index or key=None to" in plain.stderr
    assert plain.stderr.strip().endswith("getnext cat.pair 'group=a b' 'member=y z' --max-rows 2")


def test_index_option_names_the_index_and_other_params_ride_along(catalog):
    args = ["-c", catalog, "--format", "json", "getnext", "cat.item", "size=1", "--index", "name", "--max-rows", "3"]
    names = []
    while args is not None:
        result = cli(*args)
        names += [row["name"] for row in json.loads(result.stdout)]
        args = next_page(result)
        assert args is None or args[4:6] == ["size=1", f"name={names[-1]}"]
    assert names == [f"item{i:02d}" for i in range(1, 25, 3)]  # the size filter held on every page


def test_key_none_names_an_index_column_with_no_start_value(catalog):
    def names(*params):
        result = cli("-c", catalog, "--format", "json", "getnext", "cat.item", *params)
        assert result.returncode == 0, result.stderr
        return [row["name"] for row in json.loads(result.stdout)]

    # name=None: the walk carries only name. Without it, every field of the previous
    # row rides along and item_get takes size as a filter (rows of size 0 only).
    assert names("name=None") == [f"item{i:02d}" for i in range(25)]
    assert names() == [f"item{i:02d}" for i in range(0, 25, 3)]
    pairs = json.loads(cli("-c", catalog, "--format", "json", "getnext", "cat.pair", "group=c", "member=None").stdout)
    assert pairs == [{"group": "c", "member": m} for m in ("1", "2", "3")]
    assert "key=None (a None param: an index column with no start value)" in " ".join(
        cli("getnext", "--help").stdout.split()
    )
    # Elsewhere None is text, as it always was: a set sends "None".
    assert "no item 'None'" in cli("-c", catalog, "get", "cat.item", "name=None").stderr


@pytest.mark.parametrize(
    "option, message",
    [
        (["--max-rows", "0"], "argument --max-rows: must be a whole number of rows, 1 or more; got '0'"),
        (["--max-rows", "ten"], "argument --max-rows: must be a whole number of rows, 1 or more; got 'ten'"),
        (["--index", "name,"], "argument --index: must be column names separated by commas, got 'name,'"),
    ],
)
def test_bad_paging_options_are_usage_errors(option, message):
    result = cli("getnext", "cat.item", *option)
    assert result.returncode == 2 and message in result.stderr


# What a value must never do to the terminal it is shown on: clear it, retitle it (OSC ..
# BEL), colour it (C1's CSI), be read as rich markup or an emoji code; and how it is shown.
EVIL = "\x1b[2J\x1b]0;pwned\x07 [red]uplink[/red] [/bold] x :thumbs_up: \x9b31m\x7f\ttab\nline"
EVIL_SHOWN = r"\x1b[2J\x1b]0;pwned\x07 [red]uplink[/red] [/bold] x :thumbs_up: \x9b31m\x7f\ttab\nline"
RICH = importlib.util.find_spec("rich") is not None
RAW_CONTROLS = [b"\x1b[2J", b"\x1b]0", b"\x07", "\x9b".encode(), b"\x7f", b"\ttab", b"\nline"]


def shows_escaped(shown):
    """``shown`` (a terminal's bytes) has EVIL escaped, and none of its controls raw (rich
    adds its own ESC sequences for styles, so ESC itself may be there)."""
    assert EVIL_SHOWN.encode() in shown, shown
    assert not [raw for raw in RAW_CONTROLS if raw in shown], shown


def test_values_shown_on_a_terminal_are_escaped_and_never_read_as_markup(supervisor):
    sup = supervisor({"echo": ECHO, "r": agent("reader.py:main")})
    sup.connect().cursor().execute("set echo.kv", {"key": "evil", "value": EVIL})
    socket = ("--socket", sup.socket_path)
    for command in (
        ["get", "echo.kv", "key=evil"],
        ["getnext", "echo.kv"],
        ["set", "echo.kv", "key=evil2", f"value={EVIL}"],
    ):
        status, out, err = on_terminal(*socket, *command)
        assert (status, err) == (0, b""), (command, err)
        shows_escaped(out)
        assert ("│".encode() in out) == RICH  # its table, where it is installed
    status, out, err = on_terminal(*socket, "export")
    assert (status, err) == (0, b"")
    shows_escaped(out)
    assert f"set echo.kv key=evil value='{EVIL_SHOWN}'".encode() in out.splitlines()

    # On stderr: an error's message, notify_cli text, a page's next command.
    status, out, err = on_terminal(*socket, "set", "echo.boom", f"why={EVIL}")
    assert (status, out) == (1, b"")
    assert err == f"cmactor: DatabaseError: refused: {EVIL_SHOWN}\n".encode()
    status, out, err = on_terminal(*socket, "get", "r.say", "times=1", "--vr", EVIL)
    assert (status, err) == (0, f"line 0 for {EVIL_SHOWN}\n".encode())
    status, out, err = on_terminal(*socket, "getnext", "echo.kv", "key=default", "--max-rows", "1")
    assert status == 0 and err.endswith(b"\n") and err.count(b"\n") == 1
    shows_escaped(err)


def test_values_written_to_a_pipe_stay_exactly_as_they_are(supervisor):
    sup = supervisor({"echo": ECHO})
    sup.connect().cursor().execute("set echo.kv", {"key": "evil", "value": EVIL})
    socket = ["--socket", sup.socket_path]
    got = subprocess.run(cmactor_cmd() + socket + ["get", "echo.kv", "key=evil"], capture_output=True, timeout=30)
    assert got.stdout == b"key   value\nevil  " + EVIL.encode() + b"\n"
    exported = subprocess.run(cmactor_cmd() + socket + ["export"], capture_output=True, timeout=30)
    assert (
        exported.stdout
        == (
            export_line("echo", "kv", {"key": "default", "value": "yes"})
            + "\n"
            + export_line("echo", "kv", {"key": "evil", "value": EVIL})
            + "\n"
        ).encode()
    )
    as_json = subprocess.run(cmactor_cmd() + socket + ["--format", "json", "export"], capture_output=True, timeout=30)
    assert json.loads(as_json.stdout) == {
        "echo": {"kv": [{"key": "default", "value": "yes"}, {"key": "evil", "value": EVIL}]}
    }
    assert "\x9b".encode() in as_json.stdout  # as json.dumps(ensure_ascii=False) writes it
    status, out, err = on_terminal(*socket, "--format", "json", "export")
    assert json.loads(out) == json.loads(as_json.stdout)  # the same JSON on a terminal, its C1 and DEL escaped
    assert b"\\u009b31m\\u007f" in out and not [raw for raw in RAW_CONTROLS if raw in out]


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self):
        return True


def test_a_table_on_a_terminal_without_rich_is_escaped_too(monkeypatch):
    for name in ("rich", "rich.console", "rich.table", "rich.text"):
        monkeypatch.setitem(sys.modules, name, None)  # import rich fails, as where it is not installed
    monkeypatch.setenv("COLUMNS", "200")  # wider than the table: one line per row
    out = Terminal()
    cli_module.print_table(["key", "value\x1b[1m"], [["evil", EVIL]], out)
    assert out.getvalue().splitlines() == ["key   value\\x1b[1m", "evil  " + EVIL_SHOWN]


NOT_UTF8 = "holds text that is not valid Unicode (a lone surrogate '\\udcff' at position {}: the command line held a byte that is not UTF-8?); pass UTF-8 text"


@pytest.mark.parametrize(
    "args, problem",
    [
        ([b"set", b"echo.kv", b"key=\xff"], f"param 'key' {NOT_UTF8.format(0)}"),
        ([b"get", b"echo.kv", b"key=ab\xff"], f"param 'key' {NOT_UTF8.format(2)}"),
        ([b"set", b"echo.kv", b"k\xff=1"], f"param name 'k\\udcff' {NOT_UTF8.format(1)}"),
        ([b"get", b"echo.kv", b"key=a", b"--vr", b"\xff"], f"the request's 'vr' {NOT_UTF8.format(0)}"),
    ],
)
def test_a_command_line_byte_that_is_not_utf8_is_an_error_naming_the_param(supervisor, args, problem):
    sup = supervisor({"echo": ECHO})
    command = [os.fsencode(word) for word in cmactor_cmd()] + [b"--socket", os.fsencode(sup.socket_path)] + args
    result = subprocess.run(command, capture_output=True, timeout=30)
    assert (result.returncode, result.stdout) == (1, b"")
    assert result.stderr.decode() == f"cmactor: ProgrammingError: {problem}\n"
    cur = sup.connect().cursor()
    cur.execute("getnext echo.kv")
    assert cur.fetchall() == [("default", "yes")]


def test_an_unexpected_exception_is_one_line_and_its_own_exit_status(supervisor):
    sup = supervisor({"echo": ECHO})
    sup.connect().cursor().execute("set echo.kv", {"key": "z", "value": "Zürich"})
    command = cmactor_cmd() + ["--socket", sup.socket_path, "get", "echo.kv", "key=z"]
    environ = {name: value for name, value in os.environ.items() if name != "CMACTOR_TRACEBACK"}
    ascii_only = dict(environ, PYTHONIOENCODING="ascii")  # stdout cannot write the value
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, env=ascii_only)
    assert result.returncode == cli_module.INTERNAL_ERROR == 70
    assert result.stderr.startswith(
        "cmactor: internal error: UnicodeEncodeError: 'ascii' codec can't encode character '\\xfc'"
    )
    assert result.stderr.endswith("; run it again with CMACTOR_TRACEBACK=1 in the environment to see the traceback\n")
    assert result.stderr.count("\n") == 1
    traced = subprocess.run(
        command, capture_output=True, text=True, timeout=30, env=dict(ascii_only, CMACTOR_TRACEBACK="1")
    )
    assert traced.returncode == 1 and "Traceback (most recent call last)" in traced.stderr
    assert traced.stderr.rstrip().splitlines()[-1].startswith("UnicodeEncodeError: 'ascii' codec")
