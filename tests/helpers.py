"""Helpers for the tests that run real supervisors: waiting, agents, disks, scrapes."""

import contextlib
import os
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

HERE = os.path.dirname(os.path.abspath(__file__))


AGENTS = os.path.join(HERE, "agents")


def wait_for(predicate, timeout=10, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def kv_rows(cur, module="echo"):
    """Every row of an echo module's kv table, by key."""
    cur.execute(f"getnext {module}.kv")
    return dict(cur.fetchall())


def agent(entry):
    """Entry of a test agent file: agent("echo.py:main")."""
    return os.path.join(AGENTS, entry)


@contextlib.contextmanager
def tmpfs(path, options, why):
    """A tmpfs mounted on ``path`` (an existing directory) with mount ``options`` for the
    block, unmounted after; the test is skipped, saying ``why`` it needs one, if it cannot be."""
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs {why}: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def small_disk(path, size="512k"):
    path.mkdir()
    with tmpfs(path, f"size={size}", "to fill (needs root)"):
        yield path


def fill(disk):
    """Write a file until the disk is full; return it (remove it to free the disk)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 4096, 1):  # down to the last byte free
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"x" * size)
    finally:
        os.close(fd)
    return filler


ANY_PORT = "127.0.0.1:0"


def scrape(sup):
    """Every sample of /metrics: {(sample name, ((label, value), ...)): value}."""
    with urllib.request.urlopen(sup.metrics_url, timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]
