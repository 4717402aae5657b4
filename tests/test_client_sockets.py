"""Hostile clients on both client sockets, which keep one policy (cmactor/wire/clients.py):
the supervisor's own and the echo module's worker's (direct reads). Each test runs
against each (``sock_kind``): bad bytes, bad requests, unfinished frames, clients that
vanish, pile on, never read, or are not allowed in. After each, both processes must be
unharmed: the worker the same process, the module READY, and reads served directly,
through the supervisor and to a Cursor (rawsocket.Target).

What only one socket does is tested beside it: test_socket_input.py and
test_hostile.py for the supervisor's, test_direct_hostile.py for the worker's.
"""

import collections
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
import pytest
from helpers import agent, wait_for
from hypothesis import HealthCheck, given, settings, strategies as st
from rawsocket import (
    DEFAULT_REPLY,
    GET_DEFAULT,
    MiB,
    Target,
    check_error_reply,
    closed_by_peer,
    fill_big,
    frame,
    frames_to_eof,
    getnext_kv,
    raw,
    read_frames,
    read_to_eof,
    reset,
    send_deeply_nested_fields,
    the_reply,
)

from cmactor.wire import protocol as P

ECHO = agent("echo.py:main")
MAX_FRAME = 64 * 1024
FRAME_TIMEOUT = 0.5
NOBODY = 65534


@pytest.fixture(params=["supervisor", "direct"])
def sock_kind(request):
    """Which client socket a test runs against: the supervisor's, or the worker's own."""
    return request.param


@pytest.fixture
def target(supervisor, sock_kind):
    """The ``sock_kind`` socket of a supervisor running echo (direct reads on), for raw clients."""
    return Target(supervisor({"echo": ECHO}, max_frame=MAX_FRAME, frame_timeout=FRAME_TIMEOUT), sock_kind)


# -- frames ----------------------------------------------------------------------------


def test_random_bytes_get_errors_or_a_close_and_harm_nobody(target):
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
        sock = target.connect()
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
    target.assert_unharmed()


def test_garbage_msgpack_gets_an_error_and_the_connection_is_dropped(target):
    sock = target.connect()
    sock.sendall(frame(b"\xc1\xc1\xc1 not msgpack"))
    reply = the_reply(sock)
    assert reply["id"] is None and reply["ok"] is False and reply["error"]["type"] == "InterfaceError"
    assert "not valid msgpack" in reply["error"]["message"]
    assert closed_by_peer(sock)
    sock.close()
    target.assert_unharmed()


def test_pickled_bytes_are_never_unpickled(target, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for data in (frame(pickle.dumps(Evil())), pickle.dumps(Evil())):
        sock = target.connect()
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        replies = frames_to_eof(sock)
        sock.close()
        assert replies, data
        for reply in replies:
            check_error_reply(reply)
    assert not marker.exists()
    target.assert_unharmed()


def test_non_string_map_keys_are_refused(target):
    sock = target.connect()
    sock.sendall(frame(msgpack.packb({"id": 1, "op": "get", "module": "echo", "table": "kv", "params": {1: "x"}})))
    reply = the_reply(sock)
    assert reply["ok"] is False and "int is not allowed for map key" in reply["error"]["message"]
    assert closed_by_peer(sock)
    sock.close()
    target.assert_unharmed()


@pytest.mark.parametrize("size", [MAX_FRAME + 1, 1 << 30, (1 << 32) - 1])
def test_an_oversized_frame_is_refused_before_its_body_is_read(target, size):
    sock = target.connect()
    sock.sendall(struct.pack(">I", size))  # claims more than max_frame, sends nothing more
    reply = the_reply(sock)
    assert reply["id"] is None and reply["ok"] is False and reply["error"]["type"] == "InterfaceError"
    assert f"frame of {size} bytes exceeds the limit of {MAX_FRAME} bytes" in reply["error"]["message"]
    assert closed_by_peer(sock)
    sock.close()
    target.assert_unharmed()


def test_a_frame_of_exactly_max_frame_is_served(target):
    request = dict(GET_DEFAULT, user="")
    padding = MAX_FRAME - len(msgpack.packb(request))
    request["user"] = "x" * (padding - 2)  # a str 16 (3 header bytes) in place of an empty fixstr (1)
    body = msgpack.packb(request)
    assert len(body) == MAX_FRAME
    sock = target.connect()
    sock.sendall(frame(body))
    [reply] = read_frames(sock)
    assert reply == DEFAULT_REPLY
    sock.close()
    target.assert_unharmed()


def test_truncated_frames_then_disconnect_harm_nobody(target):
    whole = P.pack(GET_DEFAULT)
    for cut in (1, 2, 4, 10, len(whole) - 1):
        for leave in (socket.socket.close, reset):
            sock = target.connect()
            sock.sendall(whole[:cut])
            leave(sock)
    target.assert_unharmed()


def test_an_unfinished_frame_is_dropped_after_frame_timeout(target):
    whole = P.pack(GET_DEFAULT)
    stalled = target.connect()
    stalled.sendall(whole[:10])  # the header and a little: then nothing
    started = time.monotonic()
    slow = target.connect()
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
    target.assert_unharmed()


def test_a_frame_dribbled_a_byte_at_a_time_is_dropped_after_frame_timeout(target):
    whole = P.pack(dict(GET_DEFAULT, user="x" * 100))
    sock = target.connect(timeout=0.01)
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
    target.assert_unharmed()


def test_a_frame_finished_before_a_slow_read_is_not_timed_out(target):
    # The frame's last bytes arrive, then its read runs past frame_timeout: the frame is
    # whole, so the client is served, not dropped as unfinished.
    whole = P.pack({"id": 5, "op": "get", "module": "echo", "table": "sleep", "params": {"secs": "1.5"}})
    sock = target.connect()
    sock.sendall(whole[:10])
    time.sleep(0.2)  # the socket reads the start of the frame, well within the timeout
    sock.sendall(whole[10:])
    [reply] = read_frames(sock)
    assert reply["id"] == 5 and reply["ok"] is True, reply
    sock.close()
    target.assert_unharmed()


# -- requests -----------------------------------------------------------------------------


def test_deeply_nested_fields_get_a_clear_error(target):
    # A builtin repr of such a value raises RecursionError, which used to leave the
    # request without a reply.
    sock = target.connect()
    send_deeply_nested_fields(sock)
    sock.sendall(P.pack(GET_DEFAULT))
    assert read_frames(sock) == [DEFAULT_REPLY]
    sock.close()
    target.assert_unharmed()


# Requests both sockets check alike (validate.parse_request): each answered with an error
# naming the field. What only the supervisor answers is in test_socket_input.py.
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
        {"id": 5, "op": "set", "module": "echo", "table": "kv", "params": {"key": b"x"}},
        "'params.key' must be a str, got bytes",
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


@pytest.mark.parametrize("message, text", BAD_FIELDS)
def test_malformed_requests_get_a_clear_error_and_the_connection_stays_usable(target, message, text):
    sock = target.connect()
    sock.sendall(frame(msgpack.packb(message)))  # msgpack: ext types among them
    [reply] = read_frames(sock)
    rid = message.get("id") if type(message) is dict and type(message.get("id")) is int else None
    assert reply["ok"] is False and reply["id"] == rid and "redirect" not in reply, reply
    assert reply["error"]["type"] == "ProgrammingError" and text in reply["error"]["message"], reply
    sock.sendall(P.pack(GET_DEFAULT))
    assert read_frames(sock) == [DEFAULT_REPLY], "the connection was not usable after it"
    sock.close()
    target.assert_unharmed()


def test_pipelined_requests_on_one_connection_all_get_replies(target):
    sock = target.connect()
    sock.sendall(b"".join(P.pack(dict(GET_DEFAULT, id=i)) for i in range(200)))
    replies = read_frames(sock, 200)
    assert sorted(r["id"] for r in replies) == list(range(200))
    assert all(r["ok"] for r in replies)
    sock.close()
    target.assert_unharmed()


# -- clients that leave, pile on or never read -----------------------------------------------


@pytest.mark.parametrize("table", ["sleep", "asleep"])  # the serial lane, and an async action
@pytest.mark.parametrize("leave", [socket.socket.close, reset], ids=["close", "reset"])
def test_a_client_vanishing_mid_request_harms_nobody(target, table, leave):
    sock = target.connect()
    sock.sendall(P.pack({"id": 1, "op": "get", "module": "echo", "table": table, "params": {"secs": "0.3"}}))
    wait_for(lambda: target.inflight() == 1, timeout=5)
    leave(sock)  # the reply has nowhere to go
    target.wait_idle()
    target.assert_unharmed()


def test_abusive_clients_in_parallel_do_not_disturb_good_ones(target):
    stop = threading.Event()
    errors = []
    attacks = [
        b"\xff" * 100,
        struct.pack(">I", 1 << 31),
        P.pack([1, 2]),
        P.pack(GET_DEFAULT)[:7],
        frame(b"\xc1"),
    ]
    if target.kind == "direct":  # redirected there, never done; the supervisor would stop
        attacks.append(P.pack({"id": 1, "op": "stop"}))

    def abuse(n):
        i = n
        while not stop.is_set():
            try:
                sock = target.connect(timeout=2)
                sock.sendall(attacks[i % len(attacks)])
                (reset if i % 2 else socket.socket.close)(sock)
            except OSError:
                pass
            i += 1

    # Good clients connected before the abuse (a new connection may find the listen
    # backlog full): one on the socket abused, one on the supervisor's, and a Cursor
    # (whose direct reads, on a worker socket it cannot reach, go through the supervisor).
    abused, brokered = target.connect(), raw(target.sup)
    conn = target.sup.connect(timeout=10)
    served = collections.Counter()

    def good():
        try:
            n = 0
            while not stop.is_set():
                n += 1
                for name, sock in (("abused", abused), ("brokered", brokered)):
                    sock.sendall(P.pack(dict(GET_DEFAULT, id=n)))
                    assert read_frames(sock) == [dict(DEFAULT_REPLY, id=n)], name
                    served[name] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=abuse, args=(n,)) for n in range(2)] + [threading.Thread(target=good)]
    for thread in threads:
        thread.start()
    try:
        with conn:
            cur = conn.cursor()
            for i in range(200):
                cur.execute("set echo.kv", {"key": f"k{i}", "value": str(i)})
                cur.execute("get echo.kv", {"key": f"k{i}"})
                assert cur.fetchone() == (f"k{i}", str(i))
            cur.execute("getnext echo.kv")
            assert cur.rowcount == 201
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    abused.close()
    brokered.close()
    assert not errors, errors
    assert served["abused"] > 10 and served["brokered"] > 10, served
    target.assert_unharmed()


def test_a_client_that_never_reads_is_dropped_and_others_are_still_served(target, caplog):
    fill_big(target.sup)
    flood = target.connect(timeout=30)
    flood.sendall(getnext_kv(600))  # 600 replies of 1 MB: 600 MB, were nothing bounded
    assert select.select([flood], [], [], 10)[0], "no reply started"
    started = time.monotonic()
    assert target.get_directly() == [DEFAULT_REPLY]
    assert target.get_through_supervisor() == [DEFAULT_REPLY]
    assert time.monotonic() - started < 5
    with target.sup.connect(timeout=10) as conn:
        cur = conn.cursor()
        started = time.monotonic()
        cur.execute("get echo.kv", {"key": "default"})
        assert cur.fetchone() == ("default", "yes") and time.monotonic() - started < 3
    wait_for(lambda: target.connections() == 0, timeout=30)  # dropped
    if target.kind == "supervisor":  # its log is this process's (the worker's goes to echo.log)
        assert "over max_client_backlog" in caplog.text
        assert f"dropped client pid {os.getpid()} uid {os.getuid()}: " in caplog.text
    assert read_to_eof(flood) < 80 * MiB  # dropped, not served
    flood.close()
    with target.sup.connect(timeout=10) as conn:
        cur = conn.cursor()
        cur.execute("getnext echo.kv")
        assert cur.rowcount == 101
        cur.execute("set echo.kv", {"key": "after", "value": "flood"})
        cur.execute("get echo.kv", {"key": "after"})
        assert cur.fetchone() == ("after", "flood")
    target.assert_unharmed()


# What the process serving the socket may grow by under a flood: the supervisor's is this
# test's own process, pytest's memory and the replies on their way to it among it.
FLOOD_RSS = {"supervisor": 300 * MiB, "direct": 200 * MiB}


def test_the_process_holds_a_bounded_amount_for_a_client_that_never_reads(target):
    fill_big(target.sup)
    process = target.process()
    before = peak = process.memory_info().rss
    flood = target.connect(timeout=30)
    flood.sendall(getnext_kv(600))  # 600 replies of 1 MB, were nothing bounded
    try:
        # Polled closely: on the worker's socket the flood fills its bound and is dropped
        # within about 20 ms.
        wait_for(lambda: target.connections() == 1, timeout=5, interval=0.001)
        deadline = time.monotonic() + 30
        while target.connections() and time.monotonic() < deadline:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.01)
        grown = peak - before
        assert grown < FLOOD_RSS[target.kind], f"RSS grew by {grown / MiB:.0f} MiB under the flood"
        assert not target.connections(), "the flood client was never dropped"
    finally:
        flood.close()
    target.assert_unharmed()


# -- peer uid --------------------------------------------------------------------------------

# A client run as another user: it connects to ``path``, then sends a get at once
# ("send"), or only reads ("read"), or waits for the socket to have spoken and then
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


@pytest.fixture
def with_uids(supervisor, sock_kind, reachable):
    """Factory: the ``sock_kind`` socket of a supervisor that lets ``allowed_uids`` in, in a
    directory they can reach; skipped unless root, which alone can run a client as them."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid")

    def make(allowed_uids):
        state_dir = os.path.join(reachable, "state")
        sup = supervisor({"echo": ECHO}, state_dir=state_dir, allowed_uids=allowed_uids, frame_timeout=FRAME_TIMEOUT)
        return Target(sup, sock_kind)

    return make


def test_a_uid_not_allowed_is_refused_by_name(with_uids):
    target = with_uids([NOBODY - 1])
    [reply] = run_as(NOBODY, target.path, "read")  # the refusal comes unasked
    assert reply["id"] is None and reply["ok"] is False and reply["error"]["type"] == "InterfaceError"
    assert reply["error"]["message"] == (
        f"uid {NOBODY} may not use this supervisor; add it to [supervisor] allowed_uids to allow it"
    )
    target.assert_unharmed()


def test_a_refused_client_that_sends_before_reading_still_reads_why(with_uids):
    target = with_uids([NOBODY - 1])
    try:
        [reply] = run_as(NOBODY, target.path, "send-late")
        assert reply != "BrokenPipeError", "the refused client got EPIPE, not the reason it was refused"
        assert f"uid {NOBODY} may not use this supervisor" in reply["error"]["message"]
    finally:
        target.assert_unharmed()


def test_an_allowed_uid_is_served(with_uids):
    target = with_uids([NOBODY])
    assert run_as(NOBODY, target.path) == [DEFAULT_REPLY]
    target.assert_unharmed()
