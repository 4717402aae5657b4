"""The supervisor's event loop: one thread, one selector, timers, batched output.

It waits at once on the listening socket, every client, every worker socket,
every worker's process sentinel (a crash is seen the moment it happens, no
polling) and a wake-up pipe through which the public methods, called from other
threads, hand it work. All module state is touched by this thread only, so none
of it needs locks. Replies and requests produced during one turn are written at
the end of the turn, one send per socket.
"""

import concurrent.futures
import heapq
import logging
import os
import selectors
import threading
import time

from cmactor import protocol as P

from . import server

log = logging.getLogger("cmactor.supervisor")

# selector key kinds
LISTENER, CLIENT, WORKER, SENTINEL, WAKE = range(5)


class EventLoop:
    """The loop half of Supervisor (see supervisor.py for the state it works on)."""

    def _call_async(self, fn, *args):
        future = concurrent.futures.Future()
        with self._calls_lock:  # also keeps the wake pipe open while we write to it
            if self._finished.is_set():
                raise RuntimeError("the supervisor is stopped")
            self._calls.append((fn, args, future))
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already
        return future

    def _call(self, fn, *args):
        """Run ``fn`` on the loop thread and return its result."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        return self._call_async(fn, *args).result()

    def _loop(self):
        try:
            while not self._finished.is_set():
                for key, mask in self._sel.select(self._timer_delay()):
                    kind, obj = key.data
                    try:
                        if kind == WORKER or kind == CLIENT:
                            if mask & selectors.EVENT_READ:
                                (self._read_worker if kind == WORKER else self._read_client)(obj)
                            if mask & selectors.EVENT_WRITE:
                                self._dirty.add(obj)  # the rest of its output goes out this turn
                        elif kind == SENTINEL:
                            self._on_exit(obj)
                        elif kind == LISTENER:
                            self._accept()
                        else:
                            self._run_calls()
                    except Exception:
                        log.exception("internal error handling %s; the supervisor carries on", key.data)
                self._send_output()
                # Timers after the turn's output: replies are not kept waiting for them.
                if self._timers and self._timers[0][0] <= time.monotonic():
                    self._run_timers()
                    self._send_output()
                self._audit.flush()
        except BaseException:
            log.exception("the supervisor loop died; killing every worker")
            for mod in self.modules.values():
                self._kill(mod)
            self._close()
            raise
        finally:
            with self._calls_lock:
                calls, self._calls = self._calls, []
                self._sel.close()
                os.close(self._wake_r)
                os.close(self._wake_w)
            for _, _, future in calls:
                future.set_exception(RuntimeError("the supervisor is stopped"))

    def _run_calls(self):
        try:
            while os.read(self._wake_r, 4096):
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

    def _after(self, delay, fn, *args):
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), fn, args))

    def _timer_delay(self):
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _run_timers(self):
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn, args = heapq.heappop(self._timers)
            try:
                fn(*args)
            except Exception:
                log.exception("internal error in timer %s", fn.__name__)

    # -- output -----------------------------------------------------------

    def _send_output(self):
        if self._journals_to_sync:
            self._sync_journals()  # before the replies that depend on them go out
        if self._dirty:
            self._flush()

    def _to_client(self, client, message):
        if not client.closed:
            client.send(message)
            self._dirty.add(client)

    def _to_worker(self, mod, message):
        mod.send(message)
        self._dirty.add(mod)

    def _flush(self):
        dirty, self._dirty = self._dirty, set()
        for item in dirty:
            sock = item.sock
            if sock is None or not item.out:
                if isinstance(item, server.Client) and item.closing:
                    self._drop_client(item)
                continue
            try:
                sent = sock.send(item.out)
            except BlockingIOError:
                sent = 0
            except OSError:
                if isinstance(item, server.Client):
                    self._drop_client(item)
                else:
                    item.out.clear()  # the worker is dying; its sentinel will tell
                continue
            del item.out[:sent]
            if not isinstance(item, server.Client) and item.ring:
                self._ring(item)
            self._want_write(item, bool(item.out))
            if not item.out and isinstance(item, server.Client) and item.closing:
                self._drop_client(item)

    @staticmethod
    def _ring(mod):
        """Async work went out. A worker runs serial work on its reading thread, so while
        any serial request of it is unanswered its socket may be unread: ring its
        doorbell, and another thread reads (see cmactor/worker.py, Runtime._lane_loop)."""
        mod.ring = False
        if mod.serial_sids:
            try:
                mod.doorbell.send(b"!")
            except OSError:
                pass  # full of rings already, or the worker is dying

    def _want_write(self, item, want):
        if want == (item in self._writing):
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
        kind = CLIENT if isinstance(item, server.Client) else WORKER
        self._sel.modify(item.sock, events, (kind, item))
        if want:
            self._writing.add(item)
        else:
            self._writing.discard(item)

    def _unwatch(self, item):
        """Stop watching a client's or worker's socket, and close it."""
        self._writing.discard(item)
        try:
            self._sel.unregister(item.sock)
        except (KeyError, ValueError):
            pass
        item.sock.close()

    @staticmethod
    def _recv(sock):
        """Bytes from a non-blocking socket: None if none are ready yet, b"" at EOF or on error."""
        try:
            return sock.recv(P.READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""
