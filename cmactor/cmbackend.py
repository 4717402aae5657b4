"""The agent API: CmAgent, CmContext, cmbackend_init, ready, async_action.

An agent ported from the original platform keeps its imports: inside a worker
``exos.api.cmbackend`` is this module (see cmactor.exos).
"""

from __future__ import annotations

import re
import threading
import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from cmactor.wire.protocol import NAME_RE

if TYPE_CHECKING:
    from concurrent.futures import Executor
    from typing import Any, NoReturn, Protocol, TypeVar

    _F = TypeVar("_F", bound=Callable[..., object])

    class _Runtime(Protocol):
        # What this module asks of the worker's Runtime (cmactor.worker.process).
        def register(self, agent: CmAgent, persistent: list[str], deps: list[str]) -> None: ...
        def ready(self) -> None: ...


# The worker's Runtime (attach_runtime) when this process is a cmactor worker; None
# anywhere else. Kept here (not in worker) so this module does not import the worker
# machinery.
_runtime: _Runtime | None = None


class _Acting(threading.local):
    # The default on the class: a thread that never ran an action finds it there, where
    # getattr(local, name, None) would raise and catch an AttributeError on every request.
    caller: tuple[str, str, int] | None = None


# The action running on each thread, so that a request made from inside an action can
# tell the supervisor who is calling: ``acting.caller`` is (module, lane, request id)
# while it runs, None outside actions. The supervisor's deadlock detector builds its
# wait-for graph from it. The worker sets and resets it around each action, load and
# save (worker/actions.py).
acting = _Acting()


def async_action(method: _F) -> _F:
    """Mark an action to run on the agent's pool (``ctx.is_async`` True).

    Async actions run concurrently with each other and with the serial lane, so
    they may block (e.g. query another module) but must lock shared agent state.
    """
    method._cmactor_async = True  # type: ignore[attr-defined]
    return method


class ActionStopped(BaseException):
    """Raised by ``CmContext.raise_error``.

    A BaseException, not an Exception, so that an agent's ``except Exception``
    around its own code cannot swallow the stop and carry on.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CmContext:
    """Context of one request to an agent; a new one is passed to each action call."""

    # Defaults on the class: __init__ sets only what differs, since it runs for every
    # request before the reply can go out.
    vr_name: str | None = None
    # True while the node runs as a hot standby of a cluster ([ha]): the agent keeps its
    # config and answers reads, but must not touch hardware; it turns False at a takeover.
    is_standby: bool = False
    is_async: bool = False
    is_save: bool = False
    is_load: bool = False
    _more = False
    _notify: Callable[[str], None] | None = None

    def __init__(
        self,
        params: Mapping[str, str] | None = None,
        vr_name: str | None = None,
        op: str = "get",
        is_async: bool = False,
        is_save: bool = False,
        is_load: bool = False,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.params: dict[str, str] = dict(params) if params else {}
        # Any, not object: dict is invariant, and an action may set a dict[str, int] it
        # built (every value but None goes to the client as str(value)).
        self.fields: dict[str, Any] = {}
        self.dirty = op == "set" or op == "setop"
        self.is_getone = op == "get" or op == "getone"
        self.is_getnext = op == "getnext"
        if vr_name is not None:
            self.vr_name = vr_name
        if is_async:
            self.is_async = True
        if is_save:
            self.is_save = True
        if is_load:
            self.is_load = True
        if notify is not None:
            self._notify = notify

    def more(self) -> None:
        """Tell the client there is another row after this one (getnext only)."""
        self._more = True

    def raise_error(self, msg: object) -> NoReturn:
        """Stop the action now and return ``msg`` to the client as an error."""
        raise ActionStopped(str(msg))

    def notify_cli(self, msg: object) -> None:
        """Send ``msg`` to the client's print callback, if it has one; dropped otherwise."""
        if self._notify is not None:
            self._notify(str(msg))

    def __repr__(self) -> str:
        return f"CmContext(params={self.params!r}, vr_name={self.vr_name!r}, is_async={self.is_async})"


class CmAgent:
    """Base class for agents: one instance per module, registered with cmbackend_init().

    Events are optional no-ops here; actions are methods named ``<table>_get``,
    ``<table>_set`` and ``<table>_setop`` taking ``(self, ctx)``.

    ``index_columns`` maps a table to its index (key) columns, as the original
    app's schema declares them: a getnext walk then carries only those columns of
    the previous row into the next call (not every field), and so does the save
    walk. A table not named there gets every field of the previous row.

    ``columns`` maps a table to every column (field) it has, in order: what a RESTCONF
    server, a client of the supervisor, exposes (it reads them with the ``schema`` op). A
    table with declared columns is exposed, one ``type string`` leaf a column; with
    ``index_columns`` it is a YANG list keyed by them, in order (they must be among its
    columns), without them a container; ``config true`` when the agent has
    ``<table>_set``, else ``config false``; a ``<table>_setop`` is an operation. A
    table not named there is not exposed, and serves cmactor's clients as before.

    ``delete_tables`` names the tables whose entries a RESTCONF DELETE removes, by
    calling ``<table>_setop`` with ``action=delete`` and the entry's index columns;
    each needs declared columns and a ``<table>_setop``. A DELETE of any other table
    is refused. Both are checked by cmbackend_init().
    """

    index_columns: Mapping[str, tuple[str, ...] | list[str]] = types.MappingProxyType({})
    columns: Mapping[str, tuple[str, ...] | list[str]] = types.MappingProxyType({})
    delete_tables: tuple[str, ...] | list[str] = ()

    def __init__(self, pool: Executor | None = None) -> None:
        # None: the worker's shared callback pool is used for @async_action methods.
        self.pool = pool

    def event_load_start(self) -> None:
        """Config loading begins: set defaults; <table>_set calls with is_load follow."""

    def event_load_complete(self) -> None:
        """Config loading is done: get ready to serve and call cmactor.ready()."""

    def event_save_start(self) -> None:
        """A save begins: <table>_get calls with is_save follow."""

    def event_save_complete(self) -> None:
        """The save is done."""

    def event_generate_default(self) -> None:
        """There is no saved config for this module: build defaults and call cmactor.ready()."""


def _check_names(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise TypeError(f"cmbackend_init(): {what} must be a list of str, got {type(value).__name__}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"cmbackend_init(): {what} must be a list of str, got item {item!r}")
    return list(value)


def _check_index_columns(declared: object) -> None:
    if not isinstance(declared, Mapping):
        raise TypeError(
            f"cmbackend_init(): index_columns must map table names to lists of column names, "
            f"got {type(declared).__name__}"
        )
    for table, columns in declared.items():
        if not isinstance(table, str):
            raise TypeError(
                f"cmbackend_init(): index_columns has a {type(table).__name__} key {table!r}, not a table name"
            )
        _check_names(columns, f"index_columns[{table!r}]")


# A column is a YANG leaf (RESTCONF): an identifier as RFC 7950 section 6.2 has it.
_COLUMN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")


def _has(agent: CmAgent, table: str, suffix: str) -> bool:
    return callable(getattr(agent, f"{table}_{suffix}", None))


def _check_columns(agent: CmAgent) -> None:
    declared = agent.columns
    if not isinstance(declared, Mapping):
        raise TypeError(
            f"cmbackend_init(): columns must map table names to lists of column names, got {type(declared).__name__}"
        )
    for table, columns in declared.items():
        if not isinstance(table, str):
            raise TypeError(f"cmbackend_init(): columns has a {type(table).__name__} key {table!r}, not a table name")
        if not NAME_RE.match(table):  # a table is part of a method name (<table>_get)
            raise ValueError(
                f"cmbackend_init(): columns has the key {table!r}, not a table name (a letter, then letters, "
                "digits or _)"
            )
        names = _check_names(columns, f"columns[{table!r}]")
        if columns is None or not names:
            raise ValueError(
                f"cmbackend_init(): columns[{table!r}] declares no column: list every column of table {table!r} "
                "(or leave the table out of columns)"
            )
        if table[:3].lower() == "xml":
            raise ValueError(
                f"cmbackend_init(): columns declares table {table!r}, whose name starts with 'xml', which YANG "
                "and XML reserve: RESTCONF cannot expose it; leave it out of columns"
            )
        for column in names:
            if not _COLUMN_RE.match(column) or column[:3].lower() == "xml":
                raise ValueError(
                    f"cmbackend_init(): columns[{table!r}] has {column!r}, not a column name RESTCONF can expose "
                    "(a letter or _, then letters, digits, _, - or ., not starting with 'xml'): rename the "
                    "column, or leave the table out of columns"
                )
        if "message" in names and _has(agent, table, "setop"):
            raise ValueError(
                f"cmbackend_init(): columns[{table!r}] has 'message', which names the notify_cli lines "
                f"{table}_setop answers through RESTCONF: rename the column, or leave the table out of columns"
            )
        twice = sorted({column for column in names if names.count(column) > 1})
        if twice:
            raise ValueError(f"cmbackend_init(): columns[{table!r}] names {twice[0]!r} twice: list each column once")
        if not _has(agent, table, "get"):
            raise ValueError(
                f"cmbackend_init(): columns declares table {table!r}, but the agent has no {table}_get to serve it: "
                f"define {table}_get(self, ctx), or leave {table!r} out of columns"
            )
        for column in agent.index_columns.get(table) or ():
            if column not in names:
                raise ValueError(
                    f"cmbackend_init(): index_columns[{table!r}] names {column!r}, which columns[{table!r}] does not "
                    f"declare: add it to columns[{table!r}]"
                )


def _check_delete_tables(agent: CmAgent) -> None:
    for table in _check_names(agent.delete_tables, "delete_tables"):
        if not _has(agent, table, "setop"):
            raise ValueError(
                f"cmbackend_init(): delete_tables names table {table!r}, but the agent has no {table}_setop to "
                f"delete its entries with: define {table}_setop(self, ctx) taking action=delete, or leave "
                f"{table!r} out of delete_tables"
            )
        if table not in agent.columns:
            raise ValueError(
                f"cmbackend_init(): delete_tables names table {table!r}, which columns does not declare: "
                f"declare its columns (columns = {{{table!r}: (...)}}), or leave {table!r} out of delete_tables"
            )


def declared_schema(agent: CmAgent) -> dict[str, dict[str, dict[str, Any]]]:
    """What ``agent`` declares for RESTCONF, as the worker sends it to the supervisor (the
    ``schema`` op answers it): {"tables": {table: {"index", "columns", "config", "setop",
    "delete"}}}, a table a declared ``columns`` entry. Call it once cmbackend_init() has
    checked the declarations."""
    deletes = set(agent.delete_tables or ())
    return {
        "tables": {
            table: {
                "index": list(agent.index_columns.get(table) or ()),
                "columns": list(columns),
                "config": _has(agent, table, "set"),
                "setop": _has(agent, table, "setop"),
                "delete": table in deletes,
            }
            for table, columns in agent.columns.items()
        }
    }


def cmbackend_init(
    agent: CmAgent,
    persistent_list: list[str] | tuple[str, ...] | None = None,
    config_deps: list[str] | tuple[str, ...] | None = None,
) -> None:
    """Register ``agent`` as this worker's backend; call once, inside a cmactor worker.

    ``persistent_list``: tables saved in the config file, in this order.
    ``config_deps``: modules that must have loaded their config and gone READY
    before this module's config is loaded.
    """
    if not isinstance(agent, CmAgent):
        raise TypeError(f"cmbackend_init(): agent must be a CmAgent instance, got {type(agent).__name__}")
    persistent = _check_names(persistent_list, "persistent_list")
    _check_index_columns(agent.index_columns)
    _check_columns(agent)
    _check_delete_tables(agent)
    deps = _check_names(config_deps, "config_deps")
    if agent.pool is not None and not callable(getattr(agent.pool, "submit", None)):
        raise TypeError(f"CmAgent pool must be a concurrent.futures.Executor, got {type(agent.pool).__name__}")
    if _runtime is None:
        raise RuntimeError(
            "cmbackend_init() must run inside a cmactor worker process: start the agent "
            "with a Supervisor or `cmactor run CONFIG.toml`"
        )
    _runtime.register(agent, persistent, deps)


def ready() -> None:
    """Move this worker's module to READY (after its config is loaded or defaulted)."""
    if _runtime is None:
        raise RuntimeError("ready() must be called inside a cmactor worker process")
    _runtime.ready()


def attach_runtime(runtime: _Runtime) -> None:
    """The worker's hook: ``runtime`` serves cmbackend_init() and ready() in this process.

    Called once, by ``cmactor.worker.main``, before the agent's entry runs.
    """
    global _runtime
    _runtime = runtime


def current_caller() -> tuple[str, str, int] | None:
    """(module, lane, request id) of the action running on this thread, or None outside actions."""
    return acting.caller
