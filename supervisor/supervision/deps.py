"""The config_deps graph: unknown names, cycles, dependency order, READY gating."""

from cmsupervisor import graphs
from cmsupervisor.supervision.states import ENDED, READY, WAITING_DEPS


def unknown(deps, known):
    """Dependencies that name no module the supervisor runs."""
    return [d for d in deps if d not in known]


def find_cycle(start, deps_of):
    """A dependency cycle through ``start`` as a list of names (first == last), or None.

    ``deps_of`` maps module names to the dependencies they declared so far;
    modules that have not declared yet simply have no edges.
    """
    return graphs.find_cycle(start, lambda name: deps_of.get(name, ()))


def format_cycle(cycle):
    return graphs.describe(cycle)


def not_ready(mod, modules):
    """The dependencies of ``mod`` that are not READY yet, in declared order."""
    return [d for d in mod.config_deps if modules[d].state != READY]


def dependencies_first(modules):
    """Every module, each after the modules it depends on."""
    order, seen = [], set()

    def visit(mod):
        if mod.name in seen:
            return
        seen.add(mod.name)
        for dep in mod.config_deps:
            if dep in modules:
                visit(modules[dep])
        order.append(mod)

    for mod in modules.values():
        visit(mod)
    return order


def settled(mod, modules, seen=()):
    """READY, FAILED or STOPPED, or waiting on a module that ended so (directly or
    further down), which waits forever: a state start() need not wait out."""
    if mod.state == READY or mod.state in ENDED:
        return True
    if mod.state != WAITING_DEPS or mod.name in seen:
        return False
    return any(
        modules[d].state in ENDED or settled(modules[d], modules, (*seen, mod.name)) for d in not_ready(mod, modules)
    )
