"""Small fakes shared by the unit tests of the supervisor's parts."""

import itertools
import queue

import msgspec

from cmactor.wire import protocol as P
from cmsupervisor.persistence import store
from cmsupervisor.persistence.saving import Saver
from cmsupervisor.supervision.modules import Module
from cmsupervisor.supervision.states import (
    FAILED,
    LOADING,
    READY,
    RESTARTING,
    STARTING,
    STOPPED,
    STOPPING,
    WAITING_DEPS,
)

ALL_STATES = [STOPPED, STARTING, WAITING_DEPS, LOADING, READY, RESTARTING, FAILED, STOPPING]


def wire(kind, *fields):
    """A worker message of ``kind`` as the supervisor reads it: built, encoded, then decoded."""
    return P.CHANNEL.decode(msgspec.msgpack.encode(kind(*fields)))


def module(name, state=STOPPED, **fields):
    mod = Module(name, {}, None)
    mod.state = state  # tests only: the code moves through Module.move
    for key, value in fields.items():
        setattr(mod, key, value)
    return mod


class Reports:
    """ModuleLogs' report(): what the supervisor said of each module, kept."""

    def __init__(self):
        self.lines = []

    def report(self, mod, level, message, *args):
        self.lines.append((mod.name, level, message % args))


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


class FakeAudit:
    def __init__(self):
        self.records = []
        self.peers = []  # (uid, pid) of each record: who the kernel says asked

    def record(self, user, uid, pid, *fields):
        self.records.append((user, *fields))
        self.peers.append((uid, pid))


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
    """The router as the supervisor subscribes it to each module: what it was told to release."""

    def __init__(self):
        self.released = []

    def module_changed(self, mod, _before):
        if mod.state == READY:  # Router.module_changed: what is held for it is sent
            self.released.append(mod.name)


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
        self.drop_covered(save_sid, walk_start, snapshot)

    def drop_covered(self, save_sid, walk_start, base):
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
        for mod in self.modules.values():
            mod.subscribe(self.router.module_changed)
        self.audit = FakeAudit()
        self.path = str(tmp_path / "config.jsonl")
        previous = previous or {}
        if previous:
            store.write(self.path, previous)
        self.saver = Saver(self.modules, self.loop, self.audit, self.path, dict(previous))
        self.idle = []
        self.saver.on_idle = lambda: self.idle.append(True)

    def last_save(self, name):
        return self.modules[name].channel.saves[-1]

    def walked(self, name, section, rows=1, error=None):
        sid, _ = self.last_save(name)
        self.saver.on_saved(self.modules[name], wire(P.Saved, sid, error, section, rows))
