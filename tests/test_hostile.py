"""Hostile clients and users of the supervisor's socket: what they send, how fast, how
much, and where the socket lives.

The bounds only the supervisor's socket has are tested here: the requests in flight
(its loop stops reading a client), the replies of all clients left unread, the file
descriptors clients take, and the directory another user could reach into; with a
fuzz mix from several client processes at once. What both client sockets do alike
(the worker's own, for direct reads, among them) is in test_client_sockets.py.
"""

import collections
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time

import psutil
import pytest
from helpers import agent, kv_rows, wait_for
from rawsocket import GET_DEFAULT, MiB, fill_big, getnext_kv, raw, read_frames, read_to_eof

from cmactor.errors import ConfigError, StartupError
from cmactor.wire import protocol as P
from cmsupervisor.config import SUPERVISOR_OPTIONS
from cmsupervisor.front import server

ECHO = agent("echo.py:main")
NOBODY = 65534

# A client run as another user: it imports cmactor as root, then drops to ``uid``.
CLIENT_AS = """
import os, sys
import cmactor
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[2]))
try:
    cur = cmactor.connect(username="other", socket=sys.argv[1], timeout=10).cursor()
    cur.execute("get echo.kv", {"key": "default"})
    print("served", cur.fetchone())
except cmactor.Error as exc:
    print(type(exc).__name__, exc)
"""


def run_as(uid, socket_path):
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_AS, socket_path, str(uid)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# -- a fuzz mix from several clients at once ---------------------------------------

# One hostile client process: for ``duration`` seconds it connects, sends a few of
# the attacks below (seeded), sometimes reads what comes back, and leaves, often
# abruptly. It sends no valid stop or restart (any client of the supervisor's own uid
# may) and no valid set but to keys of its own.
FUZZER = r"""
import collections, json, math, os, pickle, random, socket, struct, sys, time
import msgpack

path, seed, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rng = random.Random(seed)
HEADER = struct.Struct(">I")

def frame(body):
    return HEADER.pack(len(body)) + body

def pack(obj):
    return frame(msgpack.packb(obj, use_bin_type=True))

def request(**fields):
    base = {"id": rng.randrange(1 << 31), "op": "get", "module": "echo", "table": "kv", "params": {"key": "default"}}
    base.update(fields)
    return base

def nested_field(field):
    # 1000 deep: more than msgpack's packer allows, so written by hand
    body = msgpack.packb(request(), use_bin_type=True)
    return frame(bytes([body[0] + 1]) + body[1:] + msgpack.packb(field) + b"\x91" * 1000 + b"\x01")

ODD = [None, True, 1.5, -1, 1 << 63, "", "x" * 300, b"bin", [], [1, [2]], {}, {"a": 1},
       msgpack.ExtType(5, b"ext"), msgpack.Timestamp(1, 0), float("nan"), float("inf")]
FIELDS = ["id", "op", "module", "table", "params", "user", "vr", "notify", "batch", "hold", "caller", "after"]

def attacks():
    return {
        "random bytes": lambda: rng.randbytes(rng.randrange(1, 200)),
        "random frame": lambda: frame(rng.randbytes(rng.randrange(0, 200))),
        "truncated frame": lambda: pack(request())[: rng.randrange(1, 20)],
        "oversized length": lambda: HEADER.pack(rng.choice([65537, 1 << 24, (1 << 32) - 1])) + b"x" * 10,
        "wrong shape": lambda: pack(rng.choice([[1, 2], 7, "get", None, b"raw", request(**{rng.choice(FIELDS): rng.choice(ODD)})])),
        "deep nesting": lambda: nested_field(rng.choice(FIELDS)),
        "bin keys and values": lambda: pack(request(op="set", params=rng.choice([{b"key": "fuzz"}, {"key": b"fuzz"}, {"key": "fuzz-b", b"value": b"x"}]))),
        "bin after": lambda: pack(request(op="getnext", after={b"key": "a"})),
        "ext types": lambda: pack(request(**{rng.choice(FIELDS): rng.choice([msgpack.ExtType(rng.randrange(128), rng.randbytes(5)), msgpack.Timestamp(rng.randrange(1 << 34), 0)])})),
        "non-finite hold": lambda: pack(request(table=rng.choice(["kv", "nosuch"]), hold=rng.choice([float("nan"), float("inf"), float("-inf"), 1e300]))),
        "pickle": lambda: rng.choice([frame, lambda body: body])(pickle.dumps({"id": 1, "op": "get", "x": collections.OrderedDict()})),
        "unknown names": lambda: pack(request(module=rng.choice(["echo", "nosuch", "__class__", "x" * 100]), table=rng.choice(["nosuch", "_x", "kv_get", "gen"]))),
        "own sets": lambda: pack(request(op="set", params={"key": f"fuzz-{rng.randrange(50)}", "value": rng.choice(["", "v", "\u2603" * 50])})),
        "pipelined garbage": lambda: b"".join(pack(rng.choice(ODD + [request()])) for _ in range(rng.randrange(2, 50))),
    }

kinds = attacks()
sent = collections.Counter()
replies = 0
deadline = time.monotonic() + duration
while time.monotonic() < deadline:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect(path)
        for _ in range(rng.randrange(1, 6)):
            name = rng.choice(sorted(kinds))
            sock.sendall(kinds[name]())
            sent[name] += 1
            if rng.random() < 0.5:
                sock.settimeout(0.05)
                try:
                    while data := sock.recv(65536):
                        replies += 1
                except (TimeoutError, BlockingIOError):
                    pass
                sock.settimeout(2)
    except OSError:
        pass  # dropped for what it sent: that is the point
    finally:
        if rng.random() < 0.3:  # leave with a reset, not a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
print(json.dumps({"sent": sent, "replies": replies}))
"""


def test_a_fuzz_mix_from_several_clients_harms_neither_the_supervisor_nor_a_good_client(supervisor, tmp_path, caplog):
    sup = supervisor({"echo": ECHO}, max_frame=64 * 1024)
    seed = int(os.environ.get("CMACTOR_FUZZ_SEED", time.time_ns() % 1_000_000))
    script = tmp_path / "fuzzer.py"
    script.write_text(FUZZER)
    fuzzers = [
        subprocess.Popen(
            [sys.executable, str(script), sup.socket_path, str(seed + i), "6"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    acknowledged = {}
    cur = sup.connect(timeout=10).cursor()
    try:
        i = 0
        while any(fuzzer.poll() is None for fuzzer in fuzzers):
            key, value = f"good-{i}", f"v{i}-{seed}"
            cur.execute("set echo.kv", {"key": key, "value": value})
            acknowledged[key] = value
            cur.execute("get echo.kv", {"key": key})
            assert cur.fetchone() == (key, value), f"seed {seed}"
            i += 1
        outputs = [fuzzer.communicate(timeout=10) for fuzzer in fuzzers]
    finally:
        for fuzzer in fuzzers:
            fuzzer.kill()
            fuzzer.wait()
    assert all(fuzzer.returncode == 0 for fuzzer in fuzzers), outputs
    sent = collections.Counter()
    for out, _ in outputs:
        sent.update(json.loads(out)["sent"])
    assert len(sent) == 14 and min(sent.values()) >= 3, f"seed {seed}: {sent}"
    rows = kv_rows(sup.connect(timeout=10).cursor())
    assert {key: rows.get(key) for key in acknowledged} == acknowledged, f"seed {seed}"
    assert len(acknowledged) > 100
    status = sup.status()["echo"]
    assert status["state"] == "READY" and status["restarts"] == 0, f"seed {seed}: {status}"
    errors = [record for record in caplog.records if "internal error" in record.getMessage()]
    assert not errors, (
        f"seed {seed}: {len(errors)} internal errors, the first: {errors[0].getMessage()} {errors[0].exc_text}"
    )
    with open(os.path.join(sup.state_dir, "audit.log")) as audit:
        for line in audit:
            json.loads(line)


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


def test_the_socket_directory_made_for_allowed_uids_lets_them_in(supervisor, tmp_path, reachable):
    sup = supervisor({"echo": ECHO}, state_dir=os.path.join(reachable, "state"))
    assert mode(os.path.dirname(sup.socket_path)) == 0o700
    sup.stop()
    alone = supervisor({"echo": ECHO}, state_dir=os.path.join(reachable, "shared"), allowed_uids=[NOBODY])
    assert mode(os.path.dirname(alone.socket_path)) == 0o711
    assert mode(alone.socket_path) == 0o666
    assert run_as(NOBODY, alone.socket_path) == "served ('default', 'yes')"


# -- backpressure ------------------------------------------------------------------


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


def test_past_max_backlog_total_no_client_is_read_and_the_largest_backlog_is_dropped(supervisor, monkeypatch, caplog):
    monkeypatch.setattr(server, "BACKLOG_GRACE", 1.5)
    sup = supervisor({"echo": ECHO}, max_backlog_total=5 * MiB)
    fill_big(sup)
    big, small = raw(sup), raw(sup)
    big.sendall(getnext_kv(6))
    small.sendall(getnext_kv(2))
    wait_for(lambda: "over max_backlog_total" in caplog.text)
    fresh = raw(sup)
    fresh.sendall(P.pack(GET_DEFAULT))
    fresh.settimeout(0.5)
    with pytest.raises(TimeoutError):
        fresh.recv(1)  # not read while every client is held back
    fresh.settimeout(10)
    [reply] = read_frames(fresh)
    assert reply["ok"] is True
    assert "which had the largest backlog" in caplog.text
    assert read_to_eof(big) < 6 * MiB
    replies = read_frames(small, 2)
    assert [len(reply["rows"]) for reply in replies] == [101, 101]


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("max_client_requests", 0, "expected a whole number >= 1, got 0"),
        ("max_client_backlog", -1, "expected a whole number >= 0, got -1"),
        ("max_backlog_total", 1.5, "expected a whole number >= 0, got 1.5"),
        ("frame_timeout", 0, "expected a number of seconds > 0, got 0"),
        ("frame_timeout", float("inf"), "expected a finite number of seconds, got inf"),
        ("max_frames_total", 0, "expected a whole number >= 1, got 0"),
        (
            "max_frames_total",
            1024,
            r"1024 is less than max_frame \(8388608\), so a frame of max_frame bytes could never",
        ),
        ("max_direct_backlog_total", "16M", "expected a whole number >= 0, got '16M'"),
        ("direct_idle_timeout", 0, "expected a number of seconds > 0, got 0"),
    ],
)
def test_the_bounds_are_checked_like_every_option(key, value, words):
    import cmactor

    with pytest.raises(ConfigError, match=f"Supervisor options.{key}: {words}"):
        cmactor.Supervisor({"echo": ECHO}, **{key: value})


# -- out of file descriptors ---------------------------------------------------------

# A supervisor in a process of its own, with few file descriptors: it prints its
# socket path, serves until its stdin closes, then stops.
LOW_FD_SUPERVISOR = """
import logging, resource, sys
import cmactor

if __name__ == "__main__":
    limit = int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    logging.basicConfig(level=logging.INFO)
    # The default restart policy: restarts that fail for want of descriptors are retried,
    # never counted as crashes, so the module is not quarantined while the test holds them.
    agents = {"echo": sys.argv[1]}
    with cmactor.Supervisor(agents, state_dir=sys.argv[2]) as sup:
        print(sup.socket_path, flush=True)
        sys.stdin.read()
"""


@pytest.fixture
def low_fd_supervisor(tmp_path):
    """(process, socket path, its log file) of a supervisor limited to 64 descriptors."""
    script = tmp_path / "low_fd.py"
    script.write_text(LOW_FD_SUPERVISOR)
    log_path = tmp_path / "supervisor.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(script), ECHO, str(tmp_path / "state"), "64"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            cwd=tmp_path,
        )
    try:
        assert select.select([proc.stdout], [], [], 30)[0], f"no socket path: {log_path.read_text()}"
        yield proc, proc.stdout.readline().strip(), log_path
    finally:
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for left in family:
            try:
                left.kill()
            except psutil.NoSuchProcess:
                pass


def exhaust(path):
    """Connect until the supervisor's listen backlog is full: every descriptor it can have is taken."""
    socks = []
    while len(socks) < 2000:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            return socks
        socks.append(sock)
    raise AssertionError("the supervisor never ran out of descriptors")


def cpu_seconds(proc, over):
    """CPU time ``proc`` itself (not its workers) spends in ``over`` seconds."""
    before = proc.cpu_times()
    time.sleep(over)
    after = proc.cpu_times()
    return (after.user - before.user) + (after.system - before.system)


def echo_status(path):
    import cmactor

    with cmactor.connect(socket=path, timeout=10) as conn:
        return conn.request({"op": "status"})["status"]["echo"]


def test_out_of_descriptors_the_supervisor_waits_instead_of_spinning_and_recovers(low_fd_supervisor):
    import cmactor

    proc, path, log_path = low_fd_supervisor
    supervisor_process = psutil.Process(proc.pid)
    worker_pid = echo_status(path)["pid"]
    socks = exhaust(path)
    time.sleep(0.2)  # the last ones accepted, the first accept() refused
    assert "Too many open files" in log_path.read_text()
    spent = cpu_seconds(supervisor_process, 1.0)
    assert spent < 0.5, f"the supervisor spent {spent:.2f}s of CPU in 1s at its descriptor limit"
    os.kill(worker_pid, signal.SIGKILL)  # its restart needs descriptors too
    spent = cpu_seconds(supervisor_process, 1.0)
    assert spent < 0.5, f"the supervisor spent {spent:.2f}s of CPU in 1s restarting a worker without descriptors"
    time.sleep(2)  # longer than max_restarts failed starts would take to quarantine it (1.55 s)
    for sock in socks:
        sock.close()
    cur = cmactor.connect(socket=path, timeout=10).cursor()
    cur.execute("get echo.kv", {"key": "default"})
    assert cur.fetchone() == ("default", "yes")
    status = wait_for(lambda: (s := echo_status(path))["state"] == "READY" and s["pid"] != worker_pid and s, timeout=20)
    assert status["restarts"] >= 1
    text = log_path.read_text()
    assert "accept failed" not in text
    pauses = text.count("cannot accept clients")
    assert 1 <= pauses <= 20, f"{pauses} lines logged for the pauses of about 2s"


# A supervisor whose process runs out of descriptors while a client is connected: its
# status answers go on (the workers' figures cannot be read then, and are left out).
STATUS_WITHOUT_DESCRIPTORS = """
import os, sys
import cmactor

if __name__ == "__main__":
    with cmactor.Supervisor({"echo": sys.argv[1]}, state_dir=sys.argv[2]) as sup:
        conn = cmactor.connect(socket=sup.socket_path, timeout=10)
        held = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        during = conn.request({"op": "status"})["status"]["echo"]
        for fd in held:
            os.close(fd)
        after = cmactor.connect(socket=sup.socket_path, timeout=10).request({"op": "status"})["status"]["echo"]
        print(during["state"], during["rss"], after["state"], after["rss"] > 0, flush=True)
"""


def test_status_is_answered_while_the_supervisor_is_out_of_descriptors_and_after(tmp_path):
    script = tmp_path / "no_fds.py"
    script.write_text(STATUS_WITHOUT_DESCRIPTORS)
    done = subprocess.run(
        [sys.executable, str(script), ECHO, str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.stdout.split() == ["READY", "None", "READY", "True"], done.stderr[-2000:]
