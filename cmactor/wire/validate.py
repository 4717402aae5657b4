"""Checking what a client sends: one request map, field by field, and the peer's uid.

Both sockets that take client requests use this code: the supervisor's, and each
worker's own socket for direct reads (cmactor/direct.py). Every field is checked
before a request is handed on, and an error names the field and what it must be;
client data quoted in an error goes through a bounded repr.
"""

import math
import reprlib
import socket
import struct

from cmactor.errors import ProgrammingError
from cmactor.wire import protocol as P

_PEERCRED = struct.Struct("3i")

# The longest hold a request may ask for: it stays in the loop's timer heap that long.
MAX_HOLD = 86400.0

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


def _str_map(rid, name, value, allow_null=False):
    if value is None:
        return {}
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str or type(item) is not str:
                break
        else:
            return value  # the common case (frames decode with strict_map_key, which lets bin keys through)
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


_good_names = set()  # module and table names that passed NAME_RE

MAX_WALK_COLUMNS = 64  # index or match columns of one walk: real tables have a handful


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


def _name(rid, op, key, value):
    if type(value) is not str or value not in _good_names:
        if not isinstance(value, str) or not P.NAME_RE.match(value):
            raise BadRequest(rid, ProgrammingError, f"{op}: bad {key} name {_show(value)}")
        if len(_good_names) < 10000:  # a cache, bounded against clients inventing names
            _good_names.add(value)


# A data request with no other keys has nothing left to check once module, table,
# params, vr and notify are: the usual get or set.
_PLAIN_KEYS = frozenset(("id", "op", "module", "table", "params", "user", "vr", "notify"))
_DATA_OPS = frozenset(P.DATA_OPS)
_OPS = frozenset(P.DATA_OPS + P.CONTROL_OPS)


def parse_request(msg):
    """Check one decoded frame and return it as a request map, or raise BadRequest.

    A data request comes back with ``params`` (a dict), ``after`` (a dict or None)
    and ``batch`` filled in.
    """
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
    if op not in _DATA_OPS:
        if op == "restart" or op == "route" or (op == "status" and msg.get("module") is not None):
            _name(rid, op, "module", msg.get("module"))
        if op == "export":
            _modules(rid, msg.get("modules"))
        _check_caller(rid, msg.get("caller"))
        return msg
    # The name checks' common case inline: a name seen before (one set lookup each).
    module, table = msg.get("module"), msg.get("table")
    if type(module) is not str or module not in _good_names:
        _name(rid, op, "module", module)
    if type(table) is not str or table not in _good_names:
        _name(rid, op, "table", table)
    msg["params"] = _str_map(rid, "params", msg.get("params"))
    vr = msg.get("vr")
    if vr is not None and type(vr) is not str:
        raise BadRequest(rid, ProgrammingError, f"'vr' must be a str or nil, got {type(vr).__name__}")
    notify = msg.get("notify")
    if notify is not None and type(notify) is not bool:
        raise BadRequest(rid, ProgrammingError, f"'notify' must be true, false or nil, got {type(notify).__name__}")
    if msg.keys() <= _PLAIN_KEYS:
        msg["after"] = None
        msg["batch"] = P.DEFAULT_BATCH
        return msg
    msg["after"] = _str_map(rid, "after", msg.get("after"), allow_null=True) or None
    batch = msg.get("batch", P.DEFAULT_BATCH)
    if type(batch) is not int or not 1 <= batch <= 100000:
        raise BadRequest(rid, ProgrammingError, f"'batch' must be an integer from 1 to 100000, got {_show(batch)}")
    msg["batch"] = batch
    msg["index"] = _columns(rid, "index", msg.get("index"))
    match = msg["match"] = _columns(rid, "match", msg.get("match"))
    if match:
        if msg["op"] != "getnext":
            raise BadRequest(rid, ProgrammingError, f"'match' shapes a getnext walk; {msg['op']} takes none")
        unset = [column for column in match if column not in msg["params"]]
        if unset:
            raise BadRequest(
                rid,
                ProgrammingError,
                f"'match' column {_show(unset[0])} has no value in 'params' to match rows against",
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
    _check_caller(rid, msg.get("caller"))
    return msg


def _modules(rid, modules):
    """An export's 'modules': nil (every module) or a list of module names."""
    if modules is None:
        return
    if type(modules) is not list:
        raise BadRequest(
            rid, ProgrammingError, f"export: 'modules' must be a list of module names or nil, got {_show(modules)}"
        )
    for name in modules:
        _name(rid, "export", "module", name)


def _check_caller(rid, caller):
    """The action a request comes from: nil, or [module, 'serial'|'async', request id]."""
    if caller is not None and not (
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
