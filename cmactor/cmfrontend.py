"""PEP-249 shaped client: connect(), Connection, Cursor, Row and the exception tree.

One Connection is one Unix socket to a supervisor, and one to the worker of each
module it reads from directly; a request is sent and its reply awaited before
the next (``threadsafety = 1``: share the module between threads, not a
connection).

Direct reads: a get, getone or getnext sent from outside an agent action goes
straight to the module's worker (cmactor/worker/direct.py), at the address the
supervisor gives for it on first use (the ``route`` op). Anything else, a read
the worker sends back (``redirect``: the module is not READY there), and a read
whose worker socket fails (the worker died, say: reads can be sent twice) goes
to the supervisor, which holds it as it holds any request.

Hot standby: given several sockets (a list, or ``CMACTOR_SOCKET`` holding paths
separated by ``os.pathsep``), a Connection asks each in turn for its place in the
cluster (the ``ha`` op) and uses the first that is active (or runs without HA). A
request whose connection breaks, times out, or that a standby refuses (NotActive), is sent
again, the same map, to the active found anew within ``failover_timeout``
seconds; each set and setop carries a token of its own, so that the supervisors
apply it once however often it is sent. One socket: none of this, not a step of it.
"""

from __future__ import annotations

import os
import re
import socket as _socket
import threading
import time
import uuid
from collections import deque, namedtuple
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cmactor import cmbackend
from cmactor.errors import (  # re-exported: PEP 249 puts these on the module
    DatabaseError as DatabaseError,
    DataError as DataError,
    DeadlockDetectedError as DeadlockDetectedError,
    Error as Error,
    IntegrityError as IntegrityError,
    InterfaceError as InterfaceError,
    InternalError as InternalError,
    ModuleUnavailable as ModuleUnavailable,
    NotActive as NotActive,
    NotSupportedError as NotSupportedError,
    OperationalError as OperationalError,
    ProgrammingError as ProgrammingError,
    Warning as Warning,
    from_wire,
)
from cmactor.wire import protocol as P

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from os import PathLike
    from typing import Any, NamedTuple, NoReturn, Self

    # A request or reply map as msgpack carries it; its values are as varied as the protocol's fields.
    _Message = dict[str, Any]
    # A result row as the module's worker sends it: field name -> str(value), or None (the agent's null).
    _WireRow = dict[str, str | None]
    # PEP 249's 7-item column description: (name, type_code, and five items cmactor leaves None).
    _Column = tuple[str, type[str], None, None, None, None, None]

apilevel = "2.0"
threadsafety = 1
paramstyle = "named"

# Where clients look when neither socket= nor CMACTOR_SOCKET says: the socket of a
# supervisor run with the default state_dir from the current directory.
DEFAULT_SOCKET = os.path.join(".cmactor", "run", "cm.sock")

STRING = str  # the type_code of every column: values cross the boundary as strings

_READ_OPS = frozenset(P.READ_OPS)
# Seconds a module with no route (not READY, its worker socket just failed) is read
# through the supervisor before its route is asked for again.
ROUTE_RETRY = 1.0
_NO_ROUTE = "no route"  # a module whose worker has no socket of its own (direct_reads off)

# Several sockets (hot standby): seconds to find the active, at first and after a failure;
# the pauses between rounds of asking every socket (the first, doubled up to the last: a
# takeover is seen within 0.1 s, at ten questions a second to each supervisor); and the
# longest one question may take (a supervisor that accepts and never answers is not
# waited for past it).
FAILOVER_TIMEOUT = 10.0
FAILOVER_PAUSES = (0.02, 0.1)
HA_QUESTION_TIMEOUT = 2.0
_WRITE_OPS = frozenset(P.WRITE_OPS)
SERVES_WRITES = ("active", "single")  # the roles whose supervisor takes sets

if TYPE_CHECKING:

    class Row(NamedTuple):
        """A row of ``Cursor.iterrow()`` (and of exos_dbapi's cursors): a named tuple."""

        rowid: int
        opStatus: int
        opMsg: str
        field_values: dict[str, str | None]

else:
    Row = namedtuple("Row", "rowid opStatus opMsg field_values")


def default_socket() -> str | list[str]:
    """``$CMACTOR_SOCKET``, else DEFAULT_SOCKET: a path, or the paths of a hot-standby
    cluster's supervisors when it holds several separated by ``os.pathsep``."""
    value = os.environ.get("CMACTOR_SOCKET")
    if not value:
        return DEFAULT_SOCKET
    if os.pathsep in value:
        paths = [path for path in value.split(os.pathsep) if path]
        if len(paths) > 1:
            return paths
        return paths[0] if paths else DEFAULT_SOCKET
    return value


def connect(
    username: str = "admin",
    print_callback: Callable[[str], object] | None = None,
    socket: str | PathLike[str] | Sequence[str | PathLike[str]] | None = None,
    timeout: float | None = None,
    failover_timeout: float = FAILOVER_TIMEOUT,
) -> Connection:
    """Open a connection to a supervisor.

    ``socket``: its path; default ``$CMACTOR_SOCKET`` (set inside agents, so an
    agent reaches its own supervisor) or ``.cmactor/run/cm.sock``. A sequence of
    paths names the supervisors of a hot-standby cluster: the connection uses the
    active, and follows it through a takeover.
    ``print_callback``: called with each ``notify_cli`` text as it arrives.
    ``timeout``: seconds to wait for any one reply (None: the supervisor's own
    hold and action timeouts bound the wait).
    ``failover_timeout``: with several sockets, seconds to find the active, at
    first and after the one in use fails or steps down; then OperationalError.
    """
    return Connection(socket or default_socket(), username, print_callback, timeout, failover_timeout)


# Operations already parsed: a program repeats the same few, and a regex match per
# request is a good part of the client's own time. Bounded: these are only a cache.
_operations: dict[str, tuple[str, str, str]] = {}
_descriptions: dict[tuple[str, ...], tuple[_Column, ...] | None] = {}
_CACHE_SIZE = 1024


def parse_operation(operation: str) -> tuple[str, str, str]:
    """``"<op> <module>.<table>"`` -> (op, module, table), or ProgrammingError."""
    if type(operation) is str:
        parsed = _operations.get(operation)
        if parsed is not None:
            return parsed
    match = P.OPERATION_RE.match(operation) if isinstance(operation, str) else None
    if match is None or match["op"] not in P.DATA_OPS:
        raise ProgrammingError(
            f"malformed operation {operation!r}: expected '<op> <module>.<table>' "
            f"with op one of {', '.join(P.DATA_OPS)}"
        )
    parsed = match["op"], match["module"], match["table"]
    if len(_operations) < _CACHE_SIZE:
        _operations[operation] = parsed
    return parsed


def description(columns: tuple[str, ...]) -> tuple[_Column, ...] | None:
    """PEP 249 ``Cursor.description`` for these column names (None for no columns)."""
    found = _descriptions.get(columns)
    if found is None:
        found = tuple((name, STRING, None, None, None, None, None) for name in columns) or None
        if len(_descriptions) < _CACHE_SIZE:
            _descriptions[columns] = found
    return found


def wire_params(params: Mapping[str, object] | None) -> dict[str, str]:
    """Request parameters as the wire carries them: str keys, ``str(value)`` values; None is left out.
    Text that UTF-8 cannot encode is refused when the request is packed (_not_unicode):
    the encode that packing does anyway finds it, and other text is not looked at twice."""
    if params is None:
        return {}
    if type(params) is not dict and not isinstance(params, Mapping):  # the ABC check is the slow one
        raise ProgrammingError(f"params must be a mapping of names to values, got {type(params).__name__}")
    out = {}
    for key, value in params.items():
        if not isinstance(key, str):
            raise ProgrammingError(f"parameter name {key!r} is a {type(key).__name__}; names must be str")
        if value is not None:
            out[key] = value if type(value) is str else str(value)
    return out


# How Python decodes a byte that is not UTF-8 (sys.argv, os.fsdecode): the one str that
# UTF-8, so msgpack, cannot encode.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _not_unicode(message, exc):
    """The ProgrammingError for a request that msgpack could not pack (``exc``, its
    UnicodeEncodeError): it names the param, or the request's field, whose text is not
    valid Unicode."""
    candidates = []
    for key, value in (message.get("params") or {}).items():
        candidates += [(f"param name {key!r}", key), (f"param {key!r}", value)]
    candidates += [(f"the request's {field!r}", value) for field, value in message.items() if field != "params"]
    for what, value in candidates:
        for text in value if isinstance(value, list) else [value]:
            found = _LONE_SURROGATE.search(text) if isinstance(text, str) else None
            if found:
                return ProgrammingError(
                    f"{what} holds text that is not valid Unicode (a lone surrogate {found.group()!r} at "
                    f"position {found.start()}: the command line held a byte that is not UTF-8?); pass UTF-8 text"
                )
    return ProgrammingError(f"the request holds text that is not valid Unicode ({exc}); pass UTF-8 text")


def wait_until_ready(socket_path: str | PathLike[str] | None, module: str | None, timeout: float) -> bool:
    """Ask the supervisor at ``socket_path`` about ``module`` until it is READY or its state
    is no longer the one it had at the first answer (the next state change, as the
    platform's when_ready waits for), for at most ``timeout`` seconds; True if it is
    READY. Never raises: a supervisor that cannot be reached, or no module named (None),
    is a module that is not ready."""
    deadline = time.monotonic() + max(0.0, float(timeout))
    pause = 0.02
    first = None
    while True:
        left = deadline - time.monotonic()
        state = None
        if module is not None:
            try:
                wait = max(left, 0.1)  # several sockets (no socket_path): finding the active too
                with Connection(socket_path or default_socket(), timeout=wait, failover_timeout=wait) as conn:
                    state = conn.request({"op": "status", "module": module})["status"][module]["state"]
            except Error:
                pass
        if state == "READY":
            return True
        if first is None:
            first = state
        elif state is not None and state != first:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.2)


# ModuleUnavailable.when_ready() waits through the client (cmactor.errors imports nothing).
ModuleUnavailable.wait_until_ready = staticmethod(wait_until_ready)


def send_retrying(
    connection: Connection,
    request: _Message,
    on_notify: Callable[[str], object] | None,
    retries: int,
    retry_timeout: float,
) -> _Message:
    """``connection.request(request, on_notify)``, sent again up to ``retries`` times
    while its module is unavailable. A retry asks the supervisor to hold it until the
    module is READY, for at most ``retry_timeout`` seconds: no polling, and the retry
    runs the moment the module can take it. Both clients' cursors send through here."""
    attempt = 0
    while True:
        try:
            return connection.request(request, on_notify)
        except ModuleUnavailable:
            if attempt >= retries:
                raise
            attempt += 1
            request["hold"] = float(retry_timeout)


def open_index(params: Mapping[str, object] | None) -> list[str] | None:
    """A getnext's index columns when a param names one with no start value (None):
    then every param is an index column, its value where the walk starts. Otherwise
    None: the agent's declaration, or every field, carries the walk."""
    if params is None or type(params) is not dict and not isinstance(params, Mapping):
        return None  # wire_params says what is wrong with them
    if not any(value is None for value in params.values()):
        return None
    return [key for key in params if isinstance(key, str)]


def walk(
    send: Callable[[_Message], _Message], request: _Message, batch_size: int, cap: int
) -> tuple[list[_WireRow], bool]:
    """A getnext walk in batches, each run inside the agent's worker: ``send(request)``
    returns a reply map, and each batch resumes after the last row of the one before.
    Returns (up to ``cap`` rows, whether the agent reported more after the last)."""
    rows: list[_WireRow] = []
    request["after"] = None
    while True:
        request["batch"] = min(batch_size, max(1, cap - len(rows)))
        reply = send(request)
        rows.extend(reply["rows"])
        if not reply.get("more") or not reply["rows"]:
            return rows, False
        if len(rows) >= cap:
            return rows, True
        request["after"] = rows[-1]


class Connection:
    """A connection to one supervisor (with several sockets: to their active). Use
    ``cursor()`` to send requests."""

    def __init__(
        self,
        path: str | PathLike[str] | Sequence[str | PathLike[str]],
        username: str = "admin",
        print_callback: Callable[[str], object] | None = None,
        timeout: float | None = None,
        failover_timeout: float = FAILOVER_TIMEOUT,
    ) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            paths = [os.fspath(path)]
        else:
            paths = [os.fspath(each) for each in path]
            if not paths:
                raise InterfaceError("socket= names no supervisor: give a path, or a list of paths")
        # Every supervisor this connection may use; socket_path is the one in use.
        self.socket_paths: list[str] = paths
        self.socket_path = paths[0]
        self.username = str(username)
        self.print_callback = print_callback
        self._lock = threading.Lock()
        self._next_id = 0
        self._timeout = timeout
        # module -> its worker's _Direct, or the monotonic time until which it is read
        # through the supervisor (no route); the generation of a worker socket that
        # failed, so that a route the supervisor has not yet seen fail is not reused.
        self._routes: dict[str, _Direct | float | str] = {}
        self._failed: dict[str, int] = {}
        self.failover_timeout = float(failover_timeout)
        if len(paths) > 1:
            # Requests through the supervisor go by _failing_over instead (an attribute of
            # this connection alone: one socket's requests take no step more for it).
            self._brokered = self._failing_over  # type: ignore[method-assign]
            self._session = uuid.uuid4().hex  # tokens: f"{session}-{n}", n counting this connection's changes
            self._changes = 0
            self.closed = False
            self._find_active(time.monotonic() + self.failover_timeout, None)
            return
        try:
            self._sock = _connected(self.socket_path, timeout)
        except OSError as exc:
            raise OperationalError(
                f"cannot reach a cmactor supervisor at {self.socket_path}: {exc.strerror or exc}; "
                "start one with `cmactor run CONFIG.toml`, or give its socket_path (socket=, "
                "CMACTOR_SOCKET or --socket)"
            ) from None
        self._stream = _Stream(self._sock, "supervisor")
        self.closed = False

    def cursor(self, vr_name: str | None = None) -> Cursor:
        return Cursor(self, vr_name)

    def commit(self) -> None:
        """No transactions yet: every set takes effect when it returns."""
        self._check_open()

    def rollback(self) -> NoReturn:
        raise NotSupportedError("cmactor has no transactions: a set takes effect when it returns")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._drop_sockets()

    def _drop_sockets(self):
        """Close the supervisor's socket and every worker's this connection reads from directly."""
        self._sock.close()
        for route in self._routes.values():
            if type(route) is _Direct:
                route.close()
        self._routes.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self):
        if self.closed:
            raise InterfaceError("the connection is closed")

    def request(self, message: _Message, on_notify: Callable[[str], object] | None = None) -> _Message:
        """Send one request map and return its reply map; errors are raised."""
        with self._lock:
            self._check_open()
            message["user"] = self.username
            caller = cmbackend.acting.caller  # current_caller(), without its call
            if caller is not None:
                message["caller"] = list(caller)
            elif message["op"] in _READ_OPS and "hold" not in message:
                route = self._route(message["module"])
                if route is not None:
                    reply = self._direct(route, message, on_notify)
                    if reply is not None:
                        return reply
            return self._brokered(message, on_notify)

    def _brokered(self, message, on_notify):
        """``request`` through the supervisor."""
        self._next_id += 1
        rid = message["id"] = self._next_id
        try:
            frame = self._stream.exchange(message, rid, on_notify)
        except (OSError, P.FrameError) as exc:
            self.close()
            what = "timed out" if isinstance(exc, TimeoutError) else f"failed ({exc})"
            raise OperationalError(
                f"connection to the supervisor at {self.socket_path} {what} during {message.get('op')}"
            ) from None
        if not frame.get("ok"):
            raise self._error(frame.get("error") or {}, message)
        return frame

    # -- several sockets: the active, and a failover -----------------------

    def _failing_over(self, message, on_notify):
        """``request`` through the active supervisor (several sockets): a set or setop is
        given its token, once; a request whose connection breaks, or that the supervisor
        refuses as a standby (NotActive), or that is not answered within timeout (the active
        may be paused), is sent again, the same map, to the active found anew within
        failover_timeout."""
        op = message.get("op")
        if op in _WRITE_OPS and "token" not in message:
            self._changes += 1
            message["token"] = f"{self._session}-{self._changes}"
        deadline = None
        while True:
            self._next_id += 1
            rid = message["id"] = self._next_id
            try:
                frame = self._stream.exchange(message, rid, on_notify)
            except TimeoutError:
                # A paused or hung active: another may have taken over. A change resent keeps
                # its token, so the cluster applies it once wherever it lands.
                why = f"{self.socket_path} did not answer within timeout={self._timeout:g}s"
            except (OSError, P.FrameError) as exc:
                why = f"the connection to {self.socket_path} failed ({exc})"
            else:
                if frame.get("ok"):
                    return frame
                error = frame.get("error") or {}
                if error.get("type") != "NotActive":
                    raise self._error(error, message)
                why = f"{self.socket_path} is not active ({_ha_words('standby', error.get('active'))})"
            self._drop_sockets()  # the routes too: they are the old active's workers
            self._failed.clear()
            now = time.monotonic()
            if deadline is None:
                deadline, pause = now + self.failover_timeout, FAILOVER_PAUSES[0]
            elif now < deadline:  # the active found failed it too: not again at once
                time.sleep(min(pause, deadline - now))
                pause = min(pause * 2, FAILOVER_PAUSES[1])
            else:  # each time, one said it was active and then failed it
                self.closed = True
                raise OperationalError(
                    f"{op}: {why}; it was sent to every supervisor found active within failover_timeout="
                    f"{self.failover_timeout:g}s, and none took it (sockets: {', '.join(self.socket_paths)}); "
                    "see `cmactor ha` with each of them as --socket"
                )
            self._find_active(deadline, f"{op}: {why}")

    def _find_active(self, deadline, why):
        """Connect to the first of socket_paths whose supervisor is active (or runs without
        HA), asking each in turn until ``deadline``; else close this connection and raise
        OperationalError naming each socket and what it answered (``why``: what sent it
        looking, None at the start)."""
        pause = FAILOVER_PAUSES[0]
        while True:
            answers = []
            for path in self.socket_paths:
                stream, answer = self._ask_ha(path, deadline)
                if stream is not None:
                    self.socket_path, self._sock, self._stream = path, stream.sock, stream
                    return
                answers.append(f"{path}: {answer}")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(pause, left))
            pause = min(pause * 2, FAILOVER_PAUSES[1])
        self.closed = True  # nothing is open: the caller closed the old socket and its routes
        start = f"{why}; then " if why else ""
        raise OperationalError(
            f"{start}no active cmactor supervisor among {len(self.socket_paths)} sockets within "
            f"failover_timeout={self.failover_timeout:g}s ({'; '.join(answers)}); start one, or wait for a "
            "standby to take over (raise failover_timeout to wait longer)"
        ) from None

    def _ask_ha(self, path, deadline):
        """(a _Stream to it, with this connection's timeout, its answer) if the supervisor at
        ``path`` serves writes; else (None, what it answered)."""
        wait = max(0.1, min(deadline - time.monotonic(), HA_QUESTION_TIMEOUT))
        if self._timeout is not None:
            wait = min(wait, self._timeout)
        try:
            sock = _connected(path, wait)
        except OSError as exc:
            return None, _oserror_words(exc)
        self._next_id += 1
        rid = self._next_id
        stream = _Stream(sock, "supervisor")
        try:
            frame = stream.exchange({"id": rid, "op": "ha", "user": self.username}, rid, None)
        except TimeoutError:
            sock.close()
            return None, f"no answer within {wait:g}s"
        except (OSError, P.FrameError) as exc:
            sock.close()
            return None, _oserror_words(exc) if isinstance(exc, OSError) else str(exc)
        usable, answer = ha_answer(frame)
        if not usable:
            sock.close()
            return None, answer
        sock.settimeout(self._timeout)
        return stream, answer

    def _route(self, module):
        """The _Direct to read ``module`` from, or None: read it through the supervisor."""
        route = self._routes.get(module)
        if type(route) is _Direct:
            return route
        if route is _NO_ROUTE or (route is not None and time.monotonic() < route):
            return None
        self._routes[module] = time.monotonic() + ROUTE_RETRY  # unless a route is found below
        try:
            reply = self._brokered({"op": "route", "module": module, "user": self.username}, None)
        except ProgrammingError:
            return None  # an unknown module, say: the read itself gets the supervisor's error
        if not reply.get("direct_reads"):
            self._routes[module] = _NO_ROUTE
            return None
        found = reply["route"]
        if found is None or self._failed.get(module) == found["generation"]:
            return None
        try:
            route = _Direct(found["path"], found["generation"], self._timeout)
        except OSError:
            self._failed[module] = found["generation"]
            return None
        self._routes[module] = route
        return route

    def _direct(self, route, message, on_notify):
        """``request`` to the module's worker: the reply, or None when the worker sends it
        back or its socket fails (then the caller sends it to the supervisor)."""
        self._next_id += 1
        rid = message["id"] = self._next_id
        try:
            frame = route.stream.exchange(message, rid, on_notify)
        except TimeoutError:
            self.close()  # as a timeout through the supervisor does: its late reply is unwanted
            raise OperationalError(
                f"connection to module {message['module']!r}'s worker at {route.path} timed out during {message['op']}"
            ) from None
        except (OSError, P.FrameError):
            # The worker may have closed an idle connection, or dropped this one: a new one
            # is tried once (reads can run twice) before the route counts as failed.
            try:
                route.reconnect(self._timeout)
                frame = route.stream.exchange(message, rid, on_notify)
            except (OSError, P.FrameError):
                self._drop_route(message["module"], route, failed=True)
                return None
        if frame.get("ok"):
            return frame
        if frame.get("redirect") or frame.get("id") is None:
            self._drop_route(message["module"], route, failed=False)
            return None
        raise self._error(frame.get("error") or {}, message)

    def _drop_route(self, module, route, failed):
        """Read ``module`` through the supervisor for ROUTE_RETRY seconds; a worker whose
        socket ``failed`` (it died, say) is not read from again, even while the supervisor
        has not yet seen it go and hands out its route."""
        route.close()
        if failed:
            self._failed[module] = route.generation
        self._routes[module] = time.monotonic() + ROUTE_RETRY

    def _error(self, wire, message):
        exc = from_wire(wire)
        if isinstance(exc, ModuleUnavailable):
            exc.module_name = message.get("module")
            exc.socket_path = self.socket_path
        return exc


def ha_answer(frame: _Message) -> tuple[bool, str]:
    """What a reply to the ``ha`` op says of its supervisor: (whether it serves writes,
    its role in words). A supervisor without HA (role "single", a reply with no ``ha``,
    or one so old it refuses the op as unknown) serves them."""
    if frame.get("ok"):
        ha = frame.get("ha")
        if type(ha) is not dict:
            return True, "single"
        role = ha.get("role")
        return role in SERVES_WRITES, _ha_words(role, ha.get("active"))
    error = frame.get("error") or {}
    message = str(error.get("message", ""))
    if error.get("type") == "ProgrammingError" and message.startswith("unknown op"):
        return True, "single (it knows no ha op)"
    return False, f"{error.get('type', 'error')}: {message}"


def _ha_words(role, active):
    """A supervisor's place in words: "active", "standby, active is nodeB", ..."""
    role = str(role)
    if role in SERVES_WRITES:
        return role
    return f"{role}, active is {active}" if active else f"{role}, no active known"


def _oserror_words(exc):
    """An OSError as the answer of a socket: its strerror in lower case ("connection refused")."""
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _connected(path, timeout):
    """A Unix socket connected to ``path``, with ``timeout``; OSError (and nothing left open) if not."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


class _Stream:
    """One socket's frames: a request out, and frames in until its final reply."""

    def __init__(self, sock, peer):
        self.sock = sock
        self._peer = peer
        self._reader = P.FrameReader(max_frame=None)
        self._frames = deque()

    def exchange(self, message, rid, on_notify):
        """Send ``message`` and return the final reply to ``rid`` (ok or not), or a frame
        about the whole stream (id None). notify_cli text goes to ``on_notify``."""
        try:
            data = P.pack(message)
        except UnicodeEncodeError as exc:
            raise _not_unicode(message, exc) from None
        self.sock.sendall(data)
        while True:
            frame = self._next_frame()
            fid = frame.get("id")
            if fid != rid:
                if fid is None and "error" in frame:
                    return frame
                continue
            if "notify" in frame:
                if on_notify is not None:
                    on_notify(frame["notify"])
                continue
            return frame

    def _next_frame(self):
        while not self._frames:
            data = self.sock.recv(P.READ_SIZE)
            if not data:
                raise OSError(f"the {self._peer} closed the connection")
            self._frames.extend(self._reader.feed(data))
        return self._frames.popleft()


class _Direct:
    """A connection to one module's worker (its route from the supervisor)."""

    def __init__(self, path, generation, timeout):
        self.path = path
        self.generation = generation
        self.stream = _Stream(_connected(path, timeout), "module's worker")

    def reconnect(self, timeout):
        """A new connection to the same worker; OSError if it is not there any more."""
        self.close()
        self.stream = _Stream(_connected(self.path, timeout), "module's worker")

    def close(self):
        self.stream.sock.close()


class Cursor:
    """Runs ``"<op> <module>.<table>"`` requests and holds the rows of the last one."""

    arraysize: int = 1

    def __init__(self, connection: Connection, vr_name: str | None = None) -> None:
        self.connection = connection
        self.vr_name = vr_name
        self.retries = 0
        self.retry_timeout: float = 5
        self.max_rows = 100000
        # A page of a getnext walk: at most this many rows, then ``more`` says whether
        # the table goes on (pass the last row's key back to continue). None: the
        # whole walk, up to max_rows.
        self.limit: int | None = None
        self.more = False
        # The index (key) columns of this cursor's getnext walks: each next call of the
        # agent gets only these columns of the previous row (and the params that are
        # not among them). None: every param, when one of them is None (an index column
        # with no start value); else the agent's index_columns; else every field.
        self.index: Sequence[str] | None = None
        self.batch_size = P.DEFAULT_BATCH
        self.messages: list[str] = []
        self.rowcount = -1
        self._columns = ()  # None: not worked out from _rows yet (see description)
        self._rows: list[_WireRow] = []
        self._pos = 0
        self.closed = False

    # -- executing -------------------------------------------------------

    def execute(self, operation: str, params: Mapping[str, object] | None = None) -> Self:
        if self.closed:
            raise InterfaceError("the cursor is closed")
        op, module, table = parse_operation(operation)
        index = None
        if op == "getnext":
            index = list(self.index) if self.index is not None else open_index(params)
        params = wire_params(params)
        if self.messages:
            self.messages = []
        self.rowcount = -1
        self.more = False
        self._rows, self._pos, self._columns = [], 0, ()
        request: _Message = {"op": op, "module": module, "table": table, "params": params}
        if self.vr_name is not None:
            request["vr"] = self.vr_name
        if self.connection.print_callback is not None:
            request["notify"] = True
        if index is not None:
            request["index"] = index
        if op == "getnext":
            rows = self._walk(request, module, table)
        else:
            rows = self._send(request)["rows"]
        self._set_result(rows)
        return self

    def executemany(self, operation: str, seq_of_params: Iterable[Mapping[str, object] | None]) -> None:
        for params in seq_of_params:
            self.execute(operation, params)

    def _send(self, request):
        return send_retrying(self.connection, request, self._on_notify, self.retries, self.retry_timeout)

    def _walk(self, request, module, table):
        cap = self.max_rows if self.limit is None else min(self.limit, self.max_rows)
        rows, more = walk(self._send, request, self.batch_size, cap)
        if not more:
            return rows
        if self.limit is not None and len(rows) >= self.limit:
            self.more = True
            return rows
        raise OperationalError(
            f"getnext {module}.{table}: stopped at max_rows={self.max_rows} while the agent still "
            f"reports more(); raise Cursor.max_rows for a bigger table, or check that "
            f"{table}_get advances to the next row and stops calling ctx.more() at the end"
        )

    def _on_notify(self, text):
        self.messages.append(text)
        callback = self.connection.print_callback
        if callback is not None:
            callback(text)

    def _set_result(self, rows):
        # The columns are worked out when first asked for: a caller that only sends
        # requests does not wait for it before its next one.
        self._rows, self._columns, self.rowcount = rows, None, len(rows)

    def _column_names(self):
        if self._columns is None:
            rows = self._rows
            if len(rows) == 1:
                self._columns = tuple(rows[0])
            else:
                columns = {}
                for row in rows:
                    for name in row:
                        columns.setdefault(name, None)
                self._columns = tuple(columns)
        return self._columns

    @property
    def description(self) -> tuple[_Column, ...] | None:
        """PEP 249: a 7-item sequence per column of the last result (names from the rows), or None."""
        return description(self._column_names())

    # -- fetching --------------------------------------------------------

    def _tuples(self, rows):
        names = self._column_names()
        return [tuple(row.get(name) for name in names) for row in rows]

    def fetchone(self) -> tuple[str | None, ...] | None:
        if self._pos >= len(self._rows):
            return None
        self._pos += 1
        return self._tuples(self._rows[self._pos - 1 : self._pos])[0]

    def fetchmany(self, size: int | None = None) -> list[tuple[str | None, ...]]:
        size = self.arraysize if size is None else size
        chunk = self._rows[self._pos : self._pos + size]
        self._pos += len(chunk)
        return self._tuples(chunk)

    def fetchall(self) -> list[tuple[str | None, ...]]:
        chunk = self._rows[self._pos :]
        self._pos = len(self._rows)
        return self._tuples(chunk)

    def __iter__(self) -> Iterator[tuple[str | None, ...]]:
        while (row := self.fetchone()) is not None:
            yield row

    def iterrow(self) -> Iterator[Row]:
        """Yield the remaining rows as ``Row(rowid, opStatus, opMsg, field_values)``."""
        while self._pos < len(self._rows):
            rowid = self._pos
            self._pos += 1
            yield Row(rowid, 0, "", dict(self._rows[rowid]))

    # -- PEP 249 odds and ends -------------------------------------------

    def setinputsizes(self, sizes: object) -> None:
        pass

    def setoutputsize(self, size: int, column: int | None = None) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        self._rows = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
