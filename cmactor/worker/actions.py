"""Calling the agent: finding its actions, running them, the getnext walk, load and save.

An Actions knows one module's agent and name, and turns worker channel messages
(protocol's Req, Load, Save) into the agent's calls and their replies. It knows
nothing of sockets, threads or progress slots: the worker picks the thread each
call runs on, says whether that is the async lane (for ctx.is_async and the
caller tag), and gives it a ``send`` function for what must leave while the action
is still the caller: a request's reply and its notify_cli text.
"""

import json
import logging
import traceback

from cmactor.cmbackend import ActionStopped, CmContext, acting
from cmactor.errors import DatabaseError, DataError, ProgrammingError, to_wire
from cmactor.wire import protocol as P

# The worker's records, whichever of its files logs them: one logger name to filter on.
log = logging.getLogger("cmactor.worker")

SERIAL, ASYNC = "serial", "async"  # the lanes, as the caller of a request made from an action


class _FieldError(Exception):
    """The agent put something in ctx.fields that cannot cross the wire."""


class _EventFailed(Exception):
    """An agent event (load, save or default) raised or stopped; ``detail``: its traceback, if it raised."""

    def __init__(self, message, detail=None):
        super().__init__(message)
        self.detail = detail


class _SaveFailed(Exception):
    """A save walk could not produce the module's rows."""


class _WalkStuck(Exception):
    """A getnext call returned the row the previous call returned: the walk would repeat it forever."""

    def __init__(self, row):
        super().__init__(row)
        self.row = row


def _stuck_advice(table, index):
    """Why a walk of ``table`` with these index columns repeated a row, and the fix."""
    if index is None:
        return (
            f"it handed every field of the row back as params; make {table}_get return the row "
            "after the one its params name"
        )
    return (
        f"it handed back only the row's index columns {', '.join(index) or '(none)'}; name all of "
        f"the table's key columns (CmAgent.index_columns, add_index, Cursor.index, --index), or make "
        f"{table}_get go on from them"
    )


class _MissingIndex(Exception):
    """A walk was asked to go on after a row whose moving index column is ''."""

    def __init__(self, row, column):
        self.row = row
        self.column = column


def _row(fields):
    """ctx.fields as a wire row: str keys, str values, None kept as null."""
    if not isinstance(fields, dict):
        raise _FieldError(f"ctx.fields must be a dict, got {type(fields).__name__}")
    row = {}
    for key, value in fields.items():
        if type(key) is not str:
            raise _FieldError(f"field name {key!r} is a {type(key).__name__}, not a str")
        if value is None or type(value) is str:
            row[key] = value
            continue
        try:
            row[key] = str(value)
        except Exception as exc:
            raise _FieldError(f"field {key!r}: str() of its value raised {type(exc).__name__}: {exc}") from None
    return row


def error_reply(sid, exc_type, message):
    """The Reply that fails request ``sid`` with ``exc_type(message)`` at its client."""
    return P.Reply(sid, to_wire(exc_type, message), None, False)


def walk(method, params, vr, batch, after, index=None, match=None, blank_ends=False, **flags):
    """Run getnext calls back to back; return up to ``batch`` rows and whether more remain.

    The first call gets the caller's params. Each next call gets the caller's params
    with the previous row's index columns laid over them, where the row has them:
    ``index`` names those columns (None: every field of the row that is not None,
    for agents that declare no index). ``match`` names index columns held at their
    param value: the walk ends before the first row whose value differs (a filtered
    walk, as exos_dbapi sends). ``after`` resumes a walk from the row a previous
    batch ended on. A call that returns the previous row again raises _WalkStuck:
    the next call would get the same params, and so on forever. ``blank_ends`` (a client's
    walk, not a save's): a row whose moving index column is '' cannot carry the walk on
    (the platform's CM refuses it: "Missing previous value for index"), so the batch ends
    at it, and a batch asked to resume after it raises _MissingIndex.
    """
    rows = []
    previous = after
    if index is not None:
        held = match or ()
        moving = [column for column in index if column not in held]
    while True:
        if previous is None:
            call_params = params
        elif index is None:
            call_params = {**params, **{k: v for k, v in previous.items() if v is not None}}
        else:
            # "" among the values first: a scan in C, where the search by column costs a
            # generator on every row of every walk.
            if blank_ends and "" in previous.values():
                blank = next((k for k in moving if previous.get(k) == ""), None)
                if blank is not None:
                    if rows:
                        return rows, True
                    raise _MissingIndex(previous, blank)
            # A moving index column takes the previous row's value; one the row lacks
            # keeps its param (EXOS scripts name e.g. a search direction that way).
            call_params = {**params, **{k: previous[k] for k in moving if previous.get(k) is not None}}
        ctx = CmContext(call_params, vr, op="getnext", **flags)
        method(ctx)
        row = _row(ctx.fields)
        if not row:
            return rows, False
        if match and any(row.get(column) != params[column] for column in match):
            return rows, False
        if row == previous:
            raise _WalkStuck(row)
        rows.append(row)
        if not ctx._more:
            return rows, False
        if len(rows) >= batch:
            return rows, True
        previous = row


class Actions:
    """One module's agent (None until it registers), called on behalf of the worker."""

    def __init__(self, module, agent, send, read_only=()):
        self.module = module
        self.agent = agent
        self._send = send
        self._methods = {}  # (table, op) -> (method, is_async), filled on first use
        # Persistent tables with no <table>_set: not saved, and saved rows of theirs
        # (from an older version of the agent) are passed over at load.
        self._read_only = frozenset(read_only)

    # -- finding actions ---------------------------------------------------

    def lookup(self, table, op, named=None):
        """(method, is_async) of the action for ``op`` on ``table`` (``named``: a read's own
        action, <table>_<named>, such as a show); ProgrammingError if there is none."""
        key = (table, op) if named is None else (table, op, named)
        found = self._methods.get(key)
        if found is None:
            method = self._method(table, op, named)
            found = self._methods[key] = (method, bool(getattr(method, "_cmactor_async", False)))
        return found

    def _method(self, table, op, named):
        if self.agent is None:  # the supervisor sends requests only once it is READY
            raise ProgrammingError(
                f"module {self.module!r} serves no tables: it is a plain process (it called ready() "
                "without cmbackend_init())"
            )
        name = f"{table}_{named or P.ACTION_SUFFIX[op]}"
        method = getattr(self.agent, name, None)
        if callable(method):
            return method
        tables = sorted(
            {
                attr.rsplit("_", 1)[0]
                for attr in dir(self.agent)
                if attr.endswith(("_get", "_set", "_setop")) and callable(getattr(self.agent, attr, None))
            }
        )
        if table in tables:
            what = f"{op!r} action" if named is None else f"{named!r} method"
            raise ProgrammingError(
                f"module {self.module!r} table {table!r} has no {what}: define {name}(self, ctx) in the agent"
            )
        known = ", ".join(tables) or "none"
        raise ProgrammingError(
            f"module {self.module!r} has no table {table!r} (no {table}_get/_set/_setop method); its tables: {known}"
        )

    def _index_of(self, table):
        """The index columns the agent declares for ``table`` (CmAgent.index_columns), or None."""
        declared = self.agent.index_columns.get(table)
        return list(declared) if declared is not None else None

    def _walk_index(self, table, requested):
        """A walk's index columns: the table's declared key, and those the request names
        (its extra columns, a search direction say, ride along); None if neither says."""
        declared = self._index_of(table)
        if requested is None or declared is None:
            return declared if requested is None else requested
        return declared + [column for column in requested if column not in declared]

    # -- requests ------------------------------------------------------------

    def execute(self, req, method, is_async, send=None):
        """Run the action ``method`` (from lookup) for the Req ``req`` and send its Reply, to
        ``send`` if given (a direct read's client: cmactor/worker/direct.py)."""
        if send is None:
            send = self._send
        sid = req.sid
        op = req.op
        notify = None
        if req.flags & P.F_NOTIFY:

            def notify(text):
                send(P.Notify(sid, text))

        # The caller is set and reset by hand, here and for loads and saves: a context
        # manager's three calls were a twentieth of a worker's get.
        acting.caller = (self.module, ASYNC if is_async else SERIAL, sid)
        try:
            try:
                if op == "getnext":
                    index = self._walk_index(req.table, req.index)
                    rows, more = walk(
                        method,
                        req.params,
                        req.vr,
                        req.batch,
                        req.after,
                        index,
                        req.match,
                        blank_ends=True,
                        is_async=is_async,
                        notify=notify,
                    )
                    dirty = False
                else:
                    ctx = CmContext(req.params, req.vr, op, is_async, False, False, notify)
                    method(ctx)
                    row = _row(ctx.fields)
                    rows = [row] if row else []
                    more = False
                    dirty = bool(ctx.dirty)
                reply = P.Reply(sid, None, P.reply_entries(rows, more), dirty)
            except ActionStopped as stop:
                reply = error_reply(sid, DatabaseError, stop.message)
            except _WalkStuck as stuck:
                reply = error_reply(
                    sid,
                    DatabaseError,
                    f"getnext {self.module}.{req.table} did not advance: {req.table}_get returned "
                    f"{stuck.row} twice in a row; {_stuck_advice(req.table, index)}",
                )
            except _MissingIndex as missing:
                reply = error_reply(
                    sid,
                    DatabaseError,
                    f"getnext {self.module}.{req.table} cannot go on after {missing.row}: its index column "
                    f"{missing.column!r} is '' (Missing previous value for index); the agent must give its "
                    "rows a key value",
                )
            except _FieldError as exc:
                action = f"{req.table}_{req.method or P.ACTION_SUFFIX[op]}"
                reply = error_reply(sid, DataError, f"module {self.module!r} {action} replied badly: {exc}")
            except BaseException as exc:
                where = f"{op} {self.module}.{req.table}"
                log.error("module %s: %s raised\n%s", self.module, where, traceback.format_exc().rstrip())
                reply = error_reply(sid, DatabaseError, f"{where} raised {type(exc).__name__}: {exc}")
            # The reply goes out before any tidying, the caller's reset included: the
            # client waits for it, and work done after a send overlaps with the
            # supervisor's (perf/README.md).
            send(reply)
        finally:
            acting.caller = None

    # -- load and save ---------------------------------------------------------

    def _event(self, name):
        """Run one agent event; ActionStopped and exceptions become an _EventFailed naming it."""
        try:
            getattr(self.agent, name)()
        except ActionStopped as stop:
            raise _EventFailed(f"{name} stopped: {stop.message}") from None
        except BaseException as exc:
            detail = traceback.format_exc().rstrip()
            log.error("module %s: %s raised\n%s", self.module, name, detail)
            raise _EventFailed(f"{name} raised {type(exc).__name__}: {exc}", detail) from None

    def load(self, msg):
        """Load saved rows and journaled changes (or generate defaults); the Loaded to report.

        For the Load ``msg``: each saved row is replayed as <table>_set, each journal
        record as the <table>_set or _setop it was, all with is_load True.
        """
        failures = []
        failed = 0
        error = detail = None
        acting.caller = (self.module, SERIAL, msg.sid)
        try:
            try:
                if msg.section is None and not msg.journal:
                    self._event("event_generate_default")
                else:
                    # As on the original platform, load_start is always followed by
                    # load_complete, even when it or a row fails.
                    try:
                        self._event("event_load_start")
                        saved = json.loads(msg.section) if msg.section is not None else {}
                        for table in self._read_only.intersection(saved):
                            log.warning(
                                "module %s: %d saved rows of table %r not loaded: it has no %s_set (read-only)",
                                self.module,
                                len(saved.pop(table)),
                                table,
                                table,
                            )
                        replay = [("set", table, row) for table, rows in saved.items() for row in rows] + msg.journal
                        for op, table, row in replay:
                            message = self._load_row(op, table, row)
                            if message is not None:
                                failed += 1
                                if len(failures) < P.MAX_ROW_ERRORS:
                                    failures.append({"table": table, "row": row, "message": message})
                    finally:
                        self._event("event_load_complete")
            except _EventFailed as exc:
                error, detail = str(exc), exc.detail
        finally:
            acting.caller = None
        return P.Loaded(msg.sid, error, failures, failed, detail)

    def _load_row(self, op, table, row):
        """Replay one row as <table>_<op> with is_load; the error text, or None."""
        method = getattr(self.agent, f"{table}_{op}", None)
        if not callable(method):
            return f"the agent has no {table}_{op} method"
        ctx = CmContext({k: v for k, v in row.items() if v is not None}, op=op, is_load=True)
        try:
            method(ctx)
        except ActionStopped as stop:
            return stop.message
        except BaseException as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def save(self, msg):
        """The save walk for the Save ``msg``: event_save_start, every row of each table,
        event_save_complete; the Saved to report."""
        acting.caller = (self.module, SERIAL, msg.sid)
        try:
            try:
                try:
                    self._event("event_save_start")
                    saved = {table: self._save_table(table) for table in msg.tables}
                finally:
                    self._event("event_save_complete")
            except (_EventFailed, _SaveFailed) as exc:
                return P.Saved(msg.sid, str(exc), None, 0)
        finally:
            acting.caller = None
        section = json.dumps(saved, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        return P.Saved(msg.sid, None, section, sum(len(rows) for rows in saved.values()))

    def _save_table(self, table):
        method = getattr(self.agent, f"{table}_get", None)
        if not callable(method):
            raise _SaveFailed(f"persistent table {table!r} has no {table}_get method")
        try:
            rows, more = walk(method, {}, None, P.SAVE_MAX_ROWS, None, self._index_of(table), is_save=True)
        except ActionStopped as stop:
            raise _SaveFailed(f"{table}_get stopped the save: {stop.message}") from None
        except _FieldError as exc:
            raise _SaveFailed(f"{table}_get replied badly: {exc}") from None
        except _WalkStuck as stuck:
            raise _SaveFailed(
                f"the save walk of {table!r} did not advance: {table}_get returned {stuck.row} twice in a row; "
                f"{_stuck_advice(table, self._index_of(table))}"
            ) from None
        except BaseException as exc:
            log.error("module %s: save walk of %s raised\n%s", self.module, table, traceback.format_exc().rstrip())
            raise _SaveFailed(f"{table}_get raised {type(exc).__name__}: {exc}") from None
        if more:
            raise _SaveFailed(f"the save walk of {table!r} passed {P.SAVE_MAX_ROWS} rows: does {table}_get ever end?")
        return rows
