"""Raw floors, measured in the same run as the cmactor scenarios.

Everything here speaks cmactor's own framing (``protocol.pack`` / ``FrameReader``:
4-byte big-endian length + msgpack) and the same message shapes: a client sends
frontend request maps and gets reply maps; the broker forwards worker-channel
lists (``[REQ, sid, ...]`` / ``[REPLY, sid, ...]``). What is missing compared with
cmactor is exactly what cmactor adds: request validation, the module table, the
worker's lanes and threads, contexts. So ``scenario rate / floor rate`` says how
much of the floor the runtime keeps.

Each measurement is a context manager that sets up its processes, warms up and
yields a ``round()`` function: one timed round, returning (rate, p50 ns, p99 ns).
perf/__init__.py interleaves the rounds of a floor and of its scenarios.

Processes are started through an explicit forkserver context (as the
supervisor does; never fork) and always reaped, even on error (``reap``).
The raw client (``Clients``) is shared with perf/scenarios.py, which points it
at a real supervisor's socket.
"""

import collections
import contextlib
import itertools
import multiprocessing
import selectors
import signal
import socket
import statistics
import time
from array import array

from cmactor.wire import protocol as P

pc = time.perf_counter_ns

# The fields kv_get in perf/agents/bench.py answers with: same reply size.
ROW = {"key": "k", "value": "v"}

# A client, worker or broker that takes longer than this to answer is stuck.
TIMEOUT = 120

# The tags of cmactor's Req and Reply: the broker's messages to and from its worker
# begin as cmactor's do (plain lists, not protocol's Structs).
REQ, REPLY = P.Req.__struct_config__.tag, P.Reply.__struct_config__.tag


def request(table="kv", module="bench", op="get", params=None):
    """A frontend request map (the id is filled in per request)."""
    params = {"key": "k"} if params is None else params
    return {"id": 0, "op": op, "module": module, "table": table, "params": params, "user": "bench"}


class Result(collections.namedtuple("Result", "rate p50 p99 samples ratio", defaults=(None, None))):
    """What one timed round returns (a plain (rate, p50 ns, p99 ns) tuple will do).

    ``samples``: every time measured in the round (ns), when the row's p50/p99
    should be taken over all rounds' samples pooled rather than as a median of
    per-round figures. ``ratio``: a ratio computed by the round itself (derived
    rows), instead of rate / the compared row's rate.
    """


# -- processes --------------------------------------------------------------------


def context():
    """The forkserver context, with the supervisor's preload plus this module.

    Preloaded modules are imported once in the fork server, so a child starts with
    them in place: a bare fork, as a cmactor worker (re)start is. If the fork server
    is already running (a supervisor started it), this preload changes nothing.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["cmactor.worker.process", __name__])
    return ctx


def start(ctx, target, *args):
    proc = ctx.Process(target=target, args=args, daemon=True, name=f"perf-{target.__name__}")
    proc.start()
    return proc


def reap(procs, grace=2.0):
    """Join every process; kill what has not exited within ``grace`` seconds. Never raises."""
    deadline = time.monotonic() + grace
    for proc in procs:
        if proc is None:
            continue
        try:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            proc.close()
        except (ValueError, OSError):  # never started, or already closed
            pass


def quiet_child():
    """In a child: leave Ctrl-C to the parent, which tears every child down (a
    traceback from each child would bury the one that matters)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def close_all(things):
    for thing in things:
        thing.close()


def percentile(values, q):
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


# -- the raw client -------------------------------------------------------------------


def drive(sock, reader, message, ids, n, inflight, distinct_keys=False):
    """Send ``n`` requests keeping up to ``inflight`` outstanding; return (t0, t1, latencies ns).

    New requests are sent as replies come in; all requests of one wake-up go in
    one ``sendall`` and share one send timestamp. ``distinct_keys``: each request's
    ``params["key"]`` is its own id (sets then write distinct rows).
    """
    sent_at = {}
    latencies = array("q")
    issued = done = 0

    def issue(k):
        nonlocal issued
        out = bytearray()
        rids = []
        for _ in range(k):
            message["id"] = rid = next(ids)
            if distinct_keys:
                message["params"]["key"] = f"k{rid:07d}"
            out += P.pack(message)
            rids.append(rid)
        now = pc()
        for rid in rids:
            sent_at[rid] = now
        sock.sendall(out)
        issued += k

    t0 = pc()
    issue(min(inflight, n))
    while done < n:
        data = sock.recv(P.READ_SIZE)
        if not data:
            raise ConnectionError("the server closed the connection")
        now = pc()
        replies = reader.feed(data)
        for reply in replies:
            if not reply.get("ok"):
                raise RuntimeError(f"request failed: {reply.get('error')}")
            latencies.append(now - sent_at.pop(reply["id"]))
        done += len(replies)
        more = min(len(replies), n - issued)
        if more:
            issue(more)
    return t0, pc(), latencies


def client_main(target, message, inflight, warmup, ctl):
    """Client process: connect (a socket path, or an inherited socket), warm up, then
    run ``n`` requests for each ``n`` received on ``ctl`` and send back the timings."""
    quiet_child()
    if isinstance(target, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(target)
    else:
        sock = target
    reader = P.FrameReader(max_frame=None)
    ids = itertools.count(1)
    drive(sock, reader, message, ids, warmup, inflight)
    result = "ready"
    while True:
        try:
            ctl.send(result)
            n = ctl.recv()
        except (OSError, EOFError):  # the parent gave up (an error, Ctrl-C): leave quietly
            break
        if n is None:
            break
        result = drive(sock, reader, message, ids, n, inflight)
    sock.close()


def _recv(conn):
    if not conn.poll(TIMEOUT):
        raise TimeoutError(f"a benchmark client gave no answer within {TIMEOUT}s")
    try:
        return conn.recv()
    except EOFError:
        raise RuntimeError("a benchmark client process died (its traceback is on stderr)") from None


@contextlib.contextmanager
def clients(targets, message, n, inflight, warmup, main=client_main):
    """One client process per target (a socket path, or a socket: handed over and
    closed here). Yields ``round()``: every client sends ``n`` requests.

    A round's rate is all clients' requests over the span from the first start to
    the last finish (perf_counter_ns is CLOCK_MONOTONIC: one clock for all processes).

    ``main``: the client process's function, called as ``client_main`` is (a
    scenario may drive the public Cursor instead of the raw protocol).
    """
    ctx = context()
    procs, ctls = [], []
    try:
        for target in targets:
            mine, theirs = ctx.Pipe()
            ctls.append(mine)
            procs.append(start(ctx, main, target, message, inflight, warmup, theirs))
            theirs.close()
            if not isinstance(target, str):
                target.close()  # the client has its own copy now
        for ctl in ctls:
            said = _recv(ctl)
            if said != "ready":
                raise RuntimeError(f"a benchmark client did not start: {said}")

        def round_():
            for ctl in ctls:
                ctl.send(n)
            results = [_recv(ctl) for ctl in ctls]
            span = max(r[1] for r in results) - min(r[0] for r in results)
            latencies = [x for r in results for x in r[2]]
            return n * len(targets) * 1e9 / span, percentile(latencies, 50), percentile(latencies, 99)

        yield round_
        for ctl in ctls:
            ctl.send(None)
    finally:
        close_all(ctls)
        close_all(t for t in targets if not isinstance(t, str))
        reap(procs)


# -- the far ends: worker and broker -----------------------------------------------------


def serve_worker(sock):
    """Answer every frame at once: a request map (one hop) or a [REQ, ...] list (behind
    the broker). All replies to one read go out in one send."""
    quiet_child()
    reader = P.FrameReader(max_frame=None)
    while data := _recv_or_eof(sock):
        out = bytearray()
        for msg in reader.feed(data):
            if isinstance(msg, dict):
                out += P.pack({"id": msg["id"], "ok": True, "rows": [ROW], "more": False})
            else:
                out += P.pack([REPLY, msg[1], None, [ROW], False, False])
        sock.sendall(out)


def serve_broker(client_socks, worker):
    """A minimal supervisor: a selectors loop reading 64 KiB at a time (P.READ_SIZE;
    128 KiB or more makes glibc mmap the buffer on every recv), mapping client ids to
    worker sids and back, and gathering each loop turn's writes into one send per
    socket. Sockets stay blocking: we only recv what select reported, and the
    bounded number in flight keeps sends from ever filling a socket buffer."""
    quiet_child()
    sel = selectors.DefaultSelector()
    for sock in [*client_socks, worker]:
        sel.register(sock, selectors.EVENT_READ, P.FrameReader(None if sock is worker else P.MAX_FRAME))
    pending = {}  # sid -> (client socket, client's request id)
    out = {sock: bytearray() for sock in [*client_socks, worker]}
    sids = itertools.count(1)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            data = _recv_or_eof(sock)
            if not data:
                if sock is worker:
                    return
                sel.unregister(sock)  # the others may still be in a round
                del out[sock]
                if len(out) == 1:
                    return  # every client has gone: the run is over
                continue
            if sock is worker:
                for _, sid, _, rows, more, _ in key.data.feed(data):
                    client, rid = pending.pop(sid)
                    if client in out:  # not gone meanwhile
                        out[client] += P.pack({"id": rid, "ok": True, "rows": rows, "more": more})
            else:
                buf = out[worker]
                for req in key.data.feed(data):
                    sid = next(sids)
                    pending[sid] = (sock, req["id"])
                    buf += P.pack([REQ, sid, req["op"], req["table"], req["params"], None, 0, 1, None])
        for sock, buf in out.items():
            if buf:
                try:
                    sock.sendall(buf)
                except OSError:
                    if sock is worker:
                        return
                    # a client that went away: its EOF comes next turn
                buf.clear()


def serve_workers(socks):
    """serve_worker for several clients at once (one hop, pipelined): one process, a
    ``selectors`` loop over every client's socket, all replies to one read in one send.
    Returns when every client has gone."""
    quiet_child()
    sel = selectors.DefaultSelector()
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ, P.FrameReader(max_frame=None))
    left = len(socks)
    while left:
        for key, _ in sel.select():
            sock = key.fileobj
            data = _recv_or_eof(sock)
            if not data:
                sel.unregister(sock)  # the others may still be in a round
                left -= 1
                continue
            out = bytearray()
            for msg in key.data.feed(data):
                out += P.pack({"id": msg["id"], "ok": True, "rows": [ROW], "more": False})
            try:
                sock.sendall(out)
            except OSError:
                pass  # a client that went away: its EOF comes next turn


def _recv_or_eof(sock):
    try:
        return sock.recv(P.READ_SIZE)
    except ConnectionResetError:  # the peer died with unread data: the same as EOF here
        return b""


def signal_ready(conn):
    conn.send_bytes(b"ready")
    conn.close()


# -- the floors ---------------------------------------------------------------------------


@contextlib.contextmanager
def one_hop(n, warmup, n_clients=1, inflight=1):
    """Client process <-> worker process over one AF_UNIX socketpair, ``inflight`` in flight.

    ``n_clients`` > 1: that many client processes, a socketpair each, to one worker
    process serving them all (``serve_workers``): the twin of ``two_hop`` with as many
    clients, without the broker (what a direct read, cmactor/direct.py, skips)."""
    ctx = context()
    pairs = [socket.socketpair() for _ in range(n_clients)]
    socks = [s for pair in pairs for s in pair]
    worker = None
    try:
        if n_clients == 1:
            worker = start(ctx, serve_worker, pairs[0][1])
        else:
            worker = start(ctx, serve_workers, [w for _, w in pairs])
        close_all(w for _, w in pairs)  # the worker has its own
        with clients([c for c, _ in pairs], request(), n, inflight, warmup) as round_:
            yield round_
    finally:
        close_all(socks)
        reap([worker])


@contextlib.contextmanager
def two_hop(n, warmup, n_clients=1, inflight=1):
    """Client processes -> broker process -> worker process -> back, ``inflight`` per client."""
    ctx = context()
    pairs = [socket.socketpair() for _ in range(n_clients)]
    broker_end, worker_end = socket.socketpair()
    socks = [s for pair in pairs for s in pair] + [broker_end, worker_end]
    procs = []
    try:
        procs.append(start(ctx, serve_worker, worker_end))
        procs.append(start(ctx, serve_broker, [b for _, b in pairs], broker_end))
        close_all([b for _, b in pairs] + [broker_end, worker_end])  # the children have theirs
        with clients([c for c, _ in pairs], request(), n, inflight, warmup) as round_:
            yield round_
    finally:
        close_all(socks)
        reap(procs)


def start_once(ctx):
    """Time from Process() to the child's first message."""
    recv_end, send_end = ctx.Pipe(duplex=False)
    proc = None
    try:
        t0 = pc()
        proc = ctx.Process(target=signal_ready, args=(send_end,), daemon=True)
        proc.start()
        send_end.close()
        if not recv_end.poll(TIMEOUT):
            raise TimeoutError(f"a forkserver child did not signal within {TIMEOUT}s")
        recv_end.recv_bytes()
        return pc() - t0
    finally:
        close_all([recv_end, send_end])
        reap([proc])


@contextlib.contextmanager
def forkserver_start(n, warmup):
    """Starting a process with the forkserver context, to its first message.
    A round is ``n`` starts; its rate is 1 / median start time."""
    ctx = context()
    for _ in range(warmup):
        start_once(ctx)

    def round_():
        times = [start_once(ctx) for _ in range(n)]
        median = statistics.median(times)
        return 1e9 / median, median, percentile(times, 99)

    yield round_
