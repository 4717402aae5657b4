"""The RESTCONF server run by `cmactor run` (issue 27, item 7): a process of its own beside
the modules (supervision/sidecar.py), started once the supervisor serves, restarted when
it dies, left FAILED when it keeps ending before it serves, shown in `cmactor status`
and in the metrics, and gone when the supervisor stops. Real processes throughout: the
demo's agents, `cmactor run`, curl."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest
from etcd_cluster import etcd_cluster  # noqa: F401
from processes import Run, cli
from test_ha import ha_state, host_config, wait_for

import cmactor
from cmactor.errors import NotActive
from cmsupervisor.loop import EventLoop
from cmsupervisor.observability import metrics
from cmsupervisor.restconf import data
from cmsupervisor.supervision.sidecar import Sidecar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CURL = shutil.which("curl")

CONFIG = """
[supervisor]
state_dir = "state"
hold_timeout = 2
stop_timeout = 5

[agents.ports]
entry = "ports.py:main"

[agents.vlan]
entry = "vlan.py:main"

[agents.stats]
entry = "stats.py:main"

[restconf]
listen = "127.0.0.1:{port}"
tls = false
{extra}
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def demo(tmp_path, port, extra=""):
    for name in ("ports.py", "vlan.py", "stats.py"):
        shutil.copy(os.path.join(ROOT, "examples", "switch", name), tmp_path)
    config = tmp_path / "cmactor.toml"
    config.write_text(CONFIG.format(port=port, extra=extra))
    return config


class Running:
    """`cmactor run CONFIG`, its stderr read to the end on a thread (never a full pipe)."""

    def __init__(self, config):
        self.config = config
        self.run = Run(config)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.run.proc.stderr:
            self.run.lines.append(line)

    def wait_for(self, pattern, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.run.text)
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in cmactor run's stderr:\n{self.run.text}")

    def restconf(self):
        """The restconf line of `cmactor status`, and the exit status."""
        done = cli("-c", self.config, "status")
        lines = [line for line in done.stdout.splitlines() if line.startswith("restconf:")]
        assert len(lines) == 1, done.stdout + done.stderr
        return lines[0], done.returncode

    def until(self, pattern, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            line, code = self.restconf()
            found = re.search(pattern, line)
            if found:
                return found, code
            assert time.monotonic() < deadline, f"status never matched {pattern!r}; last: {line}"
            time.sleep(0.1)

    def stop(self):
        if self.run.proc.poll() is None:
            self.run.proc.send_signal(signal.SIGTERM)
        code = self.run.proc.wait(30)
        self.reader.join(10)
        return code


@pytest.fixture
def running():
    made = []

    def start(config):
        made.append(Running(config))
        return made[-1]

    yield start
    for each in reversed(made):  # a cluster's standby first: the active's stop hands nothing over
        try:
            each.stop()
        except subprocess.TimeoutExpired:
            each.run.kill()
        each.reader.join(10)


def get(url, *args):
    """(status, body) of a request with curl (a GET unless ``args`` say), as an operator's client would send it."""
    done = subprocess.run(
        [CURL, "-s", "--max-time", "10", "-w", "\n%{http_code}", *args, url], capture_output=True, text=True, timeout=20
    )
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_run_serves_restconf_restarts_it_and_stops_it(tmp_path, running):
    port = free_port()
    sup = running(demo(tmp_path, port))
    said = sup.wait_for(r"cmactor: RESTCONF at (http://\S+)/restconf, pid (\d+)")
    url, pid = said[1], int(said[2])
    assert url == f"http://127.0.0.1:{port}"
    status, body = get(url + "/restconf/data/cmactor-vlan:vlan/vlan=default")
    assert status == 200, body
    assert '"name":"default"' in body.replace(" ", "")

    line, code = sup.restconf()
    assert line == f"restconf: RUNNING pid {pid} at {url} (restarts 0)"
    assert code == 0  # every module READY: the server's line does not change the exit status
    server = psutil.Process(pid)
    assert server.ppid() == sup.run.pid
    assert "restconf" in server.cmdline()
    assert os.getsid(pid) == pid  # a session of its own: a Ctrl-C at the terminal is the supervisor's

    os.kill(pid, signal.SIGKILL)
    found, _ = sup.until(r"RUNNING pid (\d+) .*\(restarts 1\); last exit: killed by SIGKILL")
    again = int(found[1])
    assert again != pid
    status, body = get(url + "/restconf/data/cmactor-vlan:vlan/vlan=default")
    assert status == 200, body
    assert f"restconf: pid {pid} killed by SIGKILL; starting it again" in sup.run.text

    assert sup.stop() == 0
    assert not psutil.pid_exists(again) or psutil.Process(again).status() == psutil.STATUS_ZOMBIE
    assert f"restconf: pid {again} ended" in sup.run.text
    assert "cmactor: stopped" in sup.run.text
    assert "Traceback" not in sup.run.text


def test_a_server_that_cannot_start_ends_failed_and_the_modules_serve_on(tmp_path, running):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        sup = running(demo(tmp_path, port, "start_retries = 2\nrestart_delay = 0.2"))
        sup.wait_for(r"cmactor: warning: RESTCONF is not serving yet \((RESTARTING|STARTING|FAILED)")
        found, code = sup.until(r"restconf: FAILED at \S+ \(restarts (\d+)\): ended before serving 3 times")
        assert found[1] == "2"
        assert code == 0  # the modules are READY: only they decide the exit status
        assert "cannot listen on" in sup.run.text  # the server's own words reach the operator
        children = psutil.Process(sup.run.pid).children()
        assert not [p for p in children if "restconf" in p.cmdline()]
        time.sleep(1.0)  # given up: no new start, nothing spins
        line, _ = sup.restconf()
        assert "(restarts 2)" in line
        assert psutil.Process(sup.run.pid).cpu_times().user < 5
        with cmactor.connect(socket=cli_socket(sup.config)) as conn:
            cur = conn.cursor()
            cur.execute("get vlan.vlan", {"name": "default"})
            assert cur.fetchone()
        assert sup.stop() == 0
    finally:
        taken.close()


def test_over_tls_the_fingerprint_reaches_the_operator_and_a_restart_keeps_the_certificate(tmp_path, running):
    config = demo(tmp_path, free_port())
    config.write_text(config.read_text().replace("tls = false", "tls = true"))
    sup = running(config)
    said = sup.wait_for(r"cmactor: RESTCONF TLS certificate SHA-256 fingerprint ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})")
    pid = int(sup.wait_for(r"cmactor: RESTCONF at https://\S+/restconf, pid (\d+)")[1])
    os.kill(pid, signal.SIGKILL)  # the next start finds the certificate the first one generated
    sup.until(r"RUNNING pid \d+ at https://\S+ \(restarts 1\)")
    text = sup.run.text
    assert f"restconf: TLS with a self-signed certificate generated in {tmp_path / 'state' / 'restconf'}" in text
    assert f"restconf: TLS with a self-signed certificate kept in {tmp_path / 'state' / 'restconf'}" in text
    assert text.count(f"fingerprint: {said[1]}") == 2  # both starts said it: the same certificate
    assert sup.stop() == 0


def test_a_supervisor_killed_outright_takes_its_server_along(tmp_path, running):
    sup = running(demo(tmp_path, free_port()))
    pid = int(sup.wait_for(r"cmactor: RESTCONF at \S+, pid (\d+)")[1])
    server = psutil.Process(pid)
    sup.run.kill()  # SIGKILL: no stop runs; the kernel's parent-death signal ends the server
    gone, alive = psutil.wait_procs([server], timeout=10)
    assert not alive


def cli_socket(config):
    return str(config.parent / "state" / "run" / "cm.sock")


def test_from_toml_embedders_get_the_server_in_status_and_metrics(tmp_path):
    port = free_port()
    sup = cmactor.Supervisor.from_toml(demo(tmp_path, port), start_timeout=20)
    with sup:
        deadline = time.monotonic() + 20
        while sup.restconf_status()["state"] == "STARTING" and time.monotonic() < deadline:
            time.sleep(0.05)
        found = sup.restconf_status()
        assert found["state"] == "RUNNING", found
        assert found["url"] == f"http://127.0.0.1:{port}"
        assert found["fingerprint"] is None  # plain HTTP
        assert sup.supervisor_status()["restconf"] == found
        with urllib.request.urlopen(found["url"] + "/restconf/yang-library-version", timeout=10) as answer:
            assert answer.status == 200
        families = {family.name: family for family in metrics._supervisor(sup.supervisor_status())}
        assert families["cmactor_restconf_up"].samples[0].value == 1
        pid = found["pid"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_no_restconf_table_no_server(tmp_path):
    (tmp_path / "cmactor.toml").write_text('[supervisor]\nstate_dir = "s"\n[agents.a]\nentry = "a.py:main"\n')
    (tmp_path / "a.py").write_text("from cmactor import ready\n\ndef main():\n    ready()\n")
    sup = cmactor.Supervisor.from_toml(tmp_path / "cmactor.toml", start_timeout=20)
    with sup:
        assert sup.restconf_status() is None
        own = sup.supervisor_status()
        assert own["restconf"] is None
        assert "cmactor_restconf_up" not in {family.name for family in metrics._supervisor(own)}


def test_a_standby_refuses_writes_with_503_naming_the_active():
    refused = NotActive("set vlan.vlan refused: node 'b' is standby, not the active; send writes to a", "a")
    error = data.cm_error(refused, "PATCH vlan.vlan")
    assert (error.status, error.tag) == (503, "resource-denied")
    assert "send writes to a" in error.message


@pytest.mark.timeout(120)
@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_each_node_of_a_cluster_runs_its_server_and_a_standby_refuses_writes(tmp_path, running, etcd_cluster):  # noqa: F811
    for name in ("ports.py", "vlan.py", "stats.py"):
        shutil.copy(os.path.join(ROOT, "examples", "switch", name), tmp_path)
    demo_agents = "".join(f'[agents.{name}]\nentry = "{name}.py:main"\n' for name in ("ports", "vlan", "stats"))
    urls = {}
    for name in ("a", "b"):
        config = host_config(tmp_path, name, etcd_cluster.endpoints, agents=demo_agents)
        config.write_text(config.read_text() + f'[restconf]\nlisten = "127.0.0.1:{free_port()}"\ntls = false\n')
        node = running(config)
        urls[name] = node.wait_for(r"cmactor: RESTCONF at (\S+), pid")[1] + "/data/cmactor-vlan:vlan/vlan=v7"
        if name == "a":
            wait_for(lambda: (ha_state(tmp_path / "a.sock") or {}).get("role") == "active", 20, "a is active")
    wait_for(lambda: (ha_state(tmp_path / "b.sock") or {}).get("in_sync"), 20, "b is an in-sync standby")
    body = ["-X", "PATCH", "-H", "Content-Type: application/yang-data+json", "--data-binary"]
    body.append('{"cmactor-vlan:vlan": [{"name": "v7", "tag": "7"}]}')
    assert get(urls["a"], *body)[0] == 204
    refused = get(urls["b"], *body)
    assert refused[0] == 503, refused
    assert "resource-denied" in refused[1] and "send writes to a" in refused[1]
    read = wait_for(lambda: (lambda answer: answer[0] == 200 and answer)(get(urls["b"])), 10, "b serves v7")
    assert '"tag": "7"' in read[1].replace('":"', '": "')


def test_a_sidecar_killed_with_a_dying_loop_is_reaped(tmp_path):
    """The loop dying of an error (Supervisor._die): kill() then close(), nothing left behind."""
    script = "import time; print('serving http://127.0.0.1:1/restconf', flush=True); time.sleep(60)"
    loop = EventLoop()
    loop.start(on_death=lambda: None)
    options = {"restart_delay": 0.1, "restart_delay_max": 1.0, "stable_after": 10.0, "start_retries": 1}
    car = Sidecar(
        "helper",
        [sys.executable, "-c", script],
        url="http://127.0.0.1:1",
        ready=re.compile(r"serving (?P<url>\S+)/restconf"),
        options=options,
        stop_timeout=5,
        start_timeout=20,
    )
    try:
        loop.call(car.start, loop)
        wait_for(lambda: loop.call(car.status)["state"] == "RUNNING", 20, "the helper serves")
        pid = loop.call(car.status)["pid"]
        loop.call(car.kill)
        loop.call(car.close)
        assert loop.call(car.status)["state"] == "STOPPED"
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        loop.call(loop.finish)
        loop.join()
