"""Per-module journal of the config changes acknowledged since the last save.

A crash must lose no committed config: each set or setop that succeeded with
``ctx.dirty`` on a persistent table is appended here before its reply leaves the
supervisor, and a restarted agent is loaded with the saved rows followed by the
journal. A save folds the journal into the config file and truncates it.

One file per module, ``state_dir/journal/<module>.jsonl``, one record a line:
``<crc32 of the JSON, 8 hex digits> <JSON [op, table, params]>``. The loop
appends records during a turn and fsyncs each touched journal once at the end
of the turn, before that turn's replies are sent: concurrent requests share one
fsync. A last line torn by a crash mid-write fails its checksum (or has no
newline) and is dropped, never replayed half.
"""

import json
import logging
import os
import zlib

log = logging.getLogger("cmactor.supervisor")


class Journal:
    def __init__(self, path):
        self.path = path
        self.records = []  # [op, table, params], in the order they were acknowledged
        self._file = None
        self._pending = False

    def open(self, recover):
        """Open for appending. With ``recover`` the records on disk are kept (and
        returned for replay); without, they are unsaved changes a fresh start
        discards, and the file is kept aside as ``.old`` for an operator."""
        if recover:
            self.records = read(self.path)
        elif os.path.exists(self.path) and os.path.getsize(self.path):
            count = len(read(self.path))
            os.replace(self.path, self.path + ".old")
            log.warning(
                "%s: %d unsaved changes discarded by a fresh start (kept as %s.old; `cmactor run --recover` replays them)",
                self.path,
                count,
                self.path,
            )
        self._file = open(self.path, "ab")
        return self.records

    def append(self, op, table, params):
        self._file.write(_encode(op, table, params))
        self.records.append([op, table, params])
        self._pending = True

    def sync(self):
        """Make every appended record durable."""
        if self._pending:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._pending = False

    def drop_first(self, count):
        """Forget the first ``count`` records (now in the config file); keep the rest on disk."""
        rest = self.records[count:]
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:  # a failure here leaves the journal as it was
            for op, table, params in rest:
                f.write(_encode(op, table, params))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file.close()
        self._file = open(self.path, "ab")
        self.records = rest

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def _encode(op, table, params):
    data = json.dumps([op, table, params], separators=(",", ":"), ensure_ascii=False).encode()
    return b"%08x " % zlib.crc32(data) + data + b"\n"


def read(path):
    """The records of a journal file; a torn or damaged tail is dropped with a warning."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return []
    records = []
    complete, tail = lines[:-1], lines[-1]
    for number, line in enumerate(complete, 1):
        record = _decode(line)
        if record is None:
            dropped = len(complete) - number + 1
            log.warning("%s: record %d is damaged; it and the %d after it are dropped", path, number, dropped - 1)
            return records
        records.append(record)
    if tail:
        log.warning("%s: the last record is torn (a crash during its write); dropped", path)
    return records


def _decode(line):
    crc, _, data = line.partition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(data) or len(crc) != 8:
            return None
        record = json.loads(data)
    except ValueError:
        return None
    if not (isinstance(record, list) and len(record) == 3 and isinstance(record[2], dict)):
        return None
    return record
