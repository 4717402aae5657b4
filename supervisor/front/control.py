"""The control requests: status, save, export, stop, start, restart, reload, ping, route, ha and schema.

The server hands every valid control request to ``Control.handle`` (data requests
go to the router), answered here from the parts that own what they ask about: an
operator's stop, start or restart of modules, and a reload, by supervision/admin.py,
once the modules have settled. ``stop`` without a module stops the supervisor.
``status()`` and ``figures()`` are also what the public Supervisor.status() and the
metrics collector read.

A status is made in two steps, so that the loop thread, which serves every client,
is held only for the first: ``copy()`` on the loop thread takes what the loop owns
(states, counters, histogram counts) and which psutil.Process each worker has; the
psutil figures are then sampled on another thread (health.Sampler) and added.
"""

import functools
import logging
import threading

from cmactor.errors import (
    ConfigError,
    DeadlockDetectedError,
    Error,
    OperationalError,
    ProgrammingError,
    not_active_wire,
)
from cmactor.wire import protocol as P
from cmsupervisor.ha.replica import SINGLE_HA
from cmsupervisor.supervision import health
from cmsupervisor.supervision.modules import finish_status, unknown_module
from cmsupervisor.supervision.states import READY

log = logging.getLogger("cmactor.supervisor")


class Control:
    def __init__(self, loop, modules, server, graph, saver, lifecycle, audit, logs, router, admin, read_reload):
        self._loop = loop
        self._modules = modules
        self._server = server
        self._graph = graph
        self._saver = saver
        self._lifecycle = lifecycle
        self._audit = audit
        self._logs = logs
        self._router = router
        self._admin = admin
        # fn(None): (agents, [supervisor] keys changed) read from the config file again, or
        # ConfigError naming every error (Supervisor._read_reload); it reads files: not here.
        self._read_reload = read_reload
        self._sampler = health.Sampler()
        self.replica = None  # under [ha]: the node's ha.replica.Replica (its role, for "ha" and saves)
        self.restconf = None  # with [restconf]: the RESTCONF server's sidecar.Sidecar

    def handle(self, client, request):
        """A valid control request from a client: answer it."""
        op, rid = request.op, request.id
        try:
            if op == "status":
                status, workers = self.copy(request.module)
                own = self.own_status()
                answer = functools.partial(self._post_status, client, rid, status, own)
                self._sampler.sample_later(workers, answer)  # answered from the sampler's thread
            elif op == "ha":
                client.answer({"id": rid, "ok": True, "ha": self.ha()})
            elif op == "schema":
                client.answer({"id": rid, "ok": True, "schema": self.schema(request.module)})
            elif op == "save" and self.replica is not None and self.replica.role != "active":
                replica = self.replica
                message = (
                    f"save refused: node {replica.node!r} is {replica.role}; the active saves the cluster's config"
                )
                client.answer({"id": rid, "ok": False, "error": not_active_wire(message, replica.active_name)})
            elif op == "save" or op == "export":
                refusal = self._graph.refuse_save(request.caller)  # an export runs the save walk too
                if refusal is not None:
                    raise DeadlockDetectedError(refusal)
                user = request.user
                if op == "save":
                    self._saver.request((client, rid), user)  # answered when it ends
                else:
                    self._saver.export((client, rid), user, request.modules)
            elif op == "route":
                route = self.route(request.module)
                client.answer({"id": rid, "ok": True, "route": route, "direct_reads": route is not False})
            elif op == "restart":  # answered once the modules are READY again (admin.py)
                if request.all:
                    self._admin.restart_all((client, rid), request.user, bool(request.rolling), bool(request.kill))
                else:
                    self._admin.restart((client, rid), request.user, request.module, bool(request.kill))
            elif op == "start":
                self._admin.start((client, rid), request.user, request.module)
            elif op == "stop" and request.module is not None:
                self._admin.stop((client, rid), request.user, request.module)
            elif op == "stop":
                log.info(
                    "stop requested by %r", request.user or "a client"
                )  # %r: a name holding a newline forges no log line
                client.answer({"id": rid, "ok": True})  # before the stop closes the clients
                self._lifecycle.begin_stop()
            elif op == "reload":
                threading.Thread(
                    target=self._reload, args=(client, rid, request.user), name="cmactor-reload", daemon=True
                ).start()
            else:  # ping
                client.answer({"id": rid, "ok": True})
        except Error as exc:
            client.answer_error(rid, type(exc), str(exc))

    def _reload(self, client, rid, user):
        """(A thread of its own: the loop serves every client meanwhile.) Read the config file
        again; the loop thread applies it (_apply_reload)."""
        try:
            plan = self._read_reload(None)
        except ConfigError as exc:
            plan = exc
        try:
            self._loop.call_async(self._apply_reload, client, rid, user, plan)
        except RuntimeError:
            pass  # the supervisor stopped meanwhile, and closed the client with it

    def _apply_reload(self, client, rid, user, plan):
        try:
            if isinstance(plan, ConfigError):
                raise OperationalError(f"reload refused, nothing was changed: {plan}")
            self._admin.reload((client, rid), user, *plan)  # answered once the modules have settled
        except Error as exc:
            client.answer_error(rid, type(exc), str(exc))

    def _post_status(self, client, rid, status, own, figures):
        """(The sampler's helper thread.) Complete the status answer and encode it here: the
        loop thread only queues the bytes."""
        frame = P.pack({"id": rid, "ok": True, "status": _with(status, figures), "supervisor": own})
        try:
            self._loop.call_async(client.answer_frame, frame)
        except RuntimeError:
            pass  # the supervisor stopped meanwhile, and closed the client with it

    def close(self):
        """(Loop thread, as the supervisor stops.) End the sampler's helper thread."""
        self._sampler.close()

    def copy(self, only=None):
        """(Loop thread.) Every module's status, or only the one named ``only``, but for the
        psutil figures; and name -> the psutil.Process to sample them from (None: no worker)."""
        modules = self._modules
        if only is not None and only not in modules:
            raise ProgrammingError(unknown_module(only, modules))
        chosen = modules.items() if only is None else [(only, modules[only])]
        return {name: mod.copy_status() for name, mod in chosen}, {name: mod.psutil for name, mod in chosen}

    def status(self, only=None):
        """(Any thread but the loop's: the public Supervisor.status().) Every module's status, or
        only the one named ``only``: copied on the loop thread, its workers sampled on this one."""
        status, workers = self._loop.call(self.copy, only)
        return _with(status, self._sampler.sample(workers))

    def figures(self, timeout):
        """(The metrics thread.) What a client's status shows, own_status() included, for a
        scrape: {"modules": ..., "supervisor": ...}. TimeoutError if the loop does not copy its
        figures within ``timeout`` seconds (it is stuck), RuntimeError if it has stopped."""
        copied = self._loop.call_async(lambda: (self.copy(), self.own_status()))
        (status, workers), own = copied.result(timeout)
        return {"modules": _with(status, self._sampler.sample(workers)), "supervisor": own}

    def schema(self, only=None):
        """(Loop thread.) What each module's agent declares for RESTCONF, or only the one named
        ``only``: {module: {"tables": {...}}, or None for a module no worker of which has
        registered an agent yet} (Module.schema)."""
        modules = self._modules
        if only is not None and only not in modules:
            raise ProgrammingError(unknown_module(only, modules))
        chosen = modules.items() if only is None else [(only, modules[only])]
        return {name: mod.schema for name, mod in chosen}

    def route(self, name):
        """Where a client reads ``name`` from directly ({"path", "generation"} of its worker's
        socket); None: send its reads here for now (it is not READY); False: its worker
        has no socket of its own (direct_reads off). A READY module's worker serves its
        socket already: it starts before it reports what makes the module READY."""
        mod = self._modules.get(name)
        if mod is None:
            raise ProgrammingError(unknown_module(name, self._modules))
        channel = mod.channel
        if mod.state != READY or channel is None or not channel.open:
            return None
        return False if channel.route is None else channel.route

    def own_status(self):
        """The supervisor's own figures: audit and log failures, clients, saves, data requests
        to unknown modules, and the RESTCONF server run beside the modules (None without [restconf])."""
        return {
            "audit_failures": self._audit.failures,
            "audit_error": self._audit.last_error,
            "clients": self._server.client_count,
            "unknown_module_requests": self._router.unknown_module_requests,
            "saves": self._saver.stats.snapshot(),
            "ha": self.ha(),
            "restconf": None if self.restconf is None else self.restconf.status(),
            **self._logs.status(),
        }

    def ha(self):
        """{"node", "role", "active", "in_sync", "revision"}: this node's place in its cluster,
        or role "single" for a supervisor without [ha]."""
        if self.replica is None:
            return dict(SINGLE_HA)
        return self.replica.describe()


def _with(status, figures):
    """``status`` (Control.copy) made what status shows (modules.finish_status), with each
    module's psutil ``figures`` added."""
    for name, entry in status.items():
        finish_status(entry).update(figures[name])
    return status
