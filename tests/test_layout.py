"""The house's rules, read from the source: who may import whom.

- no import cycles among cmactor's and cmsupervisor's modules (lazy imports inside
  functions count: a cycle through one is still a cycle a reader has to untangle);
- cmactor never imports cmsupervisor, but for the lazy ``cmactor.Supervisor``;
- ``cmactor.errors`` imports nothing (every process loads it first);
- nothing imports a top-level ``supervisor`` or ``exos`` package (PyPI projects own those names).
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name -> directory in the checkout
PACKAGES = {"cmactor": "cmactor", "cmsupervisor": "supervisor"}


def modules():
    """{dotted module name: path} of every source file of both packages."""
    found = {}
    for package, directory in PACKAGES.items():
        base = os.path.join(ROOT, directory)
        for folder, _, files in os.walk(base):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), base)[: -len(".py")].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    found[".".join([package, *rel])] = os.path.join(folder, name)
    return found


def imported(path, known):
    """The known modules ``path`` imports, anywhere in it; and the top-level names it imports."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    targets, tops = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from a.b import c": the module a.b.c when it is one, else a.b (running a
            # package's __init__ on the way to a submodule is not counted as an import)
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if name in known else node.module for name in names]
        else:
            continue
        for name in names:
            tops.add(name.split(".")[0])
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
    return targets, tops


def graph():
    known = modules()
    edges, tops = {}, {}
    for name, path in known.items():
        edges[name], tops[name] = imported(path, known)
        edges[name].discard(name)
    return edges, tops


def cycles(edges):
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_there_are_no_import_cycles():
    edges, _ = graph()
    assert cycles(edges) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_cmactor_imports_cmsupervisor_only_for_the_lazy_supervisor():
    edges, _ = graph()
    reaching = {name: sorted(t for t in targets if t.startswith("cmsupervisor")) for name, targets in edges.items()}
    assert {name: t for name, t in reaching.items() if name.startswith("cmactor") and t} == {
        "cmactor": ["cmsupervisor.supervisor"]
    }


def test_errors_import_nothing():
    _, tops = graph()
    assert tops["cmactor.errors"] <= {"__future__", "typing", "collections"}  # annotations only, for type checkers


def test_no_module_imports_a_top_level_supervisor_or_exos():
    _, tops = graph()
    assert {name for name, names in tops.items() if names & {"supervisor", "exos"}} == set()
