"""Bad bytes and bad clients on a worker's own socket (direct reads, cmactor/direct.py).

The same hostile input the supervisor's socket is tested with (test_socket_input.py,
test_hostile.py), sent straight to the echo module's worker. After each case the
worker must be the same process (never restarted), the module READY, and reads
must still be served both directly and through the supervisor.
"""

import collections
import contextlib
import os
import pickle
import select
import socket
import struct
import subprocess
import sys
import threading
import time

import msgpack
import psutil
import pytest
from helpers import agent, wait_for
from hypothesis import HealthCheck, given, settings, strategies as st
from rawsocket import frame, raw, read_frames, send_deeply_nested_fields

from cmactor.errors import WIRE_ERRORS
from cmactor.wire import protocol as P

ECHO = agent("echo.py:main")
MAX_FRAME = 64 * 1024
FRAME_TIMEOUT = 0.5
NOBODY = 65534
MiB = 1024 * 1024

GET_DEFAULT = {"id": 1, "op": "get", "module": "echo", "table": "kv", "params": {"key": "default"}}
DEFAULT_REPLY = {"id": 1, "ok": True, "rows": [{"key": "default", "value": "yes"}], "more": False}


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


class Worker:
    """The echo module's worker as a direct client finds it, and the checks that it was not harmed."""

    def __init__(self, sup):
        self.sup = sup
        status = wait_for(
            lambda: (s := sup.status()["echo"])["state"] == "READY" and s["direct"] and s["direct"]["serving"] and s
        )
        self.pid = status["pid"]
        self.route = {"path": status["direct"]["path"], "generation": status["direct"]["generation"]}
        self.path = self.route["path"]
        self.log_path = os.path.join(sup.state_dir, "logs", "echo.log")
        # The supervisor says "serving" once it has told the worker; the worker redirects
        # reads until it has heard.
        wait_for(lambda: self.get_directly() == [DEFAULT_REPLY], timeout=5)

    def connect(self, timeout=10, patience=0):
        return dial(self.path, timeout, patience)

    def get_directly(self, timeout=10):
        sock = self.connect(timeout, patience=5)
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

    def wait_idle(self, timeout=5):
        """Wait until nothing is connected, in flight or queued on the worker's socket."""
        deadline = time.monotonic() + timeout
        while (direct := self.direct_status())["connections"] or direct["inflight"] or direct["queue"]:
            assert time.monotonic() < deadline, f"the worker's socket is not idle after {timeout}s: {direct}"
            time.sleep(0.02)

    def assert_unharmed(self):
        """Same worker process, READY, serving reads directly, through the supervisor and to a
        Cursor; nothing left connected or in flight on its socket, and no thread of it died."""
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


@pytest.fixture
def worker(supervisor):
    return Worker(supervisor({"echo": ECHO}, max_frame=MAX_FRAME, frame_timeout=FRAME_TIMEOUT))


def check_error_reply(reply):
    """A reply to something bad: a well-formed error, never a success."""
    assert type(reply) is dict and reply.get("ok") is False, reply
    assert reply["id"] is None or type(reply["id"]) is int, reply
    assert reply["error"]["type"] in WIRE_ERRORS and type(reply["error"]["message"]) is str, reply


# -- fuzz ----------------------------------------------------------------------------


def test_random_bytes_get_errors_or_a_close_and_harm_nobody(worker):
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.one_of(
            st.binary(max_size=300),
            st.binary(max_size=200).map(frame),  # a right header, a random body
            st.tuples(st.integers(0, 2 * MAX_FRAME), st.binary(max_size=100)).map(
                lambda t: struct.pack(">I", t[0]) + t[1]
            ),
        )
    )
    def check(data):
        sock = worker.connect()
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            replies = frames_to_eof(sock)
        finally:
            sock.close()
        for reply in replies:
            check_error_reply(reply)
        stream_errors = [
            i for i, reply in enumerate(replies) if reply["id"] is None and reply["error"]["type"] == "InterfaceError"
        ]
        assert stream_errors in ([], [len(replies) - 1]), replies  # the stream's error is its last word

    check()
    worker.assert_unharmed()


# Values that are wrong for most fields, as in test_hostile.py's fuzzer; drawn from a
# list (cheap to generate) and, less often, built at random (nested, binary keys, ext types).
ODD = [
    None,
    True,
    False,
    1.5,
    -1,
    0,
    1 << 63,
    (1 << 64) - 1,
    -(1 << 63),
    "",
    "x" * 300,
    "\u2603",
    b"bin",
    [],
    [1, [2]],
    {},
    {"a": 1},
    {b"k": "v"},
    msgpack.ExtType(5, b"ext"),
    msgpack.Timestamp(1, 0),
    float("nan"),
    float("inf"),
    -0.0,
]
KEYS = st.one_of(st.text(max_size=6), st.binary(max_size=6))
LEAVES = st.one_of(
    st.sampled_from(ODD), st.integers(-(1 << 63), (1 << 64) - 1), st.text(max_size=12), st.binary(max_size=8)
)
VALUES = st.sampled_from(ODD) | st.recursive(
    LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=5
)
OPS = list(P.DATA_OPS + P.CONTROL_OPS) + ["explode", "", "GET"]
# Tables whose get is quick whatever the params (not sleep, asleep, spin, call, forever, gen).
TABLES = ["kv", "ctx", "actx", "boom", "weird", "events", "ctl", "nosuch", "_x", "kv_get", "Kv"]
PLAUSIBLE = {
    "params": st.fixed_dictionaries(
        {},
        optional={
            "key": st.sampled_from(["default", "x", ""]),
            "kind": st.sampled_from(["values", "badkey", "notdict", "badstr"]),
        },
    ),
    "user": st.sampled_from(["", "admin", "x" * 100]),
    "vr": st.sampled_from([None, "VR-Default", ""]),
    "notify": st.sampled_from([None, True, False]),
    "batch": st.sampled_from([1, 2, 100, 100000]),
    "hold": st.sampled_from([0, 0.5, 86400]),
    "caller": st.sampled_from([["echo", "serial", 1], ["other", "async", 2]]),
    "after": st.sampled_from([None, {"key": "a"}, {"key": None}]),
    "index": st.sampled_from([None, ["key"], ["key", "value"]]),
    "match": st.sampled_from([None, ["key"]]),
    "modules": st.sampled_from([None, ["echo"]]),
}
REQUESTS = st.fixed_dictionaries(
    {
        "id": st.integers(-(1 << 63), (1 << 64) - 1) | VALUES,
        "op": st.sampled_from(OPS) | VALUES,
        "module": st.sampled_from(["echo", "other", "__class__", "Echo", "echo.kv"]) | VALUES,
        "table": st.sampled_from(TABLES) | VALUES,
    },
    optional={field: plausible | VALUES for field, plausible in PLAUSIBLE.items()},
)
# Reads that are mostly right, so that the fuzz reaches the agent's actions too.
READS = st.fixed_dictionaries(
    {
        "id": st.integers(0, 1 << 32),
        "op": st.sampled_from(P.READ_OPS),
        "module": st.just("echo"),
        "table": st.sampled_from(TABLES),
    },
    optional=PLAUSIBLE,
)


def expected_id(message):
    return message["id"] if type(message) is dict and type(message.get("id")) is int else None


def test_random_requests_each_get_one_well_formed_reply_and_harm_nobody(worker):
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(READS | REQUESTS | VALUES, min_size=1, max_size=4))
    def check(messages):
        sock = worker.connect()
        try:
            sock.sendall(b"".join(frame(msgpack.packb(m, use_bin_type=True)) for m in messages))
            replies = read_frames(sock, len(messages))
        finally:
            sock.close()
        assert len(replies) == len(messages), (messages, replies)
        assert collections.Counter(r["id"] for r in replies) == collections.Counter(map(expected_id, messages))
        for reply in replies:
            if reply["ok"] is True:
                assert type(reply["rows"]) is list and type(reply["more"]) is bool, reply
                outcomes["ok"] += 1
            else:
                check_error_reply(reply)
                outcomes["redirect" if reply.get("redirect") else reply["error"]["type"]] += 1

    outcomes = collections.Counter()
    check()
    assert outcomes["ok"] and outcomes["redirect"] and outcomes["ProgrammingError"], outcomes
    worker.assert_unharmed()


# -- frames ----------------------------------------------------------------------------


def test_garbage_msgpack_gets_an_error_and_the_connection_is_dropped(worker):
    sock = worker.connect()
    sock.sendall(frame(b"\xc1\xc1\xc1 not msgpack"))
    reply = the_reply(sock)
    assert reply["id"] is None and reply["ok"] is False and reply["error"]["type"] == "InterfaceError"
    assert "not valid msgpack" in reply["error"]["message"]
    assert closed_by_peer(sock)
    sock.close()
    worker.assert_unharmed()


def test_pickled_bytes_are_never_unpickled(worker, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for data in (frame(pickle.dumps(Evil())), pickle.dumps(Evil())):
        sock = worker.connect()
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        replies = frames_to_eof(sock)
        sock.close()
        for reply in replies:
            check_error_reply(reply)
    assert not marker.exists()
    worker.assert_unharmed()


def test_non_string_map_keys_are_refused(worker):
    sock = worker.connect()
    sock.sendall(frame(msgpack.packb({"id": 1, "op": "get", "module": "echo", "table": "kv", "params": {1: "x"}})))
    reply = the_reply(sock)
    assert reply["ok"] is False and "int is not allowed for map key" in reply["error"]["message"]
    assert closed_by_peer(sock)
    sock.close()
    worker.assert_unharmed()


@pytest.mark.parametrize("size", [MAX_FRAME + 1, 1 << 30, (1 << 32) - 1])
def test_an_oversized_frame_is_refused_before_its_body_is_read(worker, size):
    sock = worker.connect()
    sock.sendall(struct.pack(">I", size))  # claims more than max_frame, sends nothing more
    reply = the_reply(sock)
    assert reply["id"] is None and reply["ok"] is False and reply["error"]["type"] == "InterfaceError"
    assert f"frame of {size} bytes exceeds the limit of {MAX_FRAME} bytes" in reply["error"]["message"]
    assert closed_by_peer(sock)
    sock.close()
    worker.assert_unharmed()


def test_a_frame_of_exactly_max_frame_is_served(worker):
    request = dict(GET_DEFAULT, user="")
    padding = MAX_FRAME - len(msgpack.packb(request))
    request["user"] = "x" * (padding - 2)  # a str 16 (3 header bytes) in place of an empty fixstr (1)
    body = msgpack.packb(request)
    assert len(body) == MAX_FRAME
    sock = worker.connect()
    sock.sendall(frame(body))
    [reply] = read_frames(sock)
    assert reply == DEFAULT_REPLY
    sock.close()
    worker.assert_unharmed()


def test_truncated_frames_then_disconnect_harm_nobody(worker):
    whole = P.pack(GET_DEFAULT)
    for cut in (1, 2, 4, 10, len(whole) - 1):
        for leave in (socket.socket.close, reset):
            sock = worker.connect()
            sock.sendall(whole[:cut])
            leave(sock)
    worker.assert_unharmed()


def test_an_unfinished_frame_is_dropped_after_frame_timeout(worker):
    whole = P.pack(GET_DEFAULT)
    stalled = worker.connect()
    stalled.sendall(whole[:10])  # the header and a little: then nothing
    started = time.monotonic()
    slow = worker.connect()
    for i in range(len(whole)):  # a whole frame a byte at a time, well within the timeout
        slow.sendall(whole[i : i + 1])
        time.sleep(0.3 / len(whole))
    assert read_frames(slow) == [DEFAULT_REPLY]
    reply = the_reply(stalled)
    assert 0.5 <= time.monotonic() - started < 2
    assert reply["id"] is None and reply["ok"] is False and reply["error"]["type"] == "InterfaceError"
    assert "a frame started 0.5s ago is unfinished (10 bytes of it arrived; frame_timeout)" in reply["error"]["message"]
    assert read_to_eof(stalled) == 0
    stalled.close()
    slow.sendall(P.pack(GET_DEFAULT))
    assert read_frames(slow) == [DEFAULT_REPLY]  # the slow one stays connected and served
    slow.close()
    worker.assert_unharmed()


def test_a_frame_dribbled_a_byte_at_a_time_is_dropped_after_frame_timeout(worker):
    whole = P.pack(dict(GET_DEFAULT, user="x" * 100))
    sock = worker.connect(timeout=0.01)
    started = time.monotonic()
    dropped = None
    try:
        for i in range(len(whole) - 1):  # never the last byte
            sock.sendall(whole[i : i + 1])
            time.sleep(0.2)  # well under frame_timeout between bytes
            try:
                dropped = read_frames(sock)
                break
            except TimeoutError:
                pass
            if time.monotonic() - started > 2.5:
                break
    except (BrokenPipeError, ConnectionResetError):
        dropped = []
    finally:
        sock.close()
    took = time.monotonic() - started
    assert dropped is not None, f"a frame dribbled for {took:.1f}s (frame_timeout 0.5s) was never dropped"
    assert "frame_timeout" in dropped[0]["error"]["message"] and took < 2
    worker.assert_unharmed()


def test_a_frame_finished_before_a_slow_read_is_not_timed_out(worker):
    # The frame's last bytes arrive, then its read runs past frame_timeout: the frame is
    # whole, so the client is served, not dropped as unfinished.
    whole = P.pack({"id": 5, "op": "get", "module": "echo", "table": "sleep", "params": {"secs": "1.5"}})
    sock = worker.connect()
    sock.sendall(whole[:10])
    time.sleep(0.2)  # the worker reads the start of the frame, well within the timeout
    sock.sendall(whole[10:])
    [reply] = read_frames(sock)
    assert reply["id"] == 5 and reply["ok"] is True, reply
    sock.close()
    worker.assert_unharmed()


# -- requests -----------------------------------------------------------------------------


def test_deeply_nested_fields_get_a_clear_error(worker):
    sock = worker.connect()
    send_deeply_nested_fields(sock)
    sock.sendall(P.pack(GET_DEFAULT))
    assert read_frames(sock) == [DEFAULT_REPLY]
    sock.close()
    worker.assert_unharmed()


# The cases of test_socket_input.py's malformed requests that the worker checks as the
# supervisor does (validate.parse_request): each answered with an error naming the field.
BAD_FIELDS = [
    ([1, 2, 3], "a request must be a msgpack map, got list"),
    (7, "a request must be a msgpack map, got int"),
    ("get", "a request must be a msgpack map, got str"),
    (None, "a request must be a msgpack map, got NoneType"),
    ({"op": "get"}, "request 'id' must be an integer"),
    ({"id": True, "op": "get"}, "request 'id' must be an integer, got True"),
    ({"id": "5", "op": "get"}, "request 'id' must be an integer, got '5'"),
    ({"id": 5, "op": "explode"}, "unknown op 'explode'"),
    ({"id": 5, "op": ["get"], "module": "echo", "table": "kv"}, "unknown op ['get']"),
    ({"id": 5, "op": "get", "module": "echo"}, "get: bad table name None"),
    ({"id": 5, "op": "get", "module": "__class__", "table": "kv"}, "bad module name"),
    ({"id": 5, "op": "get", "module": ["echo"], "table": "kv"}, "bad module name ['echo']"),
    ({"id": 5, "op": "get", "module": b"echo", "table": "kv"}, "get: bad module name b'echo'"),
    (
        {"id": 5, "op": "get", "table": "kv", "module": "-" + "e" * 300},
        "bad module name '-eeeeeeeeeeeeeeeeeeeeeeeeee...eeeeeeeeeeeeeeeeeeeeeeeeeeee'",
    ),
    ({"id": 5, "op": "get", "module": "echo", "table": "_x"}, "get: bad table name '_x'"),
    (
        {"id": 5, "op": "get", "module": "echo", "table": "kv", "params": {"key": 1}},
        "'params.key' must be a str, got int",
    ),
    ({"id": 5, "op": "get", "module": "echo", "table": "kv", "params": [1]}, "'params' must be a map"),
    (
        {"id": 5, "op": "get", "module": "echo", "table": "kv", "params": {b"key": "x"}},
        "'params' has a bytes key b'key'; keys must be str",
    ),
    (
        {"id": 5, "op": "get", "module": "echo", "table": "kv", "params": {"key": b"x"}},
        "'params.key' must be a str, got bytes",
    ),
    (
        {"id": 5, "op": "get", "module": "echo", "table": "kv", "params": {"key": msgpack.ExtType(7, b"x")}},
        "'params.key' must be a str, got ExtType",
    ),
    (
        {"id": 5, "op": "set", "module": "echo", "table": "kv", "params": {b"key": "x"}},
        "'params' has a bytes key b'key'; keys must be str",
    ),
    (
        {"id": 5, "op": "set", "module": "echo", "table": "kv", "params": {"key": "x", b"value": "y"}},
        "'params' has a bytes key b'value'",
    ),
    ({"id": 5, "op": "getnext", "module": "echo", "table": "kv", "batch": 0}, "'batch' must be an integer"),
    (
        {"id": 5, "op": "get", "module": "echo", "table": "kv", "batch": "10"},
        "'batch' must be an integer from 1 to 100000, got '10'",
    ),
    (
        {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "batch": 100001},
        "'batch' must be an integer from 1 to 100000",
    ),
    ({"id": 5, "op": "get", "module": "echo", "table": "kv", "vr": 3}, "'vr' must be a str"),
    ({"id": 5, "op": "get", "module": "echo", "table": "kv", "user": 9}, "'user' must be a str"),
    (
        {"id": 5, "op": "get", "module": "echo", "table": "kv", "notify": "yes"},
        "'notify' must be true, false or nil, got str",
    ),
    ({"id": 5, "op": "get", "module": "echo", "table": "kv", "hold": -1}, "'hold' must be a number"),
    (
        {"id": 5, "op": "get", "module": "echo", "table": "kv", "hold": float("nan")},
        "'hold' must be a finite number of seconds, got nan",
    ),
    (
        {"id": 5, "op": "get", "module": "echo", "table": "kv", "hold": float("inf")},
        "'hold' must be a finite number of seconds, got inf",
    ),
    (
        {"id": 5, "op": "get", "module": "echo", "table": "kv", "hold": float("-inf")},
        "'hold' must be a finite number of seconds, got -inf",
    ),
    (
        {"id": 5, "op": "get", "module": "echo", "table": "kv", "hold": 86401},
        "'hold' of 86401s is more than a request may be held, 86400s (a day)",
    ),
    (
        {"id": 5, "op": "get", "module": "echo", "table": "kv", "hold": True},
        "'hold' must be a number of seconds, got bool",
    ),
    (
        {"id": 5, "op": "get", "module": "echo", "table": "kv", "caller": ["echo", ["serial"], 1]},
        "'caller' must be [module, 'serial'|'async', request id]",
    ),
    ({"id": 5, "op": "get", "module": "echo", "table": "kv", "caller": ["echo", "serial", 1.5]}, "'caller' must be"),
    (
        {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "after": {b"key": "a"}},
        "'after' has a bytes key b'key'",
    ),
    ({"id": 5, "op": "getnext", "module": "echo", "table": "kv", "after": [1]}, "'after' must be a map of str to str"),
    (
        {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "index": "key"},
        "'index' must be a list of at most 64 column names, got 'key'",
    ),
    (
        {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "index": ["key"] * 65},
        "'index' must be a list of at most 64 column names",
    ),
    (
        {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "index": ["key", 3]},
        "'index' holds 3; column names are non-empty str",
    ),
    (
        {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "index": [""]},
        "'index' holds ''; column names are non-empty str",
    ),
    (
        {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "index": ["key", "key"]},
        "'index' names a column twice: ['key', 'key']",
    ),
    (
        {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "match": ["key"]},
        "'match' column 'key' has no value in 'params' to match rows against",
    ),
    (
        {"id": 5, "op": "get", "module": "echo", "table": "kv", "params": {"key": "a"}, "match": ["key"]},
        "'match' shapes a getnext walk; get takes none",
    ),
    ({"id": 5, "op": "getnext", "module": "echo", "table": "kv", "match": {"key": 1}}, "'match' must be a list"),
    ({"id": 5, "op": "restart", "module": 3}, "restart: bad module name 3"),
    ({"id": 5, "op": "route", "module": "../x"}, "route: bad module name '../x'"),
    ({"id": 5, "op": "status", "module": "../x"}, "status: bad module name '../x'"),
    (
        {"id": 5, "op": "save", "caller": ["echo", "serial", "1"]},
        "'caller' must be [module, 'serial'|'async', request id]",
    ),
    ({"id": 5, "op": "export", "modules": "echo"}, "export: 'modules' must be a list of module names or nil"),
    ({"id": 5, "op": "export", "modules": ["../x"]}, "export: bad module name '../x'"),
]


def test_requests_with_bad_fields_get_an_error_naming_the_field_and_the_connection_stays_usable(worker):
    sock = worker.connect()
    wrong = []
    for message, text in BAD_FIELDS:
        sock.sendall(frame(msgpack.packb(message)))  # msgpack: ext types among them
        [reply] = read_frames(sock)
        rid = message.get("id") if type(message) is dict and type(message.get("id")) is int else None
        if not (
            reply.get("ok") is False
            and reply["id"] == rid
            and "redirect" not in reply
            and reply["error"]["type"] == "ProgrammingError"
            and text in reply["error"]["message"]
        ):
            wrong.append((message, reply))
        sock.sendall(P.pack(GET_DEFAULT))
        if read_frames(sock) != [DEFAULT_REPLY]:
            wrong.append((message, "the connection was not usable after it"))
    sock.close()
    assert not wrong, "\n".join(map(repr, wrong))
    worker.assert_unharmed()


def test_what_is_not_a_direct_read_is_redirected_to_the_supervisor(worker):
    requests = [
        {"id": 11, "op": "set", "module": "echo", "table": "kv", "params": {"key": "direct", "value": "no"}},
        {"id": 12, "op": "setop", "module": "echo", "table": "boom"},
        {"id": 13, "op": "status"},
        {"id": 14, "op": "status", "module": "echo"},
        {"id": 15, "op": "save"},
        {"id": 16, "op": "stop"},
        {"id": 17, "op": "restart", "module": "echo"},
        {"id": 18, "op": "ping"},
        {"id": 19, "op": "export"},
        {"id": 20, "op": "route", "module": "echo"},
        {
            "id": 21,
            "op": "get",
            "module": "echo",
            "table": "kv",
            "params": {"key": "default"},
            "caller": ["echo", "serial", 1],
        },
        {"id": 22, "op": "getnext", "module": "echo", "table": "kv", "caller": ["other", "async", 7]},
        {"id": 23, "op": "get", "module": "echo", "table": "kv", "params": {"key": "default"}, "hold": 1},
    ]
    sock = worker.connect()
    for request in requests:
        sock.sendall(P.pack(request))
        [reply] = read_frames(sock)
        assert reply["id"] == request["id"] and reply["ok"] is False and reply["redirect"] is True, (request, reply)
        assert reply["error"]["type"] == "ModuleUnavailable"
        assert f"send it to the supervisor at {worker.sup.socket_path}" in reply["error"]["message"], reply
    assert "is not a read" in reply["error"]["message"] or "held request" in reply["error"]["message"]
    sock.sendall(P.pack(GET_DEFAULT))
    assert read_frames(sock) == [DEFAULT_REPLY]
    sock.close()
    # Nothing redirected was done: no write, no stop, no restart, no save
    with worker.sup.connect(timeout=10) as conn:
        cur = conn.cursor()
        cur.execute("getnext echo.kv")
        assert dict(cur.fetchall()) == {"default": "yes"}
    assert worker.sup.status()["echo"]["unsaved"] == 0
    worker.assert_unharmed()


def test_a_request_for_another_module_is_refused_naming_both(worker):
    sock = worker.connect()
    for op in ("get", "getone", "getnext"):
        sock.sendall(P.pack({"id": 3, "op": op, "module": "other", "table": "kv"}))
        [reply] = read_frames(sock)
        assert reply["id"] == 3 and reply["ok"] is False and "redirect" not in reply
        assert reply["error"]["type"] == "ProgrammingError"
        assert "this socket serves module 'echo', not 'other'" in reply["error"]["message"]
    sock.sendall(P.pack(GET_DEFAULT))
    assert read_frames(sock) == [DEFAULT_REPLY]
    sock.close()
    worker.assert_unharmed()


def test_failing_reads_are_answered_as_the_supervisor_answers_them(worker):
    cases = [
        {"op": "get", "module": "echo", "table": "nosuch"},
        {"op": "get", "module": "echo", "table": "exit"},  # a table with no get
        {"op": "get", "module": "echo", "table": "boom"},
        {"op": "getnext", "module": "echo", "table": "boom"},
        {"op": "get", "module": "echo", "table": "kv", "params": {"key": "absent"}},
        {"op": "get", "module": "echo", "table": "weird", "params": {"kind": "badkey"}},
        {"op": "get", "module": "echo", "table": "weird", "params": {"kind": "notdict"}},
        {"op": "get", "module": "echo", "table": "weird", "params": {"kind": "badstr"}},
        {"op": "get", "module": "echo", "table": "weird", "params": {"kind": "values"}},
    ]
    direct, brokered = worker.connect(), raw(worker.sup)
    for i, case in enumerate(cases):
        request = dict(case, id=100 + i)
        direct.sendall(P.pack(request))
        brokered.sendall(P.pack(request))
        [here], [there] = read_frames(direct), read_frames(brokered)
        assert "redirect" not in here
        assert here == there, (request, here, there)
    direct.close()
    brokered.close()
    worker.assert_unharmed()


def test_pipelined_requests_good_and_bad_all_get_their_replies(worker):
    mixed = []
    for i in range(300):
        kind = i % 5
        if kind == 0:
            mixed.append(({"id": i, "op": "get", "module": "echo", "table": "kv", "params": {"key": "default"}}, "ok"))
        elif kind == 1:
            mixed.append(({"id": i, "op": "get", "module": "echo", "table": "kv", "params": {"key": i}}, "error"))
        elif kind == 2:
            mixed.append(({"id": i, "op": "set", "module": "echo", "table": "kv", "params": {"key": "x"}}, "redirect"))
        elif kind == 3:
            mixed.append(({"id": i, "op": "getnext", "module": "echo", "table": "kv"}, "ok"))
        else:
            mixed.append(({"id": i, "op": "get", "module": "echo", "table": "actx"}, "ok"))
    sock = worker.connect()
    sock.sendall(b"".join(P.pack(message) for message, _ in mixed))
    replies = {reply["id"]: reply for reply in read_frames(sock, len(mixed))}
    assert sorted(replies) == list(range(len(mixed)))
    for message, outcome in mixed:
        reply = replies[message["id"]]
        if outcome == "ok":
            assert reply["ok"] is True and reply["rows"], reply
        elif outcome == "redirect":
            assert reply["ok"] is False and reply["redirect"] is True, reply
        else:
            assert reply["ok"] is False and "redirect" not in reply and "'params.key'" in reply["error"]["message"]
    sock.close()
    worker.assert_unharmed()


# -- clients that leave, stall or pile on ------------------------------------------------


@pytest.mark.parametrize("table", ["sleep", "asleep"])  # the serial lane, and an async action
@pytest.mark.parametrize("leave", [socket.socket.close, reset], ids=["close", "reset"])
def test_a_client_vanishing_mid_request_harms_nobody(worker, table, leave):
    sock = worker.connect()
    sock.sendall(P.pack({"id": 1, "op": "get", "module": "echo", "table": table, "params": {"secs": "0.3"}}))
    wait_for(lambda: worker.direct_status()["inflight"] == 1, timeout=5)
    leave(sock)  # the reply has nowhere to go
    worker.wait_idle()
    worker.assert_unharmed()


def test_a_client_vanishing_while_its_read_waits_for_the_serial_lane_harms_nobody(worker):
    busy = worker.connect()
    busy.sendall(P.pack({"id": 1, "op": "get", "module": "echo", "table": "sleep", "params": {"secs": "0.4"}}))
    wait_for(lambda: worker.direct_status()["inflight"] == 1, timeout=5)
    for leave in (socket.socket.close, reset):
        queued = worker.connect()
        queued.sendall(b"".join(P.pack(dict(GET_DEFAULT, id=i)) for i in range(20)))  # into the mailbox
        leave(queued)
    [reply] = read_frames(busy)
    assert reply["id"] == 1 and reply["ok"] is True
    busy.close()
    worker.assert_unharmed()


def test_fifty_connections_at_once_closed_abruptly_harm_nobody(worker):
    threads_before = psutil.Process(worker.pid).num_threads()
    socks = [worker.connect() for _ in range(50)]
    wait_for(lambda: worker.direct_status()["connections"] == 50, timeout=5)
    whole = P.pack(GET_DEFAULT)
    for i, sock in enumerate(socks):
        if i % 3 == 0:
            sock.sendall(whole[: 1 + i % len(whole)])  # half a frame
        elif i % 3 == 1:
            sock.sendall(P.pack({"id": i, "op": "get", "module": "echo", "table": "asleep", "params": {"secs": "0.2"}}))
        else:
            sock.sendall(b"".join(P.pack(dict(GET_DEFAULT, id=n)) for n in range(50)))
    for i, sock in enumerate(socks):
        (reset if i % 2 else socket.socket.close)(sock)
    worker.wait_idle()
    wait_for(lambda: psutil.Process(worker.pid).num_threads() <= threads_before, timeout=5)
    worker.assert_unharmed()


def test_abusive_clients_in_parallel_do_not_disturb_good_ones(worker):
    stop = threading.Event()
    errors = []
    attacks = [
        b"\xff" * 100,
        struct.pack(">I", 1 << 31),
        P.pack([1, 2]),
        P.pack(GET_DEFAULT)[:7],
        frame(b"\xc1"),
        P.pack({"id": 1, "op": "stop"}),
    ]

    def abuse(n):
        i = n
        while not stop.is_set():
            try:
                sock = worker.connect(timeout=2)
                sock.sendall(attacks[i % len(attacks)])
                (reset if i % 2 else socket.socket.close)(sock)
            except OSError:
                pass
            i += 1

    # Good clients connected before the abuse: one on the worker's socket, one on the
    # supervisor's (a new connection may find the worker's listen backlog full: a Cursor
    # then reads through the supervisor, as below).
    direct, brokered = worker.connect(), raw(worker.sup)
    served = collections.Counter()

    def good():
        try:
            n = 0
            while not stop.is_set():
                n += 1
                for name, sock in (("direct", direct), ("brokered", brokered)):
                    sock.sendall(P.pack(dict(GET_DEFAULT, id=n)))
                    assert read_frames(sock) == [dict(DEFAULT_REPLY, id=n)], name
                    served[name] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=abuse, args=(n,)) for n in range(2)] + [threading.Thread(target=good)]
    for thread in threads:
        thread.start()
    try:
        with worker.sup.connect(timeout=10) as conn:
            cur = conn.cursor()
            for i in range(100):
                cur.execute("set echo.kv", {"key": f"k{i}", "value": str(i)})
                cur.execute("get echo.kv", {"key": f"k{i}"})
                assert cur.fetchone() == (f"k{i}", str(i))
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    direct.close()
    brokered.close()
    assert not errors, errors
    assert served["direct"] > 10 and served["brokered"] > 10, served
    worker.assert_unharmed()


def getnext_kv(count):
    return b"".join(P.pack({"id": i, "op": "getnext", "module": "echo", "table": "kv"}) for i in range(count))


def fill_big(sup):
    """100 rows of 10 kB: each getnext of the kv table is a reply of 1 MB."""
    with sup.connect(timeout=10) as conn:
        cur = conn.cursor()
        for i in range(100):
            cur.execute("set echo.kv", {"key": f"big{i:03}", "value": "x" * 10_000})


def test_a_client_that_never_reads_is_dropped_and_others_are_still_served(worker):
    fill_big(worker.sup)
    flood = worker.connect(timeout=30)
    flood.sendall(getnext_kv(300))  # 300 replies of 1 MB, were nothing bounded
    assert select.select([flood], [], [], 10)[0], "no reply started"
    started = time.monotonic()
    assert worker.get_directly() == [DEFAULT_REPLY]
    assert worker.get_through_supervisor() == [DEFAULT_REPLY]
    assert time.monotonic() - started < 5
    wait_for(lambda: worker.direct_status()["connections"] == 0, timeout=10)  # dropped after frame_timeout
    assert read_to_eof(flood) < 80 * MiB  # dropped, not served
    flood.close()
    with worker.sup.connect(timeout=10) as conn:
        cur = conn.cursor()
        cur.execute("getnext echo.kv")
        assert cur.rowcount == 101
    worker.assert_unharmed()


def test_the_worker_holds_a_bounded_amount_for_a_client_that_never_reads(worker):
    fill_big(worker.sup)
    process = psutil.Process(worker.pid)
    before = peak = process.memory_info().rss
    flood = worker.connect(timeout=30)
    flood.sendall(getnext_kv(300))  # 300 replies of 1 MB, were nothing bounded
    try:
        # Polled closely: the flood fills its bound and is dropped within about 20 ms.
        wait_for(lambda: worker.direct_status()["connections"] == 1, timeout=5, interval=0.001)
        deadline = time.monotonic() + 10
        while worker.direct_status()["connections"] and time.monotonic() < deadline:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.01)
        assert peak - before < 200 * MiB, f"the worker's RSS grew by {(peak - before) / MiB:.0f} MiB under the flood"
    finally:
        flood.close()
    worker.assert_unharmed()


def flood_behind_a_slow_read(worker, count):
    """A client that never reads, whose ``count`` getnext (replies of 1 MB) wait in the
    worker's mailbox behind another client's slow read (echo.sleep, on the serial lane):
    the thread holding the lane then runs them and sends their replies. Returns (the slow
    client, the flood) once all are queued."""
    slow = worker.connect()
    slow.sendall(P.pack({"id": 1, "op": "get", "module": "echo", "table": "sleep", "params": {"secs": "0.3"}}))
    wait_for(lambda: worker.direct_status()["inflight"] == 1, timeout=5)
    flood = worker.connect(timeout=30)
    flood.sendall(getnext_kv(count))
    wait_for(lambda: worker.direct_status()["inflight"] == 1 + count, timeout=5)
    return slow, flood


def test_a_client_that_never_reads_does_not_hold_up_other_clients(supervisor):
    worker = Worker(supervisor({"echo": ECHO}, frame_timeout=2.0))
    fill_big(worker.sup)
    slow, flood = flood_behind_a_slow_read(worker, 20)
    try:
        started = time.monotonic()
        assert worker.get_through_supervisor(timeout=1.5) == [DEFAULT_REPLY]  # behind the 0.3s sleep and 20 walks
        assert worker.get_directly(timeout=1.5) == [DEFAULT_REPLY]
        assert time.monotonic() - started < 1.5
        assert read_frames(slow)[0]["ok"] is True
    finally:
        slow.close()
        flood.close()
    worker.assert_unharmed()


def test_a_client_that_never_reads_does_not_get_the_worker_killed_as_hung(supervisor):
    worker = Worker(supervisor({"echo": {"entry": ECHO, "hang_timeout": 1.5}}, frame_timeout=2.0))
    fill_big(worker.sup)
    slow, flood = flood_behind_a_slow_read(worker, 20)
    try:
        time.sleep(2.5)  # past hang_timeout and the supervisor's watchdog tick
        status = worker.sup.status()["echo"]
        assert status["pid"] == worker.pid and status["restarts"] == 0, f"the worker was killed: {status['last_exit']}"
    finally:
        slow.close()
        flood.close()
    worker.assert_unharmed()


# -- peer uid --------------------------------------------------------------------------------

# A client run as another user: it connects to the worker's socket, then sends a get at
# once ("send"), or only reads ("read"), or waits for the worker to have spoken and then
# sends ("send-late": Connection.request sends, then reads), and prints what it read.
CLIENT_AS = """
import os, select, socket, sys, time
from cmactor.wire import protocol as P
path, uid, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(path)
reader = P.FrameReader(max_frame=None)
frames = []
try:
    if mode == "send-late":
        select.select([sock], [], [], 10)
        time.sleep(0.1)
    if mode != "read":
        sock.sendall(P.pack({"id": 1, "op": "get", "module": "echo", "table": "kv", "params": {"key": "default"}}))
    while not frames and (data := sock.recv(65536)):
        frames.extend(reader.feed(data))
except OSError as exc:
    frames.append(type(exc).__name__)
print(repr(frames))
"""


def run_as(uid, socket_path, mode="send"):
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_AS, socket_path, str(uid), mode], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return eval(done.stdout.strip())  # noqa: S307 - the repr of a list of frames we printed


def test_a_uid_not_allowed_is_refused_on_the_worker_socket_too(supervisor, reachable):
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    worker = Worker(
        supervisor(
            {"echo": ECHO},
            state_dir=os.path.join(reachable, "state"),
            allowed_uids=[NOBODY - 1],
            frame_timeout=FRAME_TIMEOUT,
        )
    )
    [reply] = run_as(NOBODY, worker.path, "read")  # the refusal comes unasked
    assert reply["id"] is None and reply["ok"] is False and reply["error"]["type"] == "InterfaceError"
    assert f"uid {NOBODY} may not use this supervisor" in reply["error"]["message"]
    worker.assert_unharmed()


def test_a_refused_client_that_sends_before_reading_still_reads_why(supervisor, reachable):
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    worker = Worker(
        supervisor(
            {"echo": ECHO},
            state_dir=os.path.join(reachable, "state"),
            allowed_uids=[NOBODY - 1],
            frame_timeout=FRAME_TIMEOUT,
        )
    )
    try:
        [reply] = run_as(NOBODY, worker.path, "send-late")
        assert reply != "BrokenPipeError", "the refused client got EPIPE, not the reason it was refused"
        assert f"uid {NOBODY} may not use this supervisor" in reply["error"]["message"]
    finally:
        worker.assert_unharmed()


def test_an_allowed_uid_is_served_on_the_worker_socket(supervisor, reachable):
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    worker = Worker(
        supervisor(
            {"echo": ECHO},
            state_dir=os.path.join(reachable, "state"),
            allowed_uids=[NOBODY],
            frame_timeout=FRAME_TIMEOUT,
        )
    )
    assert run_as(NOBODY, worker.path) == [DEFAULT_REPLY]
    worker.assert_unharmed()


class _Backlogged:
    """What the writer needs of a connection with replies its client has not taken."""

    def __init__(self, sock):
        self.sock = sock
        self.closed = False
        self.moved_at = time.monotonic()
        self.writes = 0

    def write_backlog(self):
        self.writes += 1
        return False

    def close(self):
        self.closed = True


def test_the_writer_watches_a_client_that_reuses_a_dropped_ones_descriptor():
    from cmactor.worker.direct import _Writer

    writer = _Writer(timeout=30)
    old_end, old_peer = socket.socketpair()
    old_end.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            old_end.send(b"x" * 65536)  # full: only a backlog would be written now
    old = _Backlogged(old_end)
    writer.watch(old)
    writer.turn(0)
    fd = old_end.fileno()
    old.close()  # its reading thread drops it and closes the socket
    old_end.close()
    new_end, new_peer = socket.socketpair()
    reused = new_end if new_end.fileno() == fd else new_peer
    assert reused.fileno() == fd
    new = _Backlogged(reused)
    writer.watch(new)
    writer.turn(0)
    writer.turn(0.5)  # its socket can take bytes: the writer must be waiting on it
    assert new.writes >= 1
    for sock in (old_peer, new_end, new_peer):
        sock.close()
