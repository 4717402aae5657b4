"""Per-module log files, and the size-rotated file that they and the audit log write to.

Each module's log, ``state_dir/logs/<module>.log``, holds its worker's log records
(sent over the worker's channel, protocol.Log) and every line the worker, or a
process it started, writes to stdout or stderr (fds 1 and 2 are the worker's end of
an output socket pair, which workers.py reads in the loop). Only the supervisor
writes the file, so it can rotate it: past ``log_max_bytes`` it is renamed
``<module>.log.1`` (``.1`` becomes ``.2``, ..., ``log_backups`` old files kept),
between lines. The files are owner-only (0600 in a 0700
directory): agents log config values.

What arrives in a loop turn is written once the turn's replies have gone out, one
write per module. A write that fails (a full disk) never stops the supervisor: the
lines are dropped, counted in ``failures`` (supervisor_status), and logged once per
module.

The supervisor's own log, ``state_dir/logs/_supervisor.log`` (SUPERVISOR_LOG), holds
the records of the ``cmactor.supervisor`` logger, rotated and owner-only as the
modules' logs are: what the supervisor says of itself and of every module, in one
place, also when it does not run under systemd (whose journal gets stderr). It is
written as records come, from any thread: they are few (state changes, faults), not a
module's chatter. It holds what the process's logging lets through: ``cmactor run``
sets that to ``log_level``. The logger is the process's, so a program running several
supervisors has each one's lines in all their files.
"""

import contextlib
import logging
import os
import time

from cmactor.errors import StartupError

# Imported for what it registers: the names of EXOS's own levels (NOTICE, DEBUG_VERBOSE,
# DEBUG_DATA), which a worker's ExosLogger records carry as bare numbers.
from cmactor.exos import logger as _exos_levels  # noqa: F401
from cmsupervisor.observability import SUPERVISOR_LOG
from cmsupervisor.persistence import store

log = logging.getLogger("cmactor.supervisor")

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"  # as `cmactor run` writes to stderr


class RotatingFile:
    """An append-only, owner-only file of lines, rotated by size: when a write would take
    it past ``max_bytes``, the lines that fit go in, then it is renamed ``path.1``
    (``path.1`` to ``path.2`` and so on, the oldest past ``backups`` dropped) and a new
    one takes the rest. A line is never split: one longer than ``max_bytes`` gets a file
    of its own. ``backups`` 0 starts the file over empty; ``max_bytes`` 0 never rotates.
    Opened by open() or the first write; a write that fails raises OSError, and the next
    one tries again."""

    def __init__(self, path, max_bytes, backups):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd = None
        self._size = 0

    def open(self):
        if self._fd is None:
            self._fd = store.owner_only(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            self._size = os.fstat(self._fd).st_size

    def write(self, data):
        """Append ``data``, whole lines (bytes)."""
        self.open()
        while self.max_bytes and self._size + len(data) > self.max_bytes:
            room = max(0, self.max_bytes - self._size)
            fits = data.rfind(b"\n", 0, room) + 1  # the whole lines that fit
            if not fits and not self._size:
                fits = data.find(b"\n") + 1 or len(data)  # a line longer than the bound
            self._append(data[:fits])
            data = data[fits:]
            if not data:
                return
            self._rotate()
        self._append(data)

    def _append(self, data):
        while data:
            written = os.write(self._fd, data)
            self._size += written
            data = data[written:]

    def _rotate(self):
        # Renames first: if one fails, the file stays as it was and open.
        if self.backups:
            for n in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{n}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{n + 1}")
        # Removed by hand meanwhile (we wrote to the unlinked file): nothing to keep of it.
        with contextlib.suppress(FileNotFoundError):
            if self.backups:
                os.replace(self.path, f"{self.path}.1")
            else:
                os.unlink(self.path)
        self.close()
        self.open()

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _stamp(now):
    """Local time as the logging module writes it: 2024-05-01 12:00:00,123."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"


class SupervisorLog(logging.Handler):
    """The handler writing the supervisor's own log (see the module's docstring). A line
    that cannot be written is dropped and counted (``failures``, in status with the
    modules' own), never logged: logging it would come back here."""

    def __init__(self, path, max_bytes, backups):
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))
        self._file = RotatingFile(path, max_bytes, backups)
        self._writing = False
        self.failures = 0
        self.last_error = None

    def emit(self, record):
        # A record logged by the write itself (store.owner_only's warning of a file others
        # may read) arrives here again under the handler's RLock: stderr has it, this file not.
        if self._file is None or self._writing:
            return
        self._writing = True
        try:
            self._file.write((self.format(record) + "\n").encode("utf-8", "backslashreplace"))
        except OSError as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._writing = False

    def close(self):
        with self.lock:  # not while a record is written on another thread
            if self._file is not None:
                self._file.close()
                self._file = None  # a record still on its way is dropped, not a file opened again
        super().close()


class ModuleLogs:
    """The log file of every module, on the loop thread; flush() at the end of a turn that
    brought lines (``schedule``, the loop's after_output, is asked for it)."""

    def __init__(self, log_dir, names, max_bytes, backups):
        self.dir = log_dir
        self._files = {name: RotatingFile(self.path(name), max_bytes, backups) for name in names}
        self._rotation = (max_bytes, backups)  # of a module a reload adds
        self.own = SupervisorLog(os.path.join(log_dir, SUPERVISOR_LOG), max_bytes, backups)
        self.failures = 0  # lines that could not be written
        self.last_error = None
        self._warned = set()  # modules whose failure was logged
        self._pending = {}  # module name -> texts to write at the end of the turn
        self.schedule = None

    def path(self, name):
        return os.path.join(self.dir, f"{name}.log")

    def check(self):
        """At start: make the directory, every module's file and the supervisor's own, or raise
        StartupError naming the path; a supervisor must not serve while its logs go nowhere."""
        try:
            store.private_dir(self.dir)
        except FileExistsError:
            raise StartupError(
                f"log directory {self.dir} cannot be made: a file is in the way; remove or rename it "
                "(each module's log is kept there)"
            ) from None
        except OSError as exc:
            raise StartupError(f"log directory {self.dir} cannot be made: {store.reason(exc, self._fix())}") from None
        for path in [self.path(name) for name in self._files] + [os.path.join(self.dir, SUPERVISOR_LOG)]:
            try:
                os.close(store.owner_only(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT))
            except OSError as exc:
                raise StartupError(f"log file {path} cannot be written: {store.reason(exc, self._fix())}") from None

    def add(self, name):
        """A module a reload added: its file, made now, or StartupError naming it as at start."""
        path = self.path(name)
        try:
            os.close(store.owner_only(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT))
        except OSError as exc:
            raise StartupError(f"log file {path} cannot be written: {store.reason(exc, self._fix())}") from None
        self._files[name] = RotatingFile(path, *self._rotation)

    def remove(self, name):
        """A module a reload removed, its worker gone: what is still to be written of it is
        written (its last lines), then its file is closed."""
        texts = self._pending.pop(name, None)
        if texts:
            self._write(name, "".join(texts).encode("utf-8", "backslashreplace"))
        self._files.pop(name).close()

    def attach(self):
        """Write the supervisor's own log from now on, until close()."""
        log.addHandler(self.own)

    def _fix(self):
        return f"make {self.dir} a directory that uid {os.geteuid()} can write, or choose another state_dir"

    def _texts(self, name):
        if not self._pending and self.schedule is not None:
            self.schedule(self.flush)  # the turn's first lines
        return self._pending.setdefault(name, [])

    def record(self, mod, level, logger, text):
        """A log record of the module's worker."""
        self._texts(mod.name).append(f"{_stamp(time.time())} {logging.getLevelName(level):<7} {logger}: {text}\n")

    def report(self, mod, level, message, *args):
        """What the supervisor says of a module (it started, crashed, failed to start, ...):
        logged on the supervisor's logger and written in the module's own log, where an
        operator reading it looks first."""
        log.log(level, message, *args)
        text = message % args if args else message
        self._texts(mod.name).append(f"{_stamp(time.time())} {logging.getLevelName(level):<7} {log.name}: {text}\n")

    def output(self, mod, lines):
        """Lines the module's worker (or a process it started) wrote to stdout or stderr."""
        stamp = _stamp(time.time())
        self._texts(mod.name).append("".join(f"{stamp} OUTPUT  {line}\n" for line in lines))

    def flush(self):
        """After the turn's output: what the turn brought, one write per module."""
        pending, self._pending = self._pending, {}
        for name, texts in pending.items():
            self._write(name, "".join(texts).encode("utf-8", "backslashreplace"))

    def _write(self, name, data):
        try:
            self._files[name].write(data)
        except OSError as exc:
            self.failures += data.count(b"\n")
            self.last_error = f"{type(exc).__name__}: {exc}"
            if name not in self._warned:  # once: a full disk would otherwise log at the rate the agent does
                self._warned.add(name)
                log.error(
                    "module %s: its log %s cannot be written (%s); its lines are dropped and counted in status",
                    name,
                    self.path(name),
                    self.last_error,
                )

    def status(self):
        """For supervisor_status: where the logs are, and the lines that could not be written
        (the supervisor's own log's too)."""
        return {
            "log_dir": self.dir,
            "log_failures": self.failures + self.own.failures,
            "log_error": self.last_error or self.own.last_error,
        }

    def close(self):
        log.removeHandler(self.own)
        self.own.close()
        self.flush()
        for file in self._files.values():
            file.close()
