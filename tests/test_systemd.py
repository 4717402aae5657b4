"""systemd readiness: a datagram socket stands in for systemd's NOTIFY_SOCKET while a
real `cmactor run` starts, loses a worker, pings the watchdog and stops on SIGTERM; STATUS
lines a few a second, however many modules change; more start time asked for while a
load goes on; the example unit and its sandbox."""

import concurrent.futures
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest
from helpers import HERE, agent, wait_for
from processes import cli, cmactor_cmd

from cmsupervisor.observability import notify

ECHO = agent("echo.py:main")
WATCHDOG_USEC = 300_000  # pings every 0.15 s


class Systemd:
    """The listening end of NOTIFY_SOCKET: every datagram, with the time it came."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages = []  # (monotonic time, {name: value}), in the order they came

    def _receive(self, timeout):
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            return False
        self.messages.append((time.monotonic(), dict(line.split("=", 1) for line in data.decode().split("\n"))))
        return True

    def wait(self, predicate, since=0, timeout=15):
        """The first message from ``since`` on (an index into messages) for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages[since:]:
                if predicate(message[1]):
                    return message
            since = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such message within {timeout}s; got {[m for _, m in self.messages]}")
            self._receive(left)

    def collect(self, seconds):
        """Every message that comes within ``seconds``."""
        since = len(self.messages)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._receive(left)
        return self.messages[since:]

    def drain(self):
        """Forget what is queued now: a message sent before this call is never taken as after it."""
        while self._receive(0):
            pass
        self.messages.clear()

    def close(self):
        self.sock.close()


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cmactor.toml"
    path.write_text(
        f'[supervisor]\nstate_dir = "state"\n[agents.echo]\nentry = "{ECHO}"\n'
        f'[agents.other]\nentry = "{ECHO}"\nenv = {{ ECHO_DEPS = "echo" }}\n'
    )
    return path


@contextlib.contextmanager
def run(config, tmp_path, **environ):
    """`cmactor run config` with ``environ`` added; its stderr in tmp_path/run.log. SIGTERM at the end."""
    log = tmp_path / "run.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmactor_cmd() + ["run", str(config)], stderr=stderr, env={**os.environ, **environ})
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(20)


@pytest.fixture
def systemd(tmp_path):
    listener = Systemd(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


def status(config):
    return json.loads(cli("-c", str(config), "status", "--format", "json").stdout)


def test_ready_status_watchdog_and_stopping(config, tmp_path, systemd):
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    with run(config, tmp_path, **env) as (proc, _):
        _, ready = systemd.wait(lambda m: "READY" in m)
        assert ready == {"READY": "1", "STATUS": "2/2 modules READY"}
        assert {entry["state"] for entry in status(config).values()} == {"READY"}
        # The first change was told at once; the others of a start this short came with READY=1.
        lines = [m for _, m in systemd.messages if "STATUS" in m]
        assert lines[0] == {"STATUS": "0/2 modules READY; echo STARTING, other STOPPED"}
        assert not [m for _, m in systemd.messages if "EXTEND_TIMEOUT_USEC" in m]  # nor asked for more time

        # Watchdog pings at about WATCHDOG_USEC/2 (generous bounds: this checks they keep
        # coming, not the timer's precision on a loaded machine).
        pings = [at for at, m in systemd.collect(1.5) if "WATCHDOG" in m]
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert 4 <= len(pings) <= 25, gaps  # ~10 expected: neither stopped nor a flood
        assert max(gaps) < 1.0, gaps

        # A worker killed: STATUS says which module is not READY, then that all are again.
        since = len(systemd.messages)
        os.kill(status(config)["other"]["pid"], signal.SIGKILL)
        restarting = systemd.wait(lambda m: m.get("STATUS") == "1/2 modules READY; other RESTARTING", since)
        since = systemd.messages.index(restarting)
        systemd.wait(lambda m: m.get("STATUS") == "2/2 modules READY", since)

        proc.send_signal(signal.SIGTERM)
        _, stopping = systemd.wait(lambda m: "STOPPING" in m)
        assert stopping == {"STOPPING": "1", "STATUS": "stopping: 2/2 modules READY"}
        assert proc.wait(20) == 0
    systemd.wait(lambda m: m.get("STATUS") == "stopping: 0/2 modules READY; echo STOPPED, other STOPPED")


def test_status_lines_come_a_few_a_second_and_the_last_state_wins(tmp_path, systemd):
    config = tmp_path / "cmactor.toml"
    count = 30  # some 100 state changes within a fraction of a second: one datagram each before
    config.write_text(
        '[supervisor]\nstate_dir = "state"\n' + "".join(f'[agents.m{n:02}]\nentry = "{ECHO}"\n' for n in range(count))
    )
    with run(config, tmp_path, NOTIFY_SOCKET=str(tmp_path / "notify.sock")) as (proc, _):
        ready_at, ready = systemd.wait(lambda m: "READY" in m)
        assert ready == {"READY": "1", "STATUS": f"{count}/{count} modules READY"}
        lines = [at for at, m in systemd.messages if "STATUS" in m]
        # At most one every STATUS_INTERVAL, and one right away: the arrival times may bunch
        # (this process may read late), their number may not.
        assert len(lines) <= (ready_at - lines[0]) / notify.STATUS_INTERVAL + 2, lines
        proc.send_signal(signal.SIGTERM)
        stopping = systemd.wait(lambda m: "STOPPING" in m)
        assert proc.wait(20) == 0
    # The stop's last state, due from a timer when the supervisor ended, was sent at its end.
    named = ", ".join(f"m{n:02} STOPPED" for n in range(notify.NAMED))
    expected = f"stopping: 0/{count} modules READY; {named}, +{count - notify.NAMED} more"
    last = systemd.wait(lambda m: m.get("STATUS") == expected, systemd.messages.index(stopping))
    assert last is systemd.messages[-1]


def test_a_long_load_asks_systemd_for_more_time_until_ready(supervisor, tmp_path, systemd, monkeypatch):
    monkeypatch.setattr(notify, "EXTEND_EVERY", 0.2)
    first = supervisor({"echo": ECHO})
    first.connect().cursor().execute("set echo.kv", {"key": "a", "value": "1"})  # journaled: the next start loads
    first.stop()
    sup = supervisor({"echo": {"entry": ECHO, "env": {"ECHO_LOAD_DELAY": "1.5"}}}, start=False)
    sup.notifier = notify.Notifier("test", str(tmp_path / "notify.sock"))
    with concurrent.futures.ThreadPoolExecutor(1) as starter:  # the datagrams read as they come
        started = time.monotonic()
        start = starter.submit(sup.start)
        ready_at, _ = systemd.wait(lambda m: "READY" in m)
        start.result()
    after = systemd.collect(0.6)
    extends = [(at, m) for at, m in systemd.messages if "EXTEND_TIMEOUT_USEC" in m]
    assert {m["EXTEND_TIMEOUT_USEC"] for _, m in extends} == {str(round(0.2 * notify.EXTEND_SLACK * 1e6))}
    assert 4 <= len(extends) <= 1.5 / 0.2 + 2  # every 0.2 s of the load, from 0.2 s on
    assert extends[0][0] - started >= 0.2 and extends[-1][0] <= ready_at
    assert not [m for _, m in after if "EXTEND_TIMEOUT_USEC" in m]  # READY=1 ended them


def test_without_strict_ready_comes_with_what_came_up(tmp_path, systemd):
    config = tmp_path / "cmactor.toml"
    config.write_text(
        f'[supervisor]\nstate_dir = "state"\n[agents.echo]\nentry = "{ECHO}"\n'
        f'[agents.bad]\nentry = "{agent("broken.py:raises")}"\n'
    )
    with run(config, tmp_path, NOTIFY_SOCKET=str(tmp_path / "notify.sock")):
        _, ready = systemd.wait(lambda m: "READY" in m)
        assert ready == {"READY": "1", "STATUS": "1/2 modules READY; bad FAILED"}
        assert not [m for _, m in systemd.messages if "WATCHDOG" in m]  # no WATCHDOG_USEC: no pings


def test_an_abstract_socket(config, tmp_path):
    name = f"cmactor-test-{uuid.uuid4().hex}"
    listener = Systemd("\0" + name)
    try:
        with run(config, tmp_path, NOTIFY_SOCKET="@" + name):
            assert listener.wait(lambda m: "READY" in m)[1]["READY"] == "1"
    finally:
        listener.close()


@pytest.mark.parametrize(
    "value, logged",
    [
        ("{missing}", "cannot notify systemd through NOTIFY_SOCKET={missing}: [Errno 2] No such file or directory"),
        ("relative/notify.sock", "NOTIFY_SOCKET='relative/notify.sock' is neither an absolute path nor an abstract"),
    ],
)
def test_a_bad_notify_socket_is_a_log_line_not_a_crash(config, tmp_path, value, logged):
    missing = str(tmp_path / "no-such.sock")
    value, logged = value.format(missing=missing), logged.format(missing=missing)
    with run(config, tmp_path, NOTIFY_SOCKET=value, WATCHDOG_USEC=str(WATCHDOG_USEC)) as (proc, log):
        wait_for(lambda: "modules READY; socket" in log.read_text(), timeout=20)
        assert {entry["state"] for entry in status(config).values()} == {"READY"}
        time.sleep(0.5)  # several watchdog pings that fail too
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert log.read_text().count(logged) == 1, log.read_text()


def test_a_stuck_loop_stops_the_watchdog_pings(supervisor, tmp_path, systemd):
    sup = supervisor({"echo": ECHO}, start=False)
    sup.notifier = notify.Notifier("test", str(tmp_path / "notify.sock"), watchdog_interval=0.05)
    sup.start()
    systemd.wait(lambda m: "WATCHDOG" in m)
    sup._loop.call_async(time.sleep, 1.0)  # the loop thread stuck for a second
    time.sleep(0.1)
    systemd.drain()
    stuck = time.monotonic()
    at, _ = systemd.wait(lambda m: "WATCHDOG" in m)
    assert at - stuck > 0.6  # none while it was stuck
    systemd.wait(lambda m: "WATCHDOG" in m, since=len(systemd.messages))  # and they go on after


def test_from_environment_reads_and_removes_the_variables(caplog):
    environ = {
        "NOTIFY_SOCKET": "@abstract",
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": str(os.getpid()),
        "PATH": "/bin",
    }
    notifier = notify.from_environment(environ)
    assert environ == {"PATH": "/bin"}  # workers inherit the environment: not these
    assert (notifier.name, notifier._address, notifier.watchdog_interval) == ("@abstract", "\0abstract", 1.0)

    assert notify.from_environment({}) is None
    for_another = {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}  # pid 1's watchdog
    assert notify.from_environment(for_another).watchdog_interval is None
    with caplog.at_level(logging.ERROR, logger="cmactor.supervisor"):
        assert notify.from_environment({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert "WATCHDOG_USEC='soon' is not a number of microseconds > 0; not sending watchdog pings" in caplog.text


def _unit_settings(text):
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


# The sandbox the example unit keeps: key -> its value.
HARDENING = {
    "User": "cmactor",
    "Group": "cmactor",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallFilter": "@system-service",
    "StateDirectory": "cmactor",
    "UMask": "0077",
    # memory_max's cgroups (memory_enforcement "auto" or "cgroup") need the tree writable.
    "Delegate": "memory",
}


def test_the_example_unit(tmp_path):
    path = os.path.join(os.path.dirname(HERE), "examples", "systemd", "cmactor.service")
    with open(path) as f:
        text = f.read()
    settings = _unit_settings(text)
    assert settings["Type"] == "notify" and settings["KillMode"] == "mixed" and settings["Restart"] == "on-failure"
    assert int(settings["WatchdogSec"]) > 0
    assert settings["ExecStart"].split() == [
        "/opt/cmactor/bin/cmactor",
        "run",
        "/etc/cmactor/cmactor.toml",
        "--state-dir",
        f"/var/lib/{settings['StateDirectory']}",  # the one directory the sandbox lets it write
    ]
    assert {key: settings.get(key) for key in HARDENING} == HARDENING
    assert "ProtectControlGroups" not in settings  # it would make the delegated cgroups read-only
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit's keys were checked, not systemd's reading of it")
    unit = tmp_path / "cmactor.service"  # with a cmactor that exists: verify checks ExecStart's program
    unit.write_text(text.replace("/opt/cmactor/bin/cmactor", cmactor_cmd()[0]))
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=30)
    assert (verified.returncode, verified.stderr) == (0, "")
    # Read from the file, with no running systemd needed (systemd 250 and later).
    security = subprocess.run(
        [analyze, "security", "--offline=yes", str(unit)], capture_output=True, text=True, timeout=30
    )
    if "--offline" in security.stderr:
        pytest.skip(f"this systemd-analyze cannot score a unit file: {security.stderr.strip()}")
    exposure = float(re.search(r"Overall exposure level for cmactor.service: (\d+\.\d+)", security.stdout)[1])
    assert exposure <= 2.0, security.stdout  # "OK" (9.6, "UNSAFE", without the sandbox)
