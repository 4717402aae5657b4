"""Config as commands: the lines `cmactor export` prints and `cmactor apply` replays.

A line is ``set|setop MODULE.TABLE key=value ...``, each word quoted as a POSIX
shell quotes it (shlex.quote), so that every value reads back exactly: spaces, both
quotes, ``=``, a newline (a quote may go on over several lines), any Unicode.
Values are literal text: a file has no None value (the command line's
``key=None``), and export leaves out a key whose value is None. Blank lines and
lines whose first word begins with ``#`` are comments.

A line's words are read as shlex.split reads them (POSIX rules, no comments), by a
scanner that takes each run of ordinary characters, and each quoted text, in one
regex match: shlex builds a word one character at a time, so that a line of a few
hundred kilobytes took seconds. A quote never closed is reported on the line of its
command, and reading goes on at the line after the one where it opened, each line on
its own from then on: the rest of the file is still checked, and no line is split
into words more than twice.
"""

import collections
import re
import shlex

from cmactor.wire.protocol import NAME_RE

OPS = ("set", "setop")
SYNTAX = "set|setop MODULE.TABLE key=value ..."

# ``line``: the number of the (first) line it is on, from 1.
Command = collections.namedtuple("Command", "line op module table params")


class CommandError(Exception):
    """A line that is not a command, or a row to export that cannot be written as one; the message says why."""


def export_line(module, table, row, op="set"):
    """The line that sets ``row`` of MODULE.TABLE again (or runs ``op`` with it as params);
    a None value is left out (not given)."""
    words = [op, f"{module}.{table}"]
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
    found, malformed = [], []
    quoted = _SPANNING
    pos, number = 0, 1
    while pos < len(text):
        end = _next_line(text, pos)
        first = text[pos:end]
        if first.strip() and not first.lstrip().startswith("#"):
            try:
                words, end = _read_words(text, pos, quoted)
            except _BadQuoting as exc:
                at = number + text.count("\n", pos, exc.at)
                malformed.append((number, exc.problem(None if at == number else at)))
                end = exc.resume
                if exc.unclosed:
                    quoted = _ONE_LINE  # a quote that may close lines later would hide the rest
            else:
                try:
                    found.append(_command(number, words))
                except CommandError as exc:
                    malformed.append((number, str(exc)))
        number += text.count("\n", pos, end)
        pos = end
    return found, malformed


def split_line(line):
    """The words of ``line`` (one line, no "\\n") as shlex.split gives them, or
    CommandError saying what is wrong with its quoting."""
    try:
        return _read_words(line, 0, _ONE_LINE)[0]
    except _BadQuoting as exc:
        raise CommandError(exc.problem()) from None


# What comes next outside quotes, matched where the last piece ended. Lines end at
# "\n" alone: a quoted value may hold "\r" or another line break. A backslash before a
# line's end matches none of them: it escapes nothing.
_PIECE = re.compile(
    r"""
      (?P<plain>[^ \t\r\n'"\\]++)
    | (?P<escaped>(?:\\.)++)           # each backslash takes the character after it as it is
    | (?P<blank>[ \t\r]++)
    | (?P<quote>['"])
    | (?P<end>\n|\Z)
    """,
    re.VERBOSE,
)

# After an opening quote: its text, then the closing quote if it comes. On one line
# (_ONE_LINE), or on any line after (_SPANNING: a value holding a newline). Inside double
# quotes a backslash pairs with the character after it; possessive, so that a quote
# never closed costs one pass over what follows it.
_ONE_LINE = {
    "'": re.compile(r"'(?P<text>[^'\n]*+)(?P<close>'?)"),
    '"': re.compile(r'"(?P<text>(?:[^"\\\n]++|\\.)*+)(?P<close>"?)'),
}
_SPANNING = {
    "'": re.compile(r"'(?P<text>[^']*+)(?P<close>'?)"),
    '"': re.compile(r'"(?P<text>(?:[^"\\]++|\\.)*+)(?P<close>"?)'),
}
# Inside double quotes a backslash escapes only a double quote or a backslash; before
# any other character it stays.
_DOUBLE_QUOTED_ESCAPE = re.compile(r'\\([\\"])')


class _BadQuoting(Exception):
    """A command whose quoting cannot be read: a quote never closed, or a backslash at
    the end of a line."""

    def __init__(self, unclosed, at, resume):
        self.unclosed = unclosed  # else the backslash
        self.at = at  # where the quote, or the backslash, is
        self.resume = resume  # where the line after it begins

    def problem(self, line=None):
        """What is wrong, naming ``line`` when it is not the line the command begins on."""
        if self.unclosed:
            return f"a quote opened on {'this line' if line is None else f'line {line}'} is never closed"
        return f"{'the line' if line is None else f'line {line}'} ends with a backslash, which escapes nothing"


def _next_line(text, pos):
    """Where the line after the one holding ``pos`` begins (the end of ``text`` if none)."""
    newline = text.find("\n", pos)
    return len(text) if newline < 0 else newline + 1


def _read_words(text, start, quoted):
    """The words of the command that begins at ``start`` (a line's start) in ``text``, and
    where the line after it begins; ``quoted`` is _ONE_LINE or _SPANNING. _BadQuoting if
    its quoting cannot be read."""
    words, parts, pos = [], [], start
    while True:
        piece = _PIECE.match(text, pos)
        if piece is None:
            raise _BadQuoting(False, pos, _next_line(text, pos))
        kind = piece.lastgroup
        if kind == "plain":
            parts.append(piece.group())
        elif kind == "escaped":
            parts.append(piece.group()[1::2])
        elif kind == "quote":
            quote = piece.group()
            inside = quoted[quote].match(text, pos)
            if not inside.group("close"):
                if text.startswith("\\", inside.end()):
                    raise _BadQuoting(False, inside.end(), _next_line(text, inside.end()))
                raise _BadQuoting(True, pos, _next_line(text, pos))
            value = inside.group("text")
            if quote == '"' and "\\" in value:
                value = _DOUBLE_QUOTED_ESCAPE.sub(r"\1", value)
            parts.append(value)  # "" too: a quoted empty text is a word
            pos = inside.end()
            continue
        else:
            if parts:
                words.append("".join(parts))
                parts = []
            if kind == "end":
                return words, piece.end()
        pos = piece.end()


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
            f"{target!r} is not MODULE.TABLE (two names of letters, digits and '_' joined by a dot); a line is {SYNTAX}"
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
