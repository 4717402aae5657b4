"""``ExosLogger`` and ``Severity``: EXOS's system-log conditions, on stdlib logging.

On a switch an ExosLogger writes EMS conditions to the system log (``show log``).
Here a condition logs through ``logging.getLogger(component)`` at the level its
severity maps to, so its records go where any record goes: inside a worker, to the
module's log (``cmactor logs MODULE``); anywhere, to the handlers an app adds::

    elog = ExosLogger("example", "Example Logger", 1)
    elog.add_condition("could_not_open", "Unable to open %tgt% with %opt%", ["tgt", "opt"], sev=Severity.ERROR)
    elog.register()
    elog.could_not_open(tgt="a", opt="b")  # ERROR example: Unable to open a with b
    elog.could_not_open("a", "b")          # the same: params in declared order

A record also carries ``exos_component``, ``exos_condition`` and ``exos_params``
(param name -> the value given) for a handler or filter that wants them.
"""

import enum
import inspect
import keyword
import logging
import re


class Severity(enum.IntEnum):
    """EMS severities, each a ``logging`` level: NOTICE lies between INFO and WARNING,
    and the three debug severities at and below DEBUG, most detailed lowest."""

    CRITICAL = logging.CRITICAL
    ERROR = logging.ERROR
    WARNING = logging.WARNING
    NOTICE = 25
    INFO = logging.INFO
    DEBUG_SUMMARY = logging.DEBUG
    DEBUG_VERBOSE = 7
    DEBUG_DATA = 4


# So that a formatter's %(levelname)s says NOTICE rather than "Level 25"; a level some
# other code has named already keeps its name.
for _severity in Severity:
    if logging.getLevelName(_severity.value) == f"Level {_severity.value}":
        logging.addLevelName(_severity.value, _severity.name)

_LEVELS = frozenset(severity.value for severity in Severity)

# %name% in a condition's message: where the param ``name``'s value goes.
_PLACEHOLDER = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")


class _Condition:
    """One registered condition: a callable that logs its message."""

    def __init__(self, owner, name, message, params, severity):
        self._owner = owner
        self.name = name
        self.message = message
        self.params = params
        self.severity = severity
        self._signature = inspect.Signature(
            [inspect.Parameter(param, inspect.Parameter.POSITIONAL_OR_KEYWORD) for param in params]
        )
        self.__doc__ = f"Log {message!r} at {severity.name}."

    def __call__(self, *args, **kwargs):
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self._describe()}: {exc}") from None
        values = bound.arguments
        logger = self._owner.logger
        if not logger.isEnabledFor(self.severity):
            return  # a debug condition left in a hot path costs no formatting while it is off
        text = _PLACEHOLDER.sub(lambda found: str(values[found[1]]), self.message)
        extra = {"exos_component": self._owner.component, "exos_condition": self.name, "exos_params": dict(values)}
        logger.log(self.severity, text, extra=extra, stacklevel=2)  # the record names the app's line

    def _describe(self):
        return f"{self._owner.component}.{self.name}({', '.join(self.params)})"

    def __repr__(self):
        return f"<condition {self._describe()} {self.severity.name}>"


class ExosLogger:
    """A component's system-log conditions: ``add_condition()`` each, ``register()`` once,
    then call each condition as a method of the logger.

    ``component`` names the ``logging.Logger`` the conditions log through (``logger``);
    ``title`` and ``version`` describe the component, as on a switch.
    """

    def __init__(self, component, title, version):
        if not isinstance(component, str) or not component:
            raise ValueError(f"ExosLogger: component must be a non-empty str, got {component!r}")
        if not isinstance(title, str):
            raise TypeError(f"ExosLogger({component!r}): title must be a str, got {type(title).__name__}")
        if isinstance(version, bool) or not isinstance(version, int):
            raise TypeError(f"ExosLogger({component!r}): version must be an int, got {version!r}")
        self.component = component
        self.title = title
        self.version = version
        self.logger = logging.getLogger(component)
        self.registered = False
        self._conditions = {}

    def add_condition(self, name, message, params=(), sev=Severity.INFO):
        """Declare the condition ``name``: its ``message``, with a ``%param%`` for each of
        ``params`` (a list of names) that it shows, logged at severity ``sev``."""
        if self.registered:
            raise RuntimeError(
                f"ExosLogger({self.component!r}): cannot add condition {name!r}: the logger is registered already; "
                "add every condition before register()"
            )
        self._check_condition_name(name)
        if not isinstance(message, str):
            raise TypeError(f"{self._where(name)}: message must be a str, got {type(message).__name__}")
        declared = self._checked_params(name, params)
        for found in _PLACEHOLDER.finditer(message):
            if found[1] not in declared:
                raise ValueError(
                    f"{self._where(name)}: message names %{found[1]}%, which is not one of its params "
                    f"({', '.join(declared) or 'none declared'})"
                )
        self._conditions[name] = (message, declared, self._checked_severity(name, sev))

    def register(self):
        """Make every added condition a method of this logger; call once, after the last add_condition()."""
        if self.registered:
            raise RuntimeError(f"ExosLogger({self.component!r}) is registered already; register() once")
        for name, (message, params, severity) in self._conditions.items():
            setattr(self, name, _Condition(self, name, message, params, severity))
        self.registered = True

    @property
    def conditions(self):
        """The names of the conditions added, in order."""
        return list(self._conditions)

    def __getattr__(self, name):
        # Only for names not found otherwise: a condition not registered yet, or none at all.
        conditions = self.__dict__.get("_conditions", {})
        component = self.__dict__.get("component")
        if name in conditions:
            raise AttributeError(
                f"ExosLogger({component!r}): condition {name!r} is not usable before register(); "
                "call register() after the last add_condition()",
                name=name,
                obj=self,
            )
        known = ", ".join(conditions) or "none added"
        raise AttributeError(
            f"ExosLogger({component!r}) has no condition or attribute {name!r}; its conditions: {known}",
            name=name,
            obj=self,
        )

    def __repr__(self):
        state = "registered" if self.registered else "not registered"
        return f"<ExosLogger {self.component!r} ({state}): {', '.join(self._conditions) or 'no conditions'}>"

    def _where(self, name):
        return f"ExosLogger({self.component!r}).add_condition({name!r})"

    def _check_condition_name(self, name):
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(
                f"ExosLogger({self.component!r}): condition name {name!r} must be a Python identifier: "
                "it becomes a method of the logger"
            )
        if name.startswith("_") or hasattr(type(self), name) or name in self.__dict__:
            raise ValueError(
                f"ExosLogger({self.component!r}): condition name {name!r} clashes with the logger's own "
                "attribute of that name (and names starting with '_' are the logger's); choose another"
            )
        if name in self._conditions:
            raise ValueError(f"ExosLogger({self.component!r}): condition {name!r} is added already")

    def _checked_params(self, name, params):
        if params is None:
            return ()
        if isinstance(params, str) or not isinstance(params, list | tuple):
            raise TypeError(f"{self._where(name)}: params must be a list of names, got {params!r}")
        for param in params:
            if not isinstance(param, str) or not param.isidentifier() or keyword.iskeyword(param):
                raise ValueError(
                    f"{self._where(name)}: param {param!r} must be a Python identifier: "
                    "it is the keyword the condition is called with"
                )
        duplicates = sorted({param for param in params if params.count(param) > 1})
        if duplicates:
            raise ValueError(f"{self._where(name)}: params named more than once: {', '.join(duplicates)}")
        return tuple(params)

    def _checked_severity(self, name, sev):
        if isinstance(sev, int) and not isinstance(sev, bool) and sev in _LEVELS:
            return Severity(sev)
        choices = ", ".join(f"Severity.{severity.name}" for severity in Severity)
        raise ValueError(f"{self._where(name)}: sev must be one of {choices}; got {sev!r}")
