"""The pure parts of the hot standby: the [ha] table's checks, the key layout and record
codec, what a join reads from etcd, and which records a new base deletes."""

import pytest
from processes import cli

import cmactor
from cmactor.errors import ConfigError
from cmactor.wire.validate import Request
from cmsupervisor.config import load_toml
from cmsupervisor.ha import keys as K
from cmsupervisor.ha.etcd import KV, Event
from cmsupervisor.ha.node import Cluster
from cmsupervisor.ha.replica import ACTIVE, FENCED, STANDBY, Replica

GOOD = '[ha]\netcd = ["127.0.0.1:2379"]\ncluster = "core"\nnode = "a"\n[agents.x]\nentry = "m:f"\n'


def write(tmp_path, text):
    path = tmp_path / "cmactor.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "table, message",
    [
        ('cluster = "core"', "[ha]: missing required key 'etcd'"),
        ('etcd = ["127.0.0.1:2379"]', "[ha]: missing required key 'cluster'"),
        ('etcd = []\ncluster = "c"', "[ha].etcd: expected a list of etcd client endpoints"),
        ('etcd = ["localhost"]\ncluster = "c"', '[ha].etcd: expected "host:port"'),
        ('etcd = ["127.0.0.1:2379"]\ncluster = "a/b"', "[ha].cluster: expected a name of letters, digits"),
        ('etcd = ["127.0.0.1:2379"]\ncluster = "c"\nnode = ""', "[ha].node: expected a name"),
        ('etcd = ["127.0.0.1:2379"]\ncluster = "c"\nlease_ttl = 0.5', "[ha].lease_ttl: expected whole seconds"),
        ('etcd = ["127.0.0.1:2379"]\ncluster = "c"\nmax_txn_ops = 2', "[ha].max_txn_ops: expected an integer"),
        ('etcd = ["127.0.0.1:2379"]\ncluster = "c"\nmax_request_bytes = 10', "[ha].max_request_bytes: expected"),
        ('etcd = ["127.0.0.1:2379"]\ncluster = "c"\nlease = 2', "unknown key 'lease'; did you mean 'lease_ttl'?"),
    ],
)
def test_a_bad_ha_table_is_refused_naming_the_key(tmp_path, table, message):
    path = write(tmp_path, f"[ha]\n{table}\n[agents.x]\nentry = 'm:f'\n")
    with pytest.raises(ConfigError) as info:
        load_toml(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_a_good_ha_table_fills_in_its_defaults_and_names_the_host(tmp_path):
    ha = load_toml(write(tmp_path, GOOD.replace('node = "a"\n', "")))[3]
    assert ha["etcd"] == ["127.0.0.1:2379"] and ha["cluster"] == "core" and ha["node"]
    assert (ha["lease_ttl"], ha["max_txn_ops"], ha["max_request_bytes"]) == (2, 128, 1572864)
    assert (ha["handover_on_failed"], ha["handover_hold"]) == (True, 300.0)
    assert load_toml(write(tmp_path, "[agents.x]\nentry = 'm:f'\n"))[3] is None


def test_a_node_config_is_not_a_plain_supervisor_and_check_names_the_node(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"has an \[ha\] table.*cmactor run"):
        cmactor.Supervisor.from_toml(path)
    result = cli("check", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("; node a of cluster core on etcd 127.0.0.1:2379\n")


def test_record_keys_sort_in_commit_order_and_parse_back():
    keys = K.Keys("core")
    made = [keys.record("vlan", K.suffix(term, seq)) for term, seq in ((3, 9), (3, 10), (12, 1))]
    assert made == sorted(made)
    assert keys.parse(made[0]) == ("record", "vlan", K.suffix(3, 9))
    assert keys.parse(keys.leader) == ("leader", None, None)
    assert keys.parse(keys.base("vlan")) == ("base", "vlan", None)
    assert keys.parse(b"/cmactor/other/leader") == (None, None, None)
    assert keys.parse(keys.records("vlan") + b"short") == (None, None, None)


def test_a_record_that_is_not_one_is_a_value_error():
    record = ("set", "kv", {"key": "a"}, "tok-1", b"\x80")
    assert K.decode_record(K.encode_record(*record)) == record
    for bad in (b"\xc1", K.encode_record("set", "kv", "not a dict", None, None)[:-1], b"\x93\x01\x02\x03"):
        with pytest.raises(ValueError, match="not a record"):
            K.decode_record(bad)
    with pytest.raises(ValueError, match="not a base"):
        K.decode_base(b"\x90")


def kv(key, value):
    return KV(key, value, 1, 1, 1, 0)


def test_a_join_reads_bases_from_their_chunks_records_in_order_and_tokens():
    keys = K.Keys("core")
    generation = K.suffix(2, 1)
    kvs = [
        kv(keys.leader, b"a"),
        kv(keys.initialized, b"1"),
        kv(keys.base("vlan"), K.encode_base(generation.decode(), 2, {"old": None})),
        kv(keys.chunk("vlan", generation, 0), b'{"kv":'),
        kv(keys.chunk("vlan", generation, 1), b"[]}"),
        kv(keys.record("vlan", K.suffix(2, 2)), K.encode_record("set", "kv", {"key": "a"}, "t-1", b"ok")),
        kv(keys.record("vlan", K.suffix(2, 3)), K.encode_record("setop", "kv", {"key": "b"}, None, None)),
    ]
    cluster = Cluster(kvs, 40, keys)
    assert (cluster.leader, cluster.initialized, cluster.revision) == ("a", True, 40)
    assert cluster.bases == {"vlan": b'{"kv":[]}'}
    assert [suffix for suffix, _ in cluster.records["vlan"]] == [K.suffix(2, 2), K.suffix(2, 3)]
    assert cluster.tokens == {"old": None, "t-1": b"ok"}
    with pytest.raises(ValueError, match="misses chunks"):
        Cluster(kvs[:3] + kvs[4:], 40, keys)


def test_a_new_base_deletes_every_record_up_to_the_last_it_replaced_but_the_kept_ones():
    keys = K.Keys("core")
    replica = Replica("a", keys, None, (128, 1024 * 1024), ACTIVE, 0, {}, {})
    replica.term = 7
    start = keys.records("vlan")
    kept = K.suffix(7, 4)
    floor = K.suffix(7, 10)
    rebase = replica._rebase("vlan", b"x" * (600 * 1024), floor, [kept, K.suffix(7, 11)], [floor])
    assert rebase.deletes[:2] == [(start, start + kept), (start + kept + b"\0", start + floor + b"\0")]
    assert rebase.deletes[2] == keys.chunks_before("vlan", K.suffix(7, 1))
    assert len(rebase.chunks) == 2  # each within half of max_request_bytes
    assert K.decode_base(rebase.base[1])[:2] == (K.suffix(7, 1).decode(), 2)


def test_a_change_in_flight_when_the_term_ended_is_refused_not_acknowledged():
    # A write sent to the worker while the node led, answered by the worker after the
    # node lost its lease (a paused active, resumed): nothing may acknowledge it now.
    class Pending:
        def __init__(self, client):
            self.client = client

    replica = Replica("a", K.Keys("core"), None, (128, 1024 * 1024), FENCED, 0, {}, {})
    replica.lost = "its lease expired"
    client, fed = Pending(object()), Pending(replica.feed)
    answered, failed = [], []
    replica.commit(
        [(None, client, b"entries", b"k1"), (None, fed, b"entries", b"k2")],
        lambda pending, error, entries: answered.append(pending),
        lambda pending, error: failed.append((pending, error)),
    )
    assert answered == [fed]
    ((pending, error),) = failed
    assert pending is client and error["type"] == "NotActive" and "its lease expired" in error["message"]


def test_a_record_put_again_by_a_commit_sent_twice_is_applied_once():
    # etcd lost track of a commit as its leader died: the active sent the same transaction
    # again, and both went through; the watch brings the record's key twice, version 1 then 2.
    keys = K.Keys("core")
    replica = Replica("b", keys, None, (128, 1024 * 1024), STANDBY, 0, {}, {})
    queued = []
    replica.feed._queue = lambda module, key, record, revision: queued.append((key, revision))
    key = keys.record("vlan", K.suffix(3, 1))
    value = K.encode_record("setop", "kv", {"key": "a"}, "t-1", None)
    replica.feed.events(12, [Event("PUT", KV(key, value, 11, 11, 1, 0)), Event("PUT", KV(key, value, 11, 12, 2, 0))])
    assert queued == [(K.suffix(3, 1), 11)]
    assert replica.feed.seen == 12


def test_a_write_is_refused_only_when_its_record_cannot_fit_one_etcd_request():
    replica = Replica("a", K.Keys("core"), None, (128, 64 * 1024), ACTIVE, 0, {}, {})

    def write(size):
        return Request(id=1, op="set", user="u", module="vlan", table="kv", params={"key": "k", "value": "x" * size})

    assert replica._too_large(write(100)) is None
    assert replica._too_large(write(40_000)) is None  # past the quick bound (4 bytes a character), within etcd's
    refused = replica._too_large(write(50_000))
    assert refused.startswith("set vlan.kv refused: its record would take ") and "max_request_bytes" in refused
