"""Prometheus metrics: a real supervisor, /metrics scraped over HTTP and parsed with
prometheus_client's own parser; the figures, the status that shows the same ones, bad addresses."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from conftest import agent, wait_for
from prometheus_client.parser import text_string_to_metric_families

import cmactor
from cmactor.errors import ConfigError, DatabaseError, StartupError
from cmsupervisor import metrics
from cmsupervisor.config import load_toml
from cmsupervisor.stats import Histogram, Timed

ECHO = agent("echo.py:main")
ANY_PORT = "127.0.0.1:0"


def scrape(sup):
    """Every sample of /metrics: {(sample name, ((label, value), ...)): value}."""
    with urllib.request.urlopen(sup.metrics_url, timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def test_histogram_buckets_are_upper_bounds_and_cumulative():
    hist = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 7.0):  # a value equal to a bound falls in its bucket ("le")
        hist.observe(seconds)
    assert hist.counts == [2, 2, 1]
    assert hist.snapshot() == {"count": 5, "sum": pytest.approx(8.65), "buckets": [[0.1, 2], [1.0, 4]]}
    timed = Timed((1.0,))
    timed.record(None, 0.5)
    timed.record("DatabaseError", 2.0)
    timed.record("DatabaseError", 0.1)
    assert timed.snapshot() == {
        "ok": 1,
        "errors": {"DatabaseError": 2},
        "seconds": {"count": 3, "sum": pytest.approx(2.6), "buckets": [[1.0, 2]]},
    }


def test_figures_follow_requests_saves_and_restarts(supervisor):
    sup = supervisor({"echo": ECHO, "other": ECHO}, metrics=ANY_PORT)
    assert sup.metrics_url.startswith("http://127.0.0.1:") and sup.metrics_url.endswith("/metrics")
    first = scrape(sup)
    assert value(first, "cmactor_up") == 1
    for module in ("echo", "other"):
        assert value(first, "cmactor_module_state", module=module, state="READY") == 1
        assert value(first, "cmactor_module_state", module=module, state="RESTARTING") == 0
        assert value(first, "cmactor_module_restarts_total", module=module) == 0
        assert value(first, "cmactor_module_rss_bytes", module=module) > 1_000_000
        assert value(first, "cmactor_module_unsaved", module=module) == 0
        assert value(first, "cmactor_requests_total", module=module, op="get", outcome="ok") == 0
    assert value(first, "cmactor_saves_total", outcome="ok") == 0
    assert value(first, "process_open_fds") > 0  # the supervisor process itself

    with sup.connect() as conn:
        cur = conn.cursor()
        for n in range(5):
            cur.execute("get echo.kv", {"key": "default"})
        with pytest.raises(DatabaseError):
            cur.execute("get echo.kv", {"key": "missing"})
        cur.execute("set echo.kv", {"key": "a", "value": "1"})  # a persistent table: journaled and fsynced
        during = scrape(sup)
        assert value(during, "cmactor_clients") >= 1
    assert value(scrape(sup), "cmactor_module_unsaved", module="echo") == 1
    sup.save()
    assert value(scrape(sup), "cmactor_module_unsaved", module="echo") == 0
    with sup.connect() as conn:
        conn.cursor().execute("set echo.kv", {"key": "b", "value": "2"})
        conn.cursor().execute("set echo.ctl", {"save_fault": "fail"})
    with pytest.raises(DatabaseError):
        sup.save()

    after = scrape(sup)
    assert value(after, "cmactor_requests_total", module="echo", op="get", outcome="ok") == 5
    assert value(after, "cmactor_requests_total", module="echo", op="get", outcome="DatabaseError") == 1
    assert value(after, "cmactor_requests_total", module="echo", op="set", outcome="ok") == 3
    assert value(after, "cmactor_requests_total", module="other", op="get", outcome="ok") == 0
    assert value(after, "cmactor_request_duration_seconds_count", module="echo", op="get") == 6
    assert value(after, "cmactor_request_duration_seconds_bucket", module="echo", op="get", le="+Inf") == 6
    assert 0 < value(after, "cmactor_request_duration_seconds_sum", module="echo", op="get") < 6 * 10
    assert value(after, "cmactor_journal_fsync_duration_seconds_count", module="echo") == 2
    assert value(after, "cmactor_journal_fsync_duration_seconds_count", module="other") == 0
    assert value(after, "cmactor_saves_total", outcome="ok") == 1
    assert value(after, "cmactor_saves_total", outcome="DatabaseError") == 1
    assert value(after, "cmactor_save_duration_seconds_count") == 2
    assert value(after, "cmactor_module_unsaved", module="echo") == 1  # b: that save failed

    # status and supervisor_status show the same figures, without Prometheus.
    status, own = sup.status(), sup.supervisor_status()
    gets = status["echo"]["requests"]["get"]
    assert (gets["ok"], gets["errors"], gets["seconds"]["count"]) == (5, {"DatabaseError": 1}, 6)
    assert gets["seconds"]["sum"] == value(after, "cmactor_request_duration_seconds_sum", module="echo", op="get")
    assert status["echo"]["journal_fsync"]["count"] == 2
    assert (own["saves"]["ok"], own["saves"]["errors"]) == (1, {"DatabaseError": 1})

    pid = status["echo"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (entry := sup.status()["echo"])["state"] == "READY" and entry["pid"] not in (pid, None))
    restarted = scrape(sup)
    assert value(restarted, "cmactor_module_restarts_total", module="echo") == 1
    assert value(restarted, "cmactor_module_restarts_total", module="other") == 0
    assert value(restarted, "cmactor_module_state", module="echo", state="READY") == 1


def test_held_and_failed_requests_are_counted(supervisor):
    sup = supervisor({"echo": ECHO}, metrics=ANY_PORT)
    with sup.connect() as conn:
        cur = conn.cursor()
        sup.restart("echo")  # requests are held until it is READY again
        cur.execute("get echo.kv", {"key": "default"})
        with pytest.raises(cmactor.ProgrammingError):
            cur.execute("get nosuch.kv", {"key": "default"})  # nobody's figure: no module of that name
    samples = scrape(sup)
    assert value(samples, "cmactor_requests_total", module="echo", op="get", outcome="ok") == 1
    assert not [key for key in samples if ("module", "nosuch") in key[1]]


def test_several_supervisors_in_one_process_have_their_own_metrics(supervisor, tmp_path):
    one = supervisor({"echo": ECHO}, metrics=ANY_PORT, state_dir=tmp_path / "one")
    two = supervisor({"other": ECHO}, metrics=ANY_PORT, state_dir=tmp_path / "two")
    with one.connect() as conn:
        conn.cursor().execute("get echo.kv", {"key": "default"})
    first, second = scrape(one), scrape(two)
    assert value(first, "cmactor_requests_total", module="echo", op="get", outcome="ok") == 1
    assert value(second, "cmactor_module_state", module="other", state="READY") == 1
    assert not [key for key in first if ("module", "other") in key[1]]
    assert not [key for key in second if ("module", "echo") in key[1]]


def _listening_ports():
    return {c.laddr.port for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def test_nothing_is_bound_unless_configured(supervisor):
    before = _listening_ports()
    sup = supervisor({"echo": ECHO})
    assert sup.metrics_url is None
    assert _listening_ports() == before


def test_the_http_server_ends_with_the_supervisor(supervisor):
    sup = supervisor({"echo": ECHO}, metrics=ANY_PORT)
    port = int(sup.metrics_url.rsplit(":", 1)[1].split("/")[0])
    assert port in _listening_ports()
    sup.stop()
    assert sup.metrics_url is None
    assert port not in _listening_ports()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_a_stuck_loop_is_a_scrape_saying_so_not_a_hang(supervisor, monkeypatch):
    sup = supervisor({"echo": ECHO}, metrics=ANY_PORT)
    monkeypatch.setattr(metrics, "READ_TIMEOUT", 0.2)
    sup._loop.call_async(time.sleep, 1.5)  # the loop thread busy: as stuck, for the scrape
    started = time.monotonic()
    samples = scrape(sup)
    assert time.monotonic() - started < 1.2
    assert value(samples, "cmactor_up") == 0
    assert not [key for key in samples if key[0].startswith("cmactor_module_")]


@pytest.mark.parametrize("address", ["9464", "127.0.0.1", ":9464", "::1:9464", "127.0.0.1:65536", "h:port", 9464])
def test_a_malformed_address_is_a_config_error_naming_the_key(supervisor, address):
    with pytest.raises(ConfigError, match=r"metrics: expected \"host:port\", like \"127.0.0.1:9464\""):
        supervisor({"echo": ECHO}, metrics=address)


def test_a_malformed_address_in_the_file_names_file_and_key(tmp_path):
    path = tmp_path / "cmactor.toml"
    path.write_text(f'[supervisor]\nmetrics = 9464\n[agents.echo]\nentry = "{ECHO}"\n')
    with pytest.raises(ConfigError, match=r"cmactor.toml: \[supervisor\].metrics: expected \"host:port\""):
        load_toml(path)


def test_a_port_taken_is_a_startup_error_naming_address_and_key(supervisor):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        sup = supervisor({"echo": ECHO}, start=False, metrics=address)
        with pytest.raises(StartupError) as raised:
            sup.start()
    message = str(raised.value)
    assert f"[supervisor] metrics = {address!r}: cannot serve /metrics there" in message
    assert "Address already in use" in message and "choose another" in message
    assert sup.metrics_url is None and sup._loop.finished  # stopped: nothing left running


def test_an_address_not_of_this_host_is_a_startup_error(supervisor):
    sup = supervisor({"echo": ECHO}, start=False, metrics="192.0.2.1:9464")  # TEST-NET-1: never local
    with pytest.raises(StartupError, match=r"metrics = '192.0.2.1:9464': cannot serve /metrics there: .*assign"):
        sup.start()


def test_the_extra_missing_is_a_startup_error_saying_what_to_install(tmp_path):
    config = tmp_path / "cmactor.toml"
    config.write_text(f'[supervisor]\nstate_dir = "state"\nmetrics = "{ANY_PORT}"\n[agents.echo]\nentry = "{ECHO}"\n')
    # prometheus_client as if it were not installed: None in sys.modules makes its import fail.
    program = (
        "import sys; sys.modules['prometheus_client'] = None; "
        f"from cmsupervisor.cli import main; sys.exit(main(['run', {str(config)!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert (
        f"cmactor: StartupError: [supervisor] metrics = '{ANY_PORT}' needs the prometheus-client package, "
        "which is not installed: pip install 'cmactor[metrics]'"
    ) in result.stderr
