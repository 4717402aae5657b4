"""``exos.api`` as cmactor provides it: the calls an EXOS app makes to its process.

``ready``, ``cmbackend_init``, ``CmAgent`` and ``CmContext`` (cmactor.cmbackend),
``exec_cli`` and ``exec_cli_async`` for the config manager's own commands, with
``CLICommandError`` and the ``CLI_EVENT_*`` callback events (cmactor.exos.cli),
``TraceBufferHandler`` (cmactor.exos.trace), ``ExosLogger`` and ``Severity`` for
system-log conditions on stdlib logging (cmactor.exos.logger), and the modules
``cmbackend``, ``exos_dbapi`` (also as ``cmfrontend``), ``dm`` (the state of the
supervisor's processes) and ``tlv`` (type-length-value bytes).
"""

import sys

from cmactor import cmbackend, exos_dbapi
from cmactor.cmbackend import CmAgent, CmContext, async_action, cmbackend_init, ready
from cmactor.exos.api import dm, tlv
from cmactor.exos.cli import CLI_EVENT_EXEC_DONE, CLI_EVENT_EXEC_REPLY, CLICommandError, exec_cli, exec_cli_async
from cmactor.exos.logger import ExosLogger, Severity
from cmactor.exos.trace import TraceBufferHandler

cmfrontend = exos_dbapi

# So that `import cmactor.exos.api.cmbackend` works as `import exos.api.cmbackend` does.
for _name, _module in (("cmbackend", cmbackend), ("exos_dbapi", exos_dbapi), ("cmfrontend", exos_dbapi)):
    sys.modules.setdefault(f"{__name__}.{_name}", _module)

__all__ = [
    "CLI_EVENT_EXEC_DONE",
    "CLI_EVENT_EXEC_REPLY",
    "CLICommandError",
    "CmAgent",
    "CmContext",
    "ExosLogger",
    "Severity",
    "TraceBufferHandler",
    "async_action",
    "cmbackend",
    "cmbackend_init",
    "cmfrontend",
    "dm",
    "exec_cli",
    "exec_cli_async",
    "exos_dbapi",
    "ready",
    "tlv",
]
