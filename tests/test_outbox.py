"""The worker's outbox: frames from many threads on one real socket, combined, in order, bounded;
and what a reply left in it means for a worker that dies (the progress slots)."""

import array
import socket
import threading
import time

import pytest

from cmactor.cmbackend import CmAgent, async_action
from cmactor.wire import protocol as P
from cmactor.wire.validate import Request
from cmactor.worker import process as worker
from cmactor.worker.outbox import Outbox
from cmsupervisor.supervision.modules import Pending
from cmsupervisor.supervision.recovery import split_started

BIG = 4 << 20  # far more than the socket pair buffers: its sendall blocks until the peer reads


@pytest.fixture
def pair():
    writer, reader = socket.socketpair()
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    yield writer, reader
    writer.close()
    reader.close()


def _read_exactly(sock, size):
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 16))
        assert chunk, "the writer closed early"
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _start(target, *args):
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _blocked_writer(outbox, reader, pack=bytes):
    """A thread writing a frame the peer has begun to read and stopped: it holds the socket.
    Returns the thread and the bytes of its frame left to read."""
    big = b"A" * BIG
    frame = pack(big)
    thread = _start(outbox.send, big)
    first = reader.recv(1024)
    assert first and frame.startswith(first)
    return thread, len(frame) - len(first)


def test_a_sender_that_finds_another_writing_leaves_its_frame_and_returns(pair):
    writer, reader = pair
    outbox = Outbox(writer, bytes)
    holder, rest = _blocked_writer(outbox, reader)
    sender = _start(outbox.send, b"B-frame")
    sender.join(timeout=10)
    assert not sender.is_alive(), "the second sender waited for the first one's write"
    assert holder.is_alive()
    data = _read_exactly(reader, rest + len(b"B-frame"))
    holder.join(timeout=10)
    assert data == b"A" * rest + b"B-frame"


def test_a_sender_waits_its_turn_past_the_bound(pair):
    writer, reader = pair
    outbox = Outbox(writer, bytes, bound=4)
    holder, rest = _blocked_writer(outbox, reader)
    sent = []

    def send_ten():
        for n in range(10):
            outbox.send(b"%d;" % n)
            sent.append(n)

    sender = _start(send_ten)
    sender.join(timeout=0.5)
    assert sender.is_alive() and sent == [0, 1, 2, 3], "the fifth frame should wait for the socket"
    frames = b"".join(b"%d;" % n for n in range(10))
    data = _read_exactly(reader, rest + len(frames))
    sender.join(timeout=10)
    holder.join(timeout=10)
    assert not sender.is_alive() and sent == list(range(10))
    assert data == b"A" * rest + frames


def test_flush_returns_once_the_frames_left_to_another_thread_are_written(pair):
    writer, reader = pair
    outbox = Outbox(writer, bytes)
    holder, rest = _blocked_writer(outbox, reader)
    outbox.send(b"fatal")
    flusher = _start(outbox.flush)
    flusher.join(timeout=0.5)
    assert flusher.is_alive(), "flush returned before the frame it waits for was written"
    data = _read_exactly(reader, rest + len(b"fatal"))
    flusher.join(timeout=10)
    holder.join(timeout=10)
    assert not flusher.is_alive() and data.endswith(b"fatal")


@pytest.mark.parametrize("bound", [1, 256])
def test_many_threads_sending_at_once_lose_nothing_and_keep_each_ones_order(pair, bound):
    writer, reader = pair
    outbox = Outbox(writer, bytes, bound=bound)
    threads, per_thread = 8, 500
    frames = {t: [b"%d:%d;" % (t, n) for n in range(per_thread)] for t in range(threads)}
    total = sum(len(frame) for sent in frames.values() for frame in sent)
    received = []
    reading = _start(lambda: received.append(_read_exactly(reader, total)))
    start = threading.Barrier(threads)

    def send_all(sent):
        start.wait()
        for frame in sent:
            outbox.send(frame)

    senders = [_start(send_all, sent) for sent in frames.values()]
    for thread in senders:
        thread.join(timeout=30)
    # No flush: once every send() has returned, every frame is written or in a write.
    assert not outbox._queued, "a frame was left queued after every sender returned"
    reading.join(timeout=30)
    assert received, "not every frame arrived"
    seen = {t: [] for t in range(threads)}
    for frame in received[0].split(b";")[:-1]:
        t, _ = frame.split(b":")
        seen[int(t)].append(frame + b";")
    assert seen == frames


class _AsyncAgent(CmAgent):
    @async_action
    def kv_get(self, ctx):
        ctx.fields = {"key": "k", "value": "v"}


def test_an_async_request_whose_reply_waits_in_the_outbox_counts_as_started(pair):
    # A worker killed while another thread writes: the reply of an async request that
    # ran is still in the outbox, so the request must fail as started, not run again.
    writer, reader = pair
    slots = array.array("q", [0] * P.SLOTS_SIZE)
    runtime = worker.Runtime("m", writer, None, 2, slots)
    runtime.register(_AsyncAgent(), [], [])
    init = _read_exactly(reader, len(P.pack(P.Init([], [], ["kv_get"], 2, {}))))
    assert type(P.FrameReader(decode=P.CHANNEL.decode).feed(init)[0]) is P.Init
    holder, rest = _blocked_writer(runtime._outbox, reader, P.pack)
    request = P.Req(7, "get", "kv", {}, None, 0, 1, None, None, None, None)
    runtime._route(request)  # to the pool, as the reading lane thread hands it on
    deadline = time.monotonic() + 10
    while not (slots[P.async_slot(0)] == 7 and slots[P.async_slot(0) + 1] == 0):  # ran, and finished
        assert time.monotonic() < deadline, f"the action did not end with its sid kept in its slot: {list(slots[:5])}"
        time.sleep(0.01)
    assert holder.is_alive(), "the big frame was written: the reply did not have to wait"
    pending = Pending(None, 1, Request(id=1, op="get", module="m", table="kv"), 0.0)
    pending.sid, pending.is_async = 7, True
    started, waiting = split_started({7: pending}, slots)
    assert (started, waiting) == ([pending], [])
    _read_exactly(reader, rest)  # the big frame, then the reply the writer took on
    holder.join(timeout=10)
    (reply,) = P.FrameReader(max_frame=None, decode=P.CHANNEL.decode).feed(reader.recv(1 << 16))
    assert reply.sid == 7


def test_a_frame_sent_while_flush_writes_is_written_before_flush_returns(pair):
    writer, reader = pair
    flushing, go_on = threading.Event(), threading.Event()

    class HeldByFlush:
        """The socket, whose write from the flushing thread waits until told to go on."""

        def sendall(self, data):
            if threading.current_thread().name == "flusher":
                flushing.set()
                assert go_on.wait(10)
            writer.sendall(data)

    outbox = Outbox(HeldByFlush(), bytes)
    outbox._queued.append(b"queued;")  # a frame left to whoever writes next
    flusher = threading.Thread(target=outbox.flush, name="flusher", daemon=True)
    flusher.start()
    assert flushing.wait(10)
    late = _start(outbox.send, b"late;")  # finds flush writing: leaves its frame to it
    late.join(timeout=10)
    assert not late.is_alive()
    go_on.set()
    flusher.join(timeout=10)
    assert not flusher.is_alive()
    reader.settimeout(5)  # a frame left queued never arrives
    assert _read_exactly(reader, len(b"queued;late;")) == b"queued;late;"
    assert not outbox._queued, "flush returned with a frame left queued"
