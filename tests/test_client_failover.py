"""The client given several supervisors' sockets (hot standby): it finds the active, follows
it through a takeover, and marks each change with a token so that a resend applies it once.
No supervisor has HA yet: the client is tested against fake supervisors, threads that speak
the real framing on Unix sockets; and the request checks of the token, and `cmactor ha`."""

import json
import os
import shutil
import socket
import tempfile
import threading
import time

import msgpack
import pytest
from helpers import agent
from processes import cli

import cmactor
from cmactor import cmfrontend
from cmactor.errors import NotActive, OperationalError, from_wire, not_active_wire
from cmactor.wire import protocol as P
from cmactor.wire.validate import BadRequest, Request, decode_request, parse_request

KV = {"op": "set", "module": "vlan", "table": "kv", "params": {"key": "a", "value": "1"}}


class FakeSupervisor:
    """A supervisor as a client sees it: ``ha`` answered with ``role`` (or, ``ha="unknown"``,
    refused as an unknown op, as a cmactor from before HA does); a set or setop answered as
    ``writes`` says ("ok", "not_active": NotActive naming ``active``, "close": the connection
    closed before any answer, and the supervisor gone, as when it dies mid-request); a read
    answered with one row naming ``node``. Every request is kept in ``requests``."""

    def __init__(self, path, role="active", node=None, active=None, writes=None, ha="answer"):
        self.path = str(path)
        self.role = role
        self.node = node or os.path.basename(self.path)
        self.active = active
        self.writes = writes or ("ok" if role in ("active", "single") else "not_active")
        self.ha = ha
        self.requests = []
        self._lock = threading.Lock()
        self._connections = []
        self._threads = []
        self._stopping = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(16)
        self._listener.settimeout(0.02)
        self._accepter = threading.Thread(target=self._accept, name=f"fake {self.node}")
        self._accepter.start()

    def ops(self):
        return [request["op"] for request in self.requests]

    def of(self, op):
        return [request for request in self.requests if request["op"] == op]

    def _accept(self):
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(0.05)
            with self._lock:
                if self._stopping:
                    conn.close()
                    return
                self._connections.append(conn)
                thread = threading.Thread(target=self._serve, args=(conn,), name=f"fake {self.node} client")
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn):
        reader = P.FrameReader()
        try:
            while not self._stopping:
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                for request in reader.feed(data):
                    with self._lock:
                        self.requests.append(request)
                    reply = self._answer(request)
                    if reply is None:  # dies mid-request
                        self.die()
                        return
                    conn.sendall(P.pack(reply))
        except OSError:
            return
        finally:
            conn.close()

    def _answer(self, request):
        rid, op = request.get("id"), request.get("op")
        if op == "ha":
            if self.ha == "unknown":
                older = P.DATA_OPS + P.CONTROL_OPS[: P.CONTROL_OPS.index("ha")]
                message = f"unknown op 'ha'; known ops: {', '.join(older)}"
                return {"id": rid, "ok": False, "error": {"type": "ProgrammingError", "message": message}}
            ha = {"node": self.node, "role": self.role, "active": self.active, "in_sync": True, "revision": 7}
            return {"id": rid, "ok": True, "ha": ha}
        if op == "route":
            return {"id": rid, "ok": True, "route": None, "direct_reads": False}
        if op in ("set", "setop"):
            if self.writes == "close":
                return None
            if self.writes == "unavailable_once":
                self.writes = "ok"
                error = {"type": "ModuleUnavailable", "message": "module 'vlan' is RESTARTING"}
                return {"id": rid, "ok": False, "error": error}
            if self.writes == "not_active":
                error = not_active_wire(f"{self.node} is a standby: send changes to the active", self.active)
                return {"id": rid, "ok": False, "error": error}
            return {"id": rid, "ok": True, "rows": [], "more": False}
        if op in P.READ_OPS:
            return {"id": rid, "ok": True, "rows": [{"node": self.node}], "more": False}
        return {"id": rid, "ok": True}

    def become(self, role, writes=None):
        self.role = role
        self.writes = writes or ("ok" if role in ("active", "single") else "not_active")

    def die(self):
        """Stop listening and drop every connection (the socket file stays: connection refused)."""
        with self._lock:
            self._stopping = True
            connections = list(self._connections)
        self._listener.close()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self):
        self.die()
        if threading.current_thread() is not self._accepter:
            self._accepter.join(5)
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(5)


@pytest.fixture
def sockets():
    """A short directory for the sockets (a socket path is at most 107 bytes, which a
    tmp_path named after a long test can pass); its fakes are stopped after the test and
    no thread is left behind."""
    directory = tempfile.mkdtemp(prefix="cmha-")
    fakes = []
    before = set(threading.enumerate())

    def fake(name, *args, **kwargs):
        made = FakeSupervisor(os.path.join(directory, name), *args, **kwargs)
        fakes.append(made)
        return made

    fake.path = lambda name: os.path.join(directory, name)
    yield fake
    for made in fakes:
        made.stop()
    shutil.rmtree(directory, ignore_errors=True)
    left = [thread for thread in threading.enumerate() if thread not in before and thread.is_alive()]
    assert not left, f"threads left behind: {left}"


def tokens(fake):
    return [request.get("token") for request in fake.of("set")]


# -- finding the active ------------------------------------------------------------------


@pytest.mark.parametrize("position", [0, 1, 2])
def test_the_active_is_found_wherever_it_is_in_the_list(sockets, position):
    names = ["a", "b", "c"]
    fakes = []
    for n, name in enumerate(names):
        role = "active" if n == position else "standby"
        fakes.append(sockets(name, role=role, active=names[position]))
    with cmactor.connect(socket=[fake.path for fake in fakes]) as conn:
        assert conn.socket_path == fakes[position].path
        assert conn.socket_paths == [fake.path for fake in fakes]
        cur = conn.cursor()
        cur.execute("get vlan.kv", {"key": "a"})
        assert cur.fetchall() == [(names[position],)]
        cur.execute("set vlan.kv", {"key": "a", "value": "1"})
    # Each before the active was asked and passed over; those after it, never asked.
    for n, fake in enumerate(fakes):
        if n < position:
            assert fake.ops() == ["ha"]
        elif n > position:
            assert fake.ops() == []
    assert fakes[position].ops() == ["ha", "route", "get", "set"]


def test_cmactor_socket_with_several_paths_separated_by_pathsep(sockets, monkeypatch):
    standby = sockets("s", role="standby", active="t")
    active = sockets("t", role="active")
    monkeypatch.setenv("CMACTOR_SOCKET", os.pathsep.join([standby.path, active.path]))
    assert cmfrontend.default_socket() == [standby.path, active.path]
    with cmactor.connect() as conn:
        assert conn.socket_path == active.path
        conn.cursor().execute("set vlan.kv", {"key": "a", "value": "1"})
    assert len(active.of("set")) == 1 and standby.of("set") == []
    # One path (a stray separator too) is the one-socket client.
    monkeypatch.setenv("CMACTOR_SOCKET", active.path + os.pathsep)
    assert cmfrontend.default_socket() == active.path


def test_a_supervisor_that_knows_no_ha_op_counts_as_single(sockets):
    standby = sockets("a", role="standby")
    older = sockets("b", ha="unknown", writes="ok")
    with cmactor.connect(socket=[standby.path, older.path]) as conn:
        assert conn.socket_path == older.path
        conn.cursor().execute("set vlan.kv", {"key": "a", "value": "1"})
    assert older.ops() == ["ha", "set"]


def test_role_single_is_used_as_an_active(sockets):
    joining = sockets("a", role="joining")
    single = sockets("b", role="single")
    with cmactor.connect(socket=[joining.path, single.path]) as conn:
        assert conn.socket_path == single.path


# -- failing over ----------------------------------------------------------------------


def test_a_set_refused_as_not_active_is_resent_to_the_active_with_the_same_token(sockets):
    first = sockets("a", role="active")
    second = sockets("b", role="standby", active="a")
    conn = cmactor.connect(socket=[first.path, second.path])
    assert conn.socket_path == first.path
    # A takeover: a steps down and refuses the set; b is the active now.
    first.become("standby")
    first.active = "b"
    second.become("active")
    conn.cursor().execute("set vlan.kv", {"key": "a", "value": "1"})
    assert conn.socket_path == second.path
    [refused] = first.of("set")
    [applied] = second.of("set")
    assert refused["token"] == applied["token"] and refused["params"] == applied["params"]
    session, n = applied["token"].rsplit("-", 1)
    assert n == "1" and len(session) == 32
    # The next change gets a token of its own, and goes to b at once.
    conn.cursor().execute("setop vlan.kv", {"key": "a"})
    [setop] = second.of("setop")
    assert setop["token"] == f"{session}-2"
    assert first.ops() == ["ha", "set", "ha"]  # asked again in the failover: now a standby
    conn.close()


def test_a_connection_lost_mid_set_is_resent_to_the_standby_that_takes_over(sockets):
    first = sockets("a", role="active", writes="close")
    second = sockets("b", role="standby", active="a")
    takeover = threading.Timer(0.5, second.become, ("active",))
    with cmactor.connect(socket=[first.path, second.path], failover_timeout=10) as conn:
        cur = conn.cursor()
        cur.execute("get vlan.kv", {"key": "a"})
        assert cur.fetchall() == [("a",)]
        takeover.start()
        began = time.monotonic()
        try:
            cur.execute("set vlan.kv", {"key": "a", "value": "1"})
        finally:
            takeover.join()
        waited = time.monotonic() - began
        assert conn.socket_path == second.path
        cur.execute("get vlan.kv", {"key": "a"})  # reads follow it
        assert cur.fetchall() == [("b",)]
    assert 0.4 <= waited < 5, waited
    [lost] = first.of("set")
    [applied] = second.of("set")
    assert lost["token"] == applied["token"] is not None
    # b was asked while a standby (and a refused the connection) before it took over.
    assert second.ops().count("ha") >= 2


def test_a_cursor_retry_of_a_module_unavailable_keeps_the_token(sockets):
    # The same change, sent again (held until the module is READY): the same token.
    active = sockets("a", role="active", writes="unavailable_once")
    with cmactor.connect(socket=[active.path, sockets.path("b")]) as conn:
        cur = conn.cursor()
        cur.retries = 1
        cur.execute("set vlan.kv", {"key": "a", "value": "1"})
        cur.execute("set vlan.kv", {"key": "a", "value": "2"})
    first, retry, second = active.of("set")
    assert "hold" not in first and retry["hold"] == 5.0
    assert first["token"] == retry["token"] != second["token"]


def test_a_read_is_resent_too(sockets):
    first = sockets("a", role="active")
    second = sockets("b", role="standby", active="a")
    with cmactor.connect(socket=[first.path, second.path], failover_timeout=5) as conn:
        first.die()
        second.become("active")
        cur = conn.cursor()
        cur.execute("get vlan.kv", {"key": "a"})
        assert cur.fetchall() == [("b",)]
        assert [request.get("token") for request in second.of("get")] == [None]


def test_no_active_within_failover_timeout_names_each_socket_and_its_answer(sockets):
    standby = sockets("a", role="standby", active="nodeB")
    joining = sockets("b", role="joining")
    missing = sockets.path("c")
    began = time.monotonic()
    with pytest.raises(OperationalError) as caught:
        cmactor.connect(socket=[standby.path, joining.path, missing], failover_timeout=0.3)
    took = time.monotonic() - began
    assert 0.3 <= took < 3, took
    message = str(caught.value)
    assert f"{standby.path}: standby, active is nodeB" in message
    assert f"{joining.path}: joining, no active known" in message
    assert f"{missing}: no such file or directory" in message
    assert "failover_timeout=0.3s" in message
    # It kept asking: several rounds in 0.3 s.
    assert standby.ops().count("ha") >= 2


def test_a_failover_that_finds_no_active_gives_up_and_closes_the_connection(sockets):
    first = sockets("a", role="active", writes="close")
    second = sockets("b", role="standby")
    conn = cmactor.connect(socket=[first.path, second.path], failover_timeout=0.3)
    with pytest.raises(OperationalError) as caught:
        conn.cursor().execute("set vlan.kv", {"key": "a", "value": "1"})
    message = str(caught.value)
    assert message.startswith(f"set: the connection to {first.path} failed")
    assert f"{first.path}: connection refused" in message and f"{second.path}: standby" in message
    assert conn.closed
    with pytest.raises(cmactor.InterfaceError, match="closed"):
        conn.cursor().execute("get vlan.kv")


def test_supervisors_that_each_claim_active_and_refuse_do_not_loop_forever(sockets):
    liar = sockets("a", role="active", writes="not_active")
    conn = cmactor.connect(socket=[liar.path, sockets.path("gone")], failover_timeout=0.3)
    began = time.monotonic()
    with pytest.raises(OperationalError, match="none took it"):
        conn.cursor().execute("set vlan.kv", {"key": "a", "value": "1"})
    assert time.monotonic() - began < 3
    assert 2 <= len(liar.of("set")) < 20  # tried again, with pauses, not in a tight loop
    assert len(set(tokens(liar))) == 1


def test_a_timeout_looks_for_the_active_again_and_resends_with_the_same_token(sockets):
    # A paused active answers nothing: after timeout the client asks the others, and the
    # change goes to the one that took over, with its token (applied once wherever it lands).
    class Silent(FakeSupervisor):
        def _answer(self, request):
            if request.get("op") == "set":
                self.role = "standby"  # it will have lost the lead by the time it wakes
                time.sleep(0.5)  # past the client's timeout
            return super()._answer(request)

    path = sockets.path("slow")
    slow = Silent(path)
    other = sockets("b", role="active")  # the first in the list is asked, and taken, first
    try:
        conn = cmactor.connect(socket=[slow.path, other.path], timeout=0.2)
        conn.cursor().execute("set vlan.kv", {"key": "a", "value": "1"})
        assert tokens(other) == tokens(slow) != [None]
        assert conn.socket_path == other.path
        conn.close()
    finally:
        slow.stop()


# -- one socket: as it always was --------------------------------------------------------


def test_one_socket_raises_not_active_as_is_and_sends_no_token(sockets):
    standby = sockets("a", role="standby", active="nodeB")
    with cmactor.connect(socket=standby.path) as conn:
        with pytest.raises(NotActive) as caught:
            conn.cursor().execute("set vlan.kv", {"key": "a", "value": "1"})
        assert caught.value.active == "nodeB"
        assert isinstance(caught.value, OperationalError)
        assert not conn.closed
        assert conn.socket_paths == [standby.path]
    [sent] = standby.of("set")
    assert "token" not in sent
    assert standby.ops() == ["set"]  # no ha asked
    # A list of one path is one socket too.
    with cmactor.connect(socket=[standby.path]) as conn, pytest.raises(NotActive):
        conn.cursor().execute("set vlan.kv", {"key": "a", "value": "1"})
    assert "token" not in standby.of("set")[-1]


def test_not_active_crosses_the_wire_with_its_active():
    assert "NotActive" in cmactor.__all__ and cmactor.NotActive is NotActive is cmfrontend.NotActive
    exc = from_wire(not_active_wire("b is a standby", "nodeA"))
    assert type(exc) is NotActive and exc.active == "nodeA" and str(exc) == "b is a standby"
    assert from_wire({"type": "NotActive", "message": "x"}).active is None
    assert from_wire(not_active_wire("x", None)).active is None
    assert from_wire({"type": "NotActive", "message": "x", "active": 5}).active is None


# -- the token's checks ------------------------------------------------------------------


def _checked(message):
    """The two checks of validate.py on ``message``: each a Request or the BadRequest's text."""
    body = msgpack.packb(message)
    answers = []
    for decoded in (decode_request(body), msgpack.unpackb(body, strict_map_key=True)):
        try:
            answers.append(parse_request(decoded))
        except BadRequest as exc:
            answers.append(str(exc))
    return answers


def test_a_good_token_takes_the_fast_check():
    for op in ("set", "setop"):
        token = "0123456789abcdef0123456789abcdef-12"
        message = {"id": 1, "op": op, "module": "vlan", "table": "kv", "token": token}
        assert type(decode_request(msgpack.packb(message))) is Request
        fast, hand = _checked(message)
        assert fast.token == hand.token == token
    assert _checked({"id": 1, "op": "set", "module": "vlan", "table": "kv", "token": "!" + "~" * 127})[1].token


@pytest.mark.parametrize(
    "token, words",
    [
        ("x" * 129, "'token' must be a str of 1 to 128 printable ASCII characters without spaces"),
        ("", "'token' must be a str of 1 to 128"),
        ("a b", "'token' must be a str of 1 to 128 printable ASCII characters without spaces, got 'a b'"),
        ("a\n", "without spaces"),
        ("é", "printable ASCII"),
        (5, "'token' must be a str of 1 to 128 printable ASCII characters without spaces, got 5"),
        (["a"], "'token' must be a str"),
    ],
)
def test_a_bad_token_is_refused_by_both_checks(token, words):
    message = {"id": 3, "op": "set", "module": "vlan", "table": "kv", "token": token}
    assert type(decode_request(msgpack.packb(message))) is dict  # not the fast check's
    fast, hand = _checked(message)
    assert fast == hand and words in fast


@pytest.mark.parametrize("op", ["get", "getone", "getnext", "status", "ping", "ha", "save"])
def test_a_token_on_another_op_is_refused(op):
    message = {"id": 3, "op": op, "module": "vlan", "table": "kv", "token": "s-1"}
    fast, hand = _checked(message)
    assert fast == hand == f"'token' goes with a set or setop (the key that applies it once); {op} takes none"


def test_the_ha_op_is_a_control_op_with_no_fields():
    assert "ha" in P.CONTROL_OPS
    request = decode_request(msgpack.packb({"id": 4, "op": "ha", "user": "me"}))
    assert type(request) is Request and (request.id, request.op, request.user) == (4, "ha", "me")
    assert parse_request({"id": 4, "op": "ha", "user": "me"}) == Request(id=4, op="ha", user="me")


# -- cmactor ha ------------------------------------------------------------------------------


def test_cmactor_ha_with_one_socket(sockets):
    active = sockets("a", role="active", node="nodeA", active="nodeA")
    done = cli("ha", "--socket", active.path, "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "node": "nodeA",
        "role": "active",
        "active": "nodeA",
        "in_sync": True,
        "revision": 7,
    }
    standby = sockets("b", role="standby", node="nodeB", active="nodeA")
    done = cli("ha", "--socket", standby.path)
    assert done.returncode == 3
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["socket", "node", "role", "active", "in_sync", "revision", "note"]
    assert lines[1].split() == [standby.path, "nodeB", "standby", "nodeA", "yes", "7", "-"]
    assert "cmactor: no supervisor is active" in done.stderr
    # One socket that cannot be asked: an error, as for every command.
    done = cli("ha", "--socket", sockets.path("gone"))
    assert done.returncode == 1
    assert done.stderr.startswith("cmactor: OperationalError: cannot reach a cmactor supervisor at")
    assert done.stdout == ""


def test_cmactor_ha_with_several_sockets(sockets):
    standby = sockets("a", role="standby", node="nodeA", active="nodeB")
    active = sockets("b", role="active", node="nodeB", active="nodeB")
    gone = sockets.path("c")
    done = cli("ha", "--socket", standby.path, "--socket", active.path, "--socket", gone)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["socket", "node", "role", "active", "in_sync", "revision", "note"]
    assert rows[0].split() == [standby.path, "nodeA", "standby", "nodeB", "yes", "7", "-"]
    assert rows[1].split() == [active.path, "nodeB", "active", "nodeB", "yes", "7", "-"]
    assert rows[2].split()[:7] == [gone, "-", "-", "-", "-", "-", "unreachable:"]
    assert "cannot reach a cmactor supervisor" in rows[2] and "No such file or directory" in rows[2]
    assert "Traceback" not in done.stderr

    env = dict(os.environ, CMACTOR_SOCKET=os.pathsep.join([standby.path, active.path, gone]))
    done = cli("ha", "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown[:2] == [
        {"socket": standby.path, "node": "nodeA", "role": "standby", "active": "nodeB", "in_sync": True, "revision": 7},
        {"socket": active.path, "node": "nodeB", "role": "active", "active": "nodeB", "in_sync": True, "revision": 7},
    ]
    assert shown[2]["socket"] == gone and "cannot reach" in shown[2]["error"]


def test_cmactor_ha_exits_3_when_none_is_active(sockets):
    standby = sockets("a", role="standby", node="nodeA")
    joining = sockets("b", role="joining", node="nodeB")
    done = cli("ha", "--format", "json", "--socket", standby.path, "--socket", joining.path, "--socket", "/nonexistent")
    assert done.returncode == 3
    assert [entry.get("role") for entry in json.loads(done.stdout)] == ["standby", "joining", None]
    assert "none of the 3 supervisors asked is active or single" in done.stderr


def test_cli_commands_talk_to_the_active_of_several_sockets(sockets):
    standby = sockets("a", role="standby", active="b")
    older = sockets("b", ha="unknown", writes="ok")  # a supervisor from before HA: single
    done = cli("--socket", standby.path, "set", "vlan.kv", "key=a", "value=1", "--socket", older.path)
    assert done.returncode == 0, done.stderr
    assert standby.of("set") == [] and [request["params"] for request in older.of("set")] == [
        {"key": "a", "value": "1"}
    ]
    assert older.of("set")[0]["token"]
    done = cli("ha", "--socket", older.path, "--format", "json")
    assert done.returncode == 0 and json.loads(done.stdout)["role"] == "single"


# -- against a real supervisor ---------------------------------------------------------------


def test_a_real_supervisor_is_found_and_takes_the_token(sockets, supervisor):
    # Whatever its ha answer (single, or a ping's: it runs without HA), it serves writes, and
    # the set's token passes its request checks.
    sup = supervisor({"echo": agent("echo.py:main")})
    with cmactor.connect(socket=[sockets.path("gone"), sup.socket_path], timeout=10) as conn:
        assert conn.socket_path == sup.socket_path
        cur = conn.cursor()
        cur.execute("set echo.kv", {"key": "k", "value": "v"})
        cur.execute("set echo.kv", {"key": "k", "value": "w"})
        cur.execute("get echo.kv", {"key": "k"})
        assert cur.fetchall() == [("k", "w")]
        with pytest.raises(cmactor.DatabaseError, match="stopped despite"):  # a setop's token passes: its agent ran
            cur.execute("setop echo.boom")
