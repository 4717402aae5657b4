"""Per-worker resource figures from psutil, sampled when status is asked for.

One psutil.Process per worker, kept from spawn: it detects pid reuse, and its
cpu_percent() measures since the previous call, status or a /metrics scrape
(the first call, made at spawn, only primes it). psutil never reaps our
workers: multiprocessing does, through the sentinels, or exitcode would stay
None forever.
"""

import psutil

EMPTY = {"rss": None, "cpu": None, "cpu_seconds": None, "threads": None}


def track(pid):
    try:
        proc = psutil.Process(pid)
        proc.cpu_percent(None)
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def sample(proc):
    if proc is None:
        return dict(EMPTY)
    try:
        with proc.oneshot():
            times = proc.cpu_times()
            return {
                "rss": proc.memory_info().rss,
                "cpu": proc.cpu_percent(None),
                # user + system since the worker started: a counter, which Prometheus rates over any window
                "cpu_seconds": times.user + times.system,
                "threads": proc.num_threads(),
            }
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return dict(EMPTY)
