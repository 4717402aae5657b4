"""The audit log: one JSON line per set, setop and save, with who asked and what came of it.

"Who" is both the user name the client gave to ``connect()`` (its claim) and the
uid and pid the kernel reports for its socket (SO_PEERCRED: the truth). The file
is owner-only (rotated files too): lines carry config values, which may be secrets.
It rotates by size as the module logs do (logs.RotatingFile: ``log_max_bytes``,
``log_backups``), between lines.
"""

import json
import logging
import time

from cmsupervisor.observability.logs import RotatingFile

log = logging.getLogger("cmactor.supervisor")

# A write that fails (a full disk) is logged at most this often, with a count.
WARN_EVERY = 60.0


class AuditLog:
    """Lines are kept as they come and written once per loop turn, after the turn's
    replies have gone out: formatting JSON is not work a client should wait for.
    A line that cannot be written is dropped and counted (``failures``), never
    allowed to stop the supervisor."""

    def __init__(self, path, max_bytes=0, backups=0):
        self.path = path
        self._file = RotatingFile(path, max_bytes, backups)
        self._file.open()  # at start: a supervisor whose audit log cannot be opened does not start
        self._pending = []  # (time.time(), user, uid, pid, op, module, table, params, outcome)
        self._second = None
        self._stamp = ""
        self.failures = 0  # lines that could not be written
        self.last_error = None
        self._warned_at = None
        self._unwarned = 0
        self.schedule = None  # the loop's after_output: flush() once a turn has lines

    def _format_time(self, now):
        """UTC time to the millisecond, ISO 8601; the date part is formatted once a second."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}+00:00"

    def record(self, user, uid, pid, op, module, table, params, outcome):
        if not self._pending and self.schedule is not None:
            self.schedule(self.flush)  # the turn's first line
        self._pending.append((time.time(), user, uid, pid, op, module, table, params, outcome))

    def flush(self):
        """At the end of a turn: one write for all the lines of that turn."""
        if not self._pending:
            return
        lines = []
        unwritable = 0
        for now, user, uid, pid, op, module, table, params, outcome in self._pending:
            line = {
                "time": self._format_time(now),
                "user": user,
                "uid": uid,
                "pid": pid,
                "op": op,
                "module": module,
                "table": table,
                "params": params,
                "outcome": outcome,
            }
            try:
                lines.append(json.dumps(line, ensure_ascii=False) + "\n")
            except (TypeError, ValueError) as exc:  # requests are checked first: a bug, dropped alone
                unwritable += 1
                error = exc
        self._pending.clear()
        if unwritable:
            self._failed(unwritable, error)
        data = "".join(lines).encode()
        try:
            self._file.write(data)
        except OSError as exc:
            self._failed(len(lines), exc)

    def _failed(self, count, exc):
        self.failures += count
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._unwarned += count
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY:
            log.error(
                "audit log %s: %d lines could not be written (%s); dropped, and counted in status",
                self.path,
                self._unwarned,
                self.last_error,
            )
            self._warned_at = now
            self._unwarned = 0

    def close(self):
        self.flush()
        self._file.close()
