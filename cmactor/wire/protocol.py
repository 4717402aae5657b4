"""Framing and message kinds shared by clients, the supervisor and workers.

Every stream in cmactor (client <-> supervisor socket, supervisor <-> worker
socketpair) carries frames of a 4-byte big-endian length followed by one msgpack
object. msgpack, never pickle: a client's bytes are untrusted, and one codec for
both hops keeps the hot path simple.
"""

import collections
import functools
import re
import struct
import threading

import msgpack

HEADER = struct.Struct(">I")

# Frames from clients larger than this are refused before their body is read.
MAX_FRAME = 8 * 1024 * 1024

# 64 KiB reads: glibc mmaps/unmaps buffers of 128 KiB or more on every recv()
# (measured ~20 us instead of ~3.5 us per call, DESIGN.md).
READ_SIZE = 65536

# Operations a client may send. "getone" is the original platform's name for get.
DATA_OPS = ("get", "getone", "getnext", "set", "setop")
CONTROL_OPS = ("status", "save", "stop", "restart", "ping", "export", "route")
# Data ops a client may send straight to the module's worker (cmactor/direct.py).
READ_OPS = ("get", "getone", "getnext")

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

# Worker channel messages: msgpack arrays whose first item is the message kind.
# Each kind's layout is written once, here, as a named tuple class: ``Reply.of(sid,
# error, entries, dirty)`` builds one for the wire (a plain tuple, the kind filled
# in: msgpack packs it as the same array a list would be, and it costs a third of a
# named tuple's construction on the hot path), and ``Reply.read(message)`` (or
# decode(), for a message of any kind) reads one from the wire as a ``Reply`` whose
# fields have names.
_KINDS = {}
_new_tuple = tuple.__new__


def _kind(code, name, fields, doc):
    cls = collections.namedtuple(name, ("kind", *fields.split()))
    cls.of = staticmethod(_constructor(code, name, cls._fields[1:]))
    # A partial of tuple.__new__: called for every message, it costs no Python frame.
    cls.read = functools.partial(_new_tuple, cls)
    cls.CODE = code
    cls.__doc__ = doc
    _KINDS[code] = cls
    return cls


def _constructor(code, name, fields):
    """``of(field, ...)``: the plain tuple (code, field, ...). Made from source, as
    namedtuple makes its own __new__: named parameters, so a wrong count is Python's own
    TypeError naming them, at no cost per call (a check of *args cost a third of a
    Reply's construction)."""
    items = ", ".join((str(code), *fields)) + ("," if not fields else "")
    namespace = {}
    exec(f"def of({', '.join(fields)}):\n    return ({items})\n", namespace)
    of = namespace["of"]
    of.__qualname__ = f"{name}.of"
    return of


def decode(message):
    """A worker channel message (a list from the wire, from our own peer) as its named tuple."""
    return _new_tuple(_KINDS[message[0]], message)


# supervisor -> worker
Req = _kind(
    1,
    "Req",
    "sid op table params vr flags batch after index match",
    "A client's request for one action (or walk); index and match shape a getnext walk (actions.walk).",
)
Load = _kind(
    2, "Load", "sid section journal", "Load saved rows (JSON bytes or None) and journal records; neither: defaults."
)
Stop = _kind(3, "Stop", "", "Leave once in-flight work is done.")
Save = _kind(4, "Save", "sid tables", "Walk these persistent tables and return the module's section.")
Ping = _kind(5, "Ping", "", "Are you alive? Answered with a Pong by whichever lane thread reads.")
Serve = _kind(6, "Serve", "", "The module is READY: serve reads sent to the worker's own socket (cmactor/direct.py).")
Cancel = _kind(7, "Cancel", "sids", "Their client is gone: drop these requests if they have not started.")
# worker -> supervisor
Init = _kind(10, "Init", "persistent_list config_deps async_actions pool_size", "cmbackend_init() was called.")
Ready = _kind(11, "Ready", "", "The agent called ready().")
Reply = _kind(12, "Reply", "sid error entries dirty", "A request's answer: an error map, or reply_entries() bytes.")
Notify = _kind(13, "Notify", "sid text", "notify_cli() text for a request's client.")
Log = _kind(14, "Log", "level name text", "A log record of the worker's.")
Fatal = _kind(15, "Fatal", "message detail", "The entry raised or returned without registering; the worker exits.")
Loaded = _kind(
    16,
    "Loaded",
    "sid error failures failed detail",
    "The load ended: event error, first row errors, rows failed, and the event's traceback (or None).",
)
Saved = _kind(
    17,
    "Saved",
    "sid error section rows",
    "The save walk ended: an error, or the section (JSON bytes) and its row count.",
)
Pong = _kind(18, "Pong", "", "The answer to a Ping.")
Dirty = _kind(19, "Dirty", "", "A direct read's action set ctx.dirty: the module has changes not saved.")

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
# reader (cmactor/direct.py), taken for the read and given back after it: at most
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


def reply_entries(rows, more):
    """A worker's success reply, encoded once in the worker, in the frontend's format:
    the "ok", "rows" and "more" entries of the client's reply map, without the map's
    header. The supervisor only adds the request id (reply_frame) and never decodes
    or re-encodes the rows: a getnext batch of 1000 rows crosses it as one bytes copy."""
    return _OK_ROWS + _packers.packer.pack(rows) + _MORE[bool(more)]


# The entries around the rows, encoded once: "ok": true, "rows": ... then "more": false
# or true (half the cost of packing the map for each reply, and the same bytes).
_OK_ROWS = msgpack.packb("ok") + msgpack.packb(True) + msgpack.packb("rows")
_MORE = (msgpack.packb("more") + msgpack.packb(False), msgpack.packb("more") + msgpack.packb(True))


# A fixmap of 4 entries, then the key "id": reply_entries() brings the other 3.
_REPLY_HEAD = b"\x84\xa2id"


def reply_frame(rid, entries):
    """The frame {"id": rid, "ok": True, "rows": ..., "more": ...} from reply_entries()."""
    head = _REPLY_HEAD + _packers.packer.pack(rid)
    return HEADER.pack(len(head) + len(entries)) + head + entries


class FrameError(Exception):
    """The byte stream is not a valid sequence of frames; the stream cannot be resynced."""


class _Packers(threading.local):
    # One Packer per thread, reused (msgpack.packb() builds a new one on every call),
    # made the first time a thread asks: a threading.local subclass runs __init__ once
    # per thread, so a plain attribute read finds it.
    def __init__(self):
        self.packer = msgpack.Packer(use_bin_type=True)


_packers = _Packers()


def pack(obj):
    """One frame: length header + msgpack body."""
    body = _packers.packer.pack(obj)
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Incremental frame decoder: feed bytes, get whole messages."""

    __slots__ = ("_buf", "_max", "partial")

    def __init__(self, max_frame=MAX_FRAME):
        self._buf = bytearray()
        self._max = max_frame
        # Bytes of a frame that has started and not finished (0: none): len(_buf), kept
        # as a plain attribute since the server reads it after every read.
        self.partial = 0

    def feed(self, data):
        if not self._buf:
            # The common case: nothing pending and the read holds whole frames.
            end = len(data)
            if end >= 4:
                (size,) = HEADER.unpack_from(data)
                if end == size + 4 and (self._max is None or size <= self._max):
                    try:  # _decode's work, inline: this runs for every request and reply
                        return [_unpackb(data[4:], raw=False, strict_map_key=True)]
                    except Exception as exc:
                        raise _not_msgpack(exc) from None
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
                out.append(self._decode(view[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        self.partial = len(buf)
        return out

    @staticmethod
    def _decode(body):
        try:
            return _unpackb(body, raw=False, strict_map_key=True)
        except Exception as exc:
            raise _not_msgpack(exc) from None


_unpackb = msgpack.unpackb


def _not_msgpack(exc):
    """The FrameError for a body msgpack would not decode (it raises several unrelated types on garbage)."""
    return FrameError(f"frame is not valid msgpack ({type(exc).__name__}: {exc})")
