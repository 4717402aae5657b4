"""Save runs (persistence/saving.py) with fake collaborators: no Supervisor, no worker processes."""

import concurrent.futures
import os
import queue

import pytest
from fakes import FakeClient, FakeJournal, SaveSetup, module, wire

from cmactor.errors import DatabaseError, OperationalError
from cmactor.wire import protocol as P
from cmsupervisor.persistence import store
from cmsupervisor.supervision.states import (
    FAILED,
    LOADING,
    READY,
)


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
