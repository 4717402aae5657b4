"""A real etcd cluster on this machine for tests and benchmarks of the hot standby: members on
free local ports, killed and restarted at will.

It talks to etcd with plain HTTP of its own (not the client under test), so that a bug in
the client cannot make the cluster look down.
"""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request

ETCD = shutil.which("etcd")
INSTALL_HINT = "the hot standby's tests and benchmarks need etcd: `apt-get install -y etcd-server` (Debian/Ubuntu), or put etcd 3.4+ on PATH"


def _free_port():
    # Port 0 draws from the ephemeral range, so never etcd's default 2379/2380 (a system etcd may hold them).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status(endpoint, timeout=1.0):
    """The member's /v3/maintenance/status answer, or None if it does not answer."""
    request = urllib.request.Request(f"http://{endpoint}/v3/maintenance/status", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


class EtcdCluster:
    def __init__(self, base_dir, size=3):
        self.base_dir = os.fspath(base_dir)
        os.makedirs(self.base_dir, exist_ok=True)
        self.names = [f"m{i}" for i in range(size)]
        self.endpoints = [f"127.0.0.1:{_free_port()}" for _ in range(size)]
        self.peers = [f"127.0.0.1:{_free_port()}" for _ in range(size)]
        # A token of its own: members of two clusters that meet on a reused port refuse each other.
        self.token = f"cmactor-test-{os.getpid()}-{id(self)}"
        self.procs = [None] * size

    def _command(self, index, state):
        name, client, peer = self.names[index], self.endpoints[index], self.peers[index]
        return [
            ETCD,
            f"--name={name}",
            f"--data-dir={os.path.join(self.base_dir, name)}",
            f"--listen-client-urls=http://{client}",
            f"--advertise-client-urls=http://{client}",
            f"--listen-peer-urls=http://{peer}",
            f"--initial-advertise-peer-urls=http://{peer}",
            "--initial-cluster=" + ",".join(f"{n}=http://{p}" for n, p in zip(self.names, self.peers)),
            f"--initial-cluster-state={state}",
            f"--initial-cluster-token={self.token}",
            # Fast elections (a new leader within about a second), and so a lease TTL of 1 s is allowed:
            # etcd's minimum TTL is 1.5 election timeouts.
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--logger=zap",
        ]

    def _spawn(self, index, state):
        # ETCD_* variables of the caller's environment would override the flags.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        with open(os.path.join(self.base_dir, f"{self.names[index]}.log"), "ab") as log:
            self.procs[index] = subprocess.Popen(
                self._command(index, state), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )

    def _wait(self, indexes, timeout, what):
        """Wait until every member of ``indexes`` answers and knows a leader; else stop and raise."""
        deadline = time.monotonic() + timeout
        why = f"no leader, or no answer, within {timeout}s"
        while time.monotonic() < deadline:
            statuses = [_status(self.endpoints[i]) for i in indexes]
            if all(s is not None and int(s.get("leader", 0)) for s in statuses):
                return
            dead = [self.names[i] for i in indexes if self.procs[i].poll() is not None]
            if dead:
                why = f"{', '.join(dead)} exited"
                break
            time.sleep(0.05)
        tails = "\n".join(self._log_tail(i) for i in indexes)
        self.stop()
        raise RuntimeError(f"etcd cluster: {what} failed: {why}\n{tails}")

    def _log_tail(self, index, lines=15):
        path = os.path.join(self.base_dir, f"{self.names[index]}.log")
        try:
            with open(path, errors="replace") as log:
                tail = log.readlines()[-lines:]
        except OSError:
            tail = []
        return f"--- {self.names[index]} ({path}):\n" + "".join(tail)

    def start(self, timeout=15):
        for index in range(len(self.names)):
            self._spawn(index, "new")
        self._wait(range(len(self.names)), timeout, "start")

    def leader(self):
        """The index of the current leader member: the live one that the live members name."""
        statuses = [_status(e) if self._alive(i) else None for i, e in enumerate(self.endpoints)]
        members = {int(s["header"]["member_id"]): i for i, s in enumerate(statuses) if s}
        for status in filter(None, statuses):
            if int(status.get("leader", 0)) in members:
                return members[int(status["leader"])]
        raise RuntimeError("etcd cluster: no leader")

    def _alive(self, index):
        return self.procs[index] is not None and self.procs[index].poll() is None

    def kill(self, index):
        proc = self.procs[index]
        if proc is not None:
            proc.kill()
            proc.wait()

    def restart(self, index, timeout=15):
        self.kill(index)
        self._spawn(index, "existing")
        self._wait([index], timeout, f"restart of {self.names[index]}")

    def stop(self):
        for index in range(len(self.procs)):
            self.kill(index)
