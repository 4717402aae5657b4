"""The active node's writes to etcd, on a thread of their own, fenced and batched.

The loop hands over what a turn acknowledged (records, and the new bases of saves
and compactions) and goes on; this thread takes everything handed over since its
last transaction and commits it in as few transactions as etcd's limits allow, each
comparing the leader key's create revision with the node's term. Only then does the
loop send the replies. A compare that fails (another node took over), or an etcd
that cannot say whether a transaction went through, ends the node's term: what is
still waiting fails with NotActive, and the node rejoins as a standby.
"""

import logging
import threading
import time

from cmsupervisor.ha.etcd import Compare, EtcdError, EtcdUnavailable, Op

log = logging.getLogger("cmactor.supervisor")

# Room kept in a transaction for what the JSON gateway and the compare add around the ops.
REQUEST_MARGIN = 16 * 1024
OP_OVERHEAD = 64  # bytes a put's key and framing take besides its value, about


class Lost(Exception):
    """The node can no longer commit: the reason is its message."""


class Put:
    """One record (or any key) to write; ``done`` runs on the loop once it is committed."""

    __slots__ = ("key", "value", "done")

    def __init__(self, key, value, done=None):
        self.key = key
        self.value = value
        self.done = done  # fn(failure): None once committed, else why not (loop thread)


class Barrier:
    """Nothing to write: ``done`` runs once everything handed over before it is committed."""

    __slots__ = ("done",)

    def __init__(self, done):
        self.done = done


class Rebase:
    """A module's new base: its chunks written first (transactions of their own: they are
    read only through the base key), then the base key, the deletes of the records it
    covers and of the older chunks, in one transaction."""

    __slots__ = ("chunks", "base", "deletes", "done")

    def __init__(self, chunks, base, deletes):
        self.chunks = chunks  # [(key, value)]
        self.base = base  # (key, value)
        self.deletes = deletes  # [(start, end)]
        self.done = None  # nothing waits on a base itself: a save waits on a Barrier after it


class Committer:
    """Commits what the active hands over, in order, fenced by ``term``."""

    def __init__(self, etcd, leader_key, term, limits, retry_for, call_on_loop, on_lost=None):
        self._etcd = etcd
        self._leader = leader_key
        self.term = term
        self._max_ops, self._max_bytes = limits
        self._retry_for = retry_for
        self._call = call_on_loop  # fn(fn, *args): run on the loop thread
        self._on_lost = on_lost  # fn(reason), on the loop, once the term is over: whatever failed (a base too)
        self._items = []
        self._cond = threading.Condition()
        self._closed = False
        self.lost = None  # why the term ended, once it has
        self.revision = 0  # etcd's revision after the last of them
        self._thread = threading.Thread(target=self._run, name="cmactor-ha-commit", daemon=True)
        self._thread.start()

    def hand(self, items):
        """(Loop thread.) Commit ``items`` after everything handed before them."""
        with self._cond:
            if self.lost is None and not self._closed:
                self._items.extend(items)
                self._cond.notify()
                return
        self._call(_fail, items, self.lost or "this node's term is over")

    def close(self, wait=True):
        """Commit nothing more: what is handed over and not yet sent fails. ``wait``: until
        the thread is gone (a transaction under way ends first, within etcd's timeout)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if wait:
            self._thread.join()

    def _run(self):
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if self._closed:
                    items, self._items = self._items, []
                    if items:
                        self._call(
                            _fail, items, "this node commits nothing more; the outcome is unknown: send it again"
                        )
                    return
                items, self._items = self._items, []
            try:
                self._commit(items)
            except Lost as exc:
                with self._cond:
                    self.lost = str(exc)
                    rest, self._items = self._items, []
                self._call(_fail, items + rest, self.lost)
                if self._on_lost is not None:
                    self._call(self._on_lost, self.lost)
                continue
            self._call(_done, items)

    def _fence(self):
        return [Compare.create_revision(self._leader, "=", self.term)]

    def _txn(self, ops):
        # etcd may lose a write sent just as its leader died, and say only that the outcome
        # is unknown: the same transaction goes again, for as long as the lease could still
        # be ours. Its puts write what they wrote, and its compare fences it.
        deadline = time.monotonic() + self._retry_for
        while True:
            try:
                result = self._etcd.txn(self._fence(), ops)
                break
            except EtcdUnavailable as exc:
                if time.monotonic() >= deadline:
                    raise Lost(f"etcd did not take the commit ({exc})") from None
                time.sleep(0.05)
            except EtcdError as exc:
                raise Lost(f"etcd refused the commit ({exc})") from None
        if not result.succeeded:
            raise Lost("another node holds the leader key now (this node's term is over)")
        self.revision = result.revision

    def _commit(self, items):
        """Write ``items`` in order: puts batched up to the limits, each rebase at its place."""
        batch, size = [], 0
        for item in items:
            if type(item) is Barrier:
                continue
            if type(item) is Put:
                cost = len(item.key) + len(item.value) + OP_OVERHEAD
                if batch and (len(batch) + 1 > self._max_ops or size + cost > self._max_bytes - REQUEST_MARGIN):
                    self._txn(batch)
                    batch, size = [], 0
                batch.append(Op.put(item.key, item.value))
                size += cost
                continue
            if batch:
                self._txn(batch)
                batch, size = [], 0
            self._rebase(item)
        if batch:
            self._txn(batch)

    def _rebase(self, rebase):
        for key, value in rebase.chunks:
            self._txn([Op.put(key, value)])
        ops = [Op.put(*rebase.base)] + [Op.delete(start, end) for start, end in rebase.deletes]
        if len(ops) > self._max_ops:
            # Leaving the old base and every record in etcd is always consistent: the
            # records replay on top of the base they followed. Only etcd's size suffers.
            log.error(
                "etcd: a compaction needs %d operations in one transaction, more than max_txn_ops (%d); etcd keeps "
                "the records it would have replaced; raise etcd's --max-txn-ops and [ha] max_txn_ops",
                len(ops),
                self._max_ops,
            )
            return
        self._txn(ops)


def _done(items):
    for item in items:
        if item.done is not None:
            item.done(None)


def _fail(items, reason):
    for item in items:
        if item.done is not None:
            item.done(reason)
