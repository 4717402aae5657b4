import contextlib
import multiprocessing.forkserver
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time

import msgpack
import psutil
import pytest

from cmactor.wire import protocol as P

HERE = os.path.dirname(os.path.abspath(__file__))
AGENTS = os.path.join(HERE, "agents")


def _helper_pids():
    """Long-lived helpers multiprocessing keeps per test session: not leftovers."""
    pids = set()
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    if server is not None and getattr(server, "_forkserver_pid", None):
        pids.add(server._forkserver_pid)
    tracker = multiprocessing.resource_tracker._resource_tracker
    if getattr(tracker, "_pid", None):
        pids.add(tracker._pid)
    return pids


def _descendants():
    try:
        return {p.pid: p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
    except psutil.NoSuchProcess:
        return {}


@pytest.fixture(autouse=True)
def no_leftover_processes():
    before = set(_descendants())
    yield
    deadline = time.monotonic() + 5
    while True:
        left = {pid: p for pid, p in _descendants().items() if pid not in before and pid not in _helper_pids()}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if left:
        described = []
        for proc in left.values():
            try:
                described.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        pytest.fail(f"test left processes behind: {described}")


def wait_for(predicate, timeout=10, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def kv_rows(cur, module="echo"):
    """Every row of an echo module's kv table, by key."""
    cur.execute(f"getnext {module}.kv")
    return dict(cur.fetchall())


def raw(sup):
    """A bare socket connected to a supervisor's frontend, for what a Cursor would never send."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(sup.socket_path)
    return sock


def read_frames(sock, count=1):
    """Up to ``count`` frames from ``sock``, decoded (fewer if it closes first)."""
    reader = P.FrameReader(max_frame=None)
    frames = []
    while len(frames) < count:
        data = sock.recv(65536)
        if not data:
            break
        frames.extend(reader.feed(data))
    return frames


def agent(entry):
    """Entry of a test agent file: agent("echo.py:main")."""
    return os.path.join(AGENTS, entry)


@pytest.fixture
def supervisor(tmp_path):
    """Factory: supervisor(agents, **options) -> a started Supervisor, stopped at teardown."""
    import cmactor

    started = []

    def make(agents, start=True, **options):
        options.setdefault("state_dir", tmp_path / "state")
        options.setdefault("start_timeout", 20)
        sup = cmactor.Supervisor(agents, **options)
        started.append(sup)
        if start:
            sup.start()
        return sup

    yield make
    for sup in started:
        sup.stop()


@contextlib.contextmanager
def tmpfs(path, options, why):
    """A tmpfs mounted on ``path`` (an existing directory) with mount ``options`` for the
    block, unmounted after; the test is skipped, saying ``why`` it needs one, if it cannot be."""
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs {why}: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def frame(body):
    """A frame of raw bytes: what a client could send that msgpack would never pack."""
    return struct.pack(">I", len(body)) + body


DEEP = "[[[[...]]]]"  # how the error messages show a value nested too deep to print

# field -> the error a request gets when that field holds a value nested 1000 deep
DEEP_FIELD_ERRORS = {
    "id": f"request 'id' must be an integer, got {DEEP}",
    "op": f"unknown op {DEEP}",
    "module": f"getnext: bad module name {DEEP}",
    "table": f"getnext: bad table name {DEEP}",
    "params": "'params' must be a map of str to str, got list",
    "vr": "'vr' must be a str or nil, got list",
    "notify": "'notify' must be true, false or nil, got list",
    "user": "'user' must be a str, got list",
    "after": "'after' must be a map of str to str, got list",
    "batch": f"'batch' must be an integer from 1 to 100000, got {DEEP}",
    "hold": "'hold' must be a number of seconds, got list",
    "caller": f"'caller' must be [module, 'serial'|'async', request id], got {DEEP}",
    "index": f"'index' holds {DEEP}; column names are non-empty str",
    "match": f"'match' holds {DEEP}; column names are non-empty str",
}


def send_deeply_nested_fields(sock):
    """Send a getnext with each field of DEEP_FIELD_ERRORS nested 1000 deep (msgpack decodes
    it: it stops at 1024; a builtin repr of it raises RecursionError) and check each reply."""
    for field, text in DEEP_FIELD_ERRORS.items():
        request = {"id": 5, "op": "getnext", "module": "echo", "table": "kv"}
        request.pop(field, None)
        body = msgpack.packb(request)
        body = bytes([body[0] + 1]) + body[1:] + msgpack.packb(field) + b"\x91" * 1000 + b"\x01"  # one more entry
        sock.sendall(frame(body))
        [reply] = read_frames(sock)
        assert reply["ok"] is False and reply["error"]["type"] == "ProgrammingError", field
        assert text in reply["error"]["message"], (field, reply)
        assert reply["id"] == (None if field == "id" else 5)


@pytest.fixture
def reachable():
    """A directory every user can enter (tmp_path's parents are root's alone)."""
    path = tempfile.mkdtemp(prefix="cmactor-test-")
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)
