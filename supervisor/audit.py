"""The audit log: one JSON line per set, setop and save, with who asked and what came of it."""

import json
import time


class AuditLog:
    """Lines are kept as they come and written once per loop turn, after the turn's
    replies have gone out: formatting JSON is not work a client should wait for."""

    def __init__(self, path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        self._pending = []  # (time.time(), user, op, module, table, params, outcome)
        self._second = None
        self._stamp = ""

    def _format_time(self, now):
        """UTC time to the millisecond, ISO 8601; the date part is formatted once a second."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}+00:00"

    def record(self, user, op, module, table, params, outcome):
        self._pending.append((time.time(), user, op, module, table, params, outcome))

    def flush(self):
        """Once per loop turn: one write for all the lines of that turn."""
        if not self._pending:
            return
        lines = []
        for now, user, op, module, table, params, outcome in self._pending:
            line = {
                "time": self._format_time(now),
                "user": user,
                "op": op,
                "module": module,
                "table": table,
                "params": params,
                "outcome": outcome,
            }
            lines.append(json.dumps(line, ensure_ascii=False) + "\n")
        self._pending.clear()
        self._file.write("".join(lines))
        self._file.flush()

    def close(self):
        self.flush()
        self._file.close()
