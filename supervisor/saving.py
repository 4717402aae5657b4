"""One save run: which modules it walks, what they returned, and who waits for it.

Saves are coalesced: requests that arrive while a save runs wait for the next run,
which covers them all. Modules are walked one at a time, dependencies first, so
that an agent's save events never wait on another module that is itself saving.
Sections of modules not saved in this run (not READY, or no longer configured)
are carried over from the last good file, so a save never drops config.
"""


class SaveJob:
    def __init__(self, waiters, modules, previous):
        self.waiters = waiters  # (client, rid, user) or a concurrent.futures.Future
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
