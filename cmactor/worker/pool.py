"""The worker's shared pool for @async_action requests (agents that give no pool of their own)."""

import collections
import threading


class CallbackPool:
    """Up to ``size`` threads running submitted calls.

    One thread at a time is woken for new work; once running, it wakes the next one
    only if more work is still waiting. A thread that finishes an action takes the
    next before it sleeps. So a burst of short actions is served by as few threads
    as keep up, without every idle thread fighting for the GIL, and still every
    queued action gets a thread of its own while fewer than ``size`` are busy (the
    deadlock detector counts on that). Measured at 4 x 32 requests in flight, a
    ThreadPoolExecutor of 8 threads, which wakes its idle threads one per submit,
    reached half the throughput of this one.
    """

    def __init__(self, size, name):
        self.size = size
        self._name = name
        self._lock = threading.Lock()
        self._work = collections.deque()
        self._idle = []  # a wake-up lock per sleeping thread, the last to sleep on top
        self._threads = 0
        self._waking = 0  # threads woken or started that have not looked at the work yet

    def submit(self, fn, *args):
        with self._lock:
            self._work.append((fn, args))
            wake = None if self._waking else self._call_one()
        if wake is not None:
            wake.release()

    def cancel(self, matches):
        """Take out the calls still queued whose arguments ``matches(args)``: they will not
        run. Returns their arguments."""
        with self._lock:
            taken = [args for _, args in self._work if matches(args)]
            if taken:
                self._work = collections.deque(item for item in self._work if not matches(item[1]))
        return taken

    def _call_one(self):
        """(Holding _lock.) Get one more thread going: the last idle one, or a new one."""
        if self._idle:
            self._waking += 1
            return self._idle.pop()
        if self._threads < self.size:
            self._threads += 1
            self._waking += 1
            threading.Thread(target=self._serve, name=f"{self._name}-{self._threads}", daemon=True).start()
        return None

    def _serve(self):
        wake = threading.Lock()
        wake.acquire()
        while True:
            with self._lock:
                self._waking -= 1  # this thread has arrived
                while self._work:
                    fn, args = self._work.popleft()
                    # More waits and nobody is on the way: wake the next thread first.
                    baton = self._call_one() if self._work and not self._waking else None
                    self._lock.release()
                    try:
                        if baton is not None:
                            baton.release()
                        fn(*args)
                    finally:
                        self._lock.acquire()
                self._idle.append(wake)  # _call_one() counts it in _waking when it pops it
            wake.acquire()  # released by submit() or by a thread passing the baton
