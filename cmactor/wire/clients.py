"""One policy for both client sockets: the supervisor's (cmsupervisor/front/server.py)
and each worker's own, for direct reads (cmactor/worker/direct.py).

What a client may make either process hold (ClientLimits), the words a client is
refused or dropped with, and the decisions taken on a client (is its frame too old,
may it send another request, is its backlog over its bound, which client goes when
all of them together hold too much) are here, so that the two sockets cannot drift
apart. Each socket keeps its own mechanics, the supervisor's one-thread loop and the
worker's threads, and calls these; none of them does I/O.
"""

import os

import msgspec

from cmactor.errors import InterfaceError, to_wire


class ClientLimits(msgspec.Struct, frozen=True):
    """The [supervisor] keys that bound what clients can make a socket hold (config.py):
    the supervisor serves its own socket with them and hands them to each worker for its
    direct socket (pickled in its spec). A Struct, as the wire's messages are: dataclasses
    would bring inspect into every worker, and its objects into every full collection."""

    allowed_uids: frozenset  # uids besides our own that may connect
    max_frame: int  # bytes of one frame, checked from its header before its body is read
    max_client_requests: int  # requests in flight per client: past it, its requests wait
    max_client_backlog: int  # unsent reply bytes per client: past it, the client is dropped
    frame_timeout: float  # seconds a frame once started may stay unfinished
    max_frames_total: int  # unfinished frames of all clients, in bytes
    max_backlog_total: int  # unsent replies to all the supervisor's clients, in bytes
    max_direct_backlog_total: int  # unsent replies to all of one worker's direct clients
    direct_idle_timeout: float  # a direct connection idle this long is closed

    @classmethod
    def from_options(cls, options):
        """The limits among the checked [supervisor] ``options`` (config.supervisor_options)."""
        values = {name: options[name] for name in cls.__struct_fields__}
        values["allowed_uids"] = frozenset(values["allowed_uids"])  # options hold a list
        return cls(**values)


# -- what clients are told -------------------------------------------------------------


def stream_error(message):
    """The last message to a client whose stream is refused or broken: no request id in it
    can be trusted, so it answers none."""
    return {"id": None, "ok": False, "error": to_wire(InterfaceError, message)}


def uid_refused(uid):
    """Why a client of ``uid`` is refused (may_connect said no), and how to let it in."""
    return f"uid {uid} may not use this supervisor; add it to [supervisor] allowed_uids to allow it"


def bad_stream(error):
    """A stream that is not frames of msgpack (protocol.FrameError ``error``): not msgpack,
    a frame over max_frame."""
    return f"{error}; closing this connection"


def frame_overdue(partial, limits):
    """A frame started frame_timeout ago, of which ``partial`` bytes arrived."""
    return (
        f"a frame started {limits.frame_timeout:g}s ago is unfinished ({partial} bytes of it arrived; "
        "frame_timeout); send each frame whole; closing this connection"
    )


# -- decisions ---------------------------------------------------------------------------


def may_connect(uid, limits):
    """A client of ``uid`` may connect: our own uid, an allowed one, or one the OS cannot
    tell (None: the socket's mode is then the only gate, as on a system without SO_PEERCRED)."""
    return uid is None or uid == os.getuid() or uid in limits.allowed_uids


def frame_left(since, now, limits):
    """Seconds a frame started at ``since`` (time.monotonic) may still take; at 0 or less
    it is too old and its client is dropped."""
    return since + limits.frame_timeout - now


def may_send(in_flight, limits):
    """A client with ``in_flight`` requests handed on and not answered may have one more
    handed on; else its socket is not read (its next requests wait) until replies drain."""
    return in_flight < limits.max_client_requests


def backlog_over(size, limits):
    """A client that leaves ``size`` bytes of replies unsent is past its bound: it does not
    read its replies, and is dropped rather than held."""
    return size > limits.max_client_backlog


def to_drop(clients, held):
    """The client holding the most (``held(client)`` bytes) when what all clients hold is
    over its total: dropping it frees the most at the cost of one client. None if none
    holds anything (what is over is counted for clients already on their way out)."""
    largest = max(clients, key=held, default=None)
    return largest if largest is not None and held(largest) else None
