"""Hostile HTTP clients against a real `cmactor restconf` (issue 27, item 6): while each
attack runs, a well-behaved client keeps GETting one entry on its keep-alive connection
and every GET is answered 200 within BOUND seconds (hangs, not speed), and the
supervisor answers `cmactor status`.

The bounds are the server's own ([restconf] max_connections, idle_timeout,
request_timeout, max_body): what they promise an operator is

- a client that holds a connection and uses it is served whatever else connects;
- a newcomer past max_connections takes the place of a connection that never had a
  request answered and waits (idle, or its headers unfinished), the longest waiting
  first: slow or idle connections, even reopened as fast as they are cut, keep nobody
  out; the others are cut request_timeout (headers not finished) or idle_timeout
  (nothing sent) after they came;
- only when every connection is in the middle of a request is a newcomer answered 503
  (RFC 8040 body, Retry-After), at once, never left hanging;
- a body is never read past max_body: 413 at once, and the server's memory does not grow.

Raising max_connections past the attack would make the idle test pass without testing
the cap: the tests keep the default (64), as an operator would.

And every request is made as the HTTP user: a PATCH as alice over HTTPS is an audit
line of the supervisor naming alice."""

import contextlib
import http.client
import json
import os
import select
import shutil
import socket
import threading
import time
import uuid
from urllib.parse import urlsplit

import psutil
import pytest
from processes import cli
from test_restconf import MEDIA, ROOT, check_error, curl, https_with_users, supervisor_and_server

# The supervisor's config has no [restconf] (`cmactor run` would run a server of its own
# beside it); the server's is the same with its [restconf] table.
SUPERVISOR = """
[supervisor]
state_dir = "state"
hold_timeout = 2

[agents.ports]
entry = "ports.py:main"
"""
CONFIG = (
    SUPERVISOR
    + """
[restconf]
listen = "127.0.0.1:0"
tls = false
max_connections = 64
idle_timeout = 2
request_timeout = 3
"""
)
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 2
REQUEST_TIMEOUT = 3
ENTRY = "/restconf/data/cmactor-ports:ports/port=1"
# Seconds any answer may take: a hang, not a slow answer, fails a test.
BOUND = 5.0


@pytest.fixture(scope="module")
def switch(tmp_path_factory):
    """(the supervisor, the plain-HTTP RESTCONF server, the config's directory)."""
    home = tmp_path_factory.mktemp("hostile")
    shutil.copy(os.path.join(ROOT, "examples", "switch", "ports.py"), home)
    with supervisor_and_server(home, SUPERVISOR, CONFIG) as (run, server):
        yield run, server, home


def address(server):
    url = urlsplit(server.url)
    return url.hostname, url.port


class Watcher(threading.Thread):
    """The well-behaved client: GETs ENTRY on one keep-alive connection (opened before the
    attack) every 50 ms until stopped, keeping each answer's status and time."""

    def __init__(self, server):
        super().__init__(name="good-client", daemon=True)
        self.conn = http.client.HTTPConnection(*address(server), timeout=BOUND)
        self.answers = []  # (status, seconds)
        self.errors = []
        self._halt = threading.Event()
        self.get()  # connected (holds its slot) before the attack

    def get(self):
        started = time.monotonic()
        try:
            self.conn.request("GET", ENTRY)
            answer = self.conn.getresponse()
            answer.read()
            self.answers.append((answer.status, time.monotonic() - started))
        except (OSError, http.client.HTTPException) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc} after {time.monotonic() - started:.1f} s")
            self.conn.close()  # connected again by the next request

    def run(self):
        while not self._halt.wait(0.05):
            self.get()

    def stop(self):
        self._halt.set()
        self.join(BOUND + 5)
        self.conn.close()

    def check(self, least):
        """Stop, once it has made ``least`` GETs; every GET was answered 200 within BOUND."""
        deadline = time.monotonic() + BOUND
        while len(self.answers) + len(self.errors) < least and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stop()
        assert not self.errors, self.errors
        assert [status for status, _ in self.answers if status != 200] == []
        assert len(self.answers) >= least, self.answers
        assert max(seconds for _, seconds in self.answers) < BOUND


@contextlib.contextmanager
def watched(server, least=10):
    watcher = Watcher(server)
    watcher.start()
    try:
        yield watcher
    except BaseException:
        watcher.stop()
        raise
    watcher.check(least)


def supervisor_answers(home):
    started = time.monotonic()
    done = cli("-c", home / "cmactor.toml", "status", timeout=20)
    assert done.returncode == 0, done.stderr
    assert "ports" in done.stdout
    assert time.monotonic() - started < BOUND + 5


def newcomer(server):
    """(status, seconds) of one curl GET of ENTRY on a connection of its own."""
    started = time.monotonic()
    code, headers, text = curl(server, ENTRY)
    if code == 503:
        check_error((code, headers, text), 503, "resource-denied", "too many connections")
        assert headers["retry-after"] == "1"
    return code, time.monotonic() - started


def served_again(server, within):
    """A newcomer is served within ``within`` seconds; every refusal meanwhile was at once."""
    deadline = time.monotonic() + within
    while True:
        code, seconds = newcomer(server)
        assert seconds < BOUND
        if code == 200:
            return
        assert code == 503
        assert time.monotonic() < deadline, f"no newcomer served within {within} s"
        time.sleep(0.1)


class Attack(threading.Thread):
    """``count`` connections that send ``first`` (none: nothing) and then, with ``trickle``,
    one more header byte a second, never ending their headers. Each one's end (the server
    closing it) is kept: its time from the connect, and what it was answered."""

    def __init__(self, server, count, first=b"", trickle=False):
        super().__init__(name="attack", daemon=True)
        self.trickle = trickle
        self.socks = {}
        for _ in range(count):
            sock = socket.create_connection(address(server), timeout=BOUND)
            sock.setblocking(False)
            self.socks[sock] = [time.monotonic(), b"", None]  # opened, answered, ended (s after opened)
        time.sleep(0.3)  # the ones past the cap are refused (answered and closed) before they send anything
        while self._poll(0):
            pass
        for sock in self.open:
            if first:
                with contextlib.suppress(OSError):
                    sock.send(first)
        self._halt = threading.Event()

    @property
    def open(self):
        return [sock for sock, (_, _, ended) in self.socks.items() if ended is None]

    @property
    def ended(self):
        return [state for state in self.socks.values() if state[2] is not None]

    def _end(self, sock):
        state = self.socks[sock]
        state[2] = time.monotonic() - state[0]

    def _poll(self, timeout):
        """Read what came on the open connections; whether anything came."""
        readable, _, _ = select.select(self.open, [], [], timeout) if self.open else ([], [], [])
        for sock in readable:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            self.socks[sock][1] += data
            if not data:
                self._end(sock)
        return bool(readable)

    def run(self):
        next_byte = time.monotonic() + 1
        while not self._halt.is_set() and self.open:
            self._poll(0.05)
            if self.trickle and time.monotonic() >= next_byte:
                next_byte += 1
                for sock in self.open:
                    try:
                        sock.send(b"a")
                    except OSError:
                        self._end(sock)

    def wait_all_ended(self, within):
        deadline = time.monotonic() + within
        while self.open and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not self.open, f"{len(self.open)} of {len(self.socks)} connections still open after {within} s"

    def close(self):
        self._halt.set()
        if self.is_alive():
            self.join(5)
        for sock in self.socks:
            sock.close()

    def refused(self):
        return [state for state in self.socks.values() if state[1].startswith(b"HTTP/1.1 503 ")]


@contextlib.contextmanager
def attack(server, count, **kwargs):
    mounted = Attack(server, count, **kwargs)
    try:
        mounted.start()
        yield mounted
    finally:
        mounted.close()


SLOW_START = b"GET /restconf HTTP/1.1\r\nHost: x\r\nX-Slow: "


@pytest.mark.timeout(60)
def test_slow_headers_below_the_cap(switch):
    _, server, home = switch
    count = MAX_CONNECTIONS - 4  # the good client holds one slot: three stay free
    with watched(server), attack(server, count, first=SLOW_START, trickle=True) as slow:
        assert not slow.refused()
        assert newcomer(server)[0] == 200
        supervisor_answers(home)
        slow.wait_all_ended(REQUEST_TIMEOUT + BOUND)
        held = [ended for _, answer, ended in slow.socks.values()]
        # Cut by the headers' deadline, however steadily they trickle: not before, not long after.
        assert REQUEST_TIMEOUT - 0.5 < min(held) and max(held) < REQUEST_TIMEOUT + 2, held
        assert all(answer == b"" for _, answer, _ in slow.socks.values())


@pytest.mark.timeout(60)
def test_slow_headers_past_the_cap(switch):
    _, server, home = switch
    count = MAX_CONNECTIONS + 36
    with watched(server), attack(server, count, first=SLOW_START, trickle=True) as slow:
        # The good client keeps its slot; each attacker's connection past the cap took the place
        # of an older one of the attacker's, cut at once and unanswered.
        assert not slow.refused()
        assert len(slow.ended) >= count - (MAX_CONNECTIONS - 1)
        assert newcomer(server)[0] == 200  # in the place of the attacker's oldest
        supervisor_answers(home)
        slow.wait_all_ended(REQUEST_TIMEOUT + BOUND)
        assert all(answer == b"" for _, answer, _ in slow.socks.values())


def reconnecting_slowloris(server, count, stop):
    """Keep ``count`` slow-header connections open, each one opened again at once when the
    server cuts it (request_timeout) or refuses it (503), until ``stop`` is set."""
    socks = set()
    last_byte = time.monotonic()
    try:
        while not stop.is_set():
            while len(socks) < count:
                try:
                    sock = socket.create_connection(address(server), timeout=BOUND)
                    sock.sendall(SLOW_START)
                except OSError:
                    break
                sock.setblocking(False)
                socks.add(sock)
            readable, _, _ = select.select(list(socks), [], [], 0.01)
            for sock in readable:  # answered (503) or cut: again
                sock.close()
                socks.discard(sock)
            if time.monotonic() - last_byte >= 1:
                last_byte = time.monotonic()
                for sock in list(socks):
                    try:
                        sock.send(b"a")
                    except OSError:
                        sock.close()
                        socks.discard(sock)
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.timeout(60)
def test_a_reconnecting_slowloris_does_not_keep_newcomers_out(switch):
    _, server, _ = switch
    stop = threading.Event()
    attacker = threading.Thread(
        target=reconnecting_slowloris, args=(server, MAX_CONNECTIONS + 6, stop), name="slowloris", daemon=True
    )
    attacker.start()
    try:
        time.sleep(0.5)
        served_again(server, REQUEST_TIMEOUT + 2)
    finally:
        stop.set()
        attacker.join(BOUND)


@pytest.mark.timeout(60)
def test_200_idle_connections(switch):
    _, server, home = switch
    count = 200
    with watched(server), attack(server, count) as idle:
        assert not idle.refused()
        assert len(idle.ended) >= count - (MAX_CONNECTIONS - 1)  # each replaced by a later one
        assert newcomer(server)[0] == 200
        supervisor_answers(home)
        idle.wait_all_ended(IDLE_TIMEOUT + 2)
        assert max(ended for _, _, ended in idle.socks.values()) < IDLE_TIMEOUT + 2


@pytest.mark.timeout(60)
def test_a_newcomer_is_refused_at_once_only_when_every_connection_is_in_a_request(switch):
    _, server, _ = switch
    # PATCH headers whose body never comes: each connection is in the middle of a request
    # (until request_timeout cuts its body), so none can be replaced.
    head = (f"PATCH {ENTRY} HTTP/1.1\r\nHost: x\r\nContent-Type: {MEDIA}\r\nContent-Length: 100\r\n\r\n").encode()
    with attack(server, MAX_CONNECTIONS, first=head) as busy:
        time.sleep(0.5)
        code, seconds = newcomer(server)  # checks the 503's RFC 8040 body and Retry-After
        assert code == 503 and seconds < BOUND
        busy.wait_all_ended(REQUEST_TIMEOUT + BOUND)
    served_again(server, 2)


@pytest.mark.timeout(60)
def test_a_huge_body_is_refused_unread(switch):
    _, server, _ = switch
    proc = psutil.Process(server.proc.pid)
    before = proc.memory_info().rss
    pushed = [0]

    def push(sock):
        block = b"x" * 65536
        with contextlib.suppress(OSError):
            while pushed[0] < 256 * 1024 * 1024:
                sock.sendall(block)
                pushed[0] += len(block)

    with watched(server), socket.create_connection(address(server), timeout=BOUND) as sock:
        started = time.monotonic()
        sock.sendall(
            b"PATCH /restconf/data/cmactor-ports:ports/port=1 HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/yang-data+json\r\nContent-Length: %d\r\n\r\n" % (1 << 30)
        )
        pusher = threading.Thread(target=push, args=(sock,), daemon=True)
        pusher.start()
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert time.monotonic() - started < 2
        pusher.join(BOUND)
        assert not pusher.is_alive(), "the server kept reading the body"
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Connection: close" in head and f"Content-Type: {MEDIA}".encode() in head
    assert json.loads(body)["ietf-restconf:errors"]["error"][0]["error-tag"] == "too-big"
    # What it took of the pushed bytes before closing is what the socket buffers held: nothing in memory.
    assert proc.memory_info().rss - before < 32 * 1024 * 1024, (before, proc.memory_info().rss, pushed[0])


def exchange(server, request):
    """Send ``request`` whole, then read until the server closes: (the answer, seconds to the close)."""
    with socket.create_connection(address(server), timeout=BOUND) as sock:
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer, time.monotonic() - started


@pytest.mark.timeout(60)
def test_malformed_requests_end_cleanly(switch):
    _, server, home = switch
    many = b"".join(b"X-%d: y\r\n" % n for n in range(1000))
    with watched(server):
        for name, request, status in (
            ("garbage bytes", bytes(range(1, 256)) * 4 + b"\r\n\r\n", b"400"),
            ("a TLS hello on plain HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64), None),
            ("a line that is not HTTP", b"HELLO THERE\r\n\r\n", b"400"),
            ("a header line of 100 KB", b"GET /restconf HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", b"431"),
            ("1000 headers", b"GET /restconf HTTP/1.1\r\n" + many + b"\r\n", b"431"),
            (
                "a chunked body",
                b"PATCH /restconf/data/cmactor-ports:ports/port=1 HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/yang-data+json\r\nTransfer-Encoding: chunked\r\n\r\n"
                b'5\r\n{"cma\r\n0\r\n\r\n',
                b"411",
            ),
        ):
            answer, seconds = exchange(server, request)
            if status is None:  # no line end: cut at the headers' deadline, unanswered or answered 400
                assert seconds < REQUEST_TIMEOUT + 2, name
                assert answer == b"" or answer.startswith(b"HTTP/1.1 400 "), (name, answer)
                continue
            assert seconds < 2, name  # answered and closed at once
            assert answer.startswith(b"HTTP/1.1 " + status + b" "), (name, answer)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert b"Connection: close" in head and f"Content-Type: {MEDIA}".encode() in head, (name, head)
            (error,) = json.loads(body)["ietf-restconf:errors"]["error"]
            assert error["error-type"] == "protocol" and "Traceback" not in body.decode(), (name, error)
        supervisor_answers(home)
    assert curl(server, "/restconf")[0] == 200
    assert "Traceback" not in server.text


@pytest.mark.timeout(60)
def test_the_audit_log_names_the_https_user(switch):
    _, _, home = switch
    server = https_with_users(home, CONFIG, {"alice": "secret", "bob": "other"})
    try:
        assert server.url.startswith("https://")
        cert = home / "state" / "restconf" / "restconf-cert.pem"
        mark = f"set by alice {uuid.uuid4().hex[:8]}"
        code, _, text = curl(
            server,
            "/restconf/data/cmactor-ports:ports/port=5",
            "--cacert",
            str(cert),
            "-u",
            "alice:secret",
            method="PATCH",
            body={"cmactor-ports:port": [{"description": mark}]},
        )
        assert code == 204, text
        code, _, text = curl(server, "/restconf/data/cmactor-ports:ports/port=5/description", "--cacert", str(cert),
                             "-u", "bob:other")  # fmt: skip
        assert code == 200 and json.loads(text) == {"cmactor-ports:description": mark}
    finally:
        assert server.stop() == 0, server.text
    audit = home / "state" / "audit.log"
    deadline = time.monotonic() + BOUND
    while True:
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
        found = [line for line in lines if (line.get("params") or {}).get("description") == mark]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    (line,) = found
    assert line["user"] == "alice", line
    assert (line["op"], line["module"], line["table"], line["outcome"]) == ("set", "ports", "port", "ok")
    assert line["params"] == {"name": "5", "description": mark}


@pytest.mark.timeout(60)
def test_keep_alive_gets_back_to_back_are_not_held_by_nagle(switch):
    # An answer is written as its head, then its body: without TCP_NODELAY the body waited
    # for the client's delayed ACK of the head (40 ms on Linux) on a busy keep-alive connection.
    _, server, _ = switch
    conn = http.client.HTTPConnection(*address(server), timeout=BOUND)
    times = []
    try:
        for _ in range(30):
            started = time.monotonic()
            conn.request("GET", ENTRY)
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 200
            times.append(time.monotonic() - started)
    finally:
        conn.close()
    times.sort()
    assert times[len(times) // 2] < 0.02, times
