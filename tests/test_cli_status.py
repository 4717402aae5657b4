"""`cmactor status` as supervisorctl and systemctl show it, and a command line that never
breaks on data: each command run as an operator runs it, a real process writing to a
pipe or to a pseudo-terminal."""

import importlib.metadata
import io
import json
import os
import platform
import re
import stat
import sys

import pytest
from helpers import agent
from processes import Run, cli, on_terminal

from cmactor import errors
from cmsupervisor.cli import program
from cmsupervisor.cli.status import duration

ECHO = agent("echo.py:main")
MARKUP = "[red]uplink[/red] down [/bold] x :thumbs_up:"
SGR = re.compile(r"\x1b\[[0-9;]*m")  # the colours (and rich's styles) a terminal is sent


def visible(shown):
    """What a terminal shows of ``shown`` (its bytes), line by line: colours take no column."""
    return SGR.sub("", shown.decode()).splitlines()


def whole(pieces, text):
    """Whether ``pieces``, the lines ``text`` was wrapped into, are all of it, in order: a
    wrap drops the space it breaks at, and breaks a word longer than a line anywhere."""
    at = 0
    for piece in pieces:
        at = text.find(piece, at)
        if at < 0:
            return False
        at += len(piece)
    return "".join(pieces).replace(" ", "") == text.replace(" ", "")


@pytest.fixture
def mixed(supervisor, tmp_path):
    """A supervisor serving echo (READY), bad (FAILED: its entry raises, in words full of
    markup) and waits (WAITING_DEPS, on bad)."""
    failing = tmp_path / "failing.py"
    reasons = " ".join(f"reason{i}" for i in range(12))
    failing.write_text(f"def main():\n    raise ValueError({f'{MARKUP} {reasons}'!r})\n")
    sup = supervisor(
        {"echo": ECHO, "bad": f"{failing}:main", "waits": {"entry": ECHO, "env": {"ECHO_DEPS": "bad"}}}, start=False
    )
    sup.start(strict=False)
    return sup


def test_status_exits_as_supervisorctl_and_systemctl_do(mixed, tmp_path):
    socket = ("--socket", mixed.socket_path)
    every = cli(*socket, "status")
    assert every.returncode == program.EXIT_NOT_READY == 3, every.stderr
    assert sorted(line.split()[:2] for line in every.stdout.splitlines()[1:]) == [
        ["bad", "FAILED"],
        ["echo", "READY"],
        ["waits", "WAITING_DEPS"],
    ]
    ready = cli(*socket, "status", "echo")
    assert ready.returncode == 0, ready.stderr
    assert [line.split()[0] for line in ready.stdout.splitlines()] == ["module", "echo"]
    named = cli(*socket, "status", "waits", "echo", "waits")  # in the order named, each once
    assert named.returncode == 3
    assert [line.split()[0] for line in named.stdout.splitlines()] == ["module", "waits", "echo"]
    as_json = cli(*socket, "--format", "json", "status", "echo")
    assert as_json.returncode == 0 and list(json.loads(as_json.stdout)) == ["echo"]

    unknown = cli(*socket, "status", "echo", "nope")
    assert (unknown.returncode, unknown.stdout) == (program.EXIT_NO_SUCH_MODULE, "") and unknown.returncode == 4
    assert unknown.stderr == "cmactor: ProgrammingError: unknown module 'nope'; the supervisor runs: bad, echo, waits\n"
    two = cli(*socket, "status", "--format", "json", "x", "echo", "y")
    assert (two.returncode, two.stdout) == (4, "")
    assert two.stderr.startswith("cmactor: ProgrammingError: unknown modules 'x', 'y'; the supervisor runs:")

    gone = cli("--socket", tmp_path / "none.sock", "status")
    assert gone.returncode == 1 and gone.stderr.startswith("cmactor: OperationalError: cannot reach a cmactor")


def test_status_json_keeps_its_shape_with_the_histograms_behind_a_flag(supervisor):
    sup = supervisor({"echo": ECHO})
    sup.connect().cursor().execute("set echo.kv", {"key": "a", "value": "1"})  # a timed set, a journal fsync
    socket = ("--socket", sup.socket_path)
    plain = json.loads(cli(*socket, "status", "--format", "json").stdout)["echo"]
    full = json.loads(cli(*socket, "status", "--format", "json", "--histograms").stdout)["echo"]
    assert set(plain) == set(full) and set(plain["requests"]) == set(full["requests"])
    for op, timed in full["requests"].items():
        assert set(timed) == {"ok", "errors", "seconds"}
        seconds = timed["seconds"]
        assert seconds["buckets"][-1][1] <= seconds["count"]
        assert plain["requests"][op]["seconds"] == {"count": seconds["count"], "sum": seconds["sum"]}
    assert full["requests"]["set"]["seconds"]["count"] == 1 and full["journal_fsync"]["count"] >= 1
    assert "buckets" in full["journal_fsync"]
    assert plain["journal_fsync"] == {key: full["journal_fsync"][key] for key in ("count", "sum")}

    table = cli(*socket, "status", "--histograms")
    assert table.returncode == 2 and "--histograms goes with --format json" in table.stderr


def test_status_on_an_80_column_terminal_cuts_nothing_and_colours_only_states(mixed):
    socket = ("--socket", mixed.socket_path)
    entries = json.loads(cli(*socket, "status", "--format", "json").stdout)
    status, out, err = on_terminal(*socket, "status", columns=80)
    assert (status, err) == (3, b"")
    lines = visible(out)
    assert max(map(len, lines)) <= 80 and "…" not in "".join(lines), "\n".join(lines)
    rows, notes, module = {}, {}, None
    for line in lines[1:]:
        if line.startswith(" "):  # a note, under its module's row
            notes.setdefault(module, []).append(line.strip())
        else:
            module = line.split()[0]
            rows[module] = line.split()
    assert rows["echo"][:3] == ["echo", "READY", str(entries["echo"]["pid"])]
    assert rows["bad"][1] == "FAILED" and rows["waits"][:3] == ["waits", "WAITING_DEPS", str(entries["waits"]["pid"])]
    assert re.fullmatch(r"\d+s|\d+m\d+s", rows["echo"][4])  # uptime
    assert MARKUP in entries["bad"]["error"] and whole(notes["bad"], entries["bad"]["error"]), notes
    assert notes["waits"] == ["waiting on bad"] and "echo" not in notes
    for state, colour in (("READY", "32"), ("FAILED", "31"), ("WAITING_DEPS", "33")):
        assert f"\x1b[{colour}m{state}\x1b[0m".encode() in out
    assert SGR.sub("", out.decode()).count("\x1b") == 0  # nothing else is styled

    status, plain, _ = on_terminal(*socket, "status", columns=80, env={"NO_COLOR": "1"})
    assert status == 3 and b"\x1b" not in plain and visible(plain) == lines
    wide = visible(on_terminal(*socket, "status", columns=400)[1])
    assert wide[0].split()[-1] == "note" and wide[1:] == [line for line in wide[1:] if not line.startswith(" ")]

    piped = cli(*socket, "status")
    assert "\x1b" not in piped.stdout
    by_module = {line.split()[0]: line for line in piped.stdout.splitlines()}
    assert by_module["bad"].endswith("  " + entries["bad"]["error"])  # a row per line, whatever its length


def table_rows(lines):
    """{key: [the lines its value was wrapped into]} of a key/value table as a terminal
    shows it: rich's (cells between │), or cmactor's own (columns where the header's
    names begin)."""
    boxed = any("│" in line for line in lines)
    value_at = None if boxed else lines[0].index("value")
    rows, key = {}, None
    for line in lines if boxed else lines[1:]:
        if boxed:
            if "│" not in line:
                continue  # a rule, or the header
            _, name, value, _ = line.split("│")
        else:
            name, value = line[:value_at], line[value_at:]
        if name.strip():
            key = name.strip()
            rows[key] = []
        rows[key].append(value.strip())
    return rows


def test_values_full_of_markup_print_verbatim_on_an_80_column_terminal(supervisor):
    sup = supervisor({"echo": ECHO})
    cur = sup.connect().cursor()
    values = {
        "[/bold] x": "[red]uplink[/red]",
        "markup": MARKUP,
        "long": " ".join(f"word{i}" for i in range(40)),
        "unbroken": "x" * 150,
    }
    for key, value in values.items():
        cur.execute("set echo.kv", {"key": key, "value": value})
    status, out, err = on_terminal("--socket", sup.socket_path, "getnext", "echo.kv", columns=80)
    assert (status, err) == (0, b"")
    lines = visible(out)
    assert max(map(len, lines)) <= 80 and "…" not in "".join(lines), "\n".join(lines)
    shown = table_rows(lines)
    assert set(shown) == set(values) | {"default"}
    assert shown["[/bold] x"] == ["[red]uplink[/red]"] and shown["markup"] == [MARKUP]
    for key in ("long", "unbroken"):
        assert len(shown[key]) > 1 and whole(shown[key], values[key]), shown[key]


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self):
        return True


def test_a_table_without_rich_wraps_its_widest_cells_to_the_terminal(monkeypatch):
    for name in ("rich", "rich.console", "rich.table", "rich.text"):
        monkeypatch.setitem(sys.modules, name, None)  # import rich fails, as where it is not installed
    monkeypatch.setenv("COLUMNS", "40")
    value = " ".join(f"w{i}" for i in range(30))
    out = Terminal()
    program.print_table(["key", "value"], [["a", "x" * 50], ["b", value], ["c", "[/bold] x"]], out)
    lines = out.getvalue().splitlines()
    assert max(map(len, lines)) <= 40 and lines[0] == "key  value"
    shown = table_rows(lines)
    assert shown["c"] == ["[/bold] x"]
    assert whole(shown["a"], "x" * 50) and whole(shown["b"], value) and len(shown["b"]) > 1


def test_uptime_is_shown_in_its_two_largest_units():
    assert [duration(s) for s in (0, 42.9, 303, 3 * 3600 + 12 * 60 + 5, 2 * 86400 + 4 * 3600 + 59)] == [
        "0s",
        "42s",
        "5m3s",
        "3h12m",
        "2d4h",
    ]


@pytest.mark.parametrize(
    "args, refusal",
    [
        (["logs", "m", "-n", "3", "--format", "json"], "unrecognized arguments: --format json"),
        (["--format", "json", "logs", "m"], "--format is not an option of `cmactor logs`"),
        (["journal", "f.jsonl", "--format", "json"], "unrecognized arguments: --format json"),
        (["-c", "x.toml", "journal", "f.jsonl"], "-c/--config is not an option of `cmactor journal`"),
        (["apply", "f", "--format", "json"], "unrecognized arguments: --format json"),
        (["bench", "--socket", "s"], "unrecognized arguments: --socket s"),
        (["--user", "u", "bench"], "--user is not an option of `cmactor bench`"),
        (["run", "x.toml", "--user", "u"], "unrecognized arguments: --user u"),
        (["--socket", "s", "run", "x.toml"], "--socket is not an option of `cmactor run`"),
    ],
)
def test_a_command_refuses_the_options_it_does_not_honour(args, refusal):
    result = cli(*args)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("usage: cmactor") and f"error: {refusal}\n" in result.stderr


def test_version_names_the_distribution_and_python():
    result = cli("--version")
    assert result.returncode == 0 and result.stderr == ""
    assert re.fullmatch(
        rf"cmactor {re.escape(importlib.metadata.version('cmactor'))} from \S+ "
        rf"\(Python {re.escape(platform.python_version())}\)\n",
        result.stdout,
    )


COMMANDS = sorted(program.build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_describes_itself(command):
    result = cli(command, "--help")
    assert result.returncode == 0
    # Usage, then the description, then the arguments.
    description = result.stdout.split("\n\n")[1]
    assert not description.startswith(("positional arguments:", "options:")), result.stdout
    assert len(description.split()) >= 8, description


@pytest.mark.parametrize(
    "command",
    [
        ["get", "echo.kv", "key=a", "key=b"],
        ["getnext", "echo.kv", "key=None", "key=a"],
        ["set", "echo.kv", "key=a", "value=1", "key=b"],
    ],
)
def test_a_repeated_key_is_refused_as_apply_refuses_it(command, tmp_path):
    refused = cli("--socket", tmp_path / "none.sock", *command)  # refused before anything is sent
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == "cmactor: ProgrammingError: key 'key' is given twice\n"
    commands = tmp_path / "commands"
    commands.write_text(" ".join(["set", *command[1:]]) + "\n")
    applied = cli("--socket", tmp_path / "none.sock", "apply", commands)
    assert f"cmactor: {commands} line 1: key 'key' is given twice\n" in applied.stderr


NO_SUPERVISOR = ("--socket", "{tmp}/none.sock")


@pytest.mark.parametrize(
    "args, error",
    [
        ([*NO_SUPERVISOR, "get", "echo.kv", "novalue"], "ProgrammingError: parameter 'novalue' is not key=value"),
        ([*NO_SUPERVISOR, "status"], "OperationalError: cannot reach a cmactor supervisor at {tmp}/none.sock"),
        ([*NO_SUPERVISOR, "logs", "echo"], "OperationalError: cannot reach a cmactor supervisor"),
        (["journal", "{tmp}/echo.jsonl"], "OperationalError: {tmp}/echo.jsonl: no such file"),
        (["journal", "{tmp}/notes.txt"], "OperationalError: {tmp}/notes.txt is neither a journal"),
        (["apply", "{tmp}/missing"], "OperationalError: cannot read {tmp}/missing: No such file or directory"),
        (["apply", "{tmp}/bad"], "ProgrammingError: {tmp}/bad: 1 bad line; nothing was applied"),
    ],
)
def test_errors_are_one_line_in_the_documented_tree(args, error, tmp_path):
    (tmp_path / "bad").write_text("sett echo.kv key=a\n")
    (tmp_path / "notes.txt").write_text("")
    result = cli(*[arg.format(tmp=tmp_path) for arg in args], cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"cmactor: {error.format(tmp=tmp_path)}"), result.stderr
    assert last.split(":")[1].strip() in errors.__all__


def test_config_finds_the_supervisor_it_runs_with_another_state_dir(tmp_path):
    config = tmp_path / "cmactor.toml"
    config.write_text(f'[supervisor]\nstate_dir = "state"\n[agents.echo]\nentry = "{ECHO}"\n')
    pointer = tmp_path / ".cmactor.toml.socket"
    run = Run(config, "--state-dir", tmp_path / "elsewhere")
    try:
        assert pointer.read_text().startswith(str(tmp_path / "elsewhere"))
        assert stat.S_IMODE(os.stat(pointer).st_mode) == 0o600
        found = cli("-c", config, "status", "--format", "json")
        assert found.returncode == 0, found.stderr
        assert json.loads(found.stdout)["echo"]["state"] == "READY"
        assert cli("get", "echo.kv", "key=default", cwd=tmp_path).stdout.split() == ["key", "value", "default", "yes"]

        os.chmod(pointer, 0o622)  # another user could have written it: not to be believed
        refused = cli("-c", config, "status")
        assert refused.returncode == 1
        assert refused.stderr.startswith(f"cmactor: OperationalError: {pointer} names the socket of a supervisor")
        os.chmod(pointer, 0o600)
    finally:
        run.stop()
    assert run.proc.returncode == 0, run.text
    assert not pointer.exists()  # its run took it away


def test_config_reaches_the_running_supervisor_while_the_file_is_edited_for_a_reload(tmp_path):
    config = tmp_path / "cmactor.toml"
    config.write_text(f'[supervisor]\nstate_dir = "state"\n[agents.echo]\nentry = "{ECHO}"\n')
    run = Run(config)
    try:
        assert (tmp_path / ".cmactor.toml.socket").exists()
        # Half-way through an edit: a bad key elsewhere and a new state_dir, which applies
        # at the next start. The running supervisor is still the one -c finds.
        config.write_text(f'[supervisor]\nstate_dir = "state2"\n[agents.echo]\nentry = "{ECHO}"\npool_size = 0\n')
        found = cli("-c", config, "status", "--format", "json")
        assert found.returncode == 0, found.stderr
        assert json.loads(found.stdout)["echo"]["state"] == "READY"
        refused = cli("-c", config, "reload")
        assert refused.returncode == 1 and "pool_size: expected a whole number >= 1" in refused.stderr
    finally:
        run.stop()
    assert not (tmp_path / ".cmactor.toml.socket").exists()


def test_config_whose_socket_keys_are_wrong_is_one_line_naming_the_key(tmp_path):
    config = tmp_path / "cmactor.toml"
    config.write_text('[supervisor]\nstate_dir = 5\n[agents.echo]\nentry = "x:main"\n')
    result = cli("-c", config, "status")
    assert result.returncode == 1
    assert result.stderr == (
        f"cmactor: ConfigError: {config}: [supervisor].state_dir: expected a non-empty string, got 5\n"
    )
    checked = cli("check", config)  # the whole file, as run reads it
    assert checked.returncode == 1 and f"{config}:2: [supervisor].state_dir: expected a non-empty" in checked.stderr
    config.write_text("[supervisor\n")
    broken = cli("-c", config, "status")
    assert broken.returncode == 1 and broken.stderr.startswith(
        f"cmactor: ConfigError: config file {config} is not valid TOML"
    )
