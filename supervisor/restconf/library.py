"""What the server knows of the supervisor's modules: their schemas (the ``schema`` control
op), the YANG text generated from each, and the YANG library (RFC 8525) naming them.

The schemas are read at start, again when a request names a module or table not known
(at most once a second: a client naming nonsense cannot make the server ask for each
request), and once they are older than ``max_age`` seconds, since a module's agent may
declare other tables after a restart. Each read is one cheap control op."""

import hashlib
import logging
import os
import threading
import time

from cmactor.errors import DatabaseError, OperationalError
from cmsupervisor.restconf.errors import not_found, unavailable
from cmsupervisor.restconf.paths import PREFIX
from cmsupervisor.restconf.yang import module_text, revision_for

log = logging.getLogger("cmactor.restconf")

YANG_LIBRARY_VERSION = "2019-01-04"  # RFC 8525's ietf-yang-library
MODULE_SET = "cmactor"


class Module:
    """One module as served: its schema's tables, its revision and YANG text."""

    def __init__(self, name, tables, revision, text):
        self.name = name
        self.tables = tables
        self.revision = revision
        self.text = text

    @property
    def yang_name(self):
        return PREFIX + self.name

    @property
    def file_name(self):
        return f"{self.yang_name}@{self.revision}.yang"


class Library:
    """The modules the supervisor runs as the server sees them; thread-safe.

    ``fetch()`` answers the schema op's map {module: {"tables": ...} or None (no agent
    registered yet)}; ``store_path`` is revision_for's store."""

    def __init__(self, fetch, store_path, max_age=30.0, min_interval=1.0, clock=time.monotonic):
        self._fetch = fetch
        self._store_path = store_path
        self.max_age = max_age
        self.min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._read_at = None
        self.modules = {}  # name -> Module, those with a schema
        self.waiting = set()  # modules run but whose agent has not declared anything yet
        self.content_id = ""

    def refresh(self, unless_within=0.0):
        """Read the schemas again, unless they were read under ``unless_within`` seconds ago
        (by another request's thread, perhaps, while this one waited for the lock); the
        supervisor's error as a RestconfError (503)."""
        with self._lock:
            now = self._clock()
            if self._read_at is not None and now - self._read_at < unless_within:
                return
            try:
                schemas = self._fetch()
            except OperationalError as exc:
                raise unavailable(f"the cmactor supervisor cannot be reached: {exc}") from None
            except DatabaseError as exc:
                raise unavailable(f"the cmactor supervisor did not answer its schema: {exc}") from None
            self._read_at = now
            os.makedirs(os.path.dirname(self._store_path), mode=0o700, exist_ok=True)
            modules, waiting = {}, set()
            for name, schema in sorted(schemas.items()):
                if schema is None:
                    waiting.add(name)
                    continue
                try:
                    revision = revision_for(name, schema, self._store_path)
                    text = module_text(name, schema, revision)
                except (ValueError, OSError) as exc:
                    log.warning("module %s is not served over RESTCONF: %s", name, exc)
                    continue
                modules[name] = Module(name, schema["tables"], revision, text)
            self.modules, self.waiting = modules, waiting
            ids = "".join(f"{m.yang_name}@{m.revision};" for m in modules.values())
            self.content_id = hashlib.sha256(ids.encode()).hexdigest()[:16]

    def current(self):
        """The modules, read again first when they are older than max_age."""
        if self._read_at is None or self._clock() - self._read_at >= self.max_age:
            self.refresh(self.max_age)
        return self.modules

    def module(self, name):
        """The Module ``name``: 404 if the supervisor runs no such module, 503 if its agent
        has declared nothing yet (it is not up)."""
        found = self.current().get(name)
        if found is None:
            self.refresh(self.min_interval)
            found = self.modules.get(name)
        if found is not None:
            return found
        if name in self.waiting:
            raise unavailable(f"module {name} is not READY: its agent has not declared its tables yet")
        raise not_found(f"no module {PREFIX}{name}: this server's modules are {self._names()}")

    def table(self, module, table):
        """(Module, the table's spec): 404 for a table the module does not expose."""
        found = self.module(module)
        if table not in found.tables:
            self.refresh(self.min_interval)
            found = self.module(module)
        spec = found.tables.get(table)
        if spec is None:
            exposed = ", ".join(found.tables) or "none"
            raise not_found(
                f"module {PREFIX}{module} has no table {table!r} (its agent declares in columns: {exposed})",
                f"/{PREFIX}{module}:{module}/{table}",
            )
        return found, spec

    def text(self, file_name):
        """The YANG text of ``cmactor-M@REVISION.yang`` (or ``cmactor-M.yang``: the current one), or None."""
        for mod in self.current().values():
            if file_name in (mod.file_name, f"{mod.yang_name}.yang"):
                return mod.text
        return None

    def _names(self):
        return ", ".join(PREFIX + name for name in self.modules) or "none yet"

    def yang_library(self, base_url):
        """The ietf-yang-library:yang-library (RFC 8525) of the modules; each module's
        location is ``base_url`` + /restconf/yang/<file>."""
        modules = self.current()
        entries = [
            {
                "name": mod.yang_name,
                "revision": mod.revision,
                "namespace": f"urn:cmactor:{mod.name}",
                "location": [f"{base_url}/restconf/yang/{mod.file_name}"],
            }
            for mod in modules.values()
        ]
        return {
            "ietf-yang-library:yang-library": {
                "module-set": [{"name": MODULE_SET, "module": entries}],
                "schema": [{"name": MODULE_SET, "module-set": [MODULE_SET]}],
                "datastore": [{"name": "ietf-datastores:running", "schema": MODULE_SET}],
                "content-id": self.content_id,
            }
        }
