"""The supervisor's own counters and latency histograms.

Kept where the events happen (Router.answer for requests, Saver for saves,
Journal.sync for fsyncs), on the loop thread, and read through ``status``, and
by the Prometheus collector (metrics.py) when it makes a page: one set of figures,
two ways to see them. Every request passes through ``Timed.record``, so it
costs an attribute increment or a dict increment, and a bisect: the buckets
are fixed when the figures are made, and nothing is allocated per event.
"""

from bisect import bisect_left

from cmactor.errors import StartupError
from cmactor.wire.figures import REQUEST_BOUNDS

FSYNC_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# A save walks every persistent table and writes one file: 100k rows take ~0.7 s.
SAVE_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Counts of values per bucket (not cumulative: one increment per value), and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value):
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self):
        """A copy for status: ``count``, ``sum`` and ``buckets``, each ``[bound, values <= bound]``
        (cumulative, as Prometheus reads them; ``count`` is the +Inf bucket)."""
        return snapshot(self.bounds, self.raw())

    def raw(self):
        """Its figures as they are kept, copied: cheap to take where they are kept (the
        loop thread), and made a snapshot of elsewhere (snapshot())."""
        return list(self.counts), self.sum


def snapshot(bounds, raw):
    """Histogram.snapshot() of the figures Histogram.raw() took, for histograms of ``bounds``."""
    counts, total_sum = raw
    buckets, total = [], 0
    for bound, count in zip(bounds, counts):
        total += count
        buckets.append([bound, total])
    return {"count": total + counts[-1], "sum": total_sum, "buckets": buckets}


class Timed:
    """Events of one kind: how many ended well, how many with each error type, how long they took."""

    __slots__ = ("ok", "errors", "seconds")

    def __init__(self, bounds):
        self.ok = 0
        self.errors = {}  # error type name -> count; the names come from one exception tree
        self.seconds = Histogram(bounds)

    def record(self, error_type, seconds):
        """One event: ``error_type`` None when it succeeded, else the name of its error's type."""
        if error_type is None:
            self.ok += 1
        else:
            self.errors[error_type] = self.errors.get(error_type, 0) + 1
        histogram = self.seconds  # Histogram.observe, inline: this runs for every request
        histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
        histogram.sum += seconds

    def snapshot(self):
        return {"ok": self.ok, "errors": dict(self.errors), "seconds": self.seconds.snapshot()}

    def raw(self):
        """Its figures, copied, in the order add() takes them (ok, errors, bucket counts, sum):
        Timed(bounds).add(*raw) makes it again, away from where it is kept."""
        counts, total = self.seconds.raw()
        return self.ok, dict(self.errors), counts, total

    def add(self, ok, errors, buckets, seconds):
        """Count events recorded elsewhere (a worker's direct reads, cmactor/wire/figures.py)."""
        self.ok += ok
        for name, count in errors.items():
            self.errors[name] = self.errors.get(name, 0) + count
        counts = self.seconds.counts
        for index, count in enumerate(buckets):
            counts[index] += count
        self.seconds.sum += seconds

    def copy(self):
        twin = Timed(self.seconds.bounds)
        twin.add(self.ok, self.errors, self.seconds.counts, self.seconds.sum)
        return twin


def request_stats(ops):
    """One module's requests: op -> Timed. Made for every op up front, so the hot path never
    makes one, and a scrape shows a zero series for an op never asked for."""
    return {op: Timed(REQUEST_BOUNDS) for op in ops}


def exporter(address, read):
    """A metrics.Exporter serving /metrics at ``address`` from ``read``; imported only here,
    since it needs the optional extra. StartupError when it is not installed."""
    try:
        from cmsupervisor.observability import metrics
    except ImportError as exc:
        if exc.name != "prometheus_client":
            raise
        raise StartupError(
            f"[supervisor] metrics = {address!r} needs the prometheus-client package, which is not "
            "installed: pip install 'cmactor[metrics]' (or remove the key)"
        ) from None
    return metrics.Exporter(address, read)
