"""Raw client sockets: what a Cursor would never send, and the frames that come back."""

import socket
import struct

import msgpack

from cmactor.wire import protocol as P


def raw(sup):
    """A bare socket connected to a supervisor's frontend, for what a Cursor would never send."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(sup.socket_path)
    return sock


def read_frames(sock, count=1):
    """Up to ``count`` frames from ``sock``, decoded (fewer if it closes first)."""
    reader = P.FrameReader(max_frame=None)
    frames = []
    while len(frames) < count:
        data = sock.recv(65536)
        if not data:
            break
        frames.extend(reader.feed(data))
    return frames


def frame(body):
    """A frame of raw bytes: what a client could send that msgpack would never pack."""
    return struct.pack(">I", len(body)) + body


DEEP = "[[[[...]]]]"  # how the error messages show a value nested too deep to print

# field -> the error a request gets when that field holds a value nested 1000 deep


DEEP_FIELD_ERRORS = {
    "id": f"request 'id' must be an integer, got {DEEP}",
    "op": f"unknown op {DEEP}",
    "module": f"getnext: bad module name {DEEP}",
    "table": f"getnext: bad table name {DEEP}",
    "params": "'params' must be a map of str to str, got list",
    "vr": "'vr' must be a str or nil, got list",
    "notify": "'notify' must be true, false or nil, got list",
    "user": "'user' must be a str, got list",
    "after": "'after' must be a map of str to str, got list",
    "batch": f"'batch' must be an integer from 1 to 100000, got {DEEP}",
    "hold": "'hold' must be a number of seconds, got list",
    "caller": f"'caller' must be [module, 'serial'|'async', request id], got {DEEP}",
    "index": f"'index' holds {DEEP}; column names are non-empty str",
    "match": f"'match' holds {DEEP}; column names are non-empty str",
}


def send_deeply_nested_fields(sock):
    """Send a getnext with each field of DEEP_FIELD_ERRORS nested 1000 deep (msgpack decodes
    it: it stops at 1024; a builtin repr of it raises RecursionError) and check each reply."""
    for field, text in DEEP_FIELD_ERRORS.items():
        request = {"id": 5, "op": "getnext", "module": "echo", "table": "kv"}
        request.pop(field, None)
        body = msgpack.packb(request)
        body = bytes([body[0] + 1]) + body[1:] + msgpack.packb(field) + b"\x91" * 1000 + b"\x01"  # one more entry
        sock.sendall(frame(body))
        [reply] = read_frames(sock)
        assert reply["ok"] is False and reply["error"]["type"] == "ProgrammingError", field
        assert text in reply["error"]["message"], (field, reply)
        assert reply["id"] == (None if field == "id" else 5)
