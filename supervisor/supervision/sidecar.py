"""A sidecar: a helper process the supervisor runs beside its modules that is not an
agent (the RESTCONF server, ``cmactor restconf``, a client of the supervisor's socket).

The supervisor starts it once it serves its socket and its modules have come up, and
it lives on the loop thread as the workers do: its exit is seen the moment it happens
(a pidfd watched by the loop, no polling), its output is read in the loop.

    STOPPED ──start──▶ STARTING ──its ready line──▶ RUNNING
    STARTING/RUNNING ──exit──▶ RESTARTING ──backoff──▶ STARTING
    STARTING ──exit, start_retries times in a row──▶ FAILED (until the supervisor starts again)
    any ──the supervisor stops──▶ STOPPED (SIGTERM, SIGKILL past stop_timeout)

Giving up is supervisord's startretries/FATAL: only a process that keeps ending before
it serves (its port taken, its certificate unreadable) is left FAILED, since another
try cannot mend that. One that served and then crashed is always started again, after
a delay that doubles from restart_delay up to restart_delay_max and is reset once a
process has served stable_after seconds: a crash loop costs one start per
restart_delay_max at most, never a spinning CPU, and a client that can crash the
server cannot make it stay down.

Its stdout and stderr are a pipe read here: each line goes to the supervisor's log
(``cmactor.supervisor``: stderr and state_dir/logs/_supervisor.log), at the level the
line names when it is a logging record. ``ready`` (a regular expression with a ``url``
group) is the line that says it serves; each of ``facts`` (name -> a regular
expression with one group) is kept from the lines for status (a TLS fingerprint).

The process runs in a session of its own (a Ctrl-C at the terminal is the
supervisor's to handle) and is told, through ``CMACTOR_PARENT_PID``, to ask the kernel
for SIGTERM should the supervisor die without stopping it (PR_SET_PDEATHSIG).
"""

import logging
import os
import re
import signal
import subprocess
import time

from cmsupervisor.supervision.workers import DRAIN_MAX, Output, describe_exit, kill_group

log = logging.getLogger("cmactor.supervisor")

STARTING = "STARTING"
RUNNING = "RUNNING"
RESTARTING = "RESTARTING"
FAILED = "FAILED"
STOPPED = "STOPPED"

# A logging record as `cmactor` writes it (observability/logs.py FORMAT): its level is kept.
_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([A-Z]+) +(.*)\Z", re.S)


class Sidecar:
    """One helper process, kept running (see the module's docstring). Every method runs on
    the loop thread (status() too: Supervisor.restconf_status asks it there)."""

    def __init__(self, name, argv, *, url, ready, facts=None, options, stop_timeout, start_timeout):
        self.name = name
        self.argv = list(argv)
        self.env = dict(os.environ)
        self.env["CMACTOR_PARENT_PID"] = str(os.getpid())
        self.url = url  # where it is configured to serve, until its ready line says where it does
        self._ready = ready
        self._facts = dict(facts or {})
        self.facts = dict.fromkeys(self._facts)
        self.base_delay = options["restart_delay"]
        self.max_delay = options["restart_delay_max"]
        self.stable_after = options["stable_after"]
        self.start_retries = options["start_retries"]
        self.stop_timeout = stop_timeout
        self.start_timeout = start_timeout
        self.state = STOPPED
        self.restarts = 0
        self.last_exit = None
        self.error = None  # why it is FAILED
        self._loop = None
        self._proc = None
        self._pidfd = None
        self._out = None  # the read end of its stdout and stderr
        self._lines = Output(None, None)  # what was read of it, cut into lines
        self._serving_at = None  # ... of its ready line
        self._failed_starts = 0  # starts in a row that ended before serving
        self._next_delay = self.base_delay
        self._timer = None
        self._stopping = False
        self._stop_deadline = None

    @property
    def pid(self):
        return None if self._proc is None else self._proc.pid

    def status(self):
        """{"state", "pid", "restarts", "url", "last_exit", "error", and each fact}."""
        return {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "url": self.url,
            "last_exit": self.last_exit,
            "error": self.error,
            **self.facts,
        }

    # -- up ----------------------------------------------------------------

    def start(self, loop):
        """Start the process, once the supervisor serves its socket."""
        self._loop = loop
        self._spawn()

    def _spawn(self):
        self._timer = None
        if self._stopping:
            return
        read_end, write_end = os.pipe()
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=write_end,
                env=self.env,
                start_new_session=True,
            )
            self._pidfd = os.pidfd_open(self._proc.pid)
        except OSError as exc:
            os.close(read_end)
            if self._proc is not None:  # started, but it cannot be watched: it must not run unseen
                self._proc.kill()
                self._proc.wait()
                self._proc = None
            self.state = STARTING
            self._serving_at = None
            self._ended(f"could not be started: {type(exc).__name__}: {exc}", None)
            return
        finally:
            os.close(write_end)
        os.set_blocking(read_end, False)
        self._out = read_end
        self._lines = Output(None, None)
        self._serving_at = None
        self.state = STARTING
        self.error = None
        self._loop.watch(self._pidfd, self._on_exit, None)
        self._loop.watch(read_end, self._on_output, None)
        self._timer = self._loop.after(self.start_timeout, self._start_late, self._proc)
        log.info("%s: started, pid %d: %s", self.name, self._proc.pid, " ".join(self.argv))

    def _start_late(self, proc):
        self._timer = None
        if proc is self._proc and self.state == STARTING:
            log.error("%s: pid %d did not serve within %gs; killing it", self.name, proc.pid, self.start_timeout)
            kill_group(proc.pid, leader=True)

    # -- its output -----------------------------------------------------------

    def _on_output(self, _arg, limit=None):
        """What it wrote: one read, or (``limit``) all it wrote, up to ``limit`` bytes."""
        taken = 0
        while self._out is not None:
            try:
                data = os.read(self._out, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                for line in self._lines.rest():
                    self._line(line)
                self._close_output()
                return
            for line in self._lines.lines(data):
                self._line(line)
            taken += len(data)
            if limit is None or taken >= limit:
                return

    def _line(self, text):
        text = text.rstrip("\r")
        if not text:
            return
        level = logging.INFO
        record = _RECORD.match(text)
        if record is not None:
            level = logging.getLevelName(record[1])
            level = level if isinstance(level, int) else logging.INFO
            text = record[2]
        prefix = f"cmactor {self.name}: "  # what the command says of itself: the log line names it already
        log.log(level, "%s: %s", self.name, text[len(prefix) :] if text.startswith(prefix) else text)
        for name, pattern in self._facts.items():
            found = pattern.search(text)
            if found:
                self.facts[name] = found[1]
        ready = self._ready.search(text)
        if ready and self.state == STARTING:
            self.url = ready["url"]
            self.state = RUNNING
            self._serving_at = time.monotonic()
            self._failed_starts = 0

    def _close_output(self):
        if self._out is not None:
            self._loop.unwatch(self._out)
            os.close(self._out)
            self._out = None

    # -- its end ------------------------------------------------------------

    def _on_exit(self, _arg):
        proc = self._proc
        self._loop.unwatch(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        code = proc.wait()
        self._on_output(None, DRAIN_MAX)  # its last words
        self._close_output()
        kill_group(proc.pid)  # what it started goes with it (reaped: not the pid itself)
        self._proc = None
        if self._timer is not None:
            self._loop.cancel(self._timer)
            self._timer = None
        self._ended(describe_exit(code), proc.pid)

    def _ended(self, reason, pid):
        self.last_exit = reason
        if self._stopping:
            self.state = STOPPED
            log.info("%s: pid %s ended (%s) in the stop", self.name, pid, reason)
            return
        now = time.monotonic()
        if self._serving_at is None:  # it never served
            self._failed_starts += 1
            if self._failed_starts > self.start_retries:
                self.state = FAILED
                self.error = (
                    f"ended before serving {self._failed_starts} times in a row; last: {reason}; "
                    "fix the cause and start the supervisor again"
                )
                log.error("%s: %s", self.name, self.error)
                return
        elif now - self._serving_at >= self.stable_after:
            self._next_delay = self.base_delay
        delay = self._next_delay
        self._next_delay = min(delay * 2, self.max_delay)
        self.state = RESTARTING
        log.error("%s: pid %s %s; starting it again in %.2fs", self.name, pid, reason, delay)
        self._timer = self._loop.after(delay, self._respawn)

    def _respawn(self):
        self._timer = None
        if self._stopping or self.state != RESTARTING:
            return
        self.restarts += 1
        self._spawn()

    # -- down ---------------------------------------------------------------

    def begin_stop(self):
        """The supervisor stops: SIGTERM now, nothing started again."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_deadline = time.monotonic() + self.stop_timeout
        if self._timer is not None:
            self._loop.cancel(self._timer)
            self._timer = None
        if self._proc is not None:
            log.info("%s: stopping pid %d", self.name, self._proc.pid)
            try:
                self._proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        elif self.state != FAILED:
            self.state = STOPPED

    def kill(self):
        """The loop died: SIGKILL at once."""
        self._stopping = True
        if self._proc is not None:
            kill_group(self._proc.pid, leader=True)

    def close(self):
        """(The loop's last turn.) Wait for the process until stop_timeout after the SIGTERM,
        SIGKILL it past that; nothing is left behind."""
        self.begin_stop()
        proc = self._proc
        if proc is None:
            return
        deadline = self._stop_deadline or time.monotonic()  # none after kill(): it is dying already
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s: pid %d did not stop within %gs; killing it", self.name, proc.pid, self.stop_timeout)
            kill_group(proc.pid, leader=True)
            proc.wait()
        self._on_exit(None)
