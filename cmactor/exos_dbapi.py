"""The original platform's client module, ``exos_dbapi``, on top of cmactor's client.

Apps ported from the original build a request object instead of an operation string::

    conn = exos_dbapi.connect("admin")
    cur = conn.cursor()
    req = exos_dbapi.request(exos_dbapi.CM_OP_GET)
    req.add_index(exos_dbapi.Column(("vlan", "member"), "vlan"))
    req.add_index("port")                      # a bare name: a column of the main table
    req.add_param("vlan", "v10")
    req.add_field("port", exos_dbapi.Column(("vlan", "member"), "port"))
    cur.execute(req)
    for row in cur.iterrow():
        row.field_values["port"]

It behaves as the platform's own client does:
- A GET whose index columns all have a value is one get. With one left open it is a
  getnext walk; an index column given a value holds the walk there (it ends at the
  first row that leaves it). With every index column given and ``CM_FLAG_GETNEXT``
  nothing moves: the walk answers the row that matches, or none. A getnext of a
  request with no index at all answers one row.
- Walks are lazy: execute() fetches the first rows (its errors raise there), and the
  rest come as they are read, in batches run inside the agent's worker that start
  small and grow (so reading one row of a long table costs a few agent calls, and a
  whole walk costs little more than cmactor.cmfrontend's).
- A walk that goes on past ``Cursor.max_rows`` (5000) rows answers one more row, then
  a last ERROR row whose opMsg is "Too many instances", without raising. An error
  after the first rows ends the walk with an ERROR row carrying the message; so does
  a row whose moving index column is '' ("Missing previous value for index").
- ``req.method = "show"`` runs the table's ``<table>_show`` action instead of ``_get``.

Where it differs, cmactor shows through: a request that names columns of several
tables (a join) raises NotSupportedError naming them; a request to a module that is
still loading is held by the supervisor (up to its hold_timeout) instead of failing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from cmactor import cmfrontend
from cmactor.errors import (
    DatabaseError as DatabaseError,  # "X as X": re-exported (apps catch them from here)
    DataError as DataError,
    DeadlockDetectedError as DeadlockDetectedError,
    Error as Error,
    IntegrityError as IntegrityError,
    InterfaceError as InterfaceError,
    InternalError as InternalError,
    ModuleUnavailable as ModuleUnavailable,
    NotSupportedError as NotSupportedError,
    OperationalError as OperationalError,
    ProgrammingError as ProgrammingError,
    Warning as Warning,
)
from cmactor.exos.ext_cmfe import (
    CM_FLAG_CLI as CM_FLAG_CLI,
    CM_FLAG_DYNAMIC as CM_FLAG_DYNAMIC,
    CM_FLAG_EPICENTER as CM_FLAG_EPICENTER,
    CM_FLAG_GETNEXT as CM_FLAG_GETNEXT,
    CM_FLAG_GETONE as CM_FLAG_GETONE,
    CM_FLAG_OVSDB as CM_FLAG_OVSDB,
    CM_FLAG_SNMP as CM_FLAG_SNMP,
    CM_OP_GET as CM_OP_GET,
    CM_OP_SET as CM_OP_SET,
    CM_OP_STATUS_ERROR as CM_OP_STATUS_ERROR,
    CM_OP_STATUS_MORE as CM_OP_STATUS_MORE,
    CM_OP_STATUS_SUCCESS as CM_OP_STATUS_SUCCESS,
)
from cmactor.wire import protocol as P

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from os import PathLike
    from typing import Any, NoReturn, Self, overload

    from cmactor.cmfrontend import _Message, _WireRow

    _StrTuple = tuple[str, ...]
else:
    _StrTuple = tuple

apilevel = "2.0"
threadsafety = 1  # as cmfrontend: share the module between threads, not a connection
paramstyle = "pyformat"

# The original's cap on one walk; Cursor.max_rows changes it.
MAX_ROWS = 5000
TOO_MANY = "Too many instances"
MISSING_INDEX = "Missing previous value for index"

# A lazy walk's first batch, and how much each next one grows, up to Cursor.batch_size:
# one fetchrow() costs the agent two calls, and a whole walk three more round trips
# than 1000-row batches (2, 16, 128, then 1000 rows).
FIRST_BATCH = 2
GROWTH = 8

_OPS = {CM_OP_GET: "get", CM_OP_SET: "set"}
# Action suffixes a method may not name: a read must not run the agent's set.
_RESERVED_METHODS = frozenset(P.ACTION_SUFFIX.values())


class _TypeObject:
    """A PEP 249 type object: equal to each Python type its kind of column reads as."""

    def __init__(self, name: str, *types: type) -> None:
        self._name = name
        self._types = types

    def __eq__(self, other: object) -> bool:
        return other in self._types or other is self

    def __hash__(self) -> int:
        return hash(self._name)

    def __repr__(self) -> str:
        return f"exos_dbapi.{self._name}"


# Every value the CM answers is a string, so description's type is str == STRING.
STRING = _TypeObject("STRING", str)
BINARY = _TypeObject("BINARY", bytes, bytearray, memoryview)
NUMBER = _TypeObject("NUMBER", int, float)
DATETIME = _TypeObject("DATETIME")
ROWID = _TypeObject("ROWID")


class Row(cmfrontend.Row):
    """A result row: (rowid, opStatus, opMsg, field_values); opMsg is None when it says nothing."""

    __slots__ = ()

    @property
    def _opStatus(self) -> int:  # noqa: N802 - the original's attribute, read by apps
        return self[1]


# Row(...) through tuple.__new__: a third of the time of the named tuple's own
# __new__, paid once per row of a walk.
_new_tuple = tuple.__new__


class _Flagged:
    """What a request and a cursor share: CM_FLAG_* bits in ``_op_flag``, set by name (a
    cursor's go with every request it runs, OR-ed with the request's own)."""

    _op_flag = 0

    def _set(self, flag: int) -> None:
        self._op_flag |= flag

    def as_cli(self) -> None:
        """A CLI request: the agent's notify_cli text comes back."""
        self._set(CM_FLAG_CLI)

    def as_snmp(self) -> None:
        self._set(CM_FLAG_SNMP)

    def as_ovsdb(self) -> None:
        self._set(CM_FLAG_OVSDB)

    def as_epicenter(self) -> None:
        self._set(CM_FLAG_EPICENTER)

    def dynamic(self) -> None:
        """A request for dynamic (not configured) rows."""
        self._set(CM_FLAG_DYNAMIC)


def _check_name(what: str, value: object, given: str) -> None:
    if type(value) is not str or not P.NAME_RE.match(value):
        raise InterfaceError(f"{what} {value!r} in {given} is not a name (a letter, then letters, digits or '_')")


class _OfTable(_StrTuple):
    """What Table and Column share: a tuple that starts (module, table)."""

    __slots__ = ()

    @property
    def module_name(self) -> str:
        return self[0]

    @property
    def table_name(self) -> str:
        return self[1]


class Table(_OfTable):
    """A table: ``Table(module, table)``; compares and hashes as (module, table)."""

    __slots__ = ()

    def __new__(cls, module: str, table: str) -> Self:
        given = f"Table({module!r}, {table!r})"
        _check_name("module", module, given)
        _check_name("table", table, given)
        return super().__new__(cls, (module, table))

    def __repr__(self) -> str:
        return f"Table({self[0]!r}, {self[1]!r})"

    def __str__(self) -> str:
        return f"{self[0]}.{self[1]}"


class Column(_OfTable):
    """A column: ``Column((module, table), name)``, ``Column(Table, name)`` or
    ``Column(module, table, name)``; compares and hashes as (module, table, name)."""

    __slots__ = ()

    if TYPE_CHECKING:

        @overload
        def __new__(cls, table: Table | tuple[str, str], name: str, /) -> Self: ...
        @overload
        def __new__(cls, module: str, table: str, name: str, /) -> Self: ...

    def __new__(cls, *args: Any) -> Self:
        given = f"Column({', '.join(map(repr, args))})"
        if len(args) == 3:
            module, table, name = args
        elif len(args) == 2 and isinstance(args[0], tuple) and len(args[0]) == 2:
            (module, table), name = args
        else:
            raise InterfaceError(
                f"{given}: a column is Column((module, table), name), Column(Table, name) "
                "or Column(module, table, name)"
            )
        _check_name("module", module, given)
        _check_name("table", table, given)
        if type(name) is not str or not name:
            raise InterfaceError(f"{given}: the column name must be a non-empty str, got {name!r}")
        return super().__new__(cls, (module, table, name))

    @property
    def column_name(self) -> str:
        return self[2]

    @property
    def table(self) -> Table:
        return Table(self[0], self[1])

    def __repr__(self) -> str:
        return f"Column({self[0]!r}, {self[1]!r}, {self[2]!r})"

    def __str__(self) -> str:
        return f"{self[0]}.{self[1]}.{self[2]}"


if TYPE_CHECKING:
    # What add_index and add_param take as a column: a Column, a tuple Column() takes,
    # or a bare name (of the main table).
    _ColumnLike = str | Column | tuple[str, str, str] | tuple[Table | tuple[str, str], str]


class Request(_Flagged):
    """One GET or SET, built with add_index / add_param / add_field.

    ``tables`` lists the tables its columns name, in the order seen; the first is the
    ``main_table`` (settable), the one a bare column name belongs to. ``indexes``
    (Columns), ``params`` (Column -> value as sent, None until execute() is given it),
    ``fields`` (label -> Column, or a literal echoed back) and ``method`` (None: the
    op's own action; "show": ``<table>_show``) say the rest. ``_op_flag`` holds
    CM_FLAG_* bits; apps OR them in directly. Mistakes raise InterfaceError.
    """

    def __init__(self, op: int = CM_OP_GET, outer_join: bool = False) -> None:
        if op not in _OPS:
            raise InterfaceError(f"request(op={op!r}): op must be CM_OP_GET ({CM_OP_GET}) or CM_OP_SET ({CM_OP_SET})")
        self.op = op
        self.outer_join = bool(outer_join)
        self._op_flag = 0
        self.tables: list[Table] = []
        self._main: Table | None = None
        self.indexes: list[Column] = []
        self.params: dict[Column, str | None] = {}
        self.fields: dict[str, Column | str] = {}
        self.joins: list[tuple[Column, Column]] = []  # (param, the other table's column as its value)
        self.method: str | None = None
        self.vr_name: str | None = None

    @property
    def main_table(self) -> Table | None:
        return self._main if self._main is not None else (self.tables[0] if self.tables else None)

    @main_table.setter
    def main_table(self, table: Table | tuple[str, str]) -> None:
        table = table if isinstance(table, Table) else Table(*table)
        self._seen(table)
        self._main = table

    def _seen(self, table: Table) -> None:
        if table not in self.tables:
            self.tables.append(table)

    def _column(self, column: _ColumnLike, call: str) -> Column:
        """``column`` as a Column: a bare name is one of the main table."""
        if type(column) is str:
            main = self.main_table
            if main is None:
                raise InterfaceError(
                    f"{call}: the bare column name {column!r} needs a main table; give the request's "
                    f"first column as a Column (or a (module, table, name) tuple)"
                )
            return Column(main, column)
        if not isinstance(column, tuple):
            raise InterfaceError(f"{call}: expected a Column, a (module, table, name) tuple or a column name")
        if not isinstance(column, Column):
            column = Column(*column)
        self._seen(column.table)
        return column

    def add_index(self, column: _ColumnLike) -> None:
        """An index (key) column: given a value with add_param it is held, else the walk moves it."""
        found = self._column(column, f"add_index({column!r})")
        if found not in self.indexes:
            self.indexes.append(found)

    def add_param(self, column: _ColumnLike, value: object = None) -> None:
        """A parameter, sent to the agent as ``str(value)``; None: given later, to execute()."""
        found = self._column(column, f"add_param({column!r}, {value!r})")
        if isinstance(value, Column):
            self._seen(value.table)  # a join: execute() refuses it, naming the tables
            self.joins.append((found, value))
            return
        self.params[found] = None if value is None else str(value)

    def add_field(self, label: str, source: _ColumnLike | object) -> None:
        """A field of the result rows, labelled ``label``: a column's value, or ``source``
        itself (as a string) when it is not a column. A label given again replaces the first."""
        call = f"add_field({label!r}, {source!r})"
        if type(label) is not str or not label:
            raise InterfaceError(f"{call}: the label must be a non-empty str")
        self.fields[label] = self._column(source, call) if isinstance(source, tuple) else str(source)

    def set_vr_name(self, name: str | None) -> None:
        """The virtual router the agent sees as ctx.vr_name (over the cursor's)."""
        self.vr_name = name

    def copy(self) -> Request:
        """A request built the same, changed without changing this one."""
        twin = Request(self.op, self.outer_join)
        twin.__dict__.update(
            {
                **self.__dict__,
                "tables": list(self.tables),
                "indexes": list(self.indexes),
                "params": dict(self.params),
                "fields": dict(self.fields),
                "joins": list(self.joins),
            }
        )
        return twin

    def __repr__(self) -> str:
        names = [f"{column.column_name}={value!r}" for column, value in self.params.items()]
        return (
            f"<exos_dbapi.Request {_OPS[self.op]} {self.main_table} "
            f"index={[column.column_name for column in self.indexes]} params={{{', '.join(names)}}}>"
        )


def request(op: int = CM_OP_GET, outer_join: bool = False) -> Request:
    """A new Request (the original's name for building one)."""
    return Request(op, outer_join)


def connect(
    username: str = "admin",
    print_callback: Callable[[str], object] | None = None,
    socket: str | PathLike[str] | None = None,
) -> Connection:
    """Open a connection to a cmactor supervisor (socket as cmactor.cmfrontend.connect)."""
    return Connection(cmfrontend.connect(username, print_callback, socket))


class Connection:
    """Wraps a cmactor.cmfrontend.Connection (e.g. ``Connection(sup.connect())``)."""

    apilevel = apilevel
    threadsafety = threadsafety
    paramstyle = paramstyle

    def __init__(self, connection: cmfrontend.Connection) -> None:
        self.connection = connection

    @property
    def closed(self) -> bool:
        return self.connection.closed

    @property
    def username(self) -> str:
        return self.connection.username

    @property
    def print_callback(self) -> Callable[[str], object] | None:
        return self.connection.print_callback

    def cursor(self, vr_name: str | None = None) -> Cursor:
        return Cursor(self, vr_name)

    def commit(self) -> None:
        """Nothing to do, as on the original: a set takes effect when it returns."""

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Plan:
    """What execute() sends for a Request: the wire message, whether it is a walk, and
    the index columns the walk moves (their '' ends it)."""

    __slots__ = ("message", "walk", "moving")

    def __init__(self, message: _Message, walk: bool, moving: tuple[str, ...]) -> None:
        self.message = message
        self.walk = walk
        self.moving = moving


class _Walk:
    """A getnext walk, fetched as its rows are read: each fetch one batch run in the
    agent's worker, from FIRST_BATCH rows growing GROWTH-fold up to ``largest``. It fetches at most
    ``cap`` rows; ``more`` then says whether the table went on."""

    def __init__(self, send: Callable[[_Message], _Message], message: _Message, largest: int, cap: int) -> None:
        self._send = send
        self._message = message
        self._size = min(FIRST_BATCH, largest)
        self._largest = largest
        self._left = cap
        self.more = True
        message["after"] = None

    def fetch(self) -> list[_WireRow]:
        """The next batch (empty at the end); errors raise."""
        if not self.more or self._left <= 0:
            return []
        message = self._message
        message["batch"] = min(self._size, self._left)
        self._size = min(self._size * GROWTH, self._largest)
        try:
            reply = self._send(message)
        except Error:
            if message["batch"] == 1:
                raise
            # One of the batch's rows failed, and the rows before it are the walk's (the
            # platform asks for one row at a time): go on a row at a time to reach them.
            self._size = self._largest = 1
            return self.fetch()
        rows = reply["rows"]
        self._left -= len(rows)
        self.more = bool(reply.get("more")) and bool(rows)
        if rows:
            message["after"] = rows[-1]
        return rows


class Cursor(_Flagged):
    """Runs requests and hands out the rows of the last one.

    ``retries`` / ``retry_timeout``: on ModuleUnavailable, send again, held by the
    supervisor until the module is READY (at most retry_timeout seconds), up to
    retries times per request sent (each batch of a walk is one). ``max_rows``: the
    walk's cap (see the module's docstring). ``batch_size``: the largest batch.
    """

    arraysize = 1

    def __init__(self, connection: Connection, vr_name: str | None = None) -> None:
        self.connection = connection
        self.vr_name = vr_name
        self.retries = 0
        self.retry_timeout: float = 5
        self.max_rows = MAX_ROWS
        self.batch_size = P.DEFAULT_BATCH
        self.messages: list[str] = []
        self.rowcount = -1  # as the original: a walk's length is known only once read
        self.rownumber: int | None = None  # rows of the result handed out; None before an execute()
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self._results: Iterator[Row] = iter(())  # the Rows still to read: every fetch method draws from it
        self._first: dict[str, str] | None = None  # the first row's field_values, for description
        self._is_set = False
        self.rownumber = None

    # -- executing -------------------------------------------------------

    def execute(self, req: Request, param_values: Mapping[Any, object] | Sequence[object] | None = None) -> Self:
        """Run ``req``. ``param_values``: the values of params added with None, as a
        mapping (a Column, or a column name of the main table, to its value) or a
        sequence in the order those params were added."""
        if self.closed:
            raise InterfaceError("the cursor is closed")
        # The last result goes first, so that a request that fails leaves no rows to mistake for its own.
        self._reset()
        self.messages = []
        self.rowcount = -1
        plan = self._plan(req, param_values)
        fields = _field_plan(req.fields)
        if plan.walk:
            walk = _Walk(self._send, plan.message, self.batch_size, self.max_rows + 1)
            first = self._fetching(walk.fetch)
            self._results = self._walked(walk, first, fields, plan.moving)
        else:
            first = self._fetching(lambda: self._send(plan.message)["rows"])
            self._results = self._walked(None, first, fields, ())
        if first:
            self._first = _values(first[0], fields)
        self._is_set = req.op == CM_OP_SET
        self.rownumber = 0
        return self

    def _fetching(self, fetch: Callable[[], list[_WireRow]]) -> list[_WireRow]:
        try:
            return fetch()
        except Error as exc:
            self.messages.append(str(exc))
            raise

    def _plan(self, req: Request, param_values: Mapping[Any, object] | Sequence[object] | None) -> _Plan:
        """The wire request for ``req``; InterfaceError, ProgrammingError or NotSupportedError if it cannot be sent."""
        if not isinstance(req, Request):
            raise ProgrammingError(
                f"execute() takes an exos_dbapi.request, got {type(req).__name__}; "
                "for '<op> module.table' strings use cmactor.cmfrontend"
            )
        table = req.main_table
        if table is None:
            raise ProgrammingError(f"{req!r} names no table: add_index, add_param or add_field a Column first")
        module, name = table
        where = f"{_OPS[req.op]} {module}.{name}"
        others = [str(other) for other in req.tables if other != table]
        if others or req.joins:
            names = ", ".join([str(table), *others])
            raise NotSupportedError(
                f"{where}: the request names columns of several tables ({names}); cmactor runs no joins: "
                "run one request per table and join the rows in Python"
            )
        params = _with_values(req, param_values, where)
        flags = req._op_flag | self._op_flag
        if flags & CM_FLAG_GETONE and flags & CM_FLAG_GETNEXT:
            raise ProgrammingError(f"{where}: CM_FLAG_GETONE and CM_FLAG_GETNEXT are both set; choose one")
        message: _Message = {"op": _OPS[req.op], "module": module, "table": name, "params": params}
        vr = req.vr_name if req.vr_name is not None else self.vr_name
        if vr is not None:
            message["vr"] = vr
        if self.connection.print_callback is not None or flags & CM_FLAG_CLI:
            message["notify"] = True
        if req.method is not None:
            _check_method(req.method, where, req.op)
            message["method"] = req.method
        if req.op == CM_OP_SET:
            if not params:
                raise ProgrammingError(f"{where}: a SET needs at least one add_param (which row to set)")
            if flags & (CM_FLAG_GETONE | CM_FLAG_GETNEXT):
                raise ProgrammingError(f"{where}: CM_FLAG_GETONE and CM_FLAG_GETNEXT are for CM_OP_GET requests")
            return _Plan(message, False, ())
        index = [column.column_name for column in req.indexes]
        moving = tuple(column for column in index if column not in params)
        if flags & CM_FLAG_GETONE or not (moving or flags & CM_FLAG_GETNEXT):
            return _Plan(message, False, ())
        message["op"] = "getnext"
        if not index:
            # A getnext with no index is one row, as on the original: with no key to
            # carry, nothing says where the next row would start.
            message["batch"] = 1
            return _Plan(message, False, ())
        message["index"] = index
        # Index columns given a value hold the walk: it ends at the first row that leaves
        # them. With none moving, the first row answered is the walk.
        held = [column for column in index if column in params]
        if held:
            message["match"] = held
        if not moving:
            message["batch"] = 1
            return _Plan(message, False, ())
        return _Plan(message, True, moving)

    def _send(self, message: _Message) -> _Message:
        return cmfrontend.send_retrying(
            self.connection.connection, message, self._on_notify, self.retries, self.retry_timeout
        )

    def _on_notify(self, text: str) -> None:
        self.messages.append(text)
        callback = self.connection.print_callback
        if callback is not None:
            callback(text)

    def executemany(self, req: Request, seq_of_params: object) -> NoReturn:
        raise NotSupportedError("exos_dbapi has no executemany: execute one request per row")

    def setinputsizes(self, sizes: object) -> None:
        """Nothing to set: every value is sent as a string."""

    def setoutputsize(self, size: object, column: object = None) -> None:
        """Nothing to set: every value is read as a string."""

    # -- results -----------------------------------------------------------

    def _walked(
        self,
        walk: _Walk | None,
        batch: list[_WireRow],
        fields: tuple[tuple[str, str | None, str], ...],
        moving: tuple[str, ...],
    ) -> Iterator[Row]:
        """The Rows of a result, each built as it is read: ``batch`` is all of it when
        ``walk`` is None, else its first batch. A row is MORE while another follows it,
        so the next batch is fetched before the last row of one is handed out."""
        rowid = 0
        while batch:
            last = len(batch) - 1
            base = rowid
            # Every row of the batch but its last, built inline: the cost of a walk's row.
            if fields:
                # A literal's column is None, which no row has: .get gives None and the
                # literal stands in, as "" does for a column missing or null.
                for rowid, row in enumerate(batch[:last], base):
                    self.rownumber = rowid + 1
                    values = {}  # a loop, not a comprehension: before 3.12 that is a function call per row
                    for label, column, literal in fields:
                        values[label] = row.get(column) or literal  # type: ignore[arg-type]
                    yield _new_tuple(Row, (rowid, CM_OP_STATUS_MORE, None, values))
            else:
                for rowid, row in enumerate(batch[:last], base):
                    self.rownumber = rowid + 1
                    values = row
                    if None in row.values():  # the agent's null reads as "", as a missing column does
                        values = {name: "" if value is None else value for name, value in row.items()}
                    yield _new_tuple(Row, (rowid, CM_OP_STATUS_MORE, None, values))
            rowid = base + last
            row = batch[last]
            values = _values(row, fields)
            self.rownumber = rowid + 1
            if walk is None:
                yield _new_tuple(Row, (rowid, CM_OP_STATUS_SUCCESS, None, values))
                return
            # The worker ends a batch at a row whose moving index column is '': no next
            # call can start after it.
            if walk.more and "" in row.values():
                blank = next((column for column in moving if row.get(column) == ""), None)
                if blank is not None:
                    yield _new_tuple(Row, (rowid, CM_OP_STATUS_MORE, None, values))
                    yield self._error_row(rowid + 1, f"{MISSING_INDEX} {blank!r}", fields)
                    return
            try:
                batch = walk.fetch()
            except Error as exc:
                yield _new_tuple(Row, (rowid, CM_OP_STATUS_MORE, None, values))
                yield self._error_row(rowid + 1, str(exc), fields)
                return
            status = CM_OP_STATUS_MORE if batch or walk.more else CM_OP_STATUS_SUCCESS
            yield _new_tuple(Row, (rowid, status, None, values))
            rowid += 1
        if walk is not None and walk.more:  # it stopped at the cap, and the table goes on
            yield self._error_row(rowid, TOO_MANY, fields)

    def _error_row(self, rowid: int, message: str, fields: tuple[tuple[str, str | None, str], ...]) -> Row:
        self.messages.append(message)
        self.rownumber = rowid + 1
        return _new_tuple(Row, (rowid, CM_OP_STATUS_ERROR, message, _values({}, fields)))  # type: ignore[no-any-return]

    @property
    def description(self) -> tuple[tuple[str, _TypeObject], ...] | None:
        """(label, STRING) for each field of the first row (read ahead if need be): None
        after a SET, or with no rows, as the original's."""
        if self._is_set or not self._first:
            return None
        return tuple((name, STRING) for name in self._first)

    def _names(self) -> list[str]:
        described = self.description
        return [name for name, _ in described] if described else []

    def iterrow(self) -> Iterator[Row]:
        """The remaining rows as Row(rowid, opStatus, opMsg, field_values): a generator
        that builds each row as it is asked for, sharing its place with the fetch methods."""
        return self._results

    def fetchrow(self) -> Row | None:
        """The next Row, or None after the last."""
        return next(self._results, None)

    def fetchrows(self) -> list[Row]:
        """The remaining Rows, as a list."""
        return list(self._results)

    def fetchone(self) -> list[str] | None:
        """The next row's values in description order (a list), or None after the last."""
        row = self.fetchrow()
        if row is None:
            return None
        values = row.field_values
        return [values.get(name, "") for name in self._names()]  # type: ignore[misc]

    def fetchall(self) -> list[list[str]]:
        rows = self.fetchrows()
        names = self._names()
        return [[row.field_values.get(name, "") for name in names] for row in rows]  # type: ignore[misc]

    def fetchmany(self, size: int | None = None) -> NoReturn:
        raise NotSupportedError("exos_dbapi has no fetchmany: use fetchrow(), fetchrows(), iterrow() or fetchall()")

    def next(self) -> list[str]:
        """The next row's values, as fetchone(); StopIteration after the last."""
        values = self.fetchone()
        if values is None:
            raise StopIteration
        return values

    __next__ = next

    def __iter__(self) -> Self:
        return self

    def close(self) -> None:
        self.closed = True
        self._reset()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _values(row: _WireRow, fields: tuple[tuple[str, str | None, str], ...]) -> dict[str, str]:
    """A wire row as a Row's field_values: the add_field labels in order (``fields``, from
    _field_plan), or every field of the row; null and missing read as ""."""
    if fields:
        return {label: row.get(column) or literal for label, column, literal in fields}  # type: ignore[arg-type]
    return {name: "" if value is None else value for name, value in row.items()}


def _field_plan(fields: dict[str, Column | str]) -> tuple[tuple[str, str | None, str], ...]:
    """add_field's fields as (label, column name or None, literal) triples: see Cursor._row."""
    return tuple(
        (label, source.column_name, "") if isinstance(source, Column) else (label, None, source)
        for label, source in fields.items()
    )


def _check_method(method: object, where: str, op: int) -> None:
    if op != CM_OP_GET:
        raise ProgrammingError(f"{where}: request.method is for CM_OP_GET requests (a show); a SET runs <table>_set")
    if type(method) is not str or not P.NAME_RE.match(method) or method in _RESERVED_METHODS:
        raise ProgrammingError(
            f"{where}: request.method {method!r} must be an action name such as 'show' (the agent's "
            f"<table>_show), not one of {', '.join(sorted(_RESERVED_METHODS))}"
        )


def _with_values(req: Request, given: Mapping[Any, object] | Sequence[object] | None, where: str) -> dict[str, str]:
    """The request's params as sent: column name -> str, the values left open (None)
    taken from ``given``; ProgrammingError naming a value missing or given for nothing."""
    open_columns = [column for column, value in req.params.items() if value is None]
    values: dict[Column, object] = {}
    if given is None:
        pass
    elif isinstance(given, Mapping):
        main = req.main_table
        for key, value in given.items():
            column = Column(main, key) if type(key) is str else key if isinstance(key, Column) else Column(*key)
            if column not in req.params:
                raise ProgrammingError(f"{where}: a value was given for {column}, which is not a param of the request")
            values[column] = value
    elif isinstance(given, (list, tuple)):
        if len(given) != len(open_columns):
            raise ProgrammingError(
                f"{where}: {len(given)} param value(s) given for {len(open_columns)} param(s) added with no value "
                f"({', '.join(column.column_name for column in open_columns) or 'none'})"
            )
        values = dict(zip(open_columns, given))
    else:
        raise ProgrammingError(
            f"{where}: param values must be a mapping of columns to values or a sequence, got {type(given).__name__}"
        )
    params = {}
    for column, value in req.params.items():
        if value is None:
            value = values.get(column)
            if value is None:
                raise ProgrammingError(
                    f"{where}: param {column.column_name!r} was added with no value and execute() was given none"
                )
            value = str(value)
        elif column in values:
            value = str(values[column])
        params[column.column_name] = value
    return params
