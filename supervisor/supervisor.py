"""Supervisor: the public facade that builds the parts and wires them together.

Every part runs on the loop thread and owns its own state (see the package's
docstring for how a request flows through them); this file keeps the public
API, the control requests (status, save, restart, stop) and the wiring.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import logging
import os
import re
import sys
import weakref
from typing import TYPE_CHECKING

from cmactor import cmfrontend
from cmactor.errors import ConfigError, StartupError
from cmactor.wire import protocol as P
from cmactor.wire.clients import ClientLimits
from cmsupervisor.config import (
    SUPERVISOR_OPTIONS,
    Problems,
    agents_config,
    exos_dirs,
    load_toml,
    memory_limit,
    restconf_options,
    supervisor_options,
)
from cmsupervisor.front import server
from cmsupervisor.front.control import Control
from cmsupervisor.front.deadlock import WaitGraph
from cmsupervisor.front.routing import Router
from cmsupervisor.loop import EventLoop
from cmsupervisor.observability import stats
from cmsupervisor.observability.audit import AuditLog
from cmsupervisor.observability.logs import ModuleLogs
from cmsupervisor.persistence import state, store
from cmsupervisor.persistence.saving import Saver
from cmsupervisor.supervision import fds
from cmsupervisor.supervision.admin import Admin
from cmsupervisor.supervision.lifecycle import Lifecycle
from cmsupervisor.supervision.memory import Enforcement
from cmsupervisor.supervision.modules import Module
from cmsupervisor.supervision.recovery import Recovery, RestartPolicy
from cmsupervisor.supervision.sidecar import Sidecar
from cmsupervisor.supervision.workers import Workers

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence
    from typing import Any, Self, TypedDict, Unpack

    from cmsupervisor.observability.notify import Notifier

    class SupervisorOptions(TypedDict, total=False):
        """Supervisor()'s keyword options: the [supervisor] keys of a cmactor.toml but
        state_dir (its own argument), as cmsupervisor.config.SUPERVISOR_OPTIONS checks them."""

        socket: str | os.PathLike[str] | None
        hold_timeout: float
        start_timeout: float
        stop_timeout: float
        allowed_uids: list[int]
        log_level: str
        log_max_bytes: int
        log_backups: int
        max_frame: int
        max_client_requests: int
        max_client_backlog: int
        max_backlog_total: int
        frame_timeout: float
        max_frames_total: int
        max_direct_backlog_total: int
        direct_idle_timeout: float
        metrics: str | None
        direct_reads: bool
        memory_max: int | str | None
        memory_enforcement: str

    class TomlOverrides(SupervisorOptions, total=False):
        """from_toml()'s keyword overrides: every [supervisor] key."""

        state_dir: str | os.PathLike[str]

    class ModuleOutcome(TypedDict):
        """What became of a module an operator's request moved (admin.py): ``ok`` if it got
        where it was asked to (READY, or STOPPED for a stop), else ``note`` says why not."""

        name: str
        state: str
        pid: int | None
        ok: bool
        note: str | None

    class ReloadOutcome(ModuleOutcome):
        change: str  # "added", "removed", "restarted", or "changed" (stopped: applies when started)

    class ReloadSummary(TypedDict):
        """What Supervisor.reload() returns: the module names by what the reload did to them."""

        added: list[str]
        removed: list[str]
        restarted: list[str]
        changed: list[str]  # stopped by an operator: the new options apply when it is started
        unchanged: list[str]
        needs_restart: list[str]  # [supervisor] keys that changed: they apply at the next start
        modules: list[ReloadOutcome]

    class SaveSummary(TypedDict):
        """What Supervisor.save() returns."""

        file: str  # the config file written
        modules: list[str]  # the modules walked, in save order
        rows: int  # rows written, over all of them

    # Supervisor.export(): {module: {table: [row, ...]}}, a row's None the agent's null.
    Export = dict[str, dict[str, list[dict[str, str | None]]]]

log = logging.getLogger("cmactor.supervisor")

_running = weakref.WeakSet()


@atexit.register
def _stop_all():
    # Runs before multiprocessing's own exit handler (atexit is last-in first-out),
    # which would otherwise wait forever on workers that wait on us.
    for sup in list(_running):
        sup.stop()


class Supervisor:
    """Runs agents in worker processes and serves their frontend socket.

    ``agents``: module name -> entry (``"pkg.mod:func"``, ``"path/file.py:func"``, or
    without ``:func`` run as ``__main__``) or a dict of agent options with an
    ``entry``. Relative paths are relative to ``base_dir`` (the config file's
    directory for :meth:`from_toml`, else the current directory). ``exos_path``: the
    directories supplying EXOS names cmactor does not (``DIR/exos/api/vlan.py``) to
    every agent, as ``[exos] path`` does in a cmactor.toml. Other keyword
    options are the ``[supervisor]`` keys of a cmactor.toml. ``ignore_config``: start with defaults when the saved config file
    is unusable, after renaming it aside (else start refuses). ``recover`` (the
    default): each module is loaded with its saved config followed by the journal of
    the changes acknowledged since, whether the last supervisor crashed or stopped
    cleanly; False starts from the saved config alone, moving the journals aside
    (kept, and named in the log) — an operator's explicit choice (``--saved-only``).
    """

    def __init__(
        self,
        agents: Mapping[str, str | Mapping[str, object]],
        state_dir: str | os.PathLike[str] = ".cmactor",
        *,
        base_dir: str | os.PathLike[str] | None = None,
        exos_path: Sequence[str | os.PathLike[str]] = (),
        ignore_config: bool = False,
        recover: bool = True,
        **options: Unpack[SupervisorOptions],
    ) -> None:
        self.base_dir = os.path.abspath(base_dir or os.getcwd())
        self.ignore_config = ignore_config
        self.recover = recover
        # A notify.Notifier, set before start(), is told of readiness, module state changes
        # and the stop: `cmactor run` under systemd sets one, an embedding program need not.
        self.notifier: Notifier | None = None
        self._metrics = None  # metrics.Exporter while /metrics is served
        self.options: dict[str, Any] = supervisor_options("Supervisor options", {"state_dir": state_dir, **options})
        self.state_dir = os.path.abspath(os.path.join(self.base_dir, self.options["state_dir"]))
        self.config_path = os.path.join(self.state_dir, store.FILENAME)
        self._exos_path = exos_dirs("Supervisor exos_path", exos_path, self.base_dir)
        agent_options = agents_config(agents, self.base_dir, exos_path=self._exos_path)
        self.modules: dict[str, Module] = {name: self._record(name, opts) for name, opts in agent_options.items()}
        # The cmactor.toml it was made from (from_toml) and the keys given over it, for reload().
        self.config_file: str | None = None
        self._overrides: dict[str, Any] = {}
        self.hold_timeout: float = self.options["hold_timeout"]
        self.socket_path: str | None = None
        self._loop = None
        self._lock = None  # state.StateLock while started
        self._control = None  # control.Control, once built
        # Under [ha] (cmsupervisor.ha.Node): the node's part in its cluster, and what writes
        # the cluster's config into the state_dir once it is locked and before it is read.
        self.replica = None
        self.before_open: Callable[[], object] | None = None
        # The [restconf] options of the config file (from_toml, configured): its RESTCONF server
        # is then run beside the modules as a process of its own (supervision/sidecar.py).
        self.restconf_options: dict[str, Any] | None = None
        self._restconf: Sidecar | None = None

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **overrides: Unpack[TomlOverrides]) -> Self:
        """A supervisor configured by a cmactor.toml; keyword arguments override [supervisor] keys."""
        options, agents, base_dir, ha = load_toml(path)
        if ha is not None:
            raise ConfigError(
                f"{path} has an [ha] table: its supervisor is a node of a cluster; run it with `cmactor run`, "
                "or embed it with cmsupervisor.ha.Node.from_toml()"
            )
        return cls.configured(path, options, agents, base_dir, overrides)

    @classmethod
    def configured(
        cls, path: str | os.PathLike[str], options: dict[str, Any], agents: Any, base_dir: str, overrides: Any
    ) -> Self:
        """A supervisor of what load_toml() read from ``path``, ``overrides`` over its keys."""
        sup = cls(agents, base_dir=base_dir, **{**options, **overrides})
        sup.config_file = os.path.abspath(path)
        # Only the [supervisor] keys: the others (ignore_config, recover) are Supervisor()'s own.
        sup._overrides = {key: value for key, value in overrides.items() if key in SUPERVISOR_OPTIONS}
        sup.restconf_options = restconf_options(path)
        return sup

    def _record(self, name, options):
        """The record of module ``name`` with its checked agent ``options``."""
        return Module(
            name, options, RestartPolicy(options), memory_limit(options["memory_max"], self.options["memory_max"])
        )

    # -- public API (any thread) -----------------------------------------

    def start(self, timeout: float | None = None, strict: bool = True, stay_up: bool = False) -> Self:
        """Start every agent; return when all are READY, else stop them and raise StartupError.

        ``strict=False`` (``cmactor run`` without ``--strict``): as supervisord and systemd
        do, keep serving the modules that came up and leave the others FAILED (their
        dependents WAITING_DEPS) with their reasons logged; raise only if none came up.
        ``stay_up`` (with strict False): not even then: a cluster's node joining again
        serves as a standby whose FAILED modules an operator can mend and restart.
        """
        if self._loop is not None:
            raise RuntimeError("this Supervisor was already started")
        timeout = self.options["start_timeout"] if timeout is None else timeout
        fds.ensure(len(self.modules))  # StartupError with the numbers when the modules cannot fit
        # What cmactor creates is owner-only: the config, journal and audit log hold config
        # values. The state directory is also entered by allowed_uids (to reach the socket).
        # Nothing in it is read, renamed or created before its lock is held.
        self._lock = state.lock(self.state_dir, 0o711 if self.options["allowed_uids"] else 0o700)
        try:
            if self.before_open is not None:
                self.before_open()
            sections, listening = self._open_state()
        except BaseException:
            self._lock.release()
            raise
        self.socket_path = listening[1]
        try:
            self._build(sections, listening)
            self._loop.start(on_death=self._die)
        except BaseException:  # out of descriptors or threads, say: nothing may stay held
            self._abandon(listening)
            raise
        _running.add(self)
        if self.options["metrics"] is not None:
            self._serve_metrics()
        self._loop.call(self._recovery.watchdog)
        self._memory.start()
        self._loop.call(self._router.time_out)
        self._loop.call(self._recovery.launch_all)
        self._lifecycle.start_done.wait(timeout)
        reasons = self._loop.call(self._lifecycle.not_ready)
        detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        if reasons and (strict or (len(reasons) == len(self.modules) and not stay_up)):
            self.stop()
            raise StartupError(f"modules not READY after start (timeout {timeout:g}s): {detail}", reasons)
        self._loop.call(self._lifecycle.end_start)
        if self._restconf is not None:  # its modules are up (as far as they came): serve them
            self._loop.call(self._restconf.start, self._loop)
        if self.notifier is not None:
            self._loop.call(self.notifier.ready)
        summary, all_ready = self._loop.call(self._lifecycle.summary)
        if all_ready:
            log.info("%s; listening on %s", summary, self.socket_path)
        else:
            log.error("%s; serving the others, listening on %s", summary, self.socket_path)
        return self

    def _open_state(self):
        """(The state_dir locked.) Read the config file, open the logs, the audit log and the
        journals, and listen: (the config's sections, the socket as server.listen returns
        it). StartupError with what was opened closed again."""
        store.remove_leftovers(self.state_dir)  # ours alone: no other supervisor writes here
        sections = self._read_config()
        self._stopped_at_start = state.read_stopped(self.state_dir)  # the modules an operator stopped
        max_bytes, backups = self.options["log_max_bytes"], self.options["log_backups"]
        self._logs = ModuleLogs(os.path.join(self.state_dir, "logs"), self.modules, max_bytes, backups)
        self._logs.check()  # StartupError naming the path if a module's log cannot be written
        audit = os.path.join(self.state_dir, "audit.log")
        try:
            self._audit = AuditLog(audit, max_bytes, backups)
        except OSError as exc:
            raise StartupError(f"audit log {audit} cannot be written: {store.reason(exc)}") from None
        try:
            state.open_journals(self.modules, self.state_dir, self.recover)
            return sections, state.listen(
                self.state_dir, self.base_dir, self.options["socket"], self.options["allowed_uids"]
            )
        except StartupError:
            state.close_journals(self.modules)
            self._audit.close()
            raise

    def _abandon(self, listening):
        """A start that failed once the state was open: close what was opened, socket,
        journals, audit log, the logs, the status helper, and release the state_dir's lock."""
        if self._control is not None:
            self._control.close()
        if self._loop is not None:
            self._loop.close()
        server.unlisten(*listening)
        state.close_journals(self.modules)
        self._audit.close()
        self._logs.close()
        self._lock.release()

    def _build(self, sections, listening):
        """Make the parts; each is given the others it calls (see the package docstring)."""
        modules = self.modules
        self._logs.attach()
        self._loop = loop = EventLoop()
        self._audit.schedule = loop.after_output
        limits = ClientLimits.from_options(self.options)  # one policy for the supervisor's socket and the workers'
        self._server = server.Server(loop, listening, limits)
        self._graph = graph = WaitGraph(modules)
        self._router = router = Router(modules, loop, graph, self._audit, self.hold_timeout)
        self._server.on_drop = router.forget_client
        self._saver = saver = Saver(modules, loop, self._audit, self.config_path, sections)
        # StartupError with memory_enforcement = "cgroup" where no cgroup can be made
        self._memory = memory = Enforcement(modules, loop, self._logs, Workers.kill, self.options["memory_enforcement"])
        self._workers = workers = Workers(
            loop,
            socket_path=self.socket_path,
            base_dir=self.base_dir,
            log_level=self.options["log_level"],
            direct=self._direct_options(limits),
            cgroups=memory.cgroups,
        )
        self._lifecycle = lifecycle = Lifecycle(
            modules,
            loop,
            workers,
            router,
            saver,
            self._logs,
            stop_timeout=self.options["stop_timeout"],
            on_stopped=self._close,
        )
        saver.on_idle = lifecycle.continue_stop
        self._recovery = recovery = Recovery(modules, loop, workers, router, graph, saver, lifecycle, self._logs)
        self._admin = admin = Admin(
            modules,
            loop,
            lifecycle,
            recovery,
            saver,
            self._audit,
            self._logs,
            self.state_dir,
            self.options,
            self._stopped_at_start,
            self._record,
            self._adopt,
            self._let_go,
        )
        for mod in modules.values():
            self._follow(mod)
        self._control = control = Control(
            loop,
            modules,
            self._server,
            graph,
            saver,
            lifecycle,
            self._audit,
            self._logs,
            router,
            admin,
            self._read_reload,
        )
        self._server.on_data = router.route
        self._server.on_control = control.handle
        workers.on_exit = recovery.on_exit
        workers.on_output = self._logs.output
        self._logs.schedule = loop.after_output
        router.on_journal_failure = recovery.reload
        router.on_journal_full = saver.compact
        if self.replica is not None:
            router.replica = saver.replica = control.replica = self.replica
            self.replica.wire(loop, modules, router, saver.section)
        if self.notifier is not None:
            self.notifier.watch(loop, modules)
        lifecycle.on_stop = self._on_stop
        self._restconf = control.restconf = self._restconf_sidecar()
        for kind, handler in (
            (P.Reply, router.on_reply),
            (P.Notify, router.on_notify),
            (P.Log, self._log_record),
            (P.Init, lifecycle.on_init),
            (P.Ready, lifecycle.on_ready),
            (P.Loaded, lifecycle.on_loaded),
            (P.Saved, saver.on_saved),
            (P.Fatal, lifecycle.on_fatal),
            (P.Pong, recovery.on_pong),
            (P.Dirty, router.on_dirty),
        ):
            workers.handle(kind, handler)

    def _follow(self, mod):
        """Subscribe the parts that follow a module's state to ``mod``: what is held for it
        follows its state (the router), operators' requests wait for it (admin.py)."""
        mod.subscribe(self._router.module_changed)
        mod.subscribe(self._admin.module_changed)

    def _adopt(self, mod):
        """(Loop thread.) A module a reload adds: its journal and log opened (StartupError naming
        the file if one cannot be), followed as every module is."""
        state.open_journals({mod.name: mod}, self.state_dir, recover=True)
        try:
            self._logs.add(mod.name)
        except StartupError:
            state.close_journals({mod.name: mod})
            raise
        self._follow(mod)
        if self.notifier is not None:
            self.notifier.follow(mod)

    def _let_go(self, mod):
        """(Loop thread.) A module a reload removed, gone, or one it added and then gave up:
        its journal and log closed (their files stay)."""
        state.close_journals({mod.name: mod})
        self._logs.remove(mod.name)

    def _restconf_sidecar(self):
        """The RESTCONF server of [restconf] as a sidecar (`cmactor restconf` for this
        supervisor's socket and state_dir), or None without [restconf]."""
        options = self.restconf_options
        if options is None or self.config_file is None:
            return None
        argv = [sys.executable, "-m", "cmsupervisor", "restconf", "-c", self.config_file]
        argv += ["--socket", self.socket_path, "--state-dir", self.state_dir]
        return Sidecar(
            "restconf",
            argv,
            url=f"{'https' if options['tls'] else 'http'}://{options['listen']}",
            ready=re.compile(r"cmactor restconf: serving (?P<url>https?://\S+)/restconf"),
            facts={"fingerprint": re.compile(r"SHA-256 fingerprint: (\S+)")},
            options=options,
            stop_timeout=self.options["stop_timeout"],
            start_timeout=self.options["start_timeout"],
        )

    def _on_stop(self):
        """(Loop thread.) A stop begins: systemd is told, the RESTCONF server is sent SIGTERM."""
        if self.notifier is not None:
            self.notifier.stopping()
        if self._restconf is not None:
            self._restconf.begin_stop()

    def _direct_options(self, limits):
        """How workers serve direct reads (cmactor/worker/direct.py): with the client ``limits``
        of the supervisor's own socket, and where to send what they do not serve."""
        if not self.options["direct_reads"]:
            return None
        return {"limits": limits, "supervisor_socket": self.socket_path}

    def _serve_metrics(self):
        """Serve /metrics where [supervisor] metrics says; else stop and raise StartupError."""
        try:
            self._metrics = stats.exporter(self.options["metrics"], self._control.figures)
        except StartupError:
            self.stop()
            raise
        log.info("serving Prometheus metrics at %s", self._metrics.url)

    def _read_config(self):
        try:
            return store.read(self.config_path)
        except store.StoreError as exc:
            if not self.ignore_config:
                raise StartupError(f"{exc}; fix or remove it, or start with `cmactor run --ignore-config`") from None
            aside = store.set_aside(self.config_path)
            log.warning("%s; starting with defaults, the file is kept as %s", exc, aside)
            return {}

    def connect(
        self,
        username: str = "admin",
        print_callback: Callable[[str], object] | None = None,
        timeout: float | None = None,
    ) -> cmfrontend.Connection:
        """A frontend connection to this supervisor."""
        if self.socket_path is None:
            raise RuntimeError("start() the supervisor before connecting to it")
        return cmfrontend.connect(username, print_callback, self.socket_path, timeout)

    @property
    def metrics_url(self) -> str | None:
        """Where /metrics is served (the port bound, for ``metrics = "host:0"``), or None."""
        return None if self._metrics is None else self._metrics.url

    def status(self) -> dict[str, dict[str, Any]]:
        """Per module: state, pid, restarts, unsaved, uptime, rss, cpu, threads, queue, inflight, ...
        (copied on the loop thread; the workers' psutil figures are read on the calling thread)."""
        return self._control.status()

    def restconf_status(self) -> dict[str, Any] | None:
        """The RESTCONF server run beside the modules ([restconf]): {"state" (STARTING, RUNNING,
        RESTARTING, FAILED, STOPPED), "pid", "restarts", "url", "last_exit", "error",
        "fingerprint"}; None without [restconf]."""
        if self._restconf is None:
            return None
        return self._loop.call(self._restconf.status)

    def supervisor_status(self) -> dict[str, Any]:
        """The supervisor's own figures: audit log lines that could not be written and the last error,
        clients connected, saves (ok, errors by type, duration histogram), data requests to unknown modules,
        and "restconf": what restconf_status() says."""
        return self._loop.call(self._control.own_status)

    def schema(self, module: str | None = None) -> dict[str, dict[str, Any] | None]:
        """What each module's agent declares for RESTCONF (CmAgent.columns, index_columns,
        delete_tables), or only ``module``'s: {module: {"tables": {table: {"index", "columns",
        "config", "setop", "delete"}}}}, None for a module no worker of which has registered
        an agent yet. ProgrammingError for a module this supervisor does not run."""
        return self._loop.call(self._control.schema, module)

    def save(self, user: str = "supervisor") -> SaveSummary:
        """Save every READY module's persistent tables to the config file; return a summary.

        Raises DatabaseError naming the module whose save failed (the previous file
        stays as it was), OperationalError if the file cannot be written.
        """
        future: concurrent.futures.Future[SaveSummary] = concurrent.futures.Future()
        self._loop.call(self._saver.request, future, user)
        return future.result()

    def export(self, modules: Collection[str] | None = None, user: str = "supervisor") -> Export:
        """The live rows of the persistent tables of ``modules`` (default: every module),
        walked as a save walks them but written nowhere: {module: {table: [row, ...]}},
        dependencies first, tables in persistent_list order, rows in walk order.

        Raises ProgrammingError for a module this supervisor does not run,
        OperationalError for one that is not READY, DatabaseError if a walk fails.
        """
        future = concurrent.futures.Future()
        self._loop.call(self._saver.export, future, user, modules)
        return {name: json.loads(section) for name, section in future.result()}

    def restart(
        self, name: str, kill: bool = False, wait: bool = False, user: str = "supervisor"
    ) -> ModuleOutcome | None:
        """Restart one module now, reviving it if it is quarantined or stopped (admin.py): in
        order by default (its worker ends once its requests in flight are answered, or at
        stop_timeout; requests meanwhile are held for the next one), ``kill`` at once (what
        it had started fails). ``wait``: return once it is READY again, as
        :meth:`start_module` does; else at once."""
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self._loop.call(self._admin.restart, future, user, name, kill)
        return future.result()["module"] if wait else None

    def stop_module(self, name: str, user: str = "supervisor") -> ModuleOutcome:
        """Stop one module in order (as :meth:`stop` does each) and keep it STOPPED, across
        restarts of the supervisor too, until :meth:`start_module`; requests to it fail at
        once meanwhile. Returns once it is STOPPED: {"name", "state", "pid", "ok", "note"}."""
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self._loop.call(self._admin.stop, future, user, name)
        return future.result()["module"]

    def start_module(self, name: str, user: str = "supervisor") -> ModuleOutcome:
        """Start a module that was stopped (or is FAILED); returns once it is READY, as
        {"name", "state", "pid", "ok", "note"}. OperationalError saying why if it does not
        come up within stop_timeout + start_timeout."""
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self._loop.call(self._admin.start, future, user, name)
        return future.result()["module"]

    def restart_all(self, rolling: bool = False, kill: bool = False, user: str = "supervisor") -> list[ModuleOutcome]:
        """Restart every module but the stopped ones, all at once, or (``rolling``) one at a time,
        dependencies first, each READY before the next (a module that does not come up ends
        the roll). Returns once they have settled: one outcome a module, in that order."""
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self._loop.call(self._admin.restart_all, future, user, rolling, kill)
        return future.result()["modules"]

    def reload(
        self, agents: Mapping[str, str | Mapping[str, object]] | None = None, user: str = "supervisor"
    ) -> ReloadSummary:
        """Run a changed agents config without a restart: added modules start, removed ones stop
        in order and go, changed ones (any agent option differs) restart in order with their
        new options, and nothing touches the others. ``agents``: the new agents, as
        Supervisor() takes them; None reads the config file again (from_toml's).

        A config with an error changes nothing: ConfigError naming every error. [supervisor]
        keys that changed are listed in ``needs_restart`` and apply at the next start.
        OperationalError if the reload is refused (a module removed that others depend on,
        another reload or rolling restart under way). Returns once the modules have settled.
        """
        plan = self._read_reload(agents)
        future: concurrent.futures.Future[ReloadSummary] = concurrent.futures.Future()
        self._loop.call(self._admin.reload, future, user, *plan)
        return future.result()["reload"]

    def _read_reload(self, agents):
        """(Not the loop thread: it reads files.) The agents to reload and the [supervisor] keys
        that changed, checked, or ConfigError naming every error."""
        if agents is not None:
            problems = Problems("Supervisor.reload() agents")
            checked = agents_config(agents, self.base_dir, exos_path=self._exos_path, problems=problems)
            problems.check()
            return checked, []
        if self.config_file is None:
            raise ConfigError(
                "this supervisor was not made from a config file (Supervisor.from_toml): pass the new agents "
                "to reload(agents)"
            )
        options, checked, _, _ = load_toml(self.config_file)
        options = supervisor_options(f"{self.config_file}: [supervisor]", {**options, **self._overrides})
        return checked, [key for key, value in options.items() if value != self.options[key]]

    def stop(self) -> None:
        """Stop every module (dependents first) and the loop; no process is left behind."""
        if self._loop is not None and not self._loop.finished:
            try:
                self._loop.call_async(self._lifecycle.begin_stop)
            except RuntimeError:
                pass  # it stopped meanwhile
        if self._loop is not None:
            self._loop.join()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        _running.discard(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the supervisor has stopped (e.g. a client sent 'stop'). True if it has."""
        return self._loop.wait(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- on the loop thread ------------------------------------------------

    def _die(self):
        """The loop died of an error: no worker may outlive it."""
        for mod in self.modules.values():
            self._workers.kill(mod)
        if self._restconf is not None:
            self._restconf.kill()
        self._close()

    def _close(self):
        if self._restconf is not None:
            self._restconf.close()  # gone before the lock is released: the next supervisor starts its own
        self._memory.close()
        self._admin.close()
        self._saver.shutdown()
        self._server.close()
        self._control.close()
        try:
            os.unlink(server.socket_pointer(self.state_dir))
        except OSError:
            pass
        self._audit.close()
        self._logs.close()
        if self.notifier is not None:
            self.notifier.close()
        state.close_journals(self.modules)
        if self.replica is not None:
            self.replica.close()
        self._lock.release()  # last: the next supervisor may take the state_dir over now
        self._loop.finish()

    def _log_record(self, mod, record):
        """A worker's log record: to the module's log, and re-emitted on the logger of its module."""
        self._logs.record(mod, record.level, record.name, record.text)
        logging.getLogger(f"cmactor.agent.{mod.name}").log(record.level, "[%s] %s", record.name, record.text)
