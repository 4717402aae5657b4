"""The etcd client (cmsupervisor.ha.etcd) against a real 3-member etcd cluster."""

import json
import os
import signal
import threading
import time
import urllib.request

import pytest
from etcd_cluster import etcd_cluster  # noqa: F401

from cmsupervisor.ha.etcd import (
    KV,
    Compare,
    Etcd,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    Event,
    Op,
    prefix_end,
)


@pytest.fixture
def client(etcd_cluster):  # noqa: F811
    etcd = Etcd(etcd_cluster.endpoints)
    yield etcd
    etcd.close()


def test_prefix_end():
    assert prefix_end(b"a/") == b"a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"
    assert prefix_end(b"") == b"\0"


def test_bad_endpoints():
    for bad in ["localhost", "localhost:", "localhost:http", "https://localhost:2379", "h:2379/v3", ":2379", "h:99999"]:
        with pytest.raises(ValueError, match="bad etcd endpoint"):
            Etcd(["127.0.0.1:2379", bad])
    with pytest.raises(ValueError, match="list"):
        Etcd("127.0.0.1:2379")
    with pytest.raises(ValueError, match="none"):
        Etcd([])
    assert Etcd(["http://127.0.0.1:2379/", "[::1]:2379"]).endpoints == ["127.0.0.1:2379", "[::1]:2379"]


def test_put_range_delete(client):
    first = client.put(b"a/2", b"two")
    assert client.put(b"a/1", b"\x00\xffone") == first + 1
    client.put(b"a0", b"past the prefix")
    one = client.range(b"a/1")
    assert one.kvs == [KV(b"a/1", b"\x00\xffone", first + 1, first + 1, 1, 0)]
    assert (one.count, one.more, one.revision) == (1, False, first + 2)
    assert client.range(b"missing").kvs == []
    prefixed = client.range(b"a/", prefix_end(b"a/"))
    assert [kv.key for kv in prefixed.kvs] == [b"a/1", b"a/2"]  # sorted by key
    assert [kv.key for kv in client.range(b"", prefix_end(b"")).kvs] == [b"a/1", b"a/2", b"a0"]
    limited = client.range(b"a", b"\0", limit=1)
    assert (len(limited.kvs), limited.more, limited.count) == (1, True, 3)
    # A serializable read answers the local member's copy; at the revision just read it is complete.
    assert client.range(b"a/2", serializable=True).kvs[0].value == b"two"
    assert client.range(b"a/2", revision=first).kvs[0].version == 1
    client.put(b"a/2", b"2")
    assert client.range(b"a/2").kvs[0].version == 2
    assert client.range(b"a/2", revision=first).kvs[0].value == b"two"  # an older revision

    assert client.delete(b"a/2") == 1
    assert client.delete(b"a/2") == 0
    assert client.delete(b"a/", prefix_end(b"a/")) == 1
    assert [kv.key for kv in client.range(b"", b"\0").kvs] == [b"a0"]


def test_range_all_pages_at_one_revision(client, etcd_cluster, monkeypatch):  # noqa: F811
    for i in range(25):
        client.put(b"p/%02d" % i, b"v%d" % i)
    before = client.range(b"p/", prefix_end(b"p/")).revision
    other = Etcd(etcd_cluster.endpoints)
    pages = []
    read_page = client.range

    def read_then_write(*args, **kwargs):
        # Changes between the pages must not show: every page reads the first one's revision.
        result = read_page(*args, **kwargs)
        if not pages:
            other.put(b"p/00", b"changed")
            other.put(b"p/99", b"added")
            other.delete(b"p/13")
        pages.append(result)
        return result

    monkeypatch.setattr(client, "range", read_then_write)
    kvs, revision = client.range_all(b"p/", prefix_end(b"p/"), page=10)
    assert len(pages) == 3
    assert revision == before
    assert [(kv.key, kv.value) for kv in kvs] == [(b"p/%02d" % i, b"v%d" % i) for i in range(25)]
    other.close()
    monkeypatch.undo()

    now, revision = client.range_all(b"p/", prefix_end(b"p/"), page=7)
    assert revision == before + 3
    assert len(now) == 25 and now[0].value == b"changed" and now[-1].key == b"p/99"
    assert client.range_all(b"p/", prefix_end(b"p/"), revision=before)[0] == kvs
    assert client.range_all(b"nothing/", prefix_end(b"nothing/")) == ([], revision)


def test_txn(client):
    create = [Compare.create_revision(b"leader", "=", 0)]
    won = client.txn(create, [Op.put(b"leader", b"me"), Op.get(b"leader")], [Op.get(b"leader")])
    assert won.succeeded
    assert won.responses[0] is None
    assert [(kv.key, kv.value) for kv in won.responses[1]] == [(b"leader", b"me")]
    created = won.responses[1][0].create_revision
    assert created == won.revision

    lost = client.txn(create, [Op.put(b"leader", b"other")], [Op.get(b"leader"), Op.get(b"nobody")])
    assert not lost.succeeded
    assert lost.revision == won.revision  # nothing written
    assert lost.responses[0][0].value == b"me" and lost.responses[1] == []

    # A fenced write: it holds only while the leader key is the one we created.
    fenced = [Compare.create_revision(b"leader", "=", created), Compare.value(b"leader", "=", b"me")]
    ok = client.txn(fenced, [Op.put(b"journal/1", b"x"), Op.delete(b"journal/0")])
    assert ok.succeeded and ok.responses == [None, None] and ok.revision == won.revision + 1
    assert client.txn([Compare.mod_revision(b"journal/1", ">", ok.revision)], [Op.put(b"no", b"")]).succeeded is False
    assert client.txn([Compare.version(b"journal/1", "!=", 0)], []).succeeded
    assert client.txn([Compare.version(b"journal/1", "<", 1)], [], [Op.delete(b"journal/", prefix_end(b"journal/"))])
    assert client.range(b"journal/1").kvs == []
    with pytest.raises(ValueError, match="compare operator"):
        Compare.value(b"k", "==", b"")


def test_leases(client):
    lease, ttl = client.lease_grant(5)
    assert lease > 0 and ttl == 5
    client.put(b"held", b"", lease=lease)
    assert client.range(b"held").kvs[0].lease == lease
    assert client.lease_keepalive(lease) == 5
    txn = client.txn([], [Op.put(b"held too", b"", lease=lease)])
    assert client.range(b"held too").kvs[0].lease == lease and txn.succeeded
    client.lease_revoke(lease)
    assert client.range(b"held", prefix_end(b"held")).kvs == []
    assert client.lease_keepalive(lease) == 0
    client.lease_revoke(lease)  # gone already: not an error

    short, ttl = client.lease_grant(1)
    assert ttl == 1
    client.put(b"brief", b"", lease=short)
    time.sleep(2.5)
    assert client.range(b"brief").kvs == []
    assert client.lease_keepalive(short) == 0
    with pytest.raises(EtcdError, match="lease not found"):
        client.put(b"brief", b"", lease=short)


def _collect(watch, into, until):
    for revision, events in watch:
        into.append((revision, events))
        if sum(len(e) for _, e in into) >= until:
            return


def test_watch_from_a_revision(client):
    start = client.put(b"w/a", b"1")
    client.put(b"w/b", b"2")
    client.put(b"outside", b"")
    client.delete(b"w/a")
    txn = client.txn([], [Op.put(b"w/c", b"3"), Op.put(b"w/d", b"4")])
    got = []
    watch = client.watch(b"w/", prefix_end(b"w/"), start_revision=start)
    _collect(watch, got, until=5)
    events = [event for _, events in got for event in events]
    assert [(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for e in events] == [
        ("PUT", b"w/a", b"1", start),
        ("PUT", b"w/b", b"2", start + 1),
        ("DELETE", b"w/a", b"", start + 3),
        ("PUT", b"w/c", b"3", txn.revision),
        ("PUT", b"w/d", b"4", txn.revision),
    ]
    assert all(revision == events[-1].kv.mod_revision for revision, events in got)
    watch.close()

    # Without a start revision: the changes after watch() returns.
    watch = client.watch(b"w/b")
    client.put(b"w/b", b"again")
    revision, events = next(iter(watch))
    assert events == [Event("PUT", KV(b"w/b", b"again", start + 1, revision, 2, 0))]
    watch.close()


def test_a_watch_resumed_after_a_catching_up_answer_misses_nothing(client):
    """etcd sends a watch that catches up the events of 1000 revisions an answer, headed with
    its current revision: resuming after the revision each answer gives loses none."""
    start = client.put(b"many/0", b"")
    for n in range(1, 1500):
        client.put(b"many/%d" % n, b"")
    seen = []
    revision = start
    while len(seen) < 1500:
        watch = client.watch(b"many/", prefix_end(b"many/"), start_revision=revision)
        last, events = next(iter(watch))  # one answer, then the stream breaks
        watch.close()
        seen += [event.kv.key for event in events]
        revision = last + 1
    assert seen == [b"many/%d" % n for n in range(1500)]


def test_watch_close_from_another_thread(client):
    watch = client.watch(b"quiet")
    ended = []

    def follow():
        for _ in watch:
            pass
        ended.append(time.monotonic())

    thread = threading.Thread(target=follow)
    thread.start()
    time.sleep(0.3)
    closed = time.monotonic()
    watch.close()
    thread.join(5)
    assert ended and ended[0] - closed < 0.5  # the iteration ended, without an exception
    watch.close()  # again: nothing
    assert list(watch) == []


def test_watch_of_a_compacted_revision(client, etcd_cluster):  # noqa: F811
    first = client.put(b"c", b"1")
    last = client.put(b"c", b"2")
    client.put(b"c", b"3")
    request = urllib.request.Request(
        f"http://{etcd_cluster.endpoints[0]}/v3/kv/compaction", data=json.dumps({"revision": str(last)}).encode()
    )
    urllib.request.urlopen(request, timeout=5).close()
    watch = client.watch(b"c", start_revision=first)
    with pytest.raises(EtcdCompacted) as raised:
        next(iter(watch))
    assert raised.value.compact_revision == last
    watch.close()
    watch = client.watch(b"c", start_revision=raised.value.compact_revision)
    assert [event.kv.value for event in next(iter(watch))[1]] == [b"2", b"3"]
    watch.close()


def _failure_of(watch):
    """Follow watch to its end: [the EtcdUnavailable that ended it], or [] if it just ended."""
    try:
        list(watch)
    except EtcdUnavailable as error:
        return [error]
    return []


def test_watch_breaks_when_its_member_dies(client, etcd_cluster):  # noqa: F811
    watch = client.watch(b"k")
    index = etcd_cluster.endpoints.index(watch.endpoint)
    errors = []
    thread = threading.Thread(target=lambda: errors.extend(_failure_of(watch)))
    thread.start()
    etcd_cluster.kill(index)
    thread.join(5)
    assert errors and watch.endpoint in str(errors[0])


def test_failover_when_the_leader_dies(etcd_cluster):  # noqa: F811
    leader = etcd_cluster.leader()
    # The leader's endpoint first: the client is connected to it when it dies.
    endpoints = [etcd_cluster.endpoints[leader]] + [e for i, e in enumerate(etcd_cluster.endpoints) if i != leader]
    client = Etcd(endpoints, timeout=3)
    lease, _ = client.lease_grant(10)
    client.put(b"k", b"before")
    etcd_cluster.kill(leader)
    # A read may be sent again: it goes on to the other members until one has a leader again.
    # (A write sent before they notice the leader is gone would be lost with it, and not sent
    # again: EtcdUnavailable(sent=True) at the timeout.)
    began = time.monotonic()
    assert client.range(b"k").kvs[0].value == b"before"
    assert time.monotonic() - began < 3
    client.put(b"k", b"after")
    assert client.lease_keepalive(lease) > 0
    assert client.txn([Compare.value(b"k", "=", b"after")], [Op.put(b"k", b"txn")]).succeeded
    watch = client.watch(b"k")
    assert watch.endpoint != etcd_cluster.endpoints[leader]
    watch.close()
    statuses = [client.status(e) for i, e in enumerate(etcd_cluster.endpoints) if i != leader]
    assert statuses[0]["leader"] == statuses[1]["leader"] != 0
    assert statuses[0]["leader"] in {s["member_id"] for s in statuses}
    with pytest.raises(EtcdUnavailable, match=etcd_cluster.endpoints[leader]) as raised:
        client.status(etcd_cluster.endpoints[leader])
    assert raised.value.sent is False
    client.close()

    etcd_cluster.restart(leader)
    client = Etcd([etcd_cluster.endpoints[leader]])
    assert client.range(b"k").kvs[0].value == b"txn"
    client.close()


def test_no_leader_is_unavailable(etcd_cluster):  # noqa: F811
    # Two of three members dead: the last one answers, but has no leader (once it notices).
    client = Etcd([etcd_cluster.endpoints[2]], timeout=1)
    watch = client.watch(b"k")
    errors = []
    thread = threading.Thread(target=lambda: errors.extend(_failure_of(watch)))
    thread.start()
    etcd_cluster.kill(0)
    etcd_cluster.kill(1)
    deadline = time.monotonic() + 10
    while client.status(etcd_cluster.endpoints[2])["leader"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    began = time.monotonic()
    with pytest.raises(EtcdUnavailable, match="no leader") as raised:
        client.put(b"k", b"")
    assert raised.value.sent is False  # refused before it was acted on
    assert time.monotonic() - began < 1.5
    with pytest.raises(EtcdUnavailable, match="no leader"):
        client.range(b"k")
    with pytest.raises(EtcdUnavailable, match="no leader"):
        client.watch(b"k")
    # The watch in place ends too, rather than wait for changes that cannot come.
    thread.join(10)
    assert "no leader" in str(errors[0])
    client.close()


def test_every_endpoint_dead(etcd_cluster):  # noqa: F811
    etcd_cluster.stop()
    client = Etcd(etcd_cluster.endpoints, timeout=0.5)
    began = time.monotonic()
    for call in [lambda: client.put(b"k", b""), lambda: client.range(b"k"), lambda: client.watch(b"k")]:
        with pytest.raises(EtcdUnavailable) as raised:
            call()
        assert raised.value.sent is False
        message = str(raised.value)
        assert all(endpoint in message for endpoint in etcd_cluster.endpoints), message
        assert "cannot connect" in message
    assert time.monotonic() - began < 3


def test_an_unknown_outcome_is_not_resent(client, etcd_cluster):  # noqa: F811
    # A frozen member takes the request and never answers: the put may have been applied,
    # and must not go to another member; a read may.
    follower = next(i for i in range(3) if i != etcd_cluster.leader())
    endpoints = [etcd_cluster.endpoints[follower]] + [
        e for e in etcd_cluster.endpoints if e != etcd_cluster.endpoints[follower]
    ]
    frozen = Etcd(endpoints, timeout=1)
    frozen.range(b"k")  # connected to the follower
    os.kill(etcd_cluster.procs[follower].pid, signal.SIGSTOP)
    try:
        with pytest.raises(EtcdUnavailable, match="may or may not have been applied") as raised:
            frozen.put(b"k", b"once")
        assert raised.value.sent is True
        assert client.range(b"k").kvs == []  # not sent again elsewhere
        frozen = Etcd(endpoints, timeout=3)
        assert frozen.range(b"k").kvs == []
    finally:
        os.kill(etcd_cluster.procs[follower].pid, signal.SIGCONT)


def test_threads_share_a_client(client):
    revisions = []

    def write(n):
        revisions.extend(client.put(b"t/%d/%d" % (n, i), b"") for i in range(50))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(set(revisions)) == 200
    assert len(client.range_all(b"t/", prefix_end(b"t/"), page=30)[0]) == 200


def test_etcd_errors_are_readable(client):
    with pytest.raises(EtcdError, match=r"/v3/kv/txn: etcdserver: too many operations in txn request$") as raised:
        client.txn([], [Op.put(b"k%d" % i, b"") for i in range(129)])
    assert not isinstance(raised.value, EtcdUnavailable)
    with pytest.raises(EtcdError, match=r"/v3/kv/put: etcdserver: request is too large$"):
        client.put(b"big", b"x" * 2_000_000)
    with pytest.raises(EtcdError, match="required revision is a future revision"):
        client.range(b"k", revision=1_000_000)
    client.put(b"k", b"still fine")  # the connection survived the errors
