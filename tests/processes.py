"""Running the `cmactor` command as a real process, for tests that drive it as an operator would."""

import contextlib
import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import psutil


def cmactor_cmd():
    script = os.path.join(os.path.dirname(sys.executable), "cmactor")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "cmsupervisor.cli"]


def cli(*args, timeout=30, **kwargs):
    """Run one `cmactor` command to its end: the CompletedProcess (text)."""
    return subprocess.run(
        cmactor_cmd() + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def on_terminal(*args, columns=200, env=None):
    """Run cmactor with its stdout and its stderr each on a pseudo-terminal of its own,
    ``columns`` wide (its size, and $COLUMNS; ``env`` adds to the environment): (exit
    status, what the stdout terminal got, what the stderr one got), bytes, each "\\r\\n"
    of the terminal read as "\\n"."""
    ends = [pty.openpty() for _ in range(2)]
    for _, slave in ends:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = dict(os.environ, COLUMNS=str(columns), LINES="50", **(env or {}))
    try:
        proc = subprocess.Popen(
            cmactor_cmd() + list(args), stdin=subprocess.DEVNULL, stdout=ends[0][1], stderr=ends[1][1], env=env
        )
    finally:
        for _, slave in ends:
            os.close(slave)
    got = {master: b"" for master, _ in ends}
    reading = set(got)
    deadline = time.monotonic() + 20
    try:
        while reading:
            ready, _, _ = select.select(list(reading), [], [], max(0, deadline - time.monotonic()))
            assert ready, f"cmactor {' '.join(args)} still writing after 20 s"
            for master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal has closed it
                    data = b""
                got[master] += data
                if not data:
                    reading.discard(master)
        status = proc.wait(20)
    finally:
        proc.kill()
        for master in got:
            os.close(master)
    return (status, *(got[master].replace(b"\r\n", b"\n") for master, _ in ends))


class Run:
    """A `cmactor run CONFIG` process in a session of its own (its process group can be
    killed whole), with what it wrote on stderr until its start summary."""

    def __init__(self, config, *args, timeout=60, **kwargs):
        self.proc = subprocess.Popen(
            cmactor_cmd() + ["run", str(config), *map(str, args)],
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            **kwargs,
        )
        self.lines = []
        deadline = time.monotonic() + timeout
        for line in self.proc.stderr:
            self.lines.append(line)
            if "modules READY; socket" in line:
                return
            if time.monotonic() > deadline:
                break
        self.kill()
        raise AssertionError("cmactor run did not come up:\n" + "".join(self.lines))

    @property
    def pid(self):
        return self.proc.pid

    @property
    def text(self):
        return "".join(self.lines)

    def workers(self):
        """The worker processes it started (children of its fork server)."""
        try:
            return [
                p
                for p in psutil.Process(self.pid).children(recursive=True)
                if "forkserver" not in " ".join(p.cmdline())
            ]
        except psutil.NoSuchProcess:
            return []

    def stop(self):
        """SIGTERM, then wait for it; the rest of its stderr is added to ``lines``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.lines += self.proc.stderr.readlines()
        self.proc.wait(30)

    def kill(self):
        """SIGKILL its whole process group (the supervisor and its fork server; its workers,
        each in a group of its own, follow their supervisor), and wait until all are gone."""
        family = self.workers()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(30)
        psutil.wait_procs(family, timeout=30)
