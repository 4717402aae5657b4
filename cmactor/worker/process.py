"""The worker process: one per agent.

Its threads, and its sockets (═══) with the supervisor's ends on the left::

    supervisor                          worker
    ──────────                          ──────
                                        main: the agent's entry, then idles (or runs its own loop)

    workers.Channel ◀══ channel ═══════▶ lane thread 1 ┐ one reads the channel and runs the serial
      Req Load Save Cancel Ping Stop ▶   lane thread 2 ┘ Work it read (lanes.py); the other idles
      ◀ Reply Loaded Saved Log Pong...       │ @async_action Req
        (any thread: outbox.py)              ▼
                                        pool threads: pool.CallbackPool, or the agent's executor
    Channel.sent ══════ doorbell ══════▶ doorbell: Lanes.ring(), and the idle lane thread reads;
      (async work sent while serial      at EOF the supervisor is gone: the process group ends
       work is unanswered)
    workers.Output ◀═══ output ════════ fds 1 and 2: what the agent and its children print

    (bound by workers.py) ═ listener ══▶ direct accept: peer uid check, connection limits
    clients ═══════════ connections ═══▶ direct reader (one at a time, epoll): serve_direct, a
      (cmfrontend, one a client)          serial read on the lane it borrows, or in the mailbox
                                        direct watchdog: hands the reading on; timeouts
                                        direct writer: what slow clients have not taken yet

    recovery.py ◀───── progress slots (shared memory) ───── the lane's holder, pool threads,
                                                            async direct reads
    status ◀────────── direct figures (shared memory) ───── the direct threads (figures.py)

- main runs the agent's entry (a function, or a file or module run as ``__main__``,
  as EXOS's python-module does), then idles (or runs the entry's own loop);
- the two lane threads share two jobs (lanes.py): reading the channel (routing
  @async_action requests to the pool and serial work to the serial lane), and
  running the serial lane, one Work at a time in arrival order: events, load and
  save actions, every action not marked async. The thread that reads serial work
  runs it; the other idles until the doorbell rings or the direct reader hands it
  the lane;
- the doorbell thread wakes the idle lane thread to read when the supervisor sent
  async work while the reading thread runs serial work; its EOF means the
  supervisor is gone, and the worker then takes its whole process group down;
- the pool (pool.CallbackPool, unless the agent gives its own) runs @async_action
  requests, concurrently;
- the direct socket's threads (direct.py): one accepting, a reader serving every
  client that reads from the module straight (a serial read runs on that reader
  when the lane is free; one queued in the mailbox is run, and answered to its
  client, by a lane thread), a watchdog and a writer.

This module owns the channel (its writes combined: outbox.py), the doorbell and
the progress slots, and runs the lanes' work; lanes.Lanes says which thread runs
what; actions.Actions calls the agent on whichever thread runs the work. The
worker knows its socket and its agent, nothing about other modules.
"""

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
from cmactor.wire import protocol as P
from cmactor.worker.actions import Actions, error_reply
from cmactor.worker.direct import DirectServer
from cmactor.worker.lanes import READ, SUPERVISOR, Lanes, Work
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
        self.module = module
        self._sock = sock
        self._doorbell = doorbell
        self._slots = slots
        self._slot_of = threading.local()
        self._slot_lock = threading.Lock()
        self._slots_used = 0
        self._outbox = Outbox(sock, P.pack)
        self._stream = P.FrameReader(max_frame=None, decode=P.CHANNEL.decode)  # the supervisor is trusted
        self._lanes = Lanes()  # who reads the channel, who runs serial work, and what waits for it
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

    def send(self, message):
        """Send ``message`` to the supervisor, from any thread."""
        self._outbox.send(message)

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
            self._lanes.ring()  # the idle lane thread takes over the socket

    def _lane_loop(self):
        """Each of the two lane threads: read the channel, or run the serial lane, as its
        turns come (lanes.py). The thread that reads serial work runs it, then the
        mailbox, then reads again, unless the other lane thread took over the reading
        meanwhile; a Work the direct reader hands over comes with the lane."""
        while True:
            work = self._lanes.wait_turn()
            while work is not None:
                if work is READ:
                    work = self._read_until_serial_work()
                self._run_serial(work)
                work = self._lanes.next_or_release()

    def _read_until_serial_work(self):
        """Read and route until there is serial work for this thread to run: returns the
        first Work, holding the serial lane; the rest is queued behind it."""
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
                    work = self._route(msg)
                    if work is not None:
                        serial.append(work)
                elif kind is P.Load:
                    serial.append(Work(msg, None, SUPERVISOR))
                elif kind is P.Save:
                    self._lanes.save_read()  # from now on direct reads queue behind it
                    serial.append(Work(msg, None, SUPERVISOR))
                elif kind is P.Role:
                    cmbackend.CmContext.is_standby = msg.standby
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
                work = self._lanes.take_or_queue(serial)
                if work is not None:
                    return work

    def _cancel(self, sids, just_read):
        """The supervisor's clients that sent requests ``sids`` are gone: those still waiting
        for the serial lane (in the mailbox, or among the Work ``just_read``) or for a
        thread of the shared pool are dropped, each answered as not run, so that a client
        that hangs up does not keep the module busy with work nobody will read."""
        dropped = self._lanes.drop_queued(sids)
        dropped += [work.message.sid for work in just_read if work.cancelled_by(sids)]
        just_read[:] = [work for work in just_read if not work.cancelled_by(sids)]
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
        tables = {
            table: P.TableSchema(**declared) for table, declared in cmbackend.declared_schema(agent)["tables"].items()
        }
        self.send(P.Init(loadable, deps, async_actions, _pool_size(self._pool), tables))

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
        """Hand an async request to the pool, or return its Work for the serial lane."""
        try:
            method, is_async = self._actions.lookup(req.table, req.op, req.method)
        except ProgrammingError as exc:
            self.send(error_reply(req.sid, ProgrammingError, exc))
            return None
        if is_async:
            self._pool.submit(self._run_async, req, method, SUPERVISOR)
            return None
        return Work(req, method, SUPERVISOR)

    def serve_direct(self, req, answer):
        """A read from a direct client (direct.py), on the direct reader, answered to
        ``answer``; after any save under way (as the supervisor holds requests during
        one). A serial read runs here if the lane is free, else in the mailbox. An async
        one runs here, not in the pool: nothing the deadlock detector cannot see may
        take a pool thread, and a reader stuck here hands the other clients to a new one."""
        try:
            method, is_async = self._actions.lookup(req.table, req.op, req.method)
        except ProgrammingError as exc:
            answer(error_reply(req.sid, ProgrammingError, exc))
            return
        if is_async:
            self._serve_direct_async(req, method, answer)
            return
        work = Work(req, method, answer)
        if self._lanes.borrow(work, self.direct.counts):
            self._run_serial(work)
            self._lanes.give_back()

    def _serve_direct_async(self, req, method, answer):
        """A direct read of an @async_action, on this reader, in a direct slot of the progress
        array: the supervisor sees it hang as it sees a pool thread hang. With every slot
        taken (as many as the pool has threads) the read goes through the supervisor."""
        with self._slot_lock:
            index = self._direct_slots.pop() if self._direct_slots else None
        if index is None:
            answer.redirect(f"its {self._direct_limit} threads for direct reads of @async_action are all busy")
            return
        base = P.direct_slot(index)
        try:
            self._lanes.wait_for_saves(answer, self.direct.counts)
            self._slots[base] = req.sid
            self._slots[base + 1] = time.monotonic_ns()
            self._actions.execute(req, method, True, answer)
        finally:
            self._slots[base + 1] = 0
            with self._slot_lock:
                self._direct_slots.append(index)

    def _run_serial(self, work):
        """(The thread holding the serial lane.) Run one Work, noted in the progress slots,
        and send its answer."""
        message, reply_to = work.message, work.reply_to
        if reply_to is not SUPERVISOR and reply_to.gone:
            reply_to.not_run()  # a direct read whose client hung up while it waited: nobody reads it
            return
        self._slots[P.SLOT_SERIAL_SID] = message.sid
        self._slots[P.SLOT_SERIAL_START] = time.monotonic_ns()
        if work.method is not None:
            self._actions.execute(message, work.method, False, reply_to)
        elif type(message) is P.Load:
            loaded = self._actions.load(message)
            with self._ready_lock:
                self._loaded = True
                self._serve_if_ready()
            self.send(loaded)
        else:
            self.send(self._actions.save(message))
            self._lanes.save_answered()
        self._slots[P.SLOT_SERIAL_START] = 0

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

    def _run_async(self, req, method, reply_to):
        """(A pool thread.) Run an @async_action request, noted in this thread's progress slot."""
        index = self._async_slot()
        if index is None:
            self._slots[P.SLOT_OVERFLOW] = 1
            self._actions.execute(req, method, True, reply_to)
            return
        base = P.async_slot(index)
        self._slots[base] = req.sid
        self._slots[base + 1] = time.monotonic_ns()
        self._actions.execute(req, method, True, reply_to)
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


def _join_cgroup(path):
    """Move this process into its cgroup, whose memory.max is the module's memory_max
    (cmsupervisor/supervision/memory.py): here, before the agent's code runs, every process
    it starts is born in it. Failing, it raises: its traceback goes to the module's log and
    the worker ends, since it would run without its limit."""
    with open(os.path.join(path, "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))


def main(spec, sock, doorbell, slots, output, direct=None):
    """Process target: set the process up as the supervisor asked, then run the entry."""
    # Own process group: the supervisor kills the whole group on stop and restart,
    # which reaches processes the agent started even after the worker is gone.
    os.setpgrp()
    _redirect_output(output)
    if spec["cgroup"] is not None:
        _join_cgroup(spec["cgroup"])
    os.environ.clear()
    os.environ.update(spec["env"])
    os.chdir(spec["cwd"])
    for path in reversed(spec["sys_path"]):
        if path not in sys.path:
            sys.path.insert(0, path)
    sys.argv = list(spec["argv"])
    if spec["exos_compat"]:
        exos.install(search=spec["exos_path"])
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
