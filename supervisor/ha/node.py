"""A node of a cluster: one supervisor that is the active or a hot standby, and how it
joins, takes over and steps down.

Joining: the node reads everything the cluster keeps in etcd at one revision. Once
the cluster has been initialized, that is the node's config: it is written into
the state_dir as the config file and journals (the state_dir's lock held), and the
supervisor starts from it, each module loaded in config_deps order, as a standby;
a watch from the next revision feeds it every record committed since. The first
node of a cluster with no config yet campaigns at once and, active, writes its own
config up (replica.py).

Leading: a standby that is in sync (every module READY, every record it was sent
applied) campaigns whenever no node holds the leader key: a transaction that
creates the key under the node's lease only if it does not exist. The winner waits
until its feed has applied everything committed before its term began, then
commits every write (commit.py). Its lease is renewed every third of its TTL; a
lease etcd no longer knows, or a commit that fails its compare, ends the term.

Stepping down: a node whose term ended acknowledges nothing more, and joins again
from scratch (its supervisor stopped and started from the cluster's config): the
changes it applied but could not commit are gone with its old state.

Handing over: each node says under its lease whether it is a standby in sync. An
active with a module FAILED (its crash loop quarantined it), that has led at least
handover_hold seconds, ends its own term when another node says so: that node
takes over, and this one joins again, the FAILED module started afresh. An agent
that crashes the same way everywhere costs a takeover per handover_hold at most.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from cmactor.errors import ConfigError, StartupError
from cmsupervisor.config import load_toml
from cmsupervisor.ha import keys as K
from cmsupervisor.ha.etcd import Compare, Etcd, EtcdCompacted, EtcdError, Op, prefix_end
from cmsupervisor.ha.replica import ACTIVE, FENCED, STANDBY, Replica
from cmsupervisor.persistence import journal as J, store
from cmsupervisor.supervision.states import FAILED
from cmsupervisor.supervisor import Supervisor

log = logging.getLogger("cmactor.supervisor")


class Cluster:
    """What etcd held for the cluster at one revision, read once at a join."""

    def __init__(self, kvs, revision, keys):
        self.revision = revision
        self.leader = None
        self.initialized = False
        self.records = {}  # module -> [(key suffix, record)], in commit order
        bases = {}
        chunks = {}
        for kv in kvs:
            kind, module, suffix = keys.parse(kv.key)
            if kind == "leader":
                self.leader = kv.value.decode()
            elif kind == "initialized":
                self.initialized = True
            elif kind == "record":
                self.records.setdefault(module, []).append((suffix, K.decode_record(kv.value)))
            elif kind == "base":
                bases[module] = K.decode_base(kv.value)
            else:
                chunks[kv.key] = kv.value
        self.bases = {}  # module -> its tables (JSON bytes)
        self.tokens = {}
        for module, (generation, count, tokens) in bases.items():
            parts = [chunks.get(keys.chunk(module, generation.encode(), n)) for n in range(count)]
            if any(part is None for part in parts):
                raise ValueError(f"the base of module {module!r} misses chunks of generation {generation}")
            if parts:
                self.bases[module] = b"".join(parts)
            self.tokens.update(tokens)
        for records in self.records.values():
            for _suffix, (_op, _table, _params, token, entries) in records:
                if token is not None:
                    self.tokens[token] = entries


class Node:
    """A supervisor that is a node of a cluster ([ha] in its cmactor.toml). It offers what
    ``cmactor run`` uses of a Supervisor: start, stop, wait, status, socket_path, modules."""

    def __init__(self, config_file, ha, ignore_config=False, recover=True, **overrides):
        self.config_file = os.path.abspath(config_file)
        self.ha = ha
        self._make_args = (ignore_config, recover, overrides)
        self.keys = K.Keys(ha["cluster"])
        self.etcd = Etcd(ha["etcd"], ha["etcd_timeout"])
        self.notifier = None
        self.supervisor = self._new_supervisor()
        self.options = self.supervisor.options
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._wake = threading.Event()
        self._lease = None
        self._said = None  # what the node's key under the lease says: in sync or not (None: nothing)
        self._led_since = None  # time.monotonic() of this node's term's start
        # The watch thread, and the stream it reads: both let go together under the lock,
        # so that a stream the thread opens while the node leaves is closed, never read.
        self._watch = None
        self._watching = None
        self._watch_lock = threading.Lock()
        self._thread = None

    @classmethod
    def from_toml(cls, path, ignore_config=False, recover=True, **overrides):
        ha = load_toml(path)[3]
        if ha is None:
            raise StartupError(f"{path} has no [ha] table: it is not the config of a cluster's node")
        return cls(path, ha, ignore_config, recover, **overrides)

    def _new_supervisor(self):
        ignore_config, recover, overrides = self._make_args
        options, agents, base_dir, _ = load_toml(self.config_file)
        sup = Supervisor.configured(self.config_file, options, agents, base_dir, overrides)
        sup.ignore_config, sup.recover = ignore_config, recover
        return sup

    # -- what cmactor run uses ------------------------------------------------------

    @property
    def modules(self):
        return self.supervisor.modules

    @property
    def socket_path(self):
        return self.supervisor.socket_path

    @property
    def metrics_url(self):
        return self.supervisor.metrics_url

    def status(self):
        return self.supervisor.status()

    def restconf_status(self):
        return self.supervisor.restconf_status()

    def start(self, timeout=None, strict=True):
        """Join the cluster: return once this node's supervisor runs, as the active or a standby."""
        self._join(timeout, strict)
        self._thread = threading.Thread(target=self._run, args=(timeout,), name="cmactor-ha", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Leave the cluster: the lead, if held, is given up at once (not at the lease's end)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._leave()
        self._stopped.set()

    def wait(self, timeout=None):
        return self._stopped.wait(timeout)

    # -- joining ---------------------------------------------------------------------

    def _join(self, timeout, strict, stay_up=False):
        ttl = self.ha["lease_ttl"]
        try:
            self._lease = self.etcd.lease_grant(ttl)[0]
            self._said = None
            cluster = self._read()
            term = None
            while not cluster.initialized:
                term = self._campaign()
                if term is not None:
                    break
                if self._stopping.wait(0.2):
                    raise StartupError("the node was stopped while it waited for the cluster's first active")
                cluster = self._read()
        except EtcdError as exc:
            raise StartupError(f"[ha] etcd {', '.join(self.ha['etcd'])}: {exc}; start etcd, or fix [ha] etcd") from None
        sup = self.supervisor
        replica = Replica(
            self.ha["node"],
            self.keys,
            self.etcd,
            (self.ha["max_txn_ops"], self.ha["max_request_bytes"]),
            STANDBY,
            cluster.revision,
            cluster.tokens,
            {name: [suffix for suffix, _ in cluster.records.get(name, [])] for name in sup.modules},
        )
        replica.active_name = cluster.leader
        replica.retry_for = float(self.ha["lease_ttl"])
        replica.on_lost = lambda _reason: self._wake.set()
        replica.on_vacant = self._wake.set
        sup.replica = replica
        sup.notifier = self.notifier
        if term is None:  # the cluster's config is this node's: written where the supervisor reads it
            sup.before_open = lambda: _materialize(sup, cluster)
        sup.start(timeout, strict, stay_up)
        if term is not None:
            sup._loop.call(replica.activate, term, True)
            self._led_since = time.monotonic()
        else:
            self._watch_from(cluster.revision + 1)

    def _read(self):
        start = self.keys.prefix
        kvs, revision = self.etcd.range_all(start, prefix_end(start))
        try:
            return Cluster(kvs, revision, self.keys)
        except ValueError as exc:
            raise StartupError(f"[ha] cluster {self.ha['cluster']!r}: what etcd holds cannot be read: {exc}") from None

    def _campaign(self):
        """Take the leader key if nobody holds it: the term (the key's create revision), or None."""
        leader = self.keys.leader
        result = self.etcd.txn(
            [Compare.create_revision(leader, "=", 0)],
            [Op.put(leader, self.ha["node"].encode(), self._lease)],
        )
        return result.revision if result.succeeded else None

    def _watch_from(self, revision):
        watch = threading.Thread(target=self._follow, args=(revision,), name="cmactor-ha-watch", daemon=True)
        self._watch = watch
        watch.start()

    def _follow(self, revision):
        """(Watch thread.) Hand every change of the cluster's keys to the feed, from ``revision``."""
        sup = self.supervisor
        start, end = self.keys.prefix, prefix_end(self.keys.prefix)
        while not self._stopping.is_set():
            try:
                stream = self.etcd.watch(start, end, revision)
                with self._watch_lock:
                    if self._watch is not threading.current_thread():  # the node left meanwhile
                        stream.close()
                        return
                    self._watching = stream
                for seen, events in stream:
                    sup._loop.call_async(sup.replica.feed.events, seen, events)
                    revision = seen + 1
            except EtcdCompacted:
                log.error("ha: etcd compacted the revisions this standby had still to read; it joins again")
                sup.replica.lost = "behind etcd's compaction"
                self._wake.set()
                return
            except (EtcdError, RuntimeError):
                pass  # etcd lost its leader, or the supervisor stopped: look again
            self._stopping.wait(0.1)

    # -- the node's thread ----------------------------------------------------------

    def _run(self, timeout):
        ttl = self.ha["lease_ttl"]
        renewed = time.monotonic()
        while not self._stopping.is_set():
            self._wake.wait(ttl / 3)
            self._wake.clear()
            if self._stopping.is_set():
                return
            sup = self.supervisor
            replica = sup.replica
            if sup.wait(0):  # a client's `cmactor stop`: the node leaves the cluster
                threading.Thread(target=self.stop, daemon=True).start()
                return
            try:
                left = self.etcd.lease_keepalive(self._lease)
            except EtcdError:
                left = None
            now = time.monotonic()
            if left:
                renewed = now
            elif left == 0 or now - renewed > ttl:
                if replica.role == ACTIVE:
                    sup._loop.call(replica.fence, "its lease expired: etcd could not be reached in time")
                else:
                    self._renew_lease()
            if replica.role == FENCED or replica.lost:
                self._rejoin(timeout)
                renewed = time.monotonic()
                continue
            try:
                self._say(sup._loop.call(replica.could_take_over))
                if replica.role == STANDBY and replica.active_name is None:
                    self._take_over(sup, replica)
                elif replica.role == ACTIVE:
                    self._hand_over_if_failed(sup, replica)
            except RuntimeError:
                pass  # the supervisor stopped under this tick (a client's `cmactor stop`): the next one sees it

    def _say(self, in_sync):
        """Tell the cluster, under this node's lease, whether it could take over now."""
        if in_sync == self._said:
            return
        try:
            self.etcd.put(self.keys.node(self.ha["node"]), b"in_sync" if in_sync else b"behind", lease=self._lease)
        except EtcdError:
            return  # said at the next tick
        self._said = in_sync

    def _hand_over_if_failed(self, sup, replica):
        """A module FAILED on this active: end the term if another node is a standby in sync."""
        if not self.ha["handover_on_failed"] or time.monotonic() - self._led_since < self.ha["handover_hold"]:
            return
        failed = sup._loop.call(lambda: [name for name, mod in sup.modules.items() if mod.state == FAILED])
        if not failed:
            return
        try:
            said = self.etcd.range(self.keys.nodes, prefix_end(self.keys.nodes)).kvs
        except EtcdError:
            return
        ready = [kv.key[len(self.keys.nodes) :].decode() for kv in said if kv.value == b"in_sync"]
        ready = [name for name in ready if name != self.ha["node"]]
        if ready:
            sup._loop.call(
                replica.fence,
                f"module {', '.join(failed)} FAILED here; the lead goes to an in-sync standby ({', '.join(ready)})",
            )
            self._wake.set()

    def _renew_lease(self):
        try:
            self._lease = self.etcd.lease_grant(self.ha["lease_ttl"])[0]
            self._said = None  # the node's key went with the old lease
        except EtcdError as exc:
            log.warning("ha: node %s cannot renew its lease: %s", self.ha["node"], exc)

    def _take_over(self, sup, replica):
        """No node leads: campaign if in sync, and lead once the feed has caught up with the term."""
        if not sup._loop.call(lambda: replica.in_sync):
            return
        try:
            term = self._campaign()
        except EtcdError:
            return
        if term is None:
            return
        deadline = time.monotonic() + max(5.0, self.ha["lease_ttl"] * 2)
        while time.monotonic() < deadline and not self._stopping.is_set():
            if sup._loop.call(lambda: replica.feed.seen >= term and replica.in_sync):
                sup._loop.call(replica.activate, term, False)
                self._led_since = time.monotonic()
                return
            time.sleep(0.005)
        log.error(
            "ha: node %s won the lead but did not catch up with the cluster; it gives the lead up", self.ha["node"]
        )
        self._give_up_lead()

    def _give_up_lead(self):
        try:
            self.etcd.lease_revoke(self._lease)
        except EtcdError:
            pass
        self._renew_lease()

    def _rejoin(self, timeout):
        """The term ended (or the standby fell behind): start over from the cluster's config."""
        log.warning("ha: node %s joins its cluster again: %s", self.ha["node"], self.supervisor.replica.lost)
        self._leave()
        while not self._stopping.is_set():
            try:
                # The config file may have been edited meanwhile, and the disk may be full: the
                # node keeps trying (and keeps its thread) until either is mended.
                self.supervisor = self._new_supervisor()
                self._join(timeout, strict=False, stay_up=True)
                return
            except (StartupError, ConfigError, OSError) as exc:
                log.error("ha: node %s cannot join its cluster: %s; trying again", self.ha["node"], exc)
                self._leave()
                self._stopping.wait(1.0)

    def _leave(self):
        with self._watch_lock:
            watch, self._watch = self._watch, None
            stream, self._watching = self._watching, None
        if stream is not None:
            stream.close()
        self.supervisor.stop()
        if watch is not None:
            watch.join()
        if self._lease is not None:
            try:
                self.etcd.lease_revoke(self._lease)  # the lead, if held, is free at once
            except EtcdError:
                pass
            self._lease = None


def _materialize(sup, cluster):
    """(The state_dir locked, nothing read yet.) Write the cluster's config as this node's:
    the config file holds each module's base, its journal the records after it."""
    store.write(sup.config_path, {name: cluster.bases[name] for name in sup.modules if name in cluster.bases})
    directory = os.path.join(sup.state_dir, "journal")
    store.private_dir(directory)
    for name in sup.modules:
        path = os.path.join(directory, f"{name}.jsonl")
        lines = [J.encode(op, table, params) for _suffix, (op, table, params, _t, _e) in cluster.records.get(name, [])]
        store.replace(path, *lines)
        snapshot = os.path.join(directory, f"{name}.snapshot")
        if os.path.lexists(snapshot):
            os.unlink(snapshot)
    for name in sorted(set(cluster.bases) | set(cluster.records)):
        if name not in sup.modules:
            log.warning("ha: the cluster keeps config of module %r, which this node does not run", name)
