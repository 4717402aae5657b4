"""Reading a module's log as `cmactor logs` shows it: its last lines, then (follow)
what is written after them, across rotations, as `tail -F` does.

The log is rotated by renaming (logs.py): ``<module>.log`` becomes ``.log.1`` and a
new file takes its name. Lines are read as bytes and shown as they were written.
"""

import os
import time

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
    until interrupted: when the log is rotated, the rest of the old file, then the new
    one from its start."""
    try:
        while True:
            data = f.read(BLOCK)
            if data:
                write(data)
                continue
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None  # between a rotation's rename and the new file
            if current is not None and not os.path.samestat(current, os.fstat(f.fileno())):
                rest = f.read()  # written before the rename
                if rest:
                    write(rest)
                try:
                    new = open(path, "rb")
                except FileNotFoundError:
                    continue
                f.close()
                f = new
                continue
            if current is not None and current.st_size < f.tell():
                f.seek(0)  # cut back in place (not by cmactor): start over
                continue
            time.sleep(FOLLOW_INTERVAL)
    finally:
        f.close()
