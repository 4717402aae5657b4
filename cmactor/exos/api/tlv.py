"""``exos.api.tlv``: type-length-value items to bytes and back.

The layout: items back to back, with no padding and nothing around them; each is
its type (2 bytes), the length of its value in bytes (2 bytes), both unsigned and
in network (big-endian) order, then the value itself. Empty bytes are no items::

    >>> pack([(1, b"ab"), (258, b"")])
    b'\\x00\\x01\\x00\\x02ab\\x01\\x02\\x00\\x00'
    >>> unpack(b"\\x00\\x01\\x00\\x02ab\\x01\\x02\\x00\\x00")
    [(1, b'ab'), (258, b'')]

``unpack`` reads bytes from anywhere (a peer, a file) as untrusted: input that does
not hold whole items raises ``TLVError`` naming the offset where the bad item starts
and what is wrong with it, and never reads past the input's end.
"""

import struct

HEADER = struct.Struct("!HH")  # type, length of the value
HEADER_SIZE = HEADER.size
MAX_TYPE = 0xFFFF
MAX_LENGTH = 0xFFFF

_BYTES_LIKE = (bytes, bytearray, memoryview)


class TLVError(ValueError):
    """Bytes that are not whole TLV items; ``offset`` is where the bad item starts."""

    def __init__(self, message, offset):
        super().__init__(message)
        self.offset = offset


def pack(items):
    """``items`` (an iterable of (type, value) pairs: type an int in 0..MAX_TYPE, value
    bytes-like of at most MAX_LENGTH bytes) as bytes, in order."""
    parts = []
    for index, item in enumerate(items):
        kind, value = _checked_item(index, item)
        parts += [HEADER.pack(kind, len(value)), value]
    return b"".join(parts)


def unpack(data):
    """The (type, value bytes) items in ``data`` (bytes-like), in order."""
    if not isinstance(data, _BYTES_LIKE):
        raise TypeError(f"tlv.unpack(): data must be bytes-like, got {type(data).__name__}")
    data = bytes(data)  # one copy: a caller's buffer may change, and every value is a slice of it
    items = []
    offset = 0
    while offset < len(data):
        left = len(data) - offset
        if left < HEADER_SIZE:
            raise TLVError(
                f"truncated item at offset {offset}: {left} byte(s) left, but an item's header is {HEADER_SIZE}",
                offset,
            )
        kind, length = HEADER.unpack_from(data, offset)
        start = offset + HEADER_SIZE
        if length > len(data) - start:
            raise TLVError(
                f"truncated item at offset {offset}: type {kind} declares a value of {length} byte(s), "
                f"but only {len(data) - start} follow",
                offset,
            )
        items.append((kind, data[start : start + length]))
        offset = start + length
    return items


def _checked_item(index, item):
    """(type, value bytes) of the ``index``-th item to pack, or TypeError/ValueError naming it."""
    try:
        kind, value = item
    except (TypeError, ValueError):
        raise TypeError(f"tlv.pack(): item {index} must be a (type, value) pair, got {item!r}") from None
    if isinstance(kind, bool) or not isinstance(kind, int):
        raise TypeError(f"tlv.pack(): item {index}'s type must be an int, got {type(kind).__name__} {kind!r}")
    if not 0 <= kind <= MAX_TYPE:
        raise ValueError(f"tlv.pack(): item {index}'s type {kind} is outside 0..{MAX_TYPE}")
    if not isinstance(value, _BYTES_LIKE):
        hint = ": encode it to bytes first" if isinstance(value, str) else ""
        raise TypeError(f"tlv.pack(): item {index}'s value must be bytes-like, got {type(value).__name__}{hint}")
    value = bytes(value)
    if len(value) > MAX_LENGTH:
        raise ValueError(
            f"tlv.pack(): item {index} (type {kind}) has a value of {len(value)} bytes; at most {MAX_LENGTH} fit"
        )
    return kind, value
