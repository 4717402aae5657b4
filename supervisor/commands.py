"""Config as commands: the lines `cmactor export` prints and `cmactor apply` replays.

A line is ``set|setop MODULE.TABLE key=value ...``, each word quoted as a POSIX
shell quotes it (shlex), so that every value reads back exactly: spaces, both
quotes, ``=``, a newline (a quote may go on over several lines), any Unicode.
Values are literal text: a file has no None value (the command line's
``key=None``), and export leaves out a key whose value is None. Blank lines and
lines whose first word begins with ``#`` are comments.
"""

import collections
import shlex

from cmactor.protocol import NAME_RE

OPS = ("set", "setop")
SYNTAX = "set|setop MODULE.TABLE key=value ..."

# ``line``: the number of the (first) line it is on, from 1.
Command = collections.namedtuple("Command", "line op module table params")


class CommandError(Exception):
    """A line, or a row to export, that cannot be written as a command; the message says why."""


def export_line(module, table, row):
    """The line that sets ``row`` of MODULE.TABLE again; a None value is left out (not given)."""
    words = ["set", f"{module}.{table}"]
    for key, value in row.items():
        if value is None:
            continue
        if not key or "=" in key:
            raise CommandError(
                f"module {module!r} table {table!r} has a field named {key!r}, which cannot be written "
                "as key=value (an empty name, or one holding '='): its rows cannot be exported"
            )
        words.append(f"{shlex.quote(key)}={shlex.quote(value)}")
    return " ".join(words)


def parse(text):
    """The commands in a file's ``text``, and what is wrong with the lines that are not
    commands: ([Command], [(line number, message)])."""
    lines = text.split("\n")  # only "\n": a quoted value may hold "\r" or another line break
    found, malformed = [], []
    index = 0
    while index < len(lines):
        number = index + 1
        logical = lines[index]
        index += 1
        if not logical.strip() or logical.lstrip().startswith("#"):
            continue
        while True:
            try:
                words = shlex.split(logical)
                break
            except ValueError as exc:
                if str(exc) == "No closing quotation" and index < len(lines):
                    logical += "\n" + lines[index]  # the value holds a newline: its quote goes on
                    index += 1
                    continue
                words = None
                malformed.append((number, _quoting(exc)))
                break
        if words is None:
            continue
        try:
            found.append(_command(number, words))
        except CommandError as exc:
            malformed.append((number, str(exc)))
    return found, malformed


def _quoting(exc):
    if str(exc) == "No closing quotation":
        return "a quote opened on this line is never closed"
    if str(exc) == "No escaped character":
        return "the line ends with a backslash, which escapes nothing"
    return f"bad quoting: {exc}"


def _command(number, words):
    op, *rest = words
    if op not in OPS:
        raise CommandError(f"unknown op {op!r}; a line is {SYNTAX}")
    if not rest:
        raise CommandError(f"{op} names no MODULE.TABLE; a line is {SYNTAX}")
    target, *pairs = rest
    module, dot, table = target.partition(".")
    if not (dot and NAME_RE.match(module) and NAME_RE.match(table)):
        raise CommandError(
            f"{target!r} is not MODULE.TABLE (two names of letters, digits and '_' joined by a dot); "
            f"a line is {SYNTAX}"
        )
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"{pair!r} is not key=value; a line is {SYNTAX}")
        if key in params:
            raise CommandError(f"key {key!r} is given twice")
        params[key] = value
    return Command(number, op, module, table, params)
