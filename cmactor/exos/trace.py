"""TraceBufferHandler: EXOS's in-memory trace buffer for an app's logger."""

import collections
import logging
import threading


class TraceBufferHandler(logging.Handler):
    """Keeps the last ``size`` bytes of formatted records of the logger it is added to.

    On a switch an operator reads that buffer with ``debug ems show trace``; here
    ``lines()`` returns it. The records also reach the module's log (the worker's
    root logger sends them to the supervisor): through the logger hierarchy as
    usual, or, from a logger that does not propagate to the root, by this handler.
    """

    def __init__(self, name, size, level=logging.NOTSET):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"TraceBufferHandler({name!r}): size must be a number of bytes >= 1, got {size!r}")
        super().__init__(level)
        self.name = name
        self.size = size
        self._lines = collections.deque()
        self._bytes = 0
        self._buffer_lock = threading.Lock()

    def emit(self, record):
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self._buffer_lock:
            self._lines.append(text)
            self._bytes += len(text) + 1
            while self._bytes > self.size and len(self._lines) > 1:
                self._bytes -= len(self._lines.popleft()) + 1
        if not _reaches_root(record.name):
            for handler in logging.getLogger().handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)

    def lines(self):
        """The buffered records, oldest first."""
        with self._buffer_lock:
            return list(self._lines)


def _reaches_root(name):
    logger = logging.getLogger(name)
    while logger.parent is not None:
        if not logger.propagate:
            return False
        logger = logger.parent
    return True
