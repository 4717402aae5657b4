import multiprocessing.forkserver
import os
import shutil
import tempfile
import time

import psutil
import pytest


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


@pytest.fixture
def reachable():
    """A directory every user can enter (tmp_path's parents are root's alone)."""
    path = tempfile.mkdtemp(prefix="cmactor-test-")
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)
