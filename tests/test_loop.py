"""The supervisor's event loop (loop.py) on real socketpairs, with no Supervisor."""

import logging
import os
import socket
import threading
import time
import weakref

import pytest

from cmsupervisor.loop import EventLoop


@pytest.fixture
def loop():
    lp = EventLoop()
    lp.deaths = []
    lp.start(on_death=lambda: lp.deaths.append(True))
    yield lp
    if not lp.finished:
        lp.call(lp.finish)
    lp.join()


class Endpoint:
    def __init__(self, sock):
        self.sock = sock
        self.out = bytearray()
        self.sends = 0
        self.drains = 0
        self.failures = 0
        self.drained_event = threading.Event()

    def sent(self):
        self.sends += 1

    def drained(self):
        self.drains += 1
        self.drained_event.set()

    def send_failed(self):
        self.failures += 1
        self.out.clear()


def test_call_runs_on_the_loop_thread_and_returns_or_raises(loop):
    assert loop.call(lambda x, y: x * y, 6, 7) == 42
    name = loop.call(lambda: threading.current_thread().name)
    assert name == "cmactor-supervisor" and name != threading.current_thread().name

    def boom():
        raise KeyError("nope")

    with pytest.raises(KeyError, match="nope"):
        loop.call(boom)
    # From the loop thread, call() runs at once (no deadlock waiting on itself).
    assert loop.call(lambda: loop.call(lambda: "inner")) == "inner"
    future = loop.call_async(lambda: "later")
    assert future.result(timeout=5) == "later"
    assert loop.deaths == []


def test_a_cancelled_timer_never_runs_and_lets_go_of_its_arguments_at_once(loop):
    fired = []
    done = threading.Event()
    big_holder = Holder(bytearray(1 << 20))
    kept = weakref.ref(big_holder)

    def schedule(held):
        timers = [loop.after(0.05, fired.append, n) for n in range(200)]
        doomed = loop.after(0.01, fired.append, held)
        loop.cancel(doomed)
        loop.cancel(doomed)  # twice: nothing more
        for timer in timers[:150]:  # past half the heap: swept out now, not at their time
            loop.cancel(timer)
        loop.after(0.1, done.set)
        return len(loop._timers)

    # Swept when the cancelled passed half the heap (101 of 201): 100 left, and done.set.
    assert loop.call(schedule, big_holder) == 101
    del big_holder
    assert kept() is None  # the cancelled timer no longer holds it
    assert done.wait(5)
    assert fired == list(range(150, 200))


class Holder:
    def __init__(self, value):
        self.value = value


def test_timers_fire_in_deadline_order_and_a_failing_one_is_logged(loop, caplog):
    caplog.set_level(logging.ERROR, logger="cmactor.supervisor")
    fired = []
    all_fired = threading.Event()

    def record(label, due):
        fired.append((label, time.monotonic() >= due))
        if len(fired) == 3:
            all_fired.set()

    def bad_timer():
        raise ValueError("timer broke")

    def schedule():
        now = time.monotonic()
        loop.after(0.06, record, "c", now + 0.06)
        loop.after(0.02, record, "a", now + 0.02)
        loop.after(0.0, bad_timer)
        loop.after(0.04, record, "b", now + 0.04)

    loop.call(schedule)
    assert all_fired.wait(5)
    assert fired == [("a", True), ("b", True), ("c", True)]
    assert any("internal error in timer" in r.getMessage() and r.exc_info for r in caplog.records)
    assert loop.call(lambda: "alive") == "alive" and loop.deaths == []


def test_marked_output_is_flushed_at_the_end_of_the_turn(loop):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.settimeout(5)
        ep = Endpoint(ours)
        loop.call(loop.watch, ours, lambda _ep: None, ep, ep)

        def queue_output():
            ep.out += b"hello "
            loop.mark(ep)
            ep.out += b"world"  # still this turn: one send
            return ep.sends

        assert loop.call(queue_output) == 0  # nothing sent before the turn ends
        assert theirs.recv(100) == b"hello world"
        assert ep.drained_event.wait(5)
        assert loop.call(lambda: (ep.sends, ep.drains, bytes(ep.out))) == (1, 1, b"")
        # A mark with no output still gets its drained() check.
        loop.call(loop.mark, ep)
        assert loop.call(lambda: ep.drains) == 2
        loop.call(loop.unwatch, ours)


def test_output_larger_than_the_socket_buffer_arrives_whole(loop):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.settimeout(5)
        ep = Endpoint(ours)
        loop.call(loop.watch, ours, lambda _ep: None, ep, ep)
        payload = bytes(range(256)) * (8 * 1024 * 1024 // 256)
        received = bytearray()

        def read_all():
            while len(received) < len(payload):
                chunk = theirs.recv(1 << 20)
                if not chunk:
                    return
                received.extend(chunk)

        reader = threading.Thread(target=read_all)

        def queue_output():
            ep.out += payload
            loop.mark(ep)

        loop.call(queue_output)
        reader.start()
        reader.join(10)
        assert not reader.is_alive()
        assert ep.drained_event.wait(5)
        assert len(received) == len(payload) and received == payload
        sends, drains = loop.call(lambda: (ep.sends, ep.drains))
        assert sends > 1  # write readiness finished what the first send could not take
        assert drains == 1
        time.sleep(0.05)
        # Write interest was dropped once drained: the loop is not woken for it again.
        assert loop.call(lambda: (ep.sends, ep.drains)) == (sends, drains)
        loop.call(loop.close_endpoint, ep)
        assert ours.fileno() == -1


def test_a_send_to_a_closed_peer_reports_send_failed(loop):
    ours, theirs = socket.socketpair()
    with ours:
        ours.setblocking(False)
        theirs.close()
        ep = Endpoint(ours)
        loop.call(loop.watch, ours, lambda _ep: None, ep, ep)

        def queue_output():
            ep.out += b"x" * 10
            loop.mark(ep)

        loop.call(queue_output)
        assert loop.call(lambda: (ep.failures, ep.sends)) == (1, 0)
        loop.call(loop.unwatch, ours)
    assert loop.deaths == []


def test_a_handler_that_raises_is_logged_and_the_loop_goes_on(loop, caplog):
    caplog.set_level(logging.ERROR, logger="cmactor.supervisor")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        seen = []
        raised = threading.Event()

        def on_read(sock):
            seen.append(sock.recv(10))
            raised.set()
            raise RuntimeError("handler broke")

        loop.call(loop.watch, ours, on_read, ours)
        theirs.send(b"ping")
        assert raised.wait(5)
        assert loop.call(lambda: "still running") == "still running"
        theirs.send(b"again")
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [b"ping", b"again"]
        loop.call(loop.unwatch, ours)
    messages = [r.getMessage() for r in caplog.records if r.exc_info]
    assert len([m for m in messages if m.startswith("internal error handling")]) == 2
    assert loop.deaths == []


def test_an_event_for_a_descriptor_closed_in_its_turn_does_not_reach_the_next_owner(loop):
    # Two sockets ready in one turn; the first handler closes the other's descriptor and
    # another socket takes its number, as when a worker is reaped and restarted in one
    # turn: the event polled for the old socket is not the new one's.
    pairs = [socket.socketpair() for _ in range(2)]
    fresh, fresh_peer = socket.socketpair()
    calls, reused = [], []

    def on_read(index):
        calls.append(index)
        pairs[index][0].recv(10)
        if reused:
            return
        other = pairs[1 - index][0]
        fd = other.fileno()
        loop.unwatch(other)
        other.close()
        os.dup2(fresh.fileno(), fd)  # the number now names a socket with nothing to read
        reused.append(fd)
        loop.watch(fd, lambda _: calls.append("new owner"), None)

    def arm():
        for index, (ours, theirs) in enumerate(pairs):
            ours.setblocking(False)
            loop.watch(ours, on_read, index)
            theirs.send(b"x")  # both ready before the loop polls again

    loop.call(arm)
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(calls) == 1 and calls[0] in (0, 1), calls
    [fd] = reused
    loop.call(loop.unwatch, fd)
    os.close(fd)
    for sock in (*pairs[0], *pairs[1], fresh, fresh_peer):
        sock.close()
    assert loop.deaths == []


def test_calls_after_finish_raise(loop):
    loop.call(loop.finish)
    loop.join()
    assert loop.finished and loop.wait(0)
    with pytest.raises(RuntimeError, match="the supervisor is stopped"):
        loop.call(lambda: 1)
    with pytest.raises(RuntimeError):
        loop.call_async(lambda: 1)
    assert loop.deaths == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_loop_dying_calls_on_death():
    lp = EventLoop()
    died = threading.Event()
    lp.start(on_death=died.set)

    def break_output():
        raise SystemExit("out")  # not an Exception: the loop cannot carry on

    lp.call(lp.before_output, break_output)
    assert died.wait(5)
    lp.join()
    with pytest.raises(RuntimeError):
        lp.call(lambda: 1)
