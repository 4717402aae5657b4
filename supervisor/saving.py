"""One save run: which modules it walks, what they returned, and who waits for it.

Saves are coalesced: requests that arrive while a save runs wait for the next run,
which covers them all. Modules are walked one at a time, dependencies first, so
that an agent's save events never wait on another module that is itself saving.
Sections of modules not saved in this run (not READY, or no longer configured)
are carried over from the last good file, so a save never drops config.
"""

import concurrent.futures
import logging

from cmactor import protocol as P
from cmactor.errors import DatabaseError, OperationalError, to_wire

from . import store
from .modules import READY

log = logging.getLogger("cmactor.supervisor")


class SaveJob:
    def __init__(self, waiters, modules, previous):
        self.waiters = waiters  # (waiter, user): waiter a (client, rid) pair or a concurrent.futures.Future
        self.queue = list(modules)  # Module records still to walk
        self.sections = dict(previous)  # name -> JSON bytes; saved ones replace these
        self.saved = []  # names walked in this run
        self.was_unsaved = {}  # name -> dirty bit before the run cleared it
        self.journaled = {}  # name -> journal records acknowledged before its walk began
        self.rows = 0
        self.current = None  # the Module being walked
        self.sid = None

    def next_module(self):
        self.current = self.queue.pop(0) if self.queue else None
        return self.current

    def done(self, name, section, rows):
        self.sections[name] = section
        self.saved.append(name)
        self.rows += rows


class Saving:
    """The save half of Supervisor: runs SaveJobs on the loop thread."""

    def _request_save(self, waiter, user):
        """Queue a save for ``waiter``: a (client, rid) pair or a Future."""
        if self._stopping:
            self._reply_save([(waiter, user)], OperationalError, "save refused: the supervisor is stopping")
            return
        self._save_waiters.append((waiter, user))
        if self._save_job is None:
            self._start_save()

    def _start_save(self):
        waiters, self._save_waiters = self._save_waiters, []
        order = []
        for mod in self.modules.values():  # dependencies first
            self._dependency_first(mod, order, set())
        modules = [m for m in order if m.persistent_list]
        self._save_job = SaveJob(waiters, modules, self._sections)
        self._save_next()

    def _dependency_first(self, mod, order, seen):
        if mod in order or mod.name in seen:
            return
        seen.add(mod.name)
        for dep in mod.config_deps:
            if dep in self.modules:
                self._dependency_first(self.modules[dep], order, seen)
        order.append(mod)

    def _save_next(self):
        job = self._save_job
        while (mod := job.next_module()) is not None:
            if mod.state != READY:
                continue  # its last saved section is carried over
            mod.saving = True
            job.journaled[mod.name] = len(mod.journal.records)  # these the walk will include
            # Cleared now: a change acknowledged during the walk marks it again.
            job.was_unsaved[mod.name] = mod.unsaved
            mod.unsaved = False
            job.sid = next(self._next_sid)
            self._to_worker(mod, [P.SAVE, job.sid, mod.persistent_list])
            return
        future = self._save_writer.submit(store.write, self.config_path, job.sections)
        future.add_done_callback(lambda f: self._call_async(self._on_written, job, f))

    def _on_saved(self, mod, sid, error, section, rows):
        job = self._save_job
        if job is None or job.current is not mod or job.sid != sid:
            return
        mod.saving = False
        self._release_held(mod)
        if error is None:
            job.done(mod.name, section, rows)
            self._save_next()
            return
        log.error("save failed: module %s: %s", mod.name, error)
        self._end_save(job, DatabaseError, f"save failed: module {mod.name!r}: {error}; {self.config_path} was not changed")

    def _on_written(self, job, future):
        try:
            future.result()
        except OSError as exc:
            self._end_save(job, OperationalError, f"save failed: cannot write {self.config_path}: {exc}")
            return
        self._sections = job.sections
        for name in job.saved:  # now in the config file
            try:
                self.modules[name].journal.drop_first(job.journaled[name])
            except OSError as exc:
                # The save stands; the journal keeps records the file now holds too,
                # which a restart replays again on top of the same rows.
                log.error("module %s: could not truncate its journal after the save: %s", name, exc)
        log.info("saved %d rows of %s to %s", job.rows, ", ".join(job.saved) or "no module", self.config_path)
        self._end_save(job, None, {"file": self.config_path, "modules": job.saved, "rows": job.rows})

    def _end_save(self, job, exc_type, result):
        if exc_type is not None:
            for name, was in job.was_unsaved.items():
                self.modules[name].unsaved = self.modules[name].unsaved or was
            if job.current is not None:
                job.current.saving = False
                self._release_held(job.current)
        self._reply_save(job.waiters, exc_type, result)
        self._save_job = None
        if self._stopping:
            self._continue_stop()
        elif self._save_waiters:
            self._start_save()

    def _reply_save(self, waiters, exc_type, result):
        outcome = "ok" if exc_type is None else f"{exc_type.__name__}: {result}"
        for waiter, user in waiters:
            self._audit.record(user, "save", None, None, None, outcome)
            if isinstance(waiter, concurrent.futures.Future):
                if exc_type is None:
                    waiter.set_result(result)
                else:
                    waiter.set_exception(exc_type(result))
                continue
            client, rid = waiter
            if exc_type is None:
                self._to_client(client, {"id": rid, "ok": True, "saved": result})
            else:
                self._to_client(client, {"id": rid, "ok": False, "error": to_wire(exc_type, result)})
