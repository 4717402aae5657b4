"""Agents that call each other: every call completes, or is refused at once naming the cycle."""

import threading
import time

import pytest
from conftest import agent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    for i, (module, lane) in enumerate(chain):
        if lane == "s":
            if module in held:
                return i
            held.add(module)
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
