"""Framing and message kinds shared by clients, the supervisor and workers.

Every stream in cmactor (client <-> supervisor socket, supervisor <-> worker
socketpair) carries frames of a 4-byte big-endian length followed by one msgpack
object. msgpack, never pickle: a client's bytes are untrusted, and one codec for
both hops keeps the hot path simple. msgspec encodes and decodes it, in C, and
decodes straight into the typed messages below (and validate.Request).
"""

import re
import struct
from typing import Any

import msgspec

HEADER = struct.Struct(">I")

# Frames from clients larger than this are refused before their body is read.
MAX_FRAME = 8 * 1024 * 1024

# 64 KiB reads: glibc mmaps/unmaps buffers of 128 KiB or more on every recv()
# (measured ~20 us instead of ~3.5 us per call: docs/architecture.md).
READ_SIZE = 65536

# Operations a client may send. "getone" is the original platform's name for get.
DATA_OPS = ("get", "getone", "getnext", "set", "setop")
# stop, start and restart with a "module" are an operator's (supervisor/supervision/admin.py);
# stop without one stops the supervisor. ha: this node's place in a hot-standby cluster
# (its role, and which node is active), what a client given several sockets asks each.
# schema: the tables each module declares (CmAgent.columns), for a RESTCONF server.
CONTROL_OPS = ("status", "save", "stop", "start", "restart", "reload", "ping", "export", "route", "ha", "schema")
# Data ops a client may send straight to the module's worker (cmactor/worker/direct.py).
READ_OPS = ("get", "getone", "getnext")

# Data ops that change the config: a standby refuses them (NotActive), and a client given
# several sockets marks each with a "token", so that a resend after a takeover applies it once.
WRITE_OPS = ("set", "setop")

# op -> action method suffix: get, getone and getnext all read through <table>_get.
ACTION_SUFFIX = {"get": "get", "getone": "get", "getnext": "get", "set": "set", "setop": "setop"}

# Names of modules and tables: they become part of a Python method name
# (<table>_<op>), so no leading underscore and nothing but word characters.
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")

OPERATION_RE = re.compile(
    r"\s*(?P<op>[A-Za-z]+)\s+(?P<module>[A-Za-z][A-Za-z0-9_]*)\.(?P<table>[A-Za-z][A-Za-z0-9_]*)\s*\Z"
)

# Rows per getnext batch when a client does not say.
DEFAULT_BATCH = 1000


# Worker channel messages: each kind a Struct sent as a msgpack array whose first item
# is the kind's tag, then its fields in order. The two ends trust each other; the
# channel's decoder (CHANNEL) reads any kind, the tag picking the Struct. Frozen and
# left out of the garbage collector: a message holds no reference back to itself.
class _Message(msgspec.Struct, array_like=True, frozen=True, gc=False):
    pass


# supervisor -> worker
class Req(_Message, tag=1):
    """A client's request for one action (or walk); index and match shape a getnext walk (actions.walk);
    method, when not None, names the action a read runs instead of <table>_get (<table>_<method>)."""

    sid: int
    op: str
    table: str
    params: dict[str, str]
    vr: str | None
    flags: int
    batch: int
    after: dict[str, str | None] | None
    index: list[str] | None
    match: list[str] | None
    method: str | None


class Load(_Message, tag=2):
    """Load saved rows (JSON bytes or None) and journal records ([op, table, params], as the journal
    holds them); neither: defaults."""

    sid: int
    section: bytes | None
    journal: list[list[Any]]


class Stop(_Message, tag=3):
    """Leave once in-flight work is done."""


class Save(_Message, tag=4):
    """Walk these persistent tables and return the module's section."""

    sid: int
    tables: list[str]


class Ping(_Message, tag=5):
    """Are you alive? Answered with a Pong by whichever lane thread reads."""


class Role(_Message, tag=6):
    """The node's role in its cluster ([ha]): ``standby`` while it follows the active (ctx.is_standby)."""

    standby: bool


class Cancel(_Message, tag=7):
    """Their client is gone: drop these requests if they have not started."""

    sids: frozenset[int]


# worker -> supervisor
class TableSchema(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A table the agent declares columns for (CmAgent.columns): what a RESTCONF server
    exposes of it (cmbackend.declared_schema): its index columns ([]: none, a container),
    its columns in order, and whether it has <table>_set (config), <table>_setop, and is
    in CmAgent.delete_tables."""

    index: list[str]
    columns: list[str]
    config: bool
    setop: bool
    delete: bool


class Init(_Message, tag=10):
    """cmbackend_init() was called; ``tables``: the tables it declares columns for, by name."""

    persistent_list: list[str]
    config_deps: list[str]
    async_actions: list[str]
    pool_size: int | None
    tables: dict[str, TableSchema]


class Ready(_Message, tag=11):
    """The agent called ready()."""


class Reply(_Message, tag=12):
    """A request's answer: an error map, or reply_entries() bytes."""

    sid: int
    error: dict[str, str] | None
    entries: bytes | None
    dirty: bool


class Notify(_Message, tag=13):
    """notify_cli() text for a request's client."""

    sid: int
    text: str


class Log(_Message, tag=14):
    """A log record of the worker's."""

    level: int
    name: str
    text: str


class Fatal(_Message, tag=15):
    """The entry raised or returned without registering; the worker exits."""

    message: str
    detail: str


class Loaded(_Message, tag=16):
    """The load ended: event error, first row errors, rows failed, and the event's traceback (or None)."""

    sid: int
    error: str | None
    failures: list[dict[str, Any]]
    failed: int
    detail: str | None


class Saved(_Message, tag=17):
    """The save walk ended: an error, or the section (JSON bytes) and its row count."""

    sid: int
    error: str | None
    section: bytes | None
    rows: int


class Pong(_Message, tag=18):
    """The answer to a Ping."""


class Dirty(_Message, tag=19):
    """A direct read's action set ctx.dirty: the module has changes not saved."""


# One decoder reads every kind (to the worker, then to the supervisor), each told apart by its tag.
CHANNEL = msgspec.msgpack.Decoder(
    (Req | Load | Stop | Save | Ping | Role | Cancel)
    | (Init | Ready | Reply | Notify | Log | Fatal | Loaded | Saved | Pong | Dirty)
)

# Progress slots: an int64 array in shared memory per worker, written by its lanes
# as they start and finish work, so that after a crash the supervisor knows which
# unanswered requests had started (they fail) and which had not (they run again).
# No message is spent on it. Start times (monotonic ns, 0 = idle) also show a
# serial lane stuck in one action.
SLOT_SERIAL_SID = 0  # id of the last item the serial lane started
SLOT_SERIAL_START = 1  # when it started it; 0 once it finished
SLOT_OVERFLOW = 2  # 1 if an async request ran without a slot: treat all as started
ASYNC_SLOTS = 256  # then one (sid, start) pair per pool thread: its last sid, and when it began (0 once done)
# Then one (sid, start) pair per direct read of an @async_action running on a direct
# reader (cmactor/worker/direct.py), taken for the read and given back after it: at most
# direct_async_limit() run at once, and the supervisor sees any that hang.
DIRECT_SLOTS = 64
SLOTS_SIZE = 3 + 2 * ASYNC_SLOTS + 2 * DIRECT_SLOTS


def async_slot(index):
    return 3 + 2 * index


def direct_slot(index):
    return 3 + 2 * ASYNC_SLOTS + 2 * index


def direct_async_limit(pool_size):
    """Direct reads of @async_action a worker runs at once: as many as its pool has threads
    (an executor that does not say: DIRECT_SLOTS). Past it they go through the supervisor."""
    return min(pool_size or DIRECT_SLOTS, DIRECT_SLOTS)


# Row errors a worker reports in detail after a load; the rest are counted.
MAX_ROW_ERRORS = 20
# A save walk longer than this is an agent whose getnext never ends.
SAVE_MAX_ROWS = 10_000_000

# REQ flags
F_NOTIFY = 1  # the client wants notify_cli text

# One encoder for every thread: msgspec's Encoder.encode is thread-safe.
_encoder = msgspec.msgpack.Encoder()


def reply_entries(rows, more):
    """A worker's success reply, encoded once in the worker, in the frontend's format:
    the "ok", "rows" and "more" entries of the client's reply map, without the map's
    header. The supervisor only adds the request id (reply_frame) and never decodes
    or re-encodes the rows: a getnext batch of 1000 rows crosses it as one bytes copy."""
    return _OK_ROWS + _encoder.encode(rows) + _MORE[bool(more)]


# The entries around the rows, encoded once: "ok": true, "rows": ... then "more": false
# or true (half the cost of packing the map for each reply, and the same bytes).
_OK_ROWS = _encoder.encode("ok") + _encoder.encode(True) + _encoder.encode("rows")
_MORE = (_encoder.encode("more") + _encoder.encode(False), _encoder.encode("more") + _encoder.encode(True))


# A fixmap of 4 entries, then the key "id": reply_entries() brings the other 3.
_REPLY_HEAD = b"\x84\xa2id"


def reply_frame(rid, entries):
    """The frame {"id": rid, "ok": True, "rows": ..., "more": ...} from reply_entries()."""
    head = _REPLY_HEAD + _encoder.encode(rid)
    return HEADER.pack(len(head) + len(entries)) + head + entries


class FrameError(Exception):
    """The byte stream is not a valid sequence of frames; the stream cannot be resynced."""


def pack(obj):
    """One frame: length header + msgpack body."""
    body = _encoder.encode(obj)
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Incremental frame decoder: feed bytes, get whole messages.

    ``decode`` turns a frame's body into its message: by default plain objects (maps as
    dicts: a client's replies); CHANNEL.decode for a worker channel, validate.decode_request
    for a client's requests. Whatever it raises makes the stream a FrameError."""

    __slots__ = ("_buf", "_max", "_decode", "partial")

    def __init__(self, max_frame=MAX_FRAME, decode=msgspec.msgpack.decode):
        self._buf = bytearray()
        self._max = max_frame
        self._decode = decode
        # Bytes of a frame that has started and not finished (0: none): len(_buf), kept
        # as a plain attribute since the server reads it after every read.
        self.partial = 0

    def feed(self, data):
        if not self._buf and len(data) >= 4:
            # The common case: nothing pending and the read is one whole frame. Decoded
            # from ``data`` itself, never copied into the buffer: 5,000 instructions
            # less a read, a tenth of a get in the supervisor (which reads two).
            (size,) = HEADER.unpack_from(data)
            if len(data) == size + 4 and (self._max is None or size <= self._max):
                return [self._body(data[4:])]
        buf = self._buf
        buf += data
        out = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (size,) = HEADER.unpack_from(buf, pos)
            if self._max is not None and size > self._max:
                raise FrameError(f"frame of {size} bytes exceeds the limit of {self._max} bytes")
            if end - pos - 4 < size:
                break
            with memoryview(buf) as view:  # no copy of the body; released before buf shrinks
                out.append(self._body(view[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        self.partial = len(buf)
        return out

    def _body(self, body):
        try:
            return self._decode(body)
        except Exception as exc:  # msgpack (validate.decode_request) raises several unrelated types on garbage
            raise FrameError(f"frame is not valid msgpack ({type(exc).__name__}: {exc})") from None
