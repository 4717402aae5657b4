"""Reading a module's log as `cmactor logs` shows it: its last lines, then (follow)
what is written after them, across rotations, as `tail -F` does.

The log is rotated by renaming (logs.py): ``<module>.log`` becomes ``.log.1`` (``.1``
becomes ``.2``, ...) and a new file takes its name. Lines are read as bytes and shown
as they were written. A follower keeps the file it reads open, so that, however many
rotations happen between two looks, it finds that file by its inode among the rotated
ones and reads every file rotated after it, in order, before the log itself.
"""

import os
import time

from cmsupervisor.config import MAX_LOG_BACKUPS

BLOCK = 65536
FOLLOW_INTERVAL = 0.2  # seconds between looks at a log that has nothing new


def _tail(f, count):
    """The last ``count`` lines of the open file ``f``, read back from its end; ``f``
    is left at its end."""
    end = f.seek(0, os.SEEK_END)
    if count == 0:
        return []
    start, data = end, b""
    while start > 0 and data.count(b"\n") <= count:  # one newline more: the first line is whole
        step = min(BLOCK, start)
        start -= step
        f.seek(start)
        data = f.read(step) + data
    f.seek(end)
    return data.splitlines(keepends=True)[-count:]


def last_lines(path, count):
    """The last ``count`` lines of the log at ``path`` (the rotated file before it,
    ``path.1``, gives those the current one lacks), and the log open at its end, for
    follow(). FileNotFoundError if there is no log."""
    f = open(path, "rb")
    lines = _tail(f, count)
    if len(lines) < count:
        try:
            with open(f"{path}.1", "rb") as older:
                # A rotation between the two opens would make it the file already read.
                if not os.path.samestat(os.fstat(older.fileno()), os.fstat(f.fileno())):
                    lines = _tail(older, count - len(lines)) + lines
        except FileNotFoundError:
            pass
    return lines, f


def follow(path, f, write):
    """Hand ``write`` what is appended to the log at ``path`` from ``f``'s position on,
    until interrupted: when the log is rotated, the rest of the file held, then each file
    rotated after it, from its start, oldest first, then the log itself."""
    try:
        while True:
            data = f.read(BLOCK)
            if data:
                write(data)
                continue
            held = os.fstat(f.fileno())
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None  # between a rotation's rename and the new file
            if current is not None and os.path.samestat(current, held):
                if current.st_size < f.tell():
                    f.seek(0)  # cut back in place (not by cmactor): start over
                    continue
                time.sleep(FOLLOW_INTERVAL)
                continue
            rest = f.read()  # written before the rename
            if rest:
                write(rest)
            after = _next_file(path, held)
            if after is None:
                time.sleep(FOLLOW_INTERVAL)
                continue
            f.close()
            f = after
    finally:
        f.close()


def _next_file(path, held):
    """The file rotated right after ``held`` (the one read to its end), open at its
    start; None when there is none yet, or a rotation moved it while it was opened:
    look again later."""
    newer = _newer_files(path, held)
    if not newer:
        return None
    name, seen = newer[-1]
    try:
        f = open(name, "rb")
    except FileNotFoundError:
        return None
    if not os.path.samestat(os.fstat(f.fileno()), seen):
        f.close()
        return None
    return f


def _newer_files(path, held):
    """(name, stat) of each of the log's files newer than ``held``, newest first: ``path``,
    then ``path.1``, ... up to where ``held`` is now. If it is not among them (rotated past
    the backups kept, or removed), every rotated file last written after it.

    Looked at newest first: a rotation meanwhile moves each file to an older name, so a
    file may be seen twice, at two names, but none is missed. ``held`` is open, so its
    inode cannot be taken by a new file."""
    found = []
    for name in [path] + [f"{path}.{n}" for n in range(1, MAX_LOG_BACKUPS + 1)]:
        try:
            stat = os.stat(name)
        except FileNotFoundError:
            continue
        if os.path.samestat(stat, held):
            return found
        found.append((name, stat))
    # A file left at a number past today's log_backups (kept from a config with more)
    # was last written before the held one: it is not one rotated after it.
    return [(name, stat) for name, stat in found if name == path or stat.st_mtime_ns >= held.st_mtime_ns]
