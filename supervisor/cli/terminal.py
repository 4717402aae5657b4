"""Text from data (values, notes, notify_cli text, error messages) as the CLI shows it.

A value can hold anything, and a terminal acts on some characters instead of showing
them: ESC starts a sequence that can clear the screen, move the cursor or set the
window title, and so can C1's CSI; a lone surrogate (how Python decodes a byte that
is not UTF-8) cannot even be written. On a terminal such characters are shown
escaped, as Python writes them in a string (``\\x1b``, ``\\n``, ``\\udcff``). Written
to a pipe or a file, text stays exactly as it is: `cmactor export > file` must read
back byte for byte.
"""

import re
import sys

# C0 (ESC among them), DEL, C1, and lone surrogates.
_ACTED_ON = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# The ones json.dumps(ensure_ascii=False) leaves as they are: it escapes C0 itself.
_LEFT_BY_JSON = re.compile("[\x7f-\x9f\ud800-\udfff]")


def escaped(text):
    """``text`` with each character a terminal would act on written as its escape."""
    return _ACTED_ON.sub(_escape, text)


def _escape(match):
    return ascii(match.group())[1:-1]  # the repr without its quotes: \x1b, \n, \udcff


def json_escaped(text):
    """JSON ``text`` (json.dumps with ensure_ascii=False) with the characters a terminal
    would act on written as JSON escapes (``\\u009b``): the same JSON, safe to show.
    They can only be inside its strings, where such an escape means the same."""
    return _LEFT_BY_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def shown(text, stream):
    """``text`` as it is to be written to ``stream``: escaped on a terminal, as it is elsewhere."""
    return escaped(text) if stream.isatty() else text


def say(text, stream=None):
    """Print ``text``, which comes from data, on ``stream`` (default: stderr); escaped on a terminal."""
    stream = sys.stderr if stream is None else stream
    print(shown(text, stream), file=stream, flush=True)
