"""The control requests: status, save, export, restart, stop, ping and route.

The server hands every valid control request to ``Control.handle`` (data requests
go to the router), answered here from the parts that own what they ask about.
``status()`` and ``own_status()`` are also what the public Supervisor.status() and
the metrics collector read.
"""

import logging

from cmactor.errors import DeadlockDetectedError, Error, ProgrammingError

from . import health
from .modules import READY, unknown_module

log = logging.getLogger("cmactor.supervisor")


class Control:
    def __init__(self, modules, server, graph, saver, recovery, lifecycle, audit, logs):
        self._modules = modules
        self._server = server
        self._graph = graph
        self._saver = saver
        self._recovery = recovery
        self._lifecycle = lifecycle
        self._audit = audit
        self._logs = logs

    def handle(self, client, request):
        """A valid control request from a client: answer it."""
        op, rid = request["op"], request["id"]
        try:
            if op == "status":
                status = self.status(request.get("module"))
                client.answer({"id": rid, "ok": True, "status": status, "supervisor": self.own_status()})
            elif op == "save" or op == "export":
                refusal = self._graph.refuse_save(request.get("caller"))  # an export runs the save walk too
                if refusal is not None:
                    raise DeadlockDetectedError(refusal)
                user = request.get("user", "")
                if op == "save":
                    self._saver.request((client, rid), user)  # answered when it ends
                else:
                    self._saver.export((client, rid), user, request.get("modules"))
            elif op == "route":
                route = self.route(request["module"])
                client.answer({"id": rid, "ok": True, "route": route, "direct_reads": route is not False})
            elif op == "restart":
                self._recovery.restart(request["module"])
                client.answer({"id": rid, "ok": True})
            elif op == "stop":
                log.info("stop requested by %s", request.get("user") or "a client")
                client.answer({"id": rid, "ok": True})  # before the stop closes the clients
                self._lifecycle.begin_stop()
            else:  # ping
                client.answer({"id": rid, "ok": True})
        except Error as exc:
            client.answer_error(rid, type(exc), str(exc))

    def status(self, only=None):
        """Every module's status, or only the one named ``only``."""
        modules = self._modules
        if only is not None and only not in modules:
            raise ProgrammingError(unknown_module(only, modules))
        chosen = modules.items() if only is None else [(only, modules[only])]
        return {name: {**mod.status(), **health.sample(mod.psutil)} for name, mod in chosen}

    def route(self, name):
        """Where a client reads ``name`` from directly ({"path", "generation"} of its worker's
        socket); None: send its reads here for now (it is not READY); False: its worker
        has no socket of its own (direct_reads off)."""
        mod = self._modules.get(name)
        if mod is None:
            raise ProgrammingError(unknown_module(name, self._modules))
        channel = mod.channel
        if mod.state != READY or channel is None or not channel.open:
            return None
        if channel.route is None:
            return False
        return channel.route if channel.serving else None

    def own_status(self):
        """The supervisor's own figures: audit and log failures, clients, saves."""
        return {
            "audit_failures": self._audit.failures,
            "audit_error": self._audit.last_error,
            "clients": self._server.client_count,
            "saves": self._saver.stats.snapshot(),
            **self._logs.status(),
        }
