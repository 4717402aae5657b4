"""Pure logic: framing, the dependency graph, the restart policy, the agent API objects."""

import json

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from cmactor.cmbackend import ActionStopped, CmAgent, CmContext, async_action
from cmactor.cmfrontend import description, parse_operation, wire_params
from cmactor.errors import (
    DeadlockDetectedError,
    ModuleUnavailable,
    OperationalError,
    ProgrammingError,
    from_wire,
    to_wire,
)
from cmactor.wire import protocol as P
from cmactor.wire.validate import Request, decode_request
from cmsupervisor.front.server import BadRequest, parse_request
from cmsupervisor.persistence import store
from cmsupervisor.supervision import deps
from cmsupervisor.supervision.recovery import RestartPolicy

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
    assert out == messages


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
    assert parse_operation("  getnext vlan.member ") == ("getnext", "vlan", "member")  # from the cache
    for bad in ("get vlan", "put vlan.x", "get vlan.x.y", "get 1vlan.x", "", None, ["get a.b"]):
        for _ in range(2):  # a refused operation is refused again, not cached
            with pytest.raises(ProgrammingError, match="malformed operation"):
                parse_operation(bad)


def test_description_names_each_column_as_a_string():
    assert description(("key", "value")) == (
        ("key", str, None, None, None, None, None),
        ("value", str, None, None, None, None, None),
    )
    assert description(()) is None


@given(
    st.lists(st.dictionaries(st.text(), st.text() | st.none(), max_size=4), max_size=5),
    st.booleans(),
    st.integers(0, 2**63 - 1),
)
def test_a_worker_encoded_reply_reaches_the_client_as_one_map(rows, more, rid):
    frame = P.reply_frame(rid, P.reply_entries(rows, more))
    assert P.FrameReader().feed(frame) == [{"id": rid, "ok": True, "rows": rows, "more": more}]


def request(**fields):
    return {"id": 7, "op": "get", "module": "ports", "table": "port", "params": {"name": "1"}, "user": "u", **fields}


def test_parse_request_fills_in_the_defaults():
    req = parse_request(request())
    assert req.params == {"name": "1"} and req.after is None and req.batch == P.DEFAULT_BATCH
    req = parse_request(
        request(
            vr="VR-Mgmt", batch=5, after={"name": "1", "gone": None}, hold=0.5, caller=["vlan", "async", 3], notify=True
        )
    )
    assert req.batch == 5 and req.after == {"name": "1", "gone": None} and req.vr == "VR-Mgmt"
    assert parse_request(request(params=None)).params == {}
    assert parse_request({"id": 1, "op": "status"}) == Request(id=1, op="status")


@pytest.mark.parametrize(
    "message, rid, words",
    [
        ([1, 2], None, "must be a msgpack map, got list"),
        (request(id="7"), None, "'id' must be an integer"),
        (request(id=True), None, "'id' must be an integer"),
        (request(op="drop"), 7, "unknown op 'drop'"),
        (request(op=["get"]), 7, "unknown op"),
        (request(user=3), 7, "'user' must be a str"),
        (request(module="_x"), 7, "get: bad module name '_x'"),
        (request(module=["ports"]), 7, "bad module name"),
        (request(table=None), 7, "bad table name None"),
        (request(params=[]), 7, "'params' must be a map of str to str, got list"),
        (request(params={"name": 1}), 7, "'params.name' must be a str, got int"),
        (request(params={"name": None}), 7, "'params.name' must be a str, got NoneType"),
        (request(vr=1), 7, "'vr' must be a str or nil, got int"),
        (request(batch=0), 7, "'batch' must be an integer from 1 to 100000"),
        (request(batch=True), 7, "'batch' must be an integer"),
        (request(after={"name": 2}), 7, "'after.name' must be a str"),
        (request(hold=-1), 7, "'hold' must be a number of seconds >= 0"),
        (request(hold=True), 7, "'hold' must be a number"),
        (request(caller=["vlan", "sideways", 3]), 7, "'caller' must be [module, 'serial'|'async', request id]"),
        ({"id": 1, "op": "restart", "module": "../x"}, 1, "restart: bad module name"),
    ],
)
def test_parse_request_refuses_with_the_field_named(message, rid, words):
    with pytest.raises(BadRequest) as caught:
        parse_request(message)
    assert caught.value.rid == rid and words in str(caught.value)


# Request maps near good ones, any field now and then of another type or missing, for
# the two checks of validate.py: msgspec's (decode_request) and the hand check.
_TEXT = st.sampled_from(["", "1", "name", "key"])
_NAMES = st.sampled_from(["ports", "port", "P9", "ports", "port", "P9", "_x", "", "a-b"])
_ODD = (
    st.none()
    | st.booleans()
    | st.integers(-2, 2)
    | st.floats()
    | st.binary(max_size=2)
    | st.lists(_TEXT, max_size=2)
    | st.dictionaries(_TEXT | st.binary(max_size=1), _TEXT | st.none() | st.integers(0, 1), max_size=2)
)
_FIELDS = {
    "id": st.integers(-(2**63), 2**64 - 1),
    "op": st.sampled_from(P.DATA_OPS + P.CONTROL_OPS + ("drop",)),
    "user": _TEXT,
    "module": _NAMES,
    "table": _NAMES,
    "params": st.dictionaries(_TEXT, _TEXT, max_size=3),
    "vr": _TEXT,
    "notify": st.booleans(),
    "after": st.dictionaries(_TEXT, _TEXT | st.none(), max_size=2),
    "batch": st.sampled_from([0, 1, 5, 100000, 100001]),
    "index": st.lists(_TEXT, max_size=3),
    "match": st.lists(_TEXT, max_size=2),
    "hold": st.sampled_from([0, 0.5, 86400, 86401, -1, float("nan"), float("inf")]),
    "caller": st.tuples(_NAMES, st.sampled_from(["serial", "async", "x"]), st.integers(0, 2)).map(list),
    "modules": st.lists(_NAMES, max_size=2),
    "extra": _TEXT,
}
_REQUIRED = ("id", "op", "module", "table")  # not always there either
_DATA_FIELDS = ("module", "table", "params", "vr", "notify", "after", "batch", "index", "match", "hold")
_CONTROL_FIELDS = {"status": ("module",), "route": ("module",), "restart": ("module",), "export": ("modules",)}


def _mostly(good):
    """``good``, or one time in eight an odd value."""
    return st.integers(0, 7).flatmap(lambda n: _ODD if n == 0 else good)


def _fields_read(op):
    """The fields of a Request its op reads: the others may differ between the two checks."""
    return ("id", "op", "user", "caller", *(_DATA_FIELDS if op in P.DATA_OPS else _CONTROL_FIELDS.get(op, ())))


@settings(max_examples=3000, deadline=None)
@given(
    st.fixed_dictionaries(
        {name: _mostly(_FIELDS[name]) for name in _REQUIRED},
        optional={name: _mostly(field) for name, field in _FIELDS.items() if name not in _REQUIRED},
    ),
    st.sets(st.sampled_from(_REQUIRED), max_size=1),
)
def test_the_fast_check_and_the_hand_check_agree(message, missing):
    for name in missing:
        del message[name]
    body = msgpack.packb(message)
    answers = []
    for decoded in (decode_request(body), msgpack.unpackb(body, strict_map_key=True)):
        try:
            request = parse_request(decoded)
        except BadRequest as exc:
            answers.append((exc.rid, str(exc)))
        else:
            answers.append(tuple(getattr(request, name) for name in _fields_read(request.op)))
    assert answers[0] == answers[1]


def test_a_good_request_takes_the_fast_check():
    for message in (request(), request(op="getnext", index=["name"], match=["name"], after={"name": None}, hold=1)):
        assert type(decode_request(msgpack.packb(message))) is Request
    assert type(decode_request(msgpack.packb({"id": 1, "op": "export", "modules": ["ports"]}))) is Request


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
    plain, flagged = CmContext(), CmContext({}, None, "get", is_async=True, is_save=True, is_load=True)
    assert (plain.vr_name, plain.is_async, plain.is_save, plain.is_load) == (None, False, False, False)
    assert flagged.is_async and flagged.is_save and flagged.is_load
    params = {"a": "1"}
    CmContext(params).params["a"] = "2"  # the agent's copy
    assert params == {"a": "1"}


def test_the_package_says_its_version_and_its_loggers_print_nothing_unasked():
    import importlib.metadata
    import logging

    import cmactor

    assert cmactor.__version__ == importlib.metadata.version("cmactor")
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("cmactor").handlers)


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


def rewrite_header(path, **fields):
    header, body = path.read_bytes().split(b"\n", 1)
    path.write_bytes(json.dumps({**json.loads(header), **fields}).encode() + b"\n" + body)


@pytest.mark.parametrize(
    "modules, words",
    [
        ([["echo", 1, 2]], "its header's module table is a list, not a map"),
        ({"echo": [1]}, "bad section bounds for module 'echo': [1]"),
        ({"echo": ["1", 2]}, "bad section bounds for module 'echo'"),
        ({"echo": [1, 10_000]}, "bad section bounds for module 'echo'"),
        ({"echo": [3, -2]}, "bad section bounds for module 'echo'"),
    ],
)
def test_a_config_file_whose_header_misplaces_a_section_is_refused(tmp_path, modules, words):
    path = tmp_path / store.FILENAME
    store.write(str(path), {"echo": b'{"kv":[]}'})
    assert store.read(str(path)) == {"echo": b'{"kv":[]}'}
    rewrite_header(path, modules=modules)  # the checksum covers the body only: this passes it
    with pytest.raises(store.StoreError, match=f"config file {path}: .*") as caught:
        store.read(str(path))
    assert words in str(caught.value)
