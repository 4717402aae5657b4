"""The supervisor's parts, each built on its own: no Supervisor, no worker processes.

State machine (modules.py), wait-for graph (deadlock.py), split_started
(recovery.py), save runs (saving.py), the event loop (loop.py), the router
(routing.py) and the graph helpers (graphs.py). Collaborators are small fakes,
or real small objects (socketpairs, plain lists as progress slots).
"""

import array
import concurrent.futures
import itertools
import logging
import os
import queue
import socket
import threading
import time
import weakref

import pytest

from cmactor.errors import DatabaseError, InternalError, OperationalError, to_wire
from cmactor.wire import protocol as P
from cmsupervisor import graphs
from cmsupervisor.front.deadlock import WaitGraph
from cmsupervisor.front.routing import Router
from cmsupervisor.loop import EventLoop
from cmsupervisor.persistence import store
from cmsupervisor.persistence.saving import Saver
from cmsupervisor.supervision.lifecycle import Lifecycle
from cmsupervisor.supervision.modules import (
    FAILED,
    LOADING,
    READY,
    RESTARTING,
    STARTING,
    STOPPED,
    STOPPING,
    TRANSITIONS,
    WAITING_DEPS,
    Module,
    Pending,
    unknown_module,
)
from cmsupervisor.supervision.recovery import Recovery, split_started
from cmsupervisor.supervision.restart import RestartPolicy

ALL_STATES = [STOPPED, STARTING, WAITING_DEPS, LOADING, READY, RESTARTING, FAILED, STOPPING]


def wire(kind, *fields):
    """A worker message of ``kind`` as the supervisor reads it: built, then decoded."""
    return P.decode(kind.of(*fields))


def module(name, state=STOPPED, **fields):
    mod = Module(name, {}, None)
    mod.state = state  # tests only: the code moves through Module.move
    for key, value in fields.items():
        setattr(mod, key, value)
    return mod


# ---------------------------------------------------------------------------
# 1. the state machine (modules.py)
# ---------------------------------------------------------------------------


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


class Reports:
    """ModuleLogs' report(): what the supervisor said of each module, kept."""

    def __init__(self):
        self.lines = []

    def report(self, mod, level, message, *args):
        self.lines.append((mod.name, level, message % args))


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


# ---------------------------------------------------------------------------
# 2. the wait-for graph (deadlock.py)
# ---------------------------------------------------------------------------


def graph_of(*mods):
    modules = {m.name: m for m in mods}
    return modules, WaitGraph(modules)


def agent_call(caller, lane, sid, target, table="t", op="get"):
    return Pending(None, 1, {"module": target, "table": table, "op": op, "caller": [caller, lane, sid]}, 0.0)


def admit(graph, modules, pending):
    return graph.admit(modules[pending.request["module"]], pending)


def test_a_serial_call_is_admitted_and_the_reverse_call_is_refused_with_the_cycle():
    modules, graph = graph_of(module("a", READY), module("b", READY))
    a_to_b = agent_call("a", "serial", 1, "b")
    assert admit(graph, modules, a_to_b) is None
    assert a_to_b.issuer is modules["a"]
    refusal = admit(graph, modules, agent_call("b", "serial", 2, "a", table="vlan", op="set"))
    assert refusal == (
        "set a.vlan called from b would deadlock: b → a → b; make the calling action an @async_action, "
        "or do not call a module that is waiting on this one"
    )


def test_a_refused_call_adds_no_edge():
    modules, graph = graph_of(module("a", READY), module("b", READY), module("c", READY))
    assert admit(graph, modules, agent_call("a", "serial", 1, "b")) is None
    refused = agent_call("b", "serial", 2, "a")
    assert "would deadlock" in admit(graph, modules, refused)
    assert refused.issuer is None
    assert admit(graph, modules, agent_call("c", "serial", 3, "b")) is None  # c -> b
    # a -> c would close a -> c -> b -> a had the refused b -> a been recorded.
    assert admit(graph, modules, agent_call("a", "serial", 5, "c")) is None


def test_a_self_call_is_refused():
    modules, graph = graph_of(module("a", READY))
    refusal = admit(graph, modules, agent_call("a", "serial", 1, "a"))
    assert refusal.startswith("get a.t called from a would deadlock: a → a;")


def test_a_longer_cycle_is_written_out_in_full():
    modules, graph = graph_of(module("a", READY), module("b", READY), module("c", READY))
    assert admit(graph, modules, agent_call("a", "serial", 1, "b")) is None
    assert admit(graph, modules, agent_call("b", "serial", 2, "c")) is None
    assert ": c → a → b → c;" in admit(graph, modules, agent_call("c", "serial", 3, "a"))


def test_a_save_from_a_lane_the_save_must_walk_is_refused():
    modules, graph = graph_of(module("a", READY), module("b", READY), module("c", READY))
    modules["b"].persistent_list = ["cfg"]
    assert graph.refuse_save(None) is None  # not from an action
    assert graph.refuse_save(["a", "serial", 1]) is None  # a has no tables; nothing waits on a
    assert graph.refuse_save(["b", "serial", 1]).startswith(
        "a save asked for by b would deadlock: b → b (the save walks 'b'"
    )
    # b's serial lane waits on a call to a: a save from a's lane would wait on b, which waits on a.
    assert admit(graph, modules, agent_call("b", "serial", 2, "a")) is None
    assert ": a → b → a (the save walks 'b' on its serial lane)" in graph.refuse_save(["a", "serial", 3])
    assert graph.refuse_save(["c", "serial", 4]) is None
    assert graph.refuse_save(["a", "async", 5]) is None  # no such running request: nothing waits on it


def test_forget_removes_the_edge():
    modules, graph = graph_of(module("a", READY), module("b", READY))
    first = agent_call("a", "serial", 1, "b")
    second = agent_call("a", "serial", 1, "b")
    assert admit(graph, modules, first) is None and admit(graph, modules, second) is None
    graph.forget(first)
    assert admit(graph, modules, agent_call("b", "serial", 2, "a")) is not None  # second still waits
    graph.forget(second)
    assert admit(graph, modules, agent_call("b", "serial", 3, "a")) is None
    graph.forget(agent_call("x", "serial", 1, "b"))  # never admitted: nothing happens


def test_forget_module_drops_the_edges_of_its_lanes_and_running_actions():
    a = module("a", READY, async_ops=frozenset({("t", "get")}), pool_size=1)
    modules, graph = graph_of(a, module("b", READY))
    running = Pending(None, 9, {"module": "a", "table": "t", "op": "get"}, 0.0)
    running.is_async, running.sid = True, 5
    a.inflight[5] = running
    assert admit(graph, modules, agent_call("a", "serial", 1, "b")) is None  # a's lane waits on b
    from_async = agent_call("a", "async", 5, "b")
    assert admit(graph, modules, from_async) is None  # a's running action waits on b
    assert from_async.issuer is running
    # b's lane -> a's serial lane: a cycle; b -> a's async action: the only pool thread waits on b.
    assert "b → a → b" in admit(graph, modules, agent_call("b", "serial", 2, "a", table="x"))
    pool_refusal = admit(graph, modules, agent_call("b", "serial", 3, "a"))
    assert "(all 1 threads of a's pool are taken by calls waiting on this one)" in pool_refusal
    assert "b → a(async t) → b" in pool_refusal
    graph.forget_module(a)
    assert admit(graph, modules, agent_call("b", "serial", 4, "a", table="x")) is None
    assert admit(graph, modules, agent_call("b", "serial", 5, "a")) is None


def test_a_call_to_an_async_action_gets_its_own_executor():
    a = module("a", READY, async_ops=frozenset({("t", "get")}), pool_size=2)
    modules, graph = graph_of(a, module("b", READY))
    assert admit(graph, modules, agent_call("a", "serial", 1, "b")) is None  # a's serial lane waits on b
    to_async = agent_call("b", "serial", 2, "a", table="t")
    assert admit(graph, modules, to_async) is None
    assert to_async.is_async is True
    to_serial = agent_call("b", "serial", 3, "a", table="other")
    assert admit(graph, modules, to_serial) is not None
    assert to_serial.is_async is False


def running_async(mod, *sids):
    """Async requests ``sids`` of ``mod`` in flight, in that order."""
    for sid in sids:
        busy = Pending(None, sid, {"module": mod.name, "table": "t", "op": "get"}, 0.0)
        busy.is_async, busy.sid = True, sid
        mod.inflight[sid] = busy


def test_a_full_pool_is_refused_only_when_every_busy_thread_waits_on_the_caller():
    a = module("a", READY, async_ops=frozenset({("t", "get")}), pool_size=2)
    modules, graph = graph_of(a, module("b", READY))
    running_async(a, 5, 6)
    assert admit(graph, modules, agent_call("a", "async", 5, "b")) is None  # one thread waits on b
    assert admit(graph, modules, agent_call("b", "serial", 1, "a")) is None  # the other is free to finish
    assert admit(graph, modules, agent_call("a", "async", 6, "b")) is None  # now both wait on b
    refusal = admit(graph, modules, agent_call("b", "serial", 2, "a"))
    assert "(all 2 threads of a's pool are taken by calls waiting on this one)" in refusal
    assert refusal.startswith("get a.t called from b would deadlock: b → a(async t) → b")


def test_a_full_pool_with_a_queued_request_still_refuses_a_call_that_waits_on_it():
    # pool_size 1: request 5 holds the only thread and calls b; request 6 queues
    # behind it and waits on nothing but that thread. b's lane calling a's pool then
    # waits on 5, which waits on b: a deadlock, though 6 leads nowhere.
    a = module("a", READY, async_ops=frozenset({("t", "get")}), pool_size=1)
    modules, graph = graph_of(a, module("b", READY))
    running_async(a, 5, 6)
    assert admit(graph, modules, agent_call("a", "async", 5, "b")) is None
    refusal = admit(graph, modules, agent_call("b", "serial", 1, "a"))
    assert refusal is not None and "(all 1 threads of a's pool are taken" in refusal


def test_an_async_call_to_a_module_not_accepting_waits_on_its_serial_lane():
    a = module("a", LOADING, async_ops=frozenset({("t", "get")}), pool_size=4)
    modules, graph = graph_of(a, module("b", READY))
    assert admit(graph, modules, agent_call("a", "serial", 1, "b")) is None  # a's load calls b
    assert "b → a → b" in admit(graph, modules, agent_call("b", "serial", 2, "a"))


def test_a_module_waiting_on_deps_waits_on_the_ones_not_ready():
    a = module("a", WAITING_DEPS, config_deps=["b", "c"])
    modules, graph = graph_of(a, module("b", LOADING), module("c", READY))
    assert "b → a → b" in admit(graph, modules, agent_call("b", "serial", 1, "a"))
    assert admit(graph, modules, agent_call("c", "serial", 2, "a")) is None  # c is READY: a waits not on it
    modules["b"].state = READY
    assert admit(graph, modules, agent_call("b", "serial", 3, "a")) is None


def test_refusals_held_returns_held_calls_whose_caller_the_module_now_waits_on():
    a = module("a", STARTING)
    modules, graph = graph_of(a, module("b", LOADING), module("c", READY))
    from_b = agent_call("b", "serial", 1, "a", table="x", op="set")
    from_c = agent_call("c", "serial", 2, "a")
    from_client = Pending(None, 3, {"module": "a", "table": "t", "op": "get"}, 0.0)
    assert admit(graph, modules, from_b) is None  # a's deps are not known yet
    assert admit(graph, modules, from_c) is None
    a.held.extend([from_client, from_b, from_c])
    assert graph.refusals_held(a) == []  # STARTING: a waits on nothing yet
    a.state, a.config_deps = WAITING_DEPS, ["b"]
    refused = graph.refusals_held(a)
    assert [p for p, _ in refused] == [from_b]
    assert refused[0][1].startswith("set a.x called from b would deadlock: b → a → b;")


def test_callers_that_are_gone_are_admitted():
    a = module("a", READY)
    modules, graph = graph_of(a, module("b", READY))
    unknown = agent_call("nobody", "serial", 1, "a")
    assert admit(graph, modules, unknown) is None and unknown.issuer is None
    finished = agent_call("b", "async", 99, "a")  # b runs no request 99
    assert admit(graph, modules, finished) is None and finished.issuer is None
    # Neither left an edge: a -> b is admitted, and so is b -> a.
    assert admit(graph, modules, agent_call("a", "serial", 2, "b")) is None
    graph.forget(unknown)
    assert admit(graph, modules, agent_call("b", "serial", 3, "a")) is not None  # only a -> b is there


# ---------------------------------------------------------------------------
# 3. split_started (recovery.py)
# ---------------------------------------------------------------------------


def pend(sid, is_async):
    p = Pending(None, sid, {"module": "m", "table": "t", "op": "get"}, 0.0)
    p.sid, p.is_async = sid, is_async
    return p


def inflight_of(*items):
    return {sid: pend(sid, is_async) for sid, is_async in items}


def sids(pendings):
    return [p.sid for p in pendings]


@pytest.mark.parametrize("make", [lambda: [0] * P.SLOTS_SIZE, lambda: array.array("q", [0] * P.SLOTS_SIZE)])
def test_split_started_by_the_progress_slots(make):
    slots = make()
    # dict order is dispatch order; not sorted on purpose
    inflight = inflight_of((6, False), (3, False), (8, True), (4, True), (5, False), (7, True), (9, True))
    slots[P.SLOT_SERIAL_SID] = 5
    slots[P.async_slot(0)] = 8
    slots[P.async_slot(0) + 1] = 7  # a start time that happens to equal sid 7: not a sid
    slots[P.async_slot(P.ASYNC_SLOTS - 1)] = 4  # the last slot counts too
    started, waiting = split_started(inflight, slots)
    assert sids(started) == [3, 8, 4, 5]
    assert sids(waiting) == [6, 7, 9]
    slots[P.SLOT_OVERFLOW] = 1
    started, waiting = split_started(inflight, slots)
    assert sids(started) == [3, 8, 4, 5, 7, 9]
    assert sids(waiting) == [6]


class LaunchFails:
    """A lifecycle whose every start of a worker fails, as with a process that cannot be made
    (a shortage of descriptors is retried by the lifecycle itself, never reaching here)."""

    starting = stopping = False

    def __init__(self):
        self.quarantined = []

    def launch(self, mod):
        return "could not start a worker process: PicklingError: cannot pickle the agent's options"

    def quarantine(self, mod, reason):
        self.quarantined.append(reason)
        mod.state = FAILED


def test_a_restart_that_cannot_start_a_process_backs_off_then_quarantines():
    policy = RestartPolicy(
        {"max_restarts": 3, "restart_window": 60, "restart_delay": 0.1, "restart_delay_max": 5, "stable_after": 10}
    )
    mod = module("m", RESTARTING, policy=policy, started_at=time.monotonic() - 100)  # it had run for long
    loop, lifecycle = RouterLoop(), LaunchFails()
    recovery = Recovery({"m": mod}, loop, None, None, None, None, lifecycle, Reports())
    for expected in (0.1, 0.2, 0.4):  # the backoff grows: a failed start has no uptime
        recovery._respawn(mod)
        assert mod.state == RESTARTING and "cannot pickle" in mod.last_exit
        delay, fn, args = loop.timers.pop()
        assert delay == expected and fn == recovery._respawn and args == (mod,)
    recovery._respawn(mod)
    assert mod.state == FAILED and "crashed more than 3 times" in lifecycle.quarantined[0]
    assert mod.restarts == 4 and loop.timers == []


def test_split_started_with_idle_slots_starts_nothing():
    slots = [0] * P.SLOTS_SIZE
    inflight = inflight_of((1, False), (2, True))
    assert tuple(map(sids, split_started(inflight, slots))) == ([], [1, 2])
    assert split_started({}, slots) == ([], [])


# ---------------------------------------------------------------------------
# 4. save runs (saving.py)
# ---------------------------------------------------------------------------


class PumpLoop:
    """call_async from the writer thread is queued; the test thread runs it, as the loop would."""

    def __init__(self):
        self.calls = queue.Queue()

    def call_async(self, fn, *args):
        self.calls.put((fn, args))

    def pump(self, timeout=5):
        fn, args = self.calls.get(timeout=timeout)
        fn(*args)


class SaveRouter:
    def __init__(self):
        self.released = []

    def release_held(self, mod):
        self.released.append(mod.name)


class FakeAudit:
    def __init__(self):
        self.records = []
        self.peers = []  # (uid, pid) of each record: who the kernel says asked

    def record(self, user, uid, pid, *fields):
        self.records.append((user, *fields))
        self.peers.append((uid, pid))


class FakeJournal:
    def __init__(self, records=(), snapshot_path=None):
        self.records = list(records)
        self.dropped = []
        self.snapshots_forgotten = 0
        self.snapshot_path = snapshot_path
        self.compactions = []
        self.base_bytes = None

    def set_base(self, size):
        self.base_bytes = size

    def position(self):
        return len(self.records)

    def compacted(self, snapshot, save_sid, walk_start):
        self.compactions.append((snapshot, save_sid, walk_start))
        self.drop_covered(save_sid, walk_start)

    def drop_covered(self, save_sid, walk_start):
        """As Journal.drop_covered with every record added after the walk began an
        @async_action's: those are kept."""
        self.dropped.append((save_sid, walk_start))
        self.records = self.records[walk_start:]

    def forget_snapshot(self):
        self.snapshots_forgotten += 1


class SaveChannel:
    def __init__(self, sids):
        self._sids = sids
        self.saves = []

    def save(self, tables):
        sid = next(self._sids)
        self.saves.append((sid, list(tables)))
        return sid


class FakeClient:
    peer_uid, peer_pid = 1000, 4242

    def __init__(self):
        self.closed = False
        self.sent = []
        self.frames = []

    def answer(self, message):
        self.sent.append(message)

    notify = answer

    def answer_frame(self, frame):
        self.frames.append(frame)


class SaveSetup:
    def __init__(self, tmp_path, specs, previous=None):
        """specs: name -> (state, persistent_list, config_deps)."""
        self.sids = itertools.count(1)
        self.modules = {}
        for name, (state, persistent, config_deps) in specs.items():
            self.modules[name] = module(
                name,
                state,
                persistent_list=persistent,
                config_deps=config_deps,
                journal=FakeJournal(),
                channel=SaveChannel(self.sids),
            )
        self.loop = PumpLoop()
        self.router = SaveRouter()
        self.audit = FakeAudit()
        self.path = str(tmp_path / "config.jsonl")
        previous = previous or {}
        if previous:
            store.write(self.path, previous)
        self.saver = Saver(self.modules, self.loop, self.router, self.audit, self.path, dict(previous))
        self.idle = []
        self.saver.on_idle = lambda: self.idle.append(True)

    def last_save(self, name):
        return self.modules[name].channel.saves[-1]

    def walked(self, name, section, rows=1, error=None):
        sid, _ = self.last_save(name)
        self.saver.on_saved(self.modules[name], wire(P.Saved, sid, error, section, rows))


@pytest.fixture
def saves(tmp_path):
    made = []

    def make(specs, previous=None):
        setup = SaveSetup(tmp_path, specs, previous)
        made.append(setup)
        return setup

    yield make
    for setup in made:
        setup.saver.shutdown()


def test_a_compaction_walks_one_module_into_its_snapshot_and_leaves_it_unsaved(saves, tmp_path):
    s = saves({"ports": (READY, ["port"], []), "vlan": (READY, ["vlan"], [])})
    ports = s.modules["ports"]
    ports.journal = FakeJournal([["set", "port", {"n": str(n)}] for n in range(3)], str(tmp_path / "ports.snapshot"))
    ports.journal.full = True
    ports.unsaved = True
    s.saver.compact(ports)
    s.saver.compact(ports)  # queued once
    assert ports.saving and ports.channel.saves == [(1, ["port"])] and s.modules["vlan"].channel.saves == []
    ports.journal.records.append(["set", "port", {"n": "late"}])  # acknowledged during the walk: kept
    s.walked("ports", b'{"port":[{"n":"2"}]}')
    s.loop.pump()  # the snapshot is written
    assert ports.journal.compactions == [(b'{"port":[{"n":"2"}]}', 1, 3)]  # the Save's sid, the walk's start
    assert ports.journal.records == [["set", "port", {"n": "late"}]]
    assert store.read(ports.journal.snapshot_path) == {"ports": b'{"port":[{"n":"2"}]}'}
    assert not os.path.exists(s.path)  # the config file is not touched
    assert ports.unsaved is True and not ports.saving and not s.saver.running
    assert s.audit.records == []


def test_a_save_queued_behind_a_compaction_covers_the_others_queued(saves, tmp_path):
    s = saves({"ports": (READY, ["port"], []), "vlan": (READY, ["vlan"], [])})
    for name in ("ports", "vlan"):
        s.modules[name].journal.snapshot_path = str(tmp_path / f"{name}.snapshot")
        s.modules[name].journal.full = True
    s.saver.compact(s.modules["ports"])
    done = concurrent.futures.Future()
    s.saver.request(done, "alice")
    s.saver.compact(s.modules["vlan"])
    s.walked("ports", b"{}")
    s.loop.pump()  # the snapshot is written; then the save, of both: vlan's compaction is dropped
    assert len(s.modules["ports"].journal.compactions) == 1
    s.walked("ports", b"{}")
    s.walked("vlan", b"{}")
    s.loop.pump()  # the config file is written
    assert done.result(timeout=5)["modules"] == ["ports", "vlan"]
    assert s.modules["vlan"].journal.compactions == [] and not s.saver.running


def test_a_save_walks_modules_dependencies_first_and_writes_the_file(saves):
    s = saves({"ports": (READY, ["port"], ["vlan"]), "vlan": (READY, ["vlan"], []), "plain": (READY, [], [])})
    s.modules["vlan"].journal.records = [["set", "vlan", {}], ["set", "vlan", {}]]
    s.modules["vlan"].unsaved = True
    done = concurrent.futures.Future()
    s.saver.request(done, "alice")
    assert s.saver.running
    assert s.modules["vlan"].saving and not s.modules["ports"].saving and s.modules["vlan"].unsaved is False
    assert s.modules["ports"].channel.saves == []  # dependencies first: vlan, then ports
    assert s.modules["vlan"].channel.saves == [(1, ["vlan"])]
    s.modules["vlan"].journal.records.append(["set", "vlan", {"late": "1"}])  # acknowledged during the walk
    s.walked("vlan", b'{"vlan":[1]}', rows=1)
    assert s.router.released == ["vlan"] and not s.modules["vlan"].saving
    assert s.modules["ports"].channel.saves == [(2, ["port"])]
    s.walked("ports", b'{"port":[1,2]}', rows=2)
    s.loop.pump()
    summary = done.result(timeout=5)
    assert summary == {"file": s.path, "modules": ["vlan", "ports"], "rows": 3}
    assert store.read(s.path) == {"vlan": b'{"vlan":[1]}', "ports": b'{"port":[1,2]}'}
    assert s.modules["vlan"].journal.dropped == [(1, 2)]  # the record that came during the walk stays
    assert s.modules["vlan"].journal.records == [["set", "vlan", {"late": "1"}]]
    assert s.modules["vlan"].journal.snapshots_forgotten == 1  # older than the file now
    assert s.modules["plain"].channel.saves == []
    assert s.audit.records == [("alice", "save", None, None, None, "ok")]
    assert s.audit.peers == [(os.getuid(), os.getpid())]  # Supervisor.save(): this process
    assert not s.saver.running and s.idle == []
    assert s.saver.section("ports") == b'{"port":[1,2]}'


def test_saves_requested_during_a_run_are_coalesced_into_the_next_run(saves):
    s = saves({"ports": (READY, ["port"], [])})
    first = concurrent.futures.Future()
    s.saver.request(first, "u1")
    second, third = concurrent.futures.Future(), concurrent.futures.Future()
    client = FakeClient()
    s.saver.request(second, "u2")
    s.saver.request((client, 42), "u3")
    s.saver.request(third, "u4")
    assert s.modules["ports"].channel.saves == [(1, ["port"])]  # one walk so far
    s.walked("ports", b'{"v":1}')
    s.loop.pump()
    assert first.result(timeout=5)["modules"] == ["ports"]
    assert store.read(s.path) == {"ports": b'{"v":1}'}
    # The next run started at once for the three waiting, with one walk.
    assert not second.done() and client.sent == []
    assert s.modules["ports"].channel.saves == [(1, ["port"]), (2, ["port"])]
    s.walked("ports", b'{"v":2}')
    s.loop.pump()
    expected = {"file": s.path, "modules": ["ports"], "rows": 1}
    assert second.result(timeout=5) == expected and third.result(timeout=5) == expected
    assert client.sent == [{"id": 42, "ok": True, "saved": expected}]
    assert store.read(s.path) == {"ports": b'{"v":2}'}
    assert len(s.modules["ports"].channel.saves) == 2  # no third run
    assert [r[0] for r in s.audit.records] == ["u1", "u2", "u3", "u4"]
    with pytest.raises(queue.Empty):
        s.loop.calls.get(timeout=0.05)


def test_a_save_reply_with_a_stale_sid_is_ignored(saves):
    s = saves({"ports": (READY, ["port"], [])})
    done = concurrent.futures.Future()
    s.saver.request(done, "u")
    s.saver.on_saved(s.modules["ports"], wire(P.Saved, 999, None, b"{}", 0))
    assert s.modules["ports"].saving and not done.done() and s.router.released == []


def test_a_failed_walk_fails_the_whole_run_and_leaves_the_file_alone(saves):
    previous = {"vlan": b'{"vlan":["old"]}', "ports": b'{"port":["old"]}'}
    s = saves({"vlan": (READY, ["vlan"], []), "ports": (READY, ["port"], ["vlan"])}, previous)
    with open(s.path, "rb") as f:
        before = f.read()
    s.modules["vlan"].unsaved = True
    s.modules["ports"].unsaved = True
    done = concurrent.futures.Future()
    s.saver.request(done, "u")
    s.walked("vlan", b'{"vlan":["new"]}')
    s.walked("ports", None, rows=0, error="port_get raised KeyError")
    with pytest.raises(DatabaseError) as caught:
        done.result(timeout=5)
    assert type(caught.value) is DatabaseError
    assert str(caught.value) == (f"save failed: module 'ports': port_get raised KeyError; {s.path} was not changed")
    with open(s.path, "rb") as f:
        assert f.read() == before
    assert s.saver.section("vlan") == b'{"vlan":["old"]}'  # the walked section is not kept either
    assert s.modules["vlan"].unsaved is True and s.modules["ports"].unsaved is True  # still unsaved
    assert not s.modules["ports"].saving and "ports" in s.router.released
    assert s.modules["vlan"].journal.dropped == [] and s.modules["ports"].journal.dropped == []
    assert s.audit.records == [("u", "save", None, None, None, f"DatabaseError: {caught.value}")]
    assert not s.saver.running
    # The next save is a fresh run, from the first module again.
    s.saver.request(concurrent.futures.Future(), "v")
    assert s.saver.running and s.modules["vlan"].channel.saves[-1] == (3, ["vlan"])


def test_a_worker_dying_during_its_walk_fails_the_run(saves):
    s = saves({"ports": (READY, ["port"], [])})
    done = concurrent.futures.Future()
    s.saver.request(done, "u")
    s.saver.worker_died(module("other", READY), "killed")  # not the module being walked
    assert not done.done()
    s.saver.worker_died(s.modules["ports"], "killed by SIGKILL")
    with pytest.raises(DatabaseError, match=r"module 'ports': the worker died during the save \(killed by SIGKILL\)"):
        done.result(timeout=5)
    assert not s.saver.running and not s.modules["ports"].saving


def test_modules_not_ready_keep_their_previous_section(saves):
    previous = {"vlan": b'{"vlan":["old"]}', "gone": b'{"x":[]}'}
    s = saves({"ports": (READY, ["port"], []), "vlan": (LOADING, ["vlan"], [])}, previous)
    done = concurrent.futures.Future()
    s.saver.request(done, "u")
    assert s.modules["vlan"].channel.saves == [] and not s.modules["vlan"].saving
    s.walked("ports", b'{"port":[1]}')
    s.loop.pump()
    assert done.result(timeout=5)["modules"] == ["ports"]
    # vlan (not READY) and gone (no longer configured) are carried over from the last file.
    assert store.read(s.path) == {"vlan": b'{"vlan":["old"]}', "gone": b'{"x":[]}', "ports": b'{"port":[1]}'}


def test_a_save_with_no_ready_module_rewrites_the_previous_sections(saves):
    s = saves({"vlan": (FAILED, ["vlan"], [])}, {"vlan": b"[1]"})
    done = concurrent.futures.Future()
    s.saver.request(done, "u")
    s.loop.pump()
    assert done.result(timeout=5) == {"file": s.path, "modules": [], "rows": 0}
    assert store.read(s.path) == {"vlan": b"[1]"}


def test_close_refuses_queued_saves_and_later_ones_and_calls_on_idle_after_the_run(saves):
    s = saves({"ports": (READY, ["port"], [])})
    running = concurrent.futures.Future()
    queued = concurrent.futures.Future()
    client = FakeClient()
    s.saver.request(running, "u1")
    s.saver.request(queued, "u2")
    s.saver.request((client, 8), "u3")
    s.saver.close()
    with pytest.raises(OperationalError, match="^save refused: the supervisor is stopping$"):
        queued.result(timeout=5)
    assert client.sent == [
        {
            "id": 8,
            "ok": False,
            "error": {"type": "OperationalError", "message": "save refused: the supervisor is stopping"},
        }
    ]
    late = concurrent.futures.Future()
    s.saver.request(late, "u4")
    assert late.done()
    with pytest.raises(OperationalError, match="the supervisor is stopping"):
        late.result(timeout=0)
    assert s.idle == [] and s.saver.running  # the running save finishes
    s.walked("ports", b"{}")
    s.loop.pump()
    assert running.result(timeout=5)["modules"] == ["ports"]
    assert s.idle == [True] and not s.saver.running
    assert len(s.modules["ports"].channel.saves) == 1
    outcomes = {r[0]: r[5] for r in s.audit.records}
    assert outcomes["u1"] == "ok"
    assert outcomes["u2"] == outcomes["u4"] == "OperationalError: save refused: the supervisor is stopping"


def test_a_write_that_fails_is_an_operational_error(saves, tmp_path):
    s = saves({"ports": (READY, ["port"], [])})
    s.saver.config_path = str(tmp_path / "no" / "such" / "dir" / "config.jsonl")
    s.modules["ports"].unsaved = True
    done = concurrent.futures.Future()
    s.saver.request(done, "u")
    s.walked("ports", b"{}")
    s.loop.pump()
    with pytest.raises(OperationalError, match=r"save failed: cannot write .*no/such/dir/config\.jsonl"):
        done.result(timeout=5)
    assert s.modules["ports"].unsaved is True and s.modules["ports"].journal.dropped == []


# ---------------------------------------------------------------------------
# 5. the event loop (loop.py)
# ---------------------------------------------------------------------------


@pytest.fixture
def loop():
    lp = EventLoop()
    lp.deaths = []
    lp.start(on_death=lambda: lp.deaths.append(True))
    yield lp
    if not lp.finished:
        lp.call(lp.finish)
    lp.join()


class Endpoint:
    def __init__(self, sock):
        self.sock = sock
        self.out = bytearray()
        self.sends = 0
        self.drains = 0
        self.failures = 0
        self.drained_event = threading.Event()

    def sent(self):
        self.sends += 1

    def drained(self):
        self.drains += 1
        self.drained_event.set()

    def send_failed(self):
        self.failures += 1
        self.out.clear()


def test_call_runs_on_the_loop_thread_and_returns_or_raises(loop):
    assert loop.call(lambda x, y: x * y, 6, 7) == 42
    name = loop.call(lambda: threading.current_thread().name)
    assert name == "cmactor-supervisor" and name != threading.current_thread().name

    def boom():
        raise KeyError("nope")

    with pytest.raises(KeyError, match="nope"):
        loop.call(boom)
    # From the loop thread, call() runs at once (no deadlock waiting on itself).
    assert loop.call(lambda: loop.call(lambda: "inner")) == "inner"
    future = loop.call_async(lambda: "later")
    assert future.result(timeout=5) == "later"
    assert loop.deaths == []


def test_a_cancelled_timer_never_runs_and_lets_go_of_its_arguments_at_once(loop):
    fired = []
    done = threading.Event()
    big_holder = Holder(bytearray(1 << 20))
    kept = weakref.ref(big_holder)

    def schedule(held):
        timers = [loop.after(0.05, fired.append, n) for n in range(200)]
        doomed = loop.after(0.01, fired.append, held)
        loop.cancel(doomed)
        loop.cancel(doomed)  # twice: nothing more
        for timer in timers[:150]:  # past half the heap: swept out now, not at their time
            loop.cancel(timer)
        loop.after(0.1, done.set)
        return len(loop._timers)

    # Swept when the cancelled passed half the heap (101 of 201): 100 left, and done.set.
    assert loop.call(schedule, big_holder) == 101
    del big_holder
    assert kept() is None  # the cancelled timer no longer holds it
    assert done.wait(5)
    assert fired == list(range(150, 200))


class Holder:
    def __init__(self, value):
        self.value = value


def test_timers_fire_in_deadline_order_and_a_failing_one_is_logged(loop, caplog):
    caplog.set_level(logging.ERROR, logger="cmactor.supervisor")
    fired = []
    all_fired = threading.Event()

    def record(label, due):
        fired.append((label, time.monotonic() >= due))
        if len(fired) == 3:
            all_fired.set()

    def bad_timer():
        raise ValueError("timer broke")

    def schedule():
        now = time.monotonic()
        loop.after(0.06, record, "c", now + 0.06)
        loop.after(0.02, record, "a", now + 0.02)
        loop.after(0.0, bad_timer)
        loop.after(0.04, record, "b", now + 0.04)

    loop.call(schedule)
    assert all_fired.wait(5)
    assert fired == [("a", True), ("b", True), ("c", True)]
    assert any("internal error in timer" in r.getMessage() and r.exc_info for r in caplog.records)
    assert loop.call(lambda: "alive") == "alive" and loop.deaths == []


def test_marked_output_is_flushed_at_the_end_of_the_turn(loop):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.settimeout(5)
        ep = Endpoint(ours)
        loop.call(loop.watch, ours, lambda _ep: None, ep, ep)

        def queue_output():
            ep.out += b"hello "
            loop.mark(ep)
            ep.out += b"world"  # still this turn: one send
            return ep.sends

        assert loop.call(queue_output) == 0  # nothing sent before the turn ends
        assert theirs.recv(100) == b"hello world"
        assert ep.drained_event.wait(5)
        assert loop.call(lambda: (ep.sends, ep.drains, bytes(ep.out))) == (1, 1, b"")
        # A mark with no output still gets its drained() check.
        loop.call(loop.mark, ep)
        assert loop.call(lambda: ep.drains) == 2
        loop.call(loop.unwatch, ours)


def test_output_larger_than_the_socket_buffer_arrives_whole(loop):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.settimeout(5)
        ep = Endpoint(ours)
        loop.call(loop.watch, ours, lambda _ep: None, ep, ep)
        payload = bytes(range(256)) * (8 * 1024 * 1024 // 256)
        received = bytearray()

        def read_all():
            while len(received) < len(payload):
                chunk = theirs.recv(1 << 20)
                if not chunk:
                    return
                received.extend(chunk)

        reader = threading.Thread(target=read_all)

        def queue_output():
            ep.out += payload
            loop.mark(ep)

        loop.call(queue_output)
        reader.start()
        reader.join(10)
        assert not reader.is_alive()
        assert ep.drained_event.wait(5)
        assert len(received) == len(payload) and received == payload
        sends, drains = loop.call(lambda: (ep.sends, ep.drains))
        assert sends > 1  # write readiness finished what the first send could not take
        assert drains == 1
        time.sleep(0.05)
        # Write interest was dropped once drained: the loop is not woken for it again.
        assert loop.call(lambda: (ep.sends, ep.drains)) == (sends, drains)
        loop.call(loop.close_endpoint, ep)
        assert ours.fileno() == -1


def test_a_send_to_a_closed_peer_reports_send_failed(loop):
    ours, theirs = socket.socketpair()
    with ours:
        ours.setblocking(False)
        theirs.close()
        ep = Endpoint(ours)
        loop.call(loop.watch, ours, lambda _ep: None, ep, ep)

        def queue_output():
            ep.out += b"x" * 10
            loop.mark(ep)

        loop.call(queue_output)
        assert loop.call(lambda: (ep.failures, ep.sends)) == (1, 0)
        loop.call(loop.unwatch, ours)
    assert loop.deaths == []


def test_a_handler_that_raises_is_logged_and_the_loop_goes_on(loop, caplog):
    caplog.set_level(logging.ERROR, logger="cmactor.supervisor")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        seen = []
        raised = threading.Event()

        def on_read(sock):
            seen.append(sock.recv(10))
            raised.set()
            raise RuntimeError("handler broke")

        loop.call(loop.watch, ours, on_read, ours)
        theirs.send(b"ping")
        assert raised.wait(5)
        assert loop.call(lambda: "still running") == "still running"
        theirs.send(b"again")
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [b"ping", b"again"]
        loop.call(loop.unwatch, ours)
    messages = [r.getMessage() for r in caplog.records if r.exc_info]
    assert len([m for m in messages if m.startswith("internal error handling")]) == 2
    assert loop.deaths == []


def test_an_event_for_a_descriptor_closed_in_its_turn_does_not_reach_the_next_owner(loop):
    # Two sockets ready in one turn; the first handler closes the other's descriptor and
    # another socket takes its number, as when a worker is reaped and restarted in one
    # turn: the event polled for the old socket is not the new one's.
    pairs = [socket.socketpair() for _ in range(2)]
    fresh, fresh_peer = socket.socketpair()
    calls, reused = [], []

    def on_read(index):
        calls.append(index)
        pairs[index][0].recv(10)
        if reused:
            return
        other = pairs[1 - index][0]
        fd = other.fileno()
        loop.unwatch(other)
        other.close()
        os.dup2(fresh.fileno(), fd)  # the number now names a socket with nothing to read
        reused.append(fd)
        loop.watch(fd, lambda _: calls.append("new owner"), None)

    def arm():
        for index, (ours, theirs) in enumerate(pairs):
            ours.setblocking(False)
            loop.watch(ours, on_read, index)
            theirs.send(b"x")  # both ready before the loop polls again

    loop.call(arm)
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(calls) == 1 and calls[0] in (0, 1), calls
    [fd] = reused
    loop.call(loop.unwatch, fd)
    os.close(fd)
    for sock in (*pairs[0], *pairs[1], fresh, fresh_peer):
        sock.close()
    assert loop.deaths == []


def test_calls_after_finish_raise(loop):
    loop.call(loop.finish)
    loop.join()
    assert loop.finished and loop.wait(0)
    with pytest.raises(RuntimeError, match="the supervisor is stopped"):
        loop.call(lambda: 1)
    with pytest.raises(RuntimeError):
        loop.call_async(lambda: 1)
    assert loop.deaths == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_loop_dying_calls_on_death():
    lp = EventLoop()
    died = threading.Event()
    lp.start(on_death=died.set)

    def break_output():
        raise SystemExit("out")  # not an Exception: the loop cannot carry on

    lp.call(lp.before_output, break_output)
    assert died.wait(5)
    lp.join()
    with pytest.raises(RuntimeError):
        lp.call(lambda: 1)


# ---------------------------------------------------------------------------
# 6. the router (routing.py)
# ---------------------------------------------------------------------------


class RouterLoop:
    def __init__(self):
        self.timers = []
        self.before = {}  # asked for this turn, each once, as EventLoop keeps them
        self.behind = {}  # ... for after its output
        self.now = 1000.0  # the turn's time, as EventLoop.now: a test moves it

    def after(self, delay, fn, *args):
        timer = [delay, fn, args]
        self.timers.append(timer)
        return timer

    def cancel(self, timer):
        if timer in self.timers:
            self.timers.remove(timer)

    def before_output(self, fn):
        self.before[fn] = None

    def after_output(self, fn):
        self.behind[fn] = None

    def tick(self):
        self.now += self.tick_takes  # as though the turn's work so far took this long

    tick_takes = 0.0


class RouteChannel:
    def __init__(self, sids):
        self._sids = sids
        self.requests = []
        self.answers = []
        self.open = True  # False once the worker is gone

    def request(self, op, table, params, vr, flags, batch, after, index, match, is_async):
        sid = next(self._sids)
        self.requests.append((sid, op, table, params, vr, flags, batch, after, index, match, is_async))
        return sid

    def answered(self, sid):
        self.answers.append(sid)


class RouteJournal:
    def __init__(self):
        self.appended = []
        self.syncs = 0
        self.rollbacks = 0
        self.path = "/state/journal/x.jsonl"
        self.full = False

    def append(self, op, table, params, sid=0, is_async=False):
        self.appended.append((op, table, params, sid, is_async))

    def sync(self):
        self.syncs += 1

    def rollback(self):
        self.rollbacks += 1


class RouterSetup:
    def __init__(self, states, hold_timeout=10.0):
        sids = itertools.count(1)
        self.modules = {
            name: module(name, state, channel=RouteChannel(sids), journal=RouteJournal())
            for name, state in states.items()
        }
        self.loop = RouterLoop()
        self.audit = FakeAudit()
        self.graph = WaitGraph(self.modules)
        self.router = Router(self.modules, self.loop, self.graph, self.audit, hold_timeout)
        self.client = FakeClient()
        self.rids = itertools.count(1)

    def route(self, module_name, op="get", table="t", params=None, client=None, **extra):
        req = {
            "id": next(self.rids),
            "op": op,
            "module": module_name,
            "table": table,
            "params": params or {},
            "after": None,
            "batch": P.DEFAULT_BATCH,
            "user": "alice",
            **extra,
        }
        self.router.route(client or self.client, req)
        return req["id"]


def frames(client):
    return [msg for frame in client.frames for msg in P.FrameReader().feed(frame)]


def errors(client):
    return [(m["id"], m["error"]["type"], m["error"]["message"]) for m in client.sent if m.get("ok") is False]


def test_a_request_to_a_ready_module_is_dispatched():
    r = RouterSetup({"ports": READY})
    rid = r.route("ports", params={"name": "1"}, vr="VR-Mgmt", notify=True)
    mod = r.modules["ports"]
    assert mod.channel.requests == [
        (1, "get", "t", {"name": "1"}, "VR-Mgmt", P.F_NOTIFY, P.DEFAULT_BATCH, None, None, None, False)
    ]
    assert list(mod.inflight) == [1]
    pending = mod.inflight[1]
    assert (pending.rid, pending.sid) == (rid, 1) and pending.dispatched_at is not None
    assert r.client.sent == [] and r.loop.timers == []


def test_a_request_for_an_async_action_is_marked_async():
    r = RouterSetup({"ports": READY})
    r.modules["ports"].async_ops = frozenset({("t", "get")})
    r.route("ports")
    r.route("ports", table="other")
    assert [req[-1] for req in r.modules["ports"].channel.requests] == [True, False]
    assert [p.is_async for p in r.modules["ports"].inflight.values()] == [True, False]


def test_requests_to_a_loading_module_are_held_and_released_in_order():
    r = RouterSetup({"ports": LOADING}, hold_timeout=7.5)
    mod = r.modules["ports"]
    gone_client = FakeClient()
    first = r.route("ports", params={"n": "1"})
    dropped = r.route("ports", client=gone_client)
    second = r.route("ports", params={"n": "2"})
    assert mod.channel.requests == [] and mod.inflight == {}
    assert [p.rid for p in mod.held] == [first, dropped, second]
    assert [p.hold for p in mod.held] == [7.5, 7.5, 7.5]
    held = list(mod.held)
    assert [(delay, fn.__name__, args) for delay, fn, args in r.loop.timers] == [
        (7.5, "_expire_held", (mod, pending)) for pending in held
    ]
    gone_client.closed = True
    mod.state = READY
    r.router.release_held(mod)
    assert [(sid, params) for sid, _, _, params, *_ in mod.channel.requests] == [(1, {"n": "1"}), (2, {"n": "2"})]
    assert [p.rid for p in mod.inflight.values()] == [first, second]
    assert len(mod.held) == 0 and r.loop.timers == []  # released: their timers cancelled


def test_a_client_that_leaves_takes_its_held_requests_with_it():
    r = RouterSetup({"ports": LOADING, "vlan": LOADING})
    gone = FakeClient()
    stays = r.route("ports")
    r.route("ports", client=gone)
    r.route("vlan", client=gone, caller=["ports", "serial", 3])
    r.router.forget_client(gone)
    assert [p.rid for p in r.modules["ports"].held] == [stays] and len(r.modules["vlan"].held) == 0
    assert [args[1].rid for _, _, args in r.loop.timers] == [stays]  # theirs cancelled: nothing keeps them
    assert (
        r.graph.admit(
            r.modules["ports"],
            Pending(r.client, 9, {"module": "ports", "table": "t", "op": "get", "caller": ["vlan", "serial", 4]}, 0.0),
        )
        is None
    )  # no edge left


def test_many_held_requests_with_distinct_deadlines_expire_without_a_scan_each():
    r = RouterSetup({"ports": LOADING})
    for n in range(20000):
        r.route("ports", hold=0.001 + n * 1e-9)
    time.sleep(0.01)
    started = time.monotonic()
    for _, fn, args in r.loop.timers:
        fn(*args)
    assert len(r.modules["ports"].held) == 0 and len(errors(r.client)) == 20000
    assert time.monotonic() - started < 10  # a scan of all held per timer took minutes


def test_a_held_request_expires_after_its_hold():
    r = RouterSetup({"ports": LOADING})
    mod = r.modules["ports"]
    short = r.route("ports", hold=0.001)
    long = r.route("ports", hold=60)
    time.sleep(0.005)
    delay, fn, args = r.loop.timers[0]
    assert delay == 0.001
    fn(*args)
    assert errors(r.client) == [
        (short, "ModuleUnavailable", "module 'ports' is not READY (state LOADING) (held 0.001s, the hold_timeout)")
    ]
    assert [p.rid for p in mod.held] == [long]


def test_hold_again_puts_requests_first_in_line():
    r = RouterSetup({"ports": RESTARTING}, hold_timeout=3)
    mod = r.modules["ports"]
    later = r.route("ports")
    crashed = [Pending(r.client, 100, {}, 0.0), Pending(r.client, 101, {}, 0.0)]
    r.router.hold_again(mod, crashed)
    assert [p.rid for p in mod.held] == [100, 101, later]
    assert crashed[0].hold == 3
    r.router.hold_again(mod, [])
    assert len(r.loop.timers) == 3  # one a request


def test_a_request_to_an_unknown_module_names_the_known_ones():
    r = RouterSetup({"vlan": READY, "ports": READY})
    rid = r.route("nope", op="set")
    assert errors(r.client) == [(rid, "ProgrammingError", "unknown module 'nope'; this supervisor runs: ports, vlan")]
    assert r.audit.records == [
        ("alice", "set", "nope", "t", {}, "ProgrammingError: unknown module 'nope'; this supervisor runs: ports, vlan")
    ]


def test_hold_zero_fails_at_once():
    r = RouterSetup({"ports": LOADING})
    rid = r.route("ports", hold=0)
    assert errors(r.client) == [(rid, "ModuleUnavailable", "module 'ports' is not READY (state LOADING)")]
    assert len(r.modules["ports"].held) == 0 and r.loop.timers == []


def test_a_saving_module_holds_and_says_so_with_hold_zero():
    r = RouterSetup({"ports": READY})
    r.modules["ports"].saving = True
    rid = r.route("ports", hold=0)
    assert errors(r.client) == [(rid, "ModuleUnavailable", "module 'ports' is not READY (saving)")]
    r.route("ports")
    assert len(r.modules["ports"].held) == 1 and r.modules["ports"].channel.requests == []


def test_a_failed_module_fails_at_once_unless_the_request_gave_a_hold():
    r = RouterSetup({"ports": FAILED})
    mod = r.modules["ports"]
    mod.error = "crashed too often"
    rid = r.route("ports")
    assert errors(r.client) == [
        (
            rid,
            "ModuleUnavailable",
            "module 'ports' is quarantined (FAILED): crashed too often; revive it with `cmactor restart ports`",
        )
    ]
    assert len(mod.held) == 0
    held = r.route("ports", hold=5)
    assert [p.rid for p in mod.held] == [held] and r.loop.timers[-1][0] == 5
    assert len(r.client.sent) == 1


def test_a_stopping_module_fails_even_with_a_hold():
    r = RouterSetup({"ports": STOPPING})
    rid = r.route("ports", hold=5)
    assert errors(r.client) == [(rid, "ModuleUnavailable", "module 'ports' is unavailable: the supervisor is stopping")]


def test_waiting_deps_is_named_in_the_unavailable_text():
    r = RouterSetup({"ports": WAITING_DEPS})
    r.modules["ports"].waiting_on = "vlan"
    rid = r.route("ports", hold=0)
    assert errors(r.client) == [
        (rid, "ModuleUnavailable", "module 'ports' is not READY (state WAITING_DEPS, waiting on 'vlan')")
    ]


def test_close_fails_every_held_request_and_nothing_more_is_sent():
    r = RouterSetup({"ports": LOADING, "vlan": STARTING, "acl": READY})
    held = [r.route("ports"), r.route("vlan"), r.route("ports")]
    r.router.close()
    stopping = {
        "ports": "module 'ports' is unavailable: the supervisor is stopping",
        "vlan": "module 'vlan' is unavailable: the supervisor is stopping",
    }
    assert sorted(errors(r.client)) == [
        (held[0], "ModuleUnavailable", stopping["ports"]),
        (held[1], "ModuleUnavailable", stopping["vlan"]),
        (held[2], "ModuleUnavailable", stopping["ports"]),
    ]
    assert all(len(m.held) == 0 for m in r.modules.values())
    late = r.route("acl")
    assert errors(r.client)[-1] == (
        late,
        "ModuleUnavailable",
        "module 'acl' is unavailable: the supervisor is stopping",
    )
    assert r.modules["acl"].channel.requests == []


def test_an_answer_is_counted_after_the_turns_output_timed_from_turn_to_turn():
    r = RouterSetup({"ports": READY})
    mod = r.modules["ports"]
    r.route("ports")
    r.route("ports")
    r.route("nowhere")  # an unknown module's request: answered, nobody's figure
    r.loop.now += 0.25
    r.router.on_reply(mod, wire(P.Reply, 1, None, P.reply_entries([], False), False))
    r.router.on_reply(mod, wire(P.Reply, 2, to_wire(DatabaseError, "boom"), None, False))
    assert len(frames(r.client)) == 1 and len(errors(r.client)) == 2  # the answers are out
    assert mod.request_stats["get"].snapshot()["seconds"]["count"] == 0  # the figures are not yet
    (record,) = r.loop.behind
    record()
    figures = mod.request_stats["get"].snapshot()
    assert (figures["ok"], figures["errors"]) == (1, {"DatabaseError": 1})
    assert figures["seconds"]["count"] == 2 and figures["seconds"]["sum"] == pytest.approx(0.5)


def test_a_dirty_set_on_a_persistent_table_is_journaled_before_its_answer():
    r = RouterSetup({"ports": READY})
    mod = r.modules["ports"]
    mod.persistent_list = ["port"]
    rid = r.route("ports", op="set", table="port", params={"name": "1", "speed": "10G"})
    entries = P.reply_entries([], False)
    r.router.on_reply(mod, wire(P.Reply, 1, None, entries, True))
    assert mod.journal.appended == [
        ("set", "port", {"name": "1", "speed": "10G"}, 1, False)
    ]  # its sid: what a save covers
    assert mod.unsaved is True and mod.inflight == {} and mod.channel.answers == [1]
    assert frames(r.client) == [] and mod.journal.syncs == 0  # the answer waits for the fsync
    r.loop.tick_takes = 0.003  # the fsync
    (sync,) = r.loop.before
    sync()
    sync()  # once per touched journal, not again
    assert mod.journal.syncs == 1
    assert frames(r.client) == [{"id": rid, "ok": True, "rows": [], "more": False}]
    (record,) = r.loop.behind
    record()
    assert mod.request_stats["set"].snapshot()["seconds"]["sum"] == pytest.approx(0.003)  # the fsync counts
    assert r.audit.records == [("alice", "set", "ports", "port", {"name": "1", "speed": "10G"}, "ok")]
    assert r.audit.peers == [(FakeClient.peer_uid, FakeClient.peer_pid)]


@pytest.mark.parametrize("fails_in", ["append", "sync"])
def test_a_change_whose_journal_cannot_be_written_is_refused_and_its_worker_reloaded(fails_in):
    r = RouterSetup({"ports": READY, "vlan": READY})
    reloaded = []
    r.router.on_journal_failure = lambda mod, reason: reloaded.append((mod.name, reason))
    mod = r.modules["ports"]
    mod.persistent_list = ["port"]
    r.modules["vlan"].persistent_list = ["vlan"]

    def full(*args):
        raise OSError(28, "No space left on device")

    setattr(mod.journal, fails_in, full)
    first = r.route("ports", op="set", table="port", params={"name": "1"})
    second = r.route("ports", op="set", table="port", params={"name": "2"})
    other = r.route("vlan", op="set", table="vlan", params={"name": "v"})
    for sid, m in ((1, mod), (2, mod), (3, r.modules["vlan"])):
        r.router.on_reply(m, wire(P.Reply, sid, None, P.reply_entries([], False), True))
    (sync,) = r.loop.before
    sync()
    assert mod.journal.rollbacks == 1
    failed = {rid: (kind, message) for rid, kind, message in errors(r.client)}
    assert set(failed) == {first, second}
    kind, message = failed[first]
    assert kind == "OperationalError"
    assert "set ports.port was not committed" in message and "No space left on device" in message
    assert [m["id"] for m in frames(r.client)] == [other]  # another module's journal is fine
    assert reloaded == [("ports", "its journal could not be written ([Errno 28] No space left on device)")]


def test_only_dirty_changes_to_persistent_tables_are_journaled():
    r = RouterSetup({"ports": READY})
    mod = r.modules["ports"]
    mod.persistent_list = ["port"]
    r.route("ports", op="set", table="port")
    r.router.on_reply(mod, wire(P.Reply, 1, None, P.reply_entries([], False), False))  # not dirty
    assert mod.unsaved is False
    r.route("ports", op="set", table="counters")
    r.router.on_reply(mod, wire(P.Reply, 2, None, P.reply_entries([], False), True))  # not persistent
    assert mod.unsaved is True
    r.route("ports", op="get", table="port")
    r.router.on_reply(mod, wire(P.Reply, 3, None, P.reply_entries([["a"]], True), True))  # not a change
    assert mod.journal.appended == []
    assert [m["rows"] for m in frames(r.client)] == [[], [], [["a"]]]
    assert [rec[1] for rec in r.audit.records] == ["set", "set"]  # gets are not audited


def test_a_failed_set_is_audited_with_its_error_and_not_journaled():
    r = RouterSetup({"ports": READY})
    mod = r.modules["ports"]
    mod.persistent_list = ["port"]
    rid = r.route("ports", op="setop", table="port", params={"k": "v"})
    error = {"type": "IntegrityError", "message": "port 9 does not exist"}
    r.router.on_reply(mod, wire(P.Reply, 1, error, None, True))
    assert r.client.sent == [{"id": rid, "ok": False, "error": error}]
    assert mod.journal.appended == [] and mod.unsaved is False
    assert r.audit.records == [("alice", "setop", "ports", "port", {"k": "v"}, "IntegrityError: port 9 does not exist")]


def test_a_reply_for_a_request_already_answered_is_dropped():
    r = RouterSetup({"ports": READY})
    r.router.on_reply(r.modules["ports"], wire(P.Reply, 77, None, P.reply_entries([], False), True))
    assert r.client.frames == [] and r.modules["ports"].unsaved is False
    assert r.modules["ports"].channel.answers == [77]


def test_a_notify_goes_to_the_client_of_its_request():
    r = RouterSetup({"ports": READY})
    rid = r.route("ports", notify=True)
    r.router.on_notify(r.modules["ports"], wire(P.Notify, 1, "hello"))
    r.router.on_notify(r.modules["ports"], wire(P.Notify, 9, "nobody"))
    assert r.client.sent == [{"id": rid, "notify": "hello"}]


def test_an_agent_call_that_would_deadlock_is_refused_and_answers_free_the_edge():
    r = RouterSetup({"a": READY, "b": READY})
    a_rid = r.route("b", caller=["a", "serial", 1])
    assert list(r.modules["b"].inflight) == [1]
    b_rid = r.route("a", caller=["b", "serial", 2])
    ((rid, kind, message),) = errors(r.client)
    assert (rid, kind) == (b_rid, "DeadlockDetectedError")
    assert "get a.t called from b would deadlock: b → a → b" in message
    r.router.on_reply(r.modules["b"], wire(P.Reply, 1, None, P.reply_entries([], False), False))
    assert frames(r.client)[0]["id"] == a_rid
    r.route("a", caller=["b", "serial", 3])  # a waits on b no more
    assert len(r.modules["a"].inflight) == 1 and len(errors(r.client)) == 1


def test_a_held_call_whose_client_left_is_forgotten_by_the_graph():
    r = RouterSetup({"a": READY, "b": LOADING})
    agent_conn = FakeClient()
    r.route("b", caller=["a", "serial", 7], client=agent_conn)  # held: b is loading
    agent_conn.closed = True  # e.g. the agent's connection timed out and closed
    r.modules["b"].state = READY
    r.router.release_held(r.modules["b"])
    assert r.modules["b"].inflight == {} and r.modules["b"].channel.requests == []
    r.route("a", caller=["b", "serial", 8])  # a waits on b no more: admitted
    assert errors(r.client) == [] and len(r.modules["a"].inflight) == 1


def test_requests_held_for_a_worker_that_is_gone_stay_held():
    r = RouterSetup({"ports": READY})
    mod = r.modules["ports"]
    mod.saving = True
    rid = r.route("ports", op="set")
    mod.saving = False
    mod.channel.open = False  # its worker died during the save
    r.router.release_held(mod)
    assert [p.rid for p in mod.held] == [rid] and mod.channel.requests == [] and mod.inflight == {}


def test_refuse_held_cycles_fails_held_calls_the_module_now_waits_on():
    r = RouterSetup({"a": STARTING, "b": LOADING})
    from_b = r.route("a", caller=["b", "serial", 1])
    from_client = r.route("a")
    a = r.modules["a"]
    a.state, a.config_deps = WAITING_DEPS, ["b"]
    r.router.refuse_held_cycles(a)
    ((rid, kind, message),) = errors(r.client)
    assert (rid, kind) == (from_b, "DeadlockDetectedError") and "b → a → b" in message
    assert [p.rid for p in a.held] == [from_client]


# ---------------------------------------------------------------------------
# 7. graphs.py
# ---------------------------------------------------------------------------


def test_find_path_find_cycle_and_describe():
    edges = {"a": ["b"], "b": ["c", "d"], "c": ["a"], "d": [], "e": ["a"], "s": ["s"]}
    succ = lambda n: edges.get(n, ())  # noqa: E731
    assert graphs.find_path("e", "c", succ) == ["e", "a", "b", "c"]
    assert graphs.find_path("d", "a", succ) is None
    assert graphs.find_path("d", "d", succ) == ["d"]
    assert graphs.find_cycle("a", succ) == ["a", "b", "c", "a"]
    assert graphs.find_cycle("e", succ) is None  # e reaches a cycle but is not on one
    assert graphs.find_cycle("d", succ) is None
    assert graphs.find_cycle("s", succ) == ["s", "s"]
    assert graphs.describe(["a", "b", "a"]) == "a → b → a"
    assert graphs.describe([1, 2], name=lambda n: f"n{n}") == "n1 → n2"
