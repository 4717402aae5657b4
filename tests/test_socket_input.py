"""Bad bytes on the frontend socket: each gets an error or a drop, and harms nobody else."""

import pickle
import select
import struct
import threading
import time

import msgpack
import pytest
from helpers import agent, wait_for
from rawsocket import frame, raw, read_frames, send_deeply_nested_fields

from cmactor.wire import protocol as P

ECHO = agent("echo.py:main")


@pytest.fixture
def sup(supervisor):
    return supervisor({"echo": ECHO}, max_frame=64 * 1024)


def closed_by_peer(sock):
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def still_serving(sup):
    cur = sup.connect().cursor()
    cur.execute("get echo.kv", {"key": "default"})
    return cur.fetchone() == ("default", "yes")


def test_garbage_bytes_get_an_error_and_the_connection_is_dropped(sup):
    sock = raw(sup)
    sock.sendall(frame(b"\xc1\xc1\xc1 not msgpack"))
    [reply] = read_frames(sock)
    assert reply["ok"] is False and reply["error"]["type"] == "InterfaceError"
    assert "not valid msgpack" in reply["error"]["message"]
    assert closed_by_peer(sock)
    assert still_serving(sup)


def test_pickled_bytes_are_never_unpickled(sup, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    sock = raw(sup)
    sock.sendall(frame(pickle.dumps(Evil())))
    replies = read_frames(sock)
    assert replies and replies[0]["ok"] is False
    assert not marker.exists()
    assert still_serving(sup)


def test_oversized_frame_is_refused_before_its_body_is_read(sup):
    sock = raw(sup)
    sock.sendall(struct.pack(">I", 1 << 30))  # claims 1 GiB, sends nothing more
    [reply] = read_frames(sock)
    assert "exceeds the limit of 65536 bytes" in reply["error"]["message"]
    assert closed_by_peer(sock)
    assert still_serving(sup)


def test_truncated_frame_then_disconnect_harms_nobody(sup):
    for cut in (2, 10):
        sock = raw(sup)
        sock.sendall(frame(msgpack.packb({"id": 1, "op": "get", "module": "echo", "table": "kv"}))[:cut])
        sock.close()
    assert still_serving(sup)


def test_client_vanishing_mid_request_harms_nobody(sup):
    sock = raw(sup)
    sock.sendall(P.pack({"id": 1, "op": "get", "module": "echo", "table": "sleep", "params": {"secs": "0.3"}}))
    sock.close()  # the reply has nowhere to go
    time.sleep(0.5)
    assert still_serving(sup)
    assert sup.status()["echo"]["inflight"] == 0


@pytest.mark.parametrize(
    "message, error_type, text",
    [
        ([1, 2, 3], "ProgrammingError", "a request must be a msgpack map, got list"),
        (7, "ProgrammingError", "a request must be a msgpack map, got int"),
        ({"op": "get"}, "ProgrammingError", "request 'id' must be an integer"),
        ({"id": 5, "op": "explode"}, "ProgrammingError", "unknown op 'explode'"),
        ({"id": 5, "op": "get", "module": "echo"}, "ProgrammingError", "get: bad table name None"),
        ({"id": 5, "op": "get", "module": "__class__", "table": "kv"}, "ProgrammingError", "bad module name"),
        ({"id": 5, "op": "get", "module": ["echo"], "table": "kv"}, "ProgrammingError", "bad module name ['echo']"),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "params": {"key": 1}},
            "ProgrammingError",
            "'params.key' must be a str, got int",
        ),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "params": [1]},
            "ProgrammingError",
            "'params' must be a map",
        ),
        (
            {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "batch": 0},
            "ProgrammingError",
            "'batch' must be an integer",
        ),
        ({"id": 5, "op": "get", "module": "echo", "table": "kv", "vr": 3}, "ProgrammingError", "'vr' must be a str"),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "hold": -1},
            "ProgrammingError",
            "'hold' must be a number",
        ),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "hold": float("nan")},
            "ProgrammingError",
            "'hold' must be a finite number of seconds, got nan",
        ),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "hold": float("inf")},
            "ProgrammingError",
            "'hold' must be a finite number of seconds, got inf",
        ),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "hold": float("-inf")},
            "ProgrammingError",
            "'hold' must be a finite number of seconds, got -inf",
        ),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "hold": 86401},
            "ProgrammingError",
            "'hold' of 86401s is more than a request may be held, 86400s (a day)",
        ),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "hold": True},
            "ProgrammingError",
            "'hold' must be a number of seconds, got bool",
        ),
        (
            {"id": 5, "op": "set", "module": "echo", "table": "kv", "params": {b"key": "x"}},
            "ProgrammingError",
            "'params' has a bytes key b'key'; keys must be str",
        ),
        (
            {"id": 5, "op": "set", "module": "echo", "table": "kv", "params": {"key": "x", b"value": "y"}},
            "ProgrammingError",
            "'params' has a bytes key b'value'",
        ),
        (
            {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "after": {b"key": "a"}},
            "ProgrammingError",
            "'after' has a bytes key b'key'",
        ),
        (
            {"id": 5, "op": "set", "module": "echo", "table": "kv", "params": {"key": b"x"}},
            "ProgrammingError",
            "'params.key' must be a str, got bytes",
        ),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "params": {"key": msgpack.ExtType(7, b"x")}},
            "ProgrammingError",
            "'params.key' must be a str, got ExtType",
        ),
        ({"id": 5, "op": ["get"], "module": "echo", "table": "kv"}, "ProgrammingError", "unknown op ['get']"),
        ({"id": 5, "op": "get", "module": b"echo", "table": "kv"}, "ProgrammingError", "get: bad module name b'echo'"),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "notify": "yes"},
            "ProgrammingError",
            "'notify' must be true, false or nil, got str",
        ),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "caller": ["echo", ["serial"], 1]},
            "ProgrammingError",
            "'caller' must be [module, 'serial'|'async', request id]",
        ),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "caller": ["echo", "serial", 1.5]},
            "ProgrammingError",
            "'caller' must be",
        ),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "batch": "10"},
            "ProgrammingError",
            "'batch' must be an integer from 1 to 100000, got '10'",
        ),
        (
            {"id": 5, "op": "get", "table": "kv", "module": "-" + "e" * 300},
            "ProgrammingError",
            "bad module name '-eeeeeeeeeeeeeeeeeeeeeeeeee...eeeeeeeeeeeeeeeeeeeeeeeeeeee'",
        ),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "user": 9},
            "ProgrammingError",
            "'user' must be a str",
        ),
        ({"id": 5, "op": "restart", "module": 3}, "ProgrammingError", "restart: bad module name 3"),
        (
            {"id": 5, "op": "save", "caller": ["echo", "serial", "1"]},
            "ProgrammingError",
            "'caller' must be [module, 'serial'|'async', request id]",
        ),
        ({"id": 5, "op": "status", "module": "../x"}, "ProgrammingError", "status: bad module name '../x'"),
        (
            {"id": 5, "op": "status", "module": "nosuch"},
            "ProgrammingError",
            "unknown module 'nosuch'; this supervisor runs: echo",
        ),
        (
            {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "index": "key"},
            "ProgrammingError",
            "'index' must be a list of at most 64 column names, got 'key'",
        ),
        (
            {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "index": ["key"] * 65},
            "ProgrammingError",
            "'index' must be a list of at most 64 column names",
        ),
        (
            {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "index": ["key", 3]},
            "ProgrammingError",
            "'index' holds 3; column names are non-empty str",
        ),
        (
            {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "index": [""]},
            "ProgrammingError",
            "'index' holds ''; column names are non-empty str",
        ),
        (
            {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "index": ["key", "key"]},
            "ProgrammingError",
            "'index' names a column twice: ['key', 'key']",
        ),
        (
            {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "match": ["key"]},
            "ProgrammingError",
            "'match' column 'key' has no value in 'params' to match rows against",
        ),
        (
            {"id": 5, "op": "get", "module": "echo", "table": "kv", "params": {"key": "a"}, "match": ["key"]},
            "ProgrammingError",
            "'match' shapes a getnext walk; get takes none",
        ),
        (
            {"id": 5, "op": "getnext", "module": "echo", "table": "kv", "match": {"key": 1}},
            "ProgrammingError",
            "'match' must be a list",
        ),
    ],
)
def test_malformed_requests_get_a_clear_error_and_the_connection_stays_usable(sup, message, error_type, text):
    sock = raw(sup)
    sock.sendall(frame(msgpack.packb(message)))  # msgpack: ext types among them
    [reply] = read_frames(sock)
    assert reply["ok"] is False and reply["error"]["type"] == error_type
    assert text in reply["error"]["message"]
    sock.sendall(P.pack({"id": 9, "op": "get", "module": "echo", "table": "kv", "params": {"key": "default"}}))
    [reply] = read_frames(sock)
    assert reply == {"id": 9, "ok": True, "rows": [{"key": "default", "value": "yes"}], "more": False}


def test_deeply_nested_fields_get_a_clear_error(sup):
    # A builtin repr of such a value raises RecursionError, which used to leave the
    # request without a reply.
    send_deeply_nested_fields(raw(sup))
    assert still_serving(sup)


def test_non_string_map_keys_are_refused(sup):
    sock = raw(sup)
    sock.sendall(frame(msgpack.packb({"id": 1, "op": "get", "params": {1: "x"}})))
    [reply] = read_frames(sock)
    assert reply["ok"] is False and "int is not allowed for map key" in reply["error"]["message"]
    assert still_serving(sup)


def test_pipelined_requests_on_one_connection_all_get_replies(sup):
    sock = raw(sup)
    sock.sendall(
        b"".join(
            P.pack({"id": i, "op": "get", "module": "echo", "table": "kv", "params": {"key": "default"}})
            for i in range(200)
        )
    )
    replies = read_frames(sock, 200)
    assert sorted(r["id"] for r in replies) == list(range(200))
    assert all(r["ok"] for r in replies)


def test_abusive_clients_in_parallel_do_not_disturb_a_good_one(sup):
    stop = threading.Event()

    def abuse():
        while not stop.is_set():
            try:
                sock = raw(sup)
                sock.sendall(b"\xff" * 100)
                sock.close()
            except OSError:
                pass

    threads = [threading.Thread(target=abuse) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        cur = sup.connect().cursor()
        for i in range(200):
            cur.execute("set echo.kv", {"key": f"k{i}", "value": i})
        cur.execute("getnext echo.kv")
        assert cur.rowcount == 201
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)


def test_other_uids_are_refused(sup, monkeypatch):
    import os

    from cmsupervisor.front import server

    real_uid = os.getuid()
    monkeypatch.setattr(server, "peer_uid", lambda sock: real_uid + 4242)
    sock = raw(sup)
    [reply] = read_frames(sock)
    assert reply["ok"] is False and f"uid {real_uid + 4242} may not use this supervisor" in reply["error"]["message"]
    assert closed_by_peer(sock)
    # A client that sends its request after it was refused (as Connection.request does:
    # send, then read) reads why, and gets no EPIPE.
    sock = raw(sup)
    wait_for(lambda: select.select([sock], [], [], 0)[0])
    time.sleep(0.1)
    sock.sendall(P.pack({"id": 1, "op": "ping"}))
    [reply] = read_frames(sock)
    assert f"uid {real_uid + 4242} may not use this supervisor" in reply["error"]["message"]
    assert closed_by_peer(sock)
