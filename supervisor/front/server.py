"""The frontend socket: listening, clients, peer checks, framing, request validation
and backpressure.

Bytes from clients are untrusted: frames are size-checked before their body is
read, decoded with msgpack only, and every field is checked before a request
reaches the routing code. A client whose stream is broken is answered once and
dropped; everyone else goes on being served. What a client can make the
supervisor hold (requests in flight, unsent replies, unfinished frames) is
bounded, each bound a [supervisor] key (Server).
"""

import errno
import logging
import operator
import os
import shutil
import socket
import stat
import tempfile
import time

from cmactor.errors import InternalError, to_wire
from cmactor.wire import clients as C, protocol as P
from cmactor.wire.trim import release_free_memory
from cmactor.wire.validate import BadRequest, decode_request, parse_request, peer_credentials, peer_uid
from cmsupervisor.loop import recv

log = logging.getLogger("cmactor.supervisor")

# Longest path an AF_UNIX socket can bind on Linux (108 bytes with the NUL).
MAX_SOCKET_PATH = 107

# Seconds the unsent replies of all clients may stay over max_backlog_total before the
# client with the largest backlog is dropped (and as long again for each next one).
BACKLOG_GRACE = 5.0

# accept() failing for want of descriptors or memory leaves the listener readable:
# trying again at once would spin. The listener is left alone this long instead.
ACCEPT_PAUSE = 0.5
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_DATA_OPS = frozenset(P.DATA_OPS)
# What a client holds as counted in the server's totals (the key of clients.to_drop).
# Over a total, to_drop finds the client to drop: only the loop counts, and only clients
# connected count for anything.
_frame_held = operator.attrgetter("frame_counted")
_backlog_held = operator.attrgetter("counted")


def default_socket_path(state_dir):
    """Where a supervisor listens unless [supervisor] socket says otherwise."""
    return os.path.join(state_dir, "run", "cm.sock")


def socket_pointer(state_dir):
    """File in which a running supervisor records the socket path it bound, for clients."""
    return os.path.join(state_dir, "run", "socket.path")


def listen(path, allowed_uids=()):
    """Bind the frontend socket at ``path``.

    Returns (socket, path actually bound, private dir to remove or None). A path
    too long for AF_UNIX moves the socket to a short private directory. A directory
    made here is 0700, or 0711 when ``allowed_uids`` may connect: they must reach
    the socket, which is then made 0666 (the peer uid check in Server is the gate);
    else it is 0600.
    A directory that exists is never changed, and is refused if another user could
    replace the socket in it.
    """
    mode = 0o711 if allowed_uids else 0o700
    private_dir = None
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        private_dir = tempfile.mkdtemp(prefix="cmactor-")  # 0700, and ours alone
        os.chmod(private_dir, mode)
        path = os.path.join(private_dir, "cm.sock")
    else:
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=mode)
        except FileExistsError:
            pass  # not made here: its mode is its owner's business
        else:
            os.chmod(directory, mode)  # makedirs' mode is cut by the umask
        _check_directory(directory, allowed_uids)
    if os.path.lexists(path):
        _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Connecting takes write permission on the socket: owner-only unless allowed_uids
        # must get in, whom the peer uid check in Server then lets through alone.
        os.chmod(path, 0o666 if allowed_uids else 0o600)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock, path, private_dir


def unlisten(sock, path, private_dir):
    """Undo listen(): close the socket, remove its file (and the private directory made for it)."""
    sock.close()
    try:
        os.unlink(path)
    except OSError:
        pass
    if private_dir:
        shutil.rmtree(private_dir, ignore_errors=True)


def _check_directory(directory, allowed_uids):
    """Refuse a socket directory in which another user could replace the socket; warn
    when one that exists keeps the allowed uids out."""
    st = os.stat(directory)
    fix = "use a directory only you can write, like the default state_dir/run"
    if st.st_mode & 0o022:
        raise OSError(
            f"the socket's directory {directory} can be written by others (mode {stat.S_IMODE(st.st_mode):04o}), "
            f"so another user could replace the socket; {fix}"
        )
    if st.st_uid not in (os.getuid(), 0):
        raise OSError(
            f"the socket's directory {directory} belongs to uid {st.st_uid}, who could replace the socket; {fix}"
        )
    if allowed_uids and not st.st_mode & 0o001:
        log.warning(
            "allowed_uids cannot reach the socket: its directory %s is mode %04o, and cmactor changes only "
            "directories it makes; `chmod o+x %s` lets them through (the socket checks their uid)",
            directory,
            stat.S_IMODE(st.st_mode),
            directory,
        )


def _remove_stale(path):
    """Remove a socket file left by a dead supervisor; refuse to take over a live one,
    or to remove anything that is not a socket."""
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise OSError(
            f"{path} exists and is not a socket; cmactor removes only a socket a dead supervisor left: "
            "move it away, or choose another [supervisor] socket path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"another supervisor is already listening on {path}; stop it or choose another state_dir")


class Client:
    """One connected frontend, an endpoint of the loop: its socket, read state and pending
    output, and what it has in flight (see Server for the bounds)."""

    __slots__ = (
        "sock",
        "reader",
        "out",
        "closed",
        "closing",
        "peer_pid",
        "peer_uid",
        "in_flight",
        "reading",
        "unserved",
        "frame_since",
        "frame_timer",
        "counted",
        "frame_counted",
        "_server",
        "_mark",
    )

    def __init__(self, server, sock, max_frame, peer_pid=None, peer_uid=None):
        self._server = server
        self._mark = server.loop.mark
        self.sock = sock  # None once dropped
        self.peer_pid = peer_pid  # from SO_PEERCRED: who really connected, whatever user name it claims
        self.peer_uid = peer_uid
        self.reader = P.FrameReader(max_frame, decode_request)
        self.out = bytearray()
        self.closed = False
        self.closing = False  # answered with a stream error: its output is shut once flushed
        self.in_flight = 0  # requests handed on whose final reply is not queued yet
        self.reading = True  # its socket is read (Server._may_read says when it is not)
        self.unserved = ()  # requests read but not handed on when reading stopped: first when it resumes
        self.frame_since = None  # when the unfinished frame its reader holds was started
        self.frame_timer = False  # a frame_timeout check is due for it
        self.counted = 0  # len(out) as counted in the server's total backlog
        self.frame_counted = 0  # its unfinished frame's bytes as counted in the server's total

    def _queue(self, data):
        if not self.closed:
            self.out += data
            self._mark(self)

    # What the parts answering a request call: each answer(), answer_frame() or
    # answer_error() is the final reply to one request handed to them; notify() is not.
    def answer(self, message):
        """Queue the final reply ``message`` (a map); dropped if the client is gone."""
        self.in_flight -= 1
        self._queue(P.pack(message))

    def answer_frame(self, frame):
        """Queue a final reply already encoded (protocol.reply_frame)."""
        self.in_flight -= 1
        if not self.closed:  # _queue() inlined: this is every successful reply
            self.out += frame
            self._mark(self)

    def answer_error(self, rid, exc_type, message):
        self.answer({"id": rid, "ok": False, "error": to_wire(exc_type, message)})

    def notify(self, message):
        """Queue a message that is not a final reply (notify_cli text)."""
        self._queue(P.pack(message))

    def refuse(self, rid, exc_type, message):
        """The server's own answer to a request it did not hand on (never in flight)."""
        self._queue(P.pack({"id": rid, "ok": False, "error": to_wire(exc_type, message)}))

    def fail_stream(self, message):
        """Answer a stream-level error (no request id can be trusted) and drop the client."""
        self._queue(P.pack(C.stream_error(message)))
        self.closing = True

    # endpoint interface (loop.py)
    def sent(self):
        if self.out:  # else drained() follows, and counts
            self._server.flushed(self)

    def drained(self):
        if self.closing:
            self._server.shut(self)
        elif self.counted or not self.reading:  # else nothing to count or resume: every reply's path
            self._server.flushed(self)

    def send_failed(self):
        self._server.drop(self)


class Server:
    """The frontend socket: accepts clients, checks their uid, reads their frames and
    hands each valid request to ``handle(client, request)``; answers bad ones itself.

    What clients can make it hold is bounded (``limits``, a clients.ClientLimits, whose
    decisions the worker's direct socket takes alike):

    - requests in flight per client: past ``max_client_requests`` (counted from the
      hand-off to the final reply) its socket is not read until replies drain below;
    - unsent replies per client: past ``max_client_backlog`` it is dropped;
    - unsent replies of all clients: past ``max_backlog_total`` no client is read until
      the total is below it again, and while it stays above, the client with the
      largest backlog is dropped every BACKLOG_GRACE seconds;
    - an unfinished frame: one started must be complete within ``frame_timeout``
      (its size is capped by ``max_frame`` from its header);
    - unfinished frames of all clients: past ``max_frames_total`` bytes, the client
      holding the largest is dropped (many clients each dribbling a frame of
      ``max_frame`` would otherwise pin that much each).

    ``on_drop(client)``, if set, is called for each client dropped.
    """

    def __init__(self, loop, listening, limits):
        self.loop = loop
        self._listener, self.socket_path, self._private_dir = listening  # from listen()
        # (client, request) for each valid request: a data request's (Router.route), a
        # control request's (Control.handle).
        self.on_data = self.on_control = None
        self._limits = limits
        self._frames = 0  # bytes of every client's unfinished frame, as counted
        self._trim_due = False  # clients were dropped: what they held goes back to the system
        self.on_drop = None
        self._clients = set()
        self._backlog = 0  # unsent reply bytes of every client, as of its last flush
        self._held_back = False  # the backlog is over max_backlog_total: no client is read
        self._episodes = 0  # times the clients were held back, to tell a hold's timers apart
        self._warned_at = None  # when the last hold-back was logged
        loop.watch(self._listener, self._accept, self._listener)

    @property
    def client_count(self):
        """Clients connected now (agents' own connections among them)."""
        return len(self._clients)

    # -- clients in ---------------------------------------------------------

    def _accept(self, listener):
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause_accepting(listener, exc)
                else:
                    log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            pid, _ = peer_credentials(sock)
            uid = peer_uid(sock)
            client = Client(self, sock, self._limits.max_frame, pid, uid)
            self._clients.add(client)
            self.loop.watch(sock, self._read, client, client)
            if not C.may_connect(uid, self._limits):
                log.warning("refused a client with uid %s", uid)
                self._fail_stream(client, C.uid_refused(uid))
            elif self._held_back:
                self._stop_reading(client)

    def _pause_accepting(self, listener, exc):
        """Out of file descriptors or memory: accept() fails and the listener stays
        readable, so trying again at once would spin. Stop watching it for a moment."""
        self.loop.unwatch(listener)
        self.loop.after(ACCEPT_PAUSE, self._resume_accepting, listener)
        log.warning(
            "cannot accept clients: %s; trying again in %gs (closing clients frees descriptors; "
            "`ulimit -n` raises the limit)",
            exc,
            ACCEPT_PAUSE,
        )

    def _resume_accepting(self, listener):
        if listener is self._listener:  # not closed meanwhile
            self.loop.watch(listener, self._accept, listener)

    def _read(self, client):
        data = recv(client.sock)
        if data is None:
            return
        if not data:
            self.drop(client)  # replies still running for it are dropped on arrival
            return
        if client.closing:
            return
        reader = client.reader
        try:
            messages = reader.feed(data)
        except P.FrameError as exc:
            self._fail_stream(client, C.bad_stream(exc))
            return
        if messages:
            self._serve(client, messages)
        # After the requests are handed on: the usual read ends on a frame's end.
        if reader.partial:
            if messages or client.frame_since is None:  # a frame started in this read
                self._frame_started(client)
            self._count_frame(client, reader.partial)
        else:
            client.frame_since = None
            if client.frame_counted:
                self._count_frame(client, 0)

    def _count_frame(self, client, size):
        """Count ``client``'s unfinished frame at ``size`` bytes; past max_frames_total for
        all clients, drop the one holding the most."""
        if client.closed:
            return  # dropped meanwhile: it counts for nothing now
        self._frames += size - client.frame_counted
        client.frame_counted = size
        if self._frames > self._limits.max_frames_total:
            largest = C.to_drop(self._clients, _frame_held)
            log.warning(
                "dropped client pid %s uid %s: its unfinished frame of %d bytes is the largest while the "
                "unfinished frames of all clients total %d bytes, over max_frames_total (%d)",
                largest.peer_pid,
                largest.peer_uid,
                largest.frame_counted,
                self._frames,
                self._limits.max_frames_total,
            )
            self.drop(largest)

    def _serve(self, client, messages):
        """Hand each request on, or answer it if it is bad; at max_client_requests in
        flight, stop reading and keep the rest until replies drain."""
        on_data, on_control = self.on_data, self.on_control
        limits = self._limits
        for index, message in enumerate(messages):
            if not C.may_send(client.in_flight, limits):
                client.unserved = messages[index:]
                self._stop_reading(client)
                return
            try:
                request = parse_request(message)
            except BadRequest as exc:
                client.refuse(exc.rid, exc.exc_type, str(exc))
                continue
            client.in_flight += 1
            owed = client.in_flight
            try:
                (on_data if request.op in _DATA_OPS else on_control)(client, request)
            except Exception as exc:  # a bug: it must cost this request only, never the loop
                log.exception("internal error handling request %r of client pid %s", request.id, client.peer_pid)
                if client.in_flight < owed:
                    continue  # it was answered before the error
                client.answer_error(
                    request.id,
                    InternalError,
                    f"internal error handling {request.op}: {type(exc).__name__}: {exc}; the supervisor's log "
                    "has the traceback; the supervisor carries on",
                )

    # -- unfinished frames --------------------------------------------------------

    def _frame_started(self, client):
        client.frame_since = time.monotonic()
        if not client.frame_timer:  # one timer a client: it moves itself on to the newest frame
            client.frame_timer = True
            self.loop.after(self._limits.frame_timeout, self._frame_due, client)

    def _frame_due(self, client):
        client.frame_timer = False
        since = client.frame_since
        if since is None or client.closed or client.closing or not client.reading:
            return  # finished, gone, or not read (its clock starts again when reading resumes)
        left = C.frame_left(since, time.monotonic(), self._limits)
        if left > 0:
            client.frame_timer = True
            self.loop.after(left, self._frame_due, client)
            return
        self._fail_stream(client, C.frame_overdue(client.reader.partial, self._limits))

    def _fail_stream(self, client, message):
        client.fail_stream(message)
        # Dropped at its EOF (see shut), or after frame_timeout if it neither reads nor leaves.
        self.loop.after(self._limits.frame_timeout, self.drop, client)

    def shut(self, client):
        """(A closing client's stream error is sent.) Shut its output, not its input: a
        client that sends its request just as it is refused would get EPIPE instead of
        reading why, were the socket closed. What it sends is read and discarded until
        its EOF, which drops it."""
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.drop(client)

    # -- backpressure -------------------------------------------------------------

    def _may_read(self, client):
        return not self._held_back and C.may_send(client.in_flight, self._limits)

    def _stop_reading(self, client):
        if client.reading:
            client.reading = False
            self.loop.pause_reading(client)

    def _resume(self, client):
        """Serve what ``client`` sent before it was paused, then read it again, if it may."""
        if client.closed or client.reading or not self._may_read(client):
            return
        unserved, client.unserved = client.unserved, ()
        self._serve(client, unserved)
        if client.unserved:
            return  # at the bound again
        client.reading = True
        self.loop.resume_reading(client)
        if client.reader.partial:
            self._frame_started(client)  # it could not be finished while nobody read

    def flushed(self, client):
        """(Loop thread, each turn ``client`` had output.) Count its backlog, drop it past
        max_client_backlog, and read it again once it may. Resuming waits for the turn's
        timers: the requests it hands on then get this turn's output."""
        if client.closed:
            return
        size = len(client.out)
        if size != client.counted:
            self._backlog += size - client.counted
            client.counted = size
            if C.backlog_over(size, self._limits):
                log.warning(
                    "dropped client pid %s uid %s: %d bytes of replies to it are unsent, over max_client_backlog "
                    "(%d); it does not read its replies",
                    client.peer_pid,
                    client.peer_uid,
                    size,
                    self._limits.max_client_backlog,
                )
                self.drop(client)
                return
            self._check_total()
        if not client.reading and self._may_read(client):
            self.loop.after(0, self._resume, client)

    def _check_total(self):
        # One bound for all clients, as simple as it can be: past it nobody is read, so no
        # new request adds a reply; what is in flight still comes back (at most
        # max_client_requests per client). A fairer share per client would need a bound
        # that moves with the number of clients, and the per-client bounds already stop
        # any one client from taking much more than its share.
        if self._backlog > self._limits.max_backlog_total:
            if not self._held_back:
                self._hold_back()
        elif self._held_back:
            self._held_back = False
            log.info("unsent replies are below max_backlog_total again: reading every client")
            for client in self._clients:
                if not client.reading:
                    self.loop.after(0, self._resume, client)

    def _hold_back(self):
        self._held_back = True
        self._episodes += 1
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= 60:  # it may come and go each turn
            self._warned_at = now
            log.warning(
                "unsent replies to clients total %d bytes, over max_backlog_total (%d): no client is read until "
                "they drain (logged at most once a minute)",
                self._backlog,
                self._limits.max_backlog_total,
            )
        for client in self._clients:
            self._stop_reading(client)
        self.loop.after(BACKLOG_GRACE, self._backlog_due, self._episodes)

    def _backlog_due(self, episode):
        if not self._held_back or episode != self._episodes:
            return
        largest = C.to_drop(self._clients, _backlog_held)
        log.warning(
            "dropped client pid %s uid %s, which had the largest backlog (%d bytes): unsent replies to all "
            "clients stayed over max_backlog_total (%d) for %gs",
            largest.peer_pid,
            largest.peer_uid,
            largest.counted,
            self._limits.max_backlog_total,
            BACKLOG_GRACE,
        )
        self.drop(largest)
        if self._held_back:
            self.loop.after(BACKLOG_GRACE, self._backlog_due, episode)

    # -- clients out ----------------------------------------------------------------

    def drop(self, client):
        if client.closed:
            return
        client.closed = True
        self._clients.discard(client)
        self.loop.close_endpoint(client)
        client.sock = None
        client.out = bytearray()  # its unsent replies go now, not when the last reference does
        client.unserved = ()
        client.reader = P.FrameReader(0)  # and its unfinished frame
        self._frames -= client.frame_counted
        client.frame_counted = 0
        self._backlog -= client.counted
        client.counted = 0
        self._check_total()
        if self.on_drop is not None:
            self.on_drop(client)  # which lets go of what was held for it
        if not self._trim_due:  # once a turn at most, after what the drops freed is freed
            self._trim_due = True
            self.loop.after(0, self._trim)

    def _trim(self):
        self._trim_due = False
        release_free_memory()

    def close(self):
        """Drop every client, stop listening and remove the socket (and its private directory)."""
        for client in list(self._clients):
            self.drop(client)
        if self._listener is None:
            return
        self.loop.unwatch(self._listener)
        unlisten(self._listener, self.socket_path, self._private_dir)
        self._listener = None
