"""cmactor: config-manager backend agents in supervised worker processes.

Agent authors use ``cmbackend_init``, ``CmAgent``, ``CmContext``, ``ready`` and
``async_action``; clients use ``connect``; integrators use ``Supervisor``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from cmactor import errors
from cmactor.cmbackend import CmAgent, CmContext, async_action, cmbackend_init, ready
from cmactor.cmfrontend import Connection, Cursor, Row, connect
from cmactor.errors import *  # noqa: F403 - the exception tree, errors.__all__

# Type checkers see Supervisor and __version__ (made by __getattr__ below at run time)
# as what they are, not as whatever __getattr__ returns.
if TYPE_CHECKING:
    from cmsupervisor.supervisor import Supervisor

    __version__: str

# As libraries do: records go where the application's logging config sends them,
# and nowhere (not Python's last-resort stderr handler) when it has none.
logging.getLogger("cmactor").addHandler(logging.NullHandler())

__all__ = [
    "CmAgent",
    "CmContext",
    "Connection",
    "Cursor",
    "Row",
    "Supervisor",  # noqa: F405 - made on first use, by __getattr__ below
    "async_action",
    "cmbackend_init",
    "connect",
    "ready",
    *errors.__all__,
]


def __getattr__(name: str) -> object:
    # Lazy, so that agents and clients importing cmactor never load the supervisor.
    if name == "Supervisor":
        from cmsupervisor.supervisor import Supervisor

        return Supervisor
    # Lazy too: reading the metadata adds most of what `import cmactor` itself takes.
    if name == "__version__":
        from cmactor.version import installed

        version = globals()["__version__"] = installed()
        return version
    raise AttributeError(f"module 'cmactor' has no attribute {name!r}")
