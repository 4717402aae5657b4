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
