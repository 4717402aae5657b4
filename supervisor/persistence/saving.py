"""One save run: which modules it walks, what they returned, and who waits for it.

Saves are coalesced: requests that arrive while a save runs wait for the next run,
which covers them all. Modules are walked one at a time, dependencies first, so
that an agent's save events never wait on another module that is itself saving.
Sections of modules not saved in this run (not READY, or no longer configured)
are carried over from the last good file, so a save never drops config.

An export is a run of the same walk over the modules it names, whose sections
are answered instead of written: no file, journal or unsaved flag changes.
"""

import concurrent.futures
import logging
import os
import time

from cmactor.errors import DatabaseError, NotActive, OperationalError, ProgrammingError, to_wire
from cmsupervisor.observability.stats import SAVE_BOUNDS, Timed
from cmsupervisor.persistence import store
from cmsupervisor.supervision import deps
from cmsupervisor.supervision.modules import unknown_module
from cmsupervisor.supervision.states import READY

log = logging.getLogger("cmactor.supervisor")

_RESULT_KEY = {"save": "saved", "export": "export"}  # where a client's reply carries the result


class SaveJob:
    """One run: a save of every module into the config file, or (``snapshot``) the
    compaction of one module's journal into a snapshot of its live tables, or
    (``export``) the walk of some modules, answered to the waiter."""

    def __init__(self, waiters, modules, previous, snapshot=False, export=False):
        self.snapshot = snapshot
        self.export = export
        self.modules = list(modules)
        self.waiters = waiters  # (waiter, user): waiter a (client, rid) pair or a concurrent.futures.Future
        self.queue = list(modules)  # Module records still to walk
        self.sections = dict(previous)  # name -> JSON bytes; saved ones replace these
        self.saved = []  # names walked in this run
        self.was_unsaved = {}  # name -> dirty bit before the run cleared it
        self.walks = {}  # name -> (the Save's sid, the journal's position then): what the walk covers
        self.rows = 0
        self.current = None  # the Module being walked
        self.sid = None
        self.started = time.monotonic()

    def next_module(self):
        self.current = self.queue.pop(0) if self.queue else None
        return self.current

    def done(self, name, section, rows):
        self.sections[name] = section
        self.saved.append(name)
        self.rows += rows


class Saver:
    """Runs SaveJobs on the loop thread, one at a time; owns the saved config's sections.

    ``on_idle()`` is called when a run ends after close(): the stop goes on then."""

    def __init__(self, modules, loop, audit, config_path, sections):
        self._modules = modules
        self._loop = loop
        self._audit = audit
        self.config_path = config_path
        self._sections = sections  # module -> its section of the last good file (bytes)
        self._job = None
        self._waiters = []  # (waiter, user) for the next run
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cmactor-save")
        self._closed = False
        self._compactions = []  # modules whose journals passed their bound, oldest first
        self._exports = []  # (waiter, user, modules) in the order asked
        self.on_idle = None
        self.stats = Timed(SAVE_BOUNDS)  # save runs (not compactions): outcome and duration
        self.replica = None  # under [ha]: a save is answered once etcd has its new bases

    def section(self, name):
        """The module's rows in the last good file (JSON bytes), or None."""
        return self._sections.get(name)

    @property
    def running(self):
        return self._job is not None

    def request(self, waiter, user):
        """Queue a save for ``waiter``: a (client, rid) pair or a Future."""
        if self._closed:
            self._reply([(waiter, user)], OperationalError, "save refused: the supervisor is stopping")
            return
        self._waiters.append((waiter, user))
        if self._job is None:
            self._start()

    def export(self, waiter, user, names):
        """Queue an export for ``waiter``: the save walk of the modules ``names`` (None or
        empty: every module), dependencies first, answered with [[module, section], ...]
        instead of written. Every one must be READY: its live rows are what it exports.
        ProgrammingError for a name the supervisor does not run, OperationalError for a
        module that is not READY."""
        for name in names or ():
            if name not in self._modules:
                raise ProgrammingError(unknown_module(name, self._modules))
        chosen = [m for m in deps.dependencies_first(self._modules) if not names or m.name in names]
        for mod in chosen:
            if mod.state != READY:
                raise OperationalError(_not_ready(mod, not names))
        if self._closed:
            raise OperationalError("export refused: the supervisor is stopping")
        self._exports.append((waiter, user, [m for m in chosen if m.persistent_list]))
        if self._job is None:
            self._start()

    def close(self):
        """The supervisor is stopping: refuse the saves and exports still to run (a running one finishes)."""
        self._closed = True
        waiters, self._waiters = self._waiters, []
        self._reply(waiters, OperationalError, "save refused: the supervisor is stopping")
        exports, self._exports = self._exports, []
        for waiter, user, _ in exports:
            self._reply([(waiter, user)], OperationalError, "export refused: the supervisor is stopping", "export")

    def shutdown(self):
        self._writer.shutdown(wait=True)

    def compact(self, mod):
        """``mod``'s journal passed its bound: replace it, when no run is under way, by a
        snapshot of the module's live persistent tables (the save walk, written to the
        journal's snapshot file instead of the config file). A restart then loads the
        snapshot and the few records after it: its time and memory grow with the config,
        not with the changes since the last save. The module stays unsaved."""
        job = self._job
        compacting = job is not None and job.snapshot and mod in job.modules
        if mod not in self._compactions and not compacting and not self._closed:
            self._compactions.append(mod)
            if job is None:
                self._start()

    def _start(self):
        if self._waiters:  # a save covers the compactions queued: it empties every journal
            waiters, self._waiters = self._waiters, []
            modules = [m for m in deps.dependencies_first(self._modules) if m.persistent_list]
            self._job = SaveJob(waiters, modules, self._sections)
            self._compactions.clear()
        elif self._exports:
            waiter, user, modules = self._exports.pop(0)
            self._job = SaveJob([(waiter, user)], modules, {}, export=True)
        else:
            mod = self._compactions.pop(0)
            if not mod.journal.full:  # a save ran first and emptied it
                self._idle()
                return
            self._job = SaveJob([], [mod], {}, snapshot=True)
        self._next()

    def _next(self):
        job = self._job
        while (mod := job.next_module()) is not None:
            if mod.state != READY:
                if job.export:  # it left READY while the export waited its turn
                    self._end(job, OperationalError, _not_ready(mod, False))
                    return
                continue  # its last saved section is carried over
            mod.save_began()
            if not job.snapshot and not job.export:
                job.was_unsaved[mod.name] = mod.covered_by_save()
            start = mod.journal.position()
            job.sid = mod.channel.save(mod.persistent_list)
            job.walks[mod.name] = (job.sid, start)  # which records it covers: Journal.covered
            return
        if job.export:
            self._end(job, None, [[name, job.sections[name]] for name in job.saved])
            return
        if job.snapshot and not job.saved:
            self._end(job, None, None)  # the module was not READY: its next bound passed tries again
            return
        path = self._modules[job.saved[0]].journal.snapshot_path if job.snapshot else self.config_path
        future = self._writer.submit(store.write, path, job.sections)
        future.add_done_callback(lambda f: self._loop.call_async(self._on_written, job, f))

    def on_saved(self, mod, saved):
        """A worker's Saved: the module's section, or why its walk failed."""
        self._walked(mod, saved.sid, saved.error, saved.section, saved.rows)

    def worker_died(self, mod, reason):
        job = self._job
        if job is not None and job.current is mod:
            self._walked(mod, job.sid, f"the worker died during the save ({reason})", None, 0)

    def _walked(self, mod, sid, error, section, rows):
        job = self._job
        if job is None or job.current is not mod or job.sid != sid:
            return
        mod.save_ended()  # what was held for it meanwhile is sent (the router is told)
        if error is None:
            job.done(mod.name, section, rows)
            self._next()
            return
        what = "journal compaction" if job.snapshot else "export" if job.export else "save"
        log.error("%s failed: module %s: %s", what, mod.name, error)
        if job.export:
            self._end(job, DatabaseError, f"export failed: module {mod.name!r}: {error}")
            return
        self._end(job, DatabaseError, f"save failed: module {mod.name!r}: {error}; {self.config_path} was not changed")

    def _on_written(self, job, future):
        if job.snapshot:
            self._snapshot_written(job, future)
            return
        try:
            future.result()
        except OSError as exc:
            self._end(job, OperationalError, f"save failed: cannot write {self.config_path}: {exc}")
            return
        self._sections = job.sections
        for name in job.saved:  # now in the config file
            journal = self._modules[name].journal
            # The snapshot first: were the supervisor killed between the two, a start would
            # load the config file and the whole journal (records the file holds too, again),
            # never the old snapshot with the journal's records after the save missing.
            journal.forget_snapshot()  # older than what the file now holds
            try:
                journal.drop_covered(*job.walks[name], job.sections[name])
            except OSError as exc:
                # The save stands; the journal keeps records the file now holds too,
                # which a restart replays again on top of the same rows.
                log.error("module %s: could not truncate its journal after the save: %s", name, exc)
            journal.set_base(len(job.sections[name]))
        log.info("saved %d rows of %s to %s", job.rows, ", ".join(job.saved) or "no module", self.config_path)
        result = {"file": self.config_path, "modules": job.saved, "rows": job.rows}
        if self.replica is None:
            self._end(job, None, result)
            return

        def committed(failure):
            if failure is None:
                self._end(job, None, result)
            else:
                self._end(job, NotActive, f"save not committed to the cluster: {failure}; send it to the active")

        self.replica.then(committed)

    def _snapshot_written(self, job, future):
        (name,) = job.saved
        journal = self._modules[name].journal
        try:
            future.result()
            journal.compacted(job.sections[name], *job.walks[name])
        except OSError as exc:
            # Nothing is lost: the journal still holds every record. It goes on growing
            # until a save, or until a later compaction succeeds.
            log.error("module %s: journal compaction failed: cannot write %s: %s", name, journal.snapshot_path, exc)
        else:
            log.info("module %s: journal compacted into a snapshot of %d rows", name, job.rows)
        self._end(job, None, None)

    def _end(self, job, exc_type, result):
        if not job.snapshot:
            self.stats.record(None if exc_type is None else exc_type.__name__, time.monotonic() - job.started)
        if exc_type is not None:
            for name, was in job.was_unsaved.items():
                if was:
                    self._modules[name].mark_unsaved()
        self._reply(job.waiters, exc_type, result, "export" if job.export else "save")
        self._job = None
        self._idle()

    def _idle(self):
        """No run is under way: start the next one, or let a stop go on."""
        if self._closed:
            self.on_idle()
        elif self._waiters or self._compactions or self._exports:
            self._start()

    def _reply(self, waiters, exc_type, result, op="save"):
        outcome = "ok" if exc_type is None else f"{exc_type.__name__}: {result}"
        for waiter, user in waiters:
            if isinstance(waiter, concurrent.futures.Future):  # Supervisor.save(): this process asked
                self._audit.record(user, os.getuid(), os.getpid(), op, None, None, None, outcome)
                if exc_type is None:
                    waiter.set_result(result)
                else:
                    waiter.set_exception(exc_type(result))
                continue
            client, rid = waiter
            self._audit.record(user, client.peer_uid, client.peer_pid, op, None, None, None, outcome)
            if exc_type is None:
                client.answer({"id": rid, "ok": True, _RESULT_KEY[op]: result})
            else:
                client.answer({"id": rid, "ok": False, "error": to_wire(exc_type, result)})


def _not_ready(mod, every):
    """Why ``mod`` cannot be exported (``every``: it was not named, the export is of every module)."""
    why = f" ({mod.error})" if mod.error else ""
    fix = f"`cmactor restart {mod.name}` to bring it back"
    if every:
        fix = f"name the modules to export, or {fix}"
    return (
        f"cannot export module {mod.name!r}: it is {mod.state}{why}, not READY, so it has no live config to walk; {fix}"
    )
