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
- ``STATUS=...`` when module states change ("3/3 modules READY", "2/3 modules
  READY; vlan RESTARTING"), which ``systemctl status`` shows: at most one line every
  STATUS_INTERVAL seconds. systemd keeps only the last line, and a start of 100
  modules makes some 350 changes in half a second (measured: as many datagrams,
  each a summary of every module); the changes that come within the interval are
  sent as one line, from a timer, made when it fires (the last state wins).
  READY=1 and STOPPING=1 carry the line of their moment, and the supervisor's end
  sends one still due.
- ``EXTEND_TIMEOUT_USEC=...`` every EXTEND_EVERY seconds while the start goes on
  past that long: a long load is then bounded by ``[supervisor] start_timeout``,
  whose failure names the modules late, not cut short by TimeoutStartSec.
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
import time

from cmsupervisor.supervision.states import READY

log = logging.getLogger("cmactor.supervisor")

# Modules not READY that one STATUS line names; past it, "+N more" (systemctl shows one line).
NAMED = 5
# Seconds between two STATUS lines at least: a few a second, which a person reading
# `systemctl status` cannot tell from every change.
STATUS_INTERVAL = 0.25
# Seconds between two EXTEND_TIMEOUT_USEC messages of a start that lasts, the first
# once it has lasted that long; each asks for EXTEND_SLACK such intervals more, so
# that a late timer (a busy loop) is no kill, while a stuck loop, which sends none,
# still is (at TimeoutStartSec, or that long after the last message).
EXTEND_EVERY = 5.0
EXTEND_SLACK = 3


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
        self._starting = True  # until READY=1 (or the stop of a start that failed)
        self._stopping = False
        self._status_timer = None  # the loop timer of a STATUS line due
        self._status_sent_at = None  # monotonic
        self._status_sent = None  # the last STATUS line sent

    def watch(self, loop, modules):
        """Send STATUS as ``modules`` change state, and EXTEND_TIMEOUT_USEC and WATCHDOG=1 from
        ``loop``'s timers. Called before the loop runs (its timers are not thread-safe)."""
        self._loop = loop
        self._modules = modules
        for mod in modules.values():
            self.follow(mod)
        loop.after(EXTEND_EVERY, self._extend)
        if self.watchdog_interval is not None:
            loop.after(0, self._ping)

    def follow(self, mod):
        """Send STATUS as ``mod`` changes state too: one of the watched modules, or one a reload added."""
        mod.subscribe(self._moved)

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
        self._starting = False
        self._status("READY=1")

    def stopping(self):
        self._stopping = True
        self._status("STOPPING=1")

    def close(self):
        """The supervisor's end: the STATUS line still due, now (the loop runs no more timers)."""
        if self._status_timer is not None:
            self._status()

    def _moved(self, mod, before):
        if mod.state == before or self._status_timer is not None:
            return  # a save of it ended (nothing STATUS shows changed), or the timer sends the line
        wait = 0 if self._status_sent_at is None else self._status_sent_at + STATUS_INTERVAL - time.monotonic()
        if wait > 0:
            self._status_timer = self._loop.after(wait, self._status)
        else:
            self._status()

    def _status(self, *others):
        """Send ``others`` with the STATUS line of now, which stands for any that was due."""
        if self._status_timer is not None:
            self._loop.cancel(self._status_timer)
            self._status_timer = None
        line = f"STATUS={self.summary()}"
        if others or line != self._status_sent:  # changes that undid each other: nothing to say
            self._status_sent = line
            self._status_sent_at = time.monotonic()
            self.send(*others, line)

    def _extend(self):
        if self._starting and not self._stopping:
            self.send(f"EXTEND_TIMEOUT_USEC={round(EXTEND_EVERY * EXTEND_SLACK * 1e6)}")
            self._loop.after(EXTEND_EVERY, self._extend)

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
