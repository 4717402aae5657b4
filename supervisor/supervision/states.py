"""A module's states and the moves between them, with no imports: whoever needs a state
name (the metrics' state gauge, the deadlock graph, the systemd notifier) imports this
file alone, and never the module record (modules.py) with what it brings along.

    STOPPED ──spawn──▶ STARTING ──INIT──▶ WAITING_DEPS ──deps READY──▶ LOADING ──ready()──▶ READY
                          │  └───────────── ready() without INIT: a plain process ─────────────▶ READY
                          │                    │                          │                   │
                          └────────────────────┴──── worker exit ─────────┴───────────────────┴──▶ RESTARTING ──respawn──▶ STARTING
    any state ──quarantine──▶ FAILED ──operator restart──▶ RESTARTING
    any state with a worker ──stop──▶ STOPPING ──exit──▶ STOPPED
    any state with a worker ──exit the restart policy leaves alone──▶ STOPPED ──operator restart──▶ RESTARTING

READY means the worker serves its own socket too (cmactor/worker/process.py starts
serving it before it reports the last of ready() and its load). Module.move refuses
a change that is not in TRANSITIONS. The sets below stand in for tuples of states
repeated by the code that asks.
"""

STARTING = "STARTING"
WAITING_DEPS = "WAITING_DEPS"
LOADING = "LOADING"
READY = "READY"
RESTARTING = "RESTARTING"
FAILED = "FAILED"
STOPPING = "STOPPING"
STOPPED = "STOPPED"

# state -> the states it may move to. FAILED and STOPPED are reachable from every
# state (a quarantine or a stop can come at any time); RESTARTING from every state
# that has or had a worker. A move to the same state is a no-op, and allowed.
TRANSITIONS = {
    STOPPED: {STARTING, RESTARTING, FAILED},
    STARTING: {WAITING_DEPS, READY, RESTARTING, FAILED, STOPPING, STOPPED},
    WAITING_DEPS: {LOADING, RESTARTING, FAILED, STOPPING, STOPPED},
    LOADING: {READY, RESTARTING, FAILED, STOPPING, STOPPED},
    READY: {RESTARTING, FAILED, STOPPING, STOPPED},
    RESTARTING: {STARTING, FAILED, STOPPED},
    FAILED: {RESTARTING, STOPPED},
    STOPPING: {STOPPED, FAILED},
}

# Stopping or stopped: requests fail, nothing is held.
GONE = frozenset((STOPPING, STOPPED))
# Its worker, if it has one, was told to stop or was killed.
LEAVING = frozenset((STOPPING, FAILED, RESTARTING))
# No worker is starting, serving or stopping: no uptime.
NOT_RUNNING = frozenset((STOPPED, FAILED, RESTARTING))
# Ended where it stays until an operator restarts it (STOPPED outside a stop: it exited
# and its restart policy left it so).
ENDED = frozenset((FAILED, STOPPED))
