"""RESTCONF (RFC 8040) against the Cursor: a GET of one entry and a PATCH of one entry,
and the get and set they become, measured in one run.

    python -m perf.restconf [--quick] [--format table|json]

One ``cmactor run CONFIG`` (perf/agents/bench.py as module ``bench``, whose table ``kv``
declares its columns) and, beside it, ``cmactor restconf -c CONFIG`` twice: plain HTTP
on 127.0.0.1 and HTTPS (its self-signed certificate), each a process of its own in a
session of its own, as an operator runs them. Every client is in this process, one
request at a time:

- the Cursor's ``get bench.kv key=k`` (a direct read: [supervisor] direct_reads is on by
  default, for the RESTCONF server's Cursor too) and ``set bench.kv key=k value=v``
  (client -> supervisor -> worker), the baselines;
- ``GET /restconf/data/cmactor-bench:bench/kv=k`` and ``PATCH`` of the same entry with
  ``{"cmactor-bench:kv": [{"value": "v"}]}``, on one keep-alive http.client connection,
  over HTTP, and the GET over HTTPS too.

A RESTCONF request is the client's HTTP request, the server's parse, the same get or
set through the server's own Cursor (client -> supervisor -> worker), and JSON both
ways: the ratio (rate over the Cursor's, rounds interleaved: perf._measure) is what
that costs. Every process is stopped on any exit, Ctrl-C too.
"""

import argparse
import contextlib
import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from array import array

import psutil

import cmactor
from cmactor.errors import OperationalError

from . import Step, _measure, print_progress, report, scenarios
from .baseline import pc, percentile
from .ha import sweep

QUICK = {"rounds": 3, "sequential": dict(n=300, warmup=100)}
FULL = {"rounds": 7, "sequential": dict(n=3000, warmup=300)}

ENTRY = "/restconf/data/cmactor-bench:bench/kv=k"
MEDIA = "application/yang-data+json"
PATCH_BODY = json.dumps({"cmactor-bench:kv": [{"value": "v"}]}).encode()
# Seconds the supervisor, or a RESTCONF server, may take to serve after its start.
START_WAIT = 60


class Process:
    """A ``cmactor`` command in a session of its own (its process group killed whole);
    what it writes goes to ``log``, read when it fails."""

    def __init__(self, args, log):
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cmsupervisor", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )

    def text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def failed(self, what):
        tail = "".join(self.text().splitlines(keepends=True)[-20:])
        why = "it exited" if self.proc.poll() is not None else f"not within {START_WAIT} s"
        return RuntimeError(f"{what}: {why}; the end of {self.log}:\n{tail}")

    def close(self):
        """SIGTERM, then SIGKILL of the group if it lingers; its children are waited for."""
        if self.proc.poll() is None:
            try:
                family = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                family = []
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            _, alive = psutil.wait_procs(family, timeout=10)
            for proc in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        self.proc.wait()


def write_configs(directory):
    """(the supervisor's config, the plain RESTCONF server's, the HTTPS one's): the same
    [supervisor] (socket, state_dir); only the servers' have a [restconf] table."""
    socket = os.path.join(directory, "cmactor.sock")
    common = [
        "[supervisor]",
        f"state_dir = {json.dumps(os.path.join(directory, 'state'))}",
        f"socket = {json.dumps(socket)}",
        "start_timeout = 60",
        "",
        "[agents.bench]",
        f"entry = {json.dumps(scenarios.AGENT)}",
        "",
    ]
    paths = []
    for name, restconf in (
        ("supervisor", []),
        ("http", ["[restconf]", 'listen = "127.0.0.1:0"', "tls = false"]),
        ("https", ["[restconf]", 'listen = "127.0.0.1:0"', "tls = true"]),
    ):
        path = os.path.join(directory, f"{name}.toml")
        with open(path, "w") as f:
            f.write("\n".join(common + restconf) + "\n")
        paths.append(path)
    return socket, paths


def start_supervisor(config, socket, directory):
    sup = Process(["run", config], os.path.join(directory, "supervisor.log"))
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline and sup.proc.poll() is None:
        try:
            with cmactor.connect(socket=socket, timeout=5) as conn:
                bench = conn.request({"op": "status"})["status"].get("bench") or {}
                # Serving, and serving direct reads: every Cursor opened from now on reads from the worker.
                if bench.get("state") == "READY" and (bench.get("direct") or {}).get("serving"):
                    return sup
        except OperationalError:
            pass
        time.sleep(0.05)
    raise sup.failed("the supervisor is not serving bench.kv with direct reads")


def start_restconf(config, directory, name):
    """A ``cmactor restconf -c config``: (its Process, its URL) once it serves."""
    server = Process(["restconf", "-c", config], os.path.join(directory, f"{name}.log"))
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline and server.proc.poll() is None:
        found = re.search(r"serving (https?://\S+)/restconf", server.text())
        if found:
            return server, found[1]
        time.sleep(0.05)
    raise server.failed(f"cmactor restconf ({name}) is not serving")


def connection(url, cafile=None):
    """A keep-alive http.client connection to ``url``'s host (HTTPS: trusting ``cafile``)."""
    match = re.fullmatch(r"(https?)://([^:/]+):(\d+)", url)
    scheme, host, port = match[1], match[2], int(match[3])
    if scheme == "http":
        return http.client.HTTPConnection(host, port, timeout=30)
    context = ssl.create_default_context(cafile=cafile)
    context.check_hostname = False  # a self-signed certificate for this host; trusted as the file given
    return http.client.HTTPSConnection(host, port, timeout=30, context=context)


def exchange(conn, method, expected, body=None):
    headers = {"Accept": MEDIA}
    if body is not None:
        headers["Content-Type"] = MEDIA
    conn.request(method, ENTRY, body=body, headers=headers)
    answer = conn.getresponse()
    data = answer.read()
    if answer.status != expected or answer.will_close:
        raise RuntimeError(f"{method} {ENTRY}: {answer.status} {data[:300]!r} (expected {expected}, kept alive)")
    return data


@contextlib.contextmanager
def restconf_rounds(url, method, n, warmup, cafile=None):
    """Rounds of ``n`` back-to-back requests (GET: answered 200 with the entry; PATCH: 204)
    on one keep-alive connection."""
    body, expected = (PATCH_BODY, 204) if method == "PATCH" else (None, 200)
    conn = connection(url, cafile)
    try:
        for _ in range(warmup):
            exchange(conn, method, expected, body)
        if method == "GET":
            got = json.loads(exchange(conn, "GET", 200))
            if got != {"cmactor-bench:kv": [{"key": "k", "value": "v"}]}:
                raise RuntimeError(f"GET {ENTRY} answered {got}")

        def round_():
            latencies = array("q", bytes(8 * n))
            start = prev = pc()
            for i in range(n):
                exchange(conn, method, expected, body)
                now = pc()
                latencies[i] = now - prev
                prev = now
            return n * 1e9 / (prev - start), percentile(latencies, 50), percentile(latencies, 99)

        yield round_
    finally:
        conn.close()


@contextlib.contextmanager
def cursor_rounds(socket, operation, params, n, warmup):
    with cmactor.connect(socket=socket, timeout=30) as conn:
        with scenarios.sequential(conn.cursor(), operation, params, n, warmup) as round_:
            yield round_


def steps(sizes, socket, http_url, https_url, cafile):
    seq = sizes["sequential"]
    return [
        Step(
            "cursor_get",
            "get via Cursor, sequential",
            "ops/s",
            None,
            lambda: cursor_rounds(socket, "get bench.kv", {"key": "k"}, **seq),
            "get bench.kv key=k from this process: a direct read from the worker's own socket "
            "(direct_reads, on by default); the RESTCONF server's Cursor reads the same way",
        ),
        Step(
            "restconf_get",
            "GET one entry via RESTCONF, HTTP keep-alive",
            "ops/s",
            "cursor_get",
            lambda: restconf_rounds(http_url, "GET", **seq),
            f"GET {ENTRY} on one http.client connection: the server's own Cursor makes the same get; "
            "ratio: RESTCONF / Cursor",
        ),
        Step(
            "restconf_get_tls",
            "GET one entry via RESTCONF, HTTPS keep-alive",
            "ops/s",
            "cursor_get",
            lambda: restconf_rounds(https_url, "GET", cafile=cafile, **seq),
            "the same over TLS (handshake once: the connection is kept); ratio: RESTCONF / Cursor",
        ),
        Step(
            "cursor_set",
            "set via Cursor, sequential",
            "ops/s",
            None,
            lambda: cursor_rounds(socket, "set bench.kv", {"key": "k", "value": "v"}, **seq),
            "set bench.kv key=k value=v (kv is not persistent: no journal)",
        ),
        Step(
            "restconf_patch",
            "PATCH one entry via RESTCONF, HTTP keep-alive",
            "ops/s",
            "cursor_set",
            lambda: restconf_rounds(http_url, "PATCH", **seq),
            f"PATCH {ENTRY} {PATCH_BODY.decode()}: 204, the same set; ratio: RESTCONF / Cursor",
        ),
    ]


def run(quick=False, progress=None):
    """Every row (perf.run()'s shape)."""
    sizes = QUICK if quick else FULL
    say = progress or (lambda line: None)
    with tempfile.TemporaryDirectory(prefix="cmactor-restconf-") as directory, contextlib.ExitStack() as stack:
        stack.callback(sweep, directory)
        socket, (sup_config, http_config, https_config) = write_configs(directory)
        say("starting a supervisor")
        sup = start_supervisor(sup_config, socket, directory)
        stack.callback(sup.close)
        say("starting cmactor restconf: HTTP, then HTTPS")
        http_server, http_url = start_restconf(http_config, directory, "http")
        stack.callback(http_server.close)
        https_server, https_url = start_restconf(https_config, directory, "https")
        stack.callback(https_server.close)
        cafile = os.path.join(directory, "state", "restconf", "restconf-cert.pem")
        return _measure(steps(sizes, socket, http_url, https_url, cafile), sizes["rounds"], say)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m perf.restconf",
        description="RESTCONF against the Cursor: a GET and a PATCH of one entry, and their get and set.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a few seconds")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    args = parser.parse_args(argv)
    return report(
        lambda: run(quick=args.quick, progress=print_progress),
        args.quick,
        args.format,
        "perf.restconf: interrupted; every process it started was stopped",
    )


if __name__ == "__main__":
    sys.exit(main())
