"""The worker process: one per agent.

Threads in a worker:
- main: runs the agent's entry (a function, or a file or module run as
  ``__main__``, as EXOS's python-module does), then idles (or runs the entry's
  own loop, if it has one);
- two lane threads sharing two jobs (see Runtime._lane_loop): reading the
  supervisor's socket (routing @async_action requests to the pool and serial work
  to the mailbox), and running the serial lane — the mailbox in order, one item
  at a time: events, load and save actions, every action not marked async;
- doorbell: wakes the idle lane thread to read when the supervisor sends async
  work while the reading thread runs a serial action; its EOF means the
  supervisor is gone, and the worker then takes its whole process group down;
- the pool (pool.CallbackPool, unless the agent gives its own): @async_action
  requests, concurrently;
- the direct socket's (direct.py): one accepting, a reader serving the clients
  that read from the module straight (running a serial read itself when the lane
  is free), a watchdog and a writer.

This module owns the channel (its writes combined: outbox.py), the lanes, the doorbell and
the progress slots; actions.Actions calls the agent on whichever thread runs the
work. The worker knows its socket and its agent, nothing about other modules.
"""

import collections
import concurrent.futures
import importlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
import traceback

from cmactor import cmbackend, exos
from cmactor.errors import OperationalError, ProgrammingError
from cmactor.wire import figures as F, protocol as P
from cmactor.worker.actions import Actions, error_reply
from cmactor.worker.direct import DirectServer
from cmactor.worker.outbox import Outbox
from cmactor.worker.pool import CallbackPool


class _ChannelHandler(logging.Handler):
    """Sends log records to the supervisor over the worker's own socket."""

    def __init__(self, runtime):
        super().__init__()
        self._runtime = runtime

    def emit(self, record):
        try:
            self._runtime.send(P.Log(record.levelno, record.name, self.format(record)))
        except Exception:
            self.handleError(record)


class Runtime:
    """The worker side of one module: its socket, its agent, its lanes."""

    def __init__(self, module, sock, doorbell, pool_size, slots):
        # Mailbox items are (message, method, send): a Req with the action that serves
        # it, or a Load or Save (method None), and where its answer goes (the
        # supervisor's channel, or a direct client's connection).
        self.module = module
        self._sock = sock
        self._doorbell = doorbell
        self._slots = slots
        self._slot_of = threading.local()
        self._slot_lock = threading.Lock()
        self._slots_used = 0
        self._outbox = Outbox(sock, P.pack)
        # send(message): to the supervisor, from any thread. The outbox's own method, so
        # that a reply costs no call of the runtime's on its way out; and one bound
        # method, by which mailbox items bound for the supervisor are told apart.
        self.send = self._to_supervisor = self._outbox.send
        self._stream = P.FrameReader(max_frame=None, decode=P.CHANNEL.decode)  # the supervisor is trusted
        # The lanes' shared state, under _lane_lock: serial work in arrival order,
        # whether a thread is running it, whether a thread is reading the socket.
        # The lock is taken bare where nobody need be woken (a plain Lock: cheaper
        # than the Condition's default RLock, and than entering the Condition).
        self._lane_lock = threading.Lock()
        self._cv = threading.Condition(self._lane_lock)
        self._mailbox = collections.deque()
        self._serial_busy = False
        self._reading = False
        # A mailbox item the direct reader hands to the idle lane thread, with the lane
        # still held, when it has run its own read: it goes back to its clients.
        self._handoff = None
        self._saving = 0  # Saves read and not yet answered: direct reads wait behind them
        self._saved = threading.Condition(self._lane_lock)  # notified as each one is answered
        self.direct = None  # the DirectServer, when the supervisor gave the worker a socket
        self._shared_pool = CallbackPool(pool_size, f"{module}-pool")
        # Until the agent registers: the shared pool, and Actions that refuse every
        # request (register() replaces both).
        self._pool = self._shared_pool
        self._actions = Actions(module, None, self.send)
        self.ready_called = False
        self._loaded = False  # the supervisor's Load has run
        self._ready_lock = threading.Lock()  # ready() and the end of the Load may come on two threads
        self._limit_direct_async(pool_size)

    # -- channel ---------------------------------------------------------

    def flush(self):
        """Before the process ends: wait until every message sent so far is in the socket
        (unless the supervisor is gone)."""
        try:
            self._outbox.flush()
        except OSError:
            pass

    def start(self):
        for n in (1, 2):
            threading.Thread(target=self._lane_loop, name=f"{self.module}-lane{n}", daemon=True).start()
        threading.Thread(target=self._answer_doorbell, name=f"{self.module}-doorbell", daemon=True).start()

    def _answer_doorbell(self):
        """The supervisor rings when it sent async work while no thread reads the socket;
        the doorbell's EOF means the supervisor is gone, even during a long serial action."""
        while True:
            try:
                rung = self._doorbell.recv(64)
            except OSError:
                rung = b""
            if not rung:
                _exit(0, whole_group=True)  # take every process this agent started with us
            with self._cv:
                self._cv.notify()  # the idle lane thread takes over the socket

    def _lane_loop(self):
        """Two lane threads share two jobs: reading the socket, and running the serial lane.

        The thread that reads a serial request runs it itself: no request waits for
        a sleeping thread to wake before it starts (measured: a hand-off to another
        thread cost 15-20% of the sequential get rate). Meanwhile nobody reads the
        socket, and only async requests need to be read then (serial work queues
        behind the action anyway, a call back into this module from its serial lane
        is refused by the deadlock detector, STOP waits for in-flight requests). So a
        supervisor that sends async work while serial work of this worker is
        unanswered rings the doorbell, and the idle lane thread takes over reading.
        """
        cv = self._cv
        while True:
            with cv:
                while self._reading and self._handoff is None:
                    cv.wait()
                item, self._handoff = self._handoff, None
                if item is None:
                    self._reading = True
            # This thread's turn: the serial lane the direct reader handed over,
            # or reading, running what it read, and reading again unless the other lane
            # thread took over the socket meanwhile. (The mailbox is drained by whichever
            # lane thread holds the serial lane: it never waits for a thread here.)
            if item is not None and not self._run_serial(item):
                continue
            while self._run_serial(self._read_until_serial_work()):
                pass

    def _read_until_serial_work(self):
        """Read and route until there is serial work for this thread to run.

        Returns the first item, holding the serial lane; the rest goes to the mailbox.
        An item is (Req, its method), or (Load or Save, None).
        """
        while True:
            try:
                data = self._sock.recv(P.READ_SIZE)
            except OSError:
                data = b""
            if not data:
                _exit(0, whole_group=True)  # the supervisor is gone
            serial = []
            for msg in self._stream.feed(data):
                # A kind the worker does not take is passed over.
                kind = type(msg)
                if kind is P.Req:
                    item = self._route(msg)
                    if item is not None:
                        serial.append(item)
                elif kind is P.Load:
                    serial.append((msg, None, None))
                elif kind is P.Save:
                    with self._lane_lock:
                        self._saving += 1  # from now on direct reads queue behind it
                    serial.append((msg, None, None))
                elif kind is P.Ping:
                    self.send(P.Pong())  # from the reading thread: alive as long as a lane thread runs
                elif kind is P.Cancel:
                    self._cancel(msg.sids, serial)
                elif kind is P.Stop:
                    if self.direct is not None:
                        self.direct.finish()  # reads clients sent here directly are answered first
                    self.flush()
                    _exit(0)
            if serial:
                with self._lane_lock:
                    if not self._serial_busy:  # then the mailbox is empty: only a lane holder drains it
                        self._serial_busy = True
                        self._reading = False
                        if len(serial) > 1:
                            self._mailbox.extend(serial[1:])
                        return serial[0]
                    self._mailbox.extend(serial)

    def _cancel(self, sids, just_read):
        """The supervisor's clients that sent requests ``sids`` are gone: those still waiting
        for the serial lane (in the mailbox, or among the items ``just_read``) or for a
        thread of the shared pool are dropped, each answered as not run, so that a client
        that hangs up does not keep the module busy with work nobody will read."""

        def ours(item):
            return item[2] is self._to_supervisor and item[0].sid in sids

        with self._lane_lock:
            dropped = [item[0].sid for item in self._mailbox if ours(item)]
            if dropped:
                kept = [item for item in self._mailbox if not ours(item)]
                self._mailbox.clear()
                self._mailbox.extend(kept)
        dropped += [item[0].sid for item in just_read if ours(item)]
        just_read[:] = [item for item in just_read if not ours(item)]
        if self._pool is self._shared_pool:  # an agent's own executor cannot be searched
            dropped += [args[0].sid for args in self._pool.cancel(lambda args: args[0].sid in sids)]
        for sid in dropped:
            self.send(error_reply(sid, OperationalError, "not run: the client that sent it disconnected first"))

    # -- registration (called from cmbackend) -----------------------------

    @property
    def agent(self):
        """The registered agent, or None before cmbackend_init()."""
        return self._actions.agent

    def register(self, agent, persistent, deps):
        if self._actions.agent is not None:
            raise RuntimeError(f"cmbackend_init() called twice in module {self.module!r}")
        if self.ready_called:
            raise RuntimeError(
                f"cmbackend_init() called after ready() in module {self.module!r}: register the agent "
                "first; ready() comes once its config is loaded (event_load_complete or event_generate_default)"
            )
        loadable = _loadable(self.module, agent, persistent)
        async_actions = sorted(
            name for name in dir(type(agent)) if getattr(getattr(type(agent), name, None), "_cmactor_async", False)
        )
        # The pool before the actions: a lane thread that finds an async action
        # through the new Actions submits it to self._pool.
        self._pool = agent.pool or self._shared_pool
        self._limit_direct_async(_pool_size(self._pool))
        read_only = [table for table in persistent if table not in loadable]
        self._actions = Actions(self.module, agent, self.send, read_only)
        self.send(P.Init(loadable, deps, async_actions, _pool_size(self._pool)))

    def ready(self):
        with self._ready_lock:
            self.ready_called = True
            self._serve_if_ready()
        self.send(P.Ready())

    def _serve_if_ready(self):
        """(Holding _ready_lock.) Serve the direct socket once the agent has called ready() and
        its config is loaded (a plain process has none). The supervisor makes the module READY
        on the later of Ready and Loaded (on Ready alone for a plain process), and the one that
        completes this is sent after it: READY means the worker serves, and a route the
        supervisor hands out as the module goes READY is never found unserved."""
        if self.direct is not None and self.ready_called and (self._loaded or self.agent is None):
            self.direct.serving = True

    # -- dispatch ----------------------------------------------------------

    def _route(self, req):
        """Hand an async request to the pool, or return its mailbox item for the serial lane."""
        try:
            method, is_async = self._actions.lookup(req.table, req.op)
        except ProgrammingError as exc:
            self.send(error_reply(req.sid, ProgrammingError, exc))
            return None
        if is_async:
            self._pool.submit(self._run_async, req, method, self._to_supervisor)
            return None
        return (req, method, self._to_supervisor)

    def serve_direct(self, req, send):
        """A read from a direct client (direct.py), on the direct reader, after any save
        under way (as the supervisor holds requests during one). A serial read runs here
        if the lane is free, else in the mailbox. An async one runs here, not in the
        pool: nothing the deadlock detector cannot see may take a pool thread, and a
        reader stuck here hands the other clients to a new one."""
        try:
            method, is_async = self._actions.lookup(req.table, req.op)
        except ProgrammingError as exc:
            send(error_reply(req.sid, ProgrammingError, exc))
            return
        if is_async:
            self._serve_direct_async(req, method, send)
            return
        with self._lane_lock:
            self._wait_for_saves(send)
            if self._serial_busy:
                self._mailbox.append((req, method, send))
                return
            self._serial_busy = True
        self._run_serial((req, method, send), direct=True)

    def _serve_direct_async(self, req, method, send):
        """A direct read of an @async_action, on this reader, in a direct slot of the progress
        array: the supervisor sees it hang as it sees a pool thread hang. With every slot
        taken (as many as the pool has threads) the read goes through the supervisor."""
        with self._slot_lock:
            index = self._direct_slots.pop() if self._direct_slots else None
        if index is None:
            send.redirect(f"its {self._direct_limit} threads for direct reads of @async_action are all busy")
            return
        base = P.direct_slot(index)
        slots = self._slots
        try:
            # The lane lock only while a save is read: one read just after this check is
            # one the read came before.
            if self._saving:
                with self._lane_lock:
                    self._wait_for_saves(send)
            slots[base] = req.sid
            slots[base + 1] = time.monotonic_ns()
            self._actions.execute(req, method, True, send)
        finally:
            slots[base + 1] = 0
            with self._slot_lock:
                self._direct_slots.append(index)

    def _wait_for_saves(self, send):
        """(A direct read, holding the lane lock.) Wait until the saves read so far are
        answered, counted as queued meanwhile."""
        if self._saving:
            send.flush()  # what its client was answered before leaves before the wait
            counts = self.direct.counts
            counts.add(F.QUEUED, 1)
            while self._saving:
                self._saved.wait()
            counts.add(F.QUEUED, -1)

    def _run_serial(self, item, direct=False):
        """Run ``item``, then the mailbox in order, holding the serial lane; then release it.

        Returns True if this thread should read the supervisor's socket next (nobody
        else does). The direct reader (``direct``) runs only its own read: it hands the
        rest of the mailbox, and the lane, to the idle lane thread, and goes back to its
        clients (were it to run the mailbox, clients that keep it full would keep it
        there).
        """
        slots = self._slots
        to_supervisor = self._to_supervisor
        while True:
            msg, method, send = item
            if method is not None and send is not to_supervisor and send.gone:
                send.not_run()  # a direct read whose client hung up while it waited: nobody reads it
            else:
                slots[P.SLOT_SERIAL_SID] = msg.sid
                slots[P.SLOT_SERIAL_START] = time.monotonic_ns()
                if method is not None:
                    self._actions.execute(msg, method, False, send)
                elif type(msg) is P.Load:
                    loaded = self._actions.load(msg)
                    with self._ready_lock:
                        self._loaded = True
                        self._serve_if_ready()
                    self.send(loaded)
                else:
                    self.send(self._actions.save(msg))
                    with self._lane_lock:
                        self._saving -= 1
                        self._saved.notify_all()
                slots[P.SLOT_SERIAL_START] = 0
            with self._lane_lock:
                if self._mailbox and direct:
                    self._handoff = self._mailbox.popleft()
                    self._cv.notify()
                    return False
                if self._mailbox:
                    item = self._mailbox.popleft()
                    if not self._reading and item[2] is not self._to_supervisor:
                        # A direct read is about to hold the lane while nobody reads the
                        # supervisor's socket. The supervisor rings the doorbell only while
                        # serial work it sent is unanswered, and it knows nothing of this
                        # read: async work its calls cause would go unread. Wake the idle
                        # lane thread to read instead.
                        self._cv.notify()
                else:
                    self._serial_busy = False
                    if self._reading:
                        return False
                    if not direct:
                        self._reading = True
                        return True
                    self._cv.notify()
                    return False

    def _limit_direct_async(self, pool_size):
        """Direct reads of @async_action run at once, at most: one a pool thread (their free
        direct slots). Set before any direct read can run (at start, and as the agent
        registers, which comes before READY)."""
        self._direct_limit = P.direct_async_limit(pool_size)
        self._direct_slots = list(range(self._direct_limit))

    def _async_slot(self):
        """This pool thread's slot index, taken on first use; None when all are taken."""
        index = getattr(self._slot_of, "index", -1)
        if index == -1:
            with self._slot_lock:
                index = self._slots_used if self._slots_used < P.ASYNC_SLOTS else None
                self._slots_used += 1
            self._slot_of.index = index
        return index

    def _run_async(self, req, method, send):
        index = self._async_slot()
        if index is None:
            self._slots[P.SLOT_OVERFLOW] = 1
            self._actions.execute(req, method, True, send)
            return
        base = P.async_slot(index)
        self._slots[base] = req.sid
        self._slots[base + 1] = time.monotonic_ns()
        self._actions.execute(req, method, True, send)
        # The action is over; its sid stays in the slot until this thread's next request.
        # Its reply may still wait in the outbox for another thread to write it, and a
        # worker killed then must count the request as started, not run it again (a
        # request answered meanwhile is not in flight, so its sid there counts for nothing).
        self._slots[base + 1] = 0


def _loadable(module, agent, persistent):
    """The persistent tables that can be loaded back: each needs a <table>_set. Real apps
    list read-only tables (statistics) there too; those are left out, with a warning."""
    kept = []
    for table in persistent:
        if callable(getattr(agent, f"{table}_set", None)):
            kept.append(table)
        else:
            logging.getLogger("cmactor.worker").warning(
                "module %s: persistent table %r has no %s_set method, so its rows could not be loaded "
                "back; it is not saved (remove it from persistent_list, or add %s_set)",
                module,
                table,
                table,
                table,
            )
    return kept


def _pool_size(pool):
    """How many threads ``pool`` has, so that the supervisor can see it exhausted by
    calls into itself; None (not checked) for an Executor that does not say."""
    if isinstance(pool, CallbackPool):
        return pool.size
    if isinstance(pool, concurrent.futures.ThreadPoolExecutor):
        # The stdlib offers no public accessor for the size it was built with;
        # _max_workers is where ThreadPoolExecutor keeps it.
        return pool._max_workers
    return None


def _exit(code, whole_group=False):
    """Leave at once: flush what the agent printed, then end the process (or its group)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if whole_group:
        try:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        except OSError:
            pass
    os._exit(code)


def load_entry(entry, module):
    """Import an entry ``"pkg.mod:func"`` or ``"/abs/path/file.py:func"`` and return the function."""
    target, _, func_name = entry.rpartition(":")
    if target.endswith(".py"):
        sys.path.insert(0, os.path.dirname(target))
        name = f"cmactor_agent_{module}"
        spec = importlib.util.spec_from_file_location(name, target)
        if spec is None:
            raise ImportError(f"cannot load {target}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(target)
    func = getattr(mod, func_name, None)
    if not callable(func):
        raise AttributeError(f"{target} has no function {func_name!r}")
    return func


def run_as_main(target):
    """Run ``"pkg.module"`` or ``"/abs/path/file.py"`` as ``__main__``, as EXOS's python-module
    does. Not runpy: it would set sys.argv[0] to the file's path, where EXOS (and the
    ``args`` key) put the process name."""
    package = None
    if target.endswith(".py"):
        sys.path.insert(0, os.path.dirname(target))
        path = target
    else:
        found = importlib.util.find_spec(target)
        if found is None:
            raise ModuleNotFoundError(f"no module named {target!r} on sys.path", name=target)
        if found.submodule_search_locations is not None:  # a package runs its __main__
            found = importlib.util.find_spec(f"{target}.__main__")
            if found is None:
                raise ImportError(
                    f"{target!r} is a package with no __main__ module to run: add {target}/__main__.py, "
                    f"or name one of its modules ({target}.MODULE)"
                )
        if not found.has_location or not str(found.origin).endswith(".py"):
            raise ImportError(f"module {target!r} ({found.origin}) has no Python source to run as __main__")
        path, package = found.origin, found.parent
    spec = importlib.util.spec_from_file_location("__main__", path)
    main = importlib.util.module_from_spec(spec)
    if package is not None:
        main.__package__ = package  # its relative imports resolve as they would in the package
    sys.modules["__main__"] = main
    spec.loader.exec_module(main)


def _exit_status(code):
    """The process exit status for ``sys.exit(code)``, as the interpreter computes it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _redirect_output(output):
    """Make fds 1 and 2 the worker's end of its output socket pair: what the agent, or
    a process it starts, writes to stdout or stderr goes to the module's log, which the
    supervisor writes (and rotates). Line-buffered, so each line leaves as it is
    printed and a crash loses no whole line; UTF-8 whatever the locale."""
    for fd in (1, 2):
        os.dup2(output.fileno(), fd)
    output.close()
    # New stream objects: the ones inherited from the fork server are tied to its
    # buffering and encoding, and may hold its unflushed bytes.
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)


def main(spec, sock, doorbell, slots, output, direct=None):
    """Process target: set the process up as the supervisor asked, then run the entry."""
    # Own process group: the supervisor kills the whole group on stop and restart,
    # which reaches processes the agent started even after the worker is gone.
    os.setpgrp()
    _redirect_output(output)
    os.environ.clear()
    os.environ.update(spec["env"])
    os.chdir(spec["cwd"])
    for path in reversed(spec["sys_path"]):
        if path not in sys.path:
            sys.path.insert(0, path)
    sys.argv = list(spec["argv"])
    if spec["exos_compat"]:
        exos.install()
    module = spec["module"]
    runtime = Runtime(module, sock, doorbell, spec["pool_size"], slots)
    if direct is not None:  # (its listening socket, its figures' shared array)
        runtime.direct = DirectServer(runtime, direct[0], spec["direct"], direct[1])
    root = logging.getLogger()
    root.handlers[:] = [_ChannelHandler(runtime)]
    root.setLevel(spec["log_level"])
    cmbackend.attach_runtime(runtime)
    runtime.start()
    if runtime.direct is not None:
        runtime.direct.start()
    entry = spec["entry"]
    as_main = ":" not in entry
    status = exit_message = None
    try:
        if as_main:
            run_as_main(entry)
        else:
            load_entry(entry, module)()
    except SystemExit as exc:
        status = _exit_status(exc.code)
        if isinstance(exc.code, str):
            exit_message = exc.code  # sys.exit("why"): the reason, in status and the log
    except BaseException as exc:
        detail = "".join(traceback.format_exception(exc)).rstrip()
        _fatal(runtime, f"entry {entry!r} raised {type(exc).__name__}: {exc}", detail)
    if status is None:
        if runtime.agent is not None or (runtime.ready_called and not as_main):
            threading.Event().wait()  # a backend, or a plain process that went READY: serve on
        if not as_main:
            _fatal(runtime, f"entry {entry!r} returned without calling cmbackend_init() or ready()", "")
    # As the interpreter does when its main thread ends: the process lives on while
    # threads the entry started (not daemons) run.
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    if status:
        said = f": {exit_message}" if exit_message else f" (its stderr is in its log: cmactor logs {module})"
        _fatal(runtime, f"entry {entry!r} exited with status {status}{said}", "", status)
    runtime.flush()  # the log records of its last moments
    _exit(0)


def _fatal(runtime, message, detail, status=1):
    try:
        runtime.send(P.Fatal(message, detail))
    except OSError:
        pass
    runtime.flush()
    _exit(status)
