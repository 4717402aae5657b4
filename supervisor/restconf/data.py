"""The data of cmactor's modules as RESTCONF resources: a GET of a table is a getnext walk,
of an entry a get; PATCH, PUT and POST are sets, DELETE and the operations setops
(README's mapping table). Each function runs on the caller's cmactor connection; what
cmactor raises becomes the RFC 8040 error it means (cm_error)."""

import json
from urllib.parse import quote

from cmactor.errors import Error, InterfaceError, OperationalError, ProgrammingError
from cmsupervisor.restconf.errors import RestconfError, bad_value, malformed, not_found, unavailable
from cmsupervisor.restconf.paths import PREFIX

# Rows a walk asks for at a time: a 100k-row table streams out page by page, never held whole.
PAGE = 500
# Bytes gathered before they are written as one chunk.
CHUNK = 16 * 1024


def leaves_of(spec):
    """A table's leaves in YANG order: its index columns, then its other declared columns."""
    return [*spec["index"], *(name for name in spec["columns"] if name not in spec["index"])]


def cm_error(exc, what):
    """The RestconfError for the cmactor error ``exc`` raised while doing ``what`` (text)."""
    if isinstance(exc, OperationalError | InterfaceError):
        # ModuleUnavailable (not READY within the hold), a timeout, a lost connection
        return unavailable(f"{what}: {exc}")
    if isinstance(exc, ProgrammingError):
        text = str(exc)
        if "unknown module" in text or "has no table" in text:
            return not_found(f"{what}: {text}")
        return bad_value(f"{what}: {text}")
    return bad_value(str(exc))  # the agent's refusal, in its words


def _row(fields, leaves, index, full):
    """An entry of the table as RFC 7951 JSON's object: only declared columns, each a string;
    only the keys when the depth does not reach the leaves (``full`` false)."""
    names = leaves if full else index
    return {name: str(fields[name]) for name in names if fields.get(name) is not None}


def get_entry(conn, module, table, params):
    """The fields a get answers for ``params`` (an entry's keys), {} for none."""
    try:
        cur = conn.cursor()
        cur.execute(f"get {module}.{table}", params)
        rows = [row.field_values for row in cur.iterrow()]
    except Error as exc:
        raise cm_error(exc, f"get {module}.{table}") from None
    return rows[0] if rows else {}


def exists(conn, module, table, params):
    """Whether the entry ``params`` names exists: its get answers fields. An agent that
    refuses the get (raise_error) says it does not."""
    try:
        return bool(get_entry(conn, module, table, params))
    except RestconfError as exc:
        if exc.status == 400:
            return False
        raise


def walk(conn, module, table, index):
    """Every row of a getnext walk, page by page (PAGE rows each)."""
    cur = conn.cursor()
    cur.index = list(index)
    cur.limit = PAGE
    params = {}
    while True:
        try:
            cur.execute(f"getnext {module}.{table}", params)
        except Error as exc:
            raise cm_error(exc, f"getnext {module}.{table}") from None
        rows = [row.field_values for row in cur.iterrow()]
        yield from rows
        if not cur.more or not rows:
            return
        last = rows[-1]
        missing = [name for name in index if last.get(name) is None]
        if missing:  # the walk could not go on from it: it would start again, for ever
            raise bad_value(f"getnext {module}.{table}: a row lacks its index column {missing[0]}")
        params = {name: last[name] for name in index}


def _chunks(pieces):
    """``pieces`` (str) gathered into chunks of about CHUNK bytes."""
    out, size = [], 0
    for piece in pieces:
        data = piece.encode()
        out.append(data)
        size += len(data)
        if size >= CHUNK:
            yield b"".join(out)
            out, size = [], 0
    yield b"".join(out)


def _dump(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _list_pieces(rows, leaves, index, full):
    """The entries of a list as the pieces of a JSON array's inside."""
    first = True
    for fields in rows:
        yield ("" if first else ",") + _dump(_row(fields, leaves, index, full))
        first = False


def selected(spec, content):
    """Whether the content parameter's value selects this table (config true or false)."""
    return content == "all" or (content == "config") == spec["config"]


def module_body(conn, mod, query, inner=False):
    """The chunks of GET cmactor-M:M: every table the content selects, to the depth asked;
    ``inner``: the member alone, without the object around it (GET /restconf/data)."""
    depth, content = query["depth"], query["content"]
    end = "}" if inner else "}}\n"

    def pieces():
        yield ("" if inner else "{") + _dump(f"{PREFIX}{mod.name}:{mod.name}") + ":{"
        if depth is not None and depth < 2:
            yield end
            return
        full = depth is None or depth >= 3
        first = True
        for table, spec in mod.tables.items():
            if not selected(spec, content):
                continue
            leaves = leaves_of(spec)
            if spec["index"]:
                rows = walk(conn, mod.name, table, spec["index"])
                entries = _list_pieces(rows, leaves, spec["index"], full)
                head = next(entries, None)
                if head is None:
                    continue  # a list without entries is not there (RFC 7951 5.4)
                yield ("" if first else ",") + _dump(table) + ":[" + head
                yield from entries
                yield "]"
            else:
                fields = get_entry(conn, mod.name, table, {}) if full else {}
                yield ("" if first else ",") + _dump(table) + ":" + _dump(_row(fields, leaves, [], full))
            first = False
        yield end

    return _chunks(pieces())


def table_body(conn, mod, table, spec, query):
    """The chunks of GET cmactor-M:M/T: a list's every entry (404 when it has none), a container's fields."""
    name = _dump(f"{PREFIX}{mod.name}:{table}")
    leaves = leaves_of(spec)
    full = query["depth"] is None or query["depth"] >= 2
    if not spec["index"]:
        fields = get_entry(conn, mod.name, table, {}) if full else {}
        return iter([("{" + name + ":" + _dump(_row(fields, leaves, [], full)) + "}\n").encode()])
    entries = _list_pieces(walk(conn, mod.name, table, spec["index"]), leaves, spec["index"], full)
    head = next(entries, None)  # the first page, asked before anything is answered: its error is the answer
    if head is None:
        raise not_found(f"table {table} has no entries", f"/{PREFIX}{mod.name}:{mod.name}/{table}")

    def pieces():
        yield "{" + name + ":[" + head
        yield from entries
        yield "]}\n"

    return _chunks(pieces())


def entry_fields(conn, target, spec):
    """The declared fields of the entry ``target`` names; 404 when its get answers none."""
    params = dict(zip(spec["index"], target.keys or ()))
    try:
        fields = get_entry(conn, target.module, target.table, params)
    except RestconfError as exc:
        if exc.status != 400:
            raise
        # The agent refused to get it: for a GET of one entry, that entry is not there.
        raise not_found(exc.message, target.instance(spec["index"])) from None
    fields = {name: value for name, value in fields.items() if name in leaves_of(spec) and value is not None}
    if not fields:
        raise not_found(f"no entry {target.instance(spec['index'])}", target.instance(spec["index"]))
    return fields


def entry_body(conn, target, spec, query):
    fields = entry_fields(conn, target, spec)
    full = query["depth"] is None or query["depth"] >= 2
    row = _row(fields, leaves_of(spec), spec["index"], full)
    return (_dump({f"{PREFIX}{target.module}:{target.table}": [row]}) + "\n").encode()


def leaf_body(conn, target, spec):
    if target.keys is None:
        fields = get_entry(conn, target.module, target.table, {})
    else:
        fields = entry_fields(conn, target, spec)
    value = fields.get(target.leaf)
    if value is None:
        raise not_found(f"leaf {target.leaf} has no value", target.instance(spec["index"]))
    return (_dump({f"{PREFIX}{target.module}:{target.leaf}": str(value)}) + "\n").encode()


# -- bodies of writes --------------------------------------------------------


def _unique(pairs):
    found = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"member {key!r} appears twice in one object")
        found[key] = value
    return found


def parse_body(data):
    """The JSON of a request body (a JSON object); 400 malformed-message if it is not one."""
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique)
    except UnicodeDecodeError as exc:
        raise malformed(f"the body is not UTF-8 text (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise malformed(f"the body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise malformed("the body must be a JSON object, its member the resource (RFC 7951)")
    return value


def only_member(body, name, what):
    """The value of the body's one member ``name`` (module-qualified), or 400."""
    if list(body) != [name]:
        raise bad_value(f"the body of {what} must hold one member, {name!r}; it holds {', '.join(map(repr, body))}")
    return body[name]


def fields_of(value, module, table, spec, keys=None, path=None):
    """The params of a set from an entry (or a container table's object) ``value``: every
    member a declared column and a string; the keys, where the URL gives them
    (``keys``), equal to the body's or filled in from them."""
    where = path or f"/{PREFIX}{module}:{module}/{table}"
    if not isinstance(value, dict):
        raise bad_value(f"an entry of table {table} must be a JSON object, got {_dump(value)[:80]}", where)
    leaves = leaves_of(spec)
    params = {}
    for name, item in value.items():
        bare = name.removeprefix(f"{PREFIX}{module}:")
        if bare not in leaves:
            raise bad_value(f"table {table} has no leaf {name!r}; its leaves: {', '.join(leaves)}", where)
        if not isinstance(item, str):
            raise bad_value(
                f"leaf {bare} of table {table} is a string (every cmactor value is); got {_dump(item)[:80]}", where
            )
        params[bare] = item
    if keys is not None:
        for column, key in zip(spec["index"], keys):
            if params.setdefault(column, key) != key:
                raise bad_value(
                    f"key {column} is {params[column]!r} in the body but {key!r} in the URL: they must be the same",
                    where,
                )
    missing = [column for column in spec["index"] if column not in params]
    if missing:
        raise bad_value(f"an entry of table {table} needs its key {missing[0]}", where)
    return params


def entries_of(value, module, table, spec):
    """The params of each entry in ``value``: a list's JSON array, or a container table's object."""
    if spec["index"]:
        if not isinstance(value, list) or not value:
            raise bad_value(f"table {table} is a list: give its entries as a JSON array of objects")
        return [fields_of(item, module, table, spec) for item in value]
    return [fields_of(value, module, table, spec)]


def set_row(conn, module, table, params):
    try:
        conn.cursor().execute(f"set {module}.{table}", params)
    except Error as exc:
        raise cm_error(exc, f"set {module}.{table}") from None


def setop(conn, module, table, params):
    """Run the setop; (the first row it answers, the notify_cli lines it sent)."""
    cur = conn.cursor()
    try:
        cur.execute(f"setop {module}.{table}", params)
    except Error as exc:
        raise cm_error(exc, f"setop {module}.{table}") from None
    rows = [row.field_values for row in cur.iterrow()]
    return (rows[0] if rows else {}), list(cur.messages)


def entry_url(module, table, index, params):
    keys = ",".join(quote(params[name], safe="") for name in index)
    return f"/restconf/data/{PREFIX}{module}:{module}/{table}={keys}"
