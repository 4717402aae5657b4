"""cmsupervisor: the runtime that owns cmactor's worker processes.

Imported as ``cmsupervisor`` (the folder is supervisor/): PyPI's supervisord owns
the import name ``supervisor``. Users reach it through ``cmactor.Supervisor`` and
the ``cmactor`` command.

How a request flows, all on the loop thread (loop.py) but for the worker::

    client ──frame──▶ front/server.py        Server: accept, uid check, read; the request
                        │                    decoded and checked (cmactor/wire/validate.py);
                        │ data op            a control op goes to front/control.py
                        ▼
                      front/routing.py       Router: admit (front/deadlock.py), hold while
                        │                    the module is not READY, dispatch
                        ▼
                      supervision/workers.py Channel: Req ──socketpair──▶ cmactor/worker/process.py
                                                                          lanes: serial, or the pool
                                                                            │
                                                                          cmactor/worker/actions.py: the agent
                                                                            │
                      supervision/workers.py Channel ◀──Reply (rows encoded once, in the worker)
                        │
                        ▼
                      front/routing.py       Router.on_reply: persistence/journal.py append (fsync
                        │                    before the turn's output), answer, audit line after it
                        ▼
    client ◀──frame── front/server.py        Client.out, flushed by loop.py once per turn

A client's read (get, getone, getnext, not from inside an agent action) takes one
hop instead, once the module is READY: front/control.py answers ``route`` with the
worker's own socket, which supervision/workers.py binds at each start and hands to
the worker (cmactor/worker/direct.py, which serves it on the worker's lanes).

Where a crash enters: the worker's process sentinel fires in the loop, and
supervision/recovery.py alone takes it from there: it reaps the worker, fails the
requests its lanes had started, holds the others in the router for the restart,
asks its restart policy for a backoff or a quarantine, and launches the next
worker. Start-up and stop are supervision/lifecycle.py: Init → WAITING_DEPS
(supervision/deps.py) → LOADING (the saved section and the journal, persistence/)
→ READY, and dependents first on the way down. An operator's stop, start,
restart or reload of modules while the supervisor runs is supervision/admin.py,
on top of those two. A module's record
(supervision/modules.py) changes through its own methods alone, and tells its
subscribers of each state change: the router holds, sends or fails the requests
held for it. supervisor.py builds these parts, gives each the others it calls,
subscribes the router, and is the public facade. docs/architecture.md walks a
request and a crash file by file.

What a worker logs and writes to stdout or stderr goes to its module's log
(observability/logs.py); the records are also re-emitted on the supervisor's
logger. An export (persistence/saving.py) is a save walk whose rows are answered
instead of written.
"""
