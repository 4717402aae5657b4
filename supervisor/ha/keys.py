"""Where a cluster keeps its config in etcd, and how a record is written there.

Every key of cluster C starts with ``/cmactor/C/``:

- ``leader``: the active node's name, held by that node's lease. Its create revision
  is the active's *term*: every write of the active compares it in the same
  transaction, so a node that lost the key can commit nothing more (fencing).
- ``initialized``: present once the first active has written its config: from then
  on etcd, not a node's state_dir, is where every node's config comes from.
- ``j/<module>/<term><seq>``: one acknowledged set or setop. The key's suffix is the
  term and a counter of that term, both fixed-width hex, so a module's records sort
  in the order they were committed.
- ``base/<module>``: the module's tables as last saved or compacted: which chunks
  hold them (``chunk/<module>/<generation>/<n>``, each within etcd's request limit)
  and the recent tokens the records it replaced carried.
- ``nodes/<node>``: ``in_sync`` while that node is a standby that could take over, else
  ``behind``; held by the node's lease. An active with a FAILED module hands over only
  when another node says it is in sync.
"""

import msgpack

_WIDTH = 16  # hex digits of a term, and of a counter


def suffix(term, seq):
    """A record's key suffix: sorts by term, then counter."""
    return b"%016x%016x" % (term, seq)


class Keys:
    """The keys of one cluster."""

    def __init__(self, cluster):
        self.prefix = f"/cmactor/{cluster}/".encode()
        self.leader = self.prefix + b"leader"
        self.initialized = self.prefix + b"initialized"
        self.records_prefix = self.prefix + b"j/"
        self.nodes = self.prefix + b"nodes/"

    def record(self, module, key_suffix):
        return self.records_prefix + module.encode() + b"/" + key_suffix

    def node(self, name):
        return self.nodes + name.encode()

    def records(self, module):
        """The prefix of every record of ``module``."""
        return self.records_prefix + module.encode() + b"/"

    def base(self, module):
        return self.prefix + b"base/" + module.encode()

    def chunk(self, module, generation, number):
        return self.prefix + b"chunk/" + module.encode() + b"/" + generation + b"/%08d" % number

    def chunks_before(self, module, generation):
        """(start, end) of the chunks of ``module``'s older generations."""
        start = self.prefix + b"chunk/" + module.encode() + b"/"
        return start, start + generation

    def parse(self, key):
        """("record", module, suffix), ("base", module, None), ("leader"|"initialized", None, None)
        or (None, None, None) for a key of the cluster this node does not read."""
        rest = key[len(self.prefix) :] if key.startswith(self.prefix) else b""
        if rest == b"leader" or rest == b"initialized":
            return rest.decode(), None, None
        kind, _, rest = rest.partition(b"/")
        if kind == b"j":
            module, _, key_suffix = rest.rpartition(b"/")
            if module and len(key_suffix) == 2 * _WIDTH:
                return "record", module.decode(), key_suffix
        elif kind == b"base" and rest:
            return "base", rest.decode(), None
        return None, None, None


def encode_record(op, table, params, token, entries):
    """A record's value: the change, and what its client was answered (for a retry of its token)."""
    return msgpack.packb([op, table, params, token, entries], use_bin_type=True)


def decode_record(value):
    """(op, table, params, token, entries) of a record; ValueError if it is not one."""
    try:
        record = msgpack.unpackb(value, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"not a record: {exc}") from None
    if not (isinstance(record, list) and len(record) == 5 and isinstance(record[2], dict)):
        raise ValueError("not a record: expected [op, table, params, token, entries]")
    return tuple(record)


def encode_base(generation, chunks, tokens):
    return msgpack.packb({"generation": generation, "chunks": chunks, "tokens": tokens}, use_bin_type=True)


def decode_base(value):
    """(generation, chunk count, tokens) of a base; ValueError if it is not one."""
    try:
        base = msgpack.unpackb(value, raw=False)
        return base["generation"], int(base["chunks"]), dict(base["tokens"])
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"not a base: {exc}") from None
