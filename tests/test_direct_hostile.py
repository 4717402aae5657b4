"""Bad clients on a worker's own socket (direct reads, cmactor/worker/direct.py) that
only it meets: requests it sends to the supervisor or refuses, reads that wait for the
serial lane, its threads (readers, writer) and its bound on connections.

The hostile input both client sockets answer alike is in test_client_sockets.py. After
each case here too the worker must be the same process (never restarted), the module
READY, and reads must still be served both directly and through the supervisor.
"""

import collections
import contextlib
import socket
import time

import msgpack
import psutil
import pytest
from helpers import agent, wait_for
from hypothesis import HealthCheck, given, settings, strategies as st
from rawsocket import (
    DEFAULT_REPLY,
    GET_DEFAULT,
    Target,
    check_error_reply,
    fill_big,
    frame,
    getnext_kv,
    raw,
    read_frames,
    reset,
)

from cmactor.wire import protocol as P

ECHO = agent("echo.py:main")
MAX_FRAME = 64 * 1024
FRAME_TIMEOUT = 0.5


@pytest.fixture
def worker(supervisor):
    return Target(supervisor({"echo": ECHO}, max_frame=MAX_FRAME, frame_timeout=FRAME_TIMEOUT), "direct")


# -- fuzz ----------------------------------------------------------------------------


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


# -- requests -----------------------------------------------------------------------------


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
    worker = Target(supervisor({"echo": ECHO}, frame_timeout=2.0), "direct")
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
    worker = Target(supervisor({"echo": {"entry": ECHO, "hang_timeout": 1.5}}, frame_timeout=2.0), "direct")
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
