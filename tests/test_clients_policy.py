"""The client policy both sockets keep (cmactor/wire/clients.py), function by function:
the limits taken from the [supervisor] options, the words clients are told, and the
decisions on each client. test_client_sockets.py runs it on the real sockets."""

import os
import pickle
import types

import pytest

from cmactor.wire import clients as C
from cmactor.wire.protocol import FrameError
from cmsupervisor.config import SUPERVISOR_OPTIONS, supervisor_options

DEFAULTS = C.ClientLimits.from_options(supervisor_options("Supervisor options", {}))


def limits(**changes):
    return C.ClientLimits.from_options({**supervisor_options("Supervisor options", {}), **changes})


def test_the_limits_are_the_supervisor_options_of_the_same_names():
    options = supervisor_options("Supervisor options", {"allowed_uids": [7], "frame_timeout": 2.5})
    got = C.ClientLimits.from_options(options)
    assert got.allowed_uids == frozenset({7}) and got.frame_timeout == 2.5
    for name in C.ClientLimits.__struct_fields__:
        assert name in SUPERVISOR_OPTIONS
        if name != "allowed_uids":
            assert getattr(DEFAULTS, name) == SUPERVISOR_OPTIONS[name][1], name


def test_the_limits_reach_a_worker_whole():
    # A worker gets them in its spec, pickled by multiprocessing.
    sent = limits(allowed_uids=[1, 2], max_client_requests=3)
    assert pickle.loads(pickle.dumps(sent)) == sent


def test_a_stream_error_answers_no_request():
    assert C.stream_error("why") == {"id": None, "ok": False, "error": {"type": "InterfaceError", "message": "why"}}


def test_what_clients_are_told():
    assert C.uid_refused(4242) == (
        "uid 4242 may not use this supervisor; add it to [supervisor] allowed_uids to allow it"
    )
    assert C.bad_stream(FrameError("frame of 9 bytes exceeds the limit of 8 bytes")) == (
        "frame of 9 bytes exceeds the limit of 8 bytes; closing this connection"
    )
    assert C.frame_overdue(12, limits(frame_timeout=10.0)) == (
        "a frame started 10s ago is unfinished (12 bytes of it arrived; frame_timeout); send each frame whole; "
        "closing this connection"
    )
    assert "a frame started 0.5s ago" in C.frame_overdue(1, limits(frame_timeout=0.5))


@pytest.mark.parametrize(
    "uid, allowed, may",
    [
        (os.getuid(), [], True),  # our own
        (None, [], True),  # the OS cannot tell: the socket's mode is the gate
        (os.getuid() + 4242, [], False),
        (os.getuid() + 4242, [os.getuid() + 4242], True),
        (os.getuid() + 4242, [os.getuid() + 1], False),
    ],
)
def test_who_may_connect(uid, allowed, may):
    assert C.may_connect(uid, limits(allowed_uids=allowed)) is may


def test_a_frame_is_too_old_at_frame_timeout():
    bound = limits(frame_timeout=2.0)
    assert C.frame_left(100.0, 100.5, bound) == 1.5
    assert C.frame_left(100.0, 102.0, bound) <= 0
    assert C.frame_left(100.0, 103.0, bound) < 0


def test_a_client_may_send_until_its_requests_in_flight_reach_the_bound():
    bound = limits(max_client_requests=3)
    assert [C.may_send(n, bound) for n in range(5)] == [True, True, True, False, False]


def test_a_backlog_is_over_past_its_bound_not_at_it():
    bound = limits(max_client_backlog=100)
    assert not C.backlog_over(100, bound)
    assert C.backlog_over(101, bound)


def test_the_client_holding_the_most_is_dropped():
    a, b, c = (types.SimpleNamespace(held=n) for n in (5, 9, 0))
    assert C.to_drop([a, b, c], lambda client: client.held) is b


@pytest.mark.parametrize("held", [[], [0, 0]], ids=["no client", "none holds anything"])
def test_nobody_is_dropped_for_what_nobody_holds(held):
    clients = [types.SimpleNamespace(held=n) for n in held]
    assert C.to_drop(clients, lambda client: client.held) is None
