"""cmsupervisor: the runtime that owns cmactor's worker processes.

Imported as ``cmsupervisor`` (the folder is supervisor/): PyPI's supervisord owns
the import name ``supervisor``. Users reach it through ``cmactor.Supervisor`` and
the ``cmactor`` command.

How a request flows, all on the loop thread (loop.py) but for the worker::

    client ──frame──▶ server.py         Server: accept, uid check, read, parse_request;
                        │               a control op goes to control.py (Control.handle)
                        │ data op
                        ▼
                      routing.py        Router: admit (deadlock.py WaitGraph), hold while
                        │               the module is not READY (modules.py), dispatch
                        ▼
                      workers.py        Channel: Req ──socketpair──▶ cmactor/worker.py
                                                                     lane: serial, or the pool
                                                                       │
                                                                     cmactor/actions.py: the agent
                                                                       │
                      workers.py        Channel ◀──Reply (rows encoded once, in the worker)
                        │
                        ▼
                      routing.py        Router.on_reply: journal.py append (fsync before the
                        │               turn's output), answer, audit.py line after it
                        ▼
    client ◀──frame── server.py         Client.out, flushed by loop.py once per turn

A client's read (get, getone, getnext, not from inside an agent action) takes one
hop instead, once the module is READY: control.py answers ``route`` with the
worker's own socket, which workers.py binds at each start and hands to the worker::

    client ──frame──▶ cmactor/direct.py     the worker's socket: uid check, frames, the
                        │                   same checks (cmactor/validate.py)
                      cmactor/worker.py     Runtime.serve_direct: the serial lane (on this
                        │                   thread when free) or, async, this thread; behind a save
                      cmactor/actions.py    the agent
                        │
    client ◀──frame── cmactor/direct.py     the reply, counted in shared memory (figures.py)

Where a crash enters: the worker's process sentinel fires in the loop, and
recovery.py alone takes it from there: it reaps the worker (workers.py), fails
the requests its lanes had started, holds the others in routing.py for the
restart, asks its restart policy for a backoff or quarantine, and launches the
next worker. Its direct clients see their socket fail and send the read again,
to the supervisor, where it is held likewise. Start-up and stop are lifecycle.py:
Init → WAITING_DEPS (deps.py) → LOADING (the saved section from saving.py, plus
the journal) → READY, and dependents first on the way down. A module's record
(modules.py) changes through its own methods alone, and tells its subscribers of
each state change: routing.py holds, sends or fails the requests held for it.
supervisor.py builds these parts, gives each the others it calls, subscribes the
router, and is the public facade.

What a worker logs (protocol.Log on its channel) and writes to stdout or stderr
(a third socket pair, read by workers.py) goes to its module's log, logs.py; the
records are also re-emitted on the supervisor's logger. An export (saving.py) is
a save walk whose rows are answered instead of written.
"""
