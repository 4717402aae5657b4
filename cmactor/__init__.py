"""cmactor: config-manager backend agents in supervised worker processes.

Agent authors use ``cmbackend_init``, ``CmAgent``, ``CmContext``, ``ready`` and
``async_action``; clients use ``connect``; integrators use ``Supervisor``.
"""

from .cmbackend import CmAgent, CmContext, async_action, cmbackend_init, ready
from .cmfrontend import Connection, Cursor, Row, connect
from .errors import (
    ConfigError,
    DatabaseError,
    DataError,
    DeadlockDetectedError,
    Error,
    IntegrityError,
    InterfaceError,
    InternalError,
    ModuleUnavailable,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
    StartupError,
    Warning,
)

__all__ = [
    "CmAgent",
    "CmContext",
    "ConfigError",
    "Connection",
    "Cursor",
    "DataError",
    "DatabaseError",
    "DeadlockDetectedError",
    "Error",
    "IntegrityError",
    "InterfaceError",
    "InternalError",
    "ModuleUnavailable",
    "NotSupportedError",
    "OperationalError",
    "ProgrammingError",
    "Row",
    "StartupError",
    "Supervisor",
    "Warning",
    "async_action",
    "cmbackend_init",
    "connect",
    "ready",
]


def __getattr__(name):
    # Lazy, so that agents and clients importing cmactor never load the supervisor.
    if name == "Supervisor":
        from cmsupervisor.supervisor import Supervisor

        return Supervisor
    raise AttributeError(f"module 'cmactor' has no attribute {name!r}")
