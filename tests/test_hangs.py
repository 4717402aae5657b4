"""Hung work is seen whatever the timeouts: an @async_action that never returns holds its
thread after its client's request timed out, through the supervisor or read directly;
and a worker the loop could not watch is ended, not left running unseen."""

import errno
import multiprocessing.forkserver
import os
import signal
import threading

import psutil
import pytest
from helpers import agent, wait_for

import cmactor

ECHO = agent("echo.py:main")


def hang(sup, count, errors):
    """``count`` clients, each reading an @async_action that never returns; their errors."""

    def read():
        try:
            with sup.connect() as conn:
                conn.cursor().execute("get echo.asleep", {"secs": "600"})
        except cmactor.Error as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.parametrize("direct", [False, True], ids=["brokered", "direct"])
def test_a_hung_async_lane_is_restarted_even_after_its_requests_timed_out(supervisor, direct):
    options = {"entry": ECHO, "pool_size": 2, "action_timeout": 0.3, "hang_timeout": 1.5}
    sup = supervisor({"echo": options}, direct_reads=direct)
    pid = sup.status()["echo"]["pid"]
    errors = []
    for thread in hang(sup, 2, errors):
        thread.join(10)
    # Both answered at action_timeout, long before hang_timeout: the actions still hold their threads.
    assert len(errors) == 2 and all("not done within action_timeout=0.3s" in str(e) for e in errors), errors
    status = wait_for(lambda: (s := sup.status()["echo"])["restarts"] == 1 and s["state"] == "READY" and s, timeout=20)
    assert status["pid"] != pid
    lane = "threads for direct reads of @async_action" if direct else "threads of its pool"
    assert f"all 2 {lane} were stuck" in status["last_exit"] and "hang_timeout=1.5s" in status["last_exit"]
    cur = sup.connect().cursor()
    cur.execute("get echo.asleep", {"secs": "0"})  # served again


def test_direct_reads_of_a_hung_async_action_hold_no_more_threads_than_the_pool_has(supervisor):
    options = {"entry": ECHO, "pool_size": 2, "action_timeout": 0.3, "hang_timeout": 600}
    sup = supervisor({"echo": options})
    worker = psutil.Process(sup.status()["echo"]["pid"])
    before = worker.num_threads()
    errors = []
    for thread in hang(sup, 20, errors):
        thread.join(20)
    assert len(errors) == 20
    # Two hang on direct readers, the rest went through the supervisor to the pool (two
    # more); readers and a writer come and go, but nothing grows with the reads.
    assert worker.num_threads() <= before + 8, (before, worker.num_threads())
    assert sup.status()["echo"]["direct"]["connections"] <= 2
    cur = sup.connect().cursor()
    cur.execute("get echo.kv", {"key": "default"})  # the serial lane serves on
    assert cur.fetchone() == ("default", "yes")


@pytest.mark.parametrize("direct", [False, True], ids=["brokered", "direct"])
def test_a_hung_serial_lane_is_restarted_even_after_its_request_timed_out(supervisor, direct):
    options = {"entry": ECHO, "action_timeout": 0.3, "hang_timeout": 1.5}
    sup = supervisor({"echo": options}, direct_reads=direct)
    with pytest.raises(cmactor.OperationalError, match="not done within action_timeout=0.3s"):
        with sup.connect() as conn:
            conn.cursor().execute("get echo.spin")
    status = wait_for(lambda: (s := sup.status()["echo"])["restarts"] == 1 and s["state"] == "READY" and s, timeout=20)
    assert "its serial lane was stuck in one action for more than hang_timeout=1.5s" in status["last_exit"]


def test_a_restart_the_loop_cannot_watch_is_undone_and_tried_again(supervisor, monkeypatch):
    sup = supervisor({"echo": ECHO})
    workers = sup._workers
    watch = sup._loop.watch
    refused = []

    def watch_or_refuse_once(fileobj, on_read, arg, endpoint=None):
        if on_read == workers.on_exit and not refused:  # the new worker's sentinel: epoll is out of memory
            refused.append(arg.name)
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return watch(fileobj, on_read, arg, endpoint)

    monkeypatch.setattr(sup._loop, "watch", watch_or_refuse_once)
    first = sup.status()["echo"]["pid"]
    os.kill(first, signal.SIGKILL)
    status = wait_for(lambda: (s := sup.status()["echo"])["state"] == "READY" and s["pid"] != first and s, timeout=20)
    assert refused == ["echo"] and status["restarts"] == 1
    fork_server = psutil.Process(multiprocessing.forkserver._forkserver._forkserver_pid)
    assert [p.pid for p in fork_server.children()] == [status["pid"]]  # the one started unwatched was ended
