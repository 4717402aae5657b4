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

A GET whose index columns all have a value is one get; one with an index column left
open (or with ``CM_FLAG_GETNEXT``) is a getnext walk, run in the agent's worker in
batches (``Cursor.batch_size`` rows a request), as cmactor.cmfrontend walks; a
getnext of a request with no index at all answers one row, as the original's does.

Where it differs from the original, cmactor's own design shows through: execute()
reads the whole walk (up to ``Cursor.max_rows``) and the fetch methods build rows
from it as they are asked for; an error is raised by execute(), not returned as an
ERROR row; a request to a module that is still loading is held by the supervisor
(up to its hold_timeout) instead of failing at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cmactor import cmfrontend
from cmactor.cmfrontend import Row as Row  # "X as X": re-exported, as the errors are (apps catch them from here)
from cmactor.errors import (
    DatabaseError as DatabaseError,
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
from cmactor.wire import protocol as P

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from os import PathLike
    from typing import Any, NoReturn, Self, overload

    from cmactor.cmfrontend import _Message, _WireRow

    _StrTuple = tuple[str, ...]
else:
    _StrTuple = tuple

apilevel = "2.0"
threadsafety = 1  # as cmfrontend: share the module between threads, not a connection
paramstyle = "pyformat"

CM_OP_GET = 1
CM_OP_SET = 2

# Row.opStatus. An error is raised by execute(), so no row carries CM_OP_STATUS_ERROR;
# the constant is here for apps that compare against it.
CM_OP_STATUS_SUCCESS = 0
CM_OP_STATUS_MORE = 1
CM_OP_STATUS_ERROR = 2

# Bits of request._op_flag. DYNAMIC, SNMP and CLI tell the original's CM where a
# request came from and how to cache it; cmactor has no such distinctions, so they are
# accepted and kept on the request, except that a CLI request asks for the agent's
# notify_cli text (the original delivers it to CLI requests only).
CM_FLAG_GETONE = 0x01
CM_FLAG_GETNEXT = 0x02
CM_FLAG_DYNAMIC = 0x04
CM_FLAG_SNMP = 0x08
CM_FLAG_CLI = 0x10

# The original's cap on one walk ("too many instances"); Cursor.max_rows changes it.
MAX_ROWS = 5000

_OPS = {CM_OP_GET: "get", CM_OP_SET: "set"}

# Row(...) through tuple.__new__: a third of the time of the named tuple's own
# __new__, paid once per row of a walk.
_new_tuple = tuple.__new__


def _check_name(what: str, value: object, given: str) -> None:
    if type(value) is not str or not P.NAME_RE.match(value):
        raise ProgrammingError(f"{what} {value!r} in {given} is not a name (a letter, then letters, digits or '_')")


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
            raise ProgrammingError(
                f"{given}: a column is Column((module, table), name), Column(Table, name) "
                "or Column(module, table, name)"
            )
        _check_name("module", module, given)
        _check_name("table", table, given)
        if type(name) is not str or not name:
            raise ProgrammingError(f"{given}: the column name must be a non-empty str, got {name!r}")
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


class request:  # noqa: N801 - the original's name, which apps call
    """One GET or SET, built with add_index / add_param / add_field.

    The first column given (to any add_*) sets the main table; every other column
    must be of it. ``_op_flag`` holds CM_FLAG_* bits; apps OR them in directly.
    """

    def __init__(self, op: int = CM_OP_GET) -> None:
        if op not in _OPS:
            raise ProgrammingError(f"request(op={op!r}): op must be CM_OP_GET ({CM_OP_GET}) or CM_OP_SET ({CM_OP_SET})")
        self.op = op
        self._op_flag = 0
        self.table: Table | None = None  # the main Table
        self.index: list[str] = []  # index column names, in the order added
        self.params: dict[str, str] = {}  # column name -> value as sent (str)
        # (label, column name or None, literal): see Cursor._generate
        self.fields: list[tuple[str, str | None, str]] = []
        self.vr_name: str | None = None

    def _column(self, column: _ColumnLike, call: str) -> str:
        """``column`` (a Column, a tuple Column() takes, or a bare name) as a name of the main table."""
        if type(column) is str:
            if self.table is None:
                raise ProgrammingError(
                    f"{call}: the bare column name {column!r} needs a main table; give the request's "
                    f"first column as a Column (or a (module, table, name) tuple)"
                )
            return column
        if not isinstance(column, tuple):
            raise ProgrammingError(f"{call}: expected a Column, a (module, table, name) tuple or a column name")
        if not isinstance(column, Column):
            column = Column(*column)
        table = column.table
        if self.table is None:
            self.table = table
        elif table != self.table:
            raise ProgrammingError(
                f"{call}: column {column.column_name!r} is of {table}, but this request is for {self.table} "
                "(its first column's table); a request reads or writes one table"
            )
        return column.column_name

    def add_index(self, column: _ColumnLike) -> None:
        """An index (key) column: given a value with add_param it is fixed, else the walk moves it."""
        name = self._column(column, f"add_index({column!r})")
        if name not in self.index:
            self.index.append(name)

    def add_param(self, column: _ColumnLike, value: object) -> None:
        """A parameter, sent to the agent as ``str(value)``."""
        self.params[self._column(column, f"add_param({column!r}, {value!r})")] = str(value)

    def add_field(self, label: str, source: _ColumnLike | object) -> None:
        """A field of the result rows, labelled ``label``: a column's value, or
        ``source`` itself (as a string) when it is not a column."""
        call = f"add_field({label!r}, {source!r})"
        if type(label) is not str or not label:
            raise ProgrammingError(f"{call}: the label must be a non-empty str")
        if any(label == known for known, _, _ in self.fields):
            raise ProgrammingError(f"{call}: the label {label!r} is already a field of this request")
        if isinstance(source, tuple):
            self.fields.append((label, self._column(source, call), ""))
        else:
            self.fields.append((label, None, str(source)))

    def set_vr_name(self, name: str | None) -> None:
        """The virtual router the agent sees as ctx.vr_name (over the cursor's)."""
        self.vr_name = name

    def as_cli(self) -> None:
        self._op_flag |= CM_FLAG_CLI

    def as_snmp(self) -> None:
        self._op_flag |= CM_FLAG_SNMP

    def dynamic(self) -> None:
        self._op_flag |= CM_FLAG_DYNAMIC

    def __repr__(self) -> str:
        return f"<exos_dbapi.request {_OPS.get(self.op)} {self.table} index={self.index} params={self.params}>"


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


class Cursor:
    """Runs requests and holds the rows of the last one.

    ``retries`` / ``retry_timeout``: on ModuleUnavailable, send again, held by the
    supervisor until the module is READY (at most retry_timeout seconds), up to retries times
    per request sent (each batch of a walk is one). ``max_rows``: a walk that goes on
    past it delivers that many rows, then the next fetch raises OperationalError
    ("too many instances"), as the original stops at 5000 rows.
    """

    def __init__(self, connection: Connection, vr_name: str | None = None) -> None:
        self.connection = connection
        self.vr_name = vr_name
        self.retries = 0
        self.retry_timeout: float = 5
        self.max_rows = MAX_ROWS
        self.batch_size = P.DEFAULT_BATCH
        self.messages: list[str] = []
        self.rowcount = -1
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self._rows: list[_WireRow] = []
        self._results: Iterator[Row] = iter(())  # the Rows still to fetch: every fetch method draws from it
        self._labels: tuple[str, ...] = ()  # add_field labels; () when the rows' own fields are the result
        self._columns: tuple[str, ...] | None = None  # worked out from the rows when first asked for (description)

    # -- executing -------------------------------------------------------

    def execute(self, req: request) -> Self:
        if self.closed:
            raise InterfaceError("the cursor is closed")
        # The last result goes first, so that a request that fails leaves no rows to mistake for its own.
        self._reset()
        self.messages = []
        self.rowcount = -1
        message, walk = self._message(req)
        if walk and req.index:
            rows, cut = self._walk(message)
        else:
            if walk:
                # A getnext with no index is one row, as on the original: with no key
                # to carry, nothing says where the next row would start.
                message["batch"] = 1
            rows, cut = self._send(message)["rows"], None
        self._rows = rows
        self.rowcount = len(rows)
        self._labels = tuple(label for label, _, _ in req.fields)
        self._results = self._generate(rows, tuple(req.fields), cut)
        return self

    def _message(self, req: request) -> tuple[_Message, bool]:
        """The wire request for ``req`` and whether it is a walk; ProgrammingError if it is wrong."""
        if not isinstance(req, request):
            raise ProgrammingError(
                f"execute() takes an exos_dbapi.request, got {type(req).__name__}; "
                "for '<op> module.table' strings use cmactor.cmfrontend"
            )
        if req.table is None:
            raise ProgrammingError(f"{req!r} names no table: add_index, add_param or add_field a Column first")
        flags = req._op_flag
        module, table = req.table
        where = f"{_OPS[req.op]} {module}.{table}"
        if flags & CM_FLAG_GETONE and flags & CM_FLAG_GETNEXT:
            raise ProgrammingError(f"{where}: CM_FLAG_GETONE and CM_FLAG_GETNEXT are both set; choose one")
        message: _Message = {"op": _OPS[req.op], "module": module, "table": table, "params": dict(req.params)}
        vr = req.vr_name if req.vr_name is not None else self.vr_name
        if vr is not None:
            message["vr"] = vr
        if self.connection.print_callback is not None or flags & CM_FLAG_CLI:
            message["notify"] = True
        if req.op == CM_OP_SET:
            if not req.params:
                raise ProgrammingError(f"{where}: a SET needs at least one add_param (which row to set)")
            if flags & (CM_FLAG_GETONE | CM_FLAG_GETNEXT):
                raise ProgrammingError(f"{where}: CM_FLAG_GETONE and CM_FLAG_GETNEXT are for CM_OP_GET requests")
            return message, False
        open_index = [name for name in req.index if name not in req.params]
        if flags & CM_FLAG_GETONE or not (open_index or flags & CM_FLAG_GETNEXT):
            return message, False
        message["op"] = "getnext"
        if req.index:
            message["index"] = list(req.index)
        # Index columns given a value filter the walk: it ends at the first row that
        # leaves them. With none open (CM_FLAG_GETNEXT), the values are the key the
        # walk starts after, and nothing is held.
        held = [name for name in req.index if name in req.params] if open_index else []
        if held:
            message["match"] = held
        return message, True

    def _send(self, message: _Message) -> _Message:
        return cmfrontend.send_retrying(
            self.connection.connection, message, self._on_notify, self.retries, self.retry_timeout
        )

    def _walk(self, message: _Message) -> tuple[list[_WireRow], OperationalError | None]:
        # Ask for one row past max_rows: a row there tells a table that goes on from
        # one that ends exactly at the cap.
        rows, _ = cmfrontend.walk(self._send, message, self.batch_size, self.max_rows + 1)
        if len(rows) <= self.max_rows:
            return rows, None
        del rows[self.max_rows :]
        return rows, OperationalError(
            f"too many instances: getnext {message['module']}.{message['table']} stopped after "
            f"{self.max_rows} rows and the table goes on; raise cursor.max_rows to read them all, "
            "or give an index column a value with add_param to read fewer"
        )

    def _on_notify(self, text: str) -> None:
        self.messages.append(text)
        callback = self.connection.print_callback
        if callback is not None:
            callback(text)

    def executemany(self, req: request, seq_of_params: Iterable[object]) -> NoReturn:
        raise NotSupportedError("exos_dbapi has no executemany: execute one request per row")

    # -- results -----------------------------------------------------------

    def _column_names(self) -> tuple[str, ...]:
        if self._labels:
            return self._labels
        if self._columns is None:
            columns = {}
            for row in self._rows:
                columns.update(dict.fromkeys(row))
            self._columns = tuple(columns)
        return self._columns

    @property
    def description(self) -> tuple[tuple[str, type[str]], ...] | None:
        """(label, type) per field: the add_field labels, else the rows' field names; None without either."""
        names = self._column_names()
        return tuple((name, str) for name in names) or None

    @staticmethod
    def _generate(
        rows: list[_WireRow], fields: tuple[tuple[str, str | None, str], ...], cut: OperationalError | None
    ) -> Iterator[Row]:
        """The Rows of a result, each built when it is fetched. ``fields``: the
        request's (label, column, literal) triples; ``cut``: the error a walk cut at
        max_rows raises after its last row, or None."""
        last = len(rows) - 1 if cut is None else len(rows)  # a cut walk's last row has more after it
        if fields:
            for rowid, row in enumerate(rows):
                values = {}
                for label, column, literal in fields:
                    # A literal's column is None, which no row has: .get gives None and
                    # the literal stands in, as "" does for a column missing or null.
                    values[label] = row.get(column) or literal  # type: ignore[arg-type]
                yield _new_tuple(Row, (rowid, CM_OP_STATUS_MORE if rowid < last else CM_OP_STATUS_SUCCESS, "", values))
        else:
            for rowid, row in enumerate(rows):
                if None in row.values():  # the agent's null reads as "", as a missing column does
                    row = {name: "" if value is None else value for name, value in row.items()}
                yield _new_tuple(Row, (rowid, CM_OP_STATUS_MORE if rowid < last else CM_OP_STATUS_SUCCESS, "", row))
        if cut is not None:
            raise cut

    def iterrow(self) -> Iterator[Row]:
        """The remaining rows as Row(rowid, opStatus, opMsg, field_values): a generator
        that builds each row as it is asked for, sharing its place with the fetch methods."""
        return self._results

    def fetchrow(self) -> Row | None:
        """The next Row, or None after the last."""
        return next(self._results, None)

    def fetchrows(self) -> list[Row]:
        """The remaining Rows, as a list."""
        return list(self.iterrow())

    def fetchone(self) -> list[str] | None:
        """The next row's values in description order (a list), or None after the last."""
        row = self.fetchrow()
        if row is None:
            return None
        values = row.field_values
        # A Row's field_values may hold None (cmfrontend's do); these never do (_generate).
        return [values.get(name, "") for name in self._column_names()]  # type: ignore[misc]

    def fetchall(self) -> list[list[str]]:
        names = self._column_names()
        return [[row.field_values.get(name, "") for name in names] for row in self.iterrow()]  # type: ignore[misc]

    def fetchmany(self, size: int | None = None) -> NoReturn:
        raise NotSupportedError("exos_dbapi has no fetchmany: use fetchrow(), fetchrows(), iterrow() or fetchall()")

    def __iter__(self) -> Iterator[list[str]]:
        while (values := self.fetchone()) is not None:
            yield values

    def close(self) -> None:
        self.closed = True
        self._reset()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
