"""actions.py on its own: an agent in this process, replies caught by a fake send."""

import json
import logging

import msgpack
import msgspec
import pytest

from cmactor import cmbackend
from cmactor.cmbackend import CmAgent, async_action
from cmactor.errors import ProgrammingError
from cmactor.wire import protocol as P
from cmactor.worker.actions import Actions

MODULE = "fake"


class Fake(CmAgent):
    """Table t: rows kept by key "k", walked in key order. Every call is recorded."""

    def __init__(self, rows=()):
        super().__init__()
        self.rows = [dict(row) for row in rows]
        self.calls = []
        self.fields = None  # when set, t_get replies this as ctx.fields
        self.fail = {}  # event or action name -> exception it raises

    def _record(self, name, ctx=None):
        if ctx is None:
            self.calls.append((name,))
        else:
            flags = {f for f in ("is_getnext", "is_save", "is_load", "is_async") if getattr(ctx, f)}
            self.calls.append((name, dict(ctx.params), flags, cmbackend.current_caller()))
        if name in self.fail:
            raise self.fail[name]

    def event_load_start(self):
        self._record("event_load_start")

    def event_load_complete(self):
        self._record("event_load_complete")

    def event_generate_default(self):
        self._record("event_generate_default")

    def event_save_start(self):
        self._record("event_save_start")

    def event_save_complete(self):
        self._record("event_save_complete")

    def t_get(self, ctx):
        self._record("t_get", ctx)
        if self.fields is not None:
            ctx.fields = self.fields
        elif ctx.is_getnext:
            start = ctx.params.get("k")
            following = [row for row in self.rows if start is None or row["k"] > start]
            if following:
                ctx.fields = dict(following[0])
                if len(following) > 1:
                    ctx.more()
        else:
            ctx.fields = next((dict(row) for row in self.rows if row["k"] == ctx.params.get("k")), {})

    def t_set(self, ctx):
        self._record("t_set", ctx)
        if ctx.params.get("v") == "refuse":
            ctx.raise_error(f"refused {ctx.params['k']}")
        self.rows.append(ctx.params)

    def t_setop(self, ctx):
        self._record("t_setop", ctx)

    def u_get(self, ctx):
        self._record("u_get", ctx)

    @async_action
    def t_show(self, ctx):
        self._record("t_show", ctx)
        ctx.fields = {"shown": ctx.params.get("k")}

    @async_action
    def slow_get(self, ctx):
        ctx.fields = {"lane": "async" if ctx.is_async else "serial"}


ROWS = [{"k": str(n), "v": f"v{n}", "note": None} for n in range(1, 6)]


@pytest.fixture
def agent():
    return Fake(ROWS)


@pytest.fixture
def sent():
    """Every message the actions send, each with the caller set when it was sent."""
    return []


def actions_for(agent, sent):
    return Actions(MODULE, agent, lambda msg: sent.append((msg, cmbackend.current_caller())))


def wire(kind, *fields):
    """A message of ``kind`` as the worker reads it off the wire: built, encoded, then decoded."""
    return P.CHANNEL.decode(msgspec.msgpack.encode(kind(*fields)))


@pytest.fixture
def actions(agent, sent):
    return actions_for(agent, sent)


def req(
    op="get",
    table="t",
    params=None,
    sid=7,
    flags=0,
    batch=P.DEFAULT_BATCH,
    after=None,
    vr=None,
    index=None,
    match=None,
    method=None,
):
    return wire(P.Req, sid, op, table, params or {}, vr, flags, batch, after, index, match, method)


@pytest.fixture
def run(actions, sent):
    def run(request, is_async=False, actions=actions):
        """Execute ``request`` as the worker does, and return the one reply sent."""
        method, _ = actions.lookup(request.table, request.op, request.method)
        before = len(sent)
        actions.execute(request, method, is_async)
        [reply] = [msg for msg, _ in sent[before:] if type(msg) is P.Reply]
        return reply

    return run


def entries(reply):
    """A success reply's entries, decoded as the client's reply map would be."""
    assert reply.error is None, reply.error
    return msgpack.unpackb(b"\x83" + reply.entries)  # reply_entries() leaves out the 3-entry map header


# -- execute ---------------------------------------------------------------------


def test_a_get_replies_its_fields_as_strings_with_none_kept(actions, agent, sent):
    agent.fields = {"k": 1, "on": True, "gone": None, "name": "x", "ratio": 0.5}
    reply = actions.execute(req(params={"k": "1"}), actions.lookup("t", "get")[0], False)
    assert reply is None  # it is sent, not returned
    [(msg, caller)] = sent
    assert type(msg) is P.Reply and msg.sid == 7 and msg.dirty is False
    assert entries(msg) == {
        "ok": True,
        "rows": [{"k": "1", "on": "True", "gone": None, "name": "x", "ratio": "0.5"}],
        "more": False,
    }
    assert caller == (MODULE, "serial", 7)  # the reply leaves before the caller is reset
    assert cmbackend.current_caller() is None


def test_a_get_with_no_fields_has_no_rows_and_set_is_dirty(run):
    assert entries(run(req(params={"k": "404"})))["rows"] == []
    reply = run(req(op="set", params={"k": "9", "v": "x"}))
    assert reply.dirty is True and entries(reply) == {"ok": True, "rows": [], "more": False}


def test_the_action_runs_as_its_request_on_its_lane(run, agent):
    run(req(op="getone", params={"k": "2"}, sid=11), is_async=True)
    [(name, params, flags, caller)] = agent.calls
    assert (name, params, flags, caller) == ("t_get", {"k": "2"}, {"is_async"}, (MODULE, "async", 11))
    assert entries(run(req(op="get", table="slow"), is_async=True))["rows"] == [{"lane": "async"}]


def test_raise_error_is_a_database_error_with_its_message(run, agent):
    reply = run(req(op="set", params={"k": "3", "v": "refuse"}))
    assert reply.error == {"type": "DatabaseError", "message": "refused 3"}
    assert reply.entries is None and reply.dirty is False
    assert agent.rows == ROWS  # the code after raise_error did not run


def test_an_exception_is_a_database_error_naming_op_module_table_and_type(run, agent, caplog):
    agent.fail["t_get"] = KeyError("no such thing")
    with caplog.at_level(logging.ERROR, logger="cmactor.worker"):
        reply = run(req(op="getnext"))
    assert reply.error == {"type": "DatabaseError", "message": "getnext fake.t raised KeyError: 'no such thing'"}
    [record] = caplog.records
    assert "module fake: getnext fake.t raised" in record.getMessage()
    assert "Traceback (most recent call last)" in record.getMessage()  # the traceback is logged
    assert cmbackend.current_caller() is None


@pytest.mark.parametrize(
    "fields, words",
    [
        ({1: "one"}, "field name 1 is a int, not a str"),
        (["k", "1"], "ctx.fields must be a dict, got list"),
        (
            {"k": type("Bad", (), {"__str__": lambda self: 1 / 0})()},
            "field 'k': str() of its value raised ZeroDivisionError: division by zero",
        ),
    ],
)
def test_fields_that_cannot_cross_the_wire_are_a_data_error(run, agent, fields, words):
    agent.fields = fields
    reply = run(req(op="get"))
    assert reply.error == {"type": "DataError", "message": f"module 'fake' t_get replied badly: {words}"}


def test_notify_text_goes_out_only_when_the_client_asked(run, sent):
    class Talker(Fake):
        def t_setop(self, ctx):
            ctx.notify_cli("half way")
            ctx.notify_cli(100)

    talker = actions_for(Talker(), sent)
    run(req(op="setop", sid=3), actions=talker)
    assert [msg for msg, _ in sent if type(msg) is P.Notify] == []
    run(req(op="setop", sid=4, flags=P.F_NOTIFY), actions=talker)
    notes = [(msg, caller) for msg, caller in sent if type(msg) is P.Notify]
    assert notes == [
        (P.Notify(4, "half way"), (MODULE, "serial", 4)),
        (P.Notify(4, "100"), (MODULE, "serial", 4)),
    ]


# -- lookup ------------------------------------------------------------------------


def test_lookup_finds_each_action_once_and_says_which_are_async(actions):
    found = actions.lookup("t", "getnext")
    assert found[0].__func__ is Fake.t_get and found[1] is False
    assert actions.lookup("t", "getnext") is found  # cached per (table, op)
    assert actions.lookup("slow", "get")[1] is True


def test_a_read_with_a_method_runs_that_action_of_the_table(actions, run):
    found = actions.lookup("t", "get", "show")
    assert found[0].__func__ is Fake.t_show
    assert found[1] is True and actions.lookup("t", "get") != found  # cached apart from the get
    assert entries(run(req(params={"k": "3"}, method="show")))["rows"] == [{"shown": "3"}]
    with pytest.raises(ProgrammingError) as caught:
        actions.lookup("u", "get", "show")
    assert str(caught.value) == "module 'fake' table 'u' has no 'show' method: define u_show(self, ctx) in the agent"


def test_lookup_of_a_table_the_agent_lacks_names_module_table_and_its_tables(actions):
    with pytest.raises(ProgrammingError) as caught:
        actions.lookup("vlan", "get")
    assert str(caught.value) == (
        "module 'fake' has no table 'vlan' (no vlan_get/_set/_setop method); its tables: slow, t, u"
    )


def test_lookup_of_an_op_the_table_lacks_names_module_table_and_op(actions):
    with pytest.raises(ProgrammingError) as caught:
        actions.lookup("u", "setop")
    assert str(caught.value) == (
        "module 'fake' table 'u' has no 'setop' action: define u_setop(self, ctx) in the agent"
    )


def test_before_the_agent_registers_every_lookup_fails_and_none_is_cached(sent):
    actions = Actions(MODULE, None, sent.append)
    for _ in range(2):
        with pytest.raises(ProgrammingError, match="module 'fake' serves no tables: it is a plain process"):
            actions.lookup("t", "get")
    with pytest.raises(ProgrammingError, match="its tables: none"):
        Actions(MODULE, CmAgent(), sent.append).lookup("t", "get")


# -- the getnext walk ------------------------------------------------------------------


def walked_params(agent):
    return [params for name, params, *_ in agent.calls if name == "t_get"]


def test_a_walk_gets_the_callers_params_then_each_previous_row_without_none(run, agent):
    reply = run(req(op="getnext", params={"f": "x"}))
    assert entries(reply) == {"ok": True, "rows": ROWS, "more": False}
    assert walked_params(agent) == [
        {"f": "x"},
        {"f": "x", "k": "1", "v": "v1"},
        {"f": "x", "k": "2", "v": "v2"},
        {"f": "x", "k": "3", "v": "v3"},
        {"f": "x", "k": "4", "v": "v4"},
    ]
    assert all(flags == {"is_getnext"} for name, _, flags, _ in agent.calls)
    assert reply.dirty is False


def test_a_walk_is_cut_at_batch_with_more_and_after_resumes_it(run, agent):
    first = entries(run(req(op="getnext", batch=2)))
    assert first == {"ok": True, "rows": ROWS[:2], "more": True}
    agent.calls.clear()
    rest = entries(run(req(op="getnext", params={"f": "x"}, batch=2, after=first["rows"][-1])))
    assert rest == {"ok": True, "rows": ROWS[2:4], "more": True}
    assert walked_params(agent) == [{"f": "x", "k": "2", "v": "v2"}, {"f": "x", "k": "3", "v": "v3"}]
    assert entries(run(req(op="getnext", batch=2, after=rest["rows"][-1]))) == {
        "ok": True,
        "rows": ROWS[4:],
        "more": False,
    }


def test_a_walk_of_an_empty_table_or_without_more_stops_at_once(run, agent):
    agent.rows = []
    assert entries(run(req(op="getnext"))) == {"ok": True, "rows": [], "more": False}
    agent.fields = {"k": "1"}  # a row, and no more()
    assert entries(run(req(op="getnext"))) == {"ok": True, "rows": [{"k": "1"}], "more": False}
    assert len(walked_params(agent)) == 2


class Members(CmAgent):
    """Table m keyed by (g, p), its getnext written as real EXOS agents write it: the
    index params are where to go on from (the rows after that key), any other param
    is a filter (``up``: only the rows with that value)."""

    def __init__(self):
        super().__init__()
        ups = iter(("yes", "no", "yes", "yes", "no", "yes"))
        self.rows = [{"g": g, "p": p, "up": next(ups)} for g in "abc" for p in "12"]
        self.calls = []

    def m_get(self, ctx):
        self.calls.append(dict(ctx.params))
        key = (ctx.params.get("g", ""), ctx.params.get("p", ""))
        up = ctx.params.get("up")
        rows = [row for row in self.rows if (row["g"], row["p"]) > key and up in (None, row["up"])]
        if rows:
            ctx.fields = dict(rows[0])
            if len(rows) > 1:
                ctx.more()

    def m_set(self, ctx):
        pass


def walk_of(agent, sent, **request):
    actions = actions_for(agent, sent)
    method, _ = actions.lookup("m", "getnext")
    actions.execute(req(op="getnext", table="m", **request), method, False)
    return entries(sent[-1][0])


def keys(walked):
    return [(row["g"], row["p"]) for row in walked["rows"]]


def test_without_index_columns_a_walk_carries_every_field_and_filtering_agents_skip_rows(sent):
    # Why index columns exist: "up" of the previous row becomes a filter of the next call.
    assert keys(walk_of(Members(), sent)) == [("a", "1"), ("b", "1"), ("b", "2"), ("c", "2")]


def test_a_walk_with_index_columns_carries_only_those_of_the_previous_row(sent):
    agent = Members()
    assert keys(walk_of(agent, sent, index=["g", "p"])) == [(g, p) for g in "abc" for p in "12"]
    assert agent.calls[:3] == [{}, {"g": "a", "p": "1"}, {"g": "a", "p": "2"}]
    agent.calls.clear()
    # A param that is not an index column rides along as the filter it is.
    assert keys(walk_of(agent, sent, params={"up": "yes"}, index=["g", "p"])) == [
        ("a", "1"),
        ("b", "1"),
        ("b", "2"),
        ("c", "2"),
    ]
    assert agent.calls[1] == {"up": "yes", "g": "a", "p": "1"}


def test_a_start_value_of_an_index_column_only_starts_the_walk(sent):
    agent = Members()
    assert keys(walk_of(agent, sent, params={"g": "b", "p": "1"}, index=["g", "p"])) == [
        ("b", "2"),
        ("c", "1"),
        ("c", "2"),
    ]
    assert agent.calls[:2] == [{"g": "b", "p": "1"}, {"g": "b", "p": "2"}]
    # An index column the rows lack keeps its param in every call (a search direction, say).
    agent.calls.clear()
    walk_of(agent, sent, params={"dir": "1"}, index=["g", "p", "dir"])
    assert agent.calls[:2] == [{"dir": "1"}, {"dir": "1", "g": "a", "p": "1"}]


def test_a_matched_index_column_stays_at_its_param_and_ends_the_walk_where_rows_differ(sent):
    agent = Members()
    walked = walk_of(agent, sent, params={"g": "b"}, index=["g", "p"], match=["g"])
    assert keys(walked) == [("b", "1"), ("b", "2")] and walked["more"] is False
    # The third call's row, ("c", "1"), ended the walk and was not sent.
    assert agent.calls == [{"g": "b"}, {"g": "b", "p": "1"}, {"g": "b", "p": "2"}]


def test_declared_index_columns_shape_getnext_and_the_save_walk(sent):
    agent = Members()
    agent.index_columns = {"m": ("g", "p")}
    assert len(walk_of(agent, sent)["rows"]) == 6
    agent.calls.clear()
    saved = actions_for(agent, sent).save(wire(P.Save, 30, ["m"]))
    assert saved.error is None and saved.rows == 6
    assert agent.calls[1] == {"g": "a", "p": "1"}
    # A request's own index wins over the declaration.
    agent.calls.clear()
    walk_of(agent, sent, index=["g", "p", "up"])
    assert agent.calls[1] == {"g": "a", "p": "1", "up": "yes"}


def test_a_request_index_adds_to_the_declared_key_and_never_replaces_it(sent):
    agent = Members()
    agent.index_columns = {"m": ("g", "p")}
    # exec_cli's "show next m g=b": only g named; the declared key still carries p.
    assert keys(walk_of(agent, sent, params={"g": "b"}, index=["g"])) == [
        ("b", "1"),
        ("b", "2"),
        ("c", "1"),
        ("c", "2"),
    ]
    agent.calls.clear()
    walk_of(agent, sent, params={"dir": "1"}, index=["dir"])
    assert agent.calls[1] == {"dir": "1", "g": "a", "p": "1"}


class Stuck(Members):
    """A getnext that ignores its params: every call answers the first row again."""

    def m_get(self, ctx):
        self.calls.append(dict(ctx.params))
        ctx.fields = dict(self.rows[0])
        ctx.more()


def test_a_walk_that_returns_the_same_row_twice_fails_naming_the_fix(sent):
    agent = Stuck()
    actions = actions_for(agent, sent)
    method, _ = actions.lookup("m", "getnext")
    actions.execute(req(op="getnext", table="m", index=["nosuch"]), method, False)
    reply = sent[-1][0]
    assert reply.error["type"] == "DatabaseError"
    assert reply.error["message"] == (
        "getnext fake.m did not advance: m_get returned {'g': 'a', 'p': '1', 'up': 'yes'} twice in a row; "
        "it handed back only the row's index columns nosuch; name all of the table's key columns "
        "(CmAgent.index_columns, add_index, Cursor.index, --index), or make m_get go on from them"
    )
    assert len(agent.calls) == 2  # stopped at the repeat, not at max_rows
    saved = actions.save(wire(P.Save, 31, ["m"]))
    assert saved.error.startswith("the save walk of 'm' did not advance: m_get returned")
    assert "it handed every field of the row back as params; make m_get return the row after" in saved.error


def test_saved_rows_of_a_read_only_table_are_passed_over_at_load(sent, caplog):
    agent = Members()
    actions = Actions(MODULE, agent, sent.append, read_only=["m"])
    section = json.dumps({"m": [{"g": "z", "p": "9"}]}).encode()
    with caplog.at_level("WARNING", logger="cmactor.worker"):
        loaded = actions.load(wire(P.Load, 32, section, []))
    assert loaded.error is None and loaded.failed == 0
    assert "1 saved rows of table 'm' not loaded: it has no m_set (read-only)" in caplog.text


# -- load ---------------------------------------------------------------------------------


def names(agent):
    return [call[0] for call in agent.calls]


def test_load_replays_saved_rows_then_the_journal_as_loads(sent):
    agent = Fake()
    actions = Actions(MODULE, agent, sent.append)
    section = json.dumps({"t": [{"k": "1", "v": "a"}, {"k": "2", "v": None}]}).encode()
    journal = [["setop", "t", {"k": "1", "op": "flip"}], ["set", "t", {"k": "3", "v": "c"}]]
    loaded = actions.load(wire(P.Load, 21, section, journal))
    assert loaded == P.Loaded(21, None, [], 0, None)
    assert names(agent) == ["event_load_start", "t_set", "t_set", "t_setop", "t_set", "event_load_complete"]
    caller = (MODULE, "serial", 21)
    assert agent.calls[1:5] == [
        ("t_set", {"k": "1", "v": "a"}, {"is_load"}, caller),
        ("t_set", {"k": "2"}, {"is_load"}, caller),  # a saved null is left out of params
        ("t_setop", {"k": "1", "op": "flip"}, {"is_load"}, caller),
        ("t_set", {"k": "3", "v": "c"}, {"is_load"}, caller),
    ]
    assert sent == [] and cmbackend.current_caller() is None  # returned, not sent


def test_load_counts_every_failed_row_and_details_the_first_ones(sent):
    agent = Fake()
    rows = [{"k": str(n), "v": "refuse"} for n in range(P.MAX_ROW_ERRORS + 5)] + [{"k": "ok", "v": "fine"}]
    section = json.dumps({"t": rows, "nosuch": [{"k": "x"}]}).encode()
    loaded = Actions(MODULE, agent, sent.append).load(wire(P.Load, 22, section, []))
    assert loaded.error is None and loaded.failed == P.MAX_ROW_ERRORS + 6
    assert len(loaded.failures) == P.MAX_ROW_ERRORS
    assert loaded.failures[0] == {"table": "t", "row": {"k": "0", "v": "refuse"}, "message": "refused 0"}
    assert agent.rows == [{"k": "ok", "v": "fine"}]  # the load went on past the failures
    agent.fail["t_set"] = ValueError("bad row")
    few = Actions(MODULE, agent, sent.append).load(
        wire(P.Load, 23, json.dumps({"nosuch": [{}], "t": [{}]}).encode(), [])
    )
    assert few.failures == [
        {"table": "nosuch", "row": {}, "message": "the agent has no nosuch_set method"},
        {"table": "t", "row": {}, "message": "ValueError: bad row"},
    ]
    assert few.failed == 2


def test_load_complete_runs_even_when_load_start_raises(actions, agent, caplog):
    agent.fail["event_load_start"] = RuntimeError("no disk")
    with caplog.at_level(logging.ERROR, logger="cmactor.worker"):
        loaded = actions.load(wire(P.Load, 24, json.dumps({"t": [{"k": "1"}]}).encode(), []))
    assert msgspec.structs.replace(loaded, detail=None) == P.Loaded(
        24, "event_load_start raised RuntimeError: no disk", [], 0, None
    )
    assert loaded.detail.startswith("Traceback") and loaded.detail.endswith("RuntimeError: no disk")
    assert names(agent) == ["event_load_start", "event_load_complete"]
    assert "module fake: event_load_start raised" in caplog.records[0].getMessage()


def test_a_stopped_load_complete_is_the_error(actions, agent):
    agent.fail["event_load_complete"] = cmbackend.ActionStopped("not today")
    loaded = actions.load(wire(P.Load, 25, b'{"t":[]}', []))
    assert loaded.error == "event_load_complete stopped: not today"


def test_with_nothing_saved_the_agent_generates_defaults(actions, agent):
    assert actions.load(wire(P.Load, 26, None, [])) == P.Loaded(26, None, [], 0, None)
    assert names(agent) == ["event_generate_default"]
    assert actions.load(wire(P.Load, 27, b"{}", [])) == P.Loaded(
        27, None, [], 0, None
    )  # saved empty: a load, not defaults
    assert names(agent)[1:] == ["event_load_start", "event_load_complete"]
    agent.calls.clear()
    assert actions.load(wire(P.Load, 28, None, [["set", "t", {"k": "9"}]])) == P.Loaded(
        28, None, [], 0, None
    )  # journal only
    assert names(agent) == ["event_load_start", "t_set", "event_load_complete"]


# -- save --------------------------------------------------------------------------------


def test_save_walks_each_table_in_order_into_one_json_section(actions, agent, sent):
    saved = actions.save(wire(P.Save, 31, ["t", "u"]))
    assert saved.sid == 31 and saved.error is None and saved.rows == len(ROWS)
    assert json.loads(saved.section) == {"t": ROWS, "u": []}
    assert list(json.loads(saved.section)) == ["t", "u"]
    assert saved.section.startswith(b'{"t":[{"k":"1"')  # compact
    assert names(agent) == ["event_save_start"] + ["t_get"] * len(ROWS) + ["u_get", "event_save_complete"]
    assert all(call[2] == {"is_getnext", "is_save"} and call[3] == (MODULE, "serial", 31) for call in agent.calls[1:-1])
    assert sent == []


def test_a_persistent_table_without_get_fails_the_save_naming_it(actions, agent):
    saved = actions.save(wire(P.Save, 32, ["t", "vlan"]))
    assert saved == P.Saved(32, "persistent table 'vlan' has no vlan_get method", None, 0)
    assert names(agent)[-1] == "event_save_complete"


def test_a_save_walk_that_never_ends_fails(actions, agent, monkeypatch):
    monkeypatch.setattr(P, "SAVE_MAX_ROWS", 3)
    saved = actions.save(wire(P.Save, 33, ["t"]))
    assert saved == P.Saved(33, "the save walk of 't' passed 3 rows: does t_get ever end?", None, 0)
    assert names(agent).count("t_get") == 3


@pytest.mark.parametrize(
    "fail, fields, error",
    [
        ({"t_get": OSError("gone")}, None, "t_get raised OSError: gone"),
        ({"t_get": cmbackend.ActionStopped("busy")}, None, "t_get stopped the save: busy"),
        ({}, {2: "x"}, "t_get replied badly: field name 2 is a int, not a str"),
        ({"event_save_start": ValueError("x")}, None, "event_save_start raised ValueError: x"),
    ],
)
def test_a_save_that_fails_says_why(actions, agent, fail, fields, error):
    agent.fail.update(fail)
    agent.fields = fields
    assert actions.save(wire(P.Save, 34, ["t"])) == P.Saved(34, error, None, 0)
    assert names(agent)[-1] == "event_save_complete"
