"""A worker's figures for the reads it serves directly: counted in shared memory by
the worker, read by the supervisor (status, /metrics) without a message.

The layout is one int64 array: how many direct connections are open, how many
direct requests began and how many wait behind a save, then per read op the
requests that succeeded, those that failed by error type, a latency histogram
over the supervisor's own buckets (REQUEST_BOUNDS) and the latency sum in
nanoseconds: three writes per request (its outcome, its bucket, the sum). Those
in flight are not written but derived (inflight()): the ones begun less the ones
answered, which are in the buckets. The supervisor adds them to the module's
request figures, and folds a dead worker's into them before the next one starts
from zero.
"""

import threading
from bisect import bisect_left

from cmactor.errors import WIRE_ERRORS
from cmactor.wire.protocol import READ_OPS

# Upper bounds in seconds (Prometheus' "le": a value equal to a bound falls in
# its bucket). A get takes ~130 µs through the supervisor on a quiet 2-vCPU VM; a
# set to a persistent table adds an fsync (~200 µs on ext4, tens of ms on a busy disk).
REQUEST_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BOUNDS_NS = tuple(int(bound * 1e9) for bound in REQUEST_BOUNDS)

ERROR_TYPES = tuple(WIRE_ERRORS)

CONNECTIONS, BEGUN, QUEUED = 0, 1, 2
_HEADER = 3
_OK = 0
_ERRORS = 1
_BUCKETS = _ERRORS + len(ERROR_TYPES)
_SUM = _BUCKETS + len(REQUEST_BOUNDS) + 1
_BLOCK = _SUM + 1
SIZE = _HEADER + _BLOCK * len(READ_OPS)

_OP_BASE = {op: _HEADER + _BLOCK * n for n, op in enumerate(READ_OPS)}
_ERROR_INDEX = {name: _ERRORS + n for n, name in enumerate(ERROR_TYPES)}


class Counter:
    """The worker's side: the threads serving direct reads count through one lock (an
    int64 increment in shared memory is a read and a write, not atomic), which also
    keeps the requests in flight, oldest first, for the worker's watchdog. A request
    is an object with ``op`` and ``since`` (monotonic ns) attributes."""

    __slots__ = ("_array", "_lock", "_running")

    def __init__(self, array):
        self._array = memoryview(array).cast("B").cast("q")  # a third cheaper to index than the ctypes array
        self._lock = threading.Lock()
        self._running = {}  # request -> None: a dict keeps arrival order

    def add(self, index, delta):
        with self._lock:
            self._array[index] += delta

    def began(self, request):
        with self._lock:
            self._running[request] = None
            self._array[BEGUN] += 1

    def withdraw(self, request):
        """``request`` is not served here after all (sent to the supervisor): uncounted."""
        with self._lock:
            del self._running[request]
            self._array[BEGUN] -= 1

    def running(self):
        """The requests in flight, oldest first."""
        with self._lock:
            return list(self._running)

    def answered(self, request, error_type, now):
        """``request`` answered at ``now``: ``error_type`` None, or its error's type name."""
        nanoseconds = now - request.since
        base = _OP_BASE[request.op]
        bucket = base + _BUCKETS + bisect_left(_BOUNDS_NS, nanoseconds)
        array = self._array
        with self._lock:
            del self._running[request]
            array[base + (_OK if error_type is None else _ERROR_INDEX.get(error_type, _ERRORS))] += 1
            array[bucket] += 1
            array[base + _SUM] += nanoseconds


def read(array):
    """The supervisor's side: per read op, (ok, {error type: count}, bucket counts, seconds summed)."""
    figures = {}
    for op, base in _OP_BASE.items():
        errors = {name: array[index + base] for name, index in _ERROR_INDEX.items() if array[index + base]}
        buckets = list(array[base + _BUCKETS : base + _SUM])
        figures[op] = (array[base + _OK], errors, buckets, array[base + _SUM] / 1e9)
    return figures


def inflight(array):
    """Direct requests begun and not answered yet. The answered are read first: a request
    is counted in before it is answered, so the difference is never below zero."""
    answered = sum(sum(array[base + _BUCKETS : base + _SUM]) for base in _OP_BASE.values())
    return array[BEGUN] - answered
