"""The supervisor's event loop: one thread, one epoll, timers, batched output.

It waits at once on the listening socket, every client, every worker socket,
every worker's process sentinel (a crash is seen the moment it happens, no
polling) and a wake-up through which other threads hand it calls. The
parts of the supervisor register what they watch, each with its own handler;
all their state is touched by this thread only, so none of it needs locks.

Output is written at the end of each turn, one send per socket: parts append to
an endpoint's ``out`` and ``mark()`` it. An endpoint whose peer sends faster than
it is served can be left unread (``pause_reading``) while its output still goes
out. An endpoint is any object with

- ``sock`` (None once closed) and ``out`` (a bytearray),
- ``sent()``: some of its output went out,
- ``drained()``: its output is all gone, or it has none,
- ``send_failed()``: its socket refused the send.
"""

import concurrent.futures
import heapq
import itertools
import logging
import select
import threading
import time

from cmactor.wire import protocol as P
from cmactor.wire.wakeup import Wakeup

log = logging.getLogger("cmactor.supervisor")

# What a registration waits for: reading, writing, both (or neither: not registered).
_READ, _WRITE = 1, 2
_EPOLL = {_READ: select.EPOLLIN, _WRITE: select.EPOLLOUT, _READ | _WRITE: select.EPOLLIN | select.EPOLLOUT}
# An epoll event other than EPOLLIN (EPOLLOUT, a hang-up, an error) makes a socket
# ready to write; one other than EPOLLOUT, ready to read (as the selectors module says).
_NOT_IN = ~select.EPOLLIN
_NOT_OUT = ~select.EPOLLOUT


class EventLoop:
    def __init__(self):
        # epoll itself, not a selectors.Selector: the selector's select() costs four
        # Python calls a turn and one per event, and a get is two turns.
        self._epoll = select.epoll()
        self._watched = {}  # fd -> ((on_read, arg, endpoint), what it waits for, its file object)
        self._unwatched = set()  # descriptors unwatched since the last poll
        self._thread = None
        self._finished = threading.Event()
        self._calls = []
        self._calls_lock = threading.Lock()  # also keeps the wake-up open while it is rung
        self._wakeup = Wakeup()
        self.watch(self._wakeup.fileno(), self._run_calls, None)
        self._timers = []  # heap of [when, seq, fn, args]; never replaced: the loop holds it
        self._cancelled = 0  # timers in the heap that were cancelled (fn None)
        self._done = False
        self._timer_seq = itertools.count()
        self._dirty = set()  # endpoints with output waiting
        # mark(endpoint): it has output (or a drained() check) for the end of this turn.
        # The set's own add: called for every reply and request, so no wrapper.
        self.mark = self._dirty.add
        self._writing = set()  # ... whose sockets are registered for write readiness
        self._unread = {}  # endpoint -> its registration's data, while it is not read from
        # Asked for by the parts with work for the end of this turn, each once: run before
        # its output (journal fsyncs) or after it (the audit and module logs). A turn
        # that asked for none (most gets) calls nothing.
        self._before_output = {}
        self._after_output = {}
        # The turn's time (monotonic): read once as its events are polled (and again
        # before its timers run), so that requests and answers are timed to the turn
        # they arrived in without a clock read each.
        self.now = time.monotonic()

    # -- running ---------------------------------------------------------

    def start(self, on_death):
        """Run the loop on its own thread; ``on_death()`` if it dies of an error."""
        self._thread = threading.Thread(target=self._run, args=(on_death,), name="cmactor-supervisor", daemon=True)
        self._thread.start()

    def finish(self):
        """(Loop thread.) End the loop after this turn; calls made from now on fail."""
        self._done = True  # what the loop itself checks each turn: cheaper than the Event
        with self._calls_lock:
            self._finished.set()

    def close(self):
        """Release what a loop that never ran holds (a start that failed before it did)."""
        with self._calls_lock:
            self._finished.set()
            self._epoll.close()
            self._wakeup.close()

    @property
    def finished(self):
        return self._finished.is_set()

    def wait(self, timeout=None):
        return self._finished.wait(timeout)

    def join(self):
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def before_output(self, fn):
        """Run ``fn()`` once before this turn's output (the replies waiting on it)."""
        self._before_output[fn] = None

    def tick(self):
        """Read the turn's time again, for a part whose work in the turn is part of what it
        times: a journal's fsync, before the answers it made durable."""
        self.now = time.monotonic()

    def after_output(self, fn):
        """Run ``fn()`` once after this turn's output."""
        self._after_output[fn] = None

    def _run(self, on_death):
        poll = self._epoll.poll
        watched = self._watched
        unwatched = self._unwatched
        timers = self._timers
        monotonic = time.monotonic
        delay = max(timers[0][0] - monotonic(), 0.0) if timers else -1.0  # -1: no timer, no limit
        try:
            while not self._done:
                if unwatched:
                    unwatched.clear()
                events = poll(delay, len(watched))
                self.now = monotonic()
                for fd, event in events:
                    # A handler earlier in this turn may have unwatched this descriptor, and
                    # a new socket taken its number (a worker reaped and restarted): the
                    # event was for the old one.
                    if fd in unwatched:
                        continue
                    found = watched.get(fd)
                    if found is None:
                        continue
                    (on_read, arg, endpoint), waits, _ = found
                    try:
                        if event & _NOT_OUT and waits & _READ:
                            on_read(arg)
                        if event & _NOT_IN and waits & _WRITE:
                            self._dirty.add(endpoint)  # the rest of its output goes out this turn
                    except Exception:
                        log.exception("internal error handling %s; the supervisor carries on", on_read.__qualname__)
                self._output()
                # Timers after the turn's output: replies are not kept waiting for them.
                now = self.now = monotonic()  # for the timers due, and the next wait unless more ran since
                if timers and timers[0][0] <= now:
                    self._run_timers()
                    self._output()
                    now = None
                if self._after_output:
                    hooks, self._after_output = self._after_output, {}
                    self._run_hooks(hooks)
                    now = None
                if timers:
                    delay = max(timers[0][0] - (monotonic() if now is None else now), 0.0)
                else:
                    delay = -1.0
        except BaseException:
            log.exception("the supervisor loop died; killing every worker")
            on_death()
            raise
        finally:
            with self._calls_lock:
                self._finished.set()
                calls, self._calls = self._calls, []
                self._epoll.close()
                self._wakeup.close()
            for _, _, future in calls:
                future.set_exception(RuntimeError("the supervisor is stopped"))

    # -- calls from other threads ------------------------------------------

    def call_async(self, fn, *args):
        """Have the loop thread run ``fn(*args)``; a Future of its result."""
        future = concurrent.futures.Future()
        with self._calls_lock:
            if self._finished.is_set():
                raise RuntimeError("the supervisor is stopped")
            self._calls.append((fn, args, future))
            self._wakeup.wake()
        return future

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the loop thread and return its result."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        return self.call_async(fn, *args).result()

    def _run_calls(self, _):
        self._wakeup.clear()
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn, args, future in calls:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    # -- timers ------------------------------------------------------------

    def after(self, delay, fn, *args):
        """Run ``fn(*args)`` on the loop thread in ``delay`` seconds; the timer, for cancel()."""
        timer = [time.monotonic() + delay, next(self._timer_seq), fn, args]
        heapq.heappush(self._timers, timer)
        return timer

    def cancel(self, timer):
        """Never run ``timer``, and let go of what its call holds now, not at its time:
        a request held for a day by a client that left must not keep its params that long.
        Cancelled timers are swept out once they are half the heap."""
        if timer[2] is None:
            return
        timer[2] = None
        timer[3] = ()
        self._cancelled += 1
        timers = self._timers
        if self._cancelled > 64 and self._cancelled * 2 > len(timers):
            timers[:] = [t for t in timers if t[2] is not None]
            heapq.heapify(timers)
            self._cancelled = 0

    def _run_timers(self):
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)
            fn, args = timer[2], timer[3]
            if fn is None:
                self._cancelled -= 1
                continue
            timer[2] = None  # run: a cancel() from now on is a no-op
            try:
                fn(*args)
            except Exception:
                log.exception("internal error in timer %s", fn.__qualname__)

    # -- what is watched -----------------------------------------------------

    def watch(self, fileobj, on_read, arg, endpoint=None):
        """Call ``on_read(arg)`` whenever ``fileobj`` is readable. ``endpoint``: the
        endpoint whose socket ``fileobj`` is, if it is one (for write readiness)."""
        self._set(fileobj, _READ, (on_read, arg, endpoint))

    def unwatch(self, fileobj):
        self._set(fileobj, 0, None)

    def _set(self, fileobj, waits, data):
        """Register ``fileobj`` (a file object or descriptor) for ``waits`` (_READ, _WRITE,
        both) with ``data``; 0: unregister it."""
        fd = self._fd(fileobj)
        if fd is None:
            return
        registered = fd in self._watched
        if not waits:
            if registered:
                del self._watched[fd]
                self._unwatched.add(fd)
                try:
                    self._epoll.unregister(fd)
                except OSError:  # closed already: epoll forgot it then
                    pass
            return
        if registered:
            self._epoll.modify(fd, _EPOLL[waits])
        else:
            self._epoll.register(fd, _EPOLL[waits])
        self._watched[fd] = (data, waits, fileobj)

    def _fd(self, fileobj):
        """The descriptor ``fileobj`` is registered under (a closed socket is found by
        itself), or None."""
        fd = fileobj if type(fileobj) is int else fileobj.fileno()
        if fd >= 0:
            return fd
        return next((fd for fd, (_, _, watched) in self._watched.items() if watched is fileobj), None)

    def close_endpoint(self, endpoint):
        """Stop watching an endpoint's socket, and close it."""
        self._writing.discard(endpoint)
        self._dirty.discard(endpoint)
        self._unread.pop(endpoint, None)
        self.unwatch(endpoint.sock)
        endpoint.sock.close()

    def pause_reading(self, endpoint):
        """Stop calling the endpoint's ``on_read`` until ``resume_reading``; its output
        still goes out. Nothing is read, so its peer blocks once its socket is full."""
        if endpoint not in self._unread:
            self._unread[endpoint] = self._watched[endpoint.sock.fileno()][0]
            self._register(endpoint, self._unread[endpoint])

    def resume_reading(self, endpoint):
        data = self._unread.pop(endpoint, None)
        if data is not None:
            self._register(endpoint, data)

    def _register(self, endpoint, data):
        """Register an endpoint's socket for what it waits for now: reading unless it is
        paused, writing while output is left. An endpoint waiting for neither is not
        registered at all (nor polled for hang-ups it would not act on)."""
        waits = (0 if endpoint in self._unread else _READ) | (_WRITE if endpoint in self._writing else 0)
        self._set(endpoint.sock, waits, data)

    # -- output ----------------------------------------------------------

    @staticmethod
    def _run_hooks(hooks):
        for fn in hooks:
            try:
                fn()
            except Exception:
                log.exception("internal error in %s; the supervisor carries on", fn.__qualname__)

    def _output(self):
        if self._before_output:  # before the replies that depend on them go out
            hooks, self._before_output = self._before_output, {}
            self._run_hooks(hooks)
        if not self._dirty:
            return
        dirty = tuple(self._dirty)
        self._dirty.clear()
        writing = self._writing
        for endpoint in dirty:
            sock = endpoint.sock
            if sock is None or not endpoint.out:
                endpoint.drained()
                continue
            try:
                sent = sock.send(endpoint.out)
            except BlockingIOError:
                sent = 0
            except OSError:
                endpoint.send_failed()
                continue
            del endpoint.out[:sent]
            endpoint.sent()
            if endpoint.sock is None:
                continue  # sent() closed it (a client over its backlog bound)
            if endpoint.out:
                self._want_write(endpoint, True)
            else:
                if endpoint in writing:
                    self._want_write(endpoint, False)
                endpoint.drained()

    def _want_write(self, endpoint, want):
        if want == (endpoint in self._writing):
            return
        if want:
            self._writing.add(endpoint)
        else:
            self._writing.discard(endpoint)
        data = self._unread.get(endpoint)
        self._register(endpoint, self._watched[endpoint.sock.fileno()][0] if data is None else data)


def recv(sock):
    """Bytes from a non-blocking socket: None if none are ready yet, b"" at EOF or on error."""
    try:
        return sock.recv(P.READ_SIZE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
