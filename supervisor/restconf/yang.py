"""YANG 1.1 modules generated from the agents' declarations, for the RESTCONF server.

cmactor module M becomes the YANG module ``cmactor-M`` (namespace ``urn:cmactor:M``,
prefix ``M``) whose one top-level container ``M`` holds M's exposed tables: a table
with index columns is a ``list`` keyed by them in order, one without a ``container``;
``config true`` when the agent has ``<table>_set``, else ``config false``; every leaf
a string, as every CM value is. A table with ``<table>_setop`` also gets
``rpc <table>-setop``. The schema of a module comes from the supervisor:

    {"tables": {table: {"index": [...], "columns": [...], "config": bool, "setop": bool, "delete": bool}}}

Nothing here talks to a process. ``revision_for`` dates a module's text so that its
revision changes whenever the text does.
"""

import datetime
import hashlib
import json
import re
import textwrap

from cmsupervisor.persistence.store import replace

# RFC 7950 section 6.2 (the rule "identifier" of section 14).
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
_INDENT = "  "
# Descriptions are wrapped to keep every line of a module within 80 columns, as pyang's own output does.
_WIDTH = 78


def module_text(module, schema, revision):
    """The YANG 1.1 module ``cmactor-<module>`` for ``schema`` (the supervisor's report of one
    module's tables), dated ``revision`` (YYYY-MM-DD, see revision_for).

    ValueError names the module, table or column that YANG cannot take, and what to do."""
    if not _is_date(revision):
        raise ValueError(f"module {module!r}: revision {revision!r} is not a date YYYY-MM-DD")
    head, body = _parts(module, schema)
    lines = [
        "",
        f"{_INDENT}revision {revision} {{",
        *_description(2, "Generated from the agent's declarations; a new revision whenever they change."),
        f"{_INDENT * 2}reference",
        f'{_INDENT * 3}"The agent of cmactor module {module}: its columns and index_columns.";',
        f"{_INDENT}}}",
    ]
    return head + "\n".join(lines) + "\n" + body


def revision_for(module, schema, store_path, today=None):
    """The revision date (YYYY-MM-DD) of ``module``'s text for ``schema``.

    The JSON file ``store_path`` remembers each module's digest and date: the same text
    keeps its date; another gets today, or the day after the last date when that is
    later, so that two changes in one day still make two revisions, in order. ``today``
    (a datetime.date) stands for the local date."""
    head, body = _parts(module, schema)
    digest = hashlib.sha256((head + body).encode()).hexdigest()
    store = _read_store(store_path)
    known = store.get(module)
    if known is not None and known["digest"] == digest:
        return known["revision"]
    revision = today or datetime.date.today()
    if known is not None:
        revision = max(revision, datetime.date.fromisoformat(known["revision"]) + datetime.timedelta(days=1))
    store[module] = {"digest": digest, "revision": revision.isoformat()}
    replace(store_path, json.dumps(store, indent=1, sort_keys=True).encode() + b"\n")
    return revision.isoformat()


def _read_store(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    try:
        store = json.loads(raw)
        for entry in store.values():
            if not isinstance(entry["digest"], str) or not _is_date(entry["revision"]):
                raise ValueError(f"bad entry {entry!r}")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(
            f"{path}: not a store of YANG revisions ({exc}); delete it: every module's revision then starts again from today"
        ) from None
    return store


def _is_date(text):
    """Whether ``text`` is a YANG revision date: YYYY-MM-DD, and a day of the calendar."""
    # The pattern first: fromisoformat also takes other ISO 8601 forms (20240501, 2024-W18-3).
    if not isinstance(text, str) or not _DATE.match(text):
        return False
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _parts(module, schema):
    """The module's text before its revision statement, and after it."""
    _check_identifier(module, f"module {module!r}", "rename the module in the config's [agents] table")
    head = [
        f"module cmactor-{module} {{",
        f"{_INDENT}yang-version 1.1;",
        f'{_INDENT}namespace "urn:cmactor:{module}";',
        f"{_INDENT}prefix {module};",
        "",
        f"{_INDENT}organization",
        f'{_INDENT * 2}"cmactor";',
        f"{_INDENT}contact",
        f'{_INDENT * 2}"The operator of this cmactor server.";',
        *_description(
            1,
            f"The tables of cmactor module {module}, generated from its agent's declarations: "
            "a table in its columns is a list keyed by the table's index_columns, or a container "
            "without them; read by <table>_get, writable when the agent has <table>_set; "
            "every value is a string.",
        ),
    ]
    body = [
        "",
        f"{_INDENT}container {module} {{",
        *_description(2, f"The tables of module {module} that its agent declares in columns."),
    ]
    rpcs = []
    for table, spec in schema["tables"].items():
        leaves = _leaves(module, table, spec)
        body += _table(table, spec, leaves)
        if spec["setop"]:
            rpcs += _setop_rpc(module, table, leaves)
    body += [f"{_INDENT}}}", *rpcs, "}", ""]
    return "\n".join(head) + "\n", "\n".join(body)


def _check_identifier(name, what, fix):
    """ValueError unless ``name`` can name a YANG node: ``what`` says whose name it is, ``fix`` what to do."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        problem = "is not a YANG identifier (a letter or '_', then letters, digits, '_', '-' or '.')"
    elif name[:3].lower() == "xml":
        # YANG 1.0 (RFC 6020) and XML reserve such names, and ietf-yang-types' yang-identifier,
        # which YANG tools and the YANG library use for names, still refuses them.
        problem = "starts with 'xml', which YANG 1.0 and XML reserve"
    else:
        return
    raise ValueError(f"{what}: the name {problem}: {fix}")


def _leaves(module, table, spec):
    """The table's leaves: its index columns first, in order, then its other declared columns."""
    where = f"module {module!r}, table {table!r}"
    _check_identifier(table, where, "rename the table (its _get/_set/_setop methods) or leave it out of columns")
    fixes = {
        "index_columns": "rename the column, or leave the table out of columns",
        "columns": "rename the column, or leave it out of columns",
    }
    for kind, names in (("index_columns", spec["index"]), ("columns", spec["columns"])):
        for name in names:
            _check_identifier(name, f"{where}, column {name!r}", fixes[kind])
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"{where}: {kind} names {', '.join(twice)} twice: name each column once")
    return [*spec["index"], *(name for name in spec["columns"] if name not in spec["index"])]


def _table(table, spec, leaves):
    index, config = spec["index"], spec["config"]
    write = f"written by {table}_set" if config else f"read-only (no {table}_set)"
    if index:
        lines = [f"{_INDENT * 2}list {table} {{", f'{_INDENT * 3}key "{" ".join(index)}";']
        about = (
            f"Table {table}, an entry per row keyed by its index columns: "
            f"read by {table}_get (the list by a getnext walk), {write}."
        )
        if spec["delete"]:
            about += f" Deleting an entry runs {table}_setop with action delete and the keys."
    else:
        lines = [f"{_INDENT * 2}container {table} {{"]
        about = f"Table {table}, one row without index columns: read by {table}_get, {write}."
    if not config:
        lines.append(f"{_INDENT * 3}config false;")
    lines += _description(3, about)
    for name in leaves:
        kind = "Index column" if name in index else "Column"
        lines += _leaf(3, "leaf", name, f"{kind} {name} of table {table}.")
    lines.append(f"{_INDENT * 2}}}")
    return lines


def _setop_rpc(module, table, leaves):
    if "message" in leaves:
        raise ValueError(
            f"module {module!r}, table {table!r}, column 'message': the output of rpc {table}-setop "
            "names its notify_cli lines message; rename the column, or leave it out of columns"
        )
    lines = [
        "",
        f"{_INDENT}rpc {table}-setop {{",
        *_description(2, f"Runs {table}_setop with these columns and action; answers the row it returns."),
        f"{_INDENT * 2}input {{",
    ]
    for name in leaves:
        lines += _leaf(3, "leaf", name, f"Column {name} of table {table}, passed to {table}_setop.")
    # A column named action is the action parameter itself: both are ctx.params["action"].
    if "action" not in leaves:
        lines += _leaf(3, "leaf", "action", f"The operation {table}_setop performs (for example delete).")
    lines += [f"{_INDENT * 2}}}", f"{_INDENT * 2}output {{"]
    for name in leaves:
        lines += _leaf(3, "leaf", name, f"Column {name} of the row {table}_setop answers.")
    lines += _leaf(3, "leaf-list", "message", f"The lines {table}_setop sent with notify_cli, in order.")
    lines += [f"{_INDENT * 2}}}", f"{_INDENT}}}"]
    return lines


def _leaf(depth, keyword, name, about):
    return [
        f"{_INDENT * depth}{keyword} {name} {{",
        f"{_INDENT * (depth + 1)}type string;",
        *_description(depth + 1, about),
        f"{_INDENT * depth}}}",
    ]


def _description(depth, text):
    """A description statement ``depth`` levels in, ``text`` wrapped; it holds no '"' or '\\' (names are identifiers)."""
    pad = _INDENT * (depth + 1)
    # YANG strips a continued line's indent up to and including the opening quote's column.
    first, *rest = textwrap.wrap(text, _WIDTH - len(pad) - 2, break_long_words=False, break_on_hyphens=False)
    lines = [f'{pad}"{first}', *(f"{pad} {line}" for line in rest)]
    lines[-1] += '";'
    return [f"{_INDENT * depth}description", *lines]
