"""Checking what a client sends: one request map, field by field, and the peer's uid.

Both sockets that take client requests use this code: the supervisor's, and each
worker's own socket for direct reads (cmactor/worker/direct.py). Every field is checked
before a request is handed on, and an error names the field and what it must be;
client data quoted in an error goes through a bounded repr.

One set of rules, checked in two ways. Every frame is first decoded by msgspec
straight into a Request, whose field types say most rules (in C), and the few
that no type says are checked after (decode_request): the path every good request
takes. A frame that fails there is decoded again by msgpack, into plain objects,
and checked field by field in Python (parse_request), which refuses it in the
words clients have always been told. msgpack and not msgspec's own plain decoding
there, for the same words: msgpack names ext types ExtType and Timestamp, refuses
map keys that are not str or bytes (strict_map_key), and decodes values nested
1000 deep, where msgspec stops at the interpreter's recursion limit. The hand
check is the reference: the fast path accepts nothing it refuses, with the same
values (tests/test_units.py compares them).
"""

import math
import re
import reprlib
import socket
import struct
from typing import Annotated, Literal

import msgpack
import msgspec

from cmactor.errors import ProgrammingError
from cmactor.wire import protocol as P

_PEERCRED = struct.Struct("3i")

# The longest hold a request may ask for: it stays in the loop's timer heap that long.
MAX_HOLD = 86400.0
MAX_BATCH = 100000  # rows of one getnext batch
MAX_WALK_COLUMNS = 64  # index or match columns of one walk: real tables have a handful
# A set's or setop's token, the client's key for "apply this change once" (a resend after
# a takeover carries the same one): printable ASCII, no spaces, at most MAX_TOKEN long.
MAX_TOKEN = 128
_TOKEN_RE = re.compile(rf"[!-~]{{1,{MAX_TOKEN}}}")

# Client data in error messages goes through this bounded repr: a builtin repr of a
# value nested 1000 deep raises RecursionError, and a long one would be sent back whole.
_brief = reprlib.Repr()
_brief.maxlevel = 3
_brief.maxstring = _brief.maxother = _brief.maxlong = 60
_brief.maxlist = _brief.maxtuple = _brief.maxdict = _brief.maxset = 6
_show = _brief.repr


def _clip(text, size=60):
    return text if len(text) <= size else text[: size - 3] + "..."


class BadRequest(Exception):
    def __init__(self, rid, exc_type, message):
        super().__init__(message)
        self.rid = rid
        self.exc_type = exc_type


def peer_credentials(sock):
    """(pid, uid) of the process at the other end, or (None, None) where the OS cannot say."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None, None
    pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


def peer_uid(sock):
    """The uid of the process at the other end, or None where the OS cannot say."""
    return peer_credentials(sock)[1]


# A walk's 'index' or 'match': column names, non-empty (distinct: checked after decoding).
_Columns = Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(max_length=MAX_WALK_COLUMNS)]


class Request(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A client's request, checked (decode_request, parse_request).

    A data request (P.DATA_OPS) has its module and table, params (a dict), after (a
    non-empty dict, or None) and batch; a set or setop may have a token. A control
    request has the fields its op reads (module, modules, caller, user; a restart's kill,
    all and rolling); the rest are at their defaults, or hold what passed their types
    and is read by nobody. A key not listed here sends the request through the hand
    check, which lets unknown keys pass.
    """

    id: int
    op: Literal[P.DATA_OPS + P.CONTROL_OPS]
    user: str = ""
    module: str | None = None
    table: str | None = None
    params: dict[str, str] | None = None
    vr: str | None = None
    notify: bool | None = None
    after: dict[str, str | None] | None = None
    batch: Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH)] = P.DEFAULT_BATCH
    index: _Columns | None = None
    match: _Columns | None = None
    hold: int | float | None = None
    caller: tuple[str, Literal["serial", "async"], int] | None = None
    modules: list[str] | None = None
    method: str | None = None
    kill: bool | None = None
    all: bool | None = None
    rolling: bool | None = None
    token: str | None = None


_decoder = msgspec.msgpack.Decoder(Request)
# Control ops that name a module (a restart, unless of every module), and that may.
_NAMED_OPS = frozenset(("restart", "start", "route"))
_NAMING_OPS = frozenset(("status", "stop", "schema"))
_DATA_OPS = frozenset(P.DATA_OPS)
_WRITE_OPS = frozenset(P.WRITE_OPS)
_OPS = frozenset(P.DATA_OPS + P.CONTROL_OPS)


def decode_request(body):
    """A client's frame (FrameReader's decode): a Request if it keeps every rule; else the
    plain objects msgpack decodes from it, for parse_request to say what is wrong. What
    msgpack cannot decode either raises (the stream is garbage)."""
    try:
        request = _decoder.decode(body)
    except msgspec.MsgspecError:
        pass
    else:
        if _keeps_the_rest(request):
            return request
    return msgpack.unpackb(body, raw=False, strict_map_key=True)


def _keeps_the_rest(request):
    """The rules of parse_request that Request's types do not say, for a request msgspec
    decoded: True if it keeps them (a data request's params and after are then filled
    in as parse_request fills them in)."""
    op = request.op
    token = request.token
    if token is not None and (op not in _WRITE_OPS or not _TOKEN_RE.fullmatch(token)):
        return False
    if op not in _DATA_OPS:
        if op == "restart" and (request.all or request.rolling):
            return bool(request.all) and request.module is None
        if op in _NAMED_OPS or (op in _NAMING_OPS and request.module is not None):
            return _is_name(request.module)
        if op == "export" and request.modules is not None:
            return all(_is_name(name) for name in request.modules)
        return True
    # Names seen before, at a set lookup each: the common case.
    if request.module not in _names or request.table not in _names:
        if not (_is_name(request.module) and _is_name(request.table)):
            return False
    if request.params is None:
        request.params = {}
    if not request.after:
        request.after = None
    hold = request.hold
    if hold is not None and not 0 <= hold <= MAX_HOLD:  # NaN fails it too
        return False
    index, match = request.index, request.match
    if index is not None and len(set(index)) != len(index):
        return False
    if request.method is not None and not _is_method(op, request.method):
        return False
    if match:
        params = request.params
        if op != "getnext" or len(set(match)) != len(match) or any(column not in params for column in match):
            return False
    return True


def parse_request(msg):
    """Check one decoded frame (decode_request's) and return it as a Request, or raise
    BadRequest naming the field that is wrong and what it must be."""
    if type(msg) is Request:
        return msg
    if type(msg) is not dict:
        raise BadRequest(None, ProgrammingError, f"a request must be a msgpack map, got {type(msg).__name__}")
    rid = msg.get("id")
    if type(rid) is not int:
        raise BadRequest(None, ProgrammingError, f"request 'id' must be an integer, got {_show(rid)}")
    op = msg.get("op")
    if type(op) is not str or op not in _OPS:
        known = ", ".join(P.DATA_OPS + P.CONTROL_OPS)
        raise BadRequest(rid, ProgrammingError, f"unknown op {_show(op)}; known ops: {known}")
    user = msg.get("user", "")
    if type(user) is not str:
        raise BadRequest(rid, ProgrammingError, f"'user' must be a str, got {type(user).__name__}")
    token = msg.get("token")
    if token is not None:
        _token(rid, op, token)
    if op not in _DATA_OPS:
        module = modules = kill = every = rolling = None
        if op == "restart":
            kill, every, rolling = (_flag(rid, op, key, msg.get(key)) for key in ("kill", "all", "rolling"))
            if (every or rolling) and not (every and msg.get("module") is None):
                raise BadRequest(
                    rid, ProgrammingError, "restart: name a 'module', or give 'all': true (with 'rolling'), not both"
                )
        if (op in _NAMED_OPS and not every) or (op in _NAMING_OPS and msg.get("module") is not None):
            module = _name(rid, op, "module", msg.get("module"))
        if op == "export":
            modules = _modules(rid, msg.get("modules"))
        return Request(
            id=rid,
            op=op,
            user=user,
            module=module,
            modules=modules,
            caller=_caller(rid, msg.get("caller")),
            kill=kill,
            all=every,
            rolling=rolling,
        )
    module = _name(rid, op, "module", msg.get("module"))
    table = _name(rid, op, "table", msg.get("table"))
    params = _str_map(rid, "params", msg.get("params"))
    vr = msg.get("vr")
    if vr is not None and type(vr) is not str:
        raise BadRequest(rid, ProgrammingError, f"'vr' must be a str or nil, got {type(vr).__name__}")
    notify = msg.get("notify")
    if notify is not None and type(notify) is not bool:
        raise BadRequest(rid, ProgrammingError, f"'notify' must be true, false or nil, got {type(notify).__name__}")
    after = _str_map(rid, "after", msg.get("after"), allow_null=True) or None
    batch = msg.get("batch", P.DEFAULT_BATCH)
    if type(batch) is not int or not 1 <= batch <= MAX_BATCH:
        raise BadRequest(rid, ProgrammingError, f"'batch' must be an integer from 1 to {MAX_BATCH}, got {_show(batch)}")
    index = _columns(rid, "index", msg.get("index"))
    match = _columns(rid, "match", msg.get("match"))
    if match:
        if op != "getnext":
            raise BadRequest(rid, ProgrammingError, f"'match' shapes a getnext walk; {op} takes none")
        unset = [column for column in match if column not in params]
        if unset:
            raise BadRequest(
                rid,
                ProgrammingError,
                f"'match' column {_show(unset[0])} has no value in 'params' to match rows against",
            )
    method = msg.get("method")
    if method is not None and not _is_method(op, method):
        raise BadRequest(
            rid,
            ProgrammingError,
            f"'method' {_show(method)} must name an action a read runs instead of <table>_get (such as "
            f"'show', for <table>_show): a name, on a get, getone or getnext, and not {', '.join(_RESERVED)}",
        )
    hold = msg.get("hold")
    if hold is not None:
        if type(hold) not in (int, float):
            raise BadRequest(rid, ProgrammingError, f"'hold' must be a number of seconds, got {type(hold).__name__}")
        if not math.isfinite(hold):  # NaN passes "< 0", and either would poison the loop's timer heap
            raise BadRequest(rid, ProgrammingError, f"'hold' must be a finite number of seconds, got {hold!r}")
        if hold < 0:
            raise BadRequest(rid, ProgrammingError, f"'hold' must be a number of seconds >= 0, got {hold!r}")
        if hold > MAX_HOLD:
            raise BadRequest(
                rid, ProgrammingError, f"'hold' of {hold!r}s is more than a request may be held, {MAX_HOLD:g}s (a day)"
            )
    return Request(
        id=rid,
        op=op,
        user=user,
        module=module,
        table=table,
        params=params,
        vr=vr,
        notify=notify,
        after=after,
        batch=batch,
        index=index,
        match=match,
        hold=hold,
        caller=_caller(rid, msg.get("caller")),
        method=method,
        token=token,
    )


# What a read's method may not name: the ops' own actions (a read must not run <table>_set).
_RESERVED = tuple(sorted(set(P.ACTION_SUFFIX.values())))


def _is_method(op, method):
    return op in P.READ_OPS and type(method) is str and _is_name(method) and method not in _RESERVED


def _str_map(rid, name, value, allow_null=False):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(rid, ProgrammingError, f"'{name}' must be a map of str to str, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(key, str):
            raise BadRequest(
                rid, ProgrammingError, f"'{name}' has a {type(key).__name__} key {_show(key)}; keys must be str"
            )
        if not (isinstance(item, str) or (allow_null and item is None)):
            raise BadRequest(rid, ProgrammingError, f"'{name}.{_clip(key)}' must be a str, got {type(item).__name__}")
    return value


def _columns(rid, name, value):
    """A walk's 'index' or 'match': nil, or a list of distinct column names (str)."""
    if value is None:
        return None
    if type(value) is not list or len(value) > MAX_WALK_COLUMNS:
        raise BadRequest(
            rid,
            ProgrammingError,
            f"'{name}' must be a list of at most {MAX_WALK_COLUMNS} column names, got {_show(value)}",
        )
    for column in value:
        if type(column) is not str or not column:
            raise BadRequest(rid, ProgrammingError, f"'{name}' holds {_show(column)}; column names are non-empty str")
    if len(set(value)) != len(value):
        raise BadRequest(rid, ProgrammingError, f"'{name}' names a column twice: {_show(value)}")
    return value


# Module and table names that passed NAME_RE. Matching the regex costs about 2,500
# instructions a name (for a get's two, 5 % of its instructions in the supervisor); a
# set lookup, a small part of that.
_names = set()


def _is_name(value):
    if type(value) is not str:
        return False
    if value not in _names:
        if not P.NAME_RE.match(value):
            return False
        if len(_names) < 10000:  # bounded against clients inventing names
            _names.add(value)
    return True


def _name(rid, op, key, value):
    """A module or table name, or BadRequest."""
    if not _is_name(value):
        raise BadRequest(rid, ProgrammingError, f"{op}: bad {key} name {_show(value)}")
    return value


def _token(rid, op, token):
    """A set's or setop's 'token', or BadRequest."""
    if op not in _WRITE_OPS:
        raise BadRequest(
            rid, ProgrammingError, f"'token' goes with a set or setop (the key that applies it once); {op} takes none"
        )
    if type(token) is not str or not _TOKEN_RE.fullmatch(token):
        raise BadRequest(
            rid,
            ProgrammingError,
            f"'token' must be a str of 1 to {MAX_TOKEN} printable ASCII characters without spaces, got {_show(token)}",
        )


def _flag(rid, op, key, value):
    """true, false or nil, or BadRequest."""
    if value is not None and type(value) is not bool:
        raise BadRequest(rid, ProgrammingError, f"{op}: '{key}' must be true, false or nil, got {_show(value)}")
    return value


def _modules(rid, modules):
    """An export's 'modules': nil (every module) or a list of module names."""
    if modules is None:
        return None
    if type(modules) is not list:
        raise BadRequest(
            rid, ProgrammingError, f"export: 'modules' must be a list of module names or nil, got {_show(modules)}"
        )
    for name in modules:
        _name(rid, "export", "module", name)
    return modules


def _caller(rid, caller):
    """The action a request comes from: nil, or [module, 'serial'|'async', request id] (as a tuple)."""
    if caller is None:
        return None
    if not (
        type(caller) is list
        and len(caller) == 3
        and type(caller[0]) is str
        and type(caller[1]) is str
        and caller[1] in ("serial", "async")
        and type(caller[2]) is int
    ):
        raise BadRequest(
            rid, ProgrammingError, f"'caller' must be [module, 'serial'|'async', request id], got {_show(caller)}"
        )
    return tuple(caller)
