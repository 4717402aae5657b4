"""RESTCONF data resource paths (RFC 8040 section 3.5.3) and query parameters (section 4.8).

``/restconf/data/cmactor-M:M/T=k1,k2/leaf`` names module M's container, its table T, an
entry of T by its keys (each percent-encoded, in key order; ',' between them), and a leaf
of it. The path is read here into a Target; whether M, T and the leaf exist is the
schema's to say (library.py)."""

import re
from dataclasses import dataclass
from urllib.parse import unquote

from cmsupervisor.restconf.errors import bad_value, malformed, not_found

PREFIX = "cmactor-"
_NAME = re.compile(r"(?:([A-Za-z_][A-Za-z0-9_.-]*):)?([A-Za-z_][A-Za-z0-9_.-]*)\Z")


@dataclass(frozen=True)
class Target:
    """What a data path names: a module's container, one of its tables (with ``keys``,
    one entry of it), a leaf of an entry or container table."""

    module: str
    table: str | None = None
    keys: tuple[str, ...] | None = None
    leaf: str | None = None

    def instance(self, index=()):
        """The target as an instance-identifier (an error-path), keys named by ``index``."""
        path = f"/{PREFIX}{self.module}:{self.module}"
        if self.table is not None:
            path += f"/{self.table}"
            if self.keys is not None:
                path += "".join(f"[{name}={_quoted(value)}]" for name, value in zip(index, self.keys))
            if self.leaf is not None:
                path += f"/{self.leaf}"
        return path


def _quoted(value):
    return f"'{value}'" if "'" not in value else f'"{value}"'


def _decoded(text):
    try:
        if re.search(r"%(?![0-9A-Fa-f]{2})", text):
            raise ValueError
        return unquote(text, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise malformed(f"{text!r} is not percent-encoded UTF-8 text (RFC 3986)") from None


def parse(path):
    """The Target of a data path (what follows ``/restconf/data/``), or a RestconfError:
    404 for what names nothing cmactor serves, 400 for a path that does not parse."""
    segments = path.split("/")
    if segments and segments[-1] == "":
        segments.pop()  # a trailing '/'
    if not segments:
        raise not_found("name a module's data: /restconf/data/cmactor-MODULE:MODULE")
    names = []
    for depth, segment in enumerate(segments):
        name, eq, keys = segment.partition("=")
        match = _NAME.match(_decoded(name))
        if match is None:
            raise bad_value(f"{_decoded(name)!r} is not a node name, [module:]name")
        prefix, node = match.groups()
        values = tuple(_decoded(key) for key in keys.split(",")) if eq else None
        names.append((prefix, node, values, depth))
    prefix, module, values, _ = names[0]
    if prefix is None or not prefix.startswith(PREFIX) or prefix[len(PREFIX) :] != module or values is not None:
        raise not_found(
            f"/restconf/data/{segments[0]} names no data of this server: its modules' data are "
            f"/restconf/data/cmactor-MODULE:MODULE"
        )
    if len(names) > 3:
        raise not_found(f"{path!r} goes deeper than cmactor's data: module, table (=keys), leaf")
    table = keys = leaf = None
    if len(names) > 1:
        prefix, table, keys, _ = names[1]
        if prefix not in (None, PREFIX + module):
            raise not_found(f"module cmactor-{module}'s container holds no node of module {prefix}")
    if len(names) > 2:
        prefix, leaf, values, _ = names[2]
        if prefix not in (None, PREFIX + module) or values is not None:
            raise not_found(f"{segments[2]!r} is not a leaf of table {table}")
    return Target(module, table, keys, leaf)


CONTENT = ("config", "nonconfig", "all")


def query(text, allowed):
    """The query parameters ``text`` (after '?'): {"content", "depth" (None: unbounded)}
    for those in ``allowed``; 400 invalid-value for any other or a bad value (RFC 8040 4.8)."""
    found = {"content": "all", "depth": None}
    seen = set()
    for pair in filter(None, text.split("&")):
        name, _, raw = pair.partition("=")
        name, value = _decoded(name), _decoded(raw)
        if name not in allowed:
            known = f"; this resource takes {', '.join(allowed)}" if allowed else ""
            raise bad_value(f"unknown query parameter {name!r}{known}")
        if name in seen:
            raise bad_value(f"query parameter {name!r} is given twice")
        seen.add(name)
        if name == "content":
            if value not in CONTENT:
                raise bad_value(f"content={value!r}: expected one of {', '.join(CONTENT)}")
            found["content"] = value
        elif name == "depth":
            if value != "unbounded" and not (value.isdigit() and value.isascii() and 1 <= int(value) <= 65535):
                raise bad_value(f"depth={value!r}: expected unbounded or a whole number from 1 to 65535")
            found["depth"] = None if value == "unbounded" else int(value)
    return found
