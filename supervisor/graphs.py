"""Paths and cycles in a directed graph given by a successors function.

Shared by the two graphs the supervisor checks: config_deps between modules
(deps.py) and the wait-for graph between executors (deadlock.py).
"""


def find_path(start, goal, successors):
    """Nodes from ``start`` to ``goal`` along ``successors`` (both ends included), or None."""
    if start == goal:
        return [start]
    parents = {start: None}
    stack = [start]
    while stack:
        node = stack.pop()
        for nxt in successors(node):
            if nxt in parents:
                continue
            parents[nxt] = node
            if nxt == goal:
                path = [nxt]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return path[::-1]
            stack.append(nxt)
    return None


def find_cycle(start, successors):
    """A cycle through ``start`` as its nodes, first == last, or None."""
    for nxt in successors(start):
        path = find_path(nxt, start, successors)
        if path is not None:
            return [start, *path]
    return None


def describe(cycle, name=str):
    """``alpha → beta → alpha``: a cycle's nodes (the last one closing it) by ``name(node)``."""
    return " → ".join(name(node) for node in cycle)
