"""The router (front/routing.py) with fake collaborators: no Supervisor, no worker processes."""

import itertools
import time

import pytest
from fakes import FakeAudit, FakeClient, RouterLoop, module, wire

from cmactor.errors import DatabaseError, action_timed_out, to_wire
from cmactor.wire import protocol as P
from cmactor.wire.validate import Request
from cmsupervisor.front.deadlock import WaitGraph
from cmsupervisor.front.routing import Router
from cmsupervisor.supervision.modules import Pending
from cmsupervisor.supervision.states import (
    FAILED,
    LOADING,
    READY,
    RESTARTING,
    STARTING,
    STOPPING,
    WAITING_DEPS,
)


class RouteChannel:
    def __init__(self, sids):
        self._sids = sids
        self.requests = []
        self.answers = []
        self.open = True  # False once the worker is gone

    def request(self, op, table, params, vr, flags, batch, after, index, match, method, is_async):
        sid = next(self._sids)
        self.requests.append((sid, op, table, params, vr, flags, batch, after, index, match, method, is_async))
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

    def append(self, op, table, params, sid=0, is_async=False, key=None):
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
        req = Request(
            id=next(self.rids), op=op, module=module_name, table=table, params=params or {}, user="alice", **extra
        )
        self.router.route(client or self.client, req)
        return req.id


def frames(client):
    return [msg for frame in client.frames for msg in P.FrameReader().feed(frame)]


def errors(client):
    return [(m["id"], m["error"]["type"], m["error"]["message"]) for m in client.sent if m.get("ok") is False]


def test_a_request_to_a_ready_module_is_dispatched():
    r = RouterSetup({"ports": READY})
    rid = r.route("ports", params={"name": "1"}, vr="VR-Mgmt", notify=True)
    mod = r.modules["ports"]
    assert mod.channel.requests == [
        (1, "get", "t", {"name": "1"}, "VR-Mgmt", P.F_NOTIFY, P.DEFAULT_BATCH, None, None, None, None, False)
    ]
    assert list(mod.inflight) == [1]
    pending = mod.inflight[1]
    assert (pending.rid, pending.sid) == (rid, 1) and pending.dispatched_at is not None
    assert r.client.sent == [] and r.loop.timers == []


def test_a_request_for_an_async_action_is_marked_async():
    r = RouterSetup({"ports": READY})
    r.modules["ports"].async_actions = frozenset({"t_get", "t_show"})
    r.modules["ports"].async_ops = frozenset({("t", "get")})
    r.route("ports")
    r.route("ports", table="other")
    r.route("ports", table="other", method="show")  # runs other_show: not async
    r.route("ports", table="t", method="show")  # runs t_show: async
    assert [req[-1] for req in r.modules["ports"].channel.requests] == [True, False, False, True]
    assert [req[-2] for req in r.modules["ports"].channel.requests] == [None, None, "show", "show"]
    assert [p.is_async for p in r.modules["ports"].inflight.values()] == [True, False, False, True]


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
            Pending(r.client, 9, Request(id=9, op="get", module="ports", table="t", caller=["vlan", "serial", 4]), 0.0),
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


def test_subscribed_to_its_modules_the_router_sends_and_fails_what_is_held_as_they_change():
    r = RouterSetup({"ports": LOADING, "vlan": STARTING})
    for mod in r.modules.values():  # as the supervisor wires them
        mod.subscribe(r.router.module_changed)
    ports, vlan = r.modules["ports"], r.modules["vlan"]
    first = r.route("ports")
    ports.became_ready()
    assert [p.rid for p in ports.inflight.values()] == [first] and len(ports.held) == 0
    ports.save_began()
    during = r.route("ports")
    assert [p.rid for p in ports.held] == [during]
    ports.save_ended()
    assert [p.rid for p in ports.inflight.values()] == [first, during] and len(ports.held) == 0
    held = r.route("vlan", hold=60)
    vlan.failed("crashed too often")
    assert errors(r.client) == [
        (
            held,
            "ModuleUnavailable",
            "module 'vlan' is quarantined (FAILED): crashed too often; revive it with `cmactor restart vlan`",
        )
    ]
    assert r.loop.timers == []  # every hold timer cancelled


def test_a_request_in_flight_past_its_action_timeout_fails_and_the_router_looks_again():
    r = RouterSetup({"ports": READY})
    mod = r.modules["ports"]
    mod.options["action_timeout"] = 2.0
    old = r.route("ports")
    r.loop.now += 1.5
    new = r.route("ports")
    r.loop.now += 0.6
    r.router.time_out()
    assert errors(r.client) == [(old, "OperationalError", action_timed_out("get", "ports", "t", 2.0))]
    assert [p.rid for p in mod.inflight.values()] == [new]
    ((delay, fn, _),) = r.loop.timers
    assert delay == 0.5 and fn == r.router.time_out  # a quarter of the shortest action_timeout
    r.loop.timers.clear()
    r.router.close()
    r.router.time_out()
    assert r.loop.timers == []  # not after the stop began


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
