"""Supervisor configuration: the option schema, validation and TOML loading.

Every error names where the bad value came from (file, table, key) and what is
accepted instead, so that an operator can fix the file without reading code.
"""

import difflib
import ipaddress
import logging
import math
import os
import re
import socket
import tomllib

import psutil

from cmactor.errors import ConfigError
from cmactor.wire.protocol import MAX_FRAME, NAME_RE

REQUIRED = object()


def _number(where, value):
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where}: expected a number of seconds >= 0, got {value!r}")
    if not math.isfinite(value):  # NaN passes "< 0", inf never comes: either would poison the timers
        raise ConfigError(f"{where}: expected a finite number of seconds, got {value!r}")
    return float(value)


def _positive_number(where, value):
    if _number(where, value) == 0:
        raise ConfigError(f"{where}: expected a number of seconds > 0, got {value!r}")
    return float(value)


def _count(where, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: expected a whole number >= 0, got {value!r}")
    return value


def _positive(where, value):
    if _count(where, value) == 0:
        raise ConfigError(f"{where}: expected a whole number >= 1, got 0")
    return value


def _text(where, value):
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _path(where, value):
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):  # os.fspath would raise a bare TypeError
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return _text(where, os.fspath(value))


def _dirs(where, value):
    if not isinstance(value, list | tuple) or not all(
        isinstance(directory, str | os.PathLike) and os.fspath(directory) for directory in value
    ):
        raise ConfigError(f"{where}: expected a list of directories, got {value!r}")
    return [os.fspath(directory) for directory in value]


def _uids(where, value):
    if not isinstance(value, list) or not all(isinstance(u, int) and not isinstance(u, bool) for u in value):
        raise ConfigError(f"{where}: expected a list of numeric uids, got {value!r}")
    return list(value)


def _env(where, value):
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{where}: expected a table of string names to string values, got {value!r}")
    return dict(value)


def _level(where, value):
    name = _text(where, value).upper()
    if not isinstance(logging.getLevelName(name), int):
        raise ConfigError(f"{where}: unknown log level {value!r}; use DEBUG, INFO, WARNING or ERROR")
    return name


# Bounds of the log rotation keys: a smaller file rotates every few lines, and each
# rotation renames every old file kept.
MIN_LOG_BYTES = 4096
MAX_LOG_BACKUPS = 100


def _log_bytes(where, value):
    size = _count(where, value)
    if 0 < size < MIN_LOG_BYTES:
        raise ConfigError(
            f"{where}: expected a size in bytes of at least {MIN_LOG_BYTES} (or 0: never rotate), got {value!r}"
        )
    return size


def _log_backups(where, value):
    count = _count(where, value)
    if count > MAX_LOG_BACKUPS:
        raise ConfigError(f"{where}: expected how many rotated files to keep, 0 to {MAX_LOG_BACKUPS}; got {value!r}")
    return count


_MODULE_TARGET = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_FUNC = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _entry(where, value):
    value = _text(where, value)
    target, sep, func = value.rpartition(":")
    if not sep:  # a python-module entry: the file or module runs as __main__
        target, func = value, None
    if (sep and not _FUNC.match(func)) or not (target.endswith(".py") or _MODULE_TARGET.match(target)):
        raise ConfigError(
            f"{where}: entry {value!r} is not 'package.module:function', 'path/to/file.py:function', "
            "or (run as __main__, as EXOS's python-module does) 'package.module' or 'path/to/file.py'"
        )
    return value


def _args(where, value):
    if not isinstance(value, list) or not all(isinstance(arg, str) for arg in value):
        raise ConfigError(f"{where}: expected a list of strings (the module's sys.argv[1:]), got {value!r}")
    return list(value)


RESTART_POLICIES = ("always", "on-failure", "never")


def _restart(where, value):
    if value not in RESTART_POLICIES:
        raise ConfigError(f"{where}: expected one of {', '.join(map(repr, RESTART_POLICIES))}, got {value!r}")
    return value


def _flag(where, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


_PORT = re.compile(r"[0-9]{1,5}\Z")


def parse_address(where, value):
    """``"host:port"`` (``"[::1]:port"`` for IPv6) as (host, port); port 0 is any free port."""
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not (sep and host and _PORT.match(port) and int(port) <= 65535) or (":" in host and not bracketed):
        raise ConfigError(
            f'{where}: expected "host:port", like "127.0.0.1:9464" ("[::1]:9464" for IPv6, port 0 for any '
            f"free one), got {value!r}"
        )
    return host, int(port)


def _address(where, value):
    if value is not None:
        parse_address(where, value)
    return value


# memory_max, written as systemd's MemoryMax=: bytes, K/M/G/T of 1024 (a fraction with a
# suffix: "1.5G"), a percent of the machine's memory ("50%"), or "infinity".
_SIZE = re.compile(r"(?:([0-9]+)|([0-9]+\.[0-9]+)(?=[KMGT]))([KMGT]?)\Z")
_PERCENT = re.compile(r"([0-9]+(?:\.[0-9]+)?)%\Z")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_MEMORY_MAX_MAX = 2**63 - 1  # what cgroup's memory.max and the kernel take
# Below this no worker can run (a Python interpreter alone takes ~10 MiB): a smaller limit
# is most likely a bare number meant as MiB, which systemd too would take as bytes.
MIN_MEMORY_MAX = 1024**2


def _memory(where, value):
    """None (not set), "infinity" (no limit), or a size in bytes."""
    if value is None or value == "infinity":
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    percent = _PERCENT.match(value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        size = value
    elif match:
        size = int(float(match[1] or match[2]) * _UNITS[match[3]])
    elif percent and float(percent[1]) <= 100:
        size = int(psutil.virtual_memory().total * float(percent[1]) / 100)
    else:
        raise ConfigError(
            f"{where}: expected a size as systemd's MemoryMax= takes it: a number of bytes, a string of digits "
            f'with a K, M, G or T suffix (base 1024: "256M", "1.5G"), a percent of the machine\'s memory up to '
            f'100 ("50%"), or "infinity" (no limit); got {value!r}'
        )
    if size > _MEMORY_MAX_MAX:
        raise ConfigError(f'{where}: {value!r} is more than any machine has; give a size, or "infinity" for no limit')
    if size < MIN_MEMORY_MAX:
        bare = size and (isinstance(value, int) or (match is not None and not match[3]))  # no suffix: perhaps MiB
        hint = f' (a bare number is bytes, as in systemd: "{size}M" is {size} MiB)' if bare else ""
        raise ConfigError(f"{where}: {value!r} is {size} bytes, less than any worker needs; expected at least 1M{hint}")
    return size


def memory_limit(own, default):
    """A module's memory_max in bytes, or None (no limit): its own (an agent's memory_max),
    else ``default`` (the [supervisor] one); "infinity" is no limit, whichever says it."""
    limit = default if own is None else own
    return None if limit == "infinity" else limit


MEMORY_ENFORCEMENTS = ("auto", "cgroup", "rss")


def _enforcement(where, value):
    if value not in MEMORY_ENFORCEMENTS:
        raise ConfigError(f"{where}: expected one of {', '.join(map(repr, MEMORY_ENFORCEMENTS))}, got {value!r}")
    return value


# key -> (validator, default)
SUPERVISOR_OPTIONS = {
    "state_dir": (_path, ".cmactor"),
    "socket": (_path, None),
    "hold_timeout": (_number, 10.0),
    "start_timeout": (_number, 30.0),
    "stop_timeout": (_number, 10.0),
    "allowed_uids": (_uids, []),
    "log_level": (_level, "INFO"),
    # Rotation of each module's log (state_dir/logs) and of the audit log (logs.py).
    "log_max_bytes": (_log_bytes, 10 * 1024 * 1024),
    "log_backups": (_log_backups, 5),
    "max_frame": (_positive, MAX_FRAME),
    # What one client, or all of them, can make the supervisor hold (front/server.py).
    "max_client_requests": (_positive, 256),
    "max_client_backlog": (_positive, 64 * 1024 * 1024),
    "max_backlog_total": (_positive, 512 * 1024 * 1024),
    "frame_timeout": (_positive_number, 10.0),
    # Unfinished frames of all clients held by the supervisor, and by each worker for its
    # direct clients; past it the client holding the most is dropped.
    "max_frames_total": (_positive, 16 * 1024 * 1024),
    # A worker's unsent replies to all its direct clients; past it the client with the
    # most is dropped (its reads then go through the supervisor).
    "max_direct_backlog_total": (_positive, 16 * 1024 * 1024),
    # A direct connection with nothing in flight for this long is closed (the client
    # connects again at its next read).
    "direct_idle_timeout": (_positive_number, 60.0),
    # Where /metrics is served (metrics.py, the cmactor[metrics] extra); None: nothing is bound.
    "metrics": (_address, None),
    # get, getone and getnext from clients go straight to the module's worker, on a
    # socket of its own (cmactor/worker/direct.py); false: every request goes through here.
    "direct_reads": (_flag, True),
    # Each module's memory_max, for the agents that do not set one (None: no limit).
    "memory_max": (_memory, None),
    # How memory_max is enforced (supervision/memory.py): "cgroup", a cgroup v2 memory.max per
    # worker (refused at start where cgroups cannot be made); "rss", a watchdog of the workers'
    # RSS; "auto", cgroups where they can be made, else the watchdog.
    "memory_enforcement": (_enforcement, "auto"),
}

AGENT_OPTIONS = {
    "entry": (_entry, REQUIRED),
    "args": (_args, []),
    # When a worker's exit is restarted, in systemd's words: "on-failure" leaves a
    # clean exit (code 0) STOPPED, "never" restarts nothing.
    "restart": (_restart, "always"),
    # `import exos.api...` in the worker resolves to cmactor.exos (cmactor/exos/__init__.py).
    "exos_compat": (_flag, True),
    # Directories supplying EXOS names cmactor does not (D/exos/api/vlan.py), searched
    # before the [exos] path ones; unused with exos_compat = false.
    "exos_path": (_dirs, []),
    "pool_size": (_positive, 8),
    "env": (_env, {}),
    "max_restarts": (_count, 5),
    "restart_window": (_number, 60.0),
    "restart_delay": (_number, 0.05),
    "restart_delay_max": (_number, 5.0),
    "stable_after": (_number, 10.0),
    "load_timeout": (_number, 30.0),
    "action_timeout": (_number, 30.0),
    "hang_timeout": (_number, 60.0),
    "heartbeat_timeout": (_number, 30.0),
    "journal_max_records": (_count, 10_000),
    "journal_max_bytes": (_count, 16 * 1024 * 1024),
    # The most memory its worker (and the processes it starts) may use, as systemd's
    # MemoryMax=; past it the worker is killed and restarted. None: [supervisor] memory_max.
    "memory_max": (_memory, None),
}


# The [exos] table: directories supplying EXOS names to every agent (cmactor/exos/__init__.py).
EXOS_OPTIONS = {
    "path": (_dirs, []),
}


def _endpoints(where, value):
    if not isinstance(value, list) or not value:
        raise ConfigError(f'{where}: expected a list of etcd client endpoints, like ["10.0.0.1:2379"], got {value!r}')
    for endpoint in value:
        parse_address(where, endpoint.removeprefix("http://") if isinstance(endpoint, str) else endpoint)
    return list(value)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def _name(where, value):
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            f"{where}: expected a name of letters, digits, '.', '_' and '-' (at most 64, a letter or digit first), "
            f"got {value!r}"
        )
    return value


def _lease_ttl(where, value):
    if type(value) is not int or value < 1:
        raise ConfigError(f"{where}: expected whole seconds, at least 1 (etcd leases count in seconds), got {value!r}")
    return value


def _txn_ops(where, value):
    if type(value) is not int or value < 8:
        raise ConfigError(f"{where}: expected an integer of at least 8 (etcd's --max-txn-ops), got {value!r}")
    return value


def _request_bytes(where, value):
    if type(value) is not int or value < 64 * 1024:
        raise ConfigError(
            f"{where}: expected bytes, at least 65536 (etcd's --max-request-bytes, 1572864 by default), got {value!r}"
        )
    return value


# The [ha] table: this supervisor is a node of a cluster kept in etcd (cmsupervisor/ha).
HA_OPTIONS = {
    "etcd": (_endpoints, REQUIRED),  # the etcd cluster's client endpoints, "host:port"
    "cluster": (_name, REQUIRED),  # the key prefix the cluster's nodes share
    "node": (_name, None),  # this node's name, unique in the cluster; None: the host's name
    "lease_ttl": (_lease_ttl, 2),  # seconds a dead active holds the lead before a standby takes over
    "etcd_timeout": (_positive_number, 2.0),  # seconds an etcd request may take, every endpoint tried
    "max_txn_ops": (_txn_ops, 128),  # etcd's --max-txn-ops
    "max_request_bytes": (_request_bytes, 1572864),  # etcd's --max-request-bytes
    # A module FAILED on the active (its crash loop quarantined it) hands the lead over to an
    # in-sync standby, once the active has led handover_hold seconds: no ping-pong faster.
    "handover_on_failed": (_flag, True),
    "handover_hold": (_number, 300.0),
}


def ha_options(where, raw, problems=None):
    """The [ha] table ``raw``, checked, the node named (the host's name by default)."""
    options = validate(where, raw, HA_OPTIONS, problems, ("ha",))
    if options.get("node") is None:
        options["node"] = _name(f"{where}.node (the host's name)", socket.gethostname().partition(".")[0])
    return options


def _size(where, value):
    if _count(where, value) < 1024:
        raise ConfigError(f"{where}: expected a size in bytes, at least 1024, got {value!r}")
    return value


# The [restconf] table: an RFC 8040 server, a client of this supervisor (cmsupervisor/restconf).
RESTCONF_OPTIONS = {
    "listen": (_address, REQUIRED),  # "host:port" it serves HTTP(S) on
    "users": (_path, None),  # an htpasswd file of bcrypt hashes: who may log in (HTTP Basic)
    "tls": (_flag, True),  # HTTPS; false (plain HTTP) only on a loopback address
    "cert": (_path, None),  # the server's certificate (PEM); None: a self-signed one in state_dir
    "key": (_path, None),  # its private key (PEM)
    "user": (_name, "restconf"),  # the user requests are made as when no users file says who
    # HTTP connections served at once; past it a newcomer replaces one waiting for a request
    # (never answered ones first), and is answered 503 only when every one is in a request.
    "max_connections": (_positive, 64),
    "max_body": (_size, 1024 * 1024),  # bytes of a request body; more: 413, unread
    "idle_timeout": (_positive_number, 30.0),  # seconds a connection may wait between requests
    "request_timeout": (_positive_number, 10.0),  # seconds to send a request's headers, and its body
    # Under `cmactor run`, the server is a process the supervisor restarts (supervision/sidecar.py):
    # after an exit it waits restart_delay, doubling up to restart_delay_max (back to restart_delay
    # once a server has served stable_after seconds); start_retries starts in a row that end
    # before it serves (a port taken, a bad certificate) and it is left FAILED.
    "restart_delay": (_positive_number, 0.1),
    "restart_delay_max": (_positive_number, 5.0),
    "stable_after": (_number, 10.0),
    "start_retries": (_count, 5),
}

_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host):
    """Whether ``host`` (an address or a name) is this machine's loopback, and only that."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def restconf_table(where, raw, base_dir, problems=None):
    """The [restconf] table ``raw``, checked: paths made absolute (from ``base_dir``), plain
    HTTP only on a loopback address, cert and key given together."""
    options = validate(where, raw, RESTCONF_OPTIONS, problems, ("restconf",))
    for key in ("users", "cert", "key"):
        if options.get(key) is not None:
            options[key] = os.path.abspath(os.path.join(base_dir, os.path.expanduser(options[key])))
    errors = []
    if not options["tls"] and options.get("listen") is not None:
        host, _ = parse_address(f"{where}.listen", options["listen"])
        if not is_loopback(host):
            errors.append(
                (
                    "tls",
                    f"{where}.tls: false (plain HTTP) is allowed only on a loopback address, and listen is "
                    f"{options['listen']!r}: passwords and config would cross the network in clear; listen on "
                    "127.0.0.1 or [::1], or set tls = true",
                )
            )
    if (options["cert"] is None) != (options["key"] is None):
        given, missing = ("cert", "key") if options["key"] is None else ("key", "cert")
        errors.append(
            (
                given,
                f"{where}.{given}: given without {missing}: give both (PEM files), or neither for a self-signed one",
            )
        )
    for key, text in errors:
        if problems is None:
            raise ConfigError(text)
        problems.note(ConfigError(text), ("restconf",), key)
    return options


def restconf_options(path):
    """The [restconf] options of the cmactor.toml at ``path`` (None: it has no [restconf]),
    with "state_dir" added: that table checked, and nothing else but what socket_options
    checks. A file being edited for a reload may hold errors elsewhere: they must not keep
    a RESTCONF server that crashed from starting again (load_toml checks the whole file)."""
    base_dir, state_dir, _ = socket_options(path)
    with open(os.path.abspath(path), "rb") as f:
        raw = tomllib.load(f).get("restconf")
    if raw is None:
        return None
    found = restconf_table(f"{os.path.abspath(path)}: [restconf]", raw, base_dir)
    found["state_dir"] = os.path.join(base_dir, state_dir)
    return found


class Problems:
    """Every error found in one config file, each told with its line where the file shows it.

    The checks raise ConfigError at the first thing wrong; given a Problems, the loaders
    note each error here and go on, so that one run names every mistake of a file.
    """

    def __init__(self, path, text=""):
        self.path = path
        self.found = []  # each error's text
        self._at = []  # each error's line (0: none to show), for telling them in file order
        self._lines = _key_lines(text)

    def note(self, exc, table=(), key=None):
        """Keep ``exc`` (a ConfigError), found at ``key`` of the table ``table`` (a tuple of names)."""
        line = self._lines.get((table, key)) or self._lines.get((table, None))
        if line is None and table:  # an agent given inline: `vlan = "vlan.py:main"` under [agents]
            line = self._lines.get((table[:-1], table[-1]))
        text = str(exc)
        prefix = f"{self.path}: "
        if line is not None and text.startswith(prefix):
            text = f"{self.path}:{line}: {text[len(prefix) :]}"
        self.found.append(text)
        self._at.append(line or 0)

    def check(self):
        """Raise one ConfigError naming every problem noted (its ``problems`` lists them), if any."""
        if not self.found:
            return
        in_order = tuple(text for _, text in sorted(zip(self._at, self.found), key=lambda pair: pair[0]))
        count = f"{len(in_order)} errors" if len(in_order) > 1 else "1 error"
        error = ConfigError(f"{self.path}: {count}:\n" + "\n".join(f"  {text}" for text in in_order))
        error.problems = in_order
        raise error


# A table header ([agents.vlan], [ "agents" . "x" ]) and a `key = value` line of a TOML file.
_HEADER = re.compile(r"\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_KEY = re.compile(r"\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)\s*=")


def _key_lines(text):
    """(table, key) -> the line number it is on, and (table, None) -> its header's, for the
    plain lines of a TOML file (a key inside an inline table or array is not found)."""
    lines = {}
    table = ()
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            table = tuple(part.strip().strip("\"'") for part in header[1].split("."))
            for depth in range(1, len(table) + 1):  # [agents.vlan] is where [agents] is first seen too
                lines.setdefault((table[:depth], None), number)
            continue
        key = _KEY.match(line)
        if key:
            lines.setdefault((table, key[1].strip("\"'")), number)
    return lines


def validate(where, raw, schema, problems=None, table=()):
    """Check ``raw`` against ``schema``; return a full dict with defaults filled in. With
    ``problems`` (a Problems), note each bad key there and go on (it keeps its default)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table of options, got {raw!r}")
    out = {}
    for key, value in raw.items():
        try:
            if key not in schema:
                close = difflib.get_close_matches(key, schema, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(f"{where}: unknown key {key!r}; {hint}known keys: {', '.join(schema)}")
            out[key] = schema[key][0](f"{where}.{key}", value)
        except ConfigError as exc:
            if problems is None:
                raise
            problems.note(exc, table, key)
    for key, (_, default) in schema.items():
        if key not in out:
            if default is REQUIRED:
                error = ConfigError(f"{where}: missing required key {key!r}")
                if problems is None:
                    raise error
                problems.note(error, table)
                continue
            out[key] = default.copy() if isinstance(default, list | dict) else default
    return out


def supervisor_options(where, raw, problems=None):
    """The [supervisor] options ``raw``, checked (validate) and against each other."""
    options = validate(where, raw, SUPERVISOR_OPTIONS, problems, ("supervisor",))
    if options["max_frames_total"] < options["max_frame"]:
        error = ConfigError(
            f"{where}.max_frames_total: {options['max_frames_total']} is less than max_frame "
            f"({options['max_frame']}), so a frame of max_frame bytes could never arrive; make it at least max_frame"
        )
        if problems is None:
            raise error
        problems.note(error, ("supervisor",), "max_frames_total")
    return options


def resolve_entry(entry, base_dir, where):
    """Make a file entry absolute (relative to ``base_dir``) and check the file exists."""
    target, sep, func = entry.rpartition(":")
    if not sep:
        target, func = entry, ""
    if not target.endswith(".py"):
        return entry
    path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(target)))
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: entry file {path} does not exist")
    return f"{path}{sep}{func}"


def resolve_dirs(where, dirs, base_dir):
    """Make each directory absolute (relative to ``base_dir``), check it exists, drop repeats."""
    resolved = []
    for directory in dirs:
        path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(directory)))
        if not os.path.isdir(path):
            raise ConfigError(f"{where}: directory {path} does not exist (a relative path is taken from {base_dir})")
        if path not in resolved:
            resolved.append(path)
    return resolved


def exos_dirs(where, value, base_dir):
    """``value``, a list of directories supplying EXOS names, checked and made absolute."""
    return resolve_dirs(where, _dirs(where, value), base_dir)


def agents_config(agents, base_dir, where="agents", exos_path=(), problems=None):
    """Validate the agents mapping: name -> entry string or table of options. ``exos_path``
    (absolute directories) follows each agent's own exos_path. With ``problems``, every
    agent is checked and each error noted there (a bad agent is left out)."""
    if not isinstance(agents, dict) or not agents:
        raise ConfigError(f"{where}: expected at least one agent, as a table of name = entry or options")
    out = {}
    for name, raw in agents.items():
        table = ("agents", name)
        try:
            opts = _agent(name, raw, base_dir, f"{where}.{name}", exos_path, problems, table)
        except ConfigError as exc:
            if problems is None:
                raise
            problems.note(exc, table, "entry" if isinstance(raw, dict) else None)
            continue
        if opts is not None:
            out[name] = opts
    return out


def _agent(name, raw, base_dir, here, exos_path, problems, table):
    """One agent's options, checked and resolved; None when ``problems`` noted what is wrong."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(
            f"{here}: module name {name!r} must start with a letter and hold only letters, digits and '_'"
        )
    if isinstance(raw, str):
        raw = {"entry": raw}
    found = len(problems.found) if problems is not None else 0
    opts = validate(here, raw, AGENT_OPTIONS, problems, table)
    for key, resolve in (
        ("entry", lambda: resolve_entry(opts["entry"], base_dir, f"{here}.entry")),
        ("exos_path", lambda: resolve_dirs(f"{here}.exos_path", opts["exos_path"], base_dir)),
    ):
        if key not in opts:
            continue  # missing, and noted as such
        try:
            opts[key] = resolve()
        except ConfigError as exc:
            if problems is None:
                raise
            problems.note(exc, table, key)
    if problems is not None and len(problems.found) > found:
        return None
    opts["exos_path"] += [path for path in exos_path if path not in opts["exos_path"]]
    return opts


def socket_options(path):
    """(base dir, state_dir, socket) of the cmactor.toml at ``path``: the two [supervisor] keys
    a client reads to find the supervisor, checked, and nothing else. A file being edited
    for a reload may hold errors elsewhere; they are the reload's to name, and must not
    keep a client from reaching the supervisor that runs."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    table = data.get("supervisor", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [supervisor]: expected a table of options, got {table!r}")
    found = {}
    for key in ("state_dir", "socket"):
        check, default = SUPERVISOR_OPTIONS[key]
        found[key] = check(f"{path}: [supervisor].{key}", table[key]) if key in table else default
    return os.path.dirname(path), found["state_dir"], found["socket"]


def load_toml(path):
    """Read a cmactor.toml: returns (supervisor options, agents options, base dir, the [ha]
    options or None). The [exos] path directories are in each agent's exos_path, after its own."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        data = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    # Every table is checked, and every error named at once (Problems): a file with four
    # mistakes takes one run to fix, not four.
    problems = Problems(path, text)
    tables = ["supervisor", "exos", "agents", "ha", "restconf"]
    for extra in sorted(set(data) - set(tables)):
        close = difflib.get_close_matches(extra, tables, n=1)
        hint = f"did you mean [{close[0]}]? " if close else ""
        error = ConfigError(
            f"{path}: unknown table [{extra}]; {hint}expected [supervisor], [exos], [ha], [restconf] and [agents.NAME]"
        )
        problems.note(error, (extra,))
    base_dir = os.path.dirname(path)
    options = _table(
        problems,
        ("supervisor",),
        lambda: supervisor_options(f"{path}: [supervisor]", data.get("supervisor", {}), problems),
    )
    exos = _table(
        problems,
        ("exos",),
        lambda: validate(f"{path}: [exos]", data.get("exos", {}), EXOS_OPTIONS, problems, ("exos",)),
    )
    exos_path = ()
    if exos is not None:
        exos_path = (
            _table(problems, ("exos",), lambda: resolve_dirs(f"{path}: [exos].path", exos["path"], base_dir)) or ()
        )
    agents = _table(
        problems,
        ("agents",),
        lambda: agents_config(data.get("agents"), base_dir, f"{path}: [agents]", exos_path, problems),
    )
    ha = None
    if "ha" in data:
        ha = _table(problems, ("ha",), lambda: ha_options(f"{path}: [ha]", data["ha"], problems))
    if "restconf" in data:
        _table(
            problems, ("restconf",), lambda: restconf_table(f"{path}: [restconf]", data["restconf"], base_dir, problems)
        )
    problems.check()
    return options, agents, base_dir, ha


def _table(problems, table, check):
    """``check()``, or None with its ConfigError noted in ``problems`` (the rest of the file is still checked)."""
    try:
        return check()
    except ConfigError as exc:
        problems.note(exc, table)
        return None
