"""What `cmactor status` prints: one row per module, or their status as JSON.

The table fits the terminal it is shown on. Its columns (state, pid, the figures)
are never cut or wrapped; the note (why a module is not READY, or how it last
exited) is a last column when every note fits on its row's line, else it goes on
indented lines of its own under its module's row, wrapped to the terminal's width.
When the columns are wider than the terminal, they close up to one space apart, and
a row the terminal still cannot hold is left for it to wrap. States are coloured on
a terminal (not with NO_COLOR set, https://no-color.org), never elsewhere. Written
to a pipe or a file, each module is one line, whatever its length.

JSON is each module's status entry as the supervisor gives it, but for the buckets
of its latency histograms (requests' ``seconds`` and ``journal_fsync``), which only
``--histograms`` keeps: a status of many modules was mostly buckets.
"""

import json
import os
import shutil
import textwrap

from cmsupervisor.cli import terminal

COLUMNS = ("module", "state", "pid", "restarts", "uptime", "rss", "cpu", "queue", "inflight", "unsaved")
# A note under its row is wrapped to the terminal's width, but never narrower than this:
# on a terminal narrower still, it would be more line breaks than words.
NOTE_MIN_ROOM = 20
NOTE_INDENT = "    "
# SGR codes: READY well, FAILED badly, on the way to a state in between, STOPPED (left
# stopped after a clean exit, as restart = "on-failure" does) faint. A state not named
# here is shown plain.
COLOURS = {
    "READY": "32",
    "FAILED": "31",
    "STARTING": "33",
    "WAITING_DEPS": "33",
    "LOADING": "33",
    "RESTARTING": "33",
    "STOPPING": "33",
    "STOPPED": "2",
}


def as_json(status, histograms):
    """``status`` as `status --format json` prints it; without ``histograms``, each
    histogram keeps its count and sum, not its buckets."""
    if not histograms:
        for entry in status.values():
            timings = [timed["seconds"] for timed in entry["requests"].values()]
            if entry["journal_fsync"] is not None:
                timings.append(entry["journal_fsync"])
            for histogram in timings:
                del histogram["buckets"]
    return json.dumps(status, indent=2, sort_keys=True)


def ha_line(ha):
    """The line over the table of a cluster's node: its name, its role, and the active it follows."""
    role = ha["role"]
    if role == "standby":
        role = f"standby of {ha['active'] or 'no active yet'}, {'in sync' if ha['in_sync'] else 'catching up'}"
    return f"node {ha['node']}: {role}, etcd revision {ha['revision']}"


def restconf_line(entry):
    """The line under the table for the RESTCONF server run beside the modules."""
    line = f"restconf: {entry['state']}"
    if entry["pid"] is not None:
        line += f" pid {entry['pid']}"
    line += f" at {entry['url']} (restarts {entry['restarts']})"
    if entry.get("error"):
        line += f": {entry['error']}"
    elif entry["last_exit"]:
        line += f"; last exit: {entry['last_exit']}"
    return line


def show(status, out):
    """Print the table of ``status`` (module -> status entry) on ``out``."""
    rows = [_row(name, entry) for name, entry in status.items()]
    notes = [note(entry) for entry in status.values()]
    if not out.isatty():
        lines = _lines(COLUMNS + ("note",), [row + [n or "-"] for row, n in zip(rows, notes)], 2)
    else:
        rows = [[terminal.escaped(cell) for cell in row] for row in rows]
        notes = [n and terminal.escaped(n) for n in notes]
        colour = not os.environ.get("NO_COLOR")
        lines = _fitted(rows, notes, shutil.get_terminal_size().columns, colour)
    for line in lines:
        print(line, file=out)


def _row(name, s):
    return [
        name,
        s["state"],
        "-" if s["pid"] is None else str(s["pid"]),
        str(s["restarts"]),
        "-" if s["uptime"] is None else duration(s["uptime"]),
        "-" if s["rss"] is None else human_bytes(s["rss"]),
        "-" if s["cpu"] is None else f"{s['cpu']:.1f}",
        str(s["queue"]),
        str(s["inflight"]),
        "yes" if s["unsaved"] else "no",
    ]


def note(entry):
    """What the note column says of a module: why it is not READY, or how it last exited."""
    if entry["error"]:
        return entry["error"]
    if entry["waiting_on"]:
        return f"waiting on {entry['waiting_on']}"
    if entry["last_exit"]:
        return f"last exit: {entry['last_exit']}"
    return None


def duration(seconds):
    """``seconds`` in its two largest units: 42s, 5m3s, 3h12m, 2d4h."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


def _widths(headers, rows):
    return [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]


def _lines(headers, rows, gap, colour=False):
    """Aligned lines of ``rows`` under ``headers``, columns ``gap`` spaces apart; with
    ``colour``, column 1, the state, coloured."""
    widths = _widths(headers, rows)
    space = " " * gap
    lines = [space.join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths)]
        code = COLOURS.get(row[1]) if colour else None
        if code:  # the codes take no column: the padding is the plain word's
            cells[1] = f"\x1b[{code}m{row[1]}\x1b[0m{cells[1][len(row[1]) :]}"
        lines.append(space.join(cells).rstrip())
    return lines


def _fitted(rows, notes, width, colour):
    """The table's lines for a terminal ``width`` columns wide. In order of preference:
    columns two spaces apart with a note column, each note on its row's line; the notes
    under their rows, wrapped; then the same one space apart (a row the terminal still
    cannot hold, it wraps: nothing is cut)."""
    widths = _widths(COLUMNS, rows)
    longest = max([len("note")] + [len(n or "-") for n in notes])
    for gap in (2, 1):
        fixed = sum(widths) + gap * (len(widths) - 1)
        if fixed + gap + longest <= width:
            return _lines(COLUMNS + ("note",), [row + [n or "-"] for row, n in zip(rows, notes)], gap, colour)
        if fixed <= width or gap == 1:
            return _notes_under(rows, notes, width, colour, gap)


def _notes_under(rows, notes, width, colour, gap):
    """The table without a note column: each note on indented lines under its row."""
    header, *lines = _lines(COLUMNS, rows, gap, colour)
    table = [header]
    room = max(width - len(NOTE_INDENT), NOTE_MIN_ROOM)
    for line, n in zip(lines, notes):
        table.append(line)
        if n:
            table += [NOTE_INDENT + piece for piece in textwrap.wrap(n, room, break_on_hyphens=False)]
    return table
