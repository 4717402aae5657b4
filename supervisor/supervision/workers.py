"""Worker processes: starting one, its channel, reading it, ending it.

Each worker gets a fresh socket pair (its channel) and a doorbell pair at every
start, so a worker killed mid-write cannot poison the next one. The channel is
an endpoint of the loop; what arrives on it is decoded (protocol's named
messages) and handed to the handler registered for its kind.

A third pair carries the worker's stdout and stderr (its fds 1 and 2, inherited
by the processes it starts): the supervisor reads it in the loop and hands the
lines to the module's log (logs.py), which it alone writes, so it can rotate it.

With direct reads on, each start also binds the worker's own socket beside the
supervisor's, named after it: ``cm.sock.<generation>`` (a new name at every
start, so a client holding an old route can never reach the next worker), and hands the listening
socket and a shared array for its figures (cmactor/wire/figures.py) to the worker.
The socket file goes when the worker is reaped.
"""

import errno
import itertools
import logging
import multiprocessing
import os
import re
import signal
import socket
import stat
import sys

from cmactor.wire import figures as F, protocol as P
from cmactor.worker import process as worker
from cmsupervisor.front.server import MAX_SOCKET_PATH, listen
from cmsupervisor.loop import recv
from cmsupervisor.supervision import health

log = logging.getLogger("cmactor.supervisor")

# Never fork from the supervisor: it has threads, and a fork of a threaded process
# can deadlock. The fork server is a single-threaded process forked once, early.
START_METHOD = "forkserver"

# A worker's output line longer than this (one printed without a newline) is cut into
# lines of this size: what is kept of a line waiting for its newline stays bounded.
MAX_LINE = 16 * 1024
# What is read of a dead worker's output: more than its socket can hold (everything it
# wrote), and a bound on a process it started that goes on writing.
DRAIN_MAX = 1024 * 1024


# A start that fails with one of these lacks what passes (descriptors, processes, memory):
# no fault of the module's, so it is tried again rather than counted as a crash.
_SHORTAGE = frozenset((errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM, errno.ENOBUFS))


class SpawnFailed(Exception):
    """No worker process could be started. ``shortage``: for want of file descriptors,
    processes or memory (or the fork server died of it: multiprocessing starts a new
    one at the next try), which passes; else something a retry will not mend."""

    def __init__(self, message, shortage):
        super().__init__(message)
        self.shortage = shortage


def _is_shortage(exc):
    if isinstance(exc, OSError) and exc.errno in _SHORTAGE:
        return True
    # The fork server hangs up when it fails to fork (EAGAIN) or to receive the
    # descriptors (EMFILE) in its own process: EOF here.
    return isinstance(exc, EOFError | ConnectionError)


class Channel:
    """The supervisor's end of one worker's socket pair, an endpoint of the loop.

    Every item the worker's serial lane runs (requests, loads, saves) gets an id
    from one counter that only grows, so that after a crash the lane's last
    started id (progress slots) splits the unanswered requests in two."""

    __slots__ = (
        "sock",
        "doorbell",
        "reader",
        "out",
        "pinged_at",
        "route",
        "_sids",
        "_mark",
        "_ring",
        "_serial_sids",
    )

    def __init__(self, sock, doorbell, sids, mark, route=None):
        self.sock = sock
        self.doorbell = doorbell  # rung when async work is sent while serial work is unanswered
        self.reader = P.FrameReader(max_frame=None, decode=P.CHANNEL.decode)  # our own worker: trusted
        self.out = bytearray()
        self._sids = sids
        self._mark = mark
        self._ring = False  # async work went into this turn's output
        self._serial_sids = set()  # serial requests sent and not yet answered
        self.pinged_at = None  # when the oldest unanswered Ping was sent
        self.route = route  # {"path", "generation"} of the worker's direct socket, or None

    @property
    def open(self):
        return self.sock is not None

    def _send(self, message):
        self.out += P.pack(message)
        self._mark(self)

    def request(self, op, table, params, vr, flags, batch, after, index, match, method, is_async):
        """Send one request; its sid."""
        sid = next(self._sids)
        if is_async:
            self._ring = True
        else:
            self._serial_sids.add(sid)
        self._send(P.Req(sid, op, table, params, vr, flags, batch, after, index, match, method))
        return sid

    def answered(self, sid):
        self._serial_sids.discard(sid)

    def load(self, section, journal):
        sid = next(self._sids)
        self._send(P.Load(sid, section, journal))
        return sid

    def save(self, tables):
        sid = next(self._sids)
        self._send(P.Save(sid, tables))
        return sid

    def stop(self):
        self._send(P.Stop())

    def role(self, standby):
        """Tell the worker its node's role in the cluster ([ha]): ctx.is_standby."""
        self._send(P.Role(standby))

    def cancel(self, sids):
        """The client of requests ``sids`` is gone: the worker drops those it has not started
        (and answers each so). Rung: its reading thread may be running serial work."""
        self._ring = True
        self._send(P.Cancel(sids))

    def ping(self, now):
        """Ask the worker whether it is alive (it answers from whichever lane thread reads,
        the doorbell waking one if the reader is running a serial action)."""
        if self.pinged_at is None:
            self.pinged_at = now
        self._ring = True
        self._send(P.Ping())

    def pong(self):
        self.pinged_at = None

    # endpoint interface (loop.py)
    def sent(self):
        """Async work went out. A worker runs serial work on its reading thread, so while
        any serial request of it is unanswered its socket may be unread: ring its
        doorbell, and another thread reads (see cmactor/worker/lanes.py)."""
        if self._ring:
            self._ring = False
            if self._serial_sids:
                try:
                    self.doorbell.send(b"!")
                except OSError:
                    pass  # full of rings already, or the worker is dying

    def drained(self):
        pass

    def send_failed(self):
        self.out.clear()  # the worker is dying; its sentinel will tell

    def close(self):
        self.doorbell.close()


class Output:
    """The supervisor's end of one worker's stdout/stderr socket pair, cut into lines."""

    __slots__ = ("mod", "sock", "_partial")

    def __init__(self, mod, sock):
        self.mod = mod
        self.sock = sock
        self._partial = b""  # the last line, until its newline comes

    def lines(self, data):
        """The complete lines in what was read, as text; a line past MAX_LINE is cut."""
        *lines, rest = (self._partial + data).split(b"\n")
        while len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self._partial = rest
        return [line.decode("utf-8", "backslashreplace") for line in lines]

    def rest(self):
        """At the end: the last line, if it never got its newline."""
        rest, self._partial = self._partial, b""
        return [rest.decode("utf-8", "backslashreplace")] if rest else []


class Workers:
    """Starts and ends the worker processes of modules and reads their channels.

    What a worker sends goes to the handler registered for its kind (handle());
    ``on_exit(mod)`` is called when a worker's process sentinel fires, and
    ``on_output(mod, lines)`` with the lines it wrote to stdout or stderr."""

    def __init__(self, loop, *, socket_path, base_dir, log_level, direct=None, cgroups=None):
        self._loop = loop
        # Direct reads: the options a worker's socket is served with (cmactor/worker/direct.py),
        # or None when [supervisor] direct_reads is off.
        self._direct = direct
        # memory.Cgroups, which a worker with a memory_max is started in; None when memory_max
        # is the RSS watchdog's (memory.py), or no module has one.
        self._cgroups = cgroups
        self._cgroup_of = {}  # module name -> (the cgroup of its current worker, its memory_max), if it has one
        self._generations = itertools.count(1)
        if direct is not None:
            _remove_stale_sockets(socket_path)
        self._handlers = {}
        self.on_exit = None
        self.on_output = None
        self._outputs = {}  # module name -> the Output of its current worker
        self._socket_path = socket_path
        self._base_dir = base_dir
        self._log_level = log_level
        self._sids = itertools.count(1)
        self._mp = multiprocessing.get_context(START_METHOD)
        # Preloaded in the fork server, so a worker (and a restart) starts with the
        # runtime already imported: a fork, not a fresh interpreter.
        self._mp.set_forkserver_preload(["cmactor.worker.process"])

    def handle(self, kind, handler):
        """Call ``handler(mod, message)`` for each message of class ``kind`` (protocol.Reply, ...)."""
        self._handlers[kind] = handler

    def spawn(self, mod):
        """Start a worker for ``mod``: what the module keeps of it, for Module.started (the process,
        its Channel, its progress slots, its psutil.Process, its direct read figures or None); or
        raise SpawnFailed saying why it could not be started."""
        env = dict(os.environ)
        env.update(mod.options["env"])
        env["CMACTOR_SOCKET"] = self._socket_path
        env["CMACTOR_MODULE"] = mod.name
        spec = {
            "module": mod.name,
            "entry": mod.options["entry"],
            "argv": [mod.name, *mod.options["args"]],
            "exos_compat": mod.options["exos_compat"],
            "exos_path": mod.options["exos_path"],
            "cwd": os.getcwd(),
            "sys_path": [self._base_dir] + [p or os.getcwd() for p in sys.path],
            "env": env,
            "pool_size": mod.options["pool_size"],
            "log_level": self._log_level,
            "cgroup": None,  # the worker moves itself there first thing
        }
        opened = []
        route = direct = cgroup = None
        try:  # each step can fail with the process out of fds (EMFILE) or memory
            if self._cgroups is not None and mod.memory_max is not None:
                cgroup = spec["cgroup"] = self._cgroups.create(mod.name, mod.memory_max)
            if self._direct is not None:
                route, direct = self._bind_direct(mod, opened)
            if direct is not None:
                spec["direct"] = {**self._direct, "action_timeout": mod.options["action_timeout"]}
            parent, child = socket.socketpair()
            opened += (parent, child)
            bell, bell_child = socket.socketpair()
            opened += (bell, bell_child)
            # A socket pair rather than a pipe: multiprocessing hands sockets to the fork server's child.
            out, out_child = socket.socketpair()
            opened += (out, out_child)
            slots = self._mp.RawArray("q", P.SLOTS_SIZE)
            process = self._mp.Process(
                target=worker.main,
                args=(spec, child, bell_child, slots, out_child, direct),
                name=f"cmactor-{mod.name}",
            )
            process.start()
        except Exception as exc:
            for sock in opened:
                sock.close()
            if route is not None:
                _unlink(route["path"])
            if cgroup is not None:
                self._cgroups.end(cgroup, mod.memory_max)
            raise SpawnFailed(
                f"could not start a worker process: {type(exc).__name__}: {exc}", _is_shortage(exc)
            ) from None
        child.close()  # else the worker's death would never show as EOF here
        bell_child.close()
        out_child.close()
        if direct is not None:
            direct[0].close()  # the worker's now: the supervisor never accepts on it
        parent.setblocking(False)
        bell.setblocking(False)
        out.setblocking(False)
        channel = Channel(parent, bell, self._sids, self._loop.mark, route)
        # The Output, not the module, is what the loop hands back: a read that was ready
        # in the turn its worker was reaped finds it closed, not the next worker's.
        output = Output(mod, out)
        try:  # epoll may refuse (out of memory): then no worker must run unseen
            self._loop.watch(parent, self._read, mod, channel)
            self._loop.watch(out, self._read_output, output)
            self._loop.watch(process.sentinel, self.on_exit, mod)
        except OSError as exc:
            for watched in (parent, out, process.sentinel):
                self._loop.unwatch(watched)
            for sock in (parent, bell, out):
                sock.close()
            kill_group(process.pid, leader=True)
            process.join()
            process.close()
            if route is not None:
                _unlink(route["path"])
            if cgroup is not None:
                self._cgroups.end(cgroup, mod.memory_max)
            raise SpawnFailed(f"could not watch a new worker: {type(exc).__name__}: {exc}", _is_shortage(exc)) from None
        self._outputs[mod.name] = output
        if cgroup is not None:  # with the limit it was made with: a reload may change the module's
            self._cgroup_of[mod.name] = (cgroup, mod.memory_max)
        return (
            process,
            channel,
            memoryview(slots).cast("B").cast("q"),  # read by index and slice, faster than ctypes
            health.track(process.pid),
            None if direct is None else direct[1],
        )

    def _bind_direct(self, mod, opened):
        """Bind the worker's direct socket: (route, (listening socket, figures array)), or
        (None, None) when its path would be too long for AF_UNIX (reads then go through
        the supervisor, as with direct_reads off)."""
        generation = next(self._generations)
        path = f"{self._socket_path}.{generation}"
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            log.warning("module %s: no direct reads: the socket path %s is too long for AF_UNIX", mod.name, path)
            return None, None
        listener = listen(path, self._direct["limits"].allowed_uids)[0]
        opened.append(listener)
        return {"path": path, "generation": generation}, (listener, self._mp.RawArray("q", F.SIZE))

    def _read(self, mod, drain=False):
        """What the worker sent: one read, or (``drain``) all it sent before it died."""
        channel = mod.channel
        handlers = self._handlers
        while channel.sock is not None:
            data = recv(channel.sock)
            if data is None:
                return
            if not data:
                self._close_channel(mod)  # the sentinel reports the exit itself
                return
            for message in channel.reader.feed(data):
                handlers[type(message)](mod, message)
            if not drain:
                return

    def _read_output(self, output, limit=None):
        """What the worker wrote to stdout or stderr: one read, or (``limit``) up to
        ``limit`` bytes, all it wrote before it died. At its EOF (every process holding
        the other end is gone) our end is closed; the process sentinel, not this EOF,
        is what tells the worker's exit."""
        if output.sock is None:
            return
        lines = []
        taken = 0
        while True:
            data = recv(output.sock)
            if not data:
                break
            lines += output.lines(data)
            taken += len(data)
            if limit is None or taken >= limit:
                break
        if lines:
            self.on_output(output.mod, lines)
        if data == b"":
            self._close_output(output)

    def _close_output(self, output):
        """Close our end, after writing out the last line if it never got its newline."""
        if output.sock is None:
            return
        rest = output.rest()
        if rest:
            self.on_output(output.mod, rest)
        self._loop.unwatch(output.sock)
        output.sock.close()
        output.sock = None
        if self._outputs.get(output.mod.name) is output:
            del self._outputs[output.mod.name]

    def reap(self, mod):
        """A worker's sentinel fired: collect its exit and every reply it sent first, and
        take its process group down, and its cgroup (a kill of the kernel's for memory_max
        is noted on the module: Module.over_memory). Returns (pid, exit code); the module
        forgets the worker next (Module.exited)."""
        process = mod.process
        pid = process.pid
        self._loop.unwatch(process.sentinel)
        process.join()  # the sentinel fired: this returns at once
        code = process.exitcode
        if mod.channel.sock is not None:
            # Replies it sent before dying still count; their handlers may ask its process
            # (a READY line names its pid), so that is closed after them.
            self._read(mod, drain=True)
            self._close_channel(mod)
        process.close()
        kill_group(pid)
        if mod.name in self._cgroup_of:
            verdict = self._cgroups.end(*self._cgroup_of.pop(mod.name))
            if verdict is not None:
                mod.over_memory(verdict)
        if mod.channel.route is not None:
            _unlink(mod.channel.route["path"])
        output = self._outputs.get(mod.name)
        if output is not None:
            # Its last words reach the log. Then our end is closed even if a process it
            # started (and that left its group) still holds the other: nothing waits on it.
            self._read_output(output, DRAIN_MAX)
            self._close_output(output)
        return pid, code

    def _close_channel(self, mod):
        channel = mod.channel
        if channel.sock is None:
            return
        channel.close()
        self._loop.close_endpoint(channel)
        channel.sock = None
        channel.out.clear()

    @staticmethod
    def kill(mod):
        """SIGKILL the worker's whole process group; its sentinel reports the exit."""
        if mod.process is not None:
            kill_group(mod.process.pid, leader=True)


def _remove_stale_sockets(socket_path):
    """Worker sockets a killed supervisor left beside its own socket, which is ours now."""
    directory, name = os.path.split(socket_path)
    ours = re.compile(re.escape(name) + r"\.[0-9]+\Z")
    for entry in os.listdir(directory or "."):
        path = os.path.join(directory, entry)
        if ours.match(entry) and stat.S_ISSOCK(os.lstat(path).st_mode):
            _unlink(path)


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def kill_group(pid, leader=False):
    """SIGKILL the process group worker ``pid`` leads; ``leader``: the worker itself too,
    which is alive (not yet reaped) and, just started, may not have made its group yet."""
    kills = (os.killpg, os.kill) if leader else (os.killpg,)
    for kill in kills:
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def describe_exit(code):
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
