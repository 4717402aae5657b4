"""Agents that call each other: every call completes, or is refused at once naming the cycle."""

import threading
import time

import pytest
from fakes import module
from helpers import agent
from hypothesis import HealthCheck, given, settings, strategies as st

from cmactor.wire.validate import Request
from cmsupervisor.front.deadlock import WaitGraph
from cmsupervisor.supervision.modules import Pending
from cmsupervisor.supervision.states import (
    LOADING,
    READY,
    STARTING,
    WAITING_DEPS,
)

CALLER = agent("caller.py:main")
MODULES = ("a", "b", "c", "d", "e")


def caller(**env):
    return {"entry": CALLER, "env": {k.upper(): str(v) for k, v in env.items()}}


@pytest.fixture
def five(supervisor):
    return supervisor({name: CALLER for name in MODULES})


def run_chain(sup, chain):
    """Send ``chain`` (list of (module, lane)) from a client; return the top row as a dict."""
    (first, lane), rest = chain[0], chain[1:]
    cur = sup.connect(timeout=60).cursor()
    cur.execute(f"get {first}.{'a' if lane == 'a' else 's'}", {"chain": ",".join(f"{m}:{ln}" for m, ln in rest)})
    return dict(zip([d[0] for d in cur.description], cur.fetchone()))


def timed(sup, chain):
    start = time.monotonic()
    row = run_chain(sup, chain)
    return row, time.monotonic() - start


def test_a_module_calling_itself_from_its_serial_lane(five):
    row, took = timed(five, [("a", "s"), ("a", "s")])
    assert "called from a would deadlock: a → a" in row["deadlock"]
    assert took < 1


def test_two_module_cycle(five):
    row, took = timed(five, [("a", "s"), ("b", "s"), ("a", "s")])
    assert "would deadlock: b → a → b" in row["deadlock"]
    assert took < 1


def test_three_module_cycle(five):
    row, took = timed(five, [("a", "s"), ("b", "s"), ("c", "s"), ("a", "s")])
    assert "would deadlock: c → a → b → c" in row["deadlock"]
    assert took < 1


def test_a_chain_without_a_cycle_is_admitted_and_completes(five):
    assert run_chain(five, [("a", "s"), ("b", "s"), ("c", "s"), ("d", "s"), ("e", "s")]) == {"depth": "5"}


def test_the_same_cycle_started_from_an_async_action_completes(five):
    assert run_chain(five, [("a", "a"), ("b", "s"), ("a", "s")]) == {"depth": "3"}
    assert run_chain(five, [("a", "s"), ("b", "a"), ("a", "a")]) == {"depth": "3"}


def test_async_hops_through_a_blocked_serial_lane_are_still_seen(five):
    # a's serial lane waits (through b's async action) on a call back into it
    row = run_chain(five, [("a", "s"), ("b", "a"), ("a", "s")])
    assert "would deadlock: b(async a) → a → b(async a)" in row["deadlock"]


def test_pool_exhaustion_is_a_deadlock(supervisor):
    # The chain's first call through the supervisor, so that it takes a pool thread (a
    # direct read of an @async_action runs on the worker's direct reader, outside the pool).
    sup = supervisor({"p": caller(caller_pool=2), "q": caller(caller_pool=3)}, direct_reads=False)
    row = run_chain(sup, [("p", "a"), ("p", "a"), ("p", "a")])
    assert "all 2 threads of p's pool are taken by calls waiting on this one" in row["deadlock"]
    assert run_chain(sup, [("q", "a"), ("q", "a"), ("q", "a")]) == {"depth": "3"}


def test_four_clients_run_the_deadlock_prone_chain_to_completion(supervisor):
    sup = supervisor({"a": CALLER, "b": CALLER})
    results = []

    def client():
        for _ in range(200):
            results.append(run_chain(sup, [("a", "a"), ("b", "s"), ("a", "s")]))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 800 and all(r == {"depth": "3"} for r in results)


def test_load_time_queries_that_wait_on_each_other_are_detected(supervisor):
    start = time.monotonic()
    sup = supervisor({"x": caller(load_query="y"), "y": caller(load_query="x", load_delay=0.3)}, hold_timeout=10)
    assert time.monotonic() - start < 5  # not held until hold_timeout
    cur = sup.connect().cursor()
    results = {}
    for name in ("x", "y"):
        cur.execute(f"get {name}.load")
        results[name] = cur.fetchone()[0]
    assert results["x"] == "depth 1"
    assert "y → x → y" in results["y"]


def test_a_load_time_query_to_a_module_waiting_on_this_one(supervisor):
    start = time.monotonic()
    sup = supervisor({"x": caller(caller_deps="y"), "y": caller(load_query="x")}, hold_timeout=10)
    assert time.monotonic() - start < 5
    cur = sup.connect().cursor()
    cur.execute("get y.load")
    assert "y → x → y" in cur.fetchone()[0]


def test_a_load_time_query_held_for_a_module_that_then_waits_on_the_caller(supervisor):
    # y's load calls x while x is still STARTING (its config_deps unknown): the call is
    # held. Then x registers, depending on y, which closes the cycle: refused at once.
    start = time.monotonic()
    sup = supervisor({"x": caller(caller_deps="y", init_delay=1), "y": caller(load_query="x")}, hold_timeout=10)
    assert time.monotonic() - start < 6
    cur = sup.connect().cursor()
    cur.execute("get y.load")
    assert "y → x → y" in cur.fetchone()[0]


hops = st.lists(st.tuples(st.sampled_from(MODULES[:4]), st.sampled_from("sa")), min_size=1, max_size=6)


def expected_refusal(chain):
    """Index of the hop the detector must refuse: the first serial hop whose module's serial lane is already held."""
    held = set()
    for i, (name, lane) in enumerate(chain):
        if lane == "s":
            if name in held:
                return i
            held.add(name)
    return None


def test_random_call_graphs_complete_or_are_refused_exactly_when_they_cycle(supervisor):
    sup = supervisor({name: CALLER for name in MODULES[:4]})

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(hops)
    def check(chain):
        row, took = timed(sup, chain)
        refused_at = expected_refusal(chain)
        if refused_at is None:
            assert row == {"depth": str(len(chain))}
        else:
            assert "deadlock" in row and "would deadlock:" in row["deadlock"]
        assert took < 10

    check()


def test_concurrent_random_call_graphs_never_hang(supervisor):
    import random

    sup = supervisor({name: CALLER for name in MODULES[:3]})
    rng = random.Random(7)
    chains = [[(rng.choice("abc"), rng.choice("sa")) for _ in range(rng.randint(1, 4))] for _ in range(120)]
    outcomes = []

    def client(part):
        for chain in part:
            outcomes.append(run_chain(sup, chain))

    threads = [threading.Thread(target=client, args=(chains[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(outcomes) == len(chains)
    for row in outcomes:
        assert "depth" in row or "would deadlock:" in row["deadlock"]
    for chain in chains:  # run alone, each chain is refused exactly when it cycles by itself
        row = run_chain(sup, chain)
        assert ("deadlock" in row) == (expected_refusal(chain) is not None)


# The part on its own, with fakes.


def graph_of(*mods):
    modules = {m.name: m for m in mods}
    return modules, WaitGraph(modules)


def agent_call(caller, lane, sid, target, table="t", op="get"):
    return Pending(None, 1, Request(id=1, op=op, module=target, table=table, caller=(caller, lane, sid)), 0.0)


def admit(graph, modules, pending):
    return graph.admit(modules[pending.request.module], pending)


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
    running = Pending(None, 9, Request(id=9, op="get", module="a", table="t"), 0.0)
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
        busy = Pending(None, sid, Request(id=sid, op="get", module=mod.name, table="t"), 0.0)
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
    from_client = Pending(None, 3, Request(id=3, op="get", module="a", table="t"), 0.0)
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
