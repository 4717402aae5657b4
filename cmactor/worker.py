"""The worker process: one per agent.

Threads in a worker:
- main: imports and runs the agent's entry function, then idles (or runs the
  entry's own loop, if it has one);
- two lane threads sharing two jobs (see Runtime._lane_loop): reading the
  supervisor's socket (routing @async_action requests to the pool and serial work
  to the mailbox), and running the serial lane — the mailbox in order, one item
  at a time: events, load and save actions, every action not marked async;
- doorbell: wakes the idle lane thread to read when the supervisor sends async
  work while the reading thread runs a serial action; its EOF means the
  supervisor is gone, and the worker then takes its whole process group down;
- the pool: @async_action requests, concurrently.

The worker knows its socket and its agent, nothing about other modules.
"""

import collections
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback

from . import cmbackend
from . import protocol as P
from .cmbackend import ActionStopped, CmContext
from .errors import DatabaseError, DataError, ProgrammingError, to_wire

log = logging.getLogger("cmactor.worker")

SLOT_SERIAL_SID, SLOT_SERIAL_START = P.SLOT_SERIAL_SID, P.SLOT_SERIAL_START


class _FieldError(Exception):
    """The agent put something in ctx.fields that cannot cross the wire."""


class _EventFailed(Exception):
    """An agent event (load, save or default) raised or stopped."""


class _SaveFailed(Exception):
    """A save walk could not produce the module's rows."""


def _row(fields):
    """ctx.fields as a wire row: str keys, str values, None kept as null."""
    if not isinstance(fields, dict):
        raise _FieldError(f"ctx.fields must be a dict, got {type(fields).__name__}")
    row = {}
    for key, value in fields.items():
        if type(key) is not str:
            raise _FieldError(f"field name {key!r} is a {type(key).__name__}, not a str")
        if value is None or type(value) is str:
            row[key] = value
            continue
        try:
            row[key] = str(value)
        except Exception as exc:
            raise _FieldError(f"field {key!r}: str() of its value raised {type(exc).__name__}: {exc}") from None
    return row


class _ChannelHandler(logging.Handler):
    """Sends log records to the supervisor over the worker's own socket."""

    def __init__(self, runtime):
        super().__init__()
        self._runtime = runtime

    def emit(self, record):
        try:
            self._runtime.send([P.LOG, record.levelno, record.name, self.format(record)])
        except Exception:
            self.handleError(record)


class CallbackPool:
    """The worker's shared pool for @async_action requests: up to ``size`` threads.

    One thread at a time is woken for new work; once running, it wakes the next one
    only if more work is still waiting. A thread that finishes an action takes the
    next before it sleeps. So a burst of short actions is served by as few threads
    as keep up, without every idle thread fighting for the GIL, and still every
    queued action gets a thread of its own while fewer than ``size`` are busy (the
    deadlock detector counts on that). Measured at 4 x 32 requests in flight, a
    ThreadPoolExecutor of 8 threads, which wakes its idle threads one per submit,
    reached half the throughput of this one.
    """

    def __init__(self, size, name):
        self._max_workers = size  # ThreadPoolExecutor's name for it, read by register()
        self._name = name
        self._lock = threading.Lock()
        self._work = collections.deque()
        self._idle = []  # a wake-up lock per sleeping thread, the last to sleep on top
        self._threads = 0
        self._waking = 0  # threads woken or started that have not looked at the work yet

    def submit(self, fn, *args):
        with self._lock:
            self._work.append((fn, args))
            wake = None if self._waking else self._call_one()
        if wake is not None:
            wake.release()

    def _call_one(self):
        """(Holding _lock.) Get one more thread going: the last idle one, or a new one."""
        if self._idle:
            self._waking += 1
            return self._idle.pop()
        if self._threads < self._max_workers:
            self._threads += 1
            self._waking += 1
            threading.Thread(target=self._serve, name=f"{self._name}-{self._threads}", daemon=True).start()
        return None

    def _serve(self):
        wake = threading.Lock()
        wake.acquire()
        while True:
            with self._lock:
                self._waking -= 1  # this thread has arrived
                while self._work:
                    fn, args = self._work.popleft()
                    # More waits and nobody is on the way: wake the next thread first.
                    baton = self._call_one() if self._work and not self._waking else None
                    self._lock.release()
                    try:
                        if baton is not None:
                            baton.release()
                        fn(*args)
                    finally:
                        self._lock.acquire()
                self._idle.append(wake)  # _call_one() counts it in _waking when it pops it
            wake.acquire()  # released by submit() or by a thread passing the baton


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
        self._send_lock = threading.Lock()
        self._stream = P.FrameReader(max_frame=None)  # the supervisor is trusted
        # The lanes' shared state, under _lane_lock: serial work in arrival order,
        # whether a thread is running it, whether a thread is reading the socket.
        # The lock is taken bare where nobody need be woken (a plain Lock: cheaper
        # than the Condition's default RLock, and than entering the Condition).
        self._lane_lock = threading.Lock()
        self._cv = threading.Condition(self._lane_lock)
        self._mailbox = collections.deque()
        self._serial_busy = False
        self._reading = False
        self._shared_pool = CallbackPool(pool_size, f"{module}-pool")
        self._methods = {}
        self.agent = None

    # -- channel ---------------------------------------------------------

    def send(self, msg):
        data = P.pack(msg)
        with self._send_lock:
            self._sock.sendall(data)

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
                while self._reading:
                    cv.wait()
                self._reading = True
            # This thread's turn: read, run what it read, read again unless the
            # other lane thread took over the socket meanwhile. (The mailbox is
            # drained by whichever thread holds the serial lane: it never waits
            # for a thread here.)
            while self._run_serial(self._read_until_serial_work()):
                pass

    def _read_until_serial_work(self):
        """Read and route until there is serial work for this thread to run.

        Returns the first item, holding the serial lane; the rest goes to the mailbox.
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
                kind = msg[0]
                if kind == P.REQ:
                    item = self._route(msg)
                    if item is not None:
                        serial.append(item)
                elif kind == P.LOAD or kind == P.SAVE:
                    serial.append(msg)
                elif kind == P.STOP:
                    _exit(0)
            if serial:
                with self._lane_lock:
                    if not self._serial_busy:  # then the mailbox is empty: only a lane holder drains it
                        self._serial_busy = True
                        self._reading = False
                        self._mailbox.extend(serial[1:])
                        return serial[0]
                    self._mailbox.extend(serial)

    # -- registration (called from cmbackend) -----------------------------

    def register(self, agent, persistent, deps):
        if self.agent is not None:
            raise RuntimeError(f"cmbackend_init() called twice in module {self.module!r}")
        self.agent = agent
        async_actions = sorted(
            name for name in dir(type(agent)) if getattr(getattr(type(agent), name, None), "_cmactor_async", False)
        )
        # The pool's size lets the supervisor see a pool exhausted by calls into itself;
        # an Executor that does not say (not a ThreadPoolExecutor) is not checked.
        pool_size = getattr(agent.pool or self._shared_pool, "_max_workers", None)
        self.send([P.INIT, persistent, deps, async_actions, pool_size])

    def ready(self):
        self.send([P.READY])

    # -- dispatch ----------------------------------------------------------

    def _lookup(self, msg):
        """(method, is_async) for a request, found once per table and op; None after replying an error."""
        sid, op, table = msg[1], msg[2], msg[3]
        if self.agent is None:
            self._reply_error(sid, ProgrammingError, f"module {self.module!r} has not called cmbackend_init()")
            return None
        name = f"{table}_{P.ACTION_SUFFIX[op]}"
        method = getattr(self.agent, name, None)
        if not callable(method):
            self._reply_error(sid, ProgrammingError, self._missing(table, op, name))
            return None
        found = self._methods[(table, op)] = (method, bool(getattr(method, "_cmactor_async", False)))
        return found

    def _missing(self, table, op, name):
        tables = sorted(
            {
                attr.rsplit("_", 1)[0]
                for attr in dir(self.agent)
                if attr.endswith(("_get", "_set", "_setop")) and callable(getattr(self.agent, attr, None))
            }
        )
        if table in tables:
            return (
                f"module {self.module!r} table {table!r} has no {op!r} action: "
                f"define {name}(self, ctx) in the agent"
            )
        known = ", ".join(tables) or "none"
        return f"module {self.module!r} has no table {table!r} (no {table}_get/_set/_setop method); its tables: {known}"

    def _route(self, msg):
        """Hand an async request to the pool, or return (msg, method) for the mailbox."""
        found = self._methods.get((msg[3], msg[2])) or self._lookup(msg)
        if found is None:
            return None
        method, is_async = found
        if is_async:
            pool = self.agent.pool or self._shared_pool
            pool.submit(self._run_async, msg, method)
            return None
        return (msg, method)

    def _run_serial(self, item):
        """Run ``item``, then the mailbox in order, holding the serial lane; then release it.

        Returns True if this thread should read the socket next (nobody else does).
        """
        slots = self._slots
        while True:
            request = type(item) is tuple  # (REQ message, method); else a LOAD or SAVE message
            msg = item[0] if request else item
            slots[SLOT_SERIAL_SID] = msg[1]
            slots[SLOT_SERIAL_START] = time.monotonic_ns()
            if request:
                self._execute(msg, item[1], False)
            elif msg[0] == P.LOAD:
                self._run_load(*msg[1:])
            else:
                self._run_save(*msg[1:])
            slots[SLOT_SERIAL_START] = 0
            with self._lane_lock:
                if self._mailbox:
                    item = self._mailbox.popleft()
                    continue
                self._serial_busy = False
                if self._reading:
                    return False
                self._reading = True
                return True

    def _async_slot(self):
        """This pool thread's slot index, taken on first use; None when all are taken."""
        index = getattr(self._slot_of, "index", -1)
        if index == -1:
            with self._slot_lock:
                index = self._slots_used if self._slots_used < P.ASYNC_SLOTS else None
                self._slots_used += 1
            self._slot_of.index = index
        return index

    def _run_async(self, msg, method):
        index = self._async_slot()
        if index is None:
            self._slots[P.SLOT_OVERFLOW] = 1
            self._execute(msg, method, True)
            return
        base = P.async_slot(index)
        self._slots[base] = msg[1]
        self._slots[base + 1] = time.monotonic_ns()
        self._execute(msg, method, True)
        self._slots[base + 1] = 0
        self._slots[base] = 0

    @staticmethod
    def _error_reply(sid, exc_type, message):
        return [P.REPLY, sid, to_wire(exc_type, message), None, False]

    def _reply_error(self, sid, exc_type, message):
        self.send(self._error_reply(sid, exc_type, message))

    # -- running agent code ---------------------------------------------------

    def _event(self, name):
        """Run one agent event; ActionStopped and exceptions become an _EventFailed naming it."""
        try:
            getattr(self.agent, name)()
        except ActionStopped as stop:
            raise _EventFailed(f"{name} stopped: {stop.message}") from None
        except BaseException as exc:
            log.error("module %s: %s raised\n%s", self.module, name, traceback.format_exc().rstrip())
            raise _EventFailed(f"{name} raised {type(exc).__name__}: {exc}") from None

    def _run_load(self, sid, section, journal):
        """Load saved rows and journaled changes (or generate defaults) on the serial lane, then report.

        Each saved row is replayed as <table>_set, each journal record as the
        <table>_set or _setop it was, all with is_load True.
        """
        cmbackend._current.caller = (self.module, "serial", sid)
        failures = []
        failed = 0
        error = None
        try:
            if section is None and not journal:
                self._event("event_generate_default")
            else:
                # As on the original platform, load_start is always followed by
                # load_complete, even when it or a row fails.
                try:
                    self._event("event_load_start")
                    saved = json.loads(section) if section is not None else {}
                    replay = [("set", table, row) for table, rows in saved.items() for row in rows] + journal
                    for op, table, row in replay:
                        message = self._load_row(op, table, row)
                        if message is not None:
                            failed += 1
                            if len(failures) < P.MAX_ROW_ERRORS:
                                failures.append({"table": table, "row": row, "message": message})
                finally:
                    self._event("event_load_complete")
        except _EventFailed as exc:
            error = str(exc)
        finally:
            cmbackend._current.caller = None
        self.send([P.LOADED, sid, error, failures, failed])

    def _load_row(self, op, table, row):
        """Replay one row as <table>_<op> with is_load; the error text, or None."""
        method = getattr(self.agent, f"{table}_{op}", None)
        if not callable(method):
            return f"the agent has no {table}_{op} method"
        ctx = CmContext({k: v for k, v in row.items() if v is not None}, op=op, is_load=True)
        try:
            method(ctx)
        except ActionStopped as stop:
            return stop.message
        except BaseException as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _run_save(self, sid, tables):
        """The save walk: event_save_start, every row of each table, event_save_complete."""
        cmbackend._current.caller = (self.module, "serial", sid)
        try:
            try:
                self._event("event_save_start")
                saved = {table: self._save_table(table) for table in tables}
            finally:
                self._event("event_save_complete")
            section = json.dumps(saved, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
            reply = [P.SAVED, sid, None, section, sum(len(rows) for rows in saved.values())]
        except (_EventFailed, _SaveFailed) as exc:
            reply = [P.SAVED, sid, str(exc), None, 0]
        finally:
            cmbackend._current.caller = None
        self.send(reply)

    def _save_table(self, table):
        method = getattr(self.agent, f"{table}_get", None)
        if not callable(method):
            raise _SaveFailed(f"persistent table {table!r} has no {table}_get method")
        try:
            rows, more = self._walk(method, {}, None, P.SAVE_MAX_ROWS, None, is_save=True)
        except ActionStopped as stop:
            raise _SaveFailed(f"{table}_get stopped the save: {stop.message}") from None
        except _FieldError as exc:
            raise _SaveFailed(f"{table}_get replied badly: {exc}") from None
        except BaseException as exc:
            log.error("module %s: save walk of %s raised\n%s", self.module, table, traceback.format_exc().rstrip())
            raise _SaveFailed(f"{table}_get raised {type(exc).__name__}: {exc}") from None
        if more:
            raise _SaveFailed(f"the save walk of {table!r} passed {P.SAVE_MAX_ROWS} rows: does {table}_get ever end?")
        return rows

    def _execute(self, msg, method, is_async):
        _, sid, op, table, params, vr, flags, batch, after = msg
        notify = None
        if flags & P.F_NOTIFY:

            def notify(text):
                self.send([P.NOTIFY, sid, text])

        current = cmbackend._current
        current.caller = (self.module, "async" if is_async else "serial", sid)
        try:
            if op == "getnext":
                rows, more = self._walk(method, params, vr, batch, after, is_async=is_async, notify=notify)
                dirty = False
            else:
                ctx = CmContext(params, vr, op, is_async=is_async, notify=notify)
                method(ctx)
                row = _row(ctx.fields)
                rows = [row] if row else []
                more = False
                dirty = bool(ctx.dirty)
            reply = [P.REPLY, sid, None, P.reply_entries(rows, more), dirty]
        except ActionStopped as stop:
            reply = self._error_reply(sid, DatabaseError, stop.message)
        except _FieldError as exc:
            reply = self._error_reply(sid, DataError, f"module {self.module!r} {table}_{P.ACTION_SUFFIX[op]} replied badly: {exc}")
        except BaseException as exc:
            log.error(
                "module %s: %s %s.%s raised\n%s", self.module, op, self.module, table, traceback.format_exc().rstrip()
            )
            reply = self._error_reply(sid, DatabaseError, f"{op} {self.module}.{table} raised {type(exc).__name__}: {exc}")
        # The reply goes out before any tidying: the client waits for it, and work
        # done after a send overlaps with the supervisor's (perf/README.md).
        try:
            self.send(reply)
        finally:
            current.caller = None

    @staticmethod
    def _walk(method, params, vr, batch, after, **flags):
        """Run getnext calls back to back; return up to ``batch`` rows and whether more remain.

        The first call gets the caller's params; each next call gets the caller's
        params plus the previous row's fields. ``after`` resumes a walk from the
        row a previous batch ended on.
        """
        rows = []
        call_params = params
        if after:
            call_params = {**params, **{k: v for k, v in after.items() if v is not None}}
        while True:
            ctx = CmContext(call_params, vr, op="getnext", **flags)
            method(ctx)
            row = _row(ctx.fields)
            if not row:
                return rows, False
            rows.append(row)
            if not ctx._more:
                return rows, False
            if len(rows) >= batch:
                return rows, True
            call_params = {**params, **{k: v for k, v in row.items() if v is not None}}


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


def main(spec, sock, doorbell, slots):
    """Process target: set the process up as the supervisor asked, then run the entry."""
    # Own process group: the supervisor kills the whole group on stop and restart,
    # which reaches processes the agent started even after the worker is gone.
    os.setpgrp()
    os.environ.clear()
    os.environ.update(spec["env"])
    os.chdir(spec["cwd"])
    for path in reversed(spec["sys_path"]):
        if path not in sys.path:
            sys.path.insert(0, path)
    module = spec["module"]
    runtime = Runtime(module, sock, doorbell, spec["pool_size"], slots)
    root = logging.getLogger()
    root.handlers[:] = [_ChannelHandler(runtime)]
    root.setLevel(spec["log_level"])
    cmbackend._runtime = runtime
    runtime.start()
    try:
        load_entry(spec["entry"], module)()
    except BaseException as exc:
        detail = "".join(traceback.format_exception(exc)).rstrip()
        _fatal(runtime, f"entry {spec['entry']!r} raised {type(exc).__name__}: {exc}", detail)
    if runtime.agent is None:
        _fatal(runtime, f"entry {spec['entry']!r} returned without calling cmbackend_init()", "")
    threading.Event().wait()


def _fatal(runtime, message, detail):
    try:
        runtime.send([P.FATAL, message, detail])
    except OSError:
        pass
    _exit(1)
