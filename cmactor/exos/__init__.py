"""cmactor's stand-in for the EXOS platform's ``exos`` package, and the search for the rest.

An EXOS app takes its process API from ``exos.api`` and its siblings. PyPI's
project ``exos`` owns that import name, so cmactor installs nothing called
``exos``: inside a worker (agent key ``exos_compat``, default true) an import
hook (``install()``) makes the names in ``PROVIDED`` resolve to cmactor's own
modules, whatever else is on the path. Anywhere else they are ``cmactor.exos.api``
and so on, or call ``install()`` first (a test of an app's own code, for one).

On a switch the namespace holds more than cmactor provides: platform modules
(``exos.api.vlan``, ``acl``, ``ssl``, C modules such as ``_exos_ext_ems``) and
apps' own packages (the HTTP app ships ``exos/httpd/``). So every other
``exos.NAME``, ``exos.api.NAME`` and top-level ``_exos_ext_NAME`` is searched for,
first in the directories given to ``install(search=...)`` (``[exos] path`` in
cmactor.toml and the agent's ``exos_path``), then on sys.path as it is at the
import. A directory D is laid out as on the switch: ``D/exos/api/vlan.py`` (or the
package ``D/exos/api/vlan/``) serves ``exos.api.vlan``, ``D/exos/httpd/`` serves
``exos.httpd``, ``D/_exos_ext_ems.py`` serves ``_exos_ext_ems``. A name deeper
down (``exos.httpd.auth``) is its package's business: the ordinary machinery finds it.

The ``exos`` and ``exos.api`` packages stay cmactor's: a ``D/exos/__init__.py`` or
``D/exos/api/__init__.py`` is never executed, and no ``D/exos/api/cmbackend.py``
shadows a name in ``PROVIDED``. What nobody supplies raises ImportError naming it,
where it was looked for and how to supply it, so an app's ``try/except
ImportError`` fallbacks run as they would off a switch.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

# The EXOS import name -> the cmactor module that serves it.
PROVIDED = {
    "exos": "cmactor.exos",
    "exos.api": "cmactor.exos.api",
    "exos.api.cmbackend": "cmactor.cmbackend",
    "exos.api.exos_dbapi": "cmactor.exos_dbapi",
    "exos.api.cmfrontend": "cmactor.exos_dbapi",  # the platform's older name for the same module
    "exos.api.dm": "cmactor.exos.api.dm",
    "exos.api.tlv": "cmactor.exos.api.tlv",
    "_exos_ext_cmfe": "cmactor.exos.ext_cmfe",
}

# cmactor's packages; the children of each not in PROVIDED are searched for.
_PACKAGES = ("exos", "exos.api")

_EXT_PREFIX = "_exos_ext_"  # the platform's C modules, top-level names


class _Alias(importlib.abc.Loader):
    """Loads an EXOS name from the cmactor module behind it.

    A module is that very module under a second name (its state, such as the
    worker's runtime in cmbackend, is one). A package is a module of its own with
    the cmactor package's names: under its EXOS name, `from exos.api import vlan`
    then asks the finder for exos.api.vlan, which searches for it.
    """

    def __init__(self, target):
        self._target = target
        self._own_spec = None

    def create_module(self, spec):
        if spec.submodule_search_locations is not None:
            return None  # a fresh module, filled in by exec_module
        real = importlib.import_module(self._target)
        self._own_spec = real.__spec__
        return real

    def exec_module(self, module):
        real = importlib.import_module(self._target)
        if module is real:
            module.__spec__ = self._own_spec  # the import system gave it the alias's spec
            return
        names = {k: v for k, v in vars(real).items() if not k.startswith("_")}
        module.__dict__.update(names, __doc__=real.__doc__, __all__=getattr(real, "__all__", sorted(names)))


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.search = []  # the configured directories, searched before sys.path

    def find_spec(self, name, path=None, target=None):
        real = PROVIDED.get(name)
        if real is not None:
            return importlib.util.spec_from_loader(name, _Alias(real), is_package=name in _PACKAGES)
        parent = name.rpartition(".")[0]
        if parent in _PACKAGES:
            locations = self._package_dirs(parent)
        elif name.startswith(_EXT_PREFIX) and not parent:
            locations = [*self.search, *sys.path]
        else:
            return None  # not an EXOS name, or one inside a package the ordinary machinery searches
        found = importlib.machinery.PathFinder.find_spec(name, locations)
        if found is None:
            raise _not_supplied(name, self.search)
        return found

    def _package_dirs(self, package):
        """Where ``package``'s children may be: its directory in each searched directory
        that has one, looked up now (sys.path may have grown since the worker started)."""
        roots = [*self.search, *(entry or os.getcwd() for entry in sys.path if isinstance(entry, str))]
        candidates = (os.path.join(root, *package.split(".")) for root in roots)
        return [directory for directory in candidates if os.path.isdir(directory)]


def _not_supplied(name, search):
    # A plain ImportError: `from exos.api import vlan` passes a ModuleNotFoundError
    # over and reports only "cannot import name", losing this text.
    looked = f"in {', '.join(search)} and on sys.path" if search else "on sys.path (no directory configured)"
    layout = os.path.join(*name.split(".")) + ".py"
    return ImportError(
        f"{name} is an EXOS platform API that cmactor does not provide and nobody supplied (only a switch "
        f"has it); looked {looked}. Supply one as DIR/{layout} with DIR listed in [exos] path of cmactor.toml "
        "(or the agent's exos_path), or guard the import with try/except ImportError, as EXOS apps do for exsh",
        name=name,
    )


_finder = _Finder()


def install(search=()):
    """Make ``import exos...`` resolve in this process: the names in PROVIDED to cmactor's
    modules, ahead of any installed ``exos`` package; the other EXOS names to what the
    directories ``search`` (then sys.path) supply. Idempotent, a second call replacing
    ``search``; workers call it unless ``exos_compat = false``."""
    _finder.search = [os.path.abspath(directory) for directory in search]
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
