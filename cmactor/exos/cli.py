"""``exec_cli`` and ``exec_cli_async``: the EXOS calls that run CLI commands, for the
config manager's own commands.

On a switch these run any CLI command. Under cmactor only the config manager is
there to answer, so they run its commands and refuse every other one:

- ``debug cfgmgr show one MODULE.TABLE key=value ...``: a get of one row.
- ``debug cfgmgr show next [maximum-rows N] MODULE.TABLE key=value ...``: a getnext
  walk. Every param is one of the walk's index columns: its value is where the walk
  starts (the rows after it), ``key=None`` an open start, and each next call carries
  only those columns of the previous row. Without params the agent's declared
  ``index_columns`` carry the walk (else every field, as for any cmactor walk).
  ``maximum-rows N`` returns at most N rows; without it the walk stops at
  ``MAX_ROWS``, with the same "MORE" ending when the table goes on.
- ``save`` (or ``save configuration``): saves every module's config, as ``cmactor
  save`` does.

A show prints the original platform's JSON, on one line::

    {"class": TABLE, "module": MODULE, "data": [row, ...]}

Each row is the agent's fields (strings; null for None) plus ``"status"``: ``"MORE"``
when the agent has rows after it, ``"SUCCESS"`` for the last one. An error of the
request (unknown module or table, the agent's raise_error, ModuleUnavailable, ...)
is ``data``'s one row, ``{"status": "ERROR", "message": TEXT}`` (a walk that fails
partway shows none of its rows). A walk of no rows has ``"data": []``; a show one
whose agent set no fields answers one row with only ``"status"``. The status
replaces an agent field named "status". So a caller pages as EXOS scripts do: first
``name=None``, then ``name=<the last row's name>``, until a SUCCESS or ERROR row.

Commands are split as a shell splits them (``shlex``): quote a value that holds
spaces, ``name="a b"``. The value ``None``, quoted or not, always means None.
"""

import json
import shlex
import threading

from cmactor import cmfrontend
from cmactor.errors import Error
from cmactor.wire import protocol as P

# The first argument of an exec_cli_async callback: a block of a command's output,
# or the end of one command (EXOS names; one of each per command here).
CLI_EVENT_EXEC_REPLY = 1
CLI_EVENT_EXEC_DONE = 2

# Rows of one show next without maximum-rows, as a Cursor's default max_rows: a bound,
# never a hang, on an agent that calls more() forever.
MAX_ROWS = 100000

_SHOWS = (
    "'debug cfgmgr show one MODULE.TABLE key=value ...' or "
    "'debug cfgmgr show next [maximum-rows N] MODULE.TABLE key=value ...'"
)


class CLICommandError(Error, RuntimeError):
    """A command exec_cli could not run: not one cmactor runs, malformed, or failed
    (no supervisor to ask, a save it refused).

    EXOS's ``exos.api.CLICommandError``: a RuntimeError, which EXOS scripts catch
    around CLI calls, and a cmactor Error. The supervisor's own error, when there is
    one, is its ``__cause__``.
    """


def exec_cli(cmds, ignore_errors=False):
    """Run the config manager's commands ``cmds`` (a list of str; a single str is one
    command) in order and return their outputs joined with newlines.

    A command that cannot run raises CLICommandError naming it, and the ones after it
    do not run; with ``ignore_errors`` its output is ``"Error: <why>"`` and the next
    one runs. A show whose request fails answers an ERROR row: output, not a failure.
    One connection to the supervisor (cmfrontend's default socket: ``$CMACTOR_SOCKET``,
    set inside agents) serves the call; from an agent's action its requests carry the
    caller, as any request from there does.
    """
    outputs = []
    _run_all(_commands(cmds), ignore_errors, outputs.append)
    return "\n".join(outputs)


def exec_cli_async(cmds, callback, ignore_errors=False):
    """Run ``cmds`` as exec_cli does, in a new thread, and return that (started) thread.

    As on EXOS, ``callback(event, text)`` is called for each command with
    ``CLI_EVENT_EXEC_REPLY`` and its output, then with ``CLI_EVENT_EXEC_DONE`` and
    ``""``. A command that cannot run gets ``"Error: <why>"`` as its output; without
    ``ignore_errors`` no command after it runs. The thread is a daemon: an app's exit
    does not wait for it.
    """
    commands = _commands(cmds)
    if not callable(callback):
        raise TypeError(f"exec_cli_async(): callback must be callable, got {type(callback).__name__}")

    def answer(text):
        callback(CLI_EVENT_EXEC_REPLY, text)
        callback(CLI_EVENT_EXEC_DONE, "")

    def run():
        try:
            _run_all(commands, ignore_errors, answer)
        except CLICommandError as exc:
            answer(f"Error: {exc}")

    thread = threading.Thread(target=run, name="exec_cli_async", daemon=True)
    thread.start()
    return thread


def _commands(cmds):
    """``cmds`` as a list of command strings, or TypeError saying what they must be."""
    if isinstance(cmds, str):
        return [cmds]
    if not isinstance(cmds, (list, tuple)):
        raise TypeError(f"exec_cli(): cmds must be a list of command strings, got {type(cmds).__name__}")
    for cmd in cmds:
        if not isinstance(cmd, str):
            raise TypeError(f"exec_cli(): each command must be a str, got {type(cmd).__name__} {cmd!r}")
    return list(cmds)


def _run_all(commands, ignore_errors, emit):
    """``emit`` each command's output in order; see exec_cli for failures."""
    session = _Session()
    try:
        for line in commands:
            try:
                text = _run(line, session)
            except CLICommandError as exc:
                if not ignore_errors:
                    raise
                text = f"Error: {exc}"
            emit(text)
    finally:
        session.close()


class _Session:
    """The connection the commands of one exec_cli call share, opened when the first
    one needs it: commands cmactor refuses need no supervisor to say so."""

    def __init__(self):
        self._conn = None

    def connection(self, line):
        if self._conn is None or self._conn.closed:  # closed: lost during an earlier command
            try:
                self._conn = cmfrontend.connect()
            except Error as exc:
                raise CLICommandError(f"{line!r} needs the config manager: {exc}") from exc
        return self._conn

    def close(self):
        if self._conn is not None:
            self._conn.close()


def _run(line, session):
    """The output of one command, or CLICommandError."""
    try:
        words = shlex.split(line)
    except ValueError as exc:  # an unclosed quote, a trailing backslash
        raise CLICommandError(f'{line!r}: {exc}; quote a value that holds spaces as key="a b"') from None
    if words[:2] == ["debug", "cfgmgr"]:
        show = _parse_show(line, words)
        return _show(session.connection(line), *show)
    if words[:1] == ["save"]:
        if words[1:] not in ([], ["configuration"]):
            raise CLICommandError(
                f"{line!r}: cmactor saves to one file: 'save' (or 'save configuration') saves every "
                "module to the supervisor's config file; it takes no file or slot name"
            )
        return _save(session.connection(line), line)
    raise CLICommandError(
        f"{line!r}: not a command cmactor runs; cmactor runs only the config manager's commands, "
        f"{_SHOWS} and 'save' (other CLI commands need a switch)"
    )


def _parse_show(line, words):
    """(kind "one" or "next", module, table, params, maximum rows) of a debug cfgmgr line."""

    def malformed(problem):
        return CLICommandError(f"{line!r}: {problem}; expected {_SHOWS}")

    if words[2:3] != ["show"] or words[3:4] not in (["one"], ["next"]):
        raise malformed("cmactor runs only 'debug cfgmgr show one' and 'debug cfgmgr show next'")
    kind, rest = words[3], words[4:]
    limit = MAX_ROWS
    if rest[:1] == ["maximum-rows"]:
        if kind == "one":
            raise malformed("maximum-rows belongs to show next (show one answers one row)")
        count = rest[1] if len(rest) > 1 else ""
        if not (count.isascii() and count.isdigit() and 1 <= int(count) <= MAX_ROWS):
            raise malformed(f"maximum-rows takes a whole number from 1 to {MAX_ROWS}, got {count!r}")
        limit, rest = int(count), rest[2:]
    if not rest:
        raise malformed("MODULE.TABLE is missing")
    module, dot, table = rest[0].partition(".")
    if not (dot and P.NAME_RE.match(module) and P.NAME_RE.match(table)):
        raise malformed(f"{rest[0]!r} is not MODULE.TABLE (names of letters, digits and '_')")
    params = {}
    for pair in rest[1:]:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise malformed(f"{pair!r} is not key=value")
        if key in params:
            raise malformed(f"{key!r} is given twice")
        params[key] = None if value == "None" else value
    return kind, module, table, params, limit


def _show(conn, kind, module, table, params, limit):
    """The JSON text a show prints; an error of its request becomes its ERROR row."""
    data = []
    cur = conn.cursor()
    try:
        if kind == "one":
            cur.execute(f"getone {module}.{table}", params)
            rows = [row.field_values for row in cur.iterrow()]
            data.append({**(rows[0] if rows else {}), "status": "SUCCESS"})
        else:
            # Every param names an index column: a value only starts the walk.
            cur.index = list(params) or None
            cur.limit = cur.max_rows = limit
            cur.execute(f"getnext {module}.{table}", params)
            data = [{**row.field_values, "status": "MORE"} for row in cur.iterrow()]
            if data and not cur.more:
                data[-1]["status"] = "SUCCESS"
    except Error as exc:
        data.append({"status": "ERROR", "message": str(exc)})
    return json.dumps({"class": table, "module": module, "data": data})


def _save(conn, line):
    try:
        saved = conn.request({"op": "save"})["saved"]
    except Error as exc:
        raise CLICommandError(f"{line!r} failed: {exc}") from exc
    modules = ", ".join(saved["modules"]) or "no module"
    return f"Configuration saved: {saved['rows']} rows of {modules} to {saved['file']}."
