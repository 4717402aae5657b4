"""A supervisor's part in its cluster, on the loop thread: its role and what follows from it.

- **Active**: every set or setop the router journals gets a record key of this
  node's term; once the local journal has it, the record goes to the committer
  (commit.py), and its reply waits until etcd has it. A save's or compaction's new
  base goes the same way, in order, with the deletes of the records it replaced.
- **Standby**: writes from clients are refused with NotActive; the records the
  watch brings (node.py) are applied by the feed, in order per module, through the
  router as a client's sets would be, and journaled locally with their keys.
- A change's **token** (a client's key for "apply this once") is kept with what its
  client was answered, on both roles: a retry on the new active after a takeover
  gets that answer, not a second application.
"""

import collections
import logging
import os

import msgpack

from cmactor.errors import DataError, not_active_wire, to_wire
from cmactor.wire import protocol as P
from cmactor.wire.validate import MAX_HOLD, Request
from cmsupervisor.ha import keys as K
from cmsupervisor.ha.commit import OP_OVERHEAD, REQUEST_MARGIN, Barrier, Committer, Put, Rebase
from cmsupervisor.supervision.states import READY, WAITING_DEPS

log = logging.getLogger("cmactor.supervisor")

ACTIVE, STANDBY, FENCED = "active", "standby", "fenced"
SINGLE = "single"  # the role a supervisor without [ha] reports
# What such a supervisor answers to the ha op.
SINGLE_HA = {"node": None, "role": SINGLE, "active": None, "in_sync": True, "revision": 0}
ROLES = (SINGLE, ACTIVE, STANDBY, FENCED)
_CHANGES = ("set", "setop")
MAX_TOKENS = 100_000  # tokens remembered: a retry comes within seconds of its first send
_BASE_TOKENS = 1024  # tokens a base keeps of the records it replaced
_MAX_ENTRIES = 4096  # a reply kept for a retry up to this size; a larger one is answered with no rows


class Replica:
    def __init__(self, node, keys, etcd, limits, role, revision, tokens, record_keys):
        self.node = node
        self.keys = keys
        self._etcd = etcd
        self._limits = limits  # (max_txn_ops, max_request_bytes)
        self.role = role
        self.term = None
        self.active_name = None if role == STANDBY else node
        self.revision = revision  # the etcd revision this node's config has reached
        self.tokens = collections.OrderedDict(tokens)  # token -> the reply entries (bytes) or None
        self._record_keys = record_keys  # module -> [key suffix] of the journal records materialized
        self._floor = {}  # module -> highest record key suffix a base of this node replaced
        self._waiting = {}  # token -> [Pending]: retries of a change whose commit is under way
        self._seq = 0
        self._committer = None
        self._loop = self._modules = self._router = None
        self.feed = Feed(self)
        self.on_lost = None  # fn(reason): called once when an active's term ends (node.py rejoins)
        self.on_vacant = None  # fn(): the watch saw the leader key go (node.py campaigns at once)
        self.retry_for = 2.0  # seconds a commit whose outcome etcd left unknown is sent again (the lease's TTL)
        self.lost = None

    # -- wiring (Supervisor._build) ------------------------------------------

    def wire(self, loop, modules, router, saved_section):
        """Take part in a supervisor: ``saved_section(name)`` is a module's section of its config file."""
        self._loop, self._modules, self._router = loop, modules, router
        self._saved_section = saved_section
        for mod in modules.values():
            journal = mod.journal
            materialized = self._record_keys.get(mod.name)
            if materialized is not None and len(materialized) == len(journal.records):
                journal.keys = list(materialized)
            journal.on_drop = lambda base, dropped, kept, mod=mod: self._dropped(mod, base, dropped, kept)
            mod.subscribe(self._module_changed)

    def _module_changed(self, mod, _before):
        if mod.state == WAITING_DEPS:  # registered, and not loaded yet: the load runs knowing the role
            mod.channel.role(self.role != ACTIVE)
        if mod.state == READY:
            self.feed.release(mod)

    @property
    def in_sync(self):
        """A standby that has applied every record it was sent, every module READY."""
        if self.role == ACTIVE:
            return True
        return self.feed.caught_up and all(m.state == READY for m in self._modules.values())

    def could_take_over(self):
        """(Loop thread.) Whether this node is a standby in sync, which may lead next."""
        return self.role == STANDBY and self.in_sync

    def describe(self):
        return {
            "node": self.node,
            "role": self.role,
            "active": self.active_name,
            "in_sync": self.role != FENCED and self.in_sync,
            "revision": self.revision if self._committer is None else max(self.revision, self._committer.revision),
        }

    # -- the router's questions (loop thread) -----------------------------------

    def intercept(self, client, request):
        """A set or setop from ``client``: refused (NotActive) on a standby, answered from
        its token when it was applied already. True if it is answered here."""
        if client is self.feed:
            return False
        if self.role != ACTIVE:
            error = not_active_wire(
                f"{request.op} {request.module}.{request.table} refused: node {self.node!r} is {self.role}, "
                f"not the active; send writes to {self.active_name or 'the active node (none yet)'}",
                self.active_name,
            )
            client.answer({"id": request.id, "ok": False, "error": error})
            return True
        too_large = self._too_large(request)
        if too_large is not None:  # refused before it is applied: etcd would refuse its record, ending the term
            client.answer({"id": request.id, "ok": False, "error": to_wire(DataError, too_large)})
            return True
        token = request.token
        if token is None:
            return False
        if token in self.tokens:
            entries = self.tokens[token]
            client.answer_frame(P.reply_frame(request.id, entries or P.reply_entries([], False)))
            return True
        waiting = self._waiting.get(token)
        if waiting is not None:  # its first send is under way: answered as it is
            waiting.append((client, request.id))
            return True
        self._waiting[token] = []
        return False

    def _too_large(self, request):
        """Why the record of ``request`` would not fit in one etcd request, or None."""
        room = self._limits[1] - REQUEST_MARGIN
        around = len(self.keys.records_prefix) + len(request.module) + 33 + _MAX_ENTRIES + OP_OVERHEAD  # key, reply
        # Nearly every write is far below the limit: told by its characters (at most 4 bytes each
        # in UTF-8, 5 of msgpack's header each string), without encoding a record commit() encodes.
        strings = [request.op, request.table, request.token or "", *request.params, *request.params.values()]
        if around + sum(4 * len(text) + 5 for text in strings) <= room:
            return None
        size = around + len(K.encode_record(request.op, request.table, request.params, request.token, None))
        if size <= room:
            return None
        return (
            f"{request.op} {request.module}.{request.table} refused: its record would take {size} bytes in etcd, "
            f"more than one etcd request holds ({room} bytes: [ha] max_request_bytes less {REQUEST_MARGIN}); "
            "send smaller values, or raise etcd's --max-request-bytes and [ha] max_request_bytes with it"
        )

    def settled(self, token, error, entries):
        """(Router.answer.) The change that carried ``token`` was answered: with success, it is
        kept for a retry; either way, retries that came meanwhile get the same answer."""
        waiters = self._waiting.pop(token, ())
        if error is None:
            self._remember(token, entries)
        for client, rid in waiters:
            if error is None:
                client.answer_frame(P.reply_frame(rid, entries))
            else:
                client.answer({"id": rid, "ok": False, "error": error})

    def key_for(self, mod, pending):
        """The etcd key suffix of a change the router journals: the feed's own, or a new one of
        this term on the active (None on a standby's other writes, which are refused anyway)."""
        if pending.client is self.feed:
            return self.feed.key_of(pending.rid)
        if self.role != ACTIVE:
            return None
        self._seq += 1
        return K.suffix(self.term, self._seq)

    def journals_forced(self, pending):
        """Whether a change must be journaled even if its agent did not mark it dirty: every
        record applied from etcd is, so that a base of this node covers it."""
        return pending.client is self.feed

    def commit(self, answered, answer, fail):
        """(Before the turn's output, the local journal synced.) ``answered``: [(mod, pending,
        entries, key)]; their answers go out once etcd has them, through ``answer`` or ``fail``."""
        if self.role != ACTIVE:
            for _mod, pending, entries, _key in answered:
                if pending.client is self.feed:  # applied from etcd, and journaled here
                    answer(pending, None, entries)
                else:  # sent to the worker while this node led; its term ended before the commit
                    fail(pending, self._not_active(self.lost or f"node {self.node!r} is {self.role}"))
            return
        items = []
        for mod, pending, entries, key in answered:
            req = pending.request
            kept = entries if len(entries) <= _MAX_ENTRIES else None
            value = K.encode_record(req.op, req.table, req.params, req.token, kept)
            items.append(Put(self.keys.record(mod.name, key), value, _Answer(self, pending, entries, answer, fail)))
        self._committer.hand(items)

    def _remember(self, token, entries):
        if token is None:
            return
        self.tokens[token] = entries if entries is None or len(entries) <= _MAX_ENTRIES else None
        if len(self.tokens) > MAX_TOKENS:
            self.tokens.popitem(last=False)

    def then(self, fn):
        """``fn(failure)`` once everything handed over so far is committed (failure None), or
        the term ended first (the reason): a save's reply waits for its new bases."""
        if self.role != ACTIVE:
            fn(f"node {self.node!r} is {self.role}")
            return
        self._committer.hand([Barrier(fn)])

    # -- bases -------------------------------------------------------------------

    def _dropped(self, mod, base, dropped, kept):
        """A save or compaction of ``mod`` replaced the records ``dropped`` (keys) by ``base``:
        on the active, etcd gets the new base, and loses every record of the module up to
        the highest key replaced but those ``kept``."""
        known = [key for key in dropped if key is not None]
        floor = max([self._floor.get(mod.name, b"")] + known)
        self._floor[mod.name] = floor
        if self.role != ACTIVE:
            return
        self._committer.hand([self._rebase(mod.name, base, floor, kept, dropped)])

    def _rebase(self, name, base, floor, kept, dropped):
        self._seq += 1
        generation = K.suffix(self.term, self._seq)
        size = self._limits[1] // 2
        chunks = [
            (self.keys.chunk(name, generation, n), base[at : at + size])
            for n, at in enumerate(range(0, len(base), size))
        ]
        # The tokens of the changes it replaces, without their answers (a base stays small):
        # a retry of one of them after a takeover gets a plain success. The most recent, as
        # many as a quarter of an etcd request holds: the base key goes in one request.
        tokens, room = {}, self._limits[1] // 4
        for token in reversed(self.tokens):
            room -= len(token) + 4  # msgpack: the str's header, and nil
            if len(tokens) == _BASE_TOKENS or room < 0:
                break
            tokens[token] = None
        deletes = []
        start = self.keys.records(name)
        if floor:
            low = start
            for key in sorted(k for k in kept if k is not None and k <= floor):
                deletes.append((low, start + key))
                low = start + key + b"\0"
            deletes.append((low, start + floor + b"\0"))
        deletes = [(low, high) for low, high in deletes if low < high]
        deletes.append(self.keys.chunks_before(name, generation))
        return Rebase(chunks, (self.keys.base(name), K.encode_base(generation.decode(), len(chunks), tokens)), deletes)

    # -- roles -------------------------------------------------------------------

    def activate(self, term, initialize):
        """(Loop thread.) This node won the leader key at revision ``term``: commit from now on.
        ``initialize``: the cluster has no config yet; this node's own goes up first."""
        self.term = term
        self._seq = 0
        self.role = ACTIVE
        self.active_name = self.node
        self._committer = Committer(
            self._etcd, self.keys.leader, term, self._limits, self.retry_for, self._loop.call_async, self.fence
        )
        for mod in self._modules.values():
            if mod.channel is not None and mod.channel.open:
                mod.channel.role(False)
        if initialize:
            self._upload()
        log.info("ha: node %s is the active (term %d)", self.node, term)

    def _upload(self):
        """The first active of a cluster: each module's base and journal, as this node loads them."""
        items = []
        for mod in self._modules.values():
            journal = mod.journal
            base = journal.snapshot if journal.snapshot is not None else self._saved_section(mod.name)
            if base is not None:
                items.append(self._rebase(mod.name, base, b"", [], []))
            for index, (op, table, params) in enumerate(journal.records):
                self._seq += 1
                journal.keys[index] = key = K.suffix(self.term, self._seq)
                items.append(Put(self.keys.record(mod.name, key), K.encode_record(op, table, params, None, None)))
        items.append(Put(self.keys.initialized, b"1"))
        self._committer.hand(items)

    def fence(self, reason):
        """(Loop thread.) The term is over (the committer failed, the lease is gone): nothing
        more is acknowledged; what waits for a commit fails, and node.py rejoins."""
        if self.role == FENCED:
            return
        self.role = FENCED
        self.lost = reason
        log.error("ha: node %s stops acknowledging writes: %s", self.node, reason)
        for waiters in self._waiting.values():
            for client, rid in waiters:
                client.answer({"id": rid, "ok": False, "error": self._not_active(reason)})
        self._waiting.clear()
        if self._committer is not None:
            self._committer.close(wait=False)  # what it still holds fails; its etcd call may take a while
        if self.on_lost is not None:
            self.on_lost(reason)

    def _not_active(self, reason):
        return not_active_wire(
            f"node {self.node!r} lost the lead ({reason}); the outcome is unknown: send it again to the active", None
        )

    def leader_seen(self, name):
        """The watch saw the leader key change: ``name`` is active now (None: no node is)."""
        if self.role == STANDBY:
            self.active_name = name
            if name is None and self.on_vacant is not None:
                self.on_vacant()

    def close(self):
        if self._committer is not None:
            self._committer.close()


class _Answer:
    """What a record's commit does on the loop: its client's answer, and its token's."""

    __slots__ = ("_replica", "_pending", "_entries", "_answer", "_fail")

    def __init__(self, replica, pending, entries, answer, fail):
        self._replica = replica
        self._pending = pending
        self._entries = entries
        self._answer = answer
        self._fail = fail

    def __call__(self, failure):
        if failure is None:
            self._answer(self._pending, None, self._entries)
            return
        self._fail(self._pending, self._replica._not_active(failure))


class Feed:
    """A standby's application of the records the watch brings: each goes to its module
    through the router, as an internal client's set, in order per module (a module's
    records wait while it is not READY, and are sent when it is)."""

    closed = False  # the router's client interface: a feed never goes away
    peer_uid = os.getuid()
    peer_pid = os.getpid()

    def __init__(self, replica):
        self._replica = replica
        self._next_rid = 0
        self._keys = {}  # rid -> (module, key suffix, the revision it came in)
        self._queued = collections.defaultdict(collections.deque)  # module -> records not yet sent
        self.unsent = 0
        self.pending_revisions = collections.Counter()  # revision -> records of it not yet answered
        self.seen = 0  # the highest revision the watch brought

    @property
    def caught_up(self):
        return not self._keys and not self.unsent

    def events(self, revision, events):
        """(Loop thread.) What the watch brought, up to ``revision``."""
        replica = self._replica
        parse = replica.keys.parse
        for event in events:
            kind, module, key = parse(event.kv.key)
            if kind == "leader":
                replica.leader_seen(event.kv.value.decode() if event.type == "PUT" else None)
            elif kind == "record" and event.type == "PUT":
                if replica.term is not None and event.kv.mod_revision > replica.term:
                    continue  # this node's own, committed as the active
                if event.kv.version > 1:
                    continue  # put again by a commit etcd left in doubt and the active sent again
                try:
                    record = K.decode_record(event.kv.value)
                except ValueError as exc:
                    log.error("ha: record %s in etcd cannot be read (%s); skipped", event.kv.key, exc)
                    continue
                self._queue(module, key, record, event.kv.mod_revision)
        self.seen = max(self.seen, revision)
        self._advance()

    def _queue(self, module, key, record, revision):
        mod = self._replica._modules.get(module)
        if mod is None:
            log.warning("ha: a record of module %r, which this node does not run, is skipped", module)
            return
        self._queued[module].append((key, record, revision))
        self.unsent += 1
        self.pending_revisions[revision] += 1
        self.release(mod)

    def release(self, mod):
        """Send what waits for ``mod`` (once READY; what is sent is then held by the router
        across a restart of its worker, as any client's request is)."""
        queue = self._queued.get(mod.name)
        if not queue or mod.state != READY:
            return
        route = self._replica._router.route
        while queue:
            key, (op, table, params, token, _entries), revision = queue.popleft()
            self.unsent -= 1
            self._next_rid += 1
            rid = self._next_rid
            self._keys[rid] = (mod.name, key, revision)
            request = Request(
                id=rid, op=op, user="ha", module=mod.name, table=table, params=params, hold=MAX_HOLD, token=token
            )
            route(self, request)

    def key_of(self, rid):
        entry = self._keys.get(rid)
        return None if entry is None else entry[1]

    def applied(self, rid, error):
        entry = self._keys.pop(rid, None)
        if entry is None:
            return
        module, key, revision = entry
        if error is not None:
            log.error(
                "ha: module %s did not take record %s from etcd (%s: %s); this node's copy of it differs from "
                "the active's",
                module,
                key.decode(),
                error.get("type"),
                error.get("message"),
            )
        self.pending_revisions[revision] -= 1
        if not self.pending_revisions[revision]:
            del self.pending_revisions[revision]
        self._advance()

    def _advance(self):
        done = min(self.pending_revisions) - 1 if self.pending_revisions else self.seen
        self._replica.revision = max(self._replica.revision, done)

    # The router's client interface: a reply to one of the feed's requests.
    def answer_frame(self, frame):
        self.applied(msgpack.unpackb(frame[P.HEADER.size :])["id"], None)

    def answer(self, message):
        self.applied(message.get("id"), message.get("error") if not message.get("ok") else None)

    def notify(self, _message):
        pass
