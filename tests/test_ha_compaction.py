"""How the active of a cluster keeps etcd within etcd's own limits when it replaces records
by a base (supervisor/ha/replica.py `_rebase`, supervisor/ha/commit.py), on a real 3-member
etcd started with the same limits as the hosts' [ha] max_request_bytes and max_txn_ops (so
a request past them is refused by etcd, and the active loses its term, not merely unseen):

- a save of a module several times larger than max_request_bytes: its base is split into
  chunks, the records it covers are deleted, a new node joins from it with the same config,
  and a later, smaller save leaves no chunk of the older generation behind;
- many writes in flight from several clients with the smallest max_txn_ops: each batch
  within it, every acknowledged write on the active, the standby and a new node, once;
- a journal compaction on the active (an agent's journal_max_records): a base in etcd,
  fewer records, exact counts on the standby and on a new node, and a takeover from it;
- what must not reach etcd past its limit: a write whose record alone would not fit is
  refused by the active, which keeps its term; a base's key stays within a request
  whatever the tokens (up to MAX_TOKEN long) of the records it replaces.

Each host is a `cmactor run` in a session of its own, as in test_ha.py."""

import collections
import contextlib
import threading
import time

import pytest
from helpers import agent
from processes import Run, cli
from test_ha import add, count, ha_state, host_config, wait_for

import cmactor
from cmactor.errors import DataError
from cmactor.wire.validate import MAX_TOKEN
from cmsupervisor.ha import keys as K
from cmsupervisor.ha.etcd import Etcd, EtcdError, Op, prefix_end
from cmsupervisor.ha.localetcd import ETCD, INSTALL_HINT, EtcdCluster

COUNTER = agent("counter.py:main")
BULKY = agent("bulky.py:main")
SMALLEST_REQUEST = 64 * 1024  # the least [ha] max_request_bytes allows (supervisor/config.py)
SMALLEST_TXN = 8  # the least [ha] max_txn_ops allows
PREFIX = b"/cmactor/test/"


class LimitedEtcd(EtcdCluster):
    """A local etcd cluster whose --max-request-bytes and --max-txn-ops are given."""

    def __init__(self, base_dir, max_request_bytes, max_txn_ops):
        super().__init__(base_dir)
        self.limits = [f"--max-request-bytes={max_request_bytes}", f"--max-txn-ops={max_txn_ops}"]

    def _command(self, index, state):
        return super()._command(index, state) + self.limits


class Hosts:
    """The `cmactor run` hosts of cluster "test", each started with the same [ha] limits and agents."""

    def __init__(self, tmp_path, etcd, ha, agents):
        self.tmp_path = tmp_path
        self.etcd = etcd
        self.ha = ha
        self.agents = agents
        self.runs = {}

    def config(self, name):
        return host_config(self.tmp_path, name, self.etcd.endpoints, lease_ttl=2, ha=self.ha, agents=self.agents)

    def socket(self, name):
        return str(self.tmp_path / f"{name}.sock")

    def start(self, name, role):
        """Start host ``name``; return once it is the active (``role`` "active") or an in-sync standby."""
        self.runs[name] = run = Run(self.config(name), cwd=self.tmp_path)
        if role == "active":
            wait_for(lambda: (ha_state(self.socket(name)) or {}).get("role") == "active", 20, f"{name} is active")
        else:
            wait_for(lambda: (ha_state(self.socket(name)) or {}).get("in_sync"), 30, f"{name} is an in-sync standby")
            assert ha_state(self.socket(name))["role"] == "standby"
        return run

    def stop(self):
        for run in self.runs.values():
            if run.proc.poll() is None:
                run.stop()


@pytest.fixture
def cluster(tmp_path):
    """Factory: cluster(max_request_bytes, max_txn_ops, agents) -> Hosts, with etcd started with
    those limits, host "a" the active and "b" an in-sync standby; all stopped at teardown."""
    if ETCD is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    started = []

    def make(max_request_bytes, max_txn_ops, agents):
        etcd = LimitedEtcd(tmp_path / "etcd", max_request_bytes, max_txn_ops)
        etcd.start()
        ha = f"max_request_bytes = {max_request_bytes}\nmax_txn_ops = {max_txn_ops}"
        hosts = Hosts(tmp_path, etcd, ha, agents)
        started.append(hosts)
        hosts.start("a", "active")
        hosts.start("b", "standby")
        return hosts

    yield make
    for hosts in started:
        try:
            hosts.stop()
        finally:
            hosts.etcd.stop()


@contextlib.contextmanager
def etcd_client(endpoints):
    etcd = Etcd(endpoints)
    try:
        yield etcd
    finally:
        etcd.close()


def kvs_under(endpoints, prefix):
    """Every key of etcd under ``prefix``, at one revision: [KV]."""
    with etcd_client(endpoints) as etcd:
        return etcd.range_all(prefix, prefix_end(prefix))[0]


def keys_under(endpoints, prefix):
    """{key: value} of every key of etcd under ``prefix``, at one revision."""
    return {kv.key: kv.value for kv in kvs_under(endpoints, prefix)}


def exported(socket_path):
    done = cli("export", "--socket", socket_path)
    assert done.returncode == 0, done.stderr
    return done.stdout


def fill(conn, rows, size, tag):
    conn.cursor().execute("setop bulky.blob", {"rows": str(rows), "size": str(size), "tag": tag})


def base_of(endpoints, module):
    """(generation, chunk count) of ``module``'s base in etcd, and its chunk keys: {key: value}."""
    found = keys_under(endpoints, PREFIX)
    generation, chunks, _tokens = K.decode_base(found[PREFIX + b"base/" + module.encode()])
    chunk_prefix = PREFIX + b"chunk/" + module.encode() + b"/"
    return (generation, chunks), {k: v for k, v in found.items() if k.startswith(chunk_prefix)}


def records_of(endpoints, module):
    return keys_under(endpoints, PREFIX + b"j/" + module.encode() + b"/")


@pytest.mark.timeout(120)
def test_a_save_larger_than_a_request_is_split_into_chunks_a_new_node_joins_from(cluster):
    limit = SMALLEST_REQUEST
    hosts = cluster(limit, 128, f'[agents.bulky]\nentry = "{BULKY}"\n')
    endpoints = hosts.etcd.endpoints
    with etcd_client(endpoints) as etcd, pytest.raises(EtcdError, match="too large"):  # etcd enforces the limit
        etcd.put(PREFIX + b"probe", b"x" * limit)
    active = hosts.socket("a")
    before = ha_state(active)["revision"]
    with cmactor.connect(socket=[active, hosts.socket("b")], timeout=10) as conn:
        fill(conn, rows=80, size=4000, tag="big")  # about 330 KB of config: 5 times the request limit
        assert len(records_of(endpoints, "bulky")) == 1
        saved = conn.request({"op": "save"})["saved"]
        assert saved["rows"] == 80

    (generation, chunks), chunk_keys = base_of(endpoints, "bulky")
    assert chunks > 1 and chunks == len(chunk_keys)
    assert sorted(chunk_keys) == [K.Keys("test").chunk("bulky", generation.encode(), n) for n in range(chunks)]
    assert all(len(value) <= limit // 2 for value in chunk_keys.values())
    assert sum(len(value) for value in chunk_keys.values()) > 4 * limit
    assert records_of(endpoints, "bulky") == {}  # the fill is in the base now

    big = exported(active)
    assert big.count("set bulky.blob") == 80
    wait_for(lambda: ha_state(hosts.socket("b"))["in_sync"], 10, "b applied the fill")
    assert exported(hosts.socket("b")) == big
    hosts.start("c", "standby")  # joins from the base's chunks
    assert exported(hosts.socket("c")) == big

    # A smaller save: one chunk of a newer generation, no chunk of the older one left.
    with cmactor.connect(socket=[active, hosts.socket("b")], timeout=10) as conn:
        fill(conn, rows=3, size=100, tag="small")
        conn.request({"op": "save"})
    (newer, chunks), chunk_keys = base_of(endpoints, "bulky")
    assert newer > generation
    assert chunks == 1 and list(chunk_keys) == [K.Keys("test").chunk("bulky", newer.encode(), 0)]
    assert records_of(endpoints, "bulky") == {}
    small = exported(active)
    assert small.count("set bulky.blob") == 3
    hosts.start("d", "standby")
    assert exported(hosts.socket("d")) == small
    for name in ("b", "c"):
        wait_for(lambda name=name: exported(hosts.socket(name)) == small, 10, f"{name} has the smaller config")
    # Every request was within etcd's limit: the active never lost its term.
    assert ha_state(active)["role"] == "active" and ha_state(active)["revision"] > before


@pytest.mark.timeout(120)
def test_many_writes_in_flight_are_committed_within_the_smallest_max_txn_ops(cluster):
    hosts = cluster(1572864, SMALLEST_TXN, f'[agents.counter]\nentry = "{COUNTER}"\n')
    endpoints = hosts.etcd.endpoints
    with etcd_client(endpoints) as etcd, pytest.raises(EtcdError, match="too many operations"):  # etcd enforces it
        etcd.txn([], [Op.put(PREFIX + b"probe/%d" % n, b"") for n in range(SMALLEST_TXN + 1)])
    sockets = [hosts.socket("a"), hosts.socket("b")]
    clients, each = 16, 25  # twice max_txn_ops in flight: the committer has more than a transaction takes
    acknowledged = []
    failures = []

    def client():
        try:
            with cmactor.connect(socket=sockets, timeout=10) as conn:
                for _ in range(each):
                    add(conn)
                    acknowledged.append(1)
        except Exception as exc:  # told by the assert below
            failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    total = clients * each
    assert len(acknowledged) == total
    assert ha_state(sockets[0])["role"] == "active"  # no commit was refused by etcd
    # The records committed in one transaction share its revision: batches, none past the limit.
    records = kvs_under(endpoints, PREFIX + b"j/counter/")
    assert len(records) == total
    batches = collections.Counter(kv.mod_revision for kv in records)
    assert max(batches.values()) == SMALLEST_TXN
    assert count(sockets[0]) == total
    wait_for(lambda: count(sockets[1]) == total, 10, "the standby has every change")
    hosts.start("c", "standby")
    assert count(hosts.socket("c")) == total


@pytest.mark.timeout(120)
def test_a_journal_compaction_on_the_active_replaces_records_by_a_base_and_a_standby_takes_over(cluster):
    agents = f'[agents.counter]\nentry = "{COUNTER}"\njournal_max_records = 20\n'
    hosts = cluster(1572864, 128, agents)
    sockets = [hosts.socket("a"), hosts.socket("b")]
    endpoints = hosts.etcd.endpoints
    with cmactor.connect(socket=sockets, timeout=10) as conn:
        for _ in range(100):
            add(conn)
    assert count(sockets[0]) == 100
    # The compaction runs beside the writes; its base goes to etcd soon after.
    wait_for(lambda: PREFIX + b"base/counter" in keys_under(endpoints, PREFIX), 10, "a base of counter in etcd")
    wait_for(lambda: len(records_of(endpoints, "counter")) < 100, 10, "the compaction dropped covered records")
    # (A later compaction's chunk may be there already: written before its base, read through it only.)
    (generation, chunks), chunk_keys = base_of(endpoints, "counter")
    assert chunks == 1 and K.Keys("test").chunk("counter", generation.encode(), 0) in chunk_keys
    wait_for(lambda: count(sockets[1]) == 100, 10, "the standby has every change")
    hosts.start("c", "standby")  # joins from the base and the records after it
    assert count(hosts.socket("c")) == 100

    # b or c, both in sync, takes over from the active killed, with every change it had.
    hosts.runs["a"].kill()
    rest = [sockets[1], hosts.socket("c")]
    with cmactor.connect(socket=rest, timeout=10) as conn:
        for _ in range(10):
            add(conn)  # the first finds the new active once it has taken over
    roles = sorted(ha_state(path)["role"] for path in rest)
    assert roles == ["active", "standby"]
    for path in rest:
        wait_for(lambda path=path: count(path) == 110, 10, f"{path} has every change")


@pytest.mark.timeout(120)
def test_a_write_larger_than_an_etcd_request_is_refused_without_ending_the_term(cluster):
    limit = SMALLEST_REQUEST
    hosts = cluster(limit, 128, f'[agents.counter]\nentry = "{COUNTER}"\n')
    sockets = [hosts.socket("a"), hosts.socket("b")]
    with cmactor.connect(socket=sockets, timeout=10, failover_timeout=5) as conn:
        add(conn)
        started = time.monotonic()
        with pytest.raises(DataError, match=r"setop counter\.ctr refused: .*raise etcd's --max-request-bytes"):
            add(conn, "n" * limit)  # its record cannot go to etcd in one request
        took = time.monotonic() - started
    # Refused by the active, which keeps its term: not sent to each node found active in turn
    # for failover_timeout, each losing its term over it.
    assert took < 3
    assert ha_state(sockets[0])["role"] == "active"
    with cmactor.connect(socket=sockets, timeout=10) as conn:
        add(conn)
    assert count(sockets[0]) == 2 and count(sockets[0], "n" * limit) == 0
    wait_for(lambda: count(sockets[1]) == 2, 10, "the standby has every change")


@pytest.mark.timeout(120)
def test_a_base_stays_within_the_request_limit_whatever_the_tokens_of_the_records_it_replaces(cluster):
    hosts = cluster(SMALLEST_REQUEST, 128, f'[agents.counter]\nentry = "{COUNTER}"\n')
    sockets = [hosts.socket("a"), hosts.socket("b")]
    clients, each = 8, 130  # more writes than the 1024 tokens a base keeps, each token as long as allowed
    failures = []

    def client(number):
        try:
            with cmactor.connect(socket=sockets, timeout=10) as conn:
                for n in range(each):
                    token = f"{number}-{n}-".ljust(MAX_TOKEN, "t")
                    conn.request(
                        {"op": "setop", "module": "counter", "table": "ctr", "params": {"name": "x"}, "token": token}
                    )
        except Exception as exc:  # told by the assert below
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    with cmactor.connect(socket=sockets, timeout=10, failover_timeout=5) as conn:
        conn.request({"op": "save"})
    assert ha_state(sockets[0])["role"] == "active"
    assert records_of(hosts.etcd.endpoints, "counter") == {}
    hosts.start("c", "standby")
    assert count(hosts.socket("c")) == clients * each
