"""The config_deps graph: unknown names and cycles."""


def unknown(deps, known):
    """Dependencies that name no module the supervisor runs."""
    return [d for d in deps if d not in known]


def find_cycle(start, deps_of):
    """A dependency cycle through ``start`` as a list of names (first == last), or None.

    ``deps_of`` maps module names to the dependencies they declared so far;
    modules that have not declared yet simply have no edges.
    """
    path = [start]
    on_path = {start}
    done = set()

    def visit(name):
        for dep in deps_of.get(name, ()):
            if dep == start:
                return path + [start]
            if dep in on_path or dep in done:
                continue
            path.append(dep)
            on_path.add(dep)
            found = visit(dep)
            if found:
                return found
            on_path.discard(path.pop())
            done.add(dep)
        return None

    return visit(start)


def format_cycle(cycle):
    return " → ".join(cycle)

