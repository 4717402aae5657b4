"""A cluster of cmactor hosts on a real 3-member etcd: the active commits every write to
etcd, the hot standby follows it, and takes over when the active host dies or pauses,
with nothing acknowledged lost and nothing applied twice.

Each host is a `cmactor run` in a session of its own (its process group killed whole);
the counter agent's setop adds to a count, so a change lost or applied twice shows."""

import json
import os
import re
import signal
import time
import urllib.request

import pytest
from etcd_cluster import etcd_cluster  # noqa: F401
from helpers import agent
from processes import Run, cli

import cmactor
from cmactor.errors import NotActive, OperationalError
from cmsupervisor.ha.etcd import Etcd, prefix_end

COUNTER = agent("counter.py:main")


COUNTER_TABLE = f'[agents.counter]\nentry = "{COUNTER}"\n'


def host_config(tmp_path, name, endpoints, lease_ttl=1, ha="", agents=COUNTER_TABLE):
    """Host ``name``'s cmactor.toml: ``ha``, more lines of its [ha]; ``agents``, its agents' tables."""
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f"""
[supervisor]
state_dir = "state-{name}"
socket = "{name}.sock"
start_timeout = 30
metrics = "127.0.0.1:0"

[ha]
etcd = {json.dumps(endpoints)}
cluster = "test"
node = "{name}"
lease_ttl = {lease_ttl}
{ha}
{agents}
"""
    )
    return path


def ha_state(socket_path):
    """The `ha` answer of the supervisor at ``socket_path``, or None if it does not answer."""
    try:
        with cmactor.connect(socket=str(socket_path), timeout=5) as conn:
            return conn.request({"op": "ha"})["ha"]
    except OperationalError:
        return None


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def scrape(run):
    """The metrics page of the host ``run`` (the second line after its start summary says where), as text."""
    lines = [run.proc.stderr.readline() for _ in range(2)]
    url = re.fullmatch(r"cmactor: Prometheus metrics at (\S+)\n", lines[1])
    assert url, lines
    with urllib.request.urlopen(url[1], timeout=10) as reply:
        return reply.read().decode()


def count(socket_path, name="x"):
    with cmactor.connect(socket=str(socket_path), timeout=10) as conn:
        cur = conn.cursor()
        cur.execute("get counter.ctr", {"name": name})
        return int(cur.fetchone()[1])


def add(conn, name="x"):
    conn.cursor().execute("setop counter.ctr", {"name": name, "by": "1"})


@pytest.fixture
def hosts(tmp_path, etcd_cluster):  # noqa: F811
    """(a, b): the active host a (the cluster's first), and b, its standby, in sync."""
    runs = []
    a = Run(host_config(tmp_path, "a", etcd_cluster.endpoints), cwd=tmp_path)
    runs.append(a)
    wait_for(lambda: (ha_state(tmp_path / "a.sock") or {}).get("role") == "active", 20, "a is active")
    b = Run(host_config(tmp_path, "b", etcd_cluster.endpoints), cwd=tmp_path)
    runs.append(b)
    wait_for(lambda: (ha_state(tmp_path / "b.sock") or {}).get("in_sync"), 20, "b is an in-sync standby")
    yield a, b
    for run in runs:
        if run.proc.poll() is None:
            os.killpg(run.pid, signal.SIGCONT)
            run.stop()


@pytest.mark.timeout(120)
def test_the_standby_follows_refuses_writes_and_takes_over_with_nothing_lost(tmp_path, hosts, etcd_cluster):  # noqa: F811
    a, b = hosts
    sockets = [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")]
    assert ha_state(sockets[1]) == {
        "node": "b",
        "role": "standby",
        "active": "a",
        "in_sync": True,
        "revision": ha_state(sockets[1])["revision"],
    }
    status = cli("status", "--socket", sockets[1])
    assert (
        status.stdout.splitlines()[0]
        == f"node b: standby of a, in sync, etcd revision {ha_state(sockets[1])['revision']}"
    )
    page = scrape(b)
    assert 'cmactor_ha_role{role="standby"} 1.0' in page and 'cmactor_ha_role{role="active"} 0.0' in page
    assert "cmactor_ha_in_sync 1.0" in page
    conn = cmactor.connect(socket=sockets, timeout=10)
    acknowledged = 0
    for _ in range(50):
        add(conn)
        acknowledged += 1
    assert count(sockets[0]) == acknowledged
    wait_for(lambda: count(sockets[1]) == acknowledged, 10, "the standby's hot copy has every change")

    with cmactor.connect(socket=sockets[1], timeout=10) as standby:
        with pytest.raises(NotActive) as refused:
            add(standby)
        assert refused.value.active == "a"
        with pytest.raises(NotActive):
            standby.request({"op": "save"})

    a.kill()
    killed = time.monotonic()
    add(conn)  # the client finds b once it has taken over
    acknowledged += 1
    took_over = time.monotonic() - killed
    assert took_over < 10
    for _ in range(20):
        add(conn)
        acknowledged += 1
    assert count(sockets[1]) == acknowledged
    assert ha_state(sockets[1])["role"] == "active"

    # The dead host, started again with the same command, rejoins as a standby and catches up.
    again = Run(host_config(tmp_path, "a", etcd_cluster.endpoints), cwd=tmp_path)
    try:
        wait_for(lambda: (ha_state(sockets[0]) or {}).get("in_sync"), 30, "a is an in-sync standby again")
        assert ha_state(sockets[0])["role"] == "standby"
        assert count(sockets[0]) == acknowledged
        exports = [cli("export", "--socket", path).stdout for path in sockets]
        assert exports[0] == exports[1] and "count=71" in exports[0]
    finally:
        conn.close()
        again.stop()


@pytest.mark.timeout(120)
def test_a_save_replaces_the_records_in_etcd_and_a_new_node_joins_from_the_base(tmp_path, hosts, etcd_cluster):  # noqa: F811
    sockets = [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")]
    with cmactor.connect(socket=sockets, timeout=10) as conn:
        for _ in range(30):
            add(conn)
        conn.request({"op": "save"})
        for _ in range(5):
            add(conn, "y")
    prefix = b"/cmactor/test/j/counter/"
    etcd = Etcd(etcd_cluster.endpoints)
    records = etcd.range(prefix, prefix_end(prefix)).kvs
    etcd.close()
    assert len(records) == 5  # the 30 before the save are in the base now
    c = Run(host_config(tmp_path, "c", etcd_cluster.endpoints), cwd=tmp_path)
    try:
        wait_for(lambda: (ha_state(tmp_path / "c.sock") or {}).get("in_sync"), 30, "c is an in-sync standby")
        assert count(tmp_path / "c.sock") == 30 and count(tmp_path / "c.sock", "y") == 5
    finally:
        c.stop()


@pytest.mark.timeout(120)
def test_a_paused_active_acknowledges_nothing_once_another_took_over(tmp_path, hosts):
    a, b = hosts
    sockets = [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")]
    with cmactor.connect(socket=sockets, timeout=5) as conn:
        for _ in range(5):
            add(conn)
        os.killpg(a.pid, signal.SIGSTOP)
        wait_for(lambda: (ha_state(sockets[1]) or {}).get("role") == "active", 15, "b took over")
        for _ in range(5):
            add(conn)  # the first waits out its timeout on the paused a, then goes to b
    os.killpg(a.pid, signal.SIGCONT)
    # Resumed, a answers what it read while paused and what comes now, and acknowledges none of it.
    with pytest.raises((NotActive, OperationalError)):
        with cmactor.connect(socket=sockets[0], timeout=10) as old:
            add(old)
    wait_for(lambda: (ha_state(sockets[0]) or {}).get("in_sync"), 30, "a rejoined as an in-sync standby")
    assert ha_state(sockets[0])["role"] == "standby"
    assert count(sockets[0]) == count(sockets[1]) == 10


@pytest.mark.timeout(120)
def test_a_module_failed_on_the_active_hands_the_lead_to_the_in_sync_standby(tmp_path, etcd_cluster):  # noqa: F811
    crash = tmp_path / "crash-a"  # while it exists, a's counter crashes at each start
    a = Run(
        host_config(
            tmp_path,
            "a",
            etcd_cluster.endpoints,
            ha="handover_hold = 0",
            agents=COUNTER_TABLE + f'max_restarts = 1\nrestart_delay = 0.01\nenv = {{COUNTER_CRASH_FILE = "{crash}"}}',
        ),
        cwd=tmp_path,
    )
    b = None
    sockets = [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")]
    try:
        wait_for(lambda: (ha_state(sockets[0]) or {}).get("role") == "active", 20, "a is active")
        b = Run(host_config(tmp_path, "b", etcd_cluster.endpoints), cwd=tmp_path)
        wait_for(lambda: (ha_state(sockets[1]) or {}).get("in_sync"), 20, "b is an in-sync standby")
        with cmactor.connect(socket=sockets, timeout=10) as conn:
            for _ in range(5):
                add(conn)
            crash.touch()
            worker = json.loads(cli("status", "--format", "json", "--socket", sockets[0]).stdout)["counter"]["pid"]
            os.kill(worker, signal.SIGKILL)
            wait_for(lambda: (ha_state(sockets[1]) or {}).get("role") == "active", 30, "b took over")
            add(conn)
        assert count(sockets[1]) == 6
        # a joined again as a standby; its counter, started afresh, crashed again: not in sync.
        wait_for(lambda: (ha_state(sockets[0]) or {}).get("active") == "b", 30, "a follows b")
        assert ha_state(sockets[0]) == {
            "node": "a",
            "role": "standby",
            "active": "b",
            "in_sync": False,
            "revision": ha_state(sockets[0])["revision"],
        }
        crash.unlink()  # the operator mends the host, and restarts the module
        assert cli("restart", "counter", "--socket", sockets[0]).returncode == 0
        wait_for(lambda: (ha_state(sockets[0]) or {}).get("in_sync"), 30, "a is an in-sync standby")
        assert count(sockets[0]) == 6
    finally:
        for run in (a, b):
            if run is not None:
                run.stop()


@pytest.mark.timeout(120)
def test_a_node_whose_config_broke_keeps_trying_to_join_until_it_is_mended(tmp_path, hosts):
    a, b = hosts
    sockets = [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")]
    config = tmp_path / "a.toml"
    good = config.read_text()
    config.write_text(good + "\n[supervisor\n")  # an edit under way: not TOML
    os.killpg(a.pid, signal.SIGSTOP)  # a loses its term, and must join again from its config
    try:
        wait_for(lambda: (ha_state(sockets[1]) or {}).get("role") == "active", 15, "b took over")
    finally:
        os.killpg(a.pid, signal.SIGCONT)
    time.sleep(3)  # a tries, and fails, to join again
    assert a.proc.poll() is None and ha_state(sockets[0]) is None
    config.write_text(good)
    wait_for(lambda: (ha_state(sockets[0]) or {}).get("in_sync"), 30, "a, mended, is an in-sync standby")
    with cmactor.connect(socket=sockets, timeout=10) as conn:
        add(conn)
    assert count(sockets[0]) == count(sockets[1]) == 1
