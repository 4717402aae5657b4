"""The RESTCONF server (RFC 8040): HTTP/1.1 on the standard library's http.server, a client
of the supervisor.

Each HTTP connection is served by a thread of its own (ThreadingHTTPServer, daemon
threads) with keep-alive, and keeps one cmactor connection, opened at its first request
as the user the request was authenticated as (again if that user changes, or if it
broke). What one client can hold is bounded: ``max_connections`` connections at once. At the
cap, a newcomer takes the place of a connection waiting for a request (or for the rest
of its headers): one that has never had a request answered first, the longest waiting
first, so that a client reopening slow connections neither keeps newcomers out nor
cuts a client using its keep-alive connection; with every connection in the middle of
a request, the newcomer is answered 503 and closed at once, without a thread. Then
``idle_timeout``
seconds between requests; ``request_timeout`` seconds for a request's line and
headers, and again for its body, however slowly they trickle in (a deadline, not a
per-read timeout); a body of at most ``max_body`` bytes, announced by Content-Length
(more: 413, and it is never read); the request line and each header line at most 64 KiB
and at most 100 headers (http.server's own bounds, answered 414 and 431).

Nothing a client sends gets a traceback back or stops the server: an unexpected error
is logged and answered 500 (or, once a streamed answer has begun, the connection is
closed mid-body, which the client sees as a truncated answer).
"""

import io
import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cmactor
from cmactor.errors import Error
from cmsupervisor.restconf import data
from cmsupervisor.restconf.errors import (
    MEDIA,
    RestconfError,
    bad_value,
    malformed,
    not_allowed,
    not_found,
)
from cmsupervisor.restconf.library import YANG_LIBRARY_VERSION
from cmsupervisor.restconf.paths import PREFIX, Target, parse, query

log = logging.getLogger("cmactor.restconf")

YANG_MEDIA = "application/yang"
XRD_MEDIA = "application/xrd+xml"
HOST_META = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<XRD xmlns='http://docs.oasis-open.org/ns/xri/xrd-1.0'>\n"
    b"  <Link rel='restconf' href='/restconf'/>\n"
    b"</XRD>\n"
)
# Seconds a cmactor request may take before its HTTP request is answered 503.
CM_TIMEOUT = 60.0
# An answer to a connection past max_connections: sent whole by one send, then closed.
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: " + MEDIA.encode() + b"\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)
_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?\Z|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?\Z")
_OPERATION = re.compile(rf"{PREFIX}([A-Za-z_][A-Za-z0-9_]*):([A-Za-z_][A-Za-z0-9_.-]*)-setop\Z")
# What each kind of resource takes (the Allow of its 405), config true and config false.
_READ = ("GET", "HEAD", "OPTIONS")


def _busy_answer():
    body = RestconfError(503, "resource-denied", "too many connections to this RESTCONF server; try again").body()
    return BUSY % (len(body), body)


class _DeadlineIO(io.RawIOBase):
    """A socket's reads with one deadline for many of them: a client sending a byte now
    and then still has to be done by ``deadline`` (time.monotonic())."""

    def __init__(self, sock):
        self.sock = sock
        self.deadline = time.monotonic()

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client took too long")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


def accepts(header, *media):
    """Whether an Accept header takes one of ``media`` (absent: anything)."""
    if header is None or not header.strip():
        return True
    for item in header.split(","):
        kind, *params = (part.strip() for part in item.split(";"))
        kind = kind.lower()
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality <= 0:
            continue
        for wanted in media:
            if kind in (wanted, "*/*", wanted.split("/")[0] + "/*"):
                return True
    return False


class Handler(BaseHTTPRequestHandler):
    """One HTTP connection: its requests in turn (keep-alive), each answered as RFC 8040 says."""

    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: an answer goes out as its head, then its body (two writes); with Nagle's
    # algorithm the body waited for the client's delayed ACK of the head, 40 ms a request on
    # a keep-alive connection (tests/test_restconf_hostile.py, perf/restconf.py).
    disable_nagle_algorithm = True

    def version_string(self):
        return "cmactor-restconf"

    # -- the connection ---------------------------------------------------

    def setup(self):
        super().setup()
        self.rfile.close()  # read through a deadline instead
        self._io = _DeadlineIO(self.connection)
        self.rfile = io.BufferedReader(self._io, 64 * 1024)
        self._cm = None
        self._cm_user = None
        self._started = False  # whether this request's status line has gone out

    def finish(self):
        try:
            super().finish()
        finally:
            self._drop_cm()

    def _drop_cm(self):
        if self._cm is not None:
            try:
                self._cm.close()
            except Exception:  # closing a broken connection: nothing more to do with it
                pass
            self._cm = None

    def parse_request(self):
        parsed = super().parse_request()
        if parsed:  # its headers are in: no newcomer takes its place until it is answered
            self.server.serving(self.connection)
        return parsed

    def handle_one_request(self):
        server = self.server
        self._started = False
        server.waiting(self.connection)
        self._io.deadline = time.monotonic() + server.idle_timeout
        try:
            if not self.rfile.peek(1):  # the client closed the connection
                self.close_connection = True
                return
        except OSError:  # idle too long (TimeoutError), or reset
            self.close_connection = True
            return
        self._io.deadline = time.monotonic() + server.request_timeout
        try:
            super().handle_one_request()
        except OSError:  # the client went away, or stopped reading what it is sent
            self.close_connection = True

    def handle_expect_100(self):
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.server.max_body:
            self._error(self._too_big(int(length)))
            return False
        return super().handle_expect_100()

    def log_message(self, format, *args):  # noqa: A002 - http.server's name
        log.debug("%s %s", self.address_string(), format % args)

    def log_error(self, format, *args):  # noqa: A002
        log.info("%s %s", self.address_string(), format % args)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, too long, too many headers, an
        unknown method), as RFC 8040 error bodies."""
        tag = {414: "too-big", 431: "too-big", 501: "operation-not-supported"}.get(code, "malformed-message")
        self.close_connection = True
        self.request_version = self.protocol_version  # a status line even to what looks like HTTP/0.9
        self._error(RestconfError(code, tag, message or self.responses.get(code, ("error",))[0], kind="protocol"))

    # -- answering ----------------------------------------------------------

    def _head(self, status, media, headers=(), length=None):
        self._started = True
        self.send_response(status)
        if media is not None:
            self.send_header("Content-Type", media)
        for name, value in headers:
            self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def _answer(self, status, body=b"", media=MEDIA, headers=()):
        self.connection.settimeout(self.server.idle_timeout)
        self._head(status, media if body else None, headers, len(body))
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _stream(self, chunks, media=MEDIA):
        """200 with the body ``chunks`` (bytes) in chunked transfer-encoding. The first is
        made before anything is sent: its RestconfError is the answer. A later error can
        only cut the body short: the connection is closed without the last chunk."""
        first = next(chunks, b"")
        self.connection.settimeout(self.server.idle_timeout)
        self._head(200, media)
        if self.command == "HEAD":
            chunks.close()
            self.wfile.write(b"0\r\n\r\n")
            return
        try:
            self._chunk(first)
            for chunk in chunks:
                self._chunk(chunk)
        except RestconfError as exc:
            log.warning("%s %s: answer cut short: %s", self.command, self.path, exc.message)
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, chunk):
        if chunk:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    def _error(self, exc):
        if getattr(self, "_length", 0):
            self.close_connection = True  # its body is not read: the next request cannot be found
        if exc.status >= 500 or exc.status in (413, 411):
            log.info("%s %s: %d %s", self.command, getattr(self, "path", ""), exc.status, exc.message)
        self._answer(exc.status, exc.body() if self.command != "HEAD" else b"", headers=exc.headers)

    def _too_big(self, length):
        self.close_connection = True  # its body is left unread
        return RestconfError(
            413, "too-big", f"a request body of {length} bytes is more than this server takes ({self.server.max_body})"
        )

    # -- requests -------------------------------------------------------------

    def do_GET(self):
        self._serve()

    def do_HEAD(self):
        self._serve()

    def do_OPTIONS(self):
        self._serve()

    def do_PATCH(self):
        self._serve()

    def do_PUT(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def do_DELETE(self):
        self._serve()

    def _serve(self):
        self._length = 0
        try:
            self._route()
        except _Answered:
            pass
        except RestconfError as exc:
            if self._started:
                self.close_connection = True
            else:
                self._error(exc)
        except OSError:
            raise  # the client's connection: handle_one_request closes it
        except Exception:
            log.exception("%s %s: internal error", self.command, self.path)
            self.close_connection = True
            if not self._started:
                self._error(RestconfError(500, "operation-failed", "internal error; the server's log has its cause"))

    def _route(self):
        path, _, text = self.path.partition("?")
        path = re.sub(r"^https?://[^/]*", "", path)
        self._read_body_length()  # first: a body too big is refused unread
        if path == "/.well-known/host-meta":
            self._allow(_READ)
            if not accepts(self.headers.get("Accept"), XRD_MEDIA):
                raise RestconfError(406, "invalid-value", f"this resource is {XRD_MEDIA}", kind="protocol")
            return self._answer(200, HOST_META, XRD_MEDIA)
        if not (path == "/restconf" or path.startswith("/restconf/")):
            raise not_found(f"{path} is not a resource of this server: RESTCONF is at /restconf")
        user = self._user()
        if path.startswith("/restconf/yang/"):
            self._allow(_READ)
            query(text, ())
            if not accepts(self.headers.get("Accept"), YANG_MEDIA):
                raise RestconfError(406, "invalid-value", f"a YANG module is {YANG_MEDIA}", kind="protocol")
            found = self.server.library.text(path.removeprefix("/restconf/yang/"))
            if found is None:
                raise not_found(f"no YANG module {path.removeprefix('/restconf/yang/')!r} on this server")
            return self._answer(200, found.encode(), YANG_MEDIA)
        if self.command not in ("OPTIONS", "DELETE") and not accepts(self.headers.get("Accept"), MEDIA):
            raise RestconfError(406, "invalid-value", f"this server answers {MEDIA}", kind="protocol")
        if path in ("/restconf", "/restconf/"):
            self._allow(_READ)
            query(text, ())
            root = {"data": {}, "operations": {}, "yang-library-version": YANG_LIBRARY_VERSION}
            return self._json(200, {"ietf-restconf:restconf": root})
        if path == "/restconf/yang-library-version":
            self._allow(_READ)
            query(text, ())
            return self._json(200, {"ietf-restconf:yang-library-version": YANG_LIBRARY_VERSION})
        if path in ("/restconf/operations", "/restconf/operations/"):
            self._allow(_READ)
            query(text, ())
            return self._json(200, {"ietf-restconf:operations": self._operations()})
        if path.startswith("/restconf/operations/"):
            return self._operation(path.removeprefix("/restconf/operations/"), text, user)
        if path in ("/restconf/data", "/restconf/data/"):
            self._allow(_READ)
            return self._datastore(query(text, ("content", "depth")), user)
        if path.startswith("/restconf/data/ietf-yang-library:yang-library"):
            self._allow(_READ)
            query(text, ())
            if path.rstrip("/") != "/restconf/data/ietf-yang-library:yang-library":
                raise not_found("the yang-library is served whole: /restconf/data/ietf-yang-library:yang-library")
            return self._json(200, self.server.library.yang_library(self._base_url()))
        if path.startswith("/restconf/data/"):
            return self._data(parse(path.removeprefix("/restconf/data/")), text, user)
        raise not_found(f"{path} is not a RESTCONF resource of this server")

    def _allow(self, methods, what="this resource"):
        """405 unless the request's method is among ``methods``; OPTIONS is answered here."""
        if self.command not in methods:
            raise not_allowed(self.command, methods, what)
        if self.command == "OPTIONS":
            self._answer(200, headers=[("Allow", ", ".join(methods))])
            raise _Answered

    def _json(self, status, value):
        self._answer(status, json.dumps(value, ensure_ascii=False).encode() + b"\n")

    def _base_url(self):
        host = self.headers.get("Host", "")
        if not _HOST.match(host):
            host, port = self.server.server_address[:2]
            host = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"{self.server.scheme}://{host}"

    # -- who, and their cmactor connection ------------------------------------

    def _user(self):
        try:
            user = self.server.user_of(self.headers)
        except Exception:
            log.exception("checking the credentials of %s", self.address_string())
            user = None
        if user is None:
            raise RestconfError(
                401,
                "access-denied",
                "give a user name and password (HTTP Basic) that this server's users file holds",
                kind="protocol",
                headers=[("WWW-Authenticate", 'Basic realm="cmactor"')],
            )
        return user

    def _conn(self, user):
        """This HTTP connection's cmactor connection, as ``user``."""
        if self._cm is not None and (self._cm.closed or self._cm_user != user):
            self._drop_cm()
        if self._cm is None:
            try:
                self._cm = self.server.connect(user)
            except Error as exc:
                raise data.cm_error(exc, "connecting to the cmactor supervisor") from None
            self._cm_user = user
        return self._cm

    # -- bodies -----------------------------------------------------------------

    def _read_body_length(self):
        """The request's Content-Length (0: no body); 411, 413 or 400 for what cannot be read."""
        self._length = 0
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            raise RestconfError(
                411, "malformed-message", "send a body with a Content-Length, not chunked", kind="protocol"
            )
        text = self.headers.get("Content-Length")
        if text is None:
            return
        if not (text.isdigit() and text.isascii()):
            self.close_connection = True
            raise malformed(f"Content-Length {text!r} is not a number of bytes")
        length = int(text)
        if length > self.server.max_body:
            raise self._too_big(length)
        self._length = length

    def _body(self, required=True):
        """The request body as JSON (None when there is none and none is ``required``)."""
        if self._length == 0:
            if required:
                raise malformed(f"{self.command} needs a body ({MEDIA})")
            return None
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        raw = self._read(self._length)
        if kind != MEDIA:
            raise RestconfError(
                415, "invalid-value", f"a body is {MEDIA} (RFC 7951 JSON), not {kind or 'untyped'}", kind="protocol"
            )
        return data.parse_body(raw)

    def _read(self, length):
        self._length = 0
        self._io.deadline = time.monotonic() + self.server.request_timeout
        raw = self.rfile.read(length)
        if len(raw) < length:
            self.close_connection = True
            raise malformed("the body ended before its Content-Length")
        return raw

    def _no_body(self):
        if self._length:
            self._read(self._length)  # read and dropped: the next request follows it

    # -- data -------------------------------------------------------------------

    def _datastore(self, wanted, user):
        """GET /restconf/data: every module's container, one after the other."""
        self._no_body()
        conn = self._conn(user)
        modules = list(self.server.library.current().values())

        def chunks():
            yield b"{"
            for number, mod in enumerate(modules):
                if number:
                    yield b","
                yield from data.module_body(conn, mod, wanted, inner=True)
            yield b"}\n"

        self._stream(chunks())

    def _data(self, target, text, user):
        library = self.server.library
        mod = library.module(target.module)
        spec = None
        if target.table is not None:
            mod, spec = library.table(target.module, target.table)
        allowed = self._methods(target, spec)
        self._allow(allowed, f"{target.instance(spec['index'] if spec else ())}")
        wanted = query(text, ("content", "depth") if self.command in ("GET", "HEAD") else ())
        self._check_target(target, spec)
        if self.command in ("GET", "HEAD"):
            self._no_body()
            conn = self._conn(user)
            if spec is not None and not data.selected(spec, wanted["content"]):
                raise not_found(
                    f"table {target.table} is config {str(spec['config']).lower()}: content={wanted['content']} "
                    "selects none of it",
                    target.instance(spec["index"]),
                )
            if spec is None:
                return self._stream(data.module_body(conn, mod, wanted))
            if target.leaf is not None:
                return self._answer(200, data.leaf_body(conn, target, spec))
            if target.keys is not None:
                return self._answer(200, data.entry_body(conn, target, spec, wanted))
            return self._stream(data.table_body(conn, mod, target.table, spec, wanted))
        if self.command == "DELETE":
            return self._delete(target, spec, user)
        body = self._body()
        conn = self._conn(user)
        if self.command == "POST":
            return self._create(target, mod, spec, body, conn)
        writes = self._writes(target, mod, spec, body)
        if self.command == "PUT" and target.keys is not None and target.leaf is None:
            ((table, params),) = writes
            existed = data.exists(conn, target.module, table, dict(zip(spec["index"], target.keys)))
            data.set_row(conn, target.module, table, params)
            return self._answer(204 if existed else 201)
        for table, params in writes:  # one set each, in order: no transaction (README)
            data.set_row(conn, target.module, table, params)
        return self._answer(204)

    def _methods(self, target, spec):
        """What the resource ``target`` takes (its Allow)."""
        if spec is None:
            return (*_READ, "PATCH", "POST")
        if not spec["config"]:
            return _READ
        if target.leaf is not None or (target.keys is None and not spec["index"]):
            return (*_READ, "PATCH", "PUT")
        if target.keys is None:
            return (*_READ, "PATCH", "POST")
        return (*_READ, "PATCH", "PUT", *(("DELETE",) if spec["delete"] else ()))

    def _check_target(self, target, spec):
        if spec is None:
            return
        where = target.instance(spec["index"])
        if target.keys is not None:
            if not spec["index"]:
                raise bad_value(f"table {target.table} is a container: it has no keys to give", where)
            if len(target.keys) != len(spec["index"]):
                raise bad_value(
                    f"an entry of table {target.table} is named by {len(spec['index'])} keys "
                    f"({', '.join(spec['index'])}), in order; {len(target.keys)} given",
                    where,
                )
        if target.leaf is not None:
            if spec["index"] and target.keys is None:
                raise bad_value(
                    f"a leaf of table {target.table} belongs to an entry: {target.table}=KEYS/{target.leaf}"
                )
            if target.leaf not in data.leaves_of(spec):
                raise not_found(f"table {target.table} has no leaf {target.leaf!r}", where)

    def _writes(self, target, mod, spec, body):
        """(table, params) of each set a PATCH or PUT of ``target`` with ``body`` makes."""
        module = target.module
        if spec is None:  # the module's container: any of its config tables
            inside = data.only_member(body, f"{PREFIX}{module}:{module}", "a PATCH of the module")
            if not isinstance(inside, dict):
                raise bad_value(f"{PREFIX}{module}:{module} is a container: give a JSON object")
            writes = []
            for table, value in inside.items():
                table = table.removeprefix(f"{PREFIX}{module}:")
                found = mod.tables.get(table)
                if found is None or not found["config"]:
                    raise bad_value(
                        f"module {PREFIX}{module} has no config table {table!r}", f"/{PREFIX}{module}:{module}"
                    )
                writes += [(table, params) for params in data.entries_of(value, module, table, found)]
            return writes
        table = target.table
        where = target.instance(spec["index"])
        if target.leaf is not None:
            value = data.only_member(body, f"{PREFIX}{module}:{target.leaf}", f"leaf {target.leaf}")
            keys = dict(zip(spec["index"], target.keys or ()))
            params = data.fields_of({**keys, target.leaf: value}, module, table, spec, target.keys, where)
            return [(table, params)]
        value = data.only_member(body, f"{PREFIX}{module}:{table}", f"table {table}")
        if target.keys is None:
            return [(table, params) for params in data.entries_of(value, module, table, spec)]
        if not isinstance(value, list) or len(value) != 1:
            raise bad_value(f"an entry of list {table} is a JSON array of one object", where)
        return [(table, data.fields_of(value[0], module, table, spec, target.keys, where))]

    def _create(self, target, mod, spec, body, conn):
        """POST: a new entry of a list (to the module's container, RFC 8040's form, or to the list)."""
        module = target.module
        if spec is None:
            if len(body) != 1:
                raise bad_value("POST one new resource: the body holds one member, the list it is an entry of")
            (name,) = body
            table = name.removeprefix(f"{PREFIX}{module}:")
            spec = mod.tables.get(table)
            if spec is None or not spec["config"]:
                raise bad_value(f"module {PREFIX}{module} has no config table {table!r}", f"/{PREFIX}{module}:{module}")
        else:
            table = target.table
        value = data.only_member(body, f"{PREFIX}{module}:{table}", f"a POST to table {table}")
        if not spec["index"]:
            raise RestconfError(409, "data-exists", f"table {table} is a container: it is always there; PATCH it")
        if not isinstance(value, list) or len(value) != 1:
            raise bad_value(f"POST one new entry of list {table}: a JSON array of one object")
        params = data.fields_of(value[0], module, table, spec)
        keys = {name: params[name] for name in spec["index"]}
        url = data.entry_url(module, table, spec["index"], params)
        if data.exists(conn, module, table, keys):
            where = Target(module, table, tuple(keys.values())).instance(spec["index"])
            raise RestconfError(409, "data-exists", f"{url} exists already; PATCH or PUT it", where)
        data.set_row(conn, module, table, params)
        self._answer(201, headers=[("Location", url)])

    def _delete(self, target, spec, user):
        self._no_body()
        conn = self._conn(user)
        keys = dict(zip(spec["index"], target.keys))
        if not data.exists(conn, target.module, target.table, keys):
            raise not_found(f"no entry {target.instance(spec['index'])}", target.instance(spec["index"]))
        data.setop(conn, target.module, target.table, {**keys, "action": "delete"})
        self._answer(204)

    # -- operations ---------------------------------------------------------------

    def _operations(self):
        found = {}
        for mod in self.server.library.current().values():
            for table, spec in mod.tables.items():
                if spec["setop"]:
                    found[f"{mod.yang_name}:{table}-setop"] = [None]
        return found

    def _operation(self, name, text, user):
        match = _OPERATION.match(name)
        if match is None:
            raise not_found(f"no operation {name!r}: operations are cmactor-MODULE:TABLE-setop")
        module, table = match.groups()
        self._allow(("POST", "OPTIONS"), f"operation {name}")
        query(text, ())
        _, spec = self.server.library.table(module, table)
        if not spec["setop"]:
            raise not_found(f"table {table} of module {PREFIX}{module} has no setop")
        body = self._body(required=False)
        params = {}
        if body is not None:
            value = data.only_member(body, f"{PREFIX}{module}:input", f"operation {name}")
            inputs = {**{leaf: None for leaf in data.leaves_of(spec)}, "action": None}
            if not isinstance(value, dict):
                raise bad_value(f"the input of {name} is a JSON object of its leaves")
            for leaf, item in value.items():
                leaf = leaf.removeprefix(f"{PREFIX}{module}:")
                if leaf not in inputs:
                    raise bad_value(f"operation {name} has no input leaf {leaf!r}; its leaves: {', '.join(inputs)}")
                if not isinstance(item, str):
                    raise bad_value(f"input leaf {leaf} of {name} is a string, got {json.dumps(item)[:80]}")
                params[leaf] = item
        row, messages = data.setop(self._conn(user), module, table, params)
        output = {leaf: str(row[leaf]) for leaf in data.leaves_of(spec) if row.get(leaf) is not None}
        if messages:
            output["message"] = [str(line) for line in messages]
        if not output:
            return self._answer(204)
        self._json(200, {f"{PREFIX}{module}:output": output})


class _Answered(Exception):
    """Raised past the rest of _route once the answer is sent (an OPTIONS)."""


class Server(ThreadingHTTPServer):
    """The RESTCONF server: ``library`` (library.Library), ``connect(user)`` (a cmactor
    connection as ``user``), ``user_of(headers)`` (the authenticated user's name, None:
    401), and the bounds (config.RESTCONF_OPTIONS)."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address,
        library,
        connect,
        user_of,
        max_connections=64,
        max_body=1024 * 1024,
        idle_timeout=30.0,
        request_timeout=10.0,
        ssl_context=None,
    ):
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.library = library
        self.connect = connect
        self.user_of = user_of
        self.max_connections = max_connections
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.ssl_context = ssl_context
        self.scheme = "https" if ssl_context is not None else "http"
        self._count_lock = threading.Lock()
        self.active = 0
        # Each connection's socket -> [time.monotonic() since which it waits for a request (or
        # its TLS handshake, or the rest of its headers), None while one is served; whether
        # it has had a request answered]: which one a newcomer past the cap replaces.
        self._conns = {}
        super().__init__(address, Handler)

    def waiting(self, sock):
        with self._count_lock:
            if sock in self._conns:
                self._conns[sock][0] = time.monotonic()

    def serving(self, sock):
        with self._count_lock:
            if sock in self._conns:
                self._conns[sock] = [None, True]

    def process_request(self, request, client_address):
        victim = None
        with self._count_lock:
            if self.active >= self.max_connections:
                waiting = [(served, since, id(sock), sock) for sock, (since, served) in self._conns.items() if since]
                if waiting:
                    victim = min(waiting)[3]
                    del self._conns[victim]  # its thread counts it out as it ends
            busy = self.active >= self.max_connections and victim is None
            if not busy:
                self.active += 1
                self._conns[request] = [time.monotonic(), False]
        if busy:
            self._refuse(request)
            return
        if victim is not None:
            try:
                victim.shutdown(socket.SHUT_RDWR)  # its blocked read ends: its thread closes it
            except OSError:
                pass
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._count_lock:
                self.active -= 1
                self._conns.pop(request, None)
            raise

    def _refuse(self, request):
        """Answer 503 and close, in the accepting thread: one send that the socket's buffer takes."""
        try:
            if self.ssl_context is None:
                request.setblocking(False)
                request.send(_busy_answer())
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        sock = request
        try:
            if self.ssl_context is not None:
                request.settimeout(self.request_timeout)
                sock = self.ssl_context.wrap_socket(request, server_side=True)
                with self._count_lock:  # the TLS socket is the one its requests are read from now
                    if request in self._conns:
                        self._conns[sock] = self._conns.pop(request)
            super().process_request_thread(sock, client_address)
        except OSError as exc:  # a failed TLS handshake
            log.info("%s: %s", client_address[0], exc)
            self.shutdown_request(sock)
        finally:
            with self._count_lock:
                self.active -= 1
                self._conns.pop(request, None)
                self._conns.pop(sock, None)

    def handle_error(self, request, client_address):
        log.debug("connection from %s ended by an error", client_address[0], exc_info=True)

    @property
    def url(self):
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{port}"


def connector(socket_path, timeout=CM_TIMEOUT):
    """``connect(user)``: a cmactor connection to the supervisor at ``socket_path``, as
    ``user``; notify_cli lines kept in the cursor (an operation's message)."""

    def connect(user):
        return cmactor.connect(username=user, socket=socket_path, timeout=timeout, print_callback=_ignore)

    return connect


def _ignore(text):
    """A print_callback: the cursor keeps the lines (Cursor.messages), nothing is printed."""


__all__ = ["Handler", "Server", "Target", "accepts", "connector"]
