"""Recovery: launching a module's worker, and what follows its end: its unanswered
requests, the restart policy, the relaunch; and the watchdog that kills a hung worker.

Every decision a crash calls for is taken on one path through this file (as OTP's
restart_child -> do_restart -> restart, or supervisord's Subprocess.finish):

    on_exit     the worker's sentinel fired: it is reaped (workers.py); of its unanswered
                requests, those its lanes had started fail (they may have had effects),
                the others are held for the next worker (the progress slots, protocol.py)
    _exited     the agent's ``restart`` option: restart it, leave it STOPPED, or quarantine it
    _crashed    the RestartPolicy below: restart after a backoff, or quarantine past its intensity
    _respawn    the backoff is over: launch a new worker, STARTING

From STARTING the module comes up as at its first start (lifecycle.py). A start that
fails for want of file descriptors or processes is retried by launch itself, as long
as it takes, never counted as a crash.
"""

import collections
import logging
import time

from cmactor.errors import ModuleUnavailable, OperationalError, ProgrammingError
from cmactor.wire import protocol as P
from cmsupervisor.supervision.modules import unknown_module
from cmsupervisor.supervision.states import FAILED, RESTARTING, STOPPED, STOPPING
from cmsupervisor.supervision.workers import SpawnFailed, describe_exit

# Seconds before a start that failed for want of descriptors or processes is tried
# again, doubling up to the last.
RETRY_FIRST = 0.05
RETRY_MAX = 5.0


def split_started(inflight, slots):
    """Unanswered requests of a dead worker: (started, not started), from its progress slots."""
    serial_last = slots[P.SLOT_SERIAL_SID]
    running_async = {slots[P.async_slot(i)] for i in range(P.ASYNC_SLOTS)} - {0}
    started, waiting = [], []
    for sid, pending in inflight.items():
        if pending.is_async:
            ran = slots[P.SLOT_OVERFLOW] or sid in running_async
        else:
            ran = sid <= serial_last
        (started if ran else waiting).append(pending)
    return started, waiting


def _stuck_in(slots, first, count, limit):
    """How many of ``count`` (sid, start) slot pairs from ``first`` hold an action started
    before ``limit`` (monotonic ns) and not finished: one slice read, not a read a slot."""
    return sum(1 for started in slots[first + 1 : first + 2 * count : 2] if 0 < started < limit)


class RestartPolicy:
    """Exponential backoff and the intensity window that quarantines.

    Like an OTP supervisor's intensity/period: more than ``max_restarts`` crashes
    within ``restart_window`` seconds and the module is given up on (FAILED) until an
    operator restarts it. Between restarts the delay doubles from ``restart_delay`` up
    to ``restart_delay_max``, and resets once a worker has stayed up ``stable_after``.
    """

    def __init__(self, options):
        self.max_restarts = options["max_restarts"]
        self.window = options["restart_window"]
        self.base_delay = options["restart_delay"]
        self.max_delay = options["restart_delay_max"]
        self.stable_after = options["stable_after"]
        self._crashes = collections.deque()
        self._next_delay = self.base_delay

    def on_crash(self, now, uptime):
        """Seconds to wait before restarting after a crash at ``now``, or None to quarantine."""
        if uptime is not None and uptime >= self.stable_after:
            self._next_delay = self.base_delay
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self.window:
            self._crashes.popleft()
        if len(self._crashes) > self.max_restarts:
            return None
        delay = self._next_delay
        self._next_delay = min(max(delay * 2, self.base_delay), self.max_delay)
        return delay

    def reset(self):
        """Forget past crashes (an operator asked for this restart)."""
        self._crashes.clear()
        self._next_delay = self.base_delay


class Recovery:
    def __init__(self, modules, loop, workers, router, graph, saver, lifecycle, logs):
        self._modules = modules
        self._loop = loop
        self._workers = workers
        self._router = router
        self._graph = graph
        self._saver = saver
        self._lifecycle = lifecycle
        self._logs = logs  # logs.ModuleLogs: a crash is reported in the module's own log too
        self._retries = {}  # module name -> the loop timer of its next try at a start (launch)

    # -- launching a worker -------------------------------------------------

    def launch_all(self):
        """The first start: a worker for every module but those an operator stopped; one that
        cannot be started at all is quarantined."""
        for mod in self._modules.values():
            if mod.stopped_by is not None:  # it stays STOPPED until an operator starts it (admin.py)
                self._logs.report(mod, logging.INFO, "module %s not started: %s", mod.name, mod.error)
                continue
            error = self.launch(mod)
            if error is not None:
                self._lifecycle.quarantine(mod, error)

    def launch(self, mod, retry_in=RETRY_FIRST):
        """Start a worker for ``mod`` (STARTING); None, or why no process could be started.

        A start that fails for want of file descriptors or processes is no fault of the
        module's: it waits in RESTARTING and is tried again in ``retry_in`` seconds
        (doubling up to RETRY_MAX), as long as it takes, never counted as a crash."""
        retry = self._retries.pop(mod.name, None)
        if retry is not None:  # a launch asked for meanwhile (an operator's restart) replaces it
            self._loop.cancel(retry)
        try:
            worker = self._workers.spawn(mod)
        except SpawnFailed as exc:
            if not exc.shortage:
                return str(exc)
            mod.restarting(f"{exc}; trying again in {retry_in:g}s")
            self._logs.report(mod, logging.WARNING, "module %s: %s", mod.name, mod.error)
            self._retries[mod.name] = self._loop.after(retry_in, self._retry_launch, mod, min(retry_in * 2, RETRY_MAX))
            return None
        mod.started(*worker)
        self._logs.report(mod, logging.INFO, "module %s: worker pid %d started", mod.name, mod.pid)
        return None

    def _retry_launch(self, mod, retry_in):
        del self._retries[mod.name]
        if mod.state == RESTARTING and mod.process is None and not self._lifecycle.stopping:
            self.launch(mod, retry_in)

    # -- a worker's end ---------------------------------------------------

    def on_exit(self, mod):
        """A worker's process ended, for whatever reason."""
        pid, code = self._workers.reap(mod)
        reason = describe_exit(code)
        if mod.error:  # what the worker said before dying (the entry's exception, ...)
            reason = f"{reason} after: {mod.error}"
        self._graph.forget_module(mod)  # its lanes wait on nothing any more
        started, waiting = split_started(mod.exited(reason), mod.slots)
        for pending in started:
            req = pending.request
            self._router.fail(
                pending,
                OperationalError,
                f"module {mod.name!r} crashed ({reason}) while handling {req.op} {mod.name}.{req.table}; "
                "the request may have taken effect: check before retrying",
            )
        stopping = self._lifecycle.stopping
        if stopping or mod.state == STOPPING or mod.state == FAILED or mod.stays_stopped:
            for pending in waiting:
                self._router.fail(pending, ModuleUnavailable, self._router.unavailable(mod))
        else:
            self._router.hold_again(mod, waiting)  # they run after the restart
        self._saver.worker_died(mod, reason)
        if stopping or mod.state == STOPPING:
            self._logs.report(
                mod, logging.INFO, "module %s: worker pid %d ended (%s) in the stop", mod.name, pid, reason
            )
            self._lifecycle.exited_while_stopping(mod)
        elif mod.stays_stopped:  # stopped, or removed, while it was restarting or quarantined
            self._logs.report(mod, logging.INFO, "module %s: worker pid %d ended (%s)", mod.name, pid, reason)
            mod.move(STOPPED)  # what is held for it fails (the router is told)
        elif mod.state == RESTARTING:  # asked for: an operator's restart, or a journal that failed
            self._logs.report(
                mod, logging.INFO, "module %s: worker pid %d ended (%s); starting it again", mod.name, pid, reason
            )
            self._respawn(mod)
        elif mod.state == FAILED:  # quarantined while it ran (its start failed, say): its end is all that is left
            self._logs.report(mod, logging.INFO, "module %s: worker pid %d ended (%s)", mod.name, pid, reason)
        else:
            self._exited(mod, pid, code, reason)

    def _exited(self, mod, pid, code, reason):
        """The worker ended on its own: restart it, or leave it, as the agent's ``restart`` says."""
        policy = mod.options["restart"]
        if policy == "always" or (policy == "on-failure" and code != 0):
            self._crashed(mod, f"worker pid {pid}", reason, time.monotonic() - mod.started_at)
        elif code == 0:
            self._logs.report(
                mod,
                logging.INFO,
                "module %s: worker pid %d ended (%s); restart = %r leaves it STOPPED",
                mod.name,
                pid,
                reason,
                policy,
            )
            mod.move(STOPPED)  # what is held for it fails (the router is told)
            self._lifecycle.check_start()
        else:
            self._logs.report(mod, logging.ERROR, "module %s: worker pid %d %s", mod.name, pid, reason)
            self._lifecycle.quarantine(mod, f"worker exited ({reason}); restart = 'never' leaves it so")

    def _crashed(self, mod, what, reason, uptime):
        """``what`` (its worker, or a start of one) failed after ``uptime`` seconds:
        restart after a backoff, or quarantine."""
        if self._lifecycle.starting:
            self._quarantine(mod, what, reason, mod.error or f"worker exited ({reason}) before the module was READY")
            return
        now = time.monotonic()
        delay = mod.policy.on_crash(now, uptime)
        if delay is None:
            self._quarantine(
                mod,
                what,
                reason,
                f"crashed more than {mod.policy.max_restarts} times within {mod.policy.window:g}s; last: {reason}",
            )
            return
        self._logs.report(mod, logging.ERROR, "module %s: %s %s; restarting in %.2fs", mod.name, what, reason, delay)
        mod.restarting()
        self._loop.after(delay, self._respawn, mod)

    def _quarantine(self, mod, what, reason, why):
        # The FAILED line says why it stays down; this one, first, which worker ended and how.
        self._logs.report(mod, logging.ERROR, "module %s: %s %s", mod.name, what, reason)
        self._lifecycle.quarantine(mod, why)

    def _respawn(self, mod):
        # A backoff's timer can outlive what it was for: an operator's restart, say, started
        # a worker meanwhile, or killed one that is still to be reaped.
        if mod.state != RESTARTING or self._lifecycle.stopping or mod.process is not None:
            return
        mod.respawning()
        error = self.launch(mod)
        if error is not None:  # a process that cannot be made (not for want of fds): retried with the backoff
            mod.spawn_failed(error)
            self._crashed(mod, "a restart", f"failed: {error}", 0)  # no uptime: the backoff grows

    def reload(self, mod, reason):
        """Restart ``mod``'s worker now so that it drops changes it applied that are not
        in its saved config and journal (they could not be written): it comes back
        from those. Not a crash: the restart policy does not count it."""
        if mod.process is None or mod.leaving:
            return
        self._logs.report(
            mod, logging.ERROR, "module %s: %s; restarting its worker without the changes", mod.name, reason
        )
        mod.restarting(reason)
        self._workers.kill(mod)  # on_exit respawns it

    def restart(self, name, kill=False):
        """Restart one module now, reviving it if it is quarantined or left STOPPED by its
        restart policy (one an operator stopped is started through admin.py, which lets go
        of the stop first). In order (the default): its worker ends as in a stop, once the requests
        in flight are answered (lifecycle.end_worker), and what comes meanwhile is held for
        the next worker. ``kill``: SIGKILL now, and what it had started fails."""
        mod = self._modules.get(name)
        if mod is None:
            raise ProgrammingError(unknown_module(name, self._modules))
        if self._lifecycle.stopping:
            raise OperationalError(f"cannot restart module {name!r}: the supervisor is stopping")
        mod.policy.reset()
        # on_exit respawns it: a new worker must not take the module's place while the
        # old one's exit is still to be handled.
        if mod.process is None:
            mod.restarting()
            self._respawn(mod)
        elif kill or mod.state == FAILED:  # FAILED: quarantined, its worker killed already
            mod.restarting("restart requested")
            self._workers.kill(mod)
        elif mod.state != RESTARTING:  # else its worker is ending already, and the restart under way follows
            mod.restarting("restart requested: its worker ends once its requests in flight are answered")
            self._lifecycle.end_worker(mod)

    def _stuck(self, mod, now, now_ns):
        """Why ``mod``'s worker must be killed as stuck, or None: its serial lane, or every
        thread of its pool, in one action past hang_timeout; or no answer to a heartbeat."""
        slots = mod.slots
        hang = mod.options["hang_timeout"]
        limit = now_ns - hang * 1e9
        started = slots[P.SLOT_SERIAL_START]
        if started and started < limit:
            return f"its serial lane was stuck in one action for more than hang_timeout={hang:g}s"
        # Counted from the slots alone, not from the requests in flight: a request that
        # timed out is answered and forgotten here while its action still holds its thread.
        # A pool's threads take the first slots, one each; direct reads, the first of theirs.
        pool = mod.pool_size
        if pool is not None and _stuck_in(slots, P.async_slot(0), min(pool, P.ASYNC_SLOTS), limit) >= pool:
            return (
                f"all {pool} threads of its pool were stuck in one @async_action each for more "
                f"than hang_timeout={hang:g}s"
            )
        direct = P.direct_async_limit(pool)
        if _stuck_in(slots, P.direct_slot(0), direct, limit) >= direct:
            return (
                f"all {direct} threads for direct reads of @async_action were stuck in one action each for more "
                f"than hang_timeout={hang:g}s"
            )
        heartbeat = mod.options["heartbeat_timeout"]
        if heartbeat:
            channel = mod.channel
            if channel.pinged_at is not None and now - channel.pinged_at > heartbeat:
                return (
                    f"it did not answer a heartbeat within heartbeat_timeout={heartbeat:g}s "
                    "(stopped with SIGSTOP, or a thread holding the GIL)"
                )
            channel.ping(now)
        return None

    def on_pong(self, mod, _pong):
        mod.channel.pong()

    def watchdog(self):
        """Kill a worker stuck past hang_timeout, or silent past heartbeat_timeout; again every
        tick until the stop. (Requests past action_timeout are the router's: Router.time_out.)"""
        now = time.monotonic()
        now_ns = time.monotonic_ns()
        for mod in self._modules.values():
            if mod.process is None or mod.leaving:
                continue
            stuck = self._stuck(mod, now, now_ns)
            if stuck is not None:
                mod.hung(stuck)
                self._logs.report(mod, logging.ERROR, "module %s: %s; killing the worker", mod.name, stuck)
                self._workers.kill(mod)
        if not self._lifecycle.stopping:
            tick = min(
                min(m.options["hang_timeout"], m.options["heartbeat_timeout"] or 60) for m in self._modules.values()
            )
            self._loop.after(min(1.0, max(0.05, tick / 4)), self.watchdog)
