"""memory_max: how much memory a module's worker may use, and what happens past it.

One way for all of a supervisor's modules, as ``[supervisor] memory_enforcement`` says:

cgroup  Each worker with a memory_max runs in a cgroup v2 of its own, made beside the
        supervisor's, with ``memory.max`` its limit and ``memory.oom.group`` 1: the kernel
        charges it every page the worker and the processes it starts use (page cache and
        kernel memory too, not RSS alone), reclaims what it can at the limit, and past it
        kills all of them at once. The worker joins its cgroup itself, before the agent's
        code runs (cmactor/worker/process.py), so whatever it starts is born there. At the
        reap (workers.py) the cgroup's ``memory.events`` says whether the kernel killed it
        (``oom_kill``), and the cgroup goes.
        This needs /sys/fs/cgroup to be a cgroup2 mount and the supervisor's own cgroup to be
        writable with the memory controller available (a systemd service with
        ``Delegate=yes``). cgroup v2 lets a cgroup hand a controller to its children only if
        it holds no process itself, so the supervisor (with the processes it started) first
        moves into a leaf of its own, ``cmactor-supervisor``, beside its workers' cgroups;
        a cgroup that other processes share is not taken. That is done once per process
        (delegated()), never undone.
rss     A watchdog: every CHECK_EVERY seconds the RSS of each limited worker and of the
        processes it started that are still in its process group (what a kill of the group
        ends) is summed, on a thread of its own (it reads /proc files, and the loop thread
        serves every client); a worker over its limit is SIGKILLed with its group, as a hung
        one is. A page that several of them share (a fork's) counts once for each, and a
        worker that allocates fast gets past its limit by what it allocates in CHECK_EVERY.
auto    cgroup where every step of it works, else rss; the log says which, and why. Only
        when a module has a memory_max at the start: a supervisor without limits leaves its
        cgroup alone, and a limit a reload gives later is the watchdog's.

Either way the kill is a crash like any other (recovery.py): restarted with the backoff,
its journal replayed. Its reason, "memory: ...", is the module's error (Module.over_memory),
which recovery adds to the exit: last_exit and the log say "killed by SIGKILL after:
memory: RSS 82 MiB over memory_max 64 MiB", and it counts in memory_kills (status, metrics).
"""

import contextlib
import itertools
import logging
import os
import queue
import threading

import psutil

from cmactor.errors import StartupError

log = logging.getLogger("cmactor.supervisor")

ROOT = "/sys/fs/cgroup"
OWN = "/proc/self/cgroup"
LEAF = "cmactor-supervisor"  # the supervisor's own cgroup, once it hands memory to its workers'
# Seconds between two measures of the RSS watchdog.
CHECK_EVERY = 0.25
PAGE = os.sysconf("SC_PAGE_SIZE")

_names = itertools.count(1)  # workers' cgroups, of every supervisor in this process
_set_up = {}  # (root, own) -> delegated()'s answer: once per process
_setting_up = threading.Lock()


def size(count):
    """``count`` bytes for a person: "64 MiB", "1.5 GiB"."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= scale:
            return f"{count / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{count} B"


class Enforcement:
    """memory_max for one supervisor's modules: the cgroups its workers go in (``cgroups``,
    for workers.py), or else the RSS watchdog. Decided at the start: cgroups are looked for
    when a module has a memory_max then (or memory_enforcement is "cgroup"), so that a
    supervisor without limits never moves into a leaf; a limit a reload gives later is
    the watchdog's if no cgroups were set up. StartupError for "cgroup" where none can be."""

    def __init__(self, modules, loop, logs, kill, enforcement):
        self.cgroups = None
        self._watch = None
        limited = any(mod.memory_max is not None for mod in modules.values())
        if enforcement == "rss":
            path, why = None, "memory_enforcement = 'rss'"
        elif enforcement == "auto" and not limited:
            path, why = None, "no module had a memory_max at the start"
        else:
            path, why = delegated()
        if path is not None:
            self.cgroups = Cgroups(path)
            log.info("memory_max: each limited worker runs in a cgroup of its own under %s (memory.max)", path)
            return
        if enforcement == "cgroup":
            raise StartupError(
                f"memory_enforcement = 'cgroup', but no cgroup can be made for memory_max: {why}; "
                "set it to 'auto' or 'rss' to have an RSS watchdog enforce memory_max instead"
            )
        self._watch = RssWatch(modules, loop, logs, kill)
        log.log(
            logging.INFO if limited else logging.DEBUG,
            "memory_max: an RSS watchdog checks the limited workers every %gs (no cgroups: %s)",
            CHECK_EVERY,
            why,
        )

    def start(self):
        """Start the watchdog's ticks, if it is the RSS one."""
        if self._watch is not None:
            self._watch.start()

    def close(self):
        if self._watch is not None:
            self._watch.close()


# -- cgroups ------------------------------------------------------------------


def delegated(root=ROOT, own=OWN):
    """(path, None): the cgroup this process makes its workers' cgroups in, the memory
    controller enabled for them; or (None, why not). Worked out once per process, since it
    may move the process into a leaf; ``root`` and ``own`` (where the cgroup2 hierarchy is
    mounted, and this process's /proc/PID/cgroup) are other files for tests."""
    with _setting_up:
        if (root, own) not in _set_up:
            _set_up[root, own] = _delegate(root, own)
        return _set_up[root, own]


def _delegate(root, own):
    if not os.path.isfile(os.path.join(root, "cgroup.controllers")):
        return None, f"{root} is not a cgroup v2 hierarchy (cgroup v1, or the hybrid layout)"
    try:
        with open(own) as f:
            path = next((line[3:] for line in f.read().splitlines() if line.startswith("0::")), None)
    except OSError as exc:
        return None, f"cannot read {own}: {exc.strerror}"
    if path is None:
        return None, f"{own} names no cgroup v2 of this process"
    here = os.path.join(root, path.lstrip("/"))
    try:
        if "memory" not in _read(here, "cgroup.controllers").split():
            return None, f"the memory controller is not available in {here} (systemd: Delegate=yes)"
        if not os.access(here, os.W_OK):
            return None, f"{here} is not writable by this process (systemd: Delegate=yes)"
        if "memory" not in _read(here, "cgroup.subtree_control").split():
            others = _enable_memory(here)
            if others:
                return None, (
                    f"{here} holds processes other than this one and those it started ({', '.join(others)}), "
                    "and cgroup v2 hands a controller down only from a cgroup without processes: run the "
                    "supervisor in a cgroup of its own (a systemd service with Delegate=yes)"
                )
    except OSError as exc:
        return None, f"cannot set up {here} for memory limits: {exc.filename}: {exc.strerror}"
    return here, None


def _enable_memory(here):
    """Enable the memory controller for the children of ``here``, this process's cgroup, after
    moving this process and those it started into a leaf child; the pids of other processes
    in ``here`` instead (nothing done: they keep the controller from being enabled). OSError
    with what was moved moved back."""
    ours = {os.getpid(), *(child.pid for child in psutil.Process().children(recursive=True))}
    procs = _read(here, "cgroup.procs").split()
    others = [pid for pid in procs if int(pid) not in ours]
    if others:
        return others
    leaf = os.path.join(here, LEAF)
    os.makedirs(leaf, exist_ok=True)
    try:
        for pid in procs:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                _write(leaf, "cgroup.procs", pid)
        _write(here, "cgroup.subtree_control", "+memory")
    except OSError:
        for pid in procs:
            with contextlib.suppress(OSError):
                _write(here, "cgroup.procs", pid)
        with contextlib.suppress(OSError):
            os.rmdir(leaf)
        raise
    return []


class Cgroups:
    """Making and ending the cgroups of workers, in ``path`` (delegated())."""

    def __init__(self, path):
        self.path = path
        self._left = []  # of reaped workers, not removed yet: something they started still runs in them

    def create(self, name, limit):
        """A new cgroup for a worker of module ``name``, limited to ``limit`` bytes: its path."""
        while True:
            path = os.path.join(self.path, f"cmactor-{os.getpid()}-{name}-{next(_names)}")
            try:
                os.mkdir(path)
                break
            except FileExistsError:  # left by an earlier supervisor that had this pid
                continue
        try:
            _write(path, "memory.max", str(limit))
            # Past the limit the kernel kills the worker and all it started together, as a
            # crash would take them: never one process of the group, leaving the rest.
            _write(path, "memory.oom.group", "1")
        except OSError:
            self._remove(path)
            raise
        return path

    def end(self, path, limit):
        """A worker's exit: its cgroup ``path`` removed once empty, and the reason, if the
        kernel killed it for passing ``limit``; else None."""
        try:
            events = dict(line.split() for line in _read(path, "memory.events").splitlines())
        except OSError:  # never made whole (a spawn that failed)
            events = {}
        kills = int(events.get("oom_kill", 0))
        self._remove(path)
        if not kills:
            return None
        return f"memory: the kernel killed it at memory_max {size(limit)} (its cgroup's oom_kill: {kills})"

    def _remove(self, path):
        """rmdir ``path``, and those that could not be before; one still holding a process (sent
        SIGKILL with the worker's group and not ended yet, or it left the group) is tried
        again next time."""
        paths, self._left = [*self._left, path], []
        for path in paths:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                self._left.append(path)


def _read(directory, name):
    with open(os.path.join(directory, name)) as f:
        return f.read()


def _write(directory, name, text):
    # One write() a call: a cgroup file takes each write as one command (and ignores O_TRUNC,
    # as it does a shell's `echo 1 > file`).
    fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# -- the RSS watchdog ---------------------------------------------------------


def group_rss(pid):
    """Bytes resident of worker ``pid`` and of the processes it started (theirs too) that are
    in its process group; None once it is gone. Found from /proc/PID/task/TID/children, so
    the cost is the worker's threads and processes, not those of the whole machine (a
    kernel without CONFIG_PROC_CHILDREN has no such files: the worker alone is counted)."""
    total = 0
    todo = [pid]
    while todo:
        each = todo.pop()
        try:
            with open(f"/proc/{each}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # it ended meanwhile
            if each == pid:
                return None
            continue
        # The fields after the command, whose parentheses may hold anything: state, ppid,
        # pgrp, ..., rss (in pages) the 22nd of them.
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[2]) != pid:  # it left the worker's group: a kill of the group would not end it
            continue
        total += int(fields[21]) * PAGE
        try:
            tasks = os.listdir(f"/proc/{each}/task")
        except OSError:  # it ended meanwhile
            continue
        for task in tasks:
            with contextlib.suppress(OSError), open(f"/proc/{each}/task/{task}/children", "rb") as f:
                todo += map(int, f.read().split())  # (a thread that ended meanwhile has none)
    return total


class RssWatch:
    """Every CHECK_EVERY seconds: the loop thread (tick) copies which workers to measure, its
    own thread measures them (group_rss), and the loop thread kills those over their
    memory_max, then arms the next tick. One measure at a time, however long it takes.
    ``modules`` is the supervisor's own dict: a module a reload adds or limits is watched
    from the next tick."""

    def __init__(self, modules, loop, logs, kill):
        self._modules = modules
        self._loop = loop
        self._logs = logs
        self._kill = kill  # Workers.kill
        self._batches = queue.SimpleQueue()  # for the thread: [(module, process, pid)], or None to end
        self._thread = threading.Thread(target=self._measure, name="cmactor-memory", daemon=True)

    def start(self):
        self._loop.call(self.tick)

    def tick(self):
        batch = [
            (mod, mod.process, mod.pid)
            for mod in self._modules.values()
            if mod.memory_max is not None and mod.process is not None and not mod.leaving
        ]
        if not batch:
            self._loop.after(CHECK_EVERY, self.tick)
            return
        if not self._thread.is_alive():
            # At the first worker with a limit, once (a start waits for the thread, ~0.1 ms):
            # a supervisor without limits has no such thread.
            self._thread.start()
        self._batches.put(batch)

    def _measure(self):
        while (batch := self._batches.get()) is not None:
            measured = [(mod, process, group_rss(pid)) for mod, process, pid in batch]
            try:
                self._loop.call_async(self._measured, measured)
            except RuntimeError:  # the supervisor stopped
                return

    def _measured(self, measured):
        for mod, process, rss in measured:
            # The worker measured, still: not reaped, nor asked to stop or restart, meanwhile;
            # and its limit, a reload may have changed.
            limit = mod.memory_max
            if rss is not None and limit is not None and rss > limit and mod.process is process and not mod.leaving:
                reason = f"memory: RSS {size(rss)} over memory_max {size(limit)}"
                mod.over_memory(reason)
                self._logs.report(mod, logging.ERROR, "module %s: %s; killing the worker", mod.name, reason)
                self._kill(mod)
        self._loop.after(CHECK_EVERY, self.tick)

    def close(self):
        """End the thread (after the measure under way, if any)."""
        if self._thread.is_alive():
            self._batches.put(None)
            self._thread.join()
