"""Bad bytes on the supervisor's socket that only it answers: the cases both client
sockets share (the worker's own among them) are in test_client_sockets.py."""

import os
import select
import time

import msgpack
import pytest
from helpers import agent, wait_for
from rawsocket import closed_by_peer, frame, raw, read_frames

from cmactor.wire import protocol as P
from cmsupervisor.front import server

ECHO = agent("echo.py:main")


@pytest.fixture
def sup(supervisor):
    return supervisor({"echo": ECHO}, max_frame=64 * 1024)


def test_a_control_request_for_an_unknown_module_gets_a_clear_error_and_the_connection_stays_usable(sup):
    # The supervisor's own answer: a worker's socket sends every control request to it.
    sock = raw(sup)
    sock.sendall(frame(msgpack.packb({"id": 5, "op": "status", "module": "nosuch"})))
    [reply] = read_frames(sock)
    assert reply["ok"] is False and reply["error"]["type"] == "ProgrammingError"
    assert "unknown module 'nosuch'; this supervisor runs: echo" in reply["error"]["message"]
    sock.sendall(P.pack({"id": 9, "op": "get", "module": "echo", "table": "kv", "params": {"key": "default"}}))
    [reply] = read_frames(sock)
    assert reply == {"id": 9, "ok": True, "rows": [{"key": "default", "value": "yes"}], "more": False}


def test_other_uids_are_refused(sup, monkeypatch):
    # Without root, as peer_uid tells it: test_client_sockets.py runs real clients as another uid.
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
