"""A small HTTP server for one page that is costly to make (/metrics), open to anyone
who can reach its address (every local user, for a loopback one).

Why not prometheus_client's own server (http.server underneath): it runs a thread per
connection with no timeout, so 300 half-sent requests held 300 threads, never freed.
This one has two threads whatever clients do: one serves every connection
(non-blocking sockets, selectors), one makes the page. Each connection gets one GET or
HEAD answered, then ``Connection: close``. Its bounds, module constants read as they
are used:

- MAX_REQUEST bytes for the request line and headers, else 431 and close;
- REQUEST_TIMEOUT seconds from accept to the request being complete, then
  RESPONSE_TIMEOUT to the last byte of the answer (the page's making included), else
  the connection is closed: a client that sends slowly or never reads gets no more;
- MAX_CONNECTIONS held at once: past it the oldest is closed (see _accept).

The page is made by ``render()`` on the page thread, one making at a time: requests
arriving while it runs wait for it, and those in the ``reuse`` seconds after it ends
are answered with it, so a scrape flood costs one making per ``reuse`` seconds.
"""

import logging
import re
import selectors
import socket
import threading
import time
from urllib.parse import urlsplit

from cmactor.wire.wakeup import Wakeup

log = logging.getLogger("cmactor.supervisor")

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0
# Prometheus gives up on a scrape after its scrape_timeout, 10 s by default.
RESPONSE_TIMEOUT = 10.0
# After the answer, what the client still sends is read and dropped for this long
# before closing: closing a socket with unread input resets the connection, and the
# client could lose the end of its answer (a 431's, sent before its request ended).
LINGER = 1.0
# Prometheus needs one or two; each costs a descriptor and about MAX_REQUEST bytes
# (the page itself is shared, never copied per connection).
MAX_CONNECTIONS = 64
# Seconds without accepting after accept() failed for want of descriptors or memory:
# the listener stays readable, and accepting again at once would spin.
ACCEPT_PAUSE = 1.0

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}
_TEXT = "text/plain; charset=utf-8"

# Where a connection is: reading its request, waiting for the page, writing its
# answer, or reading what follows before it is closed (LINGER).
_READING, _WAITING, _WRITING, _LINGERING = "reading", "waiting", "writing", "lingering"


class _Connection:
    __slots__ = ("sock", "state", "deadline", "request", "scanned", "head_only", "out", "events")

    def __init__(self, sock, deadline):
        self.sock = sock
        self.state = _READING
        self.deadline = deadline
        self.request = bytearray()
        self.scanned = 0  # where the search for the end of the request's head resumes
        self.head_only = False  # a HEAD request: the answer has no body
        self.out = []  # memoryviews of what is left to send
        self.events = 0  # what the selector watches it for


class PageServer:
    """Serves the bytes ``render()`` returns at ``path``, with ``content_type``, on
    ``host``:``port`` until close(); ``address`` is the (host, port) bound. OSError if it
    cannot be bound (the port taken, an address not of this host, an unknown name)."""

    def __init__(self, host, port, path, render, content_type, reuse):
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self._listener = socket.create_server(sockaddr, family=family)
        self._listener.setblocking(False)
        self.address = self._listener.getsockname()[:2]
        self._path = path
        self._render = render
        self._content_type = content_type
        self._reuse = reuse
        self._wakeup = Wakeup()  # the page thread, or close(), wakes the server thread
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, (self._accept, None))
        self._selector.register(self._wakeup, selectors.EVENT_READ, (self._woken, None))
        self._accept_again = None  # while accepting is paused (ACCEPT_PAUSE): when it resumes
        self._connections = {}  # _Connection -> None, oldest first
        self._page = None  # the last page made, and when its making ended (monotonic)
        self._made_at = None
        self._making = False  # (server thread) a making is asked for or running
        self._make = threading.Event()  # the server thread asks the page thread for a page
        self._made = None  # (page, error) handed from the page thread to the server thread
        self._closing = False
        self._threads = [
            threading.Thread(target=self._serve, name="cmactor-metrics-http", daemon=True),
            threading.Thread(target=self._make_pages, name="cmactor-metrics-page", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def close(self):
        """Stop serving: every connection and the listener are closed when this returns."""
        self._closing = True
        self._make.set()
        self._wakeup.wake()
        for thread in self._threads:
            thread.join()
        self._wakeup.close()

    # -- the page thread ---------------------------------------------------

    def _make_pages(self):
        while True:
            self._make.wait()
            self._make.clear()
            if self._closing:
                return
            try:
                made = self._render(), None
            except Exception as exc:  # a bug: the waiting requests get a 500 saying so, and the server carries on
                log.exception("the %s page could not be made", self._path)
                made = None, f"{type(exc).__name__}: {exc}"
            self._made = made
            self._wakeup.wake()

    # -- the server thread -------------------------------------------------

    def _serve(self):
        try:
            while not self._closing:
                for key, _ in self._selector.select(self._timeout()):
                    handler, conn = key.data
                    try:
                        handler(conn)
                    except Exception:  # a bug: it must cost this connection only, never the server
                        log.exception("internal error serving %s; the server carries on", self._path)
                        if conn is not None:
                            self._close(conn)
                self._expire()
        finally:
            for conn in list(self._connections):
                self._close(conn)
            self._selector.close()
            self._listener.close()

    def _timeout(self):
        """Seconds until the next deadline, or None: none to wait for."""
        deadlines = [conn.deadline for conn in self._connections]
        if self._accept_again is not None:
            deadlines.append(self._accept_again)
        return max(min(deadlines) - time.monotonic(), 0.0) if deadlines else None

    def _expire(self):
        now = time.monotonic()
        for conn in [conn for conn in self._connections if conn.deadline <= now]:
            self._close(conn)
        if self._accept_again is not None and self._accept_again <= now:
            self._accept_again = None
            self._selector.register(self._listener, selectors.EVENT_READ, (self._accept, None))

    def _accept(self, _):
        # Past MAX_CONNECTIONS the oldest connection is closed rather than the new one
        # refused: a client holding connections open (half-sent requests, answers never
        # read) would otherwise keep every scrape out for as long as it cares to. An honest
        # scrape is answered within milliseconds of connecting, so only a flood of new
        # connections faster than that could push one out.
        for _ in range(MAX_CONNECTIONS):  # then the other connections get their turn
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors or memory
                log.warning("%s: cannot accept a connection (%s); trying again in %gs", self._path, exc, ACCEPT_PAUSE)
                self._selector.unregister(self._listener)
                self._accept_again = time.monotonic() + ACCEPT_PAUSE
                return
            if len(self._connections) >= MAX_CONNECTIONS:
                self._close(next(iter(self._connections)))
            sock.setblocking(False)
            conn = _Connection(sock, time.monotonic() + REQUEST_TIMEOUT)
            self._connections[conn] = None
            self._watch(conn, selectors.EVENT_READ)

    def _woken(self, _):
        self._wakeup.clear()
        made, self._made = self._made, None
        if made is None:
            return  # close() woke it
        self._making = False
        page, error = made
        if page is not None:
            self._page, self._made_at = page, time.monotonic()
        failed = f"the {self._path} page could not be made: {error}; the supervisor's log has the traceback"
        for conn in [conn for conn in self._connections if conn.state == _WAITING]:
            if page is None:
                self._answer(conn, 500, failed)
            else:
                self._answer(conn, 200, page, self._content_type)

    def _readable(self, conn):
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
        elif conn.state == _READING:
            self._read(conn, data)
        # else it is lingering: what it sends after its answer is dropped

    def _read(self, conn, data):
        request = conn.request
        request += data
        end = _END_OF_HEAD.search(request, max(conn.scanned - 3, 0))
        conn.scanned = len(request)
        if end is None and len(request) <= MAX_REQUEST:
            return
        conn.deadline = time.monotonic() + RESPONSE_TIMEOUT  # its answer's time starts: the request is over
        if end is None or end.start() > MAX_REQUEST:
            self._answer(conn, 431, f"request line and headers over {MAX_REQUEST} bytes; send a shorter request")
            return
        parts = bytes(request[: end.start()]).split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._answer(conn, 400, f'malformed request line; expected "GET {self._path} HTTP/1.1"')
            return
        method, target = parts[0], parts[1].decode("latin-1")
        conn.head_only = method == b"HEAD"
        if method not in (b"GET", b"HEAD"):
            allowed = f"only GET and HEAD are served here; {self._path} is read with GET"
            self._answer(conn, 405, allowed, header="Allow: GET, HEAD")
        elif urlsplit(target).path != self._path:
            self._answer(conn, 404, f"nothing at {target[:100]!r}: this server serves {self._path} only")
        else:
            self._page_for(conn)

    def _page_for(self, conn):
        """Answer with the page: the last one made if it is fresh enough, else the next."""
        if self._page is not None and time.monotonic() - self._made_at < self._reuse:
            self._answer(conn, 200, self._page, self._content_type)
            return
        conn.state = _WAITING
        self._watch(conn, 0)
        if not self._making:
            self._making = True
            self._make.set()

    def _answer(self, conn, status, body, content_type=_TEXT, header=None):
        """Send ``body`` (bytes, or a str: a one-line error) with ``status``, then close."""
        if isinstance(body, str):
            body = f"{status} {_REASONS[status]}: {body}\n".encode()
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}"]
        lines += [f"Content-Length: {len(body)}"] + ([header] if header else []) + ["Connection: close", "", ""]
        conn.out = [memoryview("\r\n".join(lines).encode())]
        if not conn.head_only:
            conn.out.append(memoryview(body))
        conn.state = _WRITING
        self._watch(conn, selectors.EVENT_WRITE)
        self._write(conn)

    def _write(self, conn):
        try:
            sent = conn.sock.sendmsg(conn.out, [], socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        out = conn.out
        while out and sent >= len(out[0]):
            sent -= len(out.pop(0))
        if out:
            out[0] = out[0][sent:]
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.state = _LINGERING
        conn.deadline = time.monotonic() + LINGER
        self._watch(conn, selectors.EVENT_READ)

    def _watch(self, conn, events):
        """Have the selector watch ``conn`` for ``events`` (0: not at all)."""
        if events == conn.events:
            return
        handler = self._write if events == selectors.EVENT_WRITE else self._readable
        if not events:
            self._selector.unregister(conn.sock)
        elif not conn.events:
            self._selector.register(conn.sock, events, (handler, conn))
        else:
            self._selector.modify(conn.sock, events, (handler, conn))
        conn.events = events

    def _close(self, conn):
        if conn not in self._connections:
            return  # closed already
        del self._connections[conn]
        self._watch(conn, 0)
        conn.sock.close()
