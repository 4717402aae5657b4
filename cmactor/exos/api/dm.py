"""``exos.api.dm``: the state of the processes around this one, answered by the supervisor.

On a switch EXOS's process manager knows every process; here a process is a module
of the supervisor this worker runs under, and its state is the module's state in
``cmactor status``: one of the names below (READY serves requests; FAILED is
quarantined until an operator restarts it; STOPPED has ended and stays so).

Every call asks the supervisor at ``socket`` (default ``$CMACTOR_SOCKET``, set inside
workers, else ``.cmactor/run/cm.sock``) over a connection of its own:

- a name the supervisor does not run raises ``UnknownProcessError``, which names it
  and the modules it runs (so a typo is never taken for a process that is down);
- a supervisor that cannot be reached, or that does not answer within
  ``REPLY_TIMEOUT`` seconds, raises ``OperationalError`` naming its socket.
"""

import math
import time
from collections import namedtuple

from cmactor import cmfrontend
from cmactor.errors import ProgrammingError

# A module's states, as the supervisor names them (cmsupervisor's supervision/states.py).
STARTING = "STARTING"
WAITING_DEPS = "WAITING_DEPS"
LOADING = "LOADING"
READY = "READY"
RESTARTING = "RESTARTING"
FAILED = "FAILED"
STOPPING = "STOPPING"
STOPPED = "STOPPED"

# Seconds to wait for the supervisor's answer to one question.
REPLY_TIMEOUT = 10.0

# Between two questions of wait_until_ready(): the first pause, doubling to the longest.
_FIRST_PAUSE = 0.02
_LONGEST_PAUSE = 0.2

ProcessInfo = namedtuple("ProcessInfo", "name state pid restarts uptime last_exit error")
ProcessInfo.__doc__ = """A process as the supervisor sees it: its ``state``, its worker's ``pid``
(None without one), its ``restarts``, its ``uptime`` in seconds (None when not running),
how its last worker ended (``last_exit``) and why it is FAILED (``error``), or None."""


class UnknownProcessError(ProgrammingError, LookupError):
    """A process name the supervisor does not run; the text lists the ones it does."""


def get_process_state(name, *, socket=None):
    """The state of the process ``name``: READY, LOADING, FAILED, STOPPED, ..."""
    return get_process_info(name, socket=socket).state


def is_process_ready(name, *, socket=None):
    """Whether the process ``name`` is READY now."""
    return get_process_state(name, socket=socket) == READY


def get_process_info(name, *, socket=None):
    """The process ``name`` as a ProcessInfo."""
    _check_name(name)
    with _connection(socket) as conn:
        return _info(conn, name)


def get_processes(*, socket=None):
    """Every process of the supervisor: {name: ProcessInfo}, by name."""
    with _connection(socket) as conn:
        status = conn.request({"op": "status"})["status"]
    return {name: _from_status(name, status[name]) for name in sorted(status)}


def wait_until_ready(name, timeout, *, socket=None):
    """Ask until the process ``name`` is READY, for at most ``timeout`` seconds; whether
    it is. A process that is FAILED or STOPPED may still be restarted meanwhile (by its
    restart policy or an operator), so those states are waited through too."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0 or math.isinf(timeout):
        raise ValueError(
            f"wait_until_ready({name!r}): timeout must be a finite number of seconds >= 0, got {timeout!r}"
        )
    _check_name(name)
    deadline = time.monotonic() + timeout
    pause = _FIRST_PAUSE
    with _connection(socket) as conn:
        while _info(conn, name).state != READY:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, _LONGEST_PAUSE)
    return True


def _connection(socket):
    return cmfrontend.connect(socket=socket, timeout=REPLY_TIMEOUT)


def _check_name(name):
    if not isinstance(name, str):
        raise TypeError(f"a process name is a str, got {type(name).__name__} {name!r}")


def _info(conn, name):
    try:
        status = conn.request({"op": "status", "module": name})["status"]
    except ProgrammingError as exc:  # what a status of one module raises: no module has that name
        raise UnknownProcessError(f"no process {name!r}: {exc}") from None
    return _from_status(name, status[name])


def _from_status(name, entry):
    return ProcessInfo(
        name, entry["state"], entry["pid"], entry["restarts"], entry["uptime"], entry["last_exit"], entry["error"]
    )
