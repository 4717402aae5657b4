"""The supervisor's event loop: one thread, one selector, timers, batched output.

It waits at once on the listening socket, every client, every worker socket,
every worker's process sentinel (a crash is seen the moment it happens, no
polling) and a wake-up pipe through which other threads hand it calls. The
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
import os
import selectors
import threading
import time

from cmactor import protocol as P

log = logging.getLogger("cmactor.supervisor")

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


class EventLoop:
    def __init__(self):
        self._sel = selectors.DefaultSelector()
        self._thread = None
        self._finished = threading.Event()
        self._calls = []
        self._calls_lock = threading.Lock()  # also keeps the wake pipe open while it is written
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, _READ, (self._run_calls, self._wake_r, None))
        self._timers = []  # heap of (when, seq, fn, args); never replaced: the loop holds it
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

    def after_output(self, fn):
        """Run ``fn()`` once after this turn's output."""
        self._after_output[fn] = None

    def _run(self, on_death):
        select = self._sel.select
        timers = self._timers
        try:
            while not self._done:
                if timers:
                    delay = timers[0][0] - time.monotonic()
                    delay = delay if delay > 0.0 else 0.0
                else:
                    delay = None
                for key, mask in select(delay):
                    on_read, arg, endpoint = key.data
                    try:
                        if mask & _READ:
                            on_read(arg)
                        if mask & _WRITE:
                            self._dirty.add(endpoint)  # the rest of its output goes out this turn
                    except Exception:
                        log.exception("internal error handling %s; the supervisor carries on", on_read.__qualname__)
                self._output()
                # Timers after the turn's output: replies are not kept waiting for them.
                if timers and timers[0][0] <= time.monotonic():
                    self._run_timers()
                    self._output()
                if self._after_output:
                    hooks, self._after_output = self._after_output, {}
                    self._run_hooks(hooks)
        except BaseException:
            log.exception("the supervisor loop died; killing every worker")
            on_death()
            raise
        finally:
            with self._calls_lock:
                self._finished.set()
                calls, self._calls = self._calls, []
                self._sel.close()
                os.close(self._wake_r)
                os.close(self._wake_w)
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
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already
        return future

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the loop thread and return its result."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        return self.call_async(fn, *args).result()

    def _run_calls(self, wake_r):
        try:
            while os.read(wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn, args, future in calls:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    # -- timers ------------------------------------------------------------

    def after(self, delay, fn, *args):
        """Run ``fn(*args)`` on the loop thread in ``delay`` seconds."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), fn, args))

    def _run_timers(self):
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn, args = heapq.heappop(self._timers)
            try:
                fn(*args)
            except Exception:
                log.exception("internal error in timer %s", fn.__qualname__)

    # -- what is watched -----------------------------------------------------

    def watch(self, fileobj, on_read, arg, endpoint=None):
        """Call ``on_read(arg)`` whenever ``fileobj`` is readable. ``endpoint``: the
        endpoint whose socket ``fileobj`` is, if it is one (for write readiness)."""
        self._sel.register(fileobj, _READ, (on_read, arg, endpoint))

    def unwatch(self, fileobj):
        try:
            self._sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

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
            self._unread[endpoint] = self._sel.get_key(endpoint.sock).data
            self._register(endpoint, self._unread[endpoint])

    def resume_reading(self, endpoint):
        data = self._unread.pop(endpoint, None)
        if data is not None:
            self._register(endpoint, data)

    def _register(self, endpoint, data):
        """Register an endpoint's socket for what it waits for now: reading unless it is
        paused, writing while output is left. An endpoint waiting for neither is not
        registered at all (a selector refuses an empty event mask)."""
        sock = endpoint.sock
        events = (0 if endpoint in self._unread else _READ) | (_WRITE if endpoint in self._writing else 0)
        registered = sock in self._sel.get_map()
        if not events:
            if registered:
                self._sel.unregister(sock)
        elif registered:
            self._sel.modify(sock, events, data)
        else:
            self._sel.register(sock, events, data)

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
        self._register(endpoint, self._sel.get_key(endpoint.sock).data if data is None else data)


def recv(sock):
    """Bytes from a non-blocking socket: None if none are ready yet, b"" at EOF or on error."""
    try:
        return sock.recv(P.READ_SIZE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
