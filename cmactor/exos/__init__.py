"""cmactor's stand-in for the EXOS platform's ``exos`` package.

An EXOS app takes its process API from ``exos.api`` and its siblings. PyPI's
project ``exos`` owns that import name, so cmactor installs nothing called
``exos``: inside a worker (agent key ``exos_compat``, default true) an import
hook (``install()``) makes the names in ``PROVIDED`` resolve to cmactor's own
modules. Anywhere else they are ``cmactor.exos.api`` and so on, or call
``install()`` first (a test of an app's own code, for one).

A platform API cmactor does not provide (``exos.api.vlan``, ``acl``, ``ssl``,
``dm``, ...) raises ImportError naming it, so an app's ``try/except ImportError``
fallbacks run as they would off a switch.
"""

import importlib
import importlib.abc
import importlib.util
import sys

# The EXOS import name -> the cmactor module that serves it.
PROVIDED = {
    "exos": "cmactor.exos",
    "exos.api": "cmactor.exos.api",
    "exos.api.cmbackend": "cmactor.cmbackend",
    "exos.api.exos_dbapi": "cmactor.exos_dbapi",
    "exos.api.cmfrontend": "cmactor.exos_dbapi",  # the platform's older name for the same module
}

_PACKAGES = ("exos", "exos.api")


class _Alias(importlib.abc.Loader):
    """Loads an EXOS name from the cmactor module behind it.

    A module is that very module under a second name (its state, such as the
    worker's runtime in cmbackend, is one). A package is a module of its own with
    the cmactor package's names: under its EXOS name, `from exos.api import vlan`
    then asks this finder for exos.api.vlan, which says what is missing.
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
    def find_spec(self, name, path=None, target=None):
        if name != "exos" and not name.startswith("exos."):
            return None
        real = PROVIDED.get(name)
        if real is None:
            # A plain ImportError: `from exos.api import vlan` passes a ModuleNotFoundError
            # over and reports only "cannot import name", losing this text.
            raise ImportError(
                f"{name} is an EXOS platform API that cmactor does not provide (only a switch has it); "
                f"cmactor provides {', '.join(PROVIDED)}. Guard the import with try/except ImportError, "
                "as EXOS apps do for exsh",
                name=name,
            )
        return importlib.util.spec_from_loader(name, _Alias(real), is_package=name in _PACKAGES)


_finder = _Finder()


def install():
    """Make ``import exos...`` resolve to cmactor's modules in this process, ahead of any
    installed ``exos`` package. Idempotent; workers call it unless ``exos_compat = false``."""
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
