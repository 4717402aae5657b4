"""The module record and its state machine (supervision/modules.py), built on its own."""

import time

import pytest
from fakes import ALL_STATES, Reports, module, wire

from cmactor.errors import InternalError
from cmactor.wire import protocol as P
from cmsupervisor.supervision.lifecycle import Lifecycle
from cmsupervisor.supervision.modules import unknown_module
from cmsupervisor.supervision.states import (
    FAILED,
    LOADING,
    READY,
    RESTARTING,
    STARTING,
    STOPPED,
    STOPPING,
    TRANSITIONS,
    WAITING_DEPS,
)


def test_transition_table_has_a_row_for_every_state_and_names_only_states():
    assert set(TRANSITIONS) == set(ALL_STATES)
    for source, targets in TRANSITIONS.items():
        assert targets <= set(ALL_STATES), source
        assert source not in targets  # a move to the same state is a no-op, not a row
    # Documented: FAILED and STOPPED can be reached from every other state.
    for state in ALL_STATES:
        if state != FAILED:
            assert FAILED in TRANSITIONS[state], state
        if state != STOPPED:
            assert STOPPED in TRANSITIONS[state], state


def test_transition_table_is_the_documented_lifecycle():
    # Written out independently of TRANSITIONS: the tests below walk the table
    # itself, so a changed row would otherwise just change what they expect.
    assert TRANSITIONS == {
        STOPPED: {STARTING, RESTARTING, FAILED},  # RESTARTING: the operator revives one its policy left
        STARTING: {WAITING_DEPS, READY, RESTARTING, FAILED, STOPPING, STOPPED},  # READY: a plain process
        WAITING_DEPS: {LOADING, RESTARTING, FAILED, STOPPING, STOPPED},
        LOADING: {READY, RESTARTING, FAILED, STOPPING, STOPPED},
        READY: {RESTARTING, FAILED, STOPPING, STOPPED},
        RESTARTING: {STARTING, FAILED, STOPPED},
        FAILED: {RESTARTING, STOPPED},
        STOPPING: {STOPPED, FAILED},
    }


ALLOWED = [(a, b) for a in ALL_STATES for b in sorted(TRANSITIONS[a])]
REFUSED = [(a, b) for a in ALL_STATES for b in ALL_STATES if a != b and b not in TRANSITIONS[a]]


def test_allowed_and_refused_pairs_cover_every_pair():
    assert len(ALLOWED) + len(REFUSED) + len(ALL_STATES) == len(ALL_STATES) ** 2
    assert len(REFUSED) > 0 and len(ALLOWED) > 0


@pytest.mark.parametrize("source, target", ALLOWED)
def test_every_transition_in_the_table_moves(source, target):
    mod = module("ports", source)
    mod.move(target)
    assert mod.state == target


@pytest.mark.parametrize("source, target", REFUSED)
def test_every_transition_not_in_the_table_raises_internal_error_and_keeps_the_state(source, target):
    mod = module("ports", source, error="kept")
    with pytest.raises(InternalError) as caught:
        mod.move(target)
    assert str(caught.value) == f"module ports: no transition from {source} to {target}"
    assert mod.state == source
    assert mod.error == "kept"


@pytest.mark.parametrize("state", ALL_STATES)
def test_a_move_to_the_same_state_is_a_no_op(state):
    mod = module("ports", state, error="e", saving=True, started_at=12.5, loaded=True)
    mod.move(state)
    assert (mod.state, mod.error, mod.saving, mod.started_at, mod.loaded) == (state, "e", True, 12.5, True)


@pytest.mark.parametrize("source", [STOPPED, RESTARTING])
def test_moving_to_starting_resets_the_start_up_flags_and_stamps_started_at(source):
    mod = module(
        "ports",
        source,
        error="boom",
        waiting_on="vlan",
        last_event="event_load_start",
        saving=True,
        ready_called=True,
        loaded=True,
        load_errors=4,
        fatal=True,
        started_at=None,
        restarts=3,
        last_exit="exit code 1",
    )
    before = time.monotonic()
    mod.move(STARTING)
    after = time.monotonic()
    assert mod.state == STARTING
    assert (mod.error, mod.waiting_on, mod.last_event) == (None, None, None)
    assert (mod.saving, mod.ready_called, mod.loaded, mod.load_errors, mod.fatal) == (False, False, False, 0, False)
    assert before <= mod.started_at <= after
    # What is not start-up state carries over to the new worker.
    assert (mod.restarts, mod.last_exit) == (3, "exit code 1")


def test_other_moves_keep_the_start_up_flags():
    mod = module("ports", READY, error="load errors", loaded=True, ready_called=True, load_errors=2, started_at=1.0)
    mod.move(FAILED)
    assert (mod.error, mod.loaded, mod.ready_called, mod.load_errors, mod.started_at) == (
        "load errors",
        True,
        True,
        2,
        1.0,
    )


def test_a_worker_that_reported_it_is_ending_does_not_go_ready():
    # Its entry failed on the main thread just after registering, while a lane thread
    # loaded the config: the Fatal can arrive before the lane's Loaded and Ready.
    mod = module("x", LOADING)
    lifecycle = Lifecycle({"x": mod}, None, None, None, None, Reports(), stop_timeout=1, on_stopped=None)
    lifecycle.on_fatal(mod, wire(P.Fatal, "entry 'x.py:main' raised RuntimeError: boom", ""))
    lifecycle.on_loaded(mod, wire(P.Loaded, 1, None, [], 0, None))
    lifecycle.on_ready(mod, wire(P.Ready))
    assert mod.state == LOADING
    assert mod.error == "entry 'x.py:main' raised RuntimeError: boom"


PREDICATES = {
    # state: (accepting, gone, leaving, running)
    STOPPED: (False, True, False, False),
    STARTING: (False, False, False, True),
    WAITING_DEPS: (False, False, False, True),
    LOADING: (False, False, False, True),
    READY: (True, False, False, True),
    RESTARTING: (False, False, True, False),
    FAILED: (False, False, True, False),
    STOPPING: (False, True, True, True),
}


@pytest.mark.parametrize("state", ALL_STATES)
def test_predicates_for_every_state(state):
    mod = module("ports", state)
    assert (mod.accepting, mod.gone, mod.leaving, mod.running) == PREDICATES[state]
    mod.saving = True
    assert mod.accepting is False  # a saving module holds requests, whatever its state


def test_uptime_and_status_follow_the_state():
    mod = module("ports", READY, started_at=time.monotonic() - 2.0, waiting_on="vlan")
    assert 2.0 <= mod.uptime() < 10
    assert mod.status()["waiting_on"] is None  # only shown while WAITING_DEPS
    mod.state = WAITING_DEPS
    assert mod.status()["waiting_on"] == "vlan"
    mod.state = RESTARTING
    assert mod.uptime() is None and mod.status()["uptime"] is None


def test_unknown_module_text_names_the_modules_sorted():
    modules = {"vlan": None, "acl": None, "ports": None}
    assert unknown_module("nope", modules) == "unknown module 'nope'; this supervisor runs: acl, ports, vlan"
