"""A wake-up: how one thread tells another, asleep in select or epoll, that it has work."""

import socket


class Wakeup:
    """A non-blocking socket pair. Any thread calls ``wake()``; the sleeping thread waits
    on ``fileno()`` for reading and calls ``clear()`` when it wakes, before it looks for
    the work. A wake that finds the buffer full is dropped: one is pending already."""

    def __init__(self):
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self):
        return self._reader.fileno()

    def wake(self):
        try:
            self._writer.send(b"!")
        except BlockingIOError:
            pass  # a wake-up is pending already

    def clear(self):
        try:
            while self._reader.recv(4096):
                pass
        except BlockingIOError:
            pass

    def close(self):
        self._reader.close()
        self._writer.close()
