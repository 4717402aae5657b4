"""Deadlock detection: the wait-for graph across lanes, checked when a call is admitted.

Nodes are executors that can be blocked waiting for a reply: a module's serial
lane (one action at a time, so a blocked action blocks the whole lane), and each
running @async_action request (it holds one pool thread). Edges come from the
calls agents make to other modules while they run:

- the caller's executor waits for the executor the call needs: the target
  module's serial lane for an ordinary action (or while the module is not READY:
  its load runs there), or the call's own executor for an async action;
- a module WAITING_DEPS waits for the serial lanes of the dependencies it waits on;
- a call to a full pool waits for the busy threads of that pool.

Admitting a call adds the edge caller -> needed executor. If a path already
leads from the needed executor back to the caller, the edge would close a cycle:
every executor on it would wait forever, so the call is refused at once with the
cycle written out. Any call that cannot close a cycle is admitted.
"""

from cmsupervisor import graphs
from cmsupervisor.supervision.modules import Module
from cmsupervisor.supervision.states import READY, WAITING_DEPS


class WaitGraph:
    """Which executors wait on which calls: admit a call, forget it when answered."""

    def __init__(self, modules):
        self._modules = modules
        self._waits = {}  # executor -> the calls (Pending) it waits on

    def refuse_save(self, caller):
        """The refusal text for a save asked for by ``caller`` (an action's [module, lane,
        id]), or None. A save walks every READY module with tables on its serial lane,
        so it waits for each of those lanes: a cycle if the caller is one of them, or
        one of them waits, through other calls, on the caller."""
        issuer = self._issuer(caller)
        if issuer is None:
            return None
        for mod in self._modules.values():
            if not mod.persistent_list or mod.state != READY:
                continue
            path = [mod] if mod is issuer else graphs.find_path(mod, issuer, self._successors)
            if path is not None:
                return (
                    f"a save asked for by {self._node_name(issuer)} would deadlock: {self._describe([issuer, *path])} "
                    f"(the save walks {mod.name!r} on its serial lane); ask from an @async_action or a thread "
                    "of the agent's own, and do not make this lane wait for the save"
                )
        return None

    def _issuer(self, caller):
        """The executor an action's call comes from (a module's serial lane, or a running
        async request), or None when nothing waits on it."""
        if caller is None:
            return None
        module, lane, sid = caller
        caller_mod = self._modules.get(module)
        if caller_mod is None:
            return None
        return caller_mod if lane == "serial" else caller_mod.inflight.get(sid)

    def admit(self, mod, pending):
        """Record an agent's call to ``mod`` in the graph: None, or the refusal text
        (for a DeadlockDetectedError) if the call would close a cycle."""
        req = pending.request
        issuer = self._issuer(req.caller)
        if issuer is None:
            return None  # an unknown module, or an async action no longer running
        cycle = None
        if pending.aim(mod) and mod.accepting:
            # It gets a pool thread of its own, unless every thread is busy: then it
            # waits for one of them, a deadlock only if all of them wait on the caller.
            running = self._running(mod)
            if mod.pool_size is not None and len(running) >= mod.pool_size:
                paths = [graphs.find_path(p, issuer, self._successors) for p in running]
                if all(paths):
                    cycle = (
                        f"{self._describe([issuer, *min(paths, key=len)])} "
                        f"(all {mod.pool_size} threads of {mod.name}'s pool are taken by calls waiting on this one)"
                    )
        else:
            path = graphs.find_path(mod, issuer, self._successors)
            if path is not None:
                cycle = self._describe([issuer, *path])
        if cycle is not None:
            return self._refusal(pending, mod, issuer, cycle)
        pending.issuer = issuer
        self._waits.setdefault(issuer, set()).add(pending)
        return None

    def forget(self, pending):
        """``pending`` was answered: its caller waits on it no more."""
        calls = self._waits.get(pending.issuer)
        if calls is not None:
            calls.discard(pending)
            if not calls:
                del self._waits[pending.issuer]

    def forget_module(self, mod):
        """``mod``'s worker is gone: its lanes and running actions wait on nothing."""
        self._waits.pop(mod, None)
        for pending in mod.inflight.values():
            self._waits.pop(pending, None)

    def refusals_held(self, mod):
        """``mod`` has just started waiting on its config_deps: new edges. A call held
        for it was admitted while it was STARTING and its deps were unknown; if its
        caller is one of the executors ``mod`` now waits on, it can never be served.
        Returns [(pending, refusal text)] for those calls, to refuse now rather than
        hold them until their hold_timeout."""
        refused = []
        for pending in mod.held:
            if pending.issuer is None:
                continue
            path = graphs.find_path(mod, pending.issuer, self._successors)
            if path is not None:
                cycle = self._describe([pending.issuer, *path])
                refused.append((pending, self._refusal(pending, mod, pending.issuer, cycle)))
        return refused

    def _refusal(self, pending, mod, issuer, cycle):
        req = pending.request
        return (
            f"{req.op} {mod.name}.{req.table} called from {self._node_name(issuer)} would deadlock: "
            f"{cycle}; make the calling action an @async_action, or do not call a module that is waiting on this one"
        )

    @staticmethod
    def _running(mod):
        """The async requests of ``mod`` that hold a pool thread: the pool takes its work
        in arrival order, so the oldest ``pool_size`` unanswered ones; the rest queue."""
        busy = [p for p in mod.inflight.values() if p.is_async]
        return busy if mod.pool_size is None else busy[: mod.pool_size]

    def _successors(self, node):
        """The executors ``node`` is waiting for right now."""
        for call in self._waits.get(node, ()):
            target = self._modules[call.request.module]
            yield call if call.is_async and call.sid is not None else target
        if isinstance(node, Module):
            if node.state == WAITING_DEPS:
                for dep in node.config_deps:
                    if self._modules[dep].state != READY:
                        yield self._modules[dep]
        elif node.is_async:
            # A queued async request waits for a thread of its pool to come free.
            running = self._running(self._modules[node.request.module])
            if node not in running:
                yield from running

    def _describe(self, cycle):
        return graphs.describe(cycle, self._node_name)

    @staticmethod
    def _node_name(node):
        if isinstance(node, Module):
            return node.name
        return f"{node.request.module}(async {node.request.table})"
