"""Prometheus metrics: ``/metrics`` over HTTP while the supervisor runs (``[supervisor] metrics``).

Nothing here keeps a figure but the supervisor's start time. To make the page the collector reads the figures
``status`` shows (Control.figures: copied on the loop thread that owns them, the
workers' psutil figures sampled on the page's own thread) and turns them into metric
families, so a scrape and ``cmactor status`` always agree. Pages are made one at a
time, and one is served again for REUSE seconds after it is made: scrapes during a
making get its page, so a scrape flood costs the supervisor one making per REUSE
seconds (httpserve.py serves it, on two threads whatever clients do). Each supervisor
has its own registry: several in one process (tests do that) never clash. This module
needs the optional extra ``cmactor[metrics]``; the supervisor imports it only when the
key is set.
"""

import functools
import logging
import platform
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Info, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cmactor.errors import StartupError
from cmactor.version import installed
from cmsupervisor.config import parse_address
from cmsupervisor.ha.replica import ROLES
from cmsupervisor.observability.httpserve import PageServer
from cmsupervisor.supervision.states import TRANSITIONS

log = logging.getLogger("cmactor.supervisor")

WHERE = "[supervisor] metrics"
# Seconds a scrape waits for the loop thread. Past it the loop is stuck, and the
# scrape says so (cmactor_up 0) instead of hanging until Prometheus gives up.
READ_TIMEOUT = 5.0
# Seconds a page is served again after it is made: Prometheus scrapes a target every
# 15 s or so, so only a flood (or several scrapers at once) ever sees one twice.
REUSE = 1.0

# status key -> (metric name, help), per module; a None figure (no worker) has no sample.
_GAUGES = {
    "queue": (
        "cmactor_module_held_requests",
        "Requests held for the module while it is not READY, or direct reads waiting in its worker behind a save",
    ),
    "inflight": (
        "cmactor_module_inflight_requests",
        "Requests sent to the module's worker, or read from it directly, and not answered yet",
    ),
    "unsaved": ("cmactor_module_unsaved", "1 when the module has changes that are not in the config file"),
    # A start time, not an uptime: it changes only when the worker does, and `time() - it` is the uptime.
    "start_time": ("cmactor_module_start_time_seconds", "Unix time the module's current worker started"),
    "rss": ("cmactor_module_rss_bytes", "Resident memory of the module's worker"),
    "threads": ("cmactor_module_threads", "Threads of the module's worker"),
    "load_errors": ("cmactor_module_load_errors", "Saved rows that failed to load into the current worker"),
    "memory_max": ("cmactor_module_memory_max_bytes", "memory_max of the module's workers; absent without a limit"),
}
_COUNTERS = {
    "restarts": ("cmactor_module_restarts", "Restarts of the module's worker"),
    "memory_kills": (
        "cmactor_module_memory_kills",
        "Workers of the module killed for passing memory_max (by the kernel in their cgroup, or the RSS watchdog)",
    ),
    # A counter, which Prometheus rates over any window, rather than a percent "since the
    # previous scrape": that would depend on who else scrapes, or asks for status.
    "cpu_seconds": (
        "cmactor_module_cpu_seconds",
        "User + system CPU seconds of the module's current worker (from 0 again when it restarts)",
    ),
}


class Exporter:
    """``/metrics`` served at ``address`` from ``read(timeout)`` (the supervisor's figures), until close()."""

    def __init__(self, address, read):
        host, port = parse_address(WHERE, address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Figures(read))
        ProcessCollector(registry=self.registry)  # the supervisor process itself: cpu, memory, open fds
        Info("cmactor_build", "The cmactor version serving, and its Python's", registry=self.registry).info(
            {"version": installed(), "python": platform.python_version()}
        )
        # Made by Supervisor.start(), before any module starts: when this supervisor started
        # (process_start_time_seconds is the process's, which may run several, or run on after one).
        started = Gauge("cmactor_start_time_seconds", "Unix time the supervisor started", registry=self.registry)
        started.set(time.time())
        render = functools.partial(generate_latest, self.registry)
        try:
            self._server = PageServer(host, port, "/metrics", render, CONTENT_TYPE_LATEST, REUSE)
        except OSError as exc:  # the port is taken, the host is not one of this machine's, or unknown
            raise StartupError(
                f"{WHERE} = {address!r}: cannot serve /metrics there: {exc}; free the port or choose another "
                "(port 0: any free one), on an address of this host"
            ) from None
        host, port = self._server.address
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def close(self):
        self._server.close()


class Figures(Collector):
    """The collector: each collect() is one copy of the supervisor's figures, as metric families."""

    def __init__(self, read):
        self._read = read

    def collect(self):
        up = GaugeMetricFamily(
            "cmactor_up",
            "1 when the supervisor's loop answered for this page; 0: stuck or stopped (a page is served again for "
            f"{REUSE:g}s after it is made)",
        )
        try:
            figures = self._read(READ_TIMEOUT)
        except (TimeoutError, RuntimeError) as exc:
            why = str(exc) or f"its loop did not answer within {READ_TIMEOUT:g}s"
            log.warning("metrics: the supervisor's figures could not be read: %s", why)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _modules(figures["modules"])
        yield from _supervisor(figures["supervisor"])


def _modules(status):
    state = GaugeMetricFamily(
        "cmactor_module_state",
        "1 for the module's current lifecycle state, 0 for the others",
        labels=["module", "state"],
    )
    gauges = {key: GaugeMetricFamily(name, text, labels=["module"]) for key, (name, text) in _GAUGES.items()}
    counters = {key: CounterMetricFamily(name, text, labels=["module"]) for key, (name, text) in _COUNTERS.items()}
    requests = CounterMetricFamily(
        "cmactor_requests",
        "Requests answered, by op and outcome (ok, or the error's type)",
        labels=["module", "op", "outcome"],
    )
    latency = HistogramMetricFamily(
        "cmactor_request_duration_seconds",
        "Seconds from the supervisor (or, for a direct read, the worker) reading a request to its answer "
        "(held time and journal fsync included)",
        labels=["module", "op"],
    )
    fsync = HistogramMetricFamily(
        "cmactor_journal_fsync_duration_seconds",
        "Seconds of each fsync of the module's journal, which sets to persistent tables wait for",
        labels=["module"],
    )
    for name, entry in status.items():
        for each in TRANSITIONS:
            state.add_metric([name, each], 1 if entry["state"] == each else 0)
        for family, figures in ((gauges, _GAUGES), (counters, _COUNTERS)):
            for key in figures:
                if entry[key] is not None:
                    family[key].add_metric([name], float(entry[key]))
        for op, timed in entry["requests"].items():
            requests.add_metric([name, op, "ok"], timed["ok"])
            for error, count in timed["errors"].items():
                requests.add_metric([name, op, error], count)
            latency.add_metric([name, op], _buckets(timed["seconds"]), timed["seconds"]["sum"])
        if entry["journal_fsync"] is not None:
            fsync.add_metric([name], _buckets(entry["journal_fsync"]), entry["journal_fsync"]["sum"])
    direct = GaugeMetricFamily(
        "cmactor_module_direct_connections",
        "Clients connected to the module's worker for direct reads",
        labels=["module"],
    )
    for name, entry in status.items():
        if entry["direct"] is not None:
            direct.add_metric([name], entry["direct"]["connections"])
    yield state
    yield direct
    yield from gauges.values()
    yield from counters.values()
    yield from (requests, latency, fsync)


def _supervisor(own):
    clients = GaugeMetricFamily("cmactor_clients", "Clients connected to the frontend socket (agents' among them)")
    clients.add_metric([], own["clients"])
    saves = CounterMetricFamily(
        "cmactor_saves", "Saves of the config file, by outcome (ok, or the error's type)", labels=["outcome"]
    )
    saves.add_metric(["ok"], own["saves"]["ok"])
    for error, count in own["saves"]["errors"].items():
        saves.add_metric([error], count)
    duration = HistogramMetricFamily("cmactor_save_duration_seconds", "Seconds from a save's start to its end")
    duration.add_metric([], _buckets(own["saves"]["seconds"]), own["saves"]["seconds"]["sum"])
    audit = CounterMetricFamily("cmactor_audit_failures", "Audit log lines that could not be written")
    audit.add_metric([], own["audit_failures"])
    unknown = CounterMetricFamily(
        "cmactor_unknown_module_requests",
        "Data requests naming a module the supervisor does not run (refused; no module's figures count them)",
    )
    unknown.add_metric([], own["unknown_module_requests"])
    families = [clients, saves, duration, audit, unknown, *_ha(own["ha"])]
    restconf = own.get("restconf")
    if restconf is not None:  # only with [restconf]
        up = GaugeMetricFamily(
            "cmactor_restconf_up", "1 while the RESTCONF server run beside the modules serves, else 0"
        )
        up.add_metric([], 1 if restconf["state"] == "RUNNING" else 0)
        restarts = CounterMetricFamily(
            "cmactor_restconf_restarts", "Times the RESTCONF server was started again after it ended"
        )
        restarts.add_metric([], restconf["restarts"])
        families += [up, restarts]
    return tuple(families)


def _ha(ha):
    """This node's role in its cluster (role "single" without [ha]), and how far it has read."""
    role = GaugeMetricFamily(
        "cmactor_ha_role",
        "1 for this node's current role in its hot-standby cluster, 0 for the others",
        labels=["role"],
    )
    for each in ROLES:
        role.add_metric([each], 1 if ha["role"] == each else 0)
    in_sync = GaugeMetricFamily(
        "cmactor_ha_in_sync", "1 when this node could take over: every module READY, every committed change applied"
    )
    in_sync.add_metric([], 1 if ha["in_sync"] else 0)
    revision = GaugeMetricFamily("cmactor_ha_revision", "The etcd revision this node has applied (0 without [ha])")
    revision.add_metric([], ha["revision"])
    return role, in_sync, revision


def _buckets(histogram):
    """A status histogram (stats.Histogram.snapshot) as Prometheus buckets, ending with +Inf."""
    buckets = [(floatToGoString(bound), count) for bound, count in histogram["buckets"]]
    buckets.append(("+Inf", histogram["count"]))
    return buckets
