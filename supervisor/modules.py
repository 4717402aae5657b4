"""The supervisor's record of one module: its state, its worker and its requests.

States: STARTING -> WAITING_DEPS -> LOADING -> READY; RESTARTING after a crash;
FAILED when quarantined or unable to start; STOPPING -> STOPPED on shutdown.
"""

import collections
import time

from cmactor import protocol as P

STARTING = "STARTING"
WAITING_DEPS = "WAITING_DEPS"
LOADING = "LOADING"
READY = "READY"
RESTARTING = "RESTARTING"
FAILED = "FAILED"
STOPPING = "STOPPING"
STOPPED = "STOPPED"


class Pending:
    """A client request the supervisor has accepted and not yet answered."""

    __slots__ = ("client", "rid", "request", "hold", "deadline", "sid", "issuer", "is_async", "dispatched_at")

    def __init__(self, client, rid, request):
        self.client = client
        self.rid = rid
        self.request = request
        self.hold = None  # while held for its module: seconds it may wait, and until when
        self.deadline = None
        self.sid = None
        self.issuer = None  # the executor (deadlock.py) blocked waiting on this call, if an agent made it
        self.is_async = False  # the target action is an @async_action
        self.dispatched_at = None


class Module:
    __slots__ = (
        "name",
        "options",
        "state",
        "process",
        "sock",
        "reader",
        "out",
        "psutil",
        "persistent_list",
        "config_deps",
        "async_ops",
        "unsaved",
        "ready_called",
        "loaded",
        "inflight",
        "held",
        "restarts",
        "policy",
        "started_at",
        "last_exit",
        "error",
        "waiting_on",
        "last_event",
        "saving",
        "load_errors",
        "pool_size",
        "slots",
        "journal",
        "doorbell",
        "ring",
        "serial_sids",
    )

    def __init__(self, name, options, policy):
        self.name = name
        self.options = options
        self.policy = policy
        self.state = STOPPED
        self.psutil = None
        self.persistent_list = []
        self.config_deps = []
        self.async_ops = frozenset()
        self.pool_size = None
        self.unsaved = False
        self.inflight = {}  # sid -> Pending
        self.held = collections.deque()  # Pending, oldest first
        self.restarts = 0
        self.last_exit = None
        self.journal = None
        self.attach(None, None, None, None)
        self.state = STOPPED
        self.started_at = None

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    def attach(self, process, sock, doorbell, slots):
        """A fresh worker: new sockets, slots and read state, nothing carried over from the last one."""
        self.process = process
        self.sock = sock
        self.doorbell = doorbell  # rung when async work is sent while serial work is unanswered
        self.ring = False  # async work went into this turn's output
        self.serial_sids = set()  # serial requests sent and not yet answered by this worker
        self.slots = slots  # the worker's progress slots (protocol.SLOT_*), in shared memory
        self.reader = P.FrameReader(max_frame=None)  # our own worker: trusted
        self.out = bytearray()
        self.state = STARTING
        self.ready_called = False
        self.loaded = False
        self.started_at = time.monotonic()
        self.error = None
        self.waiting_on = None
        self.last_event = None
        self.saving = False
        self.load_errors = 0

    def send(self, message):
        self.out += P.pack(message)

    def uptime(self):
        if self.started_at is None or self.state in (STOPPED, FAILED, RESTARTING):
            return None
        return time.monotonic() - self.started_at
