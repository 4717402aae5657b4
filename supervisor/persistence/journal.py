"""Per-module journal of the config changes acknowledged since the last save.

A crash must lose no committed config: each set or setop that succeeded with
``ctx.dirty`` on a persistent table is appended here before its reply leaves the
supervisor, and a restarted agent is loaded with the saved rows followed by the
journal. A save folds the journal into the config file and truncates it.

A journal that passes its bound (the agent keys ``journal_max_records`` and
``journal_max_bytes``) is compacted (saving.py): a snapshot of the module's live
persistent tables is written atomically beside it, ``<module>.snapshot`` (the
config file's format, one module), and the records it covers are dropped. The
snapshot then stands in for the module's section of the config file at a
restart, until a save makes it older than the config file and removes it.

One file per module, ``state_dir/journal/<module>.jsonl``, one record a line:
``<crc32 of the JSON, 8 hex digits> <JSON [op, table, params]>``. The loop
appends records during a turn and fsyncs each touched journal once at the end
of the turn, before that turn's replies are sent: concurrent requests share one
fsync. A last line torn by a crash mid-write fails its checksum (or has no
newline) and is dropped, never replayed half; a start cuts it off the file (kept
aside as ``.damaged-<time>``) before appending, so that the next record is not
written after it, where the next read would drop it too.

What a save or compaction covers is told by the request ids (sids) the records
came from, kept in memory beside them: the save walk runs on the module's serial
lane after every serial request sent before it, so the records of those are in
what it writes, wherever they stand in the journal; an @async_action's change
answered while the walk ran may or may not be, and its record is kept.
"""

import datetime
import json
import logging
import os
import time
import zlib

from cmsupervisor.observability.stats import FSYNC_BOUNDS, Histogram
from cmsupervisor.persistence import store

log = logging.getLogger("cmactor.supervisor")


class Journal:
    def __init__(self, path, max_records=0, max_bytes=0):
        self.path = path
        self.snapshot_path = path.removesuffix(".jsonl") + ".snapshot"
        self.max_records = max_records  # 0: no bound
        self.max_bytes = max_bytes
        self.records = []  # [op, table, params], in the order they were acknowledged
        self._tags = []  # (sid, is_async, position) of each record: what a save walk covers (covered())
        # Each record's key in etcd under [ha] (cmsupervisor/ha), else None: a save or compaction
        # tells on_drop(base, dropped keys, kept keys) which of them its new base replaced.
        self.keys = []
        self.on_drop = None
        self._appended = 0  # records appended since the journal was opened: the position of the next
        self.snapshot = None  # the module's tables at the last compaction (JSON bytes), or None
        self.base_bytes = 0  # what a compaction would write, about (set_base)
        self._file = None
        self._pending = False
        self._synced = 0  # records known to be on disk
        self._synced_size = 0  # the file's size after them
        self.fsync_seconds = Histogram(FSYNC_BOUNDS)  # each sync()'s fsync: what a set to a persistent table waits for

    def open(self, recover):
        """Open for appending; return the files moved aside (a list of paths).

        With ``recover`` (every start but an operator's choice of the saved config
        alone) the snapshot and the records on disk are loaded: a restarted
        supervisor, after a crash or a clean stop alike, has the config it had.
        Without, they are moved aside under names of their own, kept, never
        deleted (``as_commands`` turns them into commands to replay them)."""
        if recover:
            self.records = self._read_and_cut()
            self._tags = [(0, False, 0)] * len(self.records)  # loaded before any walk: every save covers them
            self.keys = [None] * len(self.records)
            if os.path.exists(self.snapshot_path):
                self.snapshot = store.read(self.snapshot_path, "snapshot").get(_module(self.path))
            moved = []
        else:
            moved = [_move_aside(path) for path in (self.snapshot_path, self.path) if _holds_data(path)]
        self._reopen()
        return moved

    def _read_and_cut(self):
        """The records on disk; a damaged or torn tail is cut off the file (its bytes kept
        aside as PATH.damaged-<time>, and named) so that appends follow the last good record."""
        data = _file_bytes(self.path)
        if data is None:
            return []
        records, end = scan(self.path, data)
        if end < len(data):
            aside = _aside_name(self.path, "damaged")
            with open(aside, "wb", opener=store.owner_only) as f:
                f.write(data[end:])
            os.truncate(self.path, end)
            _sync_dir(self.path)
            log.warning("%s: its damaged end (%d bytes) is cut off and kept as %s", self.path, len(data) - end, aside)
        return records

    def left_by_older_versions(self):
        """Files an earlier cmactor kept aside as ``.old`` at a start without its --recover,
        snapshot first: changes that are in no running config. Not loaded; named."""
        return [path + ".old" for path in (self.snapshot_path, self.path) if _holds_data(path + ".old")]

    def bound(self, max_records, max_bytes):
        """New bounds (a reload changed the agent's journal_max_records or journal_max_bytes):
        the next append past one of them compacts the journal."""
        self.max_records = max_records
        self.max_bytes = max_bytes

    def set_base(self, size):
        """The module's tables, as last written whole (its section of the config file, or
        the snapshot), take ``size`` bytes. The journal is compacted only once it has
        grown as large: each compaction rewrites the whole tables, so what compaction
        writes in all stays within twice what the records themselves took."""
        self.base_bytes = size

    @property
    def full(self):
        """Past its bound, and as large as the tables a compaction would write: time to compact it."""
        past = (self.max_records and len(self.records) >= self.max_records) or (
            self.max_bytes and self._synced_size >= self.max_bytes
        )
        return bool(past) and self._synced_size >= self.base_bytes

    def position(self):
        """Where the journal is now: given to covered() by a save walk that starts now."""
        return self._appended

    def compacted(self, snapshot, save_sid, walk_start):
        """The snapshot file now holds the tables a save walk (covered()) saw: keep it in
        memory (a restart loads it), and drop the records it covers."""
        self.snapshot = snapshot
        self.base_bytes = len(snapshot)
        self.drop_covered(save_sid, walk_start, snapshot)

    def forget_snapshot(self):
        """A save wrote newer rows to the config file: the snapshot must never load again."""
        if self.snapshot is None:
            return
        self.snapshot = None
        try:
            os.unlink(self.snapshot_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error(
                "%s: cannot remove this snapshot, now older than the config file: %s; remove it by hand "
                "before the next start, which would load it",
                self.snapshot_path,
                exc,
            )
        else:
            _sync_dir(self.snapshot_path)

    def _reopen(self):
        if self._file is not None:
            self._file.close()
        self._file = open(self.path, "ab", opener=store.owner_only)
        self._synced = len(self.records)
        self._synced_size = self._file.tell()

    def append(self, op, table, params, sid=0, is_async=False, key=None):
        """Add the record of request ``sid`` (an @async_action's if ``is_async``; ``key``: its
        key in etcd); it is durable only once sync() has returned. OSError from the write
        leaves the record out (rollback() undoes what may have reached the file)."""
        self.records.append([op, table, params])
        self.keys.append(key)
        self._tags.append((sid, is_async, self._appended))
        self._appended += 1
        self._pending = True
        self._file.write(encode(op, table, params))

    def sync(self):
        """Make every appended record durable, or raise OSError (then call rollback())."""
        if self._pending:
            self._file.flush()
            started = time.monotonic()
            os.fsync(self._file.fileno())
            self.fsync_seconds.observe(time.monotonic() - started)
            self._pending = False
            self._synced = len(self.records)
            self._synced_size = self._file.tell()

    def rollback(self):
        """Forget the records appended since the last sync, in memory and on disk: a write
        or fsync failed, so their changes are refused and must not be replayed."""
        del self.records[self._synced :]
        del self._tags[self._synced :]
        del self.keys[self._synced :]
        self._pending = False
        try:
            self._file.close()  # drops what is still buffered; may fail to flush it, which is fine
        except OSError:
            pass
        self._file = None
        try:
            os.truncate(self.path, self._synced_size)
        except OSError as exc:
            # The tail stays; a later replay might apply a refused change. Say so.
            log.error("%s: cannot cut off records that failed to be written (%s); they may be replayed", self.path, exc)
        self._reopen()

    def covered(self, save_sid, walk_start):
        """Which records a save walk saw: the walk was request ``save_sid`` and started at
        position ``walk_start`` (position()). It ran on the serial lane after every request
        sent before it, so it saw their changes; an @async_action's change recorded after
        it started ran beside it, and may not have been seen. A list of booleans."""
        return [sid < save_sid and not (is_async and at >= walk_start) for sid, is_async, at in self._tags]

    def drop_covered(self, save_sid, walk_start, base):
        """Forget the records a save walk saw (now in ``base``, the module's section of the
        config file or a snapshot); keep the rest on disk. OSError leaves the journal as it was."""
        keep = [not seen for seen in self.covered(save_sid, walk_start)]
        rest = [record for record, kept in zip(self.records, keep) if kept]
        tmp = self.path + ".tmp"
        with open(tmp, "wb", opener=store.owner_only) as f:
            for op, table, params in rest:
                f.write(encode(op, table, params))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _sync_dir(self.path)
        self.records = rest
        self._tags = [tag for tag, kept in zip(self._tags, keep) if kept]
        dropped = [key for key, kept in zip(self.keys, keep) if not kept]
        self.keys = [key for key, kept in zip(self.keys, keep) if kept]
        self._reopen()
        if self.on_drop is not None:
            self.on_drop(base, dropped, self.keys)

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def _module(path):
    return os.path.basename(path).removesuffix(".jsonl")


def _holds_data(path):
    try:
        return os.lstat(path).st_size > 0
    except FileNotFoundError:
        return False


def _aside_name(path, why):
    """A name of its own for what is kept of ``path``: ``PATH.<why>-<time>``."""
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    aside = f"{path}.{why}-{stamp}"
    number = 1
    while os.path.lexists(aside):  # twice within a second: never overwrite the first
        number += 1
        aside = f"{path}.{why}-{stamp}-{number}"
    return aside


def _move_aside(path):
    """Rename ``path`` to ``PATH.aside-<time>``; return that name."""
    aside = _aside_name(path, "aside")
    os.rename(path, aside)
    _sync_dir(path)
    return aside


def _sync_dir(path):
    """fsync the directory of ``path``: a rename, cut or unlink in it survives a power cut."""
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replay_order(paths):
    """``paths`` of journal and snapshot files in the order their changes were made: per
    module, what an earlier cmactor kept (``.old``), then what was moved aside, oldest
    first (``.aside-<time>``), then the live files; a snapshot before the journal beside
    it (its records came after it). A shell glob sorts them otherwise."""

    def made(path):
        module, _, rest = os.path.basename(path).partition(".")
        kind, _, kept_as = rest.partition(".")
        generation = (0, "") if kept_as == "old" else (1, kept_as) if kept_as else (2, "")
        return module, generation, 0 if kind == "snapshot" else 1

    return sorted(paths, key=made)


def as_commands(path):
    """The changes a journal or snapshot file holds, as (op, module, table, params) in the
    order they would load: a snapshot's rows as sets, a journal's records as they were
    made. The module is the one the file is named after. StoreError if it is not one."""
    name = os.path.basename(path)
    module, _, kind = name.partition(".")
    if kind.startswith("snapshot"):
        section = store.read(path, "snapshot").get(module)
        if section is None:
            raise store.StoreError(f"{path} holds no section for module {module!r}, whose name it bears")
        tables = json.loads(section)
        return [("set", module, table, row) for table, rows in tables.items() for row in rows]
    if kind.startswith("jsonl"):
        return [(op, module, table, params) for op, table, params in read(path, strict=True)]
    raise store.StoreError(
        f"{path} is neither a journal (MODULE.jsonl...) nor a snapshot (MODULE.snapshot...) of cmactor's"
    )


def encode(op, table, params):
    """One record as a journal line: what each acknowledged set or setop appends."""
    data = json.dumps([op, table, params], separators=(",", ":"), ensure_ascii=False).encode()
    return b"%08x " % zlib.crc32(data) + data + b"\n"


def read(path, strict=False):
    """The records of a journal file; a torn or damaged tail is dropped with a warning.
    ``strict``: a file that is not there, or whose first line is not a record, is a
    StoreError (a file named by an operator, not the journal a start opens)."""
    data = _file_bytes(path)
    if data is None:
        if strict:
            raise store.StoreError(f"{path}: no such file")
        return []
    if strict and data and _decode(data.partition(b"\n")[0]) is None:
        raise store.StoreError(f"{path} is not a cmactor journal: its first line is not a record")
    return scan(path, data)[0]


def _file_bytes(path):
    """What journal ``path`` holds, None if there is no such file; StoreError if it cannot
    be read (a symbolic link is never followed)."""
    try:
        with open(path, "rb", opener=store.no_follow) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise store.StoreError(f"journal {path} cannot be read: {store.reason(exc)}") from None


def scan(path, data):
    """(records, where the last good one ends) of a journal's bytes; what follows a damaged
    record, or a last one torn by a crash mid-write, is dropped with a warning naming ``path``."""
    records = []
    end = 0
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    for number, line in enumerate(complete, 1):
        record = _decode(line)
        if record is None:
            dropped = len(complete) - number + 1
            log.warning("%s: record %d is damaged; it and the %d after it are dropped", path, number, dropped - 1)
            return records, end
        records.append(record)
        end += len(line) + 1
    if tail:
        log.warning("%s: the last record is torn (a crash during its write); dropped", path)
    return records, end


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
