"""Per-worker resource figures from psutil, sampled when status is asked for, never on
the loop thread.

One psutil.Process per worker, kept from spawn. Its ``cpu`` is the percent of one CPU it
has used since it started, as ``ps`` shows %CPU: a figure of the worker alone, the same
whoever asks and however often (a percent "since the previous sample" would have two
status readers or scrapers shift each other's window); ``cpu_seconds`` is the counter
to take rates of. psutil never reaps our workers: multiprocessing does, through the
sentinels, or exitcode would stay None forever.

A sample reads several /proc files per worker (about 65 µs a worker: 13 ms for 200
measured), and the loop thread serves every client, so the loop only copies which
psutil.Process each module has (Control.copy) and a Sampler reads them elsewhere: on
the thread that asked (Supervisor.status(), a /metrics scrape), or, for a client's
status request, on a helper thread of its own. A worker reaped between the copy and
the sample has no figures (psutil finds no such process); one whose pid was taken by
another process by then is caught by is_running(), which compares start times.
"""

import logging
import threading
import time

import psutil

log = logging.getLogger("cmactor.supervisor")

EMPTY = {"rss": None, "cpu": None, "cpu_seconds": None, "threads": None, "start_time": None}


# psutil's own errors, and an OSError of its reads of /proc (EMFILE when the process is
# out of descriptors): a worker that cannot be sampled has no figures, nothing worse.
_UNREADABLE = (psutil.Error, OSError)


def track(pid):
    try:
        return psutil.Process(pid)
    except _UNREADABLE:
        return None


def sample(proc):
    if proc is None:
        return dict(EMPTY)
    try:
        with proc.oneshot():
            times = proc.cpu_times()
            started = proc.create_time()  # Unix time, from the kernel's record of it
            # user + system since the worker started: a counter, which Prometheus rates over any window
            cpu_seconds = times.user + times.system
            figures = {
                "rss": proc.memory_info().rss,
                "cpu": 100 * cpu_seconds / max(time.time() - started, 0.01),
                "cpu_seconds": cpu_seconds,
                "threads": proc.num_threads(),
                "start_time": started,
            }
        # After the reads: a pid taken by another process before them would be that one's figures.
        return figures if proc.is_running() else dict(EMPTY)
    except _UNREADABLE:
        return dict(EMPTY)


class Sampler:
    """Samples workers off the loop thread, one sampling at a time (a sample reads several
    /proc files a worker: two at once would only compete). Client status
    requests are sampled on a helper thread of its own, which runs until close(): started
    here rather than per request, since Thread.start() waits for the new thread, and
    the loop thread would wait with it."""

    def __init__(self):
        self._sampling = threading.Lock()
        self._asked = threading.Condition()  # guards the two below, shared by the loop and helper threads
        self._waiting = []  # (workers, then) for the helper thread
        self._closed = False
        self._helper = threading.Thread(target=self._help, name="cmactor-status", daemon=True)
        self._helper.start()

    def sample(self, workers):
        """(Any thread but the loop's.) name -> figures for ``workers``, name -> psutil.Process
        (None: no worker)."""
        with self._sampling:
            return {name: sample(proc) for name, proc in workers.items()}

    def sample_later(self, workers, then):
        """(Loop thread.) Sample ``workers`` on the helper thread, which then calls
        ``then(figures)``. Those waiting for it together share one sampling: a burst of
        status requests costs one."""
        with self._asked:
            self._waiting.append((workers, then))
            self._asked.notify()

    def close(self):
        """End the helper thread, once the samplings already asked for are done."""
        with self._asked:
            self._closed = True
            self._asked.notify()
        self._helper.join()

    def _help(self):
        while True:
            with self._asked:
                while not self._waiting and not self._closed:
                    self._asked.wait()
                if not self._waiting:
                    return
                batch, self._waiting = self._waiting, []
            procs = {id(proc): proc for workers, _ in batch for proc in workers.values()}
            try:
                with self._sampling:
                    figures = {key: sample(proc) for key, proc in procs.items()}
            except Exception:  # a bug: the requests waiting are answered without figures, and the helper lives on
                log.exception("internal error sampling the workers for a status request; answered without figures")
                figures = {key: dict(EMPTY) for key in procs}
            for workers, then in batch:
                try:
                    then({name: figures[id(proc)] for name, proc in workers.items()})
                except Exception:  # a bug: it must cost this status answer only, never the helper
                    log.exception("internal error answering a status request; the supervisor carries on")
