"""A small etcd v3 client on etcd's JSON gateway, standard library only.

etcd serves on its client port, next to gRPC, a JSON translation of its gRPC API
(grpc-gateway): ``POST /v3/kv/range`` with ``{"key": ...}`` and so on. In that JSON keys
and values are base64, int64 fields are strings, and fields at their zero value are left
out: a false "succeeded", a PUT event's "type", a count of 0. The streaming calls (watch,
lease keepalive) answer one JSON object per line, ``{"result": ...}`` or ``{"error": ...}``.

Every request but status() carries the gRPC metadata "hasleader" (the gateway passes
``Grpc-Metadata-*`` headers on): a member that has lost its leader then refuses at once
with "etcdserver: no leader", where it would hold a write until its own request timeout
(5 s and more), so the client moves on to another member; and such a member ends the
watch streams it serves instead of leaving them silently behind the cluster.
"""

import base64
import http.client
import itertools
import json
import select
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

_HEADERS = {"Content-Type": "application/json"}
_LEADER_HEADERS = {**_HEADERS, "Grpc-Metadata-hasleader": "true"}

# gRPC's UNAVAILABLE: the member cannot serve now (no leader, stopping, timed out, overloaded).
_UNAVAILABLE = 14
# The UNAVAILABLE answers with which a member refuses a request before acting on it: a write
# so refused may go to another member. Any other one ("request timed out", "leader changed")
# leaves a write's outcome unknown.
_NOT_APPLIED = {"etcdserver: no leader", "etcdserver: too many requests"}
_LEASE_NOT_FOUND = "etcdserver: requested lease not found"


class EtcdError(Exception):
    """etcd answered with an error (message names endpoint, path and etcd's error)."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the timeout. .sent: True if a request may have reached etcd
    (its outcome is unknown), False if it surely did not."""

    def __init__(self, message, sent):
        super().__init__(message)
        self.sent = sent


class EtcdCompacted(EtcdError):
    """A watch's start revision was compacted; .compact_revision: the oldest revision left."""

    def __init__(self, message, compact_revision):
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # "PUT" or "DELETE"
    kv: KV


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list  # for each op of the branch that ran: a list[KV] for a get, None for a put or a delete


@dataclass(frozen=True, slots=True)
class RangeResult:
    kvs: list[KV]
    more: bool
    count: int
    revision: int


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that covers every key starting with prefix (b"\\0", "every key", for b"" or all 0xff)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _kv(kv: dict) -> KV:
    return KV(
        key=base64.b64decode(kv.get("key", "")),
        value=base64.b64decode(kv.get("value", "")),
        create_revision=int(kv.get("create_revision", 0)),
        mod_revision=int(kv.get("mod_revision", 0)),
        version=int(kv.get("version", 0)),
        lease=int(kv.get("lease", 0)),
    )


def _revision(answer: dict) -> int:
    return int(answer["header"]["revision"])


def _key_range(key: bytes, range_end: bytes | None) -> dict:
    if range_end is not None:
        # etcd refuses an empty key; b"\0" to b"\0" is its "every key" (so prefix_end(b"") works).
        return {"key": _b64(key or b"\0"), "range_end": _b64(range_end)}
    return {"key": _b64(key)}


_RESULTS = {"=": "EQUAL", "!=": "NOT_EQUAL", ">": "GREATER", "<": "LESS"}


def _compare(key: bytes, op: str, target: str, field: str, value) -> dict:
    if op not in _RESULTS:
        raise ValueError(f"compare operator {op!r}: expected one of {', '.join(_RESULTS)}")
    return {"key": _b64(key), "result": _RESULTS[op], "target": target, field: value}


class Compare:
    """The compares of a txn, as the JSON the gateway takes."""

    @staticmethod
    def create_revision(key: bytes, op: str, revision: int) -> dict:
        return _compare(key, op, "CREATE", "create_revision", str(revision))

    @staticmethod
    def mod_revision(key: bytes, op: str, revision: int) -> dict:
        return _compare(key, op, "MOD", "mod_revision", str(revision))

    @staticmethod
    def version(key: bytes, op: str, version: int) -> dict:
        return _compare(key, op, "VERSION", "version", str(version))

    @staticmethod
    def value(key: bytes, op: str, value: bytes) -> dict:
        return _compare(key, op, "VALUE", "value", _b64(value))


class Op:
    """The operations of a txn, as the JSON the gateway takes."""

    @staticmethod
    def put(key: bytes, value: bytes, lease: int = 0) -> dict:
        request = {"key": _b64(key), "value": _b64(value)}
        if lease:
            request["lease"] = str(lease)
        return {"request_put": request}

    @staticmethod
    def delete(key: bytes, range_end: bytes | None = None) -> dict:
        return {"request_delete_range": _key_range(key, range_end)}

    @staticmethod
    def get(key: bytes, range_end: bytes | None = None) -> dict:
        return {"request_range": _key_range(key, range_end)}


def _endpoint(text) -> str:
    """ "host:port" from "host:port" or "http://host:port"; ValueError naming a bad one."""
    rest = text.removeprefix("http://").removesuffix("/") if isinstance(text, str) else ""
    host, colon, port = rest.rpartition(":")
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536) or any(c in rest for c in "/ @?#"):
        raise ValueError(f"bad etcd endpoint {text!r}: expected host:port or http://host:port")
    return rest


class _Failure(Exception):
    """An endpoint could not serve a request: why, and whether the request may have reached etcd."""

    def __init__(self, why, sent):
        super().__init__(why)
        self.sent = sent


def _connect(endpoint: str, timeout: float) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(endpoint, timeout=max(timeout, 0.001))
    try:
        conn.connect()
    except OSError as error:
        conn.close()
        raise _Failure(f"cannot connect ({error})", sent=False) from None
    return conn


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether the server has closed this idle keep-alive connection (its member was killed,
    say). Seen before a request is written, the request surely did not reach etcd; seen only
    after, its outcome would look unknown."""
    if conn.sock is None:
        return True
    # An idle connection turns readable only by its end (or by bytes it should not get).
    # poll, not select: select cannot take a descriptor past 1023, and a supervisor has many.
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return bool(poller.poll(0))


def _decode(endpoint: str, path: str, status: int, data: bytes) -> dict:
    """etcd's answer, or the error it says: _Failure if the member cannot serve, else EtcdError."""
    try:
        answer = json.loads(data)
    except ValueError:
        raise EtcdError(f"etcd {endpoint} {path}: HTTP {status}, not JSON: {data[:200]!r}") from None
    error = answer.get("error")
    if isinstance(error, dict):  # in a stream: {"error": {"grpc_code": 14, "message": ...}}
        code, message = error.get("grpc_code"), error.get("message", "")
    elif error:  # {"error": ..., "code": 14, "message": ...}
        code, message = answer.get("code"), answer.get("message") or error
    elif status >= 400:
        code, message = None, f"HTTP {status}"
    else:
        return answer.get("result", answer)  # the streams wrap each answer in "result"
    if code == _UNAVAILABLE:
        raise _Failure(message, sent=message not in _NOT_APPLIED)
    raise EtcdError(f"etcd {endpoint} {path}: {message}")


def _exchange(conn, endpoint: str, path: str, body: dict, deadline: float, require_leader=True) -> dict:
    """POST body to path on conn, due by deadline: etcd's answer."""
    conn.sock.settimeout(max(deadline - time.monotonic(), 0.001))
    try:
        conn.request("POST", path, json.dumps(body).encode(), _LEADER_HEADERS if require_leader else _HEADERS)
    except (OSError, http.client.HTTPException) as error:
        # The request did not go out whole, and etcd acts only on a whole one.
        raise _Failure(f"sending failed ({error})", sent=False) from None
    try:
        response = conn.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as error:
        raise _Failure(f"no answer ({error!r})", sent=True) from None
    return _decode(endpoint, path, response.status, data)


class Etcd:
    """A client of one etcd cluster, safe to share between threads (its calls take turns on one
    connection; each watch has a connection of its own).

    A call goes to the endpoint that answered last; on a connection error, or an answer that
    its member cannot serve (no leader), it goes on to the next endpoint in turn, for up to
    ``timeout`` seconds in all, then raises EtcdUnavailable. A write (put, delete, txn,
    lease_grant) whose outcome is unknown is never sent again: it raises EtcdUnavailable with
    sent=True at once. The reads and the idempotent lease calls (keepalive, revoke) may be sent
    again, and then each endpoint gets a share of the timeout."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 2.0):
        if isinstance(endpoints, str):
            raise ValueError(f"etcd endpoints: expected a list of host:port, got the string {endpoints!r}")
        self.endpoints = [_endpoint(e) for e in endpoints]
        if not self.endpoints:
            raise ValueError("etcd endpoints: none given")
        self.timeout = timeout
        self._lock = threading.Lock()
        self._current = 0  # the endpoint that answered last
        self._conn = None  # (endpoint, HTTPConnection), kept alive between calls

    def _failover(self, path: str, attempt, resend: bool):
        """attempt(endpoint, until) on the endpoints in turn until one answers; the lock held."""
        deadline = time.monotonic() + self.timeout
        failures = {}  # endpoint: why it failed last
        sent = False
        for tries in itertools.count(1):
            endpoint = self.endpoints[self._current]
            # A request that may be sent again gets a share of the timeout on each endpoint, so that
            # a member that takes it and never answers (frozen, its disk stuck) leaves time for the
            # others; one that may not gets all the time left, to not give up on it needlessly.
            until = min(deadline, time.monotonic() + self._share()) if resend else deadline
            try:
                return attempt(endpoint, until)
            except _Failure as failure:
                failures[endpoint] = str(failure)
                sent = sent or failure.sent
                if failure.sent and not resend:
                    raise EtcdUnavailable(
                        f"etcd {endpoint} {path}: {failure}; the request may or may not have been applied", sent=True
                    ) from None
            self._current = (self._current + 1) % len(self.endpoints)
            if tries % len(self.endpoints) == 0:  # every endpoint failed: give an election time
                time.sleep(max(0.0, min(0.05, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                tried = "; ".join(f"{e}: {why}" for e, why in failures.items())
                raise EtcdUnavailable(f"etcd {path}: no endpoint answered within {self.timeout}s ({tried})", sent=sent)

    def _share(self) -> float:
        return self.timeout / len(self.endpoints)

    def _disconnect(self):
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None

    def _call(self, path: str, body: dict, resend=False) -> dict:
        def attempt(endpoint, until):
            if self._conn is None or self._conn[0] != endpoint or _dropped(self._conn[1]):
                self._disconnect()
                # Leave time for the other endpoints should this one not accept.
                self._conn = endpoint, _connect(endpoint, min(until - time.monotonic(), self._share()))
            try:
                return _exchange(self._conn[1], endpoint, path, body, until)
            except _Failure:
                self._disconnect()
                raise

        with self._lock:
            return self._failover(path, attempt, resend)

    def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        revision: int = 0,
        limit: int = 0,
        serializable: bool = False,
    ) -> RangeResult:
        """The keys in [key, range_end) (key alone without range_end), sorted by key; at ``revision``
        if given; at most ``limit`` if given (then .more tells whether there are others)."""
        request = _key_range(key, range_end)
        if revision:
            request["revision"] = str(revision)
        if limit:
            request["limit"] = str(limit)
        if serializable:
            request["serializable"] = True
        answer = self._call("/v3/kv/range", request, resend=True)
        return RangeResult(
            kvs=[_kv(kv) for kv in answer.get("kvs", [])],
            more=answer.get("more", False),
            count=int(answer.get("count", 0)),
            revision=_revision(answer),
        )

    def range_all(self, key: bytes, range_end: bytes, *, revision: int = 0, page: int = 1000) -> tuple[list[KV], int]:
        """Every kv of [key, range_end) at one revision, read ``page`` keys at a time: (kvs, revision).
        The revision is the given one, else the store's at the first page."""
        kvs = []
        while True:
            result = self.range(key, range_end, revision=revision, limit=page)
            # A range's header names the store's current revision, not the one read: keep the first.
            revision = revision or result.revision
            kvs.extend(result.kvs)
            if not result.more or not result.kvs:
                return kvs, revision
            key = result.kvs[-1].key + b"\0"

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Set key to value (attached to lease if given): the new revision."""
        return _revision(self._call("/v3/kv/put", Op.put(key, value, lease)["request_put"]))

    def delete(self, key: bytes, range_end: bytes | None = None) -> int:
        """Delete key, or the keys in [key, range_end): how many were deleted."""
        return int(self._call("/v3/kv/deleterange", _key_range(key, range_end)).get("deleted", 0))

    def txn(self, compare: list[dict], success: list[dict], failure: list[dict] = ()) -> TxnResult:
        """If every compare (Compare.*) holds, run the success ops (Op.*), else the failure ones, atomically."""
        answer = self._call(
            "/v3/kv/txn", {"compare": list(compare), "success": list(success), "failure": list(failure)}
        )
        responses = [
            [_kv(kv) for kv in response["response_range"].get("kvs", [])] if "response_range" in response else None
            for response in answer.get("responses", [])
        ]
        return TxnResult(succeeded=answer.get("succeeded", False), revision=_revision(answer), responses=responses)

    def lease_grant(self, ttl: int) -> tuple[int, int]:
        """A new lease of ttl seconds: (its id, the ttl etcd granted)."""
        answer = self._call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(answer["ID"]), int(answer["TTL"])

    def lease_keepalive(self, lease: int) -> int:
        """Renew lease: the ttl left after the renewal; 0 if the lease is gone (expired or revoked)."""
        # A stream in gRPC; through the gateway, one request in the body gets one answer, and the stream ends.
        return int(self._call("/v3/lease/keepalive", {"ID": str(lease)}, resend=True).get("TTL", 0))

    def lease_revoke(self, lease: int) -> None:
        """Revoke lease, deleting its keys; a lease already gone is not an error."""
        try:
            self._call("/v3/lease/revoke", {"ID": str(lease)}, resend=True)
        except EtcdError as error:
            if _LEASE_NOT_FOUND not in str(error):
                raise

    def watch(self, key: bytes, range_end: bytes | None = None, start_revision: int = 0) -> "Watch":
        """Watch key, or [key, range_end), from start_revision (else from now on). The watch is in
        place when this returns: every change after it will be seen."""
        request = _key_range(key, range_end)
        if start_revision:
            request["start_revision"] = str(start_revision)

        def attempt(endpoint, until):
            conn = _connect(endpoint, until - time.monotonic())
            try:
                conn.sock.settimeout(max(until - time.monotonic(), 0.001))
                conn.request("POST", "/v3/watch", json.dumps({"create_request": request}).encode(), _LEADER_HEADERS)
                response = conn.getresponse()
                first = response.readline()
            except (OSError, http.client.HTTPException) as error:
                conn.close()
                raise _Failure(f"no answer ({error!r})", sent=True) from None
            try:
                if not first:
                    raise _Failure("no answer (stream ended)", sent=True)
                # The first answer says that the watch is created, or why not.
                _decode(endpoint, "/v3/watch", response.status, first)
            except BaseException:
                conn.close()
                raise
            return Watch(endpoint, conn, response)

        with self._lock:
            return self._failover("/v3/watch", attempt, resend=True)

    def status(self, endpoint: str) -> dict:
        """The member at endpoint: {"leader": the leader's member id (0: none), "member_id",
        "revision", "raft_term"}. Asked without "hasleader": a member without a leader answers too."""
        endpoint = _endpoint(endpoint)
        path = "/v3/maintenance/status"
        try:
            conn = _connect(endpoint, self.timeout)
            try:
                answer = _exchange(conn, endpoint, path, {}, time.monotonic() + self.timeout, require_leader=False)
            finally:
                conn.close()
        except _Failure as failure:
            raise EtcdUnavailable(f"etcd {endpoint} {path}: {failure}", sent=failure.sent) from None
        header = answer["header"]
        return {
            "leader": int(answer.get("leader", 0)),
            "member_id": int(header["member_id"]),
            "revision": int(header.get("revision", 0)),
            "raft_term": int(header.get("raft_term", 0)),
        }

    def close(self) -> None:
        """Close the connection (a later call opens another). Watches stay open: close them on their own."""
        with self._lock:
            self._disconnect()


class Watch:
    """One watch stream, on a connection of its own: iterated by one thread, closed from any."""

    def __init__(self, endpoint: str, conn: http.client.HTTPConnection, response: http.client.HTTPResponse):
        self.endpoint = endpoint
        self._conn = conn
        self._response = response
        self._lock = threading.Lock()
        self._closed = False
        self._reading = False
        sock = conn.sock
        sock.settimeout(None)  # events may be hours apart
        # A stream's member may vanish without a word (host down, cable out): TCP keepalive notices in about 10 s.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)

    def __iter__(self) -> Iterator[tuple[int, list[Event]]]:
        """(the revision of its last event, events) for each answer that has events. Raises
        EtcdCompacted if the start revision is compacted, EtcdUnavailable if the stream breaks
        (resume from that revision + 1, on any endpoint); ends (StopIteration) once close() is
        called. Iterate once."""
        with self._lock:
            if self._closed:
                return
            self._reading = True
        try:
            while True:
                try:
                    line = self._response.readline()
                except (OSError, ValueError, http.client.HTTPException) as error:
                    line, broken = b"", repr(error)
                else:
                    broken = "stream ended"
                if self._closed:
                    return
                if not line:
                    raise EtcdUnavailable(f"etcd {self.endpoint} /v3/watch: {broken}", sent=True)
                try:
                    result = _decode(self.endpoint, "/v3/watch", 200, line)
                except _Failure as failure:
                    raise EtcdUnavailable(f"etcd {self.endpoint} /v3/watch: {failure}", sent=True) from None
                if result.get("canceled"):
                    compacted = int(result.get("compact_revision", 0))
                    if compacted:
                        raise EtcdCompacted(
                            f"etcd {self.endpoint} /v3/watch: start revision compacted (the oldest left: {compacted})",
                            compacted,
                        )
                    raise EtcdError(f"etcd {self.endpoint} /v3/watch: canceled ({result.get('cancel_reason', '')})")
                events = result.get("events")
                if events:  # else the "created" answer, or a progress one
                    # Not the header's revision: to a watch catching up, etcd sends the events of at
                    # most 1000 revisions an answer, each answer headed with its current revision.
                    got = [Event(e.get("type", "PUT"), _kv(e["kv"])) for e in events]
                    yield got[-1].kv.mod_revision, got
        finally:
            with self._lock:
                self._closed = True
                self._reading = False
            self._conn.close()

    def close(self) -> None:
        """End the watch: an iteration blocked in another thread ends promptly (StopIteration)."""
        with self._lock:
            self._closed = True
            reading = self._reading
        if not reading:
            self._conn.close()
            return
        # Closing the socket under the reading thread could hand its descriptor number to another
        # file while it reads: shut it down instead, which wakes the reader; it closes it on its way out.
        try:
            self._conn.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):  # already closed
            pass
