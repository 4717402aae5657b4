"""An agent's actions called in the test's own process: no supervisor, no worker.

A unit test of an agent wants its actions, not a supervisor: ``AgentHarness`` stands in
for the worker's runtime, so the agent's entry runs as it would in a worker —
``cmbackend_init()`` is recorded, ``ready()`` too (in a test process without a harness it
is refused) — and the test then drives the events and actions itself::

    with AgentHarness() as h:
        h.start(vlan.main)                     # the entry: it calls cmbackend_init()
        h.generate_default()                   # event_generate_default; h.ready_called after
        h.set("vlan", name="v10", tag=10)      # -> the action's fields, as strings
        with pytest.raises(cmactor.DatabaseError, match="tag must be a number"):
            h.set("vlan", name="v11", tag="x")
        assert h.walk("vlan") == [{"name": "default", "tag": "1"}, {"name": "v10", "tag": "10"}]
        saved = h.save()                       # the save walk of every persistent table
    with AgentHarness() as h:                  # a second life: load what was saved
        h.start(vlan.main)
        h.load(saved)

Actions run as the worker runs them: a new CmContext per call, ``raise_error`` becomes a
``DatabaseError`` with its message, an exception a ``DatabaseError`` naming it, and a
getnext walk carries each row's index columns (``index_columns``) as the worker's does.
The pytest plugin's fixture ``cmactor_agent`` gives a started harness and detaches it
at teardown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cmactor import cmbackend
from cmactor.cmbackend import ActionStopped, CmContext
from cmactor.errors import DatabaseError, ProgrammingError
from cmactor.worker.actions import walk

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Self

    from cmactor.cmbackend import CmAgent

# More rows than a unit test's table holds: a walk past it is an agent that never ends.
MAX_WALK = 100_000


class AgentHarness:
    """The worker's part for one agent, in this process (see the module's docstring)."""

    def __init__(self) -> None:
        self.agent: CmAgent | None = None
        self.persistent_list: list[str] = []
        self.config_deps: list[str] = []
        self.ready_called = False
        self.notified: list[str] = []  # notify_cli texts, in order
        self._previous: Any = None

    # -- as the worker's runtime (cmbackend.attach_runtime) --------------------------

    def register(self, agent: CmAgent, persistent: list[str], deps: list[str]) -> None:
        if self.agent is not None:
            raise ProgrammingError("cmbackend_init() was called twice: one agent per worker")
        self.agent, self.persistent_list, self.config_deps = agent, list(persistent), list(deps)

    def ready(self) -> None:
        self.ready_called = True

    def __enter__(self) -> Self:
        self._previous = cmbackend._runtime
        cmbackend.attach_runtime(self)
        return self

    def __exit__(self, *exc: object) -> None:
        cmbackend._runtime = self._previous

    # -- driving the agent ------------------------------------------------------------

    def start(self, entry: Callable[[], object]) -> CmAgent:
        """Run the agent's entry (its ``main``); it must call cmbackend_init(). The agent."""
        entry()
        if self.agent is None:
            raise ProgrammingError(f"{getattr(entry, '__name__', entry)!r} returned without calling cmbackend_init()")
        return self.agent

    def generate_default(self) -> None:
        """No saved config: ``event_generate_default``, as a first start runs it."""
        self._event("event_generate_default")

    def load(self, saved: Mapping[str, list[Mapping[str, object]]]) -> None:
        """Saved config (table -> rows, as save() returns it): ``event_load_start``, each
        row's ``<table>_set`` with ``ctx.is_load``, then ``event_load_complete``."""
        self._event("event_load_start")
        for table, rows in saved.items():
            for row in rows:
                params = {key: str(value) for key, value in row.items() if value is not None}
                self._call("set", table, params, is_load=True)
        self._event("event_load_complete")

    def save(self) -> dict[str, list[dict[str, str | None]]]:
        """The save walk: ``event_save_start``, every persistent table's rows, ``event_save_complete``."""
        self._event("event_save_start")
        saved = {table: self._walk(table, {}, is_save=True) for table in self.persistent_list}
        self._event("event_save_complete")
        return saved

    def get(self, table: str, **params: object) -> dict[str, str | None]:
        return self._call("get", table, _texts(params))

    def set(self, table: str, **params: object) -> dict[str, str | None]:
        return self._call("set", table, _texts(params))

    def setop(self, table: str, **params: object) -> dict[str, str | None]:
        return self._call("setop", table, _texts(params))

    def walk(self, table: str, **params: object) -> list[dict[str, str | None]]:
        """A getnext walk from ``params`` to the table's end, as a client's walk."""
        return self._walk(table, _texts(params))

    # -- how the worker calls it ------------------------------------------------------

    def _agent(self) -> CmAgent:
        if self.agent is None:
            raise ProgrammingError("no agent yet: start(main) first, which must call cmbackend_init()")
        return self.agent

    def _event(self, name: str) -> None:
        try:
            getattr(self._agent(), name)()
        except ActionStopped as stop:
            raise DatabaseError(f"{name} stopped: {stop}") from None

    def _action(self, table: str, suffix: str) -> Callable[[CmContext], object]:
        method = getattr(self._agent(), f"{table}_{suffix}", None)
        if not callable(method):
            raise ProgrammingError(f"the agent has no {table}_{suffix} action")
        return method

    def _call(self, op: str, table: str, params: dict[str, str], is_load: bool = False) -> dict[str, str | None]:
        method = self._action(table, "get" if op == "get" else op)
        ctx = CmContext(params, None, op, False, False, is_load, self.notified.append)
        try:
            method(ctx)
        except ActionStopped as stop:
            raise DatabaseError(str(stop)) from None
        except Exception as exc:
            raise DatabaseError(f"{op} {table} raised {type(exc).__name__}: {exc}") from exc
        return {key: None if value is None else str(value) for key, value in ctx.fields.items()}

    def _walk(self, table: str, params: dict[str, str], is_save: bool = False) -> list[dict[str, str | None]]:
        method = self._action(table, "get")
        index = self._agent().index_columns.get(table)
        try:
            rows, more = walk(
                method,
                params,
                None,
                MAX_WALK,
                None,
                list(index) if index is not None else None,
                is_save=is_save,
                notify=self.notified.append,
            )
        except ActionStopped as stop:
            raise DatabaseError(str(stop)) from None
        except Exception as exc:
            raise DatabaseError(f"getnext {table} raised {type(exc).__name__}: {exc}") from exc
        if more:
            raise DatabaseError(f"the walk of {table} passed {MAX_WALK} rows: does {table}_get ever end?")
        return rows


def _texts(params: Mapping[str, object]) -> dict[str, str]:
    """Params as a client sends them: every value a string."""
    return {key: str(value) for key, value in params.items()}
