"""One exception tree for clients, agents and the supervisor.

The client-facing part follows PEP 249; errors cross the wire as
``{"type": <class name>, "message": <text>}`` (a NotActive adds ``"active"``) and
are rebuilt on the other side with :func:`from_wire`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

# The exception tree, which the cmactor package re-exports; the wire helpers below
# are for cmactor's own sides.
__all__ = [
    "ConfigError",
    "DataError",
    "DatabaseError",
    "DeadlockDetectedError",
    "Error",
    "IntegrityError",
    "InterfaceError",
    "InternalError",
    "ModuleUnavailable",
    "NotActive",
    "NotSupportedError",
    "OperationalError",
    "ProgrammingError",
    "StartupError",
    "Warning",
]


class Warning(Exception):  # noqa: A001 - PEP 249 requires this exact name
    """Important warnings (PEP 249)."""


class Error(Exception):
    """Base class of every error a cmactor client raises (PEP 249)."""


class InterfaceError(Error):
    """A problem with the client interface itself (bad use of a cursor, closed connection)."""


class DatabaseError(Error):
    """An error reported by the runtime or by an agent (raise_error, an escaped exception)."""


class DataError(DatabaseError):
    """A value that cannot be represented (e.g. an agent replied with a non-string field name)."""


class OperationalError(DatabaseError):
    """The runtime could not carry out the request (connection lost, module crashed, timeout)."""


class IntegrityError(DatabaseError):
    """Consistency of the config would be broken."""


class InternalError(DatabaseError):
    """The runtime hit a state it should never be in."""


class ProgrammingError(DatabaseError):
    """The request is wrong: unknown module, table or op, malformed operation or params."""


class NotSupportedError(DatabaseError):
    """The operation is not supported by this runtime."""


class ModuleUnavailable(OperationalError):
    """The module is quarantined (FAILED), stopping, or was not READY within the hold time.

    ``module_name`` is the module the request was for (None if unknown);
    ``when_ready()`` waits for it, as exos_dbapi callers do before a retry.
    """

    socket_path: str | None = None  # the supervisor the request went to, where when_ready() asks
    # How when_ready() asks: the client's wait_until_ready(socket_path, module, timeout),
    # which cmfrontend installs here as it is imported (always, with the cmactor
    # package). This module imports nothing, so that every process loads it first.
    wait_until_ready: Callable[[str | None, str | None, float], bool] | None = None

    def __init__(self, message: object = "", module_name: str | None = None) -> None:
        super().__init__(message)
        # ModuleUnavailable("vlanmgr"), as the original is raised: the message is the name.
        if module_name is None and isinstance(message, str) and message.isidentifier():
            module_name = message
        self.module_name: str | None = module_name

    def when_ready(self, callback: Callable[[], object] | None = None, timeout: float = 5) -> bool:
        """Wait for ``module_name``'s next state change (READY, or any state other than
        the one it is in now) or ``timeout`` seconds, then call ``callback()`` if given;
        True if it is READY. As on the platform it does not promise READY: callers
        retry in a loop.

        A module that stays FAILED, or a supervisor that cannot be reached, makes this
        wait out the timeout; it never waits longer.
        """
        ready = ModuleUnavailable.wait_until_ready(self.socket_path, self.module_name, timeout)
        if callback is not None:
            callback()
        return ready


class DeadlockDetectedError(OperationalError):
    """Admitting the request would close a cycle of lanes waiting on each other."""


class NotActive(OperationalError):
    """This supervisor is a standby of a hot-standby cluster: it answers reads from its
    copy, and refuses what would change the config (set, setop, save).

    ``active`` is the node name of the cluster's active supervisor, None if it is not
    known (a takeover under way). A client given several sockets finds the active and
    sends the request there itself; with one socket, send it to the active's.
    """

    def __init__(self, message: object = "", active: str | None = None) -> None:
        super().__init__(message)
        self.active: str | None = active


class ConfigError(ValueError):
    """The supervisor's configuration (TOML file or embedding arguments) is invalid.

    ``problems``: each error found, one line each (a config file is checked whole, and
    its message names them all); a single error for what is checked one at a time."""

    problems: tuple[str, ...] = ()


class StartupError(RuntimeError):
    """``Supervisor.start()`` gave up; ``reasons`` maps each module that is not READY to why."""

    def __init__(self, message: str, reasons: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.reasons: dict[str, str] = dict(reasons or {})


WIRE_ERRORS = {
    cls.__name__: cls
    for cls in (
        Error,
        InterfaceError,
        DatabaseError,
        DataError,
        OperationalError,
        IntegrityError,
        InternalError,
        ProgrammingError,
        NotSupportedError,
        ModuleUnavailable,
        DeadlockDetectedError,
        NotActive,
    )
}


def action_timed_out(op, module, table, limit):
    """The OperationalError text for a request not answered within action_timeout."""
    return (
        f"{op} {module}.{table} timed out: not done within action_timeout={limit:g}s; "
        "it may still finish and take effect"
    )


def to_wire(exc_type, message):
    """The wire form of an error: a plain map, never a pickled exception."""
    return {"type": exc_type.__name__, "message": str(message)}


def not_active_wire(message, active):
    """The wire form of a NotActive: to_wire's map and ``active``, the active's node name (None: not known)."""
    return {"type": "NotActive", "message": str(message), "active": active}


def from_wire(error):
    """Rebuild the exception a wire error names; unknown names become DatabaseError."""
    cls = WIRE_ERRORS.get(error.get("type"), DatabaseError)
    if cls is NotActive:
        active = error.get("active")
        return NotActive(error.get("message", "unknown error"), active if type(active) is str else None)
    return cls(error.get("message", "unknown error"))
