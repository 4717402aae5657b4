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

from cmactor.errors import DeadlockDetectedError

from .modules import READY, WAITING_DEPS, Module


def find_path(start, goal, successors):
    """Nodes from ``start`` to ``goal`` along ``successors`` (both ends included), or None."""
    if start is goal:
        return [start]
    parents = {start: None}
    stack = [start]
    while stack:
        node = stack.pop()
        for nxt in successors(node):
            if nxt in parents:
                continue
            parents[nxt] = node
            if nxt is goal:
                path = [nxt]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return path[::-1]
            stack.append(nxt)
    return None


def describe(cycle, name):
    """``alpha → beta → alpha``: the cycle's nodes by ``name(node)``, closed."""
    names = [name(node) for node in cycle]
    return " → ".join(names + [names[0]])


class DeadlockDetection:
    """The wait-for graph half of Supervisor: admitting agents' calls."""

    def _admit(self, mod, pending):
        """Record an agent's call in the wait-for graph, or refuse it if it closes a cycle."""
        req = pending.request
        module, lane, sid = req["caller"]
        caller_mod = self.modules.get(module)
        if caller_mod is None:
            return True
        issuer = caller_mod if lane == "serial" else caller_mod.inflight.get(sid)
        if issuer is None:
            return True  # an async action that is no longer running: nothing waits on it
        pending.is_async = (req["table"], req["op"]) in mod.async_ops
        cycle = None
        if pending.is_async and mod.state == READY and not mod.saving:
            # It gets a pool thread of its own, unless every thread is busy: then it
            # waits for one of them, a deadlock only if all of them wait on the caller.
            busy = [p for p in mod.inflight.values() if p.is_async]
            if mod.pool_size is not None and len(busy) >= mod.pool_size:
                paths = [find_path(p, issuer, self._successors) for p in busy]
                if all(paths):
                    cycle = f"{describe([issuer] + min(paths, key=len)[:-1], self._node_name)} " f"(all {mod.pool_size} threads of {mod.name}'s pool are taken by calls waiting on this one)"
        else:
            path = find_path(mod, issuer, self._successors)
            if path is not None:
                cycle = describe([issuer] + path[:-1], self._node_name)
        if cycle is not None:
            self._refuse(pending, mod, issuer, cycle)
            return False
        pending.issuer = issuer
        self._waits.setdefault(issuer, set()).add(pending)
        return True

    def _refuse_held_cycles(self, mod):
        """``mod`` has just started waiting on its config_deps: new edges. A call held
        for it was admitted while it was STARTING and its deps were unknown; if the
        caller is one of the executors ``mod`` now waits on, that call can never be
        served. Refuse it now rather than hold it until its hold_timeout."""
        for pending in list(mod.held):
            if pending.issuer is None:
                continue
            path = find_path(mod, pending.issuer, self._successors)
            if path is not None:
                mod.held.remove(pending)
                self._refuse(pending, mod, pending.issuer, describe([pending.issuer] + path[:-1], self._node_name))

    def _refuse(self, pending, mod, issuer, cycle):
        req = pending.request
        self._fail(
            pending,
            DeadlockDetectedError,
            f"{req['op']} {mod.name}.{req['table']} called from {self._node_name(issuer)} would deadlock: "
            f"{cycle}; make the calling action an @async_action, or do not call a module that is waiting on this one",
        )

    def _successors(self, node):
        """The executors ``node`` is waiting for right now."""
        for call in self._waits.get(node, ()):
            target = self.modules[call.request["module"]]
            yield call if call.is_async and call.sid is not None else target
        if isinstance(node, Module) and node.state == WAITING_DEPS:
            for dep in node.config_deps:
                if self.modules[dep].state != READY:
                    yield self.modules[dep]

    @staticmethod
    def _node_name(node):
        if isinstance(node, Module):
            return node.name
        return f"{node.request['module']}(async {node.request['table']})"
