"""Prometheus metrics: a real supervisor, /metrics scraped over HTTP and parsed with
prometheus_client's own parser; the figures, the status that shows the same ones, bad addresses,
and the HTTP server's bounds against clients that hold, flood or send what it does not serve."""

import http.client
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest
from helpers import ANY_PORT, agent, scrape, value, wait_for
from processes import Run
from prometheus_client.parser import text_string_to_metric_families

import cmactor
from cmactor.errors import ConfigError, DatabaseError, StartupError
from cmsupervisor.config import load_toml
from cmsupervisor.front import control
from cmsupervisor.observability import httpserve, metrics
from cmsupervisor.observability.stats import Histogram, Timed
from cmsupervisor.supervision import health, modules

ECHO = agent("echo.py:main")


@pytest.fixture
def fresh_pages(monkeypatch):
    """Every scrape makes its page, for a test that scrapes right after each event to see
    it counted (a page is otherwise served again for metrics.REUSE: tested on its own)."""
    monkeypatch.setattr(metrics, "REUSE", 0.0)


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


def test_figures_follow_requests_saves_and_restarts(supervisor, fresh_pages):
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
    assert value(first, "cmactor_ha_role", role="single") == 1 and value(first, "cmactor_ha_role", role="active") == 0
    assert value(first, "cmactor_ha_in_sync") == 1 and value(first, "cmactor_ha_revision") == 0
    assert value(first, "process_open_fds") > 0  # the supervisor process itself
    assert value(first, "cmactor_build_info", version=cmactor.__version__, python=platform.python_version()) == 1
    began = value(first, "cmactor_start_time_seconds")
    assert began == value(scrape(sup), "cmactor_start_time_seconds") and time.time() - 60 < began < time.time()
    for name, entry in sup.status().items():
        worker = psutil.Process(entry["pid"])
        assert value(first, "cmactor_module_start_time_seconds", module=name) == worker.create_time() >= began - 1
        assert 0 <= value(first, "cmactor_module_cpu_seconds_total", module=name) < 60  # clock ticks: 0 at first
    # Counters and start times, not figures "since the previous scrape" or that move every second.
    assert not [key for key in first if key[0].endswith(("_percent", "_uptime_seconds"))]

    with sup.connect() as conn:
        cur = conn.cursor()
        for _ in range(5):
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
    echo_cpu = value(after, "cmactor_module_cpu_seconds_total", module="echo")
    assert value(first, "cmactor_module_cpu_seconds_total", module="echo") <= echo_cpu < 60

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
    assert value(restarted, "cmactor_module_start_time_seconds", module="echo") > value(
        first, "cmactor_module_start_time_seconds", module="echo"
    )
    assert value(restarted, "cmactor_start_time_seconds") == began
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
        with pytest.raises(cmactor.ProgrammingError):
            cur.execute("set echo2.kv", {"key": "a", "value": "1"})
    samples = scrape(sup)
    assert value(samples, "cmactor_requests_total", module="echo", op="get", outcome="ok") == 1
    assert not [key for key in samples if ("module", "nosuch") in key[1]]
    # Counted on their own, as no module's (the sets to echo2, a typo, among them).
    assert value(samples, "cmactor_unknown_module_requests_total") == 2
    assert sup.supervisor_status()["unknown_module_requests"] == 2


def test_the_page_follows_prometheus_conventions(supervisor):
    sup = supervisor({"echo": ECHO}, metrics=ANY_PORT)
    with sup.connect() as conn:
        conn.cursor().execute("get echo.kv", {"key": "default"})
    sup.save()
    with urllib.request.urlopen(sup.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    families = list(text_string_to_metric_families(text))
    names = [family.name for family in families]
    assert len(names) == len(set(names))  # no family twice
    # Every family has its HELP and TYPE lines, once (the parser would merge a repeated one).
    for family in families:
        assert family.documentation, family.name
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert text.count(f"# HELP {exposed} ") == 1 and text.count(f"# TYPE {exposed} ") == 1, exposed
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", family.name), family.name
        if family.type == "counter":  # the parser takes _total off: every counter's samples have it
            assert {sample.name for sample in family.samples} <= {family.name + "_total", family.name + "_created"}
        elif not family.name.startswith("process_"):  # a gauge, or a histogram, is no _total
            assert not family.name.endswith("_total"), family.name
    ours = {family.name: family.type for family in families if family.name.startswith("cmactor_")}
    # An info metric is a gauge of 1 in the text format, named *_info.
    assert ours["cmactor_build_info"] == "gauge" and ours["cmactor_module_cpu_seconds"] == "counter"
    for name, kind in ours.items():
        # A unit where there is one, in its base unit (seconds, bytes): no _ms, _percent or _kb.
        assert not re.search(r"_(ms|milliseconds|percent|kb|mb|kib|mib)(_|$)", name), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
    promtool = shutil.which("promtool")  # Prometheus' own linter, where it is installed
    if promtool is not None:
        checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")


def test_cmactor_run_prints_where_metrics_are_served(tmp_path):
    config = tmp_path / "cmactor.toml"
    config.write_text(f'[supervisor]\nstate_dir = "state"\nmetrics = "{ANY_PORT}"\n[agents.echo]\nentry = "{ECHO}"\n')
    run = Run(config)
    try:
        # The start lines after the summary Run waited for: where clients connect, then this.
        lines = [run.proc.stderr.readline() for _ in range(2)]
        printed = re.fullmatch(r"cmactor: Prometheus metrics at (http://127\.0\.0\.1:\d+/metrics)\n", lines[1])
        assert printed and "CMACTOR_SOCKET=" in lines[0], lines  # the port bound, not 0
        with urllib.request.urlopen(printed[1], timeout=10) as reply:
            assert b"cmactor_up 1.0" in reply.read()
    finally:
        run.stop()


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
    with pytest.raises(ConfigError, match=r"cmactor.toml:2: \[supervisor\].metrics: expected \"host:port\""):
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


# -- the HTTP server: bounded whatever clients do -------------------------------------


def _address(sup):
    host, port = sup.metrics_url.split("//")[1].split("/")[0].rsplit(":", 1)
    return host, int(port)


def _exchange(sup, data):
    """Send ``data`` on a new connection, then read until the server closes it."""
    with socket.create_connection(_address(sup), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _closed(sock):
    """Whether the server closed ``sock`` (reading nothing more from it)."""
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_half_sent_requests_hold_no_thread_and_keep_no_scrape_out(supervisor, monkeypatch):
    monkeypatch.setattr(httpserve, "REQUEST_TIMEOUT", 1.5)
    sup = supervisor({"echo": ECHO}, metrics=ANY_PORT)
    scrape(sup)  # every thread the server will ever have has started
    threads = psutil.Process().num_threads()
    held = []
    try:
        for _ in range(300):
            sock = socket.create_connection(_address(sup), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the empty line that ends it
            sock.setblocking(False)
            held.append(sock)
        assert psutil.Process().num_threads() <= threads + 2  # prometheus_client's server: 300 more
        assert not _closed(held[-1])
        started = time.monotonic()
        assert value(scrape(sup), "cmactor_up") == 1
        assert time.monotonic() - started < 3
        # The oldest were closed to make room (MAX_CONNECTIONS); the others at REQUEST_TIMEOUT.
        wait_for(lambda: all(_closed(sock) for sock in held), timeout=10)
        assert psutil.Process().num_threads() <= threads + 2
    finally:
        for sock in held:
            sock.close()


def test_an_oversized_request_is_refused(supervisor):
    sup = supervisor({"echo": ECHO}, metrics=ANY_PORT)
    big = b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 10_000 + b"\r\n\r\n"
    answer = _exchange(sup, big)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"over 8192 bytes; send a shorter request" in answer
    endless = b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 10_000  # the head never ends
    assert _exchange(sup, endless).startswith(b"HTTP/1.1 431 ")
    assert value(scrape(sup), "cmactor_up") == 1  # and the server serves on


def test_only_get_and_head_of_metrics_are_served(supervisor):
    sup = supervisor({"echo": ECHO}, metrics=ANY_PORT)
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(sup.metrics_url.replace("/metrics", "/other"), timeout=10)
    assert raised.value.code == 404
    assert b"nothing at '/other': this server serves /metrics only" in raised.value.read()
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(urllib.request.Request(sup.metrics_url, data=b"x", method="POST"), timeout=10)
    assert raised.value.code == 405 and raised.value.headers["Allow"] == "GET, HEAD"
    assert _exchange(sup, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 Bad Request\r\n")

    connection = http.client.HTTPConnection(*_address(sup), timeout=10)
    connection.request("HEAD", "/metrics")
    reply = connection.getresponse()
    assert reply.status == 200 and int(reply.headers["Content-Length"]) > 1000
    assert reply.headers["Connection"] == "close" and reply.read() == b""
    connection.close()
    with urllib.request.urlopen(sup.metrics_url + "?name=cmactor_up", timeout=10) as reply:  # a query is no other page
        assert reply.headers["Content-Type"] == metrics.CONTENT_TYPE_LATEST


def test_a_scrape_flood_neither_holds_the_loop_nor_makes_a_page_per_scrape(supervisor, monkeypatch):
    making, made = [], []
    collect = metrics.Figures.collect

    def counted(self):
        making.append(None)
        made.append(len(making))  # how many were being made at once
        try:
            yield from collect(self)
        finally:
            making.pop()

    monkeypatch.setattr(metrics.Figures, "collect", counted)
    sup = supervisor({"echo": ECHO, "other": ECHO}, metrics=ANY_PORT, direct_reads=False)  # gets through the loop
    stop, scrapes = threading.Event(), []

    def flood():
        while not stop.is_set():
            scrape(sup)
            scrapes.append(None)

    flooders = [threading.Thread(target=flood) for _ in range(4)]
    started = time.monotonic()
    for thread in flooders:
        thread.start()
    try:
        wait_for(lambda: len(scrapes) >= 20)
        slowest = 0.0
        with sup.connect() as conn:
            cur = conn.cursor()
            for _ in range(500):
                before = time.monotonic()
                cur.execute("get echo.kv", {"key": "default"})
                slowest = max(slowest, time.monotonic() - before)
    finally:
        stop.set()
        for thread in flooders:
            thread.join()
    elapsed = time.monotonic() - started
    assert slowest < 0.5  # a hang check, not a speed claim
    assert max(made) == 1  # never two makings at once
    assert len(made) <= elapsed / metrics.REUSE + 2  # one per REUSE seconds, not one per scrape


def test_a_page_is_served_again_for_a_while_then_made_anew(supervisor):
    sup = supervisor({"echo": ECHO}, metrics=ANY_PORT, direct_reads=False)
    first = scrape(sup)
    with sup.connect() as conn:
        conn.cursor().execute("get echo.kv", {"key": "default"})
        again = scrape(sup)
    assert value(again, "cmactor_requests_total", module="echo", op="get", outcome="ok") == 0
    assert again == first
    time.sleep(metrics.REUSE)
    assert value(scrape(sup), "cmactor_requests_total", module="echo", op="get", outcome="ok") == 1


def test_status_samples_each_worker_off_the_loop_thread(supervisor, monkeypatch):
    sampled_on = []
    formatted_on = set()
    sample = health.sample
    finish = modules.finish_status

    def recorded(proc):
        sampled_on.append(threading.current_thread().name)
        return sample(proc)

    def finished(entry):
        formatted_on.add(threading.current_thread().name)
        return finish(entry)

    monkeypatch.setattr(health, "sample", recorded)
    monkeypatch.setattr(control, "finish_status", finished)  # the histograms made, figures merged
    sup = supervisor({"echo": ECHO, "other": ECHO, "third": ECHO}, metrics=ANY_PORT)
    with sup.connect() as conn:
        answered = conn.request({"op": "status"})
        one = conn.request({"op": "status", "module": "other"})["status"]
        with pytest.raises(cmactor.ProgrammingError, match="unknown module 'nosuch'; this supervisor runs: echo"):
            conn.request({"op": "status", "module": "nosuch"})
    assert set(one) == {"other"} and one["other"]["rss"] > 1_000_000
    assert answered["supervisor"]["clients"] >= 1
    public = sup.status()
    samples = scrape(sup)
    for status in (answered["status"], public):
        assert set(status) == {"echo", "other", "third"}
        for entry in status.values():
            assert entry["state"] == "READY" and entry["pid"] is not None
            assert entry["rss"] > 1_000_000 and entry["threads"] >= 1 and entry["cpu"] >= 0
            assert entry["cpu_seconds"] >= 0
    for module in ("echo", "other", "third"):
        assert value(samples, "cmactor_module_threads", module=module) >= 1
    assert len(sampled_on) == 3 + 1 + 3 + 3
    assert "cmactor-supervisor" not in sampled_on  # the loop thread
    assert {"cmactor-status", threading.current_thread().name, "cmactor-metrics-page"} == set(sampled_on)
    assert "cmactor-supervisor" not in formatted_on and formatted_on
    sup.stop()
    threads = {thread.name for thread in threading.enumerate()}
    assert not threads & {"cmactor-status", "cmactor-metrics-http", "cmactor-metrics-page"}  # none outlives it


BURN = """
import time
from cmactor import ready
from cmactor.cmbackend import CmAgent, cmbackend_init

class Burn(CmAgent):
    def event_generate_default(self):
        ready()

    def burn_setop(self, ctx):
        end = time.process_time() + float(ctx.params["seconds"])
        while time.process_time() < end:
            pass

def main():
    cmbackend_init(Burn())
"""


def test_status_cpu_is_since_the_worker_started_whoever_asks_and_however_often(supervisor, tmp_path):
    (tmp_path / "burn.py").write_text(BURN)
    sup = supervisor({"burn": str(tmp_path / "burn.py:main")})
    sup.connect().cursor().execute("setop burn.burn", {"seconds": "0.5"})
    first, second = sup.status()["burn"], sup.status()["burn"]
    # A percent "since the previous sample" would read ~0 the second time, the worker idle
    # between the two; this one is the worker's own: CPU seconds over its age.
    assert first["cpu_seconds"] >= 0.4 and first["cpu"] > 1  # psutil counts in clock ticks
    assert abs(second["cpu"] - first["cpu"]) < first["cpu"] / 2
    age = time.time() - first["start_time"]
    assert first["cpu"] == pytest.approx(100 * first["cpu_seconds"] / age, rel=0.2)
