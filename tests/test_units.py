"""Pure logic: framing, the dependency graph, the restart policy, the agent API objects."""

import msgpack
import pytest
from cmsupervisor import deps
from cmsupervisor.restart import RestartPolicy
from hypothesis import given
from hypothesis import strategies as st

from cmactor import protocol as P
from cmactor.cmbackend import ActionStopped, CmAgent, CmContext, async_action
from cmactor.cmfrontend import parse_operation, wire_params
from cmactor.errors import (
    DeadlockDetectedError,
    ModuleUnavailable,
    OperationalError,
    ProgrammingError,
    from_wire,
    to_wire,
)

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.lists(values, max_size=10), st.integers(1, 50))
def test_frames_survive_any_split(messages, chunk):
    stream = b"".join(P.pack(m) for m in messages)
    reader = P.FrameReader()
    out = []
    for i in range(0, len(stream), chunk):
        out.extend(reader.feed(stream[i : i + chunk]))
    assert out == messages and reader.pending == 0


@given(st.binary(max_size=200))
def test_garbage_either_decodes_or_raises_frame_error(data):
    reader = P.FrameReader(max_frame=1000)
    try:
        reader.feed(data)
    except P.FrameError:
        pass


def test_oversized_frame_is_refused_from_its_header_alone():
    with pytest.raises(P.FrameError, match="exceeds the limit of 10 bytes"):
        P.FrameReader(max_frame=10).feed(b"\x00\x00\x00\x0b")


def test_frame_body_is_msgpack_only():
    body = msgpack.packb({"a": 1})
    assert P.pack({"a": 1}) == len(body).to_bytes(4, "big") + body


def test_parse_operation():
    assert parse_operation("  getnext vlan.member ") == ("getnext", "vlan", "member")
    for bad in ("get vlan", "put vlan.x", "get vlan.x.y", "get 1vlan.x", ""):
        with pytest.raises(ProgrammingError, match="malformed operation"):
            parse_operation(bad)


def test_wire_params_stringifies_and_drops_none():
    assert wire_params({"a": 1, "b": None, "c": "x", "d": True}) == {"a": "1", "c": "x", "d": "True"}
    assert wire_params(None) == {}


def test_errors_cross_the_wire_by_name():
    assert isinstance(from_wire(to_wire(DeadlockDetectedError, "a → b → a")), DeadlockDetectedError)
    assert issubclass(ModuleUnavailable, OperationalError) and issubclass(DeadlockDetectedError, OperationalError)
    unknown = from_wire({"type": "os.system", "message": "x"})
    assert type(unknown).__name__ == "DatabaseError"


def test_context_defaults_and_raise_error():
    ctx = CmContext({"a": "1"}, "VR-Default", op="set")
    assert ctx.dirty and not ctx.is_getone and ctx.vr_name == "VR-Default"
    assert CmContext(op="get").is_getone and not CmContext(op="get").dirty
    assert CmContext(op="getnext").is_getnext
    with pytest.raises(ActionStopped, match="nope"):
        ctx.raise_error("nope")
    assert not issubclass(ActionStopped, Exception)  # an agent's `except Exception` cannot swallow it
    ctx.notify_cli("dropped without a callback")
    seen = []
    CmContext(notify=seen.append).notify_cli(3)
    assert seen == ["3"]


def test_agent_base_class():
    class Agent(CmAgent):
        @async_action
        def t_get(self, ctx):
            pass

    agent = Agent()
    assert agent.pool is None and agent.t_get._cmactor_async
    agent.event_load_start()
    agent.event_generate_default()


def test_find_cycle():
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert deps.find_cycle("a", graph) == ["a", "b", "c", "a"]
    assert deps.find_cycle("d", graph) is None
    assert deps.find_cycle("x", {"x": ["x"]}) == ["x", "x"]
    assert deps.format_cycle(["a", "b", "a"]) == "a → b → a"


def test_restart_policy_backoff_window_and_reset():
    policy = RestartPolicy(
        {"max_restarts": 3, "restart_window": 60, "restart_delay": 0.1, "restart_delay_max": 0.3, "stable_after": 10}
    )
    assert [policy.on_crash(t, 1) for t in (0, 1, 2)] == [0.1, 0.2, 0.3]
    assert policy.on_crash(3, 1) is None  # a fourth crash within the window
    policy.reset()
    assert policy.on_crash(4, 1) == 0.1
    assert policy.on_crash(100, 50) == 0.1  # stable for long enough: the delay starts over
    assert policy.on_crash(200, 1) == 0.2


def test_callback_pool_gives_every_waiting_action_a_thread_up_to_its_size():
    import threading

    from cmactor.worker import CallbackPool

    pool = CallbackPool(5, "test")
    barrier = threading.Barrier(5, timeout=10)  # passes only if all 5 run at once
    done = []
    for n in range(5):
        pool.submit(lambda n=n: (barrier.wait(), done.append(n)))
    deadline = threading.Event()
    for _ in range(100):
        if len(done) == 5:
            break
        deadline.wait(0.05)
    assert sorted(done) == [0, 1, 2, 3, 4]


def test_callback_pool_runs_a_burst_and_never_exceeds_its_size():
    import threading

    from cmactor.worker import CallbackPool

    pool = CallbackPool(3, "test")
    lock = threading.Lock()
    running = [0, 0]  # now, most at once
    finished = threading.Semaphore(0)

    def work():
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        threading.Event().wait(0.001)
        with lock:
            running[0] -= 1
        finished.release()

    for _ in range(200):
        pool.submit(work)
    for _ in range(200):
        assert finished.acquire(timeout=10)
    assert 1 <= running[1] <= 3
