"""Recovery: a worker's exit, in-flight requests, restarts, quarantine and hangs.

A dead worker is noticed through its sentinel (see loop.py). Replies it sent
before dying still count; of its unanswered requests, those its lanes had
started fail (they may have had effects), the others are held and run after the
restart (see the progress slots in cmactor/protocol.py). The restart policy
(restart.py) decides between a restart after a delay and quarantine.
"""

import logging
import os
import signal
import time

from cmactor import protocol as P
from cmactor.errors import ModuleUnavailable, OperationalError, ProgrammingError

from .modules import FAILED, RESTARTING, STOPPED, STOPPING

log = logging.getLogger("cmactor.supervisor")


def describe_exit(code):
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Recovery:
    """The recovery half of Supervisor (see supervisor.py for the state it works on)."""

    def _on_exit(self, mod):
        process = mod.process
        pid = process.pid
        self._sel.unregister(process.sentinel)
        process.join()  # the sentinel fired: this returns at once
        code = process.exitcode
        process.close()
        self._drain_worker(mod)  # replies it sent before dying still count
        self._close_worker_socket(mod)
        self._kill_group(pid)
        mod.process = None
        mod.psutil = None
        reason = describe_exit(code)
        if mod.error:  # what the worker said before dying (the entry's exception, ...)
            reason = f"{reason} after: {mod.error}"
        mod.last_exit = reason
        # Its lanes wait on nothing any more: drop their edges from the wait-for graph.
        self._waits.pop(mod, None)
        for pending in mod.inflight.values():
            self._waits.pop(pending, None)
        started, waiting = self._split_started(mod)
        for pending in started:
            req = pending.request
            self._fail(
                pending,
                OperationalError,
                f"module {mod.name!r} crashed ({reason}) while handling {req['op']} {mod.name}.{req['table']}; "
                "the request may have taken effect: check before retrying",
            )
        mod.inflight.clear()
        if self._stopping or mod.state in (STOPPING, FAILED):
            for pending in waiting:
                self._fail(pending, ModuleUnavailable, self._unavailable(mod))
        else:
            # Requests it had not started run after the restart, like any held request.
            deadline = time.monotonic() + self.hold_timeout
            for pending in reversed(waiting):
                pending.hold, pending.deadline = self.hold_timeout, deadline
                mod.held.appendleft(pending)
            if waiting:
                self._after(self.hold_timeout, self._expire_held, mod)
        job = self._save_job
        if job is not None and job.current is mod:
            self._on_saved(mod, job.sid, f"the worker died during the save ({reason})", None, 0)
        if self._stopping or mod.state == STOPPING:
            mod.state = STOPPED
            self._continue_stop()
            return
        if mod.state == FAILED:
            return
        if mod.state == RESTARTING:  # an operator asked for this restart
            self._respawn(mod)
            return
        if self._starting:
            self._quarantine(mod, mod.error or f"worker exited ({reason}) before the module was READY")
            return
        uptime = time.monotonic() - mod.started_at
        delay = mod.policy.on_crash(time.monotonic(), uptime)
        if delay is None:
            self._quarantine(
                mod,
                f"crashed more than {mod.policy.max_restarts} times within {mod.policy.window:g}s; last: {reason}",
            )
            return
        log.error("module %s: worker pid %d %s; restarting in %.2fs", mod.name, pid, reason, delay)
        mod.state = RESTARTING
        self._after(delay, self._respawn, mod)

    def _drain_worker(self, mod):
        while mod.sock is not None:
            data = self._recv(mod.sock)
            if not data:
                return
            for message in mod.reader.feed(data):
                self._on_worker_message(mod, message)

    def _split_started(self, mod):
        """Unanswered requests of a dead worker: (started, not started), from its progress slots."""
        slots = mod.slots
        serial_last = slots[P.SLOT_SERIAL_SID]
        running_async = {slots[P.async_slot(i)] for i in range(P.ASYNC_SLOTS)} - {0}
        started, waiting = [], []
        for sid, pending in mod.inflight.items():
            if pending.is_async:
                ran = slots[P.SLOT_OVERFLOW] or sid in running_async
            else:
                ran = sid <= serial_last
            (started if ran else waiting).append(pending)
        return started, waiting

    def _watchdog(self):
        """Fail requests past action_timeout; kill a worker whose serial lane is stuck past hang_timeout."""
        now = time.monotonic()
        now_ns = time.monotonic_ns()
        for mod in self.modules.values():
            limit = mod.options["action_timeout"]
            expired = []
            for sid, pending in mod.inflight.items():  # in dispatch order
                if now - pending.dispatched_at < limit:
                    break
                expired.append(sid)
            for sid in expired:
                pending = mod.inflight.pop(sid)
                req = pending.request
                self._fail(
                    pending,
                    OperationalError,
                    f"{req['op']} {mod.name}.{req['table']} timed out: not done within action_timeout={limit:g}s; "
                    "it may still finish and take effect",
                )
            started = mod.slots[P.SLOT_SERIAL_START] if mod.slots is not None and mod.process is not None else 0
            hang = mod.options["hang_timeout"]
            if started and now_ns - started > hang * 1e9 and mod.state not in (STOPPING, RESTARTING, FAILED):
                mod.error = f"its serial lane was stuck in one action for more than hang_timeout={hang:g}s"
                log.error("module %s: %s; killing the worker", mod.name, mod.error)
                self._kill(mod)
        if not self._stopping:
            tick = min(min(m.options["action_timeout"], m.options["hang_timeout"]) for m in self.modules.values())
            self._after(min(1.0, max(0.05, tick / 4)), self._watchdog)

    def _respawn(self, mod):
        if mod.state != RESTARTING or self._stopping:
            return
        mod.restarts += 1
        self._spawn(mod)

    def _restart(self, name):
        mod = self.modules.get(name)
        if mod is None:
            raise ProgrammingError(f"unknown module {name!r}; this supervisor runs: {', '.join(sorted(self.modules))}")
        mod.policy.reset()
        mod.state = RESTARTING
        if mod.process is None:
            self._respawn(mod)
        else:
            # _on_exit respawns it: a new worker must not take the module's slot
            # while the old one's exit is still to be handled.
            mod.error = "restart requested"
            self._kill(mod)

    def _quarantine(self, mod, reason):
        log.error("module %s FAILED: %s", mod.name, reason)
        mod.state = FAILED
        mod.error = reason
        self._kill(mod)
        self._fail_held(mod)
        self._check_start()

    def _kill(self, mod):
        if mod.process is not None:
            self._kill_group(mod.process.pid)

    @staticmethod
    def _kill_group(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
