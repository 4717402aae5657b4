"""systemd's notification protocol (sd_notify), for ``cmactor run`` in a Type=notify unit.

systemd gives the service ``NOTIFY_SOCKET``, the AF_UNIX datagram socket it
listens on (a path, or ``@name`` for an abstract socket), and with WatchdogSec=
also ``WATCHDOG_USEC``. Each message is one datagram of newline-separated
assignments. The supervisor sends:

- ``READY=1`` when start() returns. With ``--strict`` every module is READY then;
  without it, the modules that could come up are, and STATUS names the others.
  That is what systemd means by a started unit, and waiting for a FAILED module
  instead would have systemd kill the whole service at TimeoutStartSec (and
  restart it), taking down the modules that do serve.
- ``STATUS=...`` on every module state change ("3/3 modules READY", "2/3 modules
  READY; vlan RESTARTING"), which ``systemctl status`` shows.
- ``STOPPING=1`` when a stop begins (SIGTERM, ``cmactor stop``, ...).
- ``WATCHDOG=1`` every WATCHDOG_USEC/2, from a timer on the supervisor's event
  loop: a loop that is stuck stops the pings, and systemd restarts the service.

Written with the standard library alone (no python-systemd or sdnotify): the
protocol is that small. A socket that cannot be reached is one log line (again
only after it has worked in between), never fatal: the supervisor goes on
serving without telling systemd.
"""

import logging
import os
import socket

from cmsupervisor.supervision.states import READY

log = logging.getLogger("cmactor.supervisor")

# Modules not READY that one STATUS line names; past it, "+N more" (systemctl shows one line).
NAMED = 5


def from_environment(environ=os.environ):
    """A Notifier for ``$NOTIFY_SOCKET``, or None when it is unset or unusable.

    NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID are taken out of ``environ``
    (as sd_notify's unset_environment does): workers inherit the environment,
    and an agent that notified systemd itself would speak for the whole service.
    """
    path = environ.pop("NOTIFY_SOCKET", None)
    usec = environ.pop("WATCHDOG_USEC", None)
    watchdog_pid = environ.pop("WATCHDOG_PID", None)
    if not path:
        return None
    if path.startswith("@"):
        address = "\0" + path[1:]  # Linux's abstract namespace
    elif path.startswith("/"):
        address = path
    else:
        log.error(
            "NOTIFY_SOCKET=%r is neither an absolute path nor an abstract socket (@name); not notifying systemd", path
        )
        return None
    return Notifier(path, address, _watchdog_interval(usec, watchdog_pid))


def _watchdog_interval(usec, watchdog_pid):
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC, as sd_watchdog_enabled
    advises), or None: no watchdog, or one meant for another process."""
    if usec is None or (watchdog_pid is not None and watchdog_pid != str(os.getpid())):
        return None
    value = int(usec) if usec.isascii() and usec.isdigit() else 0
    if value <= 0:
        log.error("WATCHDOG_USEC=%r is not a number of microseconds > 0; not sending watchdog pings", usec)
        return None
    return value / 2e6


class Notifier:
    def __init__(self, name, address, watchdog_interval=None):
        self.name = name  # NOTIFY_SOCKET as given, for log lines
        self._address = address
        self.watchdog_interval = watchdog_interval
        self._loop = None
        self._modules = {}
        self._failing = False
        self._stopping = False

    def watch(self, loop, modules):
        """Send STATUS on each state change of ``modules``, and WATCHDOG=1 from ``loop``'s timers.
        Called before the loop runs (its timers are not thread-safe)."""
        self._loop = loop
        self._modules = modules
        for mod in modules.values():
            mod.subscribe(self._moved)
        if self.watchdog_interval is not None:
            loop.after(0, self._ping)

    def summary(self):
        """One line for STATUS: how many modules are READY, and the state of the others."""
        others = [f"{mod.name} {mod.state}" for mod in self._modules.values() if mod.state != READY]
        line = f"{len(self._modules) - len(others)}/{len(self._modules)} modules READY"
        if self._stopping:
            line = f"stopping: {line}"
        if len(others) > NAMED:
            others[NAMED:] = [f"+{len(others) - NAMED} more"]
        return f"{line}; {', '.join(others)}" if others else line

    # On the loop thread:

    def ready(self):
        self.send("READY=1", f"STATUS={self.summary()}")

    def stopping(self):
        self._stopping = True
        self.send("STOPPING=1", f"STATUS={self.summary()}")

    def _moved(self, mod, before):
        if mod.state != before:  # else a save of it ended: nothing STATUS shows changed
            self.send(f"STATUS={self.summary()}")

    def _ping(self):
        self.send("WATCHDOG=1")
        self._loop.after(self.watchdog_interval, self._ping)

    def send(self, *assignments):
        """One datagram; a failure is logged, once until a send works again."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)  # systemd's queue full: drop this line rather than stall the loop
                sock.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:
            if not self._failing:
                log.error(
                    "cannot notify systemd through NOTIFY_SOCKET=%s: %s; serving on without telling it "
                    "(readiness, status, watchdog pings)",
                    self.name,
                    exc,
                )
            self._failing = True
            return
        if self._failing:
            log.info("notifying systemd through NOTIFY_SOCKET=%s again", self.name)
            self._failing = False
