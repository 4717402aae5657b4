"""The worker's lanes: who reads the supervisor's channel, and who holds the serial lane.

Serial work (events, load and save, every action not marked async) runs on one
lane, one Work at a time, in arrival order. Two lane threads share two jobs:
reading the channel, and running the serial lane. The thread that reads serial
work runs it itself: no request waits for a sleeping thread to wake before it
starts (measured: a hand-off to another thread cost 15-20% of the sequential get
rate). Meanwhile nobody reads the channel, and only async requests
need to be read then (serial work queues behind the action anyway, a call back
into this module from its serial lane is refused by the deadlock detector, STOP
waits for in-flight requests). So a supervisor that sends async work while serial
work of this worker is unanswered rings the doorbell, and the idle lane thread
takes over reading. The direct reader (direct.py) borrows the lane while it is
free and runs a client's serial read itself; it then hands the lane back, or over
to the idle lane thread with the next Work queued meanwhile, and goes back to its
clients (were it to run the mailbox, clients that keep it full would keep it there).

Lanes holds the state those threads share, under one lock, and the transitions
between them, one method each::

    held      a thread holds the serial lane: it runs a Work, and only it takes from the mailbox
    reading   a lane thread reads the channel (False: a woken lane thread takes over)
    mailbox   serial Work waiting for the lane, in arrival order (empty while the lane is free)
    handed    the Work the direct reader handed, with the lane, to the idle lane thread
    saving    Saves read and not yet answered: direct reads wait behind them

    thread                          calls                   and then
    a lane thread, idle             wait_turn()             READ: it reads; a Work: it holds the lane
    the lane thread reading         take_or_queue(serial)   a Work: it holds the lane; None: it reads on
                                    save_read()             direct reads wait from now on
                                    drop_queued(sids)       the gone clients' Reqs are out of the mailbox
    the lane thread holding         next_or_release()       a Work: run it; READ: it reads; None: idle
    whoever holds the lane          save_answered()         direct reads behind that Save go on
    the direct reader               borrow(work, counts)    True: it holds the lane, runs work, give_back()
                                    wait_for_saves(...)     (an async read) no Save read is unanswered
    the doorbell                    ring()                  the idle lane thread reads, if nobody does

Where each Work's answer goes is its ``reply_to``: SUPERVISOR, the channel, or a
direct client's answer (direct._Answer).
"""

import collections
import threading

import msgspec

from cmactor.wire import figures as F

# A Work's reply_to when its answer goes to the supervisor's channel (the default
# destination of actions.Actions.execute, and of Runtime.send).
SUPERVISOR = None


class Work(msgspec.Struct):
    """One piece of serial work: a Req (``message``) with the action that serves it
    (``method``), or a Load or Save (``method`` None); ``reply_to`` is where its answer
    goes: SUPERVISOR, or the direct client that sent the Req (its direct._Answer). A
    Struct, built in C: a third of the instructions of a NamedTuple (whose __new__ is
    Python), half those of a __slots__ class with an __init__; one is built a get."""

    message: object
    method: object
    reply_to: object

    def cancelled_by(self, sids):
        """A request the supervisor sent (not a Load or Save, nor a direct read) whose
        client is gone: one of ``sids`` (a Cancel's)."""
        return self.method is not None and self.reply_to is SUPERVISOR and self.message.sid in sids


class _Read:
    """What a lane thread is told instead of a Work when its turn is to read the channel."""

    def __repr__(self):
        return "READ"


READ = _Read()


class Lanes:
    """The lanes' shared state and its transitions (see the module's docstring).

    The hot transitions (take_or_queue, next_or_release, borrow, give_back: two a get)
    take the lock with acquire() and release() rather than ``with``: in CPython 3.11
    ``with`` on a Lock costs about 2,000 instructions, acquire() and release() about
    900. Counted by perf.instructions, ``with`` there cost the worker 2,200 instructions
    a get: 4.9% of a brokered get, 2.5% of a direct one. The lock is a plain Lock, and
    the lane threads wait on Conditions over it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._turn = threading.Condition(self._lock)  # the idle lane thread waits here
        self._saved = threading.Condition(self._lock)  # direct reads wait here behind saves
        self._mailbox = collections.deque()
        self._held = False
        self._reading = False
        self._handed = None
        self._saving = 0

    # -- the lane threads -----------------------------------------------------------

    def wait_turn(self):
        """(A lane thread with nothing to do.) Sleep until it is this thread's turn, and
        return it: READ, when nobody reads the channel (at start, after a ring, or once
        the other lane thread took serial work it read), this thread being the reader now;
        or the Work the direct reader handed it, the serial lane with it."""
        with self._lock:
            while self._reading and self._handed is None:
                self._turn.wait()
            work, self._handed = self._handed, None
            if work is None:
                self._reading = True
                return READ
            return work

    def take_or_queue(self, serial):
        """(The lane thread reading the channel, with the serial Work one read brought, in
        order.) If the serial lane is free, take it and stop reading: the first Work is
        returned, for this thread to run now, and the rest queued behind it. Else queue
        them all behind the lane's holder and return None: this thread reads on."""
        self._lock.acquire()
        try:
            if not self._held:  # then the mailbox is empty: only a lane holder takes from it
                self._held = True
                self._reading = False
                if len(serial) > 1:  # (extending it by nothing cost ~950 instructions a get)
                    self._mailbox.extend(serial[1:])
                return serial[0]
            self._mailbox.extend(serial)
            return None
        finally:
            self._lock.release()

    def next_or_release(self):
        """(The lane thread holding the serial lane, its Work run.) Return the next Work in
        the mailbox, the lane still held; or, the mailbox being empty, release the lane and
        return READ if nobody reads the channel (this thread is the reader now), else None
        (the other lane thread reads: this one waits for its turn).

        A direct read taken from the mailbox while nobody reads the channel wakes the idle
        lane thread to read: the supervisor rings the doorbell only while serial work it
        sent is unanswered, and it knows nothing of this read, so async work the read's
        calls cause would go unread."""
        self._lock.acquire()
        try:
            if self._mailbox:
                work = self._mailbox.popleft()
                if not self._reading and work.reply_to is not SUPERVISOR:
                    self._turn.notify()
                return work
            self._held = False
            if self._reading:
                return None
            self._reading = True
            return READ
        finally:
            self._lock.release()

    # -- the direct reader ----------------------------------------------------------

    def borrow(self, work, counts):
        """(The direct reader, with a client's serial read.) Wait until the Saves read so far
        are answered (as the supervisor holds requests during a save; counted as queued in
        the direct figures ``counts`` meanwhile). Then take the serial lane if it is free:
        True, and the caller runs ``work`` and calls give_back(). Else queue ``work`` for the
        lane's holder to run, and return False."""
        self._lock.acquire()
        try:
            if self._saving:
                self._wait_for_saves(work.reply_to, counts)
            if self._held:
                self._mailbox.append(work)
                return False
            self._held = True
            return True
        finally:
            self._lock.release()

    def give_back(self):
        """(The direct reader, its borrowed Work run.) Hand the serial lane over, with the
        next Work queued meanwhile, to the idle lane thread, which runs the mailbox; or,
        with nothing queued, release it, waking the idle lane thread if nobody reads the
        channel. Either way the caller goes back to its clients."""
        self._lock.acquire()
        try:
            if self._mailbox:
                self._handed = self._mailbox.popleft()
                self._turn.notify()
                return
            self._held = False
            if not self._reading:
                self._turn.notify()
        finally:
            self._lock.release()

    def wait_for_saves(self, reply_to, counts):
        """(The direct reader, before an @async_action read, which needs no lane.) Return once
        the Saves read so far are answered, as borrow() does. The lock is taken only while
        a Save is read: a Save read just after the unlocked check is one this read came
        before."""
        if self._saving:
            with self._lock:
                self._wait_for_saves(reply_to, counts)

    def _wait_for_saves(self, reply_to, counts):
        """(Holding the lock.) Wait while Saves read are unanswered, counted as queued."""
        if self._saving:
            reply_to.flush()  # what its client was answered before leaves before the wait
            counts.add(F.QUEUED, 1)
            while self._saving:
                self._saved.wait()
            counts.add(F.QUEUED, -1)

    # -- saves, cancels and the doorbell --------------------------------------------

    def save_read(self):
        """(The lane thread reading, as it reads a Save.) From now until save_answered(),
        direct reads wait: each one read after the Save runs after it."""
        with self._lock:
            self._saving += 1

    def save_answered(self):
        """(The thread holding the lane, once it has sent a Save's answer.) The direct reads
        waiting for it go on, unless another Save is still unanswered."""
        with self._lock:
            self._saving -= 1
            self._saved.notify_all()

    def drop_queued(self, sids):
        """(The lane thread reading, as it reads a Cancel.) Take the supervisor's requests
        ``sids``, whose client is gone, out of the mailbox: they will not run. Returns their
        sids, for the caller to answer each as not run."""
        with self._lock:
            dropped = [work.message.sid for work in self._mailbox if work.cancelled_by(sids)]
            if dropped:
                kept = [work for work in self._mailbox if not work.cancelled_by(sids)]
                self._mailbox.clear()
                self._mailbox.extend(kept)
        return dropped

    def ring(self):
        """(The doorbell thread, rung by the supervisor.) Wake the idle lane thread: if
        nobody reads the channel (the reader runs serial work), it becomes the reader."""
        with self._lock:
            self._turn.notify()
