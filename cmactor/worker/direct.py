"""A worker's own socket: clients read from the module here, one hop, no supervisor.

The supervisor binds the socket in its owner-only run directory, hands it to the
worker at start and tells clients where it is (the ``route`` op) once the module
is READY. The worker serves here from the moment its agent is ready and loaded,
before it tells the supervisor so (Runtime._serve_if_ready): a READY module's
socket is served. Before that, after a Stop, and for anything but a get, getone or
getnext from outside an agent action, a request is answered with ``redirect``:
send it to the supervisor instead. Writes, saves and agents' own
calls always go there: the journal, the audit log and the wait-for graph are the
supervisor's.

One thread at a time, the reader, waits on every connection at once (epoll) and
serves each client that sent something in turn: it hands each read to the Runtime
(worker.Runtime.serve_direct), where a serial read runs on the serial lane (on the
reader when the lane is free) and an @async_action read on the reader. One thread
and no hand-offs between threads for the common case: four pipelining clients on
threads of their own lost about a third of their rate to the GIL (perf/README.md). A
reader that spends HANDOFF in one client's batch (its action blocks, a save runs,
the client's bound of reads in flight is reached) hands the reading on: the
watchdog starts a new reader, which serves everyone else meanwhile; the old one
ends with that batch. So nothing waits on a reader for long but its own client.

Bytes from clients are untrusted here too: the same peer uid check, frame size
cap, frame timeout and request validation (clients.py, validate.py) as the supervisor's
socket, and a bound on the requests one connection has in flight. No thread ever
blocks on a client's socket: what a client does not take at once waits in its
backlog, written by one writer thread as the client reads, and a client whose
backlog passes max_client_backlog, or does not move for frame_timeout, is
dropped; so a client that stops reading cannot hold a lane, or get the worker
killed as hung. A read not answered within the module's action_timeout is
answered as the supervisor answers one (OperationalError), and its connection
dropped: a thread is still in the action, and the client's next read goes
elsewhere.

What all clients together can make the worker hold is bounded as well: their
unfinished frames (max_frames_total) and their unread replies
(max_direct_backlog_total), past which the client holding the most is dropped; a
connection idle for direct_idle_timeout is closed, and at MAX_CONNECTIONS the one
idle longest makes room for a new client; direct reads of @async_action run at once
on at most as many readers as the pool has threads (worker.Runtime), each in a
progress slot where the supervisor sees it hang. What a dropped client held is handed
back to the system by the watchdog (trim.py).
"""

import itertools
import logging
import operator
import select
import selectors
import socket
import threading
import time

from cmactor.errors import (
    ModuleUnavailable,
    OperationalError,
    ProgrammingError,
    action_timed_out,
    to_wire,
)
from cmactor.wire import clients as C, figures as F, protocol as P
from cmactor.wire.trim import release_free_memory
from cmactor.wire.validate import BadRequest, decode_request, parse_request, peer_uid
from cmactor.wire.wakeup import Wakeup

log = logging.getLogger("cmactor.worker")

# Direct connections one worker serves at once; past it a client is sent to the
# supervisor, which has its own bounds.
MAX_CONNECTIONS = 256
# accept() failing for want of descriptors: the pause before the next try.
ACCEPT_PAUSE = 0.5
# A reader serving one client's batch this long hands the reading on to a new reader
# (DirectServer._hand_on); the watchdog looks this often while clients are connected.
HANDOFF = 0.02
HANDOFF_NS = int(HANDOFF * 1e9)
# Refused clients waited for at once (each by a thread, up to frame_timeout); more are
# told why and closed.
MAX_REFUSING = 16
# At MAX_CONNECTIONS, a connection idle this long is closed to let a new client in.
EVICT_IDLE = 1.0
# Answers the thread serving a connection gathers before it writes them (whatever one
# read brought: one write, not one per reply), at most.
BATCH_BYTES = 256 * 1024

_READ_OPS = frozenset(P.READ_OPS)


class DirectServer:
    """The accepting side of a worker's direct socket, its readers and its watchdog."""

    def __init__(self, runtime, listener, options, counts):
        self._runtime = runtime
        self._listener = listener
        self.limits = options["limits"]  # clients.ClientLimits: those of the supervisor's socket
        self._supervisor = options["supervisor_socket"]
        self._action_timeout = options["action_timeout"]
        # Bytes of every connection's unfinished frame, and of every connection's backlog,
        # as each last counted itself: bounded for all clients together. Under their own
        # lock, taken innermost (a connection's send lock may be held).
        self._totals_lock = threading.Lock()
        self._frames = 0
        self._backlogs = 0
        self.counts = F.Counter(counts)
        self.writer = _Writer(self.limits.frame_timeout)
        self._sids = itertools.count(-1, -1)  # never a supervisor sid (those grow from 1): see split_started
        self._epoll = select.epoll()
        self._connections = {}  # descriptor -> the connection served on it
        self._refusing = 0  # connections being told why they are refused, each by a thread
        self._lock = threading.Lock()
        # The reader is the thread whose turn it is (``_turn``); ``_busy`` is (the
        # connection it serves, since when) while it serves one, for the watchdog to see
        # a stuck reader and hand the socket to a new one.
        self._turn = 0
        self._busy = None
        self._connected = threading.Event()  # set as a client connects: the watchdog looks again
        self._trim_due = False  # a connection was dropped: the watchdog hands its memory back
        self.serving = False  # the agent is ready and loaded (Runtime._serve_if_ready), and no Stop came

    def start(self):
        self._listener.setblocking(True)
        module = self._runtime.module
        threading.Thread(target=self._accept, name=f"{module}-direct-accept", daemon=True).start()
        threading.Thread(target=self._watch, name=f"{module}-direct-watchdog", daemon=True).start()
        threading.Thread(target=self.writer.run, name=f"{module}-direct-writer", daemon=True).start()
        self._new_reader(self._turn).start()

    def finish(self):
        """The supervisor said stop: send new reads back to it, and return once those under
        way are answered (its stop_timeout bounds the wait)."""
        self.serving = False
        time.sleep(0.05)  # a read that passed the serving check as it changed is counted in by now
        while self.counts.running() or any(c.unsent() for c in list(self._connections.values())):
            time.sleep(0.01)

    # -- reading ---------------------------------------------------------------

    def _new_reader(self, turn):
        return threading.Thread(
            target=self._read, args=(turn,), name=f"{self._runtime.module}-direct-reader", daemon=True
        )

    def _read(self, turn):
        """Serve the clients that sent something, one after the other, until the watchdog
        hands the reading on (this thread being stuck in one client's batch)."""
        poll = self._epoll.poll
        connections = self._connections
        while True:
            for fd, _ in poll():
                connection = connections.get(fd)
                if connection is None:
                    continue
                self._busy = (connection, time.monotonic_ns())
                try:
                    alive = connection.serve()
                except Exception:  # a bug: this client is dropped, not every client
                    log.exception("module %s: direct socket: serving a client failed", self._runtime.module)
                    alive = False
                with self._lock:
                    handed_on = self._turn != turn
                    if not handed_on:
                        self._busy = None
                if alive and handed_on:  # the new reader may read this client again
                    alive = self._register(connection)
                if not alive:
                    self._drop(connection)
                if handed_on:
                    return

    def _hand_on(self, now):
        """(The watchdog.) A reader that has served one client's batch for HANDOFF starts a
        new reader, which serves the other clients meanwhile: a read blocked in its action,
        behind a save or behind its client's own bound stops no other client for long."""
        with self._lock:
            busy = self._busy
            if busy is None or now - busy[1] < HANDOFF_NS:
                return
            connection = busy[0]
            self._epoll.unregister(connection.fd)  # its stuck reader still serves it
            self._turn += 1
            self._busy = None
            try:
                self._new_reader(self._turn).start()
            except RuntimeError as exc:  # no thread to be had: the stuck reader reads on
                self._turn -= 1  # (and _busy stays None: this batch is not tried again, nor logged again)
                if not self._register(connection):
                    connection.close()  # its reader drops it at the end of the batch
                log.warning("module %s: direct socket: cannot start a reader (%s)", self._runtime.module, exc)

    def _register(self, connection):
        """Have the reader poll ``connection``; False if epoll will not have it (out of memory, say)."""
        try:
            self._epoll.register(connection.fd, select.EPOLLIN)
            return True
        except OSError as exc:
            log.warning("module %s: direct socket: cannot watch a client (%s); dropped", self._runtime.module, exc)
            return False

    def _drop(self, connection):
        try:
            self._epoll.unregister(connection.fd)
        except (OSError, ValueError):  # unregistered at a hand-on
            pass
        with self._lock:
            del self._connections[connection.fd]
        connection.release()  # only now may the descriptor be reused, by a new connection
        self.counts.add(F.CONNECTIONS, -1)
        self._trim_due = True  # the watchdog gives what it held back to the system

    # -- the watchdog -------------------------------------------------------------

    def _watch(self):
        """Hand the reading on from a stuck reader; answer reads that outlive action_timeout,
        as the supervisor's watchdog does; drop clients whose frames do not finish, and
        close connections idle for direct_idle_timeout."""
        limit = self._action_timeout
        action_tick = min(1.0, max(0.05, limit / 4))
        frame_tick = min(1.0, self.limits.frame_timeout / 4)
        next_action = next_frame = 0.0
        while True:
            if self._connections:
                time.sleep(HANDOFF)
            else:  # nothing to hand on until a client comes
                self._connected.wait(action_tick)
                self._connected.clear()
            now = time.monotonic()
            self._hand_on(time.monotonic_ns())
            if self._trim_due:
                self._trim_due = False
                release_free_memory()
            if now >= next_action:
                next_action = now + action_tick
                due = time.monotonic_ns() - limit * 1e9
                for answer in self.counts.running():  # oldest first
                    if answer.since > due:
                        break
                    answer.time_out(limit)
            if now >= next_frame:
                next_frame = now + frame_tick
                for connection in list(self._connections.values()):
                    since = connection.frame_since
                    if since is not None and C.frame_left(since, now, self.limits) <= 0:
                        connection.fail(C.frame_overdue(connection.partial, self.limits))
                    elif connection.idle_for(now) >= self.limits.direct_idle_timeout:
                        connection.close()  # its client connects again at its next read (cmfrontend)

    # -- accepting -----------------------------------------------------------------

    def _accept(self):
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError as exc:
                log.warning(
                    "module %s: direct socket: accept failed (%s); retrying in %gs",
                    self._runtime.module,
                    exc,
                    ACCEPT_PAUSE,
                )
                time.sleep(ACCEPT_PAUSE)
                continue
            try:
                refusal = self._refusal(sock)
                if refusal is None:
                    connection = _Connection(self, sock)
            except OSError:
                sock.close()
                continue
            if refusal is not None:
                self._refuse(sock, refusal)
                continue
            with self._lock:
                self._connections[connection.fd] = connection
            self.counts.add(F.CONNECTIONS, 1)
            if not self._register(connection):  # the client reads through the supervisor
                self._drop(connection)
                continue
            self._connected.set()

    def _refuse(self, sock, refusal):
        """Tell a refused client why: in a thread of its own, which waits for the client to
        go, while fewer than MAX_REFUSING do; past that, at once."""
        with self._lock:
            waits = self._refusing < MAX_REFUSING
            self._refusing += waits
        if waits:
            try:
                wait = self.limits.frame_timeout
                threading.Thread(target=self._refused, args=(sock, refusal, wait), daemon=True).start()
                return
            except RuntimeError:
                with self._lock:
                    self._refusing -= 1
        _close_with(sock, refusal, 0.1)

    def _refused(self, sock, refusal, timeout):
        try:
            _close_with(sock, refusal, timeout)
        finally:
            with self._lock:
                self._refusing -= 1

    def _refusal(self, sock):
        """Why a new connection is not served (its closing frame), or None."""
        uid = peer_uid(sock)
        if not C.may_connect(uid, self.limits):
            log.warning("module %s: direct socket refused a client with uid %s", self._runtime.module, uid)
            return C.stream_error(C.uid_refused(uid))
        if len(self._connections) >= MAX_CONNECTIONS and not self._evict_idle():
            return self.redirect(None, f"it serves {MAX_CONNECTIONS} direct connections already, none of them idle")
        return None

    def _evict_idle(self):
        """(At MAX_CONNECTIONS.) Close the connection idle longest, if one has been idle at
        least EVICT_IDLE: a client that keeps connections open without reading must not
        keep direct reads from everyone else. True if one was closed."""
        now = time.monotonic()
        idle = [c for c in list(self._connections.values()) if c.idle_for(now) >= EVICT_IDLE]
        if not idle:
            return False
        min(idle, key=lambda c: c.active_at).close()
        return True

    # -- what all clients may make the worker hold ----------------------------------

    def count_frame(self, connection, size):
        """``connection``'s unfinished frame is ``size`` bytes now. When that takes all
        clients' past max_frames_total, the one holding the most is dropped."""
        with self._totals_lock:
            if connection.closed:
                return  # counted out as it closed (forget_counts)
            grew = size > connection.frame_counted
            self._frames += size - connection.frame_counted
            connection.frame_counted = size
            over = grew and self._frames > self.limits.max_frames_total
        if over:
            self._drop_largest("frame_counted", "unfinished frame", "max_frames_total", self.limits.max_frames_total)

    def count_backlog(self, connection, delta):
        """(Under ``connection``'s send lock.) Its backlog grew or shrank by ``delta`` bytes.
        When that takes all clients' past max_direct_backlog_total, the client with the
        largest is dropped (its reads go through the supervisor)."""
        with self._totals_lock:
            if connection.closed:
                return
            connection.backlog_counted += delta
            self._backlogs += delta
            limit = self.limits.max_direct_backlog_total
            over = delta > 0 and self._backlogs > limit
        if over:
            self._drop_largest("backlog_counted", "unread replies", "max_direct_backlog_total", limit)

    def _drop_largest(self, field, what, key, limit):
        largest = C.to_drop(list(self._connections.values()), operator.attrgetter(field))
        if largest is None:
            return  # what is over is still counted for connections already closing
        log.warning(
            "module %s: dropped the direct client holding the most %s (%d bytes): all direct clients' "
            "passed %s=%d bytes",
            self._runtime.module,
            what,
            getattr(largest, field),
            key,
            limit,
        )
        largest.close()

    def forget_counts(self, connection):
        """(A connection closing, once.) What it counted counts for nothing from now on."""
        with self._totals_lock:
            self._frames -= connection.frame_counted
            self._backlogs -= connection.backlog_counted
            connection.frame_counted = connection.backlog_counted = 0

    # -- requests --------------------------------------------------------------------

    def tell_supervisor(self, message):
        self._runtime.send(message)

    def redirect(self, rid, why):
        """The answer that sends request ``rid`` (None: every request) to the supervisor."""
        message = (
            f"module {self._runtime.module!r}'s worker does not serve this request on its own socket "
            f"({why}); send it to the supervisor at {self._supervisor}"
        )
        return {"id": rid, "ok": False, "redirect": True, "error": to_wire(ModuleUnavailable, message)}

    def request(self, connection, message):
        """One decoded frame from ``connection``: check it, then run it or answer why not."""
        try:
            request = parse_request(message)
        except BadRequest as exc:
            connection.send_map({"id": exc.rid, "ok": False, "error": to_wire(exc.exc_type, str(exc))})
            return
        rid, op = request.id, request.op
        if op not in _READ_OPS:
            connection.send_map(self.redirect(rid, f"{op} is not a read"))
            return
        if request.caller is not None or request.hold is not None:
            connection.send_map(self.redirect(rid, "an agent's call and a held request go through the supervisor"))
            return
        runtime = self._runtime
        if request.module != runtime.module:
            connection.send_map(
                {
                    "id": rid,
                    "ok": False,
                    "error": to_wire(
                        ProgrammingError,
                        f"this socket serves module {runtime.module!r}, not {request.module!r}: "
                        "ask the supervisor for the module's route",
                    ),
                }
            )
            return
        if not self.serving:
            connection.send_map(self.redirect(rid, "the module is not READY: starting, loading or stopping"))
            return
        connection.begin()
        table = request.table
        req = P.Req(
            next(self._sids),
            op,
            table,
            request.params,
            request.vr,
            P.F_NOTIFY if request.notify else 0,
            request.batch,
            request.after,
            request.index,
            request.match,
            request.method,
        )
        answer = _Answer(self, connection, rid, op, table)
        self.counts.began(answer)
        runtime.serve_direct(req, answer)


class _Connection:
    """One direct client: its socket, its reader, and what it has in flight."""

    def __init__(self, server, sock):
        self._server = server
        self._sock = sock
        self.fd = sock.fileno()
        self._reader = P.FrameReader(server.limits.max_frame, decode_request)
        self._send_lock = threading.Lock()
        # Past max_client_requests in flight, its socket is not read until replies drain.
        # In flight = begun - ended: each count has one writer at a time (begun: the
        # thread serving the connection; ended: whoever holds the send lock), so no lock
        # is taken to count a request in.
        self._begun = self._ended = 0
        self._limits = server.limits
        self._counts = server.counts
        self._room = threading.Condition(self._send_lock)
        self._waiting = False  # its reader waits for room
        self.closed = False
        # Since when a frame it started is unfinished (None: none is); the watchdog drops
        # the client at frame_timeout.
        self.frame_since = None
        # What the thread serving it answers while it serves what one read brought is
        # written at the end, in one write: 32 pipelined reads, one syscall and one
        # wake-up of the client, not 32. Other threads (a lane thread that ran a
        # queued read, the watchdog) write at once.
        self._owner = None
        self._out = []
        self._out_bytes = 0
        # What the client did not take yet (the writer thread writes it); since when it
        # last took some. Under the send lock.
        self._backlog = bytearray()
        self.moved_at = 0.0
        # What it holds as counted in the server's totals (DirectServer.count_frame, count_backlog).
        self.frame_counted = 0
        self.backlog_counted = 0
        self.active_at = time.monotonic()  # when it last sent something: idle since then

    def idle_for(self, now):
        """Seconds it has been idle (nothing in flight, nothing unsent, no frame begun); 0 if busy."""
        if self.closed or self._begun != self._ended or self._backlog or self._reader.partial:
            return 0.0
        return now - self.active_at

    def serve(self):
        """(The thread reading it now.) Serve what the client sent; False once the
        connection is over (the client went, a bad frame, dropped)."""
        if self.closed:
            return False
        try:
            data = self._sock.recv(P.READ_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        reader = self._reader
        try:
            messages = reader.feed(data)
        except P.FrameError as exc:
            self.fail(C.bad_stream(exc))
            return False
        self.active_at = now = time.monotonic()
        # Before the reads run (they may wait): a frame finished now is not timed out.
        if not reader.partial:
            self.frame_since = None
            if self.frame_counted:
                self._server.count_frame(self, 0)
        else:
            if messages or self.frame_since is None:  # a frame dribbled in keeps its start
                self.frame_since = now
            self._server.count_frame(self, reader.partial)
        self._owner = threading.get_ident()
        request = self._server.request
        for message in messages:
            if self.closed:
                break  # dropped: what it sent after is not run
            request(self, message)
        self.flush()
        self._owner = None
        return not self.closed

    @property
    def partial(self):
        return self._reader.partial

    def begin(self):
        """A request is handed on: wait while the connection has its bound in flight."""
        if not C.may_send(self._begun - self._ended, self._limits):
            self.flush()  # the answers it waits for may be its own
            with self._room:
                self._waiting = True
                while not C.may_send(self._begun - self._ended, self._limits):
                    self._room.wait()
                self._waiting = False
        self._begun += 1

    def send(self, frame):
        """Send one frame (from the thread serving the connection: at its next flush)."""
        with self._send_lock:
            self._queue(frame)

    def send_now(self, frame):
        """Send one frame now, after what the thread serving it gathered (notify_cli text:
        the client shows it as it comes)."""
        with self._send_lock:
            if self._out:
                self._write_out()
            self._write(frame)

    def flush(self):
        """(Its reader.) Send what it answered since the last flush."""
        if self._out:
            with self._send_lock:
                if self._out:  # not written meanwhile by a drop
                    self._write_out()

    def reply(self, answer, frame, error_type):
        """Send ``answer``'s final reply, once: False if it was sent already. It is counted
        first, so that a status asked for once the client has it includes it."""
        with self._send_lock:
            if answer.answered:
                return False
            answer.answered = True
            self._counts.answered(answer, error_type, time.monotonic_ns())
            self._ended += 1
            if self._waiting:
                self._room.notify()
            self._queue(frame)
        return True

    def withdraw(self, answer, frame):
        """Send ``frame`` as ``answer``'s final word, not counted as served (a redirect)."""
        with self._send_lock:
            answer.answered = True
            self._counts.withdraw(answer)
            self._ended += 1
            if self._waiting:
                self._room.notify()
            self._queue(frame)

    def _queue(self, frame):
        if threading.get_ident() != self._owner:
            self._write(frame)
            return
        self._out.append(frame)
        self._out_bytes += len(frame)
        if self._out_bytes >= BATCH_BYTES:
            self._write_out()

    def _write_out(self):
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        self._out_bytes = 0
        self._write(data)

    def _write(self, data):
        """(Under the send lock.) Write what the socket takes now; the rest joins the backlog."""
        if self.closed:
            return
        if not self._backlog:
            try:
                sent = self._sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self.moved_at = time.monotonic()
            self._server.writer.watch(self)
        self._backlog += data
        self._server.count_backlog(self, len(data))
        if C.backlog_over(len(self._backlog), self._limits):
            log.warning(
                "module %s: a direct client's unread replies passed max_client_backlog=%d bytes; dropped",
                self._server._runtime.module,
                self._limits.max_client_backlog,
            )
            self.close()

    def drop_after_writing(self, frame=None):
        """Drop the client once what its reader gathered, then ``frame``, is written (as far
        as the socket takes it)."""
        with self._send_lock:
            if self._out:
                self._write_out()
            if frame is not None:
                self._write(frame)
            self.close()

    def write_backlog(self):
        """(The writer thread.) Write what the socket takes of the backlog; True once it is empty."""
        with self._send_lock:
            if self.closed:
                return True
            try:
                sent = self._sock.send(self._backlog, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            except OSError:
                self.close()
                return True
            if sent:
                del self._backlog[:sent]
                self.moved_at = time.monotonic()
                self._server.count_backlog(self, -sent)
            return not self._backlog

    def send_map(self, message):
        self.send(P.pack(message))

    def fail(self, message):
        """Tell the client why its stream is refused, then drop it."""
        self.drop_after_writing(P.pack(C.stream_error(message)))

    def close(self):
        """Drop the client. Only shut down here: the reading thread, which this wakes, closes
        the socket (release), so that no thread can find its descriptor reused under it."""
        if not self.closed:
            self.closed = True
            self._backlog = bytearray()
            self._server.forget_counts(self)  # what it held is let go now: it counts against nobody
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def release(self):
        """(The reading thread, at the end.) Close the socket, under the send lock: a thread
        sending to it meanwhile finishes first, and any later finds it closed."""
        with self._send_lock:
            self.close()
            self._sock.close()
            self._reader = P.FrameReader(0)  # its unfinished frame goes now, not with the last reference

    def unsent(self):
        """Bytes of answers gathered or waiting for the client to take them (none once dropped)."""
        return 0 if self.closed else self._out_bytes + len(self._backlog)

    @property
    def sock(self):
        return self._sock


class _Writer:
    """Writes the backlogs of clients slower than their replies, as each client's socket
    takes them; drops a client whose backlog has not moved for frame_timeout."""

    def __init__(self, timeout):
        self._timeout = timeout
        self._selector = selectors.DefaultSelector()
        self._wakeup = Wakeup()  # a connection with a backlog to watch
        self._selector.register(self._wakeup, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._new = []  # connections with a backlog, for the writer thread to watch
        self._watched = set()  # (the writer thread's) connections whose sockets it waits on

    def watch(self, connection):
        with self._lock:
            self._new.append(connection)
        self._wakeup.wake()

    def run(self):
        while True:
            self.turn(min(1.0, self._timeout / 4))

    def turn(self, wait):
        """Write what the watched sockets take, waiting up to ``wait`` seconds for one; then
        drop stalled connections and watch new ones."""
        watched = self._watched
        for key, _ in self._selector.select(wait):
            if key.fileobj is self._wakeup:
                self._wakeup.clear()
            elif key.data.write_backlog():
                self._forget(key.data, watched)
        # Gone or stalled connections first: a new one may have the descriptor of a
        # closed one that is still registered.
        now = time.monotonic()
        for connection in list(watched):
            if connection.closed or now - connection.moved_at >= self._timeout:
                if not connection.closed:
                    log.warning(
                        "a direct client took none of its replies for %gs (frame_timeout); dropped", self._timeout
                    )
                connection.close()
                self._forget(connection, watched)
        with self._lock:
            new, self._new = self._new, []
        for connection in new:
            if connection not in watched and not connection.closed:
                self._watch(connection, watched)

    def _watch(self, connection, watched):
        try:
            self._selector.register(connection.sock, selectors.EVENT_WRITE, connection)
        except ValueError:  # closed meanwhile
            return
        except KeyError:  # its descriptor is a closed connection's, registered still
            stale = self._selector.get_map().get(connection.sock.fileno())
            if stale is None:
                return
            stale.data.close()
            self._forget(stale.data, watched)
            try:
                self._selector.register(connection.sock, selectors.EVENT_WRITE, connection)
            except (KeyError, ValueError):
                return
        watched.add(connection)

    def _forget(self, connection, watched):
        watched.discard(connection)
        try:
            self._selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass


class _Answer:
    """Where one direct request's Reply and Notify messages go (actions.Actions sends
    them as it would to the supervisor): frames for its client, and its figures. The
    final reply is sent once: by the action, or by the watchdog at action_timeout."""

    __slots__ = ("_server", "_connection", "_rid", "op", "_table", "since", "answered")

    def __init__(self, server, connection, rid, op, table):
        self._server = server
        self._connection = connection
        self._rid = rid
        self.op = op
        self._table = table
        self.since = time.monotonic_ns()
        self.answered = False  # under the connection's send lock

    def __call__(self, message):
        if type(message) is P.Notify:
            if not self.answered:
                self._connection.send_now(P.pack({"id": self._rid, "notify": message.text}))
            return
        error = message.error
        if error is None:
            if message.dirty:  # as the supervisor marks a module unsaved for any reply that says so
                self._server.tell_supervisor(P.Dirty())
            self._connection.reply(self, P.reply_frame(self._rid, message.entries), None)
        else:
            self._connection.reply(self, P.pack({"id": self._rid, "ok": False, "error": error}), error["type"])

    def flush(self):
        self._connection.flush()

    def redirect(self, why):
        """Send it to the supervisor instead (``why`` says why), withdrawn from the figures."""
        self._connection.withdraw(self, P.pack(self._server.redirect(self._rid, why)))

    @property
    def gone(self):
        """Its client hung up (or was dropped): running it would answer nobody."""
        return self._connection.closed

    def not_run(self):
        """Count it as answered, not run: its client is gone."""
        self._connection.reply(self, b"", OperationalError.__name__)

    def time_out(self, limit):
        message = action_timed_out(self.op, self._server._runtime.module, self._table, limit)
        frame = P.pack({"id": self._rid, "ok": False, "error": to_wire(OperationalError, message)})
        if self._connection.reply(self, frame, OperationalError.__name__):
            self._connection.drop_after_writing()


def _close_with(sock, message, timeout):
    """Tell a refused client why, then wait (up to ``timeout``) for it to go: a client that
    sends its request as it is refused would get EPIPE instead of reading why, were the
    socket closed at once."""
    try:
        sock.settimeout(timeout)
        sock.sendall(P.pack(message))
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(P.READ_SIZE):
            pass
    except OSError:
        pass
    sock.close()
