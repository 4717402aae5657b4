"""Running the `cmactor` command as a real process, for tests that drive it as an operator would."""

import contextlib
import os
import signal
import subprocess
import sys
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
