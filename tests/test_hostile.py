"""Hostile clients and users: what they send, how fast, how much, and where the socket lives.

Each bound a client could push past has a test here: the fields of a request, the
requests in flight, the replies it leaves unread, the frames it leaves unfinished,
the file descriptors it takes, and the directory another user could reach into.
"""

import os
import socket
import stat
import time

import psutil
import pytest
from conftest import agent, kv_rows

from cmactor import protocol as P
from cmactor.errors import ConfigError, StartupError
from cmsupervisor.config import SUPERVISOR_OPTIONS

ECHO = agent("echo.py:main")
NOBODY = 65534


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# -- the socket's directory ------------------------------------------------------


def test_a_socket_directory_others_can_write_is_refused_and_left_as_it_is(supervisor, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    sup = supervisor({"echo": ECHO}, start=False, socket=str(shared / "cm.sock"))
    with pytest.raises(StartupError) as caught:
        sup.start()
    message = str(caught.value)
    assert f"the socket's directory {shared} can be written by others (mode 1777)" in message
    assert "another user could replace the socket" in message and "state_dir/run" in message
    assert mode(shared) == 0o1777


def test_a_socket_directory_owned_by_another_user_is_refused(supervisor, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    sup = supervisor({"echo": ECHO}, start=False, socket=str(theirs / "cm.sock"))
    with pytest.raises(StartupError, match=f"{theirs} belongs to uid {NOBODY}, who could replace the socket"):
        sup.start()


def test_a_file_that_is_not_a_socket_is_never_removed(supervisor, tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    precious = run / "cm.sock"
    precious.write_text("not a socket")
    sup = supervisor({"echo": ECHO}, start=False, socket=str(precious))
    with pytest.raises(StartupError, match=f"{precious} exists and is not a socket; cmactor removes only a socket"):
        sup.start()
    assert precious.read_text() == "not a socket"


def test_an_existing_socket_directory_keeps_its_mode(supervisor, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o750)
    sup = supervisor({"echo": ECHO}, socket=str(run / "cm.sock"))
    assert mode(run) == 0o750
    cur = sup.connect().cursor()
    cur.execute("get echo.kv", {"key": "default"})
    assert cur.fetchone() == ("default", "yes")


# -- backpressure ------------------------------------------------------------------

MiB = 1024 * 1024
BIG_VALUE = "x" * 10_000  # 100 rows of it: a getnext reply of 1 MB


def raw(sup):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(sup.socket_path)
    return sock


def read_frames(sock, count=1):
    reader = P.FrameReader(max_frame=None)
    frames = []
    while len(frames) < count:
        data = sock.recv(65536)
        if not data:
            break
        frames.extend(reader.feed(data))
    return frames


def read_to_eof(sock):
    """Bytes the peer sent before it closed the connection."""
    total = 0
    while data := sock.recv(1 << 20):
        total += len(data)
    return total


def getnext_kv(count):
    return b"".join(P.pack({"id": i, "op": "getnext", "module": "echo", "table": "kv"}) for i in range(count))


def fill_big(sup):
    cur = sup.connect().cursor()
    for i in range(100):
        cur.execute("set echo.kv", {"key": f"big{i:03}", "value": BIG_VALUE})


def test_a_flood_from_a_client_that_never_reads_is_bounded_and_others_are_served(supervisor, caplog):
    sup = supervisor({"echo": ECHO})
    fill_big(sup)
    process = psutil.Process()
    before = process.memory_info().rss
    flood = raw(sup)
    flood.sendall(getnext_kv(600))  # 600 replies of 1 MB: 600 MB, were nothing bounded
    cur = sup.connect(timeout=10).cursor()
    started = time.monotonic()
    cur.execute("get echo.kv", {"key": "default"})
    assert cur.fetchone() == ("default", "yes") and time.monotonic() - started < 3
    peak = before
    deadline = time.monotonic() + 30
    while "over max_client_backlog" not in caplog.text:
        peak = max(peak, process.memory_info().rss)
        assert peak - before < 300 * MiB, f"RSS grew by {(peak - before) / MiB:.0f} MiB under the flood"
        assert time.monotonic() < deadline, "the flood client was never dropped"
        time.sleep(0.02)
    assert f"dropped client pid {os.getpid()} uid {os.getuid()}: " in caplog.text
    assert read_to_eof(flood) < 80 * MiB  # dropped, not served
    flood.close()
    assert len(kv_rows(cur)) == 101
    cur.execute("set echo.kv", {"key": "after", "value": "flood"})
    cur.execute("get echo.kv", {"key": "after"})
    assert cur.fetchone() == ("after", "flood")


def test_requests_in_flight_per_client_stop_at_max_client_requests(supervisor):
    sup = supervisor({"echo": ECHO})
    limit = SUPERVISOR_OPTIONS["max_client_requests"][1]
    count = 3 * limit
    sock = raw(sup)
    sock.sendall(
        b"".join(
            P.pack({"id": i, "op": "get", "module": "echo", "table": "asleep", "params": {"secs": "0.01"}})
            for i in range(count)
        )
    )
    reader = P.FrameReader(max_frame=None)
    replies = []
    peak = 0
    while len(replies) < count:
        replies.extend(reader.feed(sock.recv(65536)))
        peak = max(peak, sup.status()["echo"]["inflight"])
    assert limit // 2 <= peak <= limit
    assert sorted(reply["id"] for reply in replies) == list(range(count)) and all(r["ok"] for r in replies)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("max_client_requests", 0, "expected a whole number >= 1, got 0"),
        ("max_client_backlog", -1, "expected a whole number >= 0, got -1"),
        ("max_backlog_total", 1.5, "expected a whole number >= 0, got 1.5"),
        ("frame_timeout", 0, "expected a number of seconds > 0, got 0"),
        ("frame_timeout", float("inf"), "expected a finite number of seconds, got inf"),
    ],
)
def test_the_bounds_are_checked_like_every_option(key, value, words):
    import cmactor

    with pytest.raises(ConfigError, match=f"Supervisor options.{key}: {words}"):
        cmactor.Supervisor({"echo": ECHO}, **{key: value})
