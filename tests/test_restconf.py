"""The RESTCONF server (issue 27) as an operator runs it: a real `cmactor run` of the demo
switch, `cmactor restconf -c CONFIG` beside it (plain HTTP on loopback), and curl as the
client. Discovery and the yang-library (each served module passes pyang --strict, and
GET bodies validate against the served modules with yangson), every method on the
demo's tables, the errors of RFC 8040, keep-alive, and the bounds on hostile clients.

One supervisor and one server serve the module (started once: a few seconds); each test
uses names of its own, so that none depends on another's changes. The test that stops a
module runs last (a restart would leave a worker behind for the leftover check)."""

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from urllib.parse import urlsplit

import pytest
import yangson
from processes import Run, cli, cmactor_cmd
from test_restconf_yang import PYANG, validate
from yangson.enumerations import ContentType

import cmactor
from cmactor.errors import OperationalError
from cmsupervisor.restconf import data
from cmsupervisor.restconf.library import Library
from cmsupervisor.restconf.security import hash_password
from cmsupervisor.restconf.server import Server as RestconfServer, connector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CURL = shutil.which("curl") or "/usr/bin/curl"
MEDIA = "application/yang-data+json"
JSON = ["-H", f"Content-Type: {MEDIA}"]

SUPERVISOR = """
[supervisor]
state_dir = "state"
hold_timeout = 2

[agents.ports]
entry = "ports.py:main"

[agents.vlan]
entry = "vlan.py:main"

[agents.stats]
entry = "stats.py:main"
"""
CONFIG = (
    SUPERVISOR
    + """
[restconf]
listen = "127.0.0.1:0"
tls = false
max_connections = 8
request_timeout = 1.5
idle_timeout = 5
max_body = 4096
"""
)


class Server:
    """`cmactor restconf -c CONFIG` as a process: its URL, its output (a file: never a full pipe)."""

    def __init__(self, config, log_path):
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmactor_cmd() + ["restconf", "-c", str(config)], stderr=self.log, stdout=self.log, start_new_session=True
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = re.search(r"serving (https?://\S+)/restconf", self.text)
            if found:
                self.url = found[1]
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError("cmactor restconf did not come up:\n" + self.text)

    @property
    def text(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(15)
            self.log.close()
        return self.proc.returncode


@contextlib.contextmanager
def supervisor_and_server(home, supervisor, config):
    """In ``home``: `cmactor run` of the text ``supervisor`` (no [restconf]: it would run a
    server of its own beside this one), and a `cmactor restconf` of ``config`` (the same with
    its [restconf] table); (run, server). Both stopped at the end, the server cleanly."""
    (home / "cmactor.toml").write_text(supervisor)
    (home / "restconf.toml").write_text(config)
    run = Run(home / "cmactor.toml")
    try:
        server = Server(home / "restconf.toml", home / "restconf.log")
    except BaseException:
        run.kill()
        raise
    yield run, server
    status = server.stop()
    run.stop()
    assert status == 0, server.text
    assert "cmactor restconf: stopped" in server.text
    assert "Traceback" not in server.text, server.text


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(the demo's supervisor, the RESTCONF server, the config's directory)."""
    home = tmp_path_factory.mktemp("restconf")
    for name in ("ports.py", "vlan.py", "stats.py"):
        shutil.copy(os.path.join(ROOT, "examples", "switch", name), home)
    with supervisor_and_server(home, SUPERVISOR, CONFIG) as (run, server):
        yield run, server, home


def curl(server, path, *args, method=None, body=None, headers=()):
    """(status, headers (lower-case names), body text) of one curl request to ``path``."""
    command = [CURL, "-s", "-i", "--max-time", "20"]
    if method is not None:
        command += ["-X", method]
    if body is not None:
        command += [*JSON, "--data-binary", body if isinstance(body, str) else json.dumps(body)]
    for header in headers:
        command += ["-H", header]
    done = subprocess.run([*command, *args, server.url + path], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    head, _, text = done.stdout.replace("\r\n", "\n").partition("\n\n")
    while head.startswith("HTTP/1.1 100"):  # Expect: 100-continue's interim answer
        head, _, text = text.partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1])
    found = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return status, found, text


def get_json(server, path, status=200):
    code, headers, text = curl(server, path)
    assert code == status, text
    assert headers["content-type"] == MEDIA
    return json.loads(text)


def error_of(text):
    """The one error of an ietf-restconf:errors body."""
    (error,) = json.loads(text)["ietf-restconf:errors"]["error"]
    return error


def check_error(answer, status, tag, message=None):
    code, headers, text = answer
    assert code == status, text
    assert headers["content-type"] == MEDIA
    error = error_of(text)
    assert error["error-tag"] == tag, error
    if message is not None:
        assert re.search(message, error["error-message"]), error
    assert "Traceback" not in text
    return headers, error


@pytest.fixture(scope="module")
def model(demo, tmp_path_factory):
    """A yangson DataModel of the modules the server serves, fetched from their locations."""
    _, server, _ = demo
    library = get_json(server, "/restconf/data/ietf-yang-library:yang-library")["ietf-yang-library:yang-library"]
    directory = tmp_path_factory.mktemp("yang")
    modules = []
    for entry in library["module-set"][0]["module"]:
        (location,) = entry["location"]
        code, headers, text = curl(server, urlsplit(location).path)
        assert (code, headers["content-type"]) == (200, "application/yang")
        (directory / f"{entry['name']}@{entry['revision']}.yang").write_text(text)
        modules.append({**{k: entry[k] for k in ("name", "revision", "namespace")}, "conformance-type": "implement"})
    rfc7895 = {"ietf-yang-library:modules-state": {"module-set-id": "cmactor", "module": modules}}
    return yangson.DataModel(json.dumps(rfc7895), [str(directory)])


# -- discovery ---------------------------------------------------------------


def test_discovery(demo):
    _, server, _ = demo
    code, headers, text = curl(server, "/.well-known/host-meta")
    assert code == 200 and headers["content-type"] == "application/xrd+xml"
    assert "<Link rel='restconf' href='/restconf'/>" in text
    root = get_json(server, "/restconf")["ietf-restconf:restconf"]
    assert root == {"data": {}, "operations": {}, "yang-library-version": "2019-01-04"}
    assert get_json(server, "/restconf/yang-library-version") == {"ietf-restconf:yang-library-version": "2019-01-04"}
    operations = get_json(server, "/restconf/operations")["ietf-restconf:operations"]
    assert set(operations) == {"cmactor-ports:port-setop", "cmactor-vlan:vlan-setop", "cmactor-vlan:member-setop"}


def test_yang_library_locations_serve_modules_pyang_accepts(demo, tmp_path):
    _, server, home = demo
    library = get_json(server, "/restconf/data/ietf-yang-library:yang-library")["ietf-yang-library:yang-library"]
    entries = library["module-set"][0]["module"]
    assert [entry["name"] for entry in entries] == ["cmactor-ports", "cmactor-stats", "cmactor-vlan"]
    assert library["schema"] == [{"name": "cmactor", "module-set": ["cmactor"]}]
    assert library["content-id"]
    revisions = json.loads((home / "state" / "restconf" / "yang-revisions.json").read_text())
    for entry in entries:
        module = entry["name"].removeprefix("cmactor-")
        assert entry["namespace"] == f"urn:cmactor:{module}"
        assert entry["revision"] == revisions[module]["revision"]
        (location,) = entry["location"]
        assert location == f"{server.url}/restconf/yang/{entry['name']}@{entry['revision']}.yang"
        code, headers, text = curl(server, urlsplit(location).path)
        assert code == 200 and headers["content-type"] == "application/yang"
        path = tmp_path / f"{entry['name']}.yang"
        path.write_text(text)
        done = subprocess.run([PYANG, "--strict", str(path)], capture_output=True, text=True, timeout=50)
        assert (done.returncode, done.stderr) == (0, ""), text
    check_error(curl(server, "/restconf/yang/cmactor-nope@2024-01-01.yang"), 404, "invalid-value")


# -- reads -------------------------------------------------------------------


def test_get_module_list_entry_and_leaf(demo, model):
    _, server, _ = demo
    ports = get_json(server, "/restconf/data/cmactor-ports:ports")
    assert [port["name"] for port in ports["cmactor-ports:ports"]["port"]] == [str(n) for n in range(1, 9)]
    validate(model, ports)
    code, headers, text = curl(server, "/restconf/data/cmactor-stats:stats/counters")
    assert code == 200 and headers["transfer-encoding"] == "chunked"  # streamed, page by page
    counters = json.loads(text)["cmactor-stats:counters"]
    assert [row["port"] for row in counters] == [str(n) for n in range(1, 9)]
    validate(model, {"cmactor-stats:stats": {"counters": counters}})
    entry = get_json(server, "/restconf/data/cmactor-ports:ports/port=3")
    assert entry == {"cmactor-ports:port": [{"name": "3", "enabled": entry["cmactor-ports:port"][0]["enabled"],
                                             "speed": "1000", "description": ""}]}  # fmt: skip
    validate(model, {"cmactor-ports:ports": {"port": entry["cmactor-ports:port"]}})
    assert get_json(server, "/restconf/data/cmactor-ports:ports/port=3/speed") == {"cmactor-ports:speed": "1000"}
    whole = get_json(server, "/restconf/data")
    assert set(whole) == {"cmactor-ports:ports", "cmactor-stats:stats", "cmactor-vlan:vlan"}
    validate(model, whole)


def test_keys_are_percent_encoded_in_key_order(demo):
    _, server, _ = demo
    name = "a b,c/d"
    body = {"cmactor-vlan:vlan": [{"name": name, "tag": "601"}]}
    code, headers, _ = curl(server, "/restconf/data/cmactor-vlan:vlan", method="POST", body=body)
    assert code == 201
    assert headers["location"] == "/restconf/data/cmactor-vlan:vlan/vlan=a%20b%2Cc%2Fd"
    assert get_json(server, headers["location"]) == body
    assert curl(server, "/restconf/data/cmactor-vlan:vlan/vlan=a%20b%2Cc%2Fd", method="DELETE")[0] == 204
    member = {"cmactor-vlan:member": [{"vlan": "default", "port": "2"}]}
    assert curl(server, "/restconf/data/cmactor-vlan:vlan", method="POST", body=member)[0] == 201
    assert get_json(server, "/restconf/data/cmactor-vlan:vlan/member=default,2") == member
    check_error(curl(server, "/restconf/data/cmactor-vlan:vlan/member=2,default"), 404, "invalid-value")
    assert curl(server, "/restconf/data/cmactor-vlan:vlan/member=default,2", method="DELETE")[0] == 204


def test_content_and_depth(demo, model):
    _, server, _ = demo
    config = get_json(server, "/restconf/data?content=config")
    assert "cmactor-stats:stats" not in config or config["cmactor-stats:stats"] == {}
    validate(model, config, content=ContentType.config)
    nonconfig = get_json(server, "/restconf/data/cmactor-stats:stats?content=nonconfig")
    assert len(nonconfig["cmactor-stats:stats"]["counters"]) == 8
    check_error(curl(server, "/restconf/data/cmactor-vlan:vlan/vlan?content=nonconfig"), 404, "invalid-value")
    assert get_json(server, "/restconf/data/cmactor-ports:ports?depth=1") == {"cmactor-ports:ports": {}}
    keys = get_json(server, "/restconf/data/cmactor-ports:ports?depth=2")["cmactor-ports:ports"]["port"]
    assert keys == [{"name": str(n)} for n in range(1, 9)]
    assert get_json(server, "/restconf/data/cmactor-ports:ports/port=2?depth=1") == {
        "cmactor-ports:port": [{"name": "2"}]
    }
    check_error(curl(server, "/restconf/data/cmactor-ports:ports?depth=0"), 400, "invalid-value", "depth")
    check_error(curl(server, "/restconf/data/cmactor-ports:ports?content=some"), 400, "invalid-value", "content")
    check_error(curl(server, "/restconf/data/cmactor-ports:ports?fields=name"), 400, "invalid-value", "fields")


# -- writes ------------------------------------------------------------------


def test_patch_put_post_delete(demo):
    _, server, _ = demo
    url = "/restconf/data/cmactor-vlan:vlan"
    created = curl(server, f"{url}/vlan", method="POST", body={"cmactor-vlan:vlan": [{"name": "v100", "tag": "100"}]})
    assert created[0] == 201 and created[1]["location"] == f"{url}/vlan=v100"
    again = curl(server, url, method="POST", body={"cmactor-vlan:vlan": [{"name": "v100", "tag": "100"}]})
    check_error(again, 409, "data-exists")
    patch = {"cmactor-vlan:vlan": [{"tag": "101"}]}
    assert curl(server, f"{url}/vlan=v100", method="PATCH", body=patch)[0] == 204
    assert get_json(server, f"{url}/vlan=v100/tag") == {"cmactor-vlan:tag": "101"}
    put = {"cmactor-vlan:vlan": [{"name": "v102", "tag": "102"}]}
    assert curl(server, f"{url}/vlan=v102", method="PUT", body=put)[0] == 201
    put["cmactor-vlan:vlan"][0]["tag"] = "103"
    assert curl(server, f"{url}/vlan=v102", method="PUT", body=put)[0] == 204
    assert get_json(server, f"{url}/vlan=v102") == put
    assert curl(server, f"{url}/vlan=v102/tag", method="PATCH", body={"cmactor-vlan:tag": "104"})[0] == 204
    assert get_json(server, f"{url}/vlan=v102/tag") == {"cmactor-vlan:tag": "104"}
    # a PATCH of the module's container: a set per entry
    both = {"cmactor-vlan:vlan": {"vlan": [{"name": "v105", "tag": "105"}, {"name": "v106", "tag": "106"}]}}
    assert curl(server, url, method="PATCH", body=both)[0] == 204
    for name in ("v100", "v102", "v105", "v106"):
        assert curl(server, f"{url}/vlan={name}", method="DELETE")[0] == 204
    check_error(curl(server, f"{url}/vlan=v100"), 404, "invalid-value", "does not exist")
    port = "/restconf/data/cmactor-ports:ports/port=7"
    assert curl(server, port, method="PATCH", body={"cmactor-ports:port": [{"description": "uplink"}]})[0] == 204
    assert get_json(server, f"{port}/description") == {"cmactor-ports:description": "uplink"}


def test_operation_runs_the_setop(demo, model):
    _, server, _ = demo
    op = "/restconf/operations/cmactor-ports:port-setop"
    code, _, text = curl(server, op, method="POST", body={"cmactor-ports:input": {"action": "enable_all"}})
    assert code == 200, text
    output = json.loads(text)
    assert output == {"cmactor-ports:output": {"message": [f"port {n}: enabled=1" for n in range(1, 9)]}}
    validate(model, output, "cmactor-ports:port-setop")
    # vlan_setop answers deleted=NAME, not a column: nothing of it is output
    assert curl(server, "/restconf/data/cmactor-vlan:vlan/vlan=v200", method="PUT",
                body={"cmactor-vlan:vlan": [{"name": "v200", "tag": "200"}]})[0] == 201  # fmt: skip
    deleted = curl(server, "/restconf/operations/cmactor-vlan:vlan-setop", method="POST",
                   body={"cmactor-vlan:input": {"action": "delete", "name": "v200"}})  # fmt: skip
    assert deleted[0] == 204
    refused = curl(server, op, method="POST", body={"cmactor-ports:input": {"action": "reboot"}})
    check_error(refused, 400, "invalid-value", "action must be enable_all or disable_all")
    unknown = curl(server, op, method="POST", body={"cmactor-ports:input": {"force": "1"}})
    check_error(unknown, 400, "invalid-value", "no input leaf 'force'")
    check_error(curl(server, "/restconf/operations/cmactor-stats:counters-setop", method="POST"), 404, "invalid-value")
    headers, _ = check_error(curl(server, op), 405, "operation-not-supported")
    assert headers["allow"] == "POST, OPTIONS"


# -- errors ------------------------------------------------------------------


def test_unknown_resources_are_404(demo):
    _, server, _ = demo
    check_error(curl(server, "/restconf/data/cmactor-nope:nope"), 404, "invalid-value", "no module cmactor-nope")
    check_error(curl(server, "/restconf/data/cmactor-vlan:vlan/nope"), 404, "invalid-value", "no table 'nope'")
    check_error(curl(server, "/restconf/data/cmactor-vlan:vlan/vlan=nope"), 404, "invalid-value")
    check_error(curl(server, "/restconf/data/cmactor-ports:ports/port=1/nope"), 404, "invalid-value", "no leaf")
    check_error(curl(server, "/restconf/data/other:thing"), 404, "invalid-value")
    check_error(curl(server, "/elsewhere"), 404, "invalid-value")
    check_error(curl(server, "/restconf/data/cmactor-vlan:vlan/vlan=a,b"), 400, "invalid-value", "1 keys")
    check_error(curl(server, "/restconf/data/cmactor-vlan:vlan/vlan=%ZZ"), 400, "malformed-message")


def test_refusals_and_bad_bodies(demo):
    _, server, _ = demo
    url = "/restconf/data/cmactor-vlan:vlan/vlan=v300"
    refused = curl(server, url, method="PATCH", body={"cmactor-vlan:vlan": [{"tag": "99999"}]})
    check_error(refused, 400, "invalid-value", "tag must be a number from 1 to 4094")
    check_error(curl(server, url, method="PATCH", body='{"cmactor-vlan:vlan": ['), 400, "malformed-message")
    check_error(curl(server, url, method="PATCH", body=b"\xff".decode("latin-1")), 400, "malformed-message")
    for body, message in (
        ({"cmactor-vlan:vlan": [{"bogus": "1"}]}, "no leaf 'bogus'"),
        ({"cmactor-vlan:vlan": [{"tag": 300}]}, "is a string"),
        ({"cmactor-vlan:vlan": [{"name": "v301", "tag": "300"}]}, "in the body but 'v300' in the URL"),
        ({"cmactor-ports:port": [{"tag": "300"}]}, "one member, 'cmactor-vlan:vlan'"),
    ):
        check_error(curl(server, url, method="PATCH", body=body), 400, "invalid-value", message)
    wrong_type = curl(server, url, "--data-binary", "tag=1", method="PATCH")  # curl's form type
    check_error(wrong_type, 415, "invalid-value")
    check_error(curl(server, "/restconf/data/cmactor-vlan:vlan", headers=["Accept: text/html"]), 406, "invalid-value")
    assert curl(server, "/restconf/data/cmactor-vlan:vlan", headers=["Accept: application/*"])[0] == 200


def test_methods_not_allowed(demo):
    _, server, _ = demo
    headers, _ = check_error(
        curl(server, "/restconf/data/cmactor-ports:ports/port=1", method="DELETE"), 405, "operation-not-supported"
    )
    assert headers["allow"] == "GET, HEAD, OPTIONS, PATCH, PUT"
    readonly = curl(server, "/restconf/data/cmactor-stats:stats/counters=1", method="PATCH", body={})
    assert check_error(readonly, 405, "operation-not-supported")[0]["allow"] == "GET, HEAD, OPTIONS"
    assert check_error(curl(server, "/restconf", method="PATCH", body={}), 405, "operation-not-supported")
    options = curl(server, "/restconf/data/cmactor-vlan:vlan/vlan=default", method="OPTIONS")
    assert options[0] == 200 and options[1]["allow"] == "GET, HEAD, OPTIONS, PATCH, PUT, DELETE"
    check_error(curl(server, "/restconf", method="BREW"), 501, "operation-not-supported")


# -- HTTP -------------------------------------------------------------------


def test_keep_alive_reuses_the_connection(demo):
    _, server, _ = demo
    done = subprocess.run(
        [CURL, "-v", "-s", "-o", "/dev/null", "-o", "/dev/null",
         f"{server.url}/restconf/data/cmactor-ports:ports/port=1", f"{server.url}/restconf/data/cmactor-ports:ports"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0
    assert "Re-using existing connection" in done.stderr, done.stderr


def raw(server, data, read=True, timeout=10):
    """Send ``data`` on a socket of its own; what the server answers before closing (or ``timeout``)."""
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        while read:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


def test_a_body_too_big_is_refused_unread(demo):
    _, server, _ = demo
    answer = raw(
        server,
        b"PATCH /restconf/data/cmactor-vlan:vlan HTTP/1.1\r\nHost: x\r\nContent-Type: application/yang-data+json\r\n"
        b"Content-Length: 1000000000\r\n\r\n{",
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"Connection: close" in answer and b'"too-big"' in answer
    chunked = raw(
        server,
        b"POST /restconf/data/cmactor-vlan:vlan HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n",
    )
    assert chunked.startswith(b"HTTP/1.1 411 "), chunked


def test_malformed_requests_get_restconf_errors(demo):
    _, server, _ = demo
    many = b"".join(b"X-%d: y\r\n" % n for n in range(120))
    for request, status in (
        (b"GET /restconf HTTP/1.1\r\n" + many + b"\r\n", b"431"),  # http.server's bound: 100 headers
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414"),  # and 64 KiB a line
        (b"GET /restconf HTTP/2.0\r\n\r\n", b"505"),
        (b"PATCH /restconf/data/cmactor-vlan:vlan HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"400"),
    ):
        answer = raw(server, request)
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer
        assert b'{"ietf-restconf:errors"' in answer and b"Traceback" not in answer
    assert curl(server, "/restconf")[0] == 200


def test_slow_and_idle_clients_do_not_stall_others(demo):
    _, server, _ = demo
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    slow = socket.create_connection((host, port), timeout=10)
    idle = [socket.create_connection((host, port), timeout=10) for _ in range(5)]
    try:
        slow.sendall(b"GET /restconf HTTP/1.1\r\nHost: x\r\n")  # and never the end of its headers
        started = time.monotonic()
        assert curl(server, "/restconf/data/cmactor-ports:ports/port=1")[0] == 200
        assert slow.recv(100) == b""  # closed by request_timeout (1.5 s), however long it waits
        assert 1.0 < time.monotonic() - started < 5
    finally:
        slow.close()
        for sock in idle:
            sock.close()


def test_a_connection_past_the_cap_takes_the_place_of_the_longest_idle(demo):
    _, server, _ = demo
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port

    def get(conn):
        conn.request("GET", "/restconf")
        answer = conn.getresponse()
        answer.read()
        return answer.status

    held = []
    try:
        for _ in range(8):  # the cap: each answered once, then kept alive, idle
            conn = http.client.HTTPConnection(host, port, timeout=10)
            assert get(conn) == 200
            held.append(conn)
            time.sleep(0.01)
        assert curl(server, "/restconf")[0] == 200  # served at once, in the place of the first
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            get(held[0])  # closed by the server while it was idle
        assert [get(conn) for conn in held[1:]] == [200] * 7
    finally:
        for conn in held:
            conn.close()


@contextlib.contextmanager
def in_process(library, socket_path, user_of):
    """A Server in a thread of this process (its internals can be set), stopped at the end."""
    server = RestconfServer(("127.0.0.1", 0), library, connector(socket_path), user_of)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_walks_go_page_by_page(demo, tmp_path, monkeypatch):
    run, _, _ = demo
    socket_path = re.search(r"socket (\S+)", run.text)[1]
    monkeypatch.setattr(data, "PAGE", 3)  # 8 ports: three pages, each after the last row's key
    with cmactor.connect(socket=socket_path) as conn:
        library = Library(lambda: conn.request({"op": "schema"})["schema"], str(tmp_path / "revisions.json"))
        with in_process(library, socket_path, lambda headers: "pager") as server:
            ports = get_json(server, "/restconf/data/cmactor-ports:ports/port")["cmactor-ports:port"]
            assert [port["name"] for port in ports] == [str(n) for n in range(1, 9)]
            whole = get_json(server, "/restconf/data/cmactor-stats:stats")["cmactor-stats:stats"]
            assert [row["port"] for row in whole["counters"]] == [str(n) for n in range(1, 9)]


def test_no_user_is_401_and_no_supervisor_is_503(tmp_path):
    def fetch():
        raise OperationalError("cannot reach a cmactor supervisor at nowhere")

    library = Library(fetch, str(tmp_path / "revisions.json"))
    users = {"who": None}
    with in_process(library, str(tmp_path / "none.sock"), lambda headers: users["who"]) as server:
        headers, _ = check_error(curl(server, "/restconf/data/cmactor-vlan:vlan"), 401, "access-denied")
        assert headers["www-authenticate"] == 'Basic realm="cmactor"'
        assert curl(server, "/.well-known/host-meta")[0] == 200  # discovery needs no user
        users["who"] = "alice"
        check_error(curl(server, "/restconf/data/cmactor-vlan:vlan"), 503, "resource-denied", "cannot be reached")


def https_with_users(home, config, users):
    """A server for the supervisor of ``config`` (its text, [restconf] tls = false), over HTTPS
    instead, with the htpasswd users {name: password} in ``home``."""
    path = home / "users"
    path.write_text("".join(f"{name}:{hash_password(password, rounds=4)}\n" for name, password in users.items()))
    path.chmod(0o600)
    https = home / "https.toml"  # the same supervisor (state_dir), served over HTTPS with users
    https.write_text(config.replace("tls = false", 'tls = true\nusers = "users"'))
    return Server(https, home / "https.log")


def test_https_with_users(demo):
    _, _, home = demo
    server = https_with_users(home, CONFIG, {"alice": "secret"})
    try:
        assert server.url.startswith("https://")
        assert "SHA-256 fingerprint" in server.text
        code, _, text = curl(server, "/restconf/data/cmactor-ports:ports/port=1", "-k", "-u", "alice:secret")
        assert code == 200, text
        for credentials in (["-u", "alice:wrong"], ["-u", "bob:secret"], []):
            answer = curl(server, "/restconf/data/cmactor-ports:ports/port=1", "-k", *credentials)
            headers, _ = check_error(answer, 401, "access-denied")
            assert headers["www-authenticate"] == 'Basic realm="cmactor"'
        # A user added while the server runs logs in without a restart.
        added = cli("restconf", "--add-user", "bob", "-c", home / "https.toml", input="secret\n")
        assert added.returncode == 0, added.stderr
        deadline = time.monotonic() + 10
        while curl(server, "/restconf/data/cmactor-ports:ports/port=1", "-k", "-u", "bob:secret")[0] != 200:
            assert time.monotonic() < deadline, "bob, added, could not log in"
            time.sleep(0.2)
    finally:
        assert server.stop() == 0, server.text


def test_a_module_not_ready_is_503(demo):
    # Last: stats stays stopped (starting it again would leave its new worker behind).
    run, server, home = demo
    assert cli("-c", home / "cmactor.toml", "stop", "stats").returncode == 0
    check_error(curl(server, "/restconf/data/cmactor-stats:stats/counters=1"), 503, "resource-denied", "STOPPED")
    check_error(curl(server, "/restconf/data/cmactor-stats:stats"), 503, "resource-denied")
