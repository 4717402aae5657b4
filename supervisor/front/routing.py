"""Routing: a data request from its client to its module's worker and its answer back.

A request to a module that is READY (and not saving) goes to its worker at once.
One to a module that is starting, loading, saving or restarting is held, up to
its hold time, and sent when the module is READY again. Calls made by agents are
first admitted by the wait-for graph (deadlock.py), which may refuse them.

An answer goes to its client after the journal has the change it acknowledges
(the loop fsyncs touched journals before each turn's output), and sets and
setops are written to the audit log. Each answer is counted in its module's
request figures (stats.py): op, outcome and latency from receipt to answer.

The router holds, sends or fails what is held for a module as the module's state
changes (module_changed, a subscriber of every Module), and times out every request
of the supervisor: one held past its hold (its own timer), one in flight past its
module's action_timeout (time_out, every tick).
"""

from cmactor.errors import (
    DeadlockDetectedError,
    ModuleUnavailable,
    OperationalError,
    ProgrammingError,
    action_timed_out,
    to_wire,
)
from cmactor.wire import protocol as P
from cmsupervisor.supervision.modules import Pending, unknown_module
from cmsupervisor.supervision.states import FAILED, READY, STOPPED, STOPPING, WAITING_DEPS

_CHANGES = ("set", "setop")


class Router:
    def __init__(self, modules, loop, graph, audit, hold_timeout):
        self._modules = modules
        self._loop = loop
        self._graph = graph
        self._audit = audit
        self.hold_timeout = hold_timeout
        # Data requests naming a module this supervisor does not run: a client's typo, or one
        # configured for another supervisor. No module's figures have them (status, /metrics).
        self.unknown_module_requests = 0
        self._closed = False  # the supervisor is stopping: nothing is held or sent any more
        self._unsynced = []  # (mod, pending, entries): journaled this turn, answered once fsynced
        self._unjournaled = {}  # mod -> the OSError its journal raised this turn
        self._answered = []  # (request, error type or None, seconds): figures for after the output
        self.on_journal_failure = None  # fn(mod, reason): its worker must drop changes it applied
        self.on_journal_full = None  # fn(mod): its journal passed its bound, to be compacted
        self._idle_waits = {}  # mod -> (fn, args) to call once it has nothing in flight (when_idle)
        # Under [ha], the node's ha.replica.Replica: a write is refused on a standby, answered
        # from its token when it was applied already, and acknowledged once etcd has it.
        self.replica = None

    # -- in -------------------------------------------------------------

    def route(self, client, request):
        if self.replica is not None and request.op in _CHANGES and self.replica.intercept(client, request):
            return
        name = request.module
        mod = self._modules.get(name)
        pending = Pending(client, request.id, request, self._loop.now)
        if mod is None:
            self.unknown_module_requests += 1
            self.fail(pending, ProgrammingError, unknown_module(name, self._modules))
            return
        if request.caller is not None:
            refusal = self._graph.admit(mod, pending)
            if refusal is not None:
                self.fail(pending, DeadlockDetectedError, refusal)
                return
        if mod.accepting and not self._closed:
            self._dispatch(mod, pending)
            return
        hold = request.hold
        explicit = hold is not None
        hold = self.hold_timeout if hold is None else hold
        if self._closed or mod.gone or hold == 0 or (mod.state == FAILED and not explicit):
            self.fail(pending, ModuleUnavailable, self.unavailable(mod))
            return
        self._hold(mod, [pending], hold)

    def _dispatch(self, mod, pending):
        req = pending.request
        pending.dispatched_at = self._loop.now
        if mod.async_actions:  # counted against the pool by the deadlock detector
            pending.aim(mod)
        flags = P.F_NOTIFY if req.notify else 0
        sid = pending.sid = mod.channel.request(
            req.op,
            req.table,
            req.params,
            req.vr,
            flags,
            req.batch,
            req.after,
            req.index,
            req.match,
            req.method,
            pending.is_async,
        )
        mod.inflight[sid] = pending

    # -- holding ----------------------------------------------------------

    def _hold(self, mod, requests, hold, front=False):
        """Hold ``requests`` for ``mod``, each on a timer of its own that a release or its
        client's leaving cancels: the timer is all that would keep it in memory."""
        after = self._loop.after
        for pending in requests:
            pending.hold = hold
            pending.timer = after(hold, self._expire_held, mod, pending)
        if front:
            mod.held.prepend(requests)
        else:
            mod.held.extend(requests)

    def module_changed(self, mod, _before):
        """(Subscribed to every Module.) ``mod`` changed state, or ended a save: send, fail or
        refuse what is held for it as its state now says."""
        state = mod.state
        if state == READY:
            self.release_held(mod)
        elif state == FAILED or state == STOPPED:
            self.fail_held(mod)
        elif state == WAITING_DEPS:
            self.refuse_held_cycles(mod)
        if self._idle_waits:  # a save of it ended, or its worker did (the wait is then dropped)
            self.drained(mod)

    def when_idle(self, mod, fn, *args):
        """Call ``fn(*args)`` once ``mod`` has no request in flight and no save walks it (now,
        if so): how a module's worker is ended in order (lifecycle.end_worker). What comes
        for it meanwhile is held or refused as its state says, never sent."""
        self._idle_waits[mod] = (fn, args)
        self.drained(mod)

    def drained(self, mod):
        """``mod`` may have nothing in flight now: call what waits for that (when_idle)."""
        if mod.inflight or mod.saving:
            return
        wait = self._idle_waits.pop(mod, None)
        if wait is not None:
            wait[0](*wait[1])

    def hold_again(self, mod, requests):
        """Requests a dead worker had not started: first in line once it is back."""
        if requests:
            self._hold(mod, requests, self.hold_timeout, front=True)

    def _expire_held(self, mod, pending):
        """The hold of ``pending`` is over: fail it."""
        mod.held.remove(pending)
        pending.timer = None
        self.fail(pending, ModuleUnavailable, f"{self.unavailable(mod)} (held {pending.hold:g}s, the hold_timeout)")

    def time_out(self):
        """Fail each request in flight past its module's action_timeout (dispatch order is
        oldest first); then look again, every fraction of the shortest one, until the stop."""
        now = self._loop.now
        for mod in self._modules.values():
            inflight = mod.inflight
            limit = mod.options["action_timeout"]
            expired = []
            for sid, pending in inflight.items():
                if now - pending.dispatched_at < limit:
                    break
                expired.append(sid)
            for sid in expired:
                pending = inflight.pop(sid)
                req = pending.request
                self.fail(pending, OperationalError, action_timed_out(req.op, mod.name, req.table, limit))
            if expired and self._idle_waits:
                self.drained(mod)
        if not self._closed:
            tick = min(m.options["action_timeout"] for m in self._modules.values())
            self._loop.after(min(1.0, max(0.05, tick / 4)), self.time_out)

    def _unhold_one(self, mod, pending):
        mod.held.remove(pending)
        self._loop.cancel(pending.timer)
        pending.timer = None

    def _unhold(self, mod):
        """Every request held for ``mod``, oldest first, taken out with its timer cancelled."""
        cancel = self._loop.cancel
        requests = mod.held.take_all()
        for pending in requests:
            cancel(pending.timer)
            pending.timer = None
        return requests

    def release_held(self, mod):
        """``mod`` may accept requests again: send what was held for it, oldest first.
        Nothing goes to a worker that is gone: its requests wait for the next one."""
        if not (mod.accepting and mod.channel.open):
            return
        for pending in self._unhold(mod):
            if pending.client.closed:
                self._graph.forget(pending)  # nobody waits for it any more
            else:
                self._dispatch(mod, pending)

    def fail_held(self, mod):
        for pending in self._unhold(mod):
            self.fail(pending, ModuleUnavailable, self.unavailable(mod))

    def forget_client(self, client):
        """``client`` is gone: what is held for it is dropped at once, never sent to a worker;
        what its module's worker has not started yet is cancelled there (the worker answers
        each so, to nobody)."""
        for mod in self._modules.values():
            for pending in mod.held:
                if pending.client is client:
                    self._unhold_one(mod, pending)
                    self._graph.forget(pending)
            if mod.inflight and mod.channel.open:
                sids = [sid for sid, pending in mod.inflight.items() if pending.client is client]
                if sids:
                    mod.channel.cancel(sids)

    def refuse_held_cycles(self, mod):
        """``mod`` now waits on its config_deps: refuse held calls that can never be served."""
        for pending, refusal in self._graph.refusals_held(mod):
            self._unhold_one(mod, pending)
            self.fail(pending, DeadlockDetectedError, refusal)

    def close(self):
        """The supervisor is stopping: fail every held request and hold nothing more."""
        self._closed = True
        for mod in self._modules.values():
            self.fail_held(mod)

    def unavailable(self, mod):
        """Why requests to ``mod`` are not being served."""
        name = mod.name
        if mod.stays_stopped and not self._closed:  # an operator stopped it, or a reload removed it
            return f"module {name!r} is {mod.state}: {mod.error}"
        if self._closed or mod.state == STOPPING:
            return f"module {name!r} is unavailable: the supervisor is stopping"
        if mod.state == STOPPED:  # outside a stop: its worker ended and was left so
            return (
                f"module {name!r} is STOPPED: its worker ended ({mod.last_exit}) and restart = "
                f"{mod.options['restart']!r} leaves it so; start it again with `cmactor restart {name}`"
            )
        if mod.state == FAILED:
            return f"module {name!r} is quarantined (FAILED): {mod.error}; revive it with `cmactor restart {name}`"
        if mod.state == READY and mod.saving:
            return f"module {name!r} is not READY (saving)"
        detail = f", waiting on {mod.waiting_on!r}" if mod.state == WAITING_DEPS and mod.waiting_on else ""
        return f"module {name!r} is not READY (state {mod.state}{detail})"

    # -- out --------------------------------------------------------------

    def on_reply(self, mod, reply):
        """A worker's Reply: journal the change it acknowledges, then answer the client."""
        sid = reply.sid
        mod.channel.answered(sid)
        pending = mod.inflight.pop(sid, None)
        if pending is None:
            return  # answered already (timed out)
        if self._idle_waits:  # the worker may be ended once it is answered
            self.drained(mod)
        if reply.error is None and (
            reply.dirty or (self.replica is not None and self.replica.journals_forced(pending))
        ):
            mod.mark_unsaved()
            req = pending.request
            if req.op in _CHANGES and req.table in mod.persistent_list:
                self._journal(mod, pending, reply.entries)
                return
        self.answer(pending, reply.error, reply.entries)

    def on_dirty(self, mod, _dirty):
        """A read the worker served directly said it changed the config (ctx.dirty)."""
        mod.mark_unsaved()

    def _journal(self, mod, pending, entries):
        """Append an acknowledged change to its module's journal; the answer waits for
        the journal's fsync, at the end of the turn (_sync_journals)."""
        key = None if self.replica is None else self.replica.key_for(mod, pending)
        if mod not in self._unjournaled:
            req = pending.request
            try:
                mod.journal.append(req.op, req.table, req.params, pending.sid, pending.is_async, key)
            except OSError as exc:
                self._unjournaled[mod] = exc
        self._unsynced.append((mod, pending, entries, key))
        self._loop.before_output(self._sync_journals)

    def on_notify(self, mod, notify):
        pending = mod.inflight.get(notify.sid)
        if pending is not None:
            pending.client.notify({"id": pending.rid, "notify": notify.text})

    def answer(self, pending, error=None, entries=None):
        """Send a request's final reply: the worker's ``entries`` (protocol.reply_entries), or
        ``error`` (a wire error map)."""
        if error is None:
            pending.client.answer_frame(P.reply_frame(pending.rid, entries))
        else:
            pending.client.answer({"id": pending.rid, "ok": False, "error": error})
        if pending.issuer is not None:
            self._graph.forget(pending)
        req = pending.request
        if self.replica is not None and req.token is not None:
            self.replica.settled(req.token, error, entries)
        # Its figure after the turn's output: the reply leaves first (work before a send
        # is round-trip time, perf/README.md), timed to the turn the answer came in.
        if not self._answered:
            self._loop.after_output(self._record_answers)
        self._answered.append((req, None if error is None else error["type"], self._loop.now - pending.received_at))
        op = req.op
        if op in _CHANGES:
            outcome = "ok" if error is None else f"{error['type']}: {error['message']}"
            client = pending.client
            self._audit.record(
                req.user,
                client.peer_uid,
                client.peer_pid,
                op,
                req.module,
                req.table,
                req.params,
                outcome,
            )

    def _record_answers(self):
        """After the turn's output: the figures of the requests answered in it."""
        answered, self._answered = self._answered, []
        modules = self._modules
        for req, error_type, seconds in answered:
            mod = modules.get(req.module)
            if mod is not None:  # else it named no module of ours: nobody's figure
                mod.request_stats[req.op].record(error_type, seconds)

    def fail(self, pending, exc_type, message):
        self.answer(pending, to_wire(exc_type, message))

    def _sync_journals(self):
        """Before the turn's output: fsync each journal appended to (one fsync for all its
        records of the turn), then answer what it made durable. A journal that cannot
        be written loses the turn's records and fails their requests, and its module's
        worker, which applied those changes, is restarted without them."""
        if not self._unsynced:
            return
        waiting, self._unsynced = self._unsynced, []
        broken, self._unjournaled = self._unjournaled, {}
        for mod in dict.fromkeys(mod for mod, *_ in waiting):
            if mod not in broken:
                try:
                    mod.journal.sync()
                except OSError as exc:
                    broken[mod] = exc
        for mod in broken:
            mod.journal.rollback()
        self._loop.tick()  # the fsyncs are part of these answers' time
        durable = []
        for item in waiting:
            mod, pending = item[0], item[1]
            exc = broken.get(mod)
            if exc is None:
                durable.append(item)
                continue
            req = pending.request
            self.fail(
                pending,
                OperationalError,
                f"{req.op} {mod.name}.{req.table} was not committed: its journal {mod.journal.path} "
                f"could not be written ({exc}); the module is restarted without the change; "
                "free the disk and send it again",
            )
        if self.replica is None:
            for _mod, pending, entries, _key in durable:
                self.answer(pending, None, entries)
        else:  # answered once etcd has them too
            self.replica.commit(durable, self.answer, self.answer)
        for mod, exc in broken.items():
            self.on_journal_failure(mod, f"its journal could not be written ({exc})")
        for mod in dict.fromkeys(mod for mod, *_ in waiting):
            if mod not in broken and mod.journal.full:
                self.on_journal_full(mod)
