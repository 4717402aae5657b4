"""Supervisor: the public facade, routing, and the life of each module.

The class is assembled from parts that each own one concern and all run on the
loop thread: EventLoop (loop.py), DeadlockDetection (deadlock.py), Recovery
(recovery.py) and Saving (saving.py). This file keeps the public API, the
clients' requests and their routing, starting workers, the config_deps-gated
loading, start and stop, and status.
"""

import atexit
import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import selectors
import shutil
import socket
import sys
import threading
import time
import weakref

from cmactor import cmfrontend, worker
from cmactor import protocol as P
from cmactor.errors import (
    ModuleUnavailable,
    OperationalError,
    ProgrammingError,
    StartupError,
    to_wire,
)

from . import deps, health, server, store
from .audit import AuditLog
from .config import SUPERVISOR_OPTIONS, agents_config, load_toml, validate
from .deadlock import DeadlockDetection
from .journal import Journal
from .loop import CLIENT, LISTENER, SENTINEL, WAKE, WORKER, EventLoop
from .modules import (
    FAILED,
    LOADING,
    READY,
    STARTING,
    STOPPED,
    STOPPING,
    WAITING_DEPS,
    Module,
    Pending,
)
from .recovery import Recovery
from .restart import RestartPolicy
from .saving import Saving

log = logging.getLogger("cmactor.supervisor")

# Never fork from the supervisor: it has threads, and a fork of a threaded process
# can deadlock. The fork server is a single-threaded process forked once, early.
START_METHOD = "forkserver"

_running = weakref.WeakSet()


@atexit.register
def _stop_all():
    # Runs before multiprocessing's own exit handler (atexit is last-in first-out),
    # which would otherwise wait forever on workers that wait on us.
    for sup in list(_running):
        sup.stop()


class Supervisor(EventLoop, DeadlockDetection, Recovery, Saving):
    """Runs agents in worker processes and serves their frontend socket.

    ``agents``: module name -> entry (``"pkg.mod:func"`` or ``"path/file.py:func"``)
    or a dict of agent options with an ``entry``. Relative paths are relative to
    ``base_dir`` (the config file's directory for :meth:`from_toml`, else the
    current directory). Other keyword options are the ``[supervisor]`` keys of a
    cmactor.toml. ``ignore_config``: start with defaults when the saved config file
    is unusable, after renaming it aside (else start refuses). ``recover``: also
    replay the journals of changes made after the last save (else a fresh start
    loads the saved config only).
    """

    def __init__(self, agents, state_dir=".cmactor", *, base_dir=None, ignore_config=False, recover=False, **options):
        self.base_dir = os.path.abspath(base_dir or os.getcwd())
        self.ignore_config = ignore_config
        self.recover = recover
        self.options = validate("Supervisor options", {"state_dir": state_dir, **options}, SUPERVISOR_OPTIONS)
        self.state_dir = os.path.abspath(os.path.join(self.base_dir, self.options["state_dir"]))
        self.config_path = os.path.join(self.state_dir, store.FILENAME)
        agent_options = agents_config(agents, self.base_dir)
        self.modules = {name: Module(name, opts, RestartPolicy(opts)) for name, opts in agent_options.items()}
        self.hold_timeout = self.options["hold_timeout"]
        self.socket_path = None
        self._thread = None
        self._finished = threading.Event()
        self._start_done = threading.Event()
        self._init_loop_state()

    @classmethod
    def from_toml(cls, path, **overrides):
        """A supervisor configured by a cmactor.toml; keyword arguments override [supervisor] keys."""
        options, agents, base_dir = load_toml(path)
        options.update(overrides)
        return cls(agents, base_dir=base_dir, **options)

    def _init_loop_state(self):
        self._sel = None
        self._listener = None
        self._private_dir = None
        self._wake_r = self._wake_w = None
        self._calls = []
        self._calls_lock = threading.Lock()
        self._timers = []
        self._timer_seq = itertools.count()
        self._next_sid = itertools.count(1)
        self._clients = set()
        self._dirty = set()  # clients and modules with output waiting
        self._writing = set()  # ... whose sockets are registered for write readiness
        self._stopping = False
        self._starting = True
        self._sections = {}  # module -> its section of the saved config file (bytes)
        self._waits = {}  # executor -> calls it waits on (deadlock.py)
        self._journals_to_sync = set()
        self._save_job = None
        self._save_waiters = []
        self._save_writer = None
        self._audit = None

    # -- public API (any thread) -----------------------------------------

    def start(self, timeout=None):
        """Start every agent; return when all are READY, else stop them and raise StartupError."""
        if self._thread is not None:
            raise RuntimeError("this Supervisor was already started")
        timeout = self.options["start_timeout"] if timeout is None else timeout
        os.makedirs(self.state_dir, exist_ok=True)
        self._sections = self._read_config()
        journal_dir = os.path.join(self.state_dir, "journal")
        os.makedirs(journal_dir, exist_ok=True)
        for mod in self.modules.values():
            mod.journal = Journal(os.path.join(journal_dir, f"{mod.name}.jsonl"))
            mod.journal.open(self.recover)
        path = self.options["socket"] or server.default_socket_path(self.state_dir)
        path = os.path.abspath(os.path.join(self.base_dir, path))
        try:
            self._listener, self.socket_path, self._private_dir = server.listen(path)
        except OSError as exc:
            for mod in self.modules.values():
                mod.journal.close()
            raise StartupError(f"cannot listen on {path}: {exc}") from None
        os.makedirs(os.path.dirname(server.socket_pointer(self.state_dir)), mode=0o700, exist_ok=True)
        with open(server.socket_pointer(self.state_dir), "w") as f:
            f.write(self.socket_path)
        self._mp = multiprocessing.get_context(START_METHOD)
        # Preloaded in the fork server, so a worker (and a restart) starts with the
        # runtime already imported: a fork, not a fresh interpreter.
        self._mp.set_forkserver_preload(["cmactor.worker"])
        self._audit = AuditLog(os.path.join(self.state_dir, "audit.log"))
        self._save_writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cmactor-save")
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, (WAKE, None))
        self._sel.register(self._listener, selectors.EVENT_READ, (LISTENER, None))
        self._thread = threading.Thread(target=self._loop, name="cmactor-supervisor", daemon=True)
        self._thread.start()
        self._call(self._watchdog)
        _running.add(self)
        self._call(self._start_all)
        self._start_done.wait(timeout)
        reasons = self._call(self._not_ready)
        if reasons:
            self.stop()
            detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
            raise StartupError(f"modules not READY after start (timeout {timeout:g}s): {detail}", reasons)
        self._call(self._end_start)
        log.info("all %d modules READY; listening on %s", len(self.modules), self.socket_path)
        return self

    def _read_config(self):
        try:
            return store.read(self.config_path)
        except store.StoreError as exc:
            if not self.ignore_config:
                raise StartupError(f"{exc}; fix or remove it, or start with `cmactor run --ignore-config`") from None
            aside = store.set_aside(self.config_path)
            log.warning("%s; starting with defaults, the file is kept as %s", exc, aside)
            return {}

    def connect(self, username="admin", print_callback=None, timeout=None):
        """A frontend connection to this supervisor."""
        if self.socket_path is None:
            raise RuntimeError("start() the supervisor before connecting to it")
        return cmfrontend.connect(username, print_callback, self.socket_path, timeout)

    def status(self):
        """Per module: state, pid, restarts, unsaved, uptime, rss, cpu, threads, queue, inflight, ..."""
        return self._call(self._status)

    def save(self, user="supervisor"):
        """Save every READY module's persistent tables to the config file; return a summary.

        Raises DatabaseError naming the module whose save failed (the previous file
        stays as it was), OperationalError if the file cannot be written.
        """
        future = concurrent.futures.Future()
        self._call(self._request_save, future, user)
        return future.result()

    def restart(self, name):
        """Restart one module now (reviving it if it is quarantined)."""
        return self._call(self._restart, name)

    def stop(self):
        """Stop every module (dependents first) and the loop; no process is left behind."""
        if self._thread is None or self._finished.is_set():
            self._join()
            return
        try:
            self._call_async(self._begin_stop)
        except RuntimeError:
            pass
        self._join()

    def wait(self, timeout=None):
        """Block until the supervisor has stopped (e.g. a client sent 'stop'). True if it has."""
        return self._finished.wait(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _join(self):
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        _running.discard(self)

    # -- clients -----------------------------------------------------------

    def _accept(self):
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            uid = server.peer_uid(sock)
            client = server.Client(sock, self.options["max_frame"])
            self._clients.add(client)
            self._sel.register(sock, selectors.EVENT_READ, (CLIENT, client))
            if uid is not None and uid != os.getuid() and uid not in self.options["allowed_uids"]:
                log.warning("refused a client with uid %s", uid)
                client.fail_stream(
                    f"uid {uid} may not use this supervisor; add it to [supervisor] allowed_uids to allow it"
                )
                self._dirty.add(client)

    def _drop_client(self, client):
        if client.closed:
            return
        client.closed = True
        self._clients.discard(client)
        self._unwatch(client)

    def _read_client(self, client):
        data = self._recv(client.sock)
        if data is None:
            return
        if not data:
            self._drop_client(client)  # replies still running for it are dropped on arrival
            return
        if client.closing:
            return
        try:
            messages = client.reader.feed(data)
        except P.FrameError as exc:
            client.fail_stream(f"{exc}; closing this connection")
            self._dirty.add(client)
            return
        for message in messages:
            try:
                request = server.parse_request(message)
            except server.BadRequest as exc:
                client.reply_error(exc.rid, exc.exc_type, str(exc))
                self._dirty.add(client)
                continue
            self._handle(client, request)

    def _handle(self, client, request):
        op = request["op"]
        rid = request["id"]
        if op in P.DATA_OPS:
            self._route(client, request)
        elif op == "status":
            self._to_client(client, {"id": rid, "ok": True, "status": self._status()})
        elif op == "ping":
            self._to_client(client, {"id": rid, "ok": True})
        elif op == "save":
            self._request_save((client, rid), request.get("user", ""))
        elif op == "restart":
            try:
                self._restart(request["module"])
            except ProgrammingError as exc:
                client.reply_error(rid, ProgrammingError, str(exc))
                self._dirty.add(client)
            else:
                self._to_client(client, {"id": rid, "ok": True})
        elif op == "stop":
            log.info("stop requested by %s", request.get("user") or "a client")
            self._to_client(client, {"id": rid, "ok": True})
            self._begin_stop()

    # -- routing -----------------------------------------------------------

    def _route(self, client, request):
        name = request["module"]
        mod = self.modules.get(name)
        pending = Pending(client, request["id"], request)
        if mod is None:
            known = ", ".join(sorted(self.modules))
            self._fail(pending, ProgrammingError, f"unknown module {name!r}; this supervisor runs: {known}")
            return
        if request.get("caller") is not None and not self._admit(mod, pending):
            return
        if mod.state == READY and not mod.saving and not self._stopping:
            self._dispatch(mod, pending)
            return
        hold = request.get("hold")
        explicit = hold is not None
        hold = self.hold_timeout if hold is None else hold
        if self._stopping or mod.state in (STOPPING, STOPPED) or hold == 0 or (mod.state == FAILED and not explicit):
            self._fail(pending, ModuleUnavailable, self._unavailable(mod))
            return
        pending.hold, pending.deadline = hold, time.monotonic() + hold
        mod.held.append(pending)
        self._after(hold, self._expire_held, mod)

    def _dispatch(self, mod, pending):
        sid = pending.sid = next(self._next_sid)
        req = pending.request
        pending.dispatched_at = time.monotonic()
        if mod.async_ops:  # counted against the pool by the deadlock detector
            pending.is_async = (req["table"], req["op"]) in mod.async_ops
        if pending.is_async:
            mod.ring = True
        else:
            mod.serial_sids.add(sid)
        flags = P.F_NOTIFY if req.get("notify") else 0
        self._to_worker(mod, [P.REQ, sid, req["op"], req["table"], req["params"], req.get("vr"), flags, req["batch"], req["after"]])
        mod.inflight[sid] = pending

    def _answer(self, pending, error=None, entries=None):
        """Send a request's final reply: the worker's ``entries`` (protocol.reply_entries), or
        ``error`` (a wire error map). Sets and setops go to the audit log too."""
        client = pending.client
        if not client.closed:
            if error is None:
                client.out += P.reply_frame(pending.rid, entries)
            else:
                client.send({"id": pending.rid, "ok": False, "error": error})
            self._dirty.add(client)
        req = pending.request
        if pending.issuer is not None:
            calls = self._waits.get(pending.issuer)
            if calls is not None:
                calls.discard(pending)
                if not calls:
                    del self._waits[pending.issuer]
        if req["op"] in ("set", "setop"):
            outcome = "ok" if error is None else f"{error['type']}: {error['message']}"
            self._audit.record(req.get("user", ""), req["op"], req["module"], req["table"], req["params"], outcome)

    def _fail(self, pending, exc_type, message):
        self._answer(pending, to_wire(exc_type, message))

    def _expire_held(self, mod):
        now = time.monotonic()
        keep = []
        for pending in mod.held:
            if pending.deadline <= now:
                self._fail(pending, ModuleUnavailable, f"{self._unavailable(mod)} (held {pending.hold:g}s, the hold_timeout)")
            else:
                keep.append(pending)
        mod.held.clear()
        mod.held.extend(keep)

    def _release_held(self, mod):
        held = list(mod.held)
        mod.held.clear()
        for pending in held:
            if not pending.client.closed:
                self._dispatch(mod, pending)

    def _fail_held(self, mod):
        held = list(mod.held)
        mod.held.clear()
        for pending in held:
            self._fail(pending, ModuleUnavailable, self._unavailable(mod))

    def _unavailable(self, mod):
        name = mod.name
        if self._stopping or mod.state in (STOPPING, STOPPED):
            return f"module {name!r} is unavailable: the supervisor is stopping"
        if mod.state == FAILED:
            return f"module {name!r} is quarantined (FAILED): {mod.error}; revive it with `cmactor restart {name}`"
        if mod.state == READY and mod.saving:
            return f"module {name!r} is not READY (saving)"
        detail = f", waiting on {mod.waiting_on!r}" if mod.state == WAITING_DEPS and mod.waiting_on else ""
        return f"module {name!r} is not READY (state {mod.state}{detail})"

    # -- workers -------------------------------------------------------------

    def _start_all(self):
        for mod in self.modules.values():
            self._spawn(mod)

    def _spawn(self, mod):
        parent, child = socket.socketpair()
        bell, bell_child = socket.socketpair()
        env = dict(os.environ)
        env.update(mod.options["env"])
        env["CMACTOR_SOCKET"] = self.socket_path
        env["CMACTOR_MODULE"] = mod.name
        spec = {
            "module": mod.name,
            "entry": mod.options["entry"],
            "cwd": os.getcwd(),
            "sys_path": [self.base_dir] + [p or os.getcwd() for p in sys.path],
            "env": env,
            "pool_size": mod.options["pool_size"],
            "log_level": self.options["log_level"],
        }
        slots = self._mp.RawArray("q", P.SLOTS_SIZE)
        process = self._mp.Process(target=worker.main, args=(spec, child, bell_child, slots), name=f"cmactor-{mod.name}")
        try:
            process.start()
        except Exception as exc:
            for sock in (parent, child, bell, bell_child):
                sock.close()
            self._quarantine(mod, f"could not start a worker process: {type(exc).__name__}: {exc}")
            return
        child.close()  # else the worker's death would never show as EOF here
        bell_child.close()
        parent.setblocking(False)
        bell.setblocking(False)
        mod.attach(process, parent, bell, slots)
        mod.psutil = health.track(process.pid)
        self._sel.register(parent, selectors.EVENT_READ, (WORKER, mod))
        self._sel.register(process.sentinel, selectors.EVENT_READ, (SENTINEL, mod))
        log.debug("module %s: worker pid %d started", mod.name, process.pid)

    def _read_worker(self, mod):
        data = self._recv(mod.sock)
        if data is None:
            return
        if not data:
            self._close_worker_socket(mod)  # the sentinel reports the exit itself
            return
        for message in mod.reader.feed(data):
            self._on_worker_message(mod, message)

    def _close_worker_socket(self, mod):
        if mod.doorbell is not None:
            mod.doorbell.close()
            mod.doorbell = None
        if mod.sock is None:
            return
        self._unwatch(mod)
        mod.sock = None
        mod.out.clear()

    def _on_worker_message(self, mod, message):
        kind = message[0]
        if kind == P.REPLY:
            _, sid, error, entries, dirty = message
            mod.serial_sids.discard(sid)
            pending = mod.inflight.pop(sid, None)
            if pending is None:
                return
            if error is None:
                if dirty:
                    mod.unsaved = True
                    req = pending.request
                    if req["op"] in ("set", "setop") and req["table"] in mod.persistent_list:
                        mod.journal.append(req["op"], req["table"], req["params"])
                        self._journals_to_sync.add(mod.journal)
            self._answer(pending, error, entries)
            if self._stopping:
                self._continue_stop()
        elif kind == P.NOTIFY:
            pending = mod.inflight.get(message[1])
            if pending is not None:
                self._to_client(pending.client, {"id": pending.rid, "notify": message[2]})
        elif kind == P.LOG:
            _, level, name, text = message
            logging.getLogger(f"cmactor.agent.{mod.name}").log(level, "[%s] %s", name, text)
        elif kind == P.INIT:
            self._on_init(mod, *message[1:])
        elif kind == P.READY:
            mod.ready_called = True
            self._maybe_ready(mod)
        elif kind == P.LOADED:
            self._on_loaded(mod, *message[2:])
        elif kind == P.SAVED:
            self._on_saved(mod, *message[1:])
        elif kind == P.FATAL:
            _, text, detail = message
            mod.error = text
            log.error("module %s: %s%s", mod.name, text, f"\n{detail}" if detail else "")

    def _on_init(self, mod, persistent, config_deps, async_actions, pool_size):
        if mod.state != STARTING:
            return
        mod.persistent_list = persistent
        mod.config_deps = config_deps
        # (table, op) pairs served by an @async_action: looked up per request, not formatted.
        mod.async_ops = frozenset(
            (name[: -len(suffix) - 1], op)
            for name in async_actions
            for op, suffix in P.ACTION_SUFFIX.items()
            if name.endswith("_" + suffix)
        )
        mod.pool_size = pool_size
        missing = deps.unknown(config_deps, self.modules)
        if missing:
            known = ", ".join(sorted(self.modules))
            self._quarantine(
                mod,
                f"config_deps names {', '.join(map(repr, missing))}, which this supervisor does not run "
                f"(it runs: {known})",
            )
            return
        cycle = deps.find_cycle(mod.name, {m.name: m.config_deps for m in self.modules.values()})
        if cycle:
            reason = f"config_deps cycle: {deps.format_cycle(cycle)}"
            for name in dict.fromkeys(cycle):
                self._quarantine(self.modules[name], reason)
            return
        mod.state = WAITING_DEPS
        self._refuse_held_cycles(mod)
        self._advance_waiting()

    def _advance_waiting(self):
        for mod in self.modules.values():
            if mod.state != WAITING_DEPS:
                continue
            not_ready = [d for d in mod.config_deps if self.modules[d].state != READY]
            mod.waiting_on = not_ready[0] if not_ready else None
            if not not_ready:
                self._load(mod)
        self._check_start()

    def _load(self, mod):
        """Replay the module's saved section, or have it generate defaults when it has none."""
        mod.state = LOADING
        section = self._sections.get(mod.name)
        journal = mod.journal.records
        mod.last_event = "event_generate_default" if section is None and not journal else "event_load_start"
        self._to_worker(mod, [P.LOAD, next(self._next_sid), section, journal])
        # Changes replayed from the journal are not in the config file: still unsaved.
        mod.unsaved = bool(journal)
        self._after(mod.options["load_timeout"], self._check_stuck, mod, mod.process)

    def _on_loaded(self, mod, error, failures, failed):
        if mod.last_event == "event_load_start":
            mod.last_event = "event_load_complete"
        mod.loaded = True
        mod.load_errors = failed
        for failure in failures:
            log.error(
                "module %s: saved row of table %s did not load: %s; row: %s",
                mod.name,
                failure["table"],
                failure["message"],
                failure["row"],
            )
        if failed > len(failures):
            log.error("module %s: %d more saved rows did not load", mod.name, failed - len(failures))
        if error is not None:
            log.error("module %s: %s", mod.name, error)
            mod.error = error
        elif failed:
            first = failures[0]
            mod.error = f"{failed} saved rows did not load; first: table {first['table']}: {first['message']}"
        self._maybe_ready(mod)

    def _check_stuck(self, mod, process):
        if mod.process is process and mod.state == LOADING:
            reason = f"stuck: ready() not called within {mod.options['load_timeout']:g}s; last event {mod.last_event}"
            log.warning("module %s %s", mod.name, reason)
            mod.error = f"{mod.error}; {reason}" if mod.error else reason

    def _maybe_ready(self, mod):
        if mod.state != LOADING or not (mod.loaded and mod.ready_called):
            return
        mod.state = READY
        if not mod.load_errors:
            mod.error = None
        log.info("module %s READY (pid %d)", mod.name, mod.pid)
        self._release_held(mod)
        self._advance_waiting()  # which ends with _check_start()

    # -- start and stop ------------------------------------------------------

    def _check_start(self):
        """Let start() return once every module is READY, or settled where it will stay."""
        if all(self._settled(mod) for mod in self.modules.values()):
            self._start_done.set()

    def _settled(self, mod, seen=()):
        if mod.state in (READY, FAILED):
            return True
        if mod.state != WAITING_DEPS or mod.name in seen:
            return False
        # Waiting on a module that failed (directly or further down) waits forever.
        return any(
            self.modules[d].state == FAILED or self._settled(self.modules[d], (*seen, mod.name))
            for d in mod.config_deps
            if self.modules[d].state != READY
        )

    def _not_ready(self):
        reasons = {}
        for mod in self.modules.values():
            if mod.state == READY:
                continue
            if mod.state == FAILED:
                reasons[mod.name] = f"FAILED: {mod.error}"
            elif mod.state == STARTING:
                reasons[mod.name] = "STARTING: the entry has not called cmbackend_init()"
            elif mod.state == WAITING_DEPS:
                reasons[mod.name] = f"WAITING_DEPS on {mod.waiting_on!r} ({self.modules[mod.waiting_on].state})"
            elif mod.state == LOADING and mod.loaded:
                reasons[mod.name] = f"LOADING: {mod.last_event} returned but ready() was never called"
            else:
                reasons[mod.name] = f"{mod.state}: {mod.last_event or 'no event'} still running"
        return reasons

    def _end_start(self):
        self._starting = False

    def _begin_stop(self):
        if self._stopping:
            return
        self._stopping = True
        self._start_done.set()
        self._reply_save(self._save_waiters, OperationalError, "save refused: the supervisor is stopping")
        self._save_waiters = []
        for mod in self.modules.values():
            self._fail_held(mod)
            if mod.process is None and mod.state != FAILED:
                mod.state = STOPPED
        self._after(self.options["stop_timeout"], self._kill_remaining)
        self._continue_stop()

    def _continue_stop(self):
        if self._save_job is not None:
            return  # a save in progress finishes first (stop_timeout still bounds it)
        alive = [m for m in self.modules.values() if m.process is not None]
        if not alive:
            self._close()
            return
        for mod in alive:
            if mod.state == STOPPING or mod.inflight:
                continue
            if any(mod.name in other.config_deps and other.process is not None for other in alive if other is not mod):
                continue  # dependents stop first
            log.info("module %s stopping", mod.name)
            mod.state = STOPPING
            self._to_worker(mod, [P.STOP])

    def _kill_remaining(self):
        for mod in self.modules.values():
            if mod.process is not None:
                log.warning("module %s did not stop within stop_timeout; killing it", mod.name)
                mod.state = STOPPING
                self._kill(mod)

    def _sync_journals(self):
        journals, self._journals_to_sync = self._journals_to_sync, set()
        for journal in journals:
            journal.sync()

    def _close(self):
        if self._save_writer is not None:
            self._save_writer.shutdown(wait=True)
        self._audit.close()
        for mod in self.modules.values():
            mod.journal.close()
        for client in list(self._clients):
            self._drop_client(client)
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
            for path in (self.socket_path, server.socket_pointer(self.state_dir)):
                try:
                    os.unlink(path)
                except OSError:
                    pass
            if self._private_dir:
                shutil.rmtree(self._private_dir, ignore_errors=True)
        with self._calls_lock:
            self._finished.set()

    # -- status ----------------------------------------------------------------

    def _status(self):
        out = {}
        for mod in self.modules.values():
            uptime = mod.uptime()
            entry = {
                "state": mod.state,
                "pid": mod.pid,
                "restarts": mod.restarts,
                "unsaved": mod.unsaved,
                "uptime": None if uptime is None else round(uptime, 3),
                "queue": len(mod.held),
                "inflight": len(mod.inflight),
                "last_exit": mod.last_exit,
                "error": mod.error,
                "waiting_on": mod.waiting_on if mod.state == WAITING_DEPS else None,
                "saving": mod.saving,
                "load_errors": mod.load_errors,
                "config_deps": list(mod.config_deps),
                "persistent_list": list(mod.persistent_list),
            }
            entry.update(health.sample(mod.psutil))
            out[mod.name] = entry
        return out

