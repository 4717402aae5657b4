"""The worker's lane hand-over (cmactor/worker/lanes.py), its transitions one by one, no process."""

import threading

from cmactor.wire import figures as F, protocol as P
from cmactor.worker.lanes import READ, SUPERVISOR, Lanes, Work


def _req(sid):
    return P.Req(sid, "get", "kv", {}, None, 0, 1, None, None, None, None)


def _work(sid, reply_to=SUPERVISOR):
    return Work(_req(sid), print, reply_to)  # any method: a Req's Work has one


class _Answer:
    """A direct client's answer, as far as the lanes look at it."""

    def __init__(self):
        self.flushed = 0

    def flush(self):
        self.flushed += 1


class _Counts:
    def __init__(self):
        self.added = []

    def add(self, index, delta):
        self.added.append((index, delta))


def _reading():
    """Lanes as a lane thread finds them at start: its turn is to read."""
    lanes = Lanes()
    assert lanes.wait_turn() is READ
    return lanes


def test_the_reader_takes_the_free_lane_and_runs_the_rest_of_its_read_before_reading_again():
    lanes = _reading()
    first, second, third = _work(1), _work(2), _work(3)
    assert lanes.take_or_queue([first, second, third]) is first
    assert lanes.next_or_release() is second
    assert lanes.next_or_release() is third
    assert lanes.next_or_release() is READ  # nobody else reads: the holder does, the lane free
    assert lanes.borrow(_work(-1, _Answer()), _Counts())


def test_work_read_while_the_lane_is_held_waits_for_its_holder():
    lanes = _reading()
    assert lanes.borrow(_work(-1, _Answer()), _Counts())  # the direct reader holds the lane
    queued = [_work(1), _work(2)]
    assert lanes.take_or_queue(queued) is None  # the reader reads on
    lanes.give_back()  # the direct reader hands the lane over with the first, to the idle thread
    assert lanes.wait_turn() is queued[0]
    assert lanes.next_or_release() is queued[1]
    assert lanes.next_or_release() is None  # the channel has its reader: this thread idles


def test_a_direct_read_waits_in_the_mailbox_while_the_lane_is_held():
    lanes = _reading()
    held = _work(1)
    assert lanes.take_or_queue([held]) is held
    direct = _work(-1, _Answer())
    assert not lanes.borrow(direct, _Counts())
    assert lanes.next_or_release() is direct
    assert lanes.next_or_release() is READ


def test_the_direct_reader_gives_a_free_lane_back_free():
    lanes = _reading()
    assert lanes.borrow(_work(-1, _Answer()), _Counts())
    lanes.give_back()
    work = _work(1)
    assert lanes.take_or_queue([work]) is work


def test_a_cancel_drops_only_the_supervisors_queued_requests_of_gone_clients():
    lanes = _reading()
    holder = _work(1)
    assert lanes.take_or_queue([holder]) is holder
    load, direct, kept, gone = Work(P.Load(2, None, []), None, SUPERVISOR), _work(2, _Answer()), _work(3), _work(2)
    lanes.take_or_queue([load, direct, kept, gone])
    assert lanes.drop_queued(frozenset({1, 2})) == [2]
    assert [lanes.next_or_release() for _ in range(4)] == [load, direct, kept, READ]


def test_a_direct_read_waits_behind_a_save_read_before_it_counted_as_queued():
    lanes = _reading()
    lanes.save_read()
    answer, counts, borrowed = _Answer(), _Counts(), []
    reader = threading.Thread(target=lambda: borrowed.append(lanes.borrow(_work(-1, answer), counts)))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and not borrowed, "the direct read did not wait for the save"
    lanes.save_answered()
    reader.join(10)
    assert borrowed == [True]
    assert answer.flushed == 1  # what its client was answered before left before the wait
    assert counts.added == [(F.QUEUED, 1), (F.QUEUED, -1)]


def test_the_doorbell_wakes_the_idle_lane_thread_to_read_while_the_reader_runs_serial_work():
    lanes = _reading()
    turns = []
    idle = threading.Thread(target=lambda: turns.append(lanes.wait_turn()))
    idle.start()
    lanes.ring()  # the channel has its reader: the idle thread sleeps on
    idle.join(0.2)
    assert idle.is_alive() and not turns
    work = _work(1)
    assert lanes.take_or_queue([work]) is work  # the reader runs serial work: nobody reads now
    lanes.ring()
    idle.join(10)
    assert turns == [READ]
    assert lanes.next_or_release() is None  # the other thread reads: the holder idles
