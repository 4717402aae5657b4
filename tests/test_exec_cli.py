"""exec_cli and exec_cli_async: the config manager's own commands, against a real
supervisor with real worker processes (agents in agents/cli_agents.py)."""

import json
import re
import threading

import pytest
from helpers import agent

import cmactor
from cmactor.exos.cli import (
    CLI_EVENT_EXEC_DONE,
    CLI_EVENT_EXEC_REPLY,
    MAX_ROWS,
    CLICommandError,
    exec_cli,
    exec_cli_async,
)

CATALOG = agent("cli_agents.py:main")
ITEMS = [f"item{i:02d}" for i in range(25)]
ROWS = f"maximum-rows takes a whole number from 1 to {MAX_ROWS}"
SHOWS = "expected 'debug cfgmgr show one MODULE.TABLE key=value ...' or 'debug cfgmgr show next [maximum-rows N]"


@pytest.fixture
def cat(supervisor, monkeypatch):
    """A supervisor serving module "cat", which exec_cli in this process talks to."""
    sup = supervisor({"cat": CATALOG})
    monkeypatch.setenv("CMACTOR_SOCKET", sup.socket_path)
    return sup


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No supervisor at $CMACTOR_SOCKET: what fails before connecting needs none."""
    path = str(tmp_path / "none.sock")
    monkeypatch.setenv("CMACTOR_SOCKET", path)
    return path


def show(cmd):
    """The data rows of one show command."""
    reply = json.loads(exec_cli([cmd]))
    assert set(reply) == {"class", "module", "data"}
    return reply["data"]


def statuses(data):
    return [row["status"] for row in data]


def test_show_one_prints_the_originals_json_on_one_line(cat):
    output = exec_cli(["debug cfgmgr show one cat.item name=item03"])
    assert "\n" not in output
    assert json.loads(output) == {
        "class": "item",
        "module": "cat",
        "data": [{"name": "item03", "size": "0", "status": "SUCCESS"}],
    }
    # A single str is one command; values are split as a shell splits them.
    assert json.loads(exec_cli("debug cfgmgr show one cat.pair group=\"a b\" member='y z'"))["data"] == [
        {"group": "a b", "member": "y z", "status": "SUCCESS"}
    ]


def test_show_next_walks_the_table_with_the_params_as_its_index(cat):
    data = show("debug cfgmgr show next cat.item name=None")
    assert [row["name"] for row in data] == ITEMS
    assert statuses(data) == ["MORE"] * 24 + ["SUCCESS"]
    # A value is where the walk starts. Only the index (name) rides along: had the
    # walk carried every field, item_get would take size as a filter and skip rows.
    assert [row["name"] for row in show("debug cfgmgr show next cat.item name=item20")] == ITEMS[21:]
    # No params: the agent's declared index carries the walk.
    assert [(row["group"], row["member"]) for row in show("debug cfgmgr show next cat.pair")] == [
        ("a b", "x"),
        ("a b", "y z"),
        ("c", "1"),
        ("c", "2"),
        ("c", "3"),
    ]


def test_key_none_is_an_open_start_and_quoted_values_start_a_walk(cat):
    assert [row["member"] for row in show("debug cfgmgr show next cat.pair group=c member=None")] == ["1", "2", "3"]
    after = show('debug cfgmgr show next cat.pair group="a b" member=x')
    assert [(row["group"], row["member"]) for row in after] == [("a b", "y z"), ("c", "1"), ("c", "2"), ("c", "3")]
    assert statuses(after) == ["MORE", "MORE", "MORE", "SUCCESS"]
    assert show("debug cfgmgr show next cat.item name=item24") == []  # nothing after the last row


@pytest.mark.parametrize("size, pages", [(10, [10, 10, 5]), (5, [5] * 5), (25, [25]), (1, [1] * 25)])
def test_maximum_rows_pages_the_way_exos_scripts_loop(cat, size, pages):
    seen, got, start = [], [], "None"
    while True:
        data = show(f"debug cfgmgr show next maximum-rows {size} cat.item name={start}")
        got.append(len(data))
        seen += [row["name"] for row in data]
        assert statuses(data)[:-1] == ["MORE"] * (len(data) - 1)
        if data[-1]["status"] != "MORE":
            break
        start = data[-1]["name"]  # the EXOS loop: pass the last row's key back
    assert got == pages
    assert seen == ITEMS  # every row exactly once
    assert data[-1]["status"] == "SUCCESS"


def test_request_errors_are_error_rows(supervisor, monkeypatch):
    sup = supervisor({"cat": CATALOG, "x": agent("broken.py:raises")}, start=False)
    sup.start(strict=False)
    monkeypatch.setenv("CMACTOR_SOCKET", sup.socket_path)
    expected = {
        "debug cfgmgr show one cat.nosuch": "module 'cat' has no table 'nosuch'",
        "debug cfgmgr show next nosuch.item name=None": "unknown module 'nosuch'",
        "debug cfgmgr show one cat.fail": "fail refuses every request",
        "debug cfgmgr show next cat.fail": "fail refuses every request",
        "debug cfgmgr show one cat.item name=item99": "no item 'item99'",
        "debug cfgmgr show one x.kv": "module 'x' is quarantined (FAILED)",
    }
    for cmd, message in expected.items():
        data = show(cmd)
        assert len(data) == 1 and data[0]["status"] == "ERROR", (cmd, data)
        assert message in data[0]["message"], (cmd, data)


def test_save_saves_and_says_so(cat):
    with cat.connect() as conn:
        conn.cursor().execute("set cat.pair", {"group": "d", "member": "9"})
    assert cat.status()["cat"]["unsaved"] is True
    output = exec_cli(["save"])
    assert output.startswith("Configuration saved: 6 rows of cat to ") and output.endswith("config.jsonl.")
    assert cat.status()["cat"]["unsaved"] is False
    assert '"d"' in open(output.split(" to ")[1][:-1]).read()
    assert exec_cli(["save configuration"]).startswith("Configuration saved: ")  # EXOS's long form


@pytest.mark.parametrize("cmd", ["show vlan", "enable ospf", "debugcfgmgr show one cat.item", ""])
def test_a_command_cmactor_does_not_run_raises_naming_it(nowhere, cmd):
    with pytest.raises(CLICommandError) as raised:
        exec_cli([cmd])
    message = str(raised.value)
    assert message.startswith(f"{cmd!r}: not a command cmactor runs; cmactor runs only the config manager's commands")
    assert "'save' (other CLI commands need a switch)" in message
    # As EXOS scripts catch it, and as cmactor clients do.
    assert isinstance(raised.value, RuntimeError) and isinstance(raised.value, cmactor.Error)


@pytest.mark.parametrize(
    "cmd, problem",
    [
        ("debug cfgmgr show next", "MODULE.TABLE is missing"),
        ("debug cfgmgr show one item name=a", "'item' is not MODULE.TABLE"),
        ("debug cfgmgr show one cat.item.x", "'cat.item.x' is not MODULE.TABLE"),
        ("debug cfgmgr show next cat.item name", "'name' is not key=value"),
        ("debug cfgmgr show next cat.item =x", "'=x' is not key=value"),
        ("debug cfgmgr show one cat.item name=a name=b", "'name' is given twice"),
        ("debug cfgmgr show next maximum-rows ten cat.item", f"{ROWS}, got 'ten'"),
        ("debug cfgmgr show next maximum-rows 0 cat.item", f"{ROWS}, got '0'"),
        ("debug cfgmgr show next maximum-rows", f"{ROWS}, got ''"),
        (f"debug cfgmgr show next maximum-rows {MAX_ROWS + 1} cat.item", f"{ROWS}, got '{MAX_ROWS + 1}'"),
        ("debug cfgmgr show one maximum-rows 5 cat.item", "maximum-rows belongs to show next"),
        ("debug cfgmgr show dirty cat.item", "cmactor runs only 'debug cfgmgr show one' and 'debug cfgmgr show next'"),
        ("debug cfgmgr", "cmactor runs only 'debug cfgmgr show one' and 'debug cfgmgr show next'"),
    ],
)
def test_a_malformed_debug_cfgmgr_line_raises_naming_it_and_the_syntax(nowhere, cmd, problem):
    with pytest.raises(CLICommandError) as raised:
        exec_cli([cmd])
    assert str(raised.value).startswith(f"{cmd!r}: {problem}")
    assert SHOWS in str(raised.value)


def test_other_malformed_lines(nowhere):
    unclosed = 'debug cfgmgr show one cat.item name="a'
    with pytest.raises(CLICommandError, match=f"^{re.escape(repr(unclosed))}: No closing quotation; quote a value"):
        exec_cli([unclosed])
    with pytest.raises(CLICommandError, match=r"^'save configuration primary': cmactor saves to one file"):
        exec_cli(["save configuration primary"])
    with pytest.raises(TypeError, match="cmds must be a list of command strings, got int"):
        exec_cli(42)
    with pytest.raises(TypeError, match="each command must be a str, got bytes"):
        exec_cli([b"save"])
    assert exec_cli([]) == ""


def test_no_supervisor_is_a_failed_command_naming_the_socket(nowhere):
    with pytest.raises(CLICommandError) as raised:
        exec_cli(["debug cfgmgr show one cat.item name=item01"])
    message = str(raised.value)
    assert message.startswith("'debug cfgmgr show one cat.item name=item01' needs the config manager: ")
    assert f"cannot reach a cmactor supervisor at {nowhere}" in message and "cmactor run" in message
    assert isinstance(raised.value.__cause__, cmactor.OperationalError)


def test_ignore_errors_puts_the_error_in_the_output_and_goes_on(cat):
    output = exec_cli(
        ["show vlan", "debug cfgmgr show one cat.item name=item01", "debug cfgmgr show next", "save"],
        ignore_errors=True,
    )
    lines = output.split("\n")
    assert len(lines) == 4
    assert lines[0].startswith("Error: 'show vlan': not a command cmactor runs")
    assert json.loads(lines[1])["data"] == [{"name": "item01", "size": "1", "status": "SUCCESS"}]
    assert lines[2].startswith("Error: 'debug cfgmgr show next': MODULE.TABLE is missing")
    assert lines[3].startswith("Configuration saved: ")
    # Without it the first failure raises, and what follows does not run.
    with pytest.raises(CLICommandError, match="'enable ospf'"):
        exec_cli(["enable ospf", "save"])


def test_exec_cli_async_calls_back_per_command_as_exos_does(cat):
    events = []
    thread = exec_cli_async(
        ["debug cfgmgr show one cat.item name=item02", "enable ospf", "save"],
        lambda event, text: events.append((event, text, threading.current_thread())),
        ignore_errors=True,
    )
    assert isinstance(thread, threading.Thread) and thread.daemon
    thread.join(10)
    assert [event for event, _, _ in events] == [CLI_EVENT_EXEC_REPLY, CLI_EVENT_EXEC_DONE] * 3
    texts = [text for _, text, _ in events]
    assert json.loads(texts[0])["data"][0]["name"] == "item02"
    assert texts[2].startswith("Error: 'enable ospf': not a command cmactor runs")
    assert texts[4].startswith("Configuration saved: ")
    assert texts[1::2] == ["", "", ""]
    assert {where for _, _, where in events} == {thread}

    # Without ignore_errors a failed command gets its error as its output, and is the last.
    events.clear()
    exec_cli_async(["enable ospf", "save"], lambda event, text: events.append((event, text, None))).join(10)
    assert [(event, text.split(":")[0]) for event, text, _ in events] == [
        (CLI_EVENT_EXEC_REPLY, "Error"),
        (CLI_EVENT_EXEC_DONE, ""),
    ]
    with pytest.raises(TypeError, match="callback must be callable, got str"):
        exec_cli_async(["save"], "not a function")


def test_an_agent_action_runs_exec_cli_against_another_module(supervisor):
    sup = supervisor({"cat": CATALOG, "asker": CATALOG})
    with sup.connect() as conn:
        cur = conn.cursor()
        cur.execute("get asker.ask", {"cmd": "debug cfgmgr show next maximum-rows 2 cat.item name=item10"})
        output = json.loads(cur.fetchone()[0])
        assert output["data"] == [
            {"name": "item11", "size": "2", "status": "MORE"},
            {"name": "item12", "size": "0", "status": "MORE"},
        ]
        # A save walks every module on its serial lane: from asker's own serial lane it
        # would wait for itself, so it is refused at once; from the async lane it runs.
        with pytest.raises(cmactor.DatabaseError, match="a save asked for by asker would deadlock: asker → asker"):
            cur.execute("get asker.ask", {"cmd": "save"})
        cur.execute("get asker.aask", {"cmd": "save"})
        assert cur.fetchone()[0].startswith("Configuration saved: ")
