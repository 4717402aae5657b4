"""Raw client sockets: what a Cursor would never send, and the frames that come back;
and the two client sockets a hostile client can reach (Target)."""

import os
import socket
import struct
import time

import msgpack
import psutil
from helpers import wait_for

from cmactor.errors import WIRE_ERRORS
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


# -- both client sockets: the supervisor's and the echo module's worker's ----------------

GET_DEFAULT = {"id": 1, "op": "get", "module": "echo", "table": "kv", "params": {"key": "default"}}
DEFAULT_REPLY = {"id": 1, "ok": True, "rows": [{"key": "default", "value": "yes"}], "more": False}
MiB = 1024 * 1024


def dial(path, timeout=10, patience=0):
    """A socket connected to ``path``; for up to ``patience`` seconds a full listen backlog
    (EAGAIN, left by a flood of connections) is waited out."""
    deadline = time.monotonic() + patience
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def reset(sock):
    """Close ``sock`` with a reset (SO_LINGER 0), not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def closed_by_peer(sock):
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def frames_to_eof(sock):
    """Every frame the peer sends until it closes the connection (a reset counts as a close)."""
    reader = P.FrameReader(max_frame=None)
    frames = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return frames
        if not data:
            return frames
        frames.extend(reader.feed(data))


def the_reply(sock):
    """The one frame the peer sends (to what it must answer before it closes)."""
    replies = read_frames(sock)
    assert len(replies) == 1, f"expected one reply, got {replies}" + (" (closed without a word)" if not replies else "")
    return replies[0]


def read_to_eof(sock):
    """Bytes the peer sent before it closed the connection."""
    total = 0
    try:
        while data := sock.recv(1 << 20):
            total += len(data)
    except ConnectionResetError:
        pass
    return total


def check_error_reply(reply):
    """A reply to something bad: a well-formed error, never a success."""
    assert type(reply) is dict and reply.get("ok") is False, reply
    assert reply["id"] is None or type(reply["id"]) is int, reply
    assert reply["error"]["type"] in WIRE_ERRORS and type(reply["error"]["message"]) is str, reply


def getnext_kv(count):
    return b"".join(P.pack({"id": i, "op": "getnext", "module": "echo", "table": "kv"}) for i in range(count))


def fill_big(sup):
    """100 rows of 10 kB: each getnext of the kv table is a reply of 1 MB."""
    with sup.connect(timeout=10) as conn:
        cur = conn.cursor()
        for i in range(100):
            cur.execute("set echo.kv", {"key": f"big{i:03}", "value": "x" * 10_000})


class Target:
    """One of the echo module's client sockets as a raw client finds it: ``kind``
    "supervisor" (the supervisor's own) or "direct" (its worker's, for direct reads, which
    the supervisor runs with); and the checks that neither process was harmed."""

    def __init__(self, sup, kind):
        self.sup = sup
        self.kind = kind
        status = wait_for(
            lambda: (s := sup.status()["echo"])["state"] == "READY" and s["direct"] and s["direct"]["serving"] and s
        )
        self.pid = status["pid"]  # the worker's
        self.route = {"path": status["direct"]["path"], "generation": status["direct"]["generation"]}
        self.path = sup.socket_path if kind == "supervisor" else self.route["path"]
        self.log_path = os.path.join(sup.state_dir, "logs", "echo.log")
        # The supervisor says "serving" once it has told the worker; the worker redirects
        # reads until it has heard.
        wait_for(lambda: self.get_directly() == [DEFAULT_REPLY], timeout=5)

    def connect(self, timeout=10, patience=0):
        """A raw connection to this socket."""
        return dial(self.path, timeout, patience)

    def get_directly(self, timeout=10):
        sock = dial(self.route["path"], timeout, patience=5)
        try:
            sock.sendall(P.pack(GET_DEFAULT))
            return read_frames(sock)
        finally:
            sock.close()

    def get_through_supervisor(self, timeout=10):
        sock = raw(self.sup)
        sock.settimeout(timeout)
        try:
            sock.sendall(P.pack(GET_DEFAULT))
            return read_frames(sock)
        finally:
            sock.close()

    def direct_status(self):
        return self.sup.status()["echo"]["direct"]

    def inflight(self):
        """Requests of this socket's clients handed on and not answered yet."""
        status = self.sup.status()["echo"]
        return status["inflight"] if self.kind == "supervisor" else status["direct"]["inflight"]

    def connections(self):
        """Clients connected to this socket now."""
        if self.kind == "supervisor":
            return self.sup.supervisor_status()["clients"]
        return self.direct_status()["connections"]

    def process(self):
        """The process serving this socket."""
        return psutil.Process(os.getpid() if self.kind == "supervisor" else self.pid)

    def wait_idle(self, timeout=5):
        """Wait until nothing is connected, in flight or queued on either socket."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.sup.status()["echo"]
            direct = status["direct"]
            busy = {
                "clients": self.sup.supervisor_status()["clients"],
                "inflight": status["inflight"],
                "queue": status["queue"],
                "direct connections": direct["connections"],
                "direct inflight": direct["inflight"],
                "direct queue": direct["queue"],
            }
            if not any(busy.values()):
                return
            assert time.monotonic() < deadline, f"the sockets are not idle after {timeout}s: {busy}"
            time.sleep(0.02)

    def assert_unharmed(self):
        """Same worker process, READY, serving reads directly, through the supervisor and to a
        Cursor; nothing left connected or in flight on either socket, and no thread of the
        worker died."""
        status = self.sup.status()["echo"]
        assert status["state"] == "READY", status
        assert status["pid"] == self.pid and status["restarts"] == 0, f"the worker was restarted: {status}"
        assert psutil.pid_exists(self.pid)
        direct = status["direct"]
        assert direct is not None and direct["serving"], status
        assert {"path": direct["path"], "generation": direct["generation"]} == self.route
        assert self.get_directly() == [DEFAULT_REPLY]
        assert self.get_through_supervisor() == [DEFAULT_REPLY]
        with self.sup.connect(timeout=10) as conn:
            cur = conn.cursor()
            cur.execute("get echo.kv", {"key": "default"})
            assert cur.fetchone() == ("default", "yes")
        self.wait_idle()
        with open(self.log_path, errors="replace") as log_file:
            text = log_file.read()
        # A thread of the direct socket that died of an exception (threading.excepthook's
        # words); the agent's own errors (echo.boom) are logged with tracebacks on purpose.
        assert "Exception in thread" not in text and "Fatal Python error" not in text, text[-3000:]
