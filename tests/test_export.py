"""Config as commands: `cmactor export` prints the live config as set lines, `cmactor apply`
replays them; round trips on the switch demo, and every kind of bad input."""

import concurrent.futures
import io
import json
import os
import shlex
import subprocess
import sys
import time

import pytest
from fakes import SaveSetup
from helpers import agent
from hypothesis import example, given, settings, strategies as st
from processes import cmactor_cmd

import cmactor
from cmsupervisor.cli import program as cli
from cmsupervisor.cli.commands import Command, CommandError, export_line, parse, split_line
from cmsupervisor.persistence import store
from cmsupervisor.supervision.states import READY, RESTARTING

SWITCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "switch")
SWITCH_AGENTS = {name: os.path.join(SWITCH, f"{name}.py:main") for name in ("ports", "vlan", "stats")}
ECHO = agent("echo.py:main")

# Values no shell-naive format would carry: spaces, both quotes, '=', non-ASCII text,
# a newline, a tab, a backslash, a comment sign, the text None, nothing at all.
DESCRIPTIONS = {
    "1": "two  spaces, 'single' and \"double\" quotes",
    "2": "a=b=c",
    "3": "Zürich ☃",
    "4": "first line\nsecond line",
    "5": "tab\there \\ back#slash",
    "6": "None",
    "7": "",
}


def cmactor_cli(*args, input=None):
    """The cmactor command in its own process, bytes in and out, its stdout ASCII: an
    export is UTF-8 whatever the locale says."""
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    return subprocess.run(cmactor_cmd() + list(args), input=input, capture_output=True, timeout=30, env=env)


def run(capsys, *argv, stdin=None):
    """cli.main in this process: (exit status, stdout, stderr)."""
    saved = sys.stdin
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()))
    try:
        status = cli.main(list(argv))
    finally:
        sys.stdin = saved
    out, err = capsys.readouterr()
    return status, out, err


def configure_switch(sup):
    cur = sup.connect().cursor()
    for port, description in DESCRIPTIONS.items():
        cur.execute("set ports.port", {"name": port, "description": description})
    cur.execute("set ports.port", {"name": "8", "speed": "100", "enabled": "0"})
    for name, tag in (("v 10 'it''s'", "10"), ("Zürich ☃", "20"), ('say "hi"=x', "30")):
        cur.execute("set vlan.vlan", {"name": name, "tag": tag})
    cur.execute("set vlan.member", {"vlan": "v 10 'it''s'", "port": "3"})
    cur.execute("set vlan.member", {"vlan": "Zürich ☃", "port": "8"})


def test_export_then_apply_on_a_fresh_switch_gives_back_the_same_config(tmp_path, supervisor):
    source = supervisor(SWITCH_AGENTS, state_dir=tmp_path / "a")
    configure_switch(source)
    exported = cmactor_cli("--socket", source.socket_path, "export")
    assert exported.returncode == 0, exported.stderr
    text = exported.stdout.decode("utf-8")
    lines = text.splitlines()
    # Dependencies first (vlan depends on ports), tables in persistent_list order, rows in walk order.
    assert (
        lines[0]
        == "set ports.port name=1 enabled=1 speed=1000 description='two  spaces, '\"'\"'single'\"'\"' and \"double\" quotes'"
    )
    assert lines[2] == "set ports.port name=3 enabled=1 speed=1000 description='Zürich ☃'"
    assert "set ports.port name=6 enabled=1 speed=1000 description=None" in lines
    assert "set ports.port name=7 enabled=1 speed=1000 description=''" in lines
    tables = [line.split()[1] for line in lines if line.startswith("set ")]
    assert tables == sorted(tables, key=["ports.port", "vlan.vlan", "vlan.member"].index)
    assert set(tables) == {"ports.port", "vlan.vlan", "vlan.member"}
    assert "stats" not in text  # no persistent tables
    (tmp_path / "switch.conf").write_bytes(exported.stdout)
    assert source.export() == {
        name: rows
        for name, rows in json.loads(
            cmactor_cli("--socket", source.socket_path, "--format", "json", "export").stdout
        ).items()
    }
    source.stop()

    target = supervisor(SWITCH_AGENTS, state_dir=tmp_path / "b")
    applied = cmactor_cli("--socket", target.socket_path, "apply", str(tmp_path / "switch.conf"))
    assert applied.returncode == 0, applied.stderr
    assert (
        applied.stdout.decode() == f"applied {len(lines) - 1} commands from {tmp_path / 'switch.conf'}\n"
    )  # one value spans 2 lines
    again = cmactor_cli("--socket", target.socket_path, "export")
    assert again.stdout == exported.stdout
    cur = target.connect().cursor()
    cur.execute("get ports.port", {"name": "4"})
    assert cur.fetchone()[3] == "first line\nsecond line"


def test_export_writes_nothing_and_leaves_unsaved_changes_unsaved(supervisor):
    sup = supervisor({"echo": ECHO})
    cur = sup.connect().cursor()
    cur.execute("set echo.kv", {"key": "saved", "value": "1"})
    sup.save()
    config = os.path.join(sup.state_dir, "config.jsonl")
    journal = os.path.join(sup.state_dir, "journal", "echo.jsonl")
    with open(config, "rb") as f:
        saved = f.read()
    cur.execute("set echo.kv", {"key": "later", "value": "2"})
    journaled = os.path.getsize(journal)
    assert sup.export() == {
        "echo": {
            "kv": [{"key": "default", "value": "yes"}, {"key": "later", "value": "2"}, {"key": "saved", "value": "1"}]
        }
    }
    with open(config, "rb") as f:
        assert f.read() == saved
    assert os.path.getsize(journal) == journaled
    assert sup.status()["echo"]["unsaved"] is True
    # It ran the save walk, and the audit log says who exported.
    cur.execute("get echo.events")
    assert cur.fetchone()[0].endswith("event_save_start,event_save_complete,event_save_start,event_save_complete")
    with open(os.path.join(sup.state_dir, "audit.log")) as f:
        assert json.loads(f.readlines()[-1])["op"] == "export"


def test_export_names_modules_in_dependency_order_and_refuses_unknown_or_not_ready_ones(supervisor, capsys):
    sup = supervisor(
        {"later": {"entry": ECHO, "env": {"ECHO_DEPS": "first"}}, "first": {"entry": ECHO, "max_restarts": 0}}
    )
    assert list(sup.export(["later", "first"])) == ["first", "later"]
    with pytest.raises(cmactor.ProgrammingError, match="unknown module 'nope'; this supervisor runs: first, later"):
        sup.export(["later", "nope"])
    status, out, err = run(capsys, "--socket", sup.socket_path, "export", "nope")
    assert (status, out) == (1, "")
    assert err == "cmactor: ProgrammingError: unknown module 'nope'; this supervisor runs: first, later\n"

    with pytest.raises(cmactor.OperationalError):
        sup.connect().cursor().execute("set first.exit", {"code": "3"})  # max_restarts 0: FAILED
    status, out, err = run(capsys, "--socket", sup.socket_path, "export")
    assert (status, out) == (1, "")
    assert err.startswith("cmactor: OperationalError: cannot export module 'first': it is FAILED (")
    assert err.endswith(
        "not READY, so it has no live config to walk; name the modules to export, or `cmactor restart first` to bring it back\n"
    )
    assert list(sup.export(["later"])) == ["later"]


def test_a_bad_export_request_is_refused_naming_what_is_wrong(supervisor):
    sup = supervisor({"echo": ECHO})
    with sup.connect() as conn:
        with pytest.raises(
            cmactor.ProgrammingError, match="export: 'modules' must be a list of module names or nil, got 'echo'"
        ):
            conn.request({"op": "export", "modules": "echo"})
        with pytest.raises(cmactor.ProgrammingError, match=r"export: bad module name '\.\./x'"):
            conn.request({"op": "export", "modules": ["../x"]})


VLANS = """\
# vlans for the lab
set vlan.vlan name=a tag=20

set vlan.vlan name=b tag=4095
set vlan.vlan name=c tag=30
setop vlan.nosuch action=delete
"""


def vlans(sup):
    cur = sup.connect().cursor()
    cur.execute("getnext vlan.vlan")
    return sorted(name for name, _ in cur.fetchall())


def test_apply_stops_at_the_first_refused_line_saying_which_lines_went_in(tmp_path, supervisor, capsys):
    sup = supervisor(SWITCH_AGENTS)
    path = tmp_path / "vlans.conf"
    path.write_text(VLANS)
    status, out, err = run(capsys, "--socket", sup.socket_path, "apply", str(path))
    assert (status, out) == (1, "")
    assert err == (
        f"cmactor: {path}: line 4 failed: DatabaseError: vlan b: tag must be a number from 1 to 4094, got '4095'; "
        "applied line 2 (1 command); nothing after line 4 was sent\n"
    )
    assert vlans(sup) == ["a", "default"]


def test_apply_keep_going_reports_every_failure_and_applies_the_rest(tmp_path, supervisor, capsys):
    sup = supervisor(SWITCH_AGENTS)
    path = tmp_path / "vlans.conf"
    path.write_text(VLANS)
    status, out, err = run(capsys, "--socket", sup.socket_path, "apply", "--keep-going", str(path))
    assert (status, out) == (1, "")
    assert err.splitlines() == [
        f"cmactor: {path}: line 4 failed: DatabaseError: vlan b: tag must be a number from 1 to 4094, got '4095'",
        f"cmactor: {path}: line 6 failed: ProgrammingError: module 'vlan' has no table 'nosuch' "
        "(no nosuch_get/_set/_setop method); its tables: member, vlan",
        f"cmactor: {path}: 2 of 4 commands applied; 2 failed (lines 4, 6)",
    ]
    assert vlans(sup) == ["a", "c", "default"]


def test_apply_refuses_a_malformed_file_whole_naming_each_bad_line(tmp_path, supervisor, capsys):
    sup = supervisor(SWITCH_AGENTS)
    path = tmp_path / "bad.conf"
    path.write_text(
        "set vlan.vlan name=fine tag=40\n"
        "sett vlan.vlan name=x\n"
        "set vlan name=x\n"
        "set\n"
        "set vlan.vlan name\n"
        "set vlan.vlan name=x name=y\n"
        "set vlam.vlan name=x tag=1\n"
        "set vlan.vlan name=x tag=1 trailing\\\n"
        "set vlan.vlan name='never closed\n"
        "set vlan.vlan name=y tag=2\n"
    )
    status, out, err = run(capsys, "--socket", sup.socket_path, "apply", "--keep-going", str(path))
    assert (status, out) == (1, "")
    syntax = "a line is set|setop MODULE.TABLE key=value ..."
    assert err.splitlines() == [
        f"cmactor: {path} line 2: unknown op 'sett'; {syntax}",
        f"cmactor: {path} line 3: 'vlan' is not MODULE.TABLE (two names of letters, digits and '_' joined by a dot); {syntax}",
        f"cmactor: {path} line 4: set names no MODULE.TABLE; {syntax}",
        f"cmactor: {path} line 5: 'name' is not key=value; {syntax}",
        f"cmactor: {path} line 6: key 'name' is given twice",
        f"cmactor: {path} line 8: the line ends with a backslash, which escapes nothing",
        f"cmactor: {path} line 9: a quote opened on this line is never closed",
        f"cmactor: ProgrammingError: {path}: 7 bad lines; nothing was applied (fix the file and apply it again)",
    ]
    # A module the supervisor does not run is found before anything is sent, too.
    path.write_text("set vlan.vlan name=fine tag=40\nset vlam.vlan name=x tag=1\n")
    status, out, err = run(capsys, "--socket", sup.socket_path, "apply", str(path))
    assert (status, out) == (1, "")
    assert err.splitlines() == [
        f"cmactor: {path} line 2: unknown module 'vlam'; the supervisor runs: ports, stats, vlan",
        f"cmactor: ProgrammingError: {path}: 1 bad line; nothing was applied (fix the file and apply it again)",
    ]
    assert vlans(sup) == ["default"]
    path.write_bytes(b"set vlan.vlan name=ok tag=5\nset vlan.vlan name=\xff tag=6\n")
    status, out, err = run(capsys, "--socket", sup.socket_path, "apply", str(path))
    assert (status, err) == (
        1,
        f"cmactor: ProgrammingError: {path} line 2: not UTF-8 text (invalid start byte); cmactor export writes UTF-8\n",
    )
    status, out, err = run(capsys, "--socket", sup.socket_path, "apply", str(tmp_path / "missing.conf"))
    assert (status, err) == (
        1,
        f"cmactor: OperationalError: cannot read {tmp_path / 'missing.conf'}: No such file or directory\n",
    )
    assert vlans(sup) == ["default"]


def test_apply_reads_stdin_and_runs_setops(supervisor, capsys):
    sup = supervisor(SWITCH_AGENTS)
    commands = (
        "set vlan.vlan name=tmp tag=7\nsetop vlan.vlan action=delete name=tmp\nsetop ports.port action=disable_all\n"
    )
    status, out, err = run(capsys, "--socket", sup.socket_path, "apply", "-", stdin=commands)
    assert (status, out) == (0, "applied 3 commands from <stdin>\n")
    assert err.splitlines()[0] == "port 1: enabled=0"  # notify_cli text, on stderr as for cmactor setop
    assert vlans(sup) == ["default"]


def test_parse_counts_lines_across_quoted_newlines_and_skips_comments():
    text = "# header\n\nset a.t k='one\ntwo\nthree' x=1\n  # indented comment\nsetop a.t action=go\r\n"
    assert parse(text) == (
        [
            Command(3, "set", "a", "t", {"k": "one\ntwo\nthree", "x": "1"}),
            Command(7, "setop", "a", "t", {"action": "go"}),
        ],
        [],
    )


def test_export_refuses_a_field_name_that_cannot_be_key_value():
    with pytest.raises(
        Exception, match=r"module 'm' table 't' has a field named 'a=b', which cannot be written as key=value"
    ):
        export_line("m", "t", {"a=b": "1"})
    assert export_line("m", "t", {"k": None, "v": "1"}) == "set m.t v=1"  # None: not given


keys = st.text(min_size=1).filter(lambda key: "=" not in key)


@given(st.dictionaries(keys, st.text(), max_size=5))
def test_any_row_reads_back_exactly(row):
    (command,), malformed = parse(export_line("mod", "tbl", row) + "\n")
    assert malformed == [] and command.params == row


# Any character, lone surrogates too (text a client decoded from bytes that were not
# UTF-8), with the ones that quoting is about drawn half the time.
QUOTING = " \t\r\n'\"\\=#$`\x00\x1b\x7f\x85\u2028\udcff"
ANY_CHAR = st.one_of(st.sampled_from(QUOTING), st.characters(exclude_categories=()))
LINE_CHAR = st.one_of(
    st.sampled_from(QUOTING.replace("\n", "")), st.characters(exclude_categories=(), exclude_characters="\n")
)
any_key = st.text(ANY_CHAR, min_size=1).filter(lambda key: "=" not in key)


@settings(max_examples=300)
@given(st.lists(st.dictionaries(any_key, st.text(ANY_CHAR), max_size=4), max_size=4))
def test_a_file_of_rows_of_any_text_reads_back_row_by_row_with_their_line_numbers(rows):
    lines = [export_line("mod", "tbl", row) for row in rows]
    found, malformed = parse("".join(line + "\n" for line in lines))
    assert malformed == []
    assert [command.params for command in found] == rows
    starts = [1 + sum(line.count("\n") + 1 for line in lines[:n]) for n in range(len(lines))]
    assert [command.line for command in found] == starts


SHLEX_ERRORS = {
    "No closing quotation": "a quote opened on this line is never closed",
    "No escaped character": "the line ends with a backslash, which escapes nothing",
}


@settings(max_examples=500)
@given(st.text(LINE_CHAR))
@example("a\\")
@example("'a\\' b")
@example('"a\\"')
@example('"a\\\\" "\\x" "\\\'" \'\\"\' \\\\ \\a')
@example("'' \"\" a''b \\ \t\r x")
@example("k='one' 'two'\"three\"four\\ five")
def test_a_line_splits_into_the_words_shlex_split_gives(line):
    try:
        expected = shlex.split(line)
    except ValueError as exc:
        expected = SHLEX_ERRORS[str(exc)]
    try:
        words = split_line(line)
    except CommandError as exc:
        words = str(exc)
    assert words == expected


def test_a_20_mib_line_is_read_in_linear_time():
    # Every "'" of the value is written '"'"': the line is pieces of quoted text all along.
    value = ('it\'s a "quoted" \\ path, Zürich; ' * 700_000)[: 20 * 1024 * 1024]
    line = export_line("m", "t", {"k": value})
    started = time.monotonic()
    (command,), malformed = parse(line + "\n")
    assert time.monotonic() - started < 30  # under 1 s here; with shlex.split it never finished
    assert malformed == [] and command.params == {"k": value}


def unclosed_quote_file():
    """1000 commands for echo.kv: a quote never closed on line 3, bad lines at 500 and 1000."""
    lines = [f"set echo.kv key=k{n} value=v{n}" for n in range(1, 1001)]
    lines[2] = "set echo.kv key='never closed"
    lines[499] = "sett echo.kv key=x"
    lines[999] = "set echo.kv novalue"
    return "\n".join(lines) + "\n"


UNCLOSED_QUOTE_PROBLEMS = [
    (3, "a quote opened on this line is never closed"),
    (500, "unknown op 'sett'; a line is set|setop MODULE.TABLE key=value ..."),
    (1000, "'novalue' is not key=value; a line is set|setop MODULE.TABLE key=value ..."),
]


def test_a_quote_never_closed_hides_no_other_bad_line():
    started = time.monotonic()
    found, malformed = parse(unclosed_quote_file())
    assert time.monotonic() - started < 10  # a few ms here; shlex re-split the growing text for 15 s
    assert malformed == UNCLOSED_QUOTE_PROBLEMS
    assert [command.line for command in found] == [n for n in range(1, 1001) if n not in (3, 500, 1000)]


def test_after_a_quote_never_closed_each_line_is_read_on_its_own():
    text = (
        "set a.t k='one\n"
        "two' v='three\n"  # the quote that closes is line 1's; line 2's never is
        "set a.t k=1\n"
        'set a.t k="x\n'  # would go on to line 5 before line 2's quote was found unclosed
        'y"\n'
        "set a.t k=2\n"
    )
    found, malformed = parse(text)
    assert malformed == [
        (1, "a quote opened on line 2 is never closed"),
        (4, "a quote opened on this line is never closed"),
        (5, "a quote opened on this line is never closed"),
    ]
    assert [(command.line, command.params) for command in found] == [(3, {"k": "1"}), (6, {"k": "2"})]
    found, malformed = parse("set a.t k='one\ntwo' v=\\\nset a.t k=3\n")
    assert malformed == [(1, "line 2 ends with a backslash, which escapes nothing")]
    assert found == [Command(3, "set", "a", "t", {"k": "3"})]


def test_apply_reports_every_bad_line_after_a_quote_never_closed_and_applies_nothing(tmp_path, supervisor):
    sup = supervisor({"echo": ECHO})
    path = tmp_path / "kv.conf"
    path.write_text(unclosed_quote_file())
    applied = cmactor_cli("--socket", sup.socket_path, "apply", str(path))
    assert (applied.returncode, applied.stdout) == (1, b"")
    assert applied.stderr.decode().splitlines() == [
        f"cmactor: {path} line {n}: {problem}" for n, problem in UNCLOSED_QUOTE_PROBLEMS
    ] + [f"cmactor: ProgrammingError: {path}: 3 bad lines; nothing was applied (fix the file and apply it again)"]
    cur = sup.connect().cursor()
    cur.execute("getnext echo.kv")
    assert cur.fetchall() == [("default", "yes")]


def test_an_export_waits_for_the_save_under_way_and_changes_nothing_it_walks(tmp_path):
    s = SaveSetup(
        tmp_path, {"ports": (READY, ["port"], []), "vlan": (READY, ["vlan"], ["ports"]), "plain": (READY, [], [])}
    )
    try:
        saved, exported = concurrent.futures.Future(), concurrent.futures.Future()
        s.saver.request(saved, "alice")
        s.saver.export(exported, "bob", ["vlan", "plain", "ports"])
        s.walked("ports", b"{}")
        s.walked("vlan", b"{}")
        s.loop.pump()  # the save's file is written; then the export walks, dependencies first
        assert saved.result(timeout=5)["modules"] == ["ports", "vlan"]
        written = store.read(s.path)
        vlan = s.modules["vlan"]
        vlan.unsaved = True  # a change after the save
        assert s.modules["ports"].saving and s.modules["ports"].channel.saves[-1] == (3, ["port"])
        s.walked("ports", b'{"port":[1]}')
        assert vlan.saving and vlan.channel.saves[-1] == (4, ["vlan"])
        s.walked("vlan", b'{"vlan":[2]}')
        assert exported.result(timeout=5) == [["ports", b'{"port":[1]}'], ["vlan", b'{"vlan":[2]}']]
        assert s.modules["plain"].channel.saves == []  # no persistent tables: nothing to walk
        assert (
            vlan.unsaved is True and store.read(s.path) == written and vlan.journal.dropped == [(2, 0)]
        )  # by the save alone
        assert [(user, op, outcome) for user, op, *_, outcome in s.audit.records] == [
            ("alice", "save", "ok"),
            ("bob", "export", "ok"),
        ]
        assert not s.saver.running and s.router.released == ["ports", "vlan", "ports", "vlan"]
    finally:
        s.saver.shutdown()


def test_an_export_of_a_module_that_is_not_ready_fails_naming_it(tmp_path):
    s = SaveSetup(tmp_path, {"ports": (READY, ["port"], []), "vlan": (RESTARTING, ["vlan"], [])})
    try:
        with pytest.raises(cmactor.ProgrammingError, match="unknown module 'nope'; this supervisor runs: ports, vlan"):
            s.saver.export(concurrent.futures.Future(), "bob", ["nope"])
        with pytest.raises(cmactor.OperationalError, match="cannot export module 'vlan': it is RESTARTING, not READY"):
            s.saver.export(concurrent.futures.Future(), "bob", None)
        saved, exported = concurrent.futures.Future(), concurrent.futures.Future()
        s.saver.request(saved, "alice")
        s.saver.export(exported, "bob", ["ports"])
        s.modules["ports"].state = RESTARTING  # its worker died after its save walk, before the export's turn
        s.walked("ports", b"{}")
        s.loop.pump()
        with pytest.raises(cmactor.OperationalError, match="cannot export module 'ports': it is RESTARTING, not READY"):
            exported.result(timeout=5)
        assert not s.saver.running
    finally:
        s.saver.shutdown()
