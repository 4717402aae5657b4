"""The audit log: one JSON line per set, setop and save, with who asked and what came of it."""

import json
import time


class AuditLog:
    def __init__(self, path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        self._pending = False
        self._second = None
        self._stamp = ""

    def _now(self):
        """UTC time to the millisecond, ISO 8601; the date part is formatted once a second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}+00:00"

    def record(self, user, op, module, table, params, outcome):
        line = {
            "time": self._now(),
            "user": user,
            "op": op,
            "module": module,
            "table": table,
            "params": params,
            "outcome": outcome,
        }
        self._file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._pending = True

    def flush(self):
        """Once per loop turn: one write for all the lines of that turn."""
        if self._pending:
            self._file.flush()
            self._pending = False

    def close(self):
        self._file.close()
