"""The audit log: one JSON line per set, setop and save, with who asked and what came of it."""

import datetime
import json


class AuditLog:
    def __init__(self, path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        self._pending = False

    def record(self, user, op, module, table, params, outcome):
        line = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
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
