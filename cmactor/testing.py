"""A pytest plugin for agent authors: a supervisor per test, in its tmp_path, and helpers.

Installing cmactor registers it (the ``pytest11`` entry point); nothing to add to a
conftest. ``import cmactor`` never imports this module, so pytest stays a test-time
dependency.

``cmactor_supervisor(agents, **options)`` (a fixture) starts a Supervisor for a dict
of agents, or for a cmactor.toml, with its state_dir and socket under ``tmp_path``,
returns it once every module is READY, and stops it at teardown, passed or failed.
``get_row``, ``set_row``, ``setop``, ``get_rows`` make one request and return plain
dicts; ``kill_worker`` SIGKILLs a module's worker and waits for the new one.

``cmactor_agent`` (a fixture) is an ``AgentHarness`` (cmactor.harness) for unit tests
of an agent's actions in the test's own process: ``cmactor_agent.start(main)``, then
events and actions called directly, ``ready()`` recorded instead of refused.
"""

import contextlib
import itertools
import os
import signal
import time

import pytest

import cmactor
from cmactor.harness import AgentHarness

__all__ = ["AgentHarness", "get_row", "get_rows", "kill_worker", "set_row", "setop"]


@pytest.fixture
def cmactor_agent():
    """An AgentHarness attached for the test (cmbackend_init and ready() go to it), detached after."""
    with AgentHarness() as harness:
        yield harness


@pytest.fixture
def cmactor_supervisor(request, tmp_path):
    """Factory: ``cmactor_supervisor(agents, **options)`` -> a started Supervisor.

    ``agents``: a dict of module name -> entry or agent options, as ``Supervisor``
    takes, or the path of a cmactor.toml. Relative paths (the toml's, and a dict's
    entries unless ``base_dir=`` is given) are relative to the test file's directory.
    ``options``: ``Supervisor`` keywords; ``state_dir`` defaults to a new directory
    under ``tmp_path`` (pass a previous supervisor's ``state_dir`` to start again on
    its saved config), ``socket`` to one inside it. Each supervisor made is stopped at
    teardown, the last made first, however the test ended.
    """
    here = request.path.parent
    numbers = itertools.count()
    with contextlib.ExitStack() as stack:

        def make(agents, /, **options):
            __tracebackhide__ = True  # the failure shows at the test's call, not in here
            options.setdefault("state_dir", tmp_path / f"cmactor-{next(numbers)}")
            # A socket named by the toml would be shared by every test that uses it.
            options.setdefault("socket", None)
            if isinstance(agents, str | os.PathLike):
                sup = cmactor.Supervisor.from_toml(_toml_path(here, agents, options), **options)
            else:
                options.setdefault("base_dir", here)
                sup = cmactor.Supervisor(agents, **options)
            stack.callback(sup.stop)
            try:
                return sup.start()
            except cmactor.StartupError as exc:
                exc.add_note("cmactor_supervisor: the agents' tracebacks and log records are in the captured log")
                raise

        yield make


def _toml_path(here, path, options):
    path = here / path
    if not path.is_file():
        raise FileNotFoundError(
            f"cmactor_supervisor: no config file {path} (a relative path is taken from the test "
            "file's directory); pass the path of a cmactor.toml, or a dict of agents"
        )
    if "base_dir" in options:
        raise TypeError(
            f"cmactor_supervisor: base_dir is for a dict of agents; the paths in {path} "
            "are relative to its own directory"
        )
    return path


# -- requests -----------------------------------------------------------------


def get_row(target, table, /, **params):
    """``get MODULE.TABLE`` with ``params``: the row as a dict (values are strings).

    ``target``: a Supervisor (a connection is opened for the call) or a Connection.
    An error the agent raises comes as the client's ``DatabaseError``;
    LookupError if the agent replied with no row.
    """
    rows = _execute(target, "get", table, params)
    if not rows:
        raise LookupError(f"get {table} {_shown(params)}: the agent replied with no row (ctx.fields left empty)")
    return rows[0]


def set_row(target, table, /, **params):
    """``set MODULE.TABLE`` with ``params``: the row the agent replied with ({} if none)."""
    rows = _execute(target, "set", table, params)
    return rows[0] if rows else {}


def setop(target, table, /, **params):
    """``setop MODULE.TABLE`` with ``params``: the fields the agent replied with ({} if none)."""
    rows = _execute(target, "setop", table, params)
    return rows[0] if rows else {}


def get_rows(target, table, /, **params):
    """A ``getnext`` walk of MODULE.TABLE from ``params``: every row, as a list of dicts."""
    return _execute(target, "getnext", table, params)


def _execute(target, op, table, params):
    if not isinstance(table, str) or table.count(".") != 1 or " " in table:
        raise ValueError(f"{op}: expected a table as 'MODULE.TABLE', e.g. 'vlan.vlan', got {table!r}")
    if hasattr(target, "cursor"):  # a Connection the test opened itself (its username, timeout)
        return _rows(target.cursor().execute(f"{op} {table}", params))
    with target.connect() as conn:
        return _rows(conn.cursor().execute(f"{op} {table}", params))


def _rows(cursor):
    return [row.field_values for row in cursor.iterrow()]


def _shown(params):
    return " ".join(f"{key}={value}" for key, value in params.items()) or "(no params)"


# -- crashes -----------------------------------------------------------------

# States a module stays in until someone restarts it: waiting longer is pointless.
_SETTLED = ("FAILED", "STOPPED")


def kill_worker(sup, module, timeout=30):
    """SIGKILL ``module``'s worker, wait until a new one is READY; return its pid.

    Raises ModuleUnavailable naming the module's state if it is not READY again
    within ``timeout`` seconds, at once if it settles FAILED or STOPPED.
    """
    __tracebackhide__ = True
    status = _module_status(sup, module)
    old = status["pid"]
    if old is None:
        raise _unavailable(
            sup, module, f"has no worker to kill ({_described(status)}); wait until it is READY, or restart() it"
        )
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        status = _module_status(sup, module)
        if status["state"] == "READY" and status["pid"] not in (None, old):
            return status["pid"]
        if status["state"] in _SETTLED:
            raise _unavailable(
                sup, module, f"will not come back after SIGKILL of its worker (pid {old}): {_described(status)}"
            )
        if time.monotonic() >= deadline:
            raise _unavailable(
                sup,
                module,
                f"is not READY within {timeout:g}s after SIGKILL of its worker (pid {old}): {_described(status)}; "
                "pass a longer timeout= if it only needs more time",
            )
        time.sleep(0.02)


def _unavailable(sup, module, text):
    exc = cmactor.ModuleUnavailable(f"kill_worker: module {module!r} {text}; its log records are in the captured log")
    exc.module_name, exc.socket_path = module, sup.socket_path  # so that exc.when_ready() works
    return exc


def _module_status(sup, module):
    statuses = sup.status()
    if module not in statuses:
        runs = ", ".join(sorted(statuses))
        raise cmactor.ProgrammingError(f"unknown module {module!r}; this supervisor runs: {runs}")
    return statuses[module]


def _described(status):
    parts = [f"state {status['state']}"]
    for key in ("error", "last_exit", "waiting_on"):
        if status.get(key):
            parts.append(f"{key}: {status[key]}")
    return ", ".join(parts)
