"""The ``cmactor`` command: run a supervisor, or talk to a running one.

Client commands find the supervisor's socket from, in order: ``--socket``,
``--config`` (its state_dir, or the pointer a ``run --state-dir`` leaves beside it),
``$CMACTOR_SOCKET``, ``./cmactor.toml``, and the default ``.cmactor/run/cm.sock``.
Each command takes the options it honours, before or after its name (OPTIONS).
Output is a table, or JSON with ``--format json``. Errors print one line on stderr,
``cmactor: <class in cmactor.errors>: <message>``, and exit with status 1; the exit
statuses are EXIT_* below (``status``, as ``supervisorctl status`` and LSB's status
actions: 3 when a module is not READY, 4 for a module the supervisor does not run).
What comes from data (values, notes, notify_cli text, error messages) is escaped
where it goes to a terminal (terminal.py). ``--socket`` given more than once (or
``$CMACTOR_SOCKET`` holding paths separated by ``os.pathsep``) names the supervisors
of a hot-standby cluster: commands talk to the active, and ``ha`` shows each one's
role. ``getnext --max-rows N`` shows a page;
when the table goes on, a line on stderr gives the next page's command. ``logs``
shows a module's log (tail.py); ``export`` and ``apply`` write and replay config as
commands (commands.py).
"""

import argparse
import getpass
import importlib.util
import itertools
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import stat
import sys
import textwrap
import threading
import time

import cmactor
from cmactor import cmfrontend
from cmactor.errors import ConfigError, DataError, Error, OperationalError, ProgrammingError, StartupError
from cmactor.wire.protocol import DATA_OPS
from cmsupervisor.cli import commands, status, tail, terminal
from cmsupervisor.config import load_toml, restconf_options, socket_options
from cmsupervisor.front.server import default_socket_path, socket_pointer
from cmsupervisor.ha.node import Node
from cmsupervisor.ha.replica import SINGLE_HA
from cmsupervisor.observability import SUPERVISOR_LOG, notify
from cmsupervisor.persistence import journal, store
from cmsupervisor.persistence.store import StoreError
from cmsupervisor.supervision import fds

# Exit statuses. 1: an error, reported in one line (cmactor.errors' classes, and
# ConfigError or StartupError for `run`); 2: a usage error (argparse's); `status` alone:
# 3 when a module shown is not READY, 4 when a module named is not one the supervisor
# runs (LSB's "program is not running" and "unknown", as supervisorctl and systemctl
# say them); 70 (sysexits' EX_SOFTWARE): an exception the CLI does not expect, a bug
# or an environment it cannot work in; 130: Ctrl-C.
EXIT_ERROR = 1
EXIT_NOT_READY = 3
EXIT_NO_SUCH_MODULE = 4
INTERNAL_ERROR = 70


def config_file(args):
    """The cmactor.toml a command names (-c), else ./cmactor.toml unless --socket or
    $CMACTOR_SOCKET says where the supervisor is; None when there is none."""
    if args.config is not None:
        return args.config
    if not args.socket and not os.environ.get("CMACTOR_SOCKET") and os.path.exists("cmactor.toml"):
        return "cmactor.toml"
    return None


def resolve_socket(args):
    """The supervisor's socket path, or the paths of a hot-standby cluster's (a list)."""
    if args.socket:
        return args.socket[0] if len(args.socket) == 1 else list(args.socket)
    config = config_file(args)
    if config is None:
        return cmfrontend.default_socket()
    # A run of this config says where it listens, beside it: that wins while its socket is
    # there, since the file may have been edited since (for a reload, its state_dir too).
    running = _read_run_pointer(config)
    if running is not None and os.path.exists(running):
        return running
    base_dir, state_dir, socket = socket_options(config)
    if socket:
        return os.path.join(base_dir, socket)
    state_dir = os.path.join(base_dir, state_dir)
    try:  # the path it bound, which differs from the default when that is too long
        with open(socket_pointer(state_dir)) as f:
            return f.read().strip()
    except OSError:
        pass
    return default_socket_path(state_dir)


def run_pointer(config):
    """Where `cmactor run CONFIG` records the socket it listens on, beside CONFIG: `-c CONFIG`
    follows it first, since neither a --state-dir nor a state_dir edited since the run
    began can be read from the file."""
    directory, name = os.path.split(os.path.abspath(config))
    return os.path.join(directory, f".{name}.socket")


def _read_run_pointer(config):
    """The socket path in ``config``'s run_pointer, None if there is none or it cannot be read.

    Believed only if no one else may write it and it is the user's, root's or the
    config file's owner's: a config beside which others may create files (a shared
    directory) must not let them send this user's requests, and the values in them, to
    a socket of theirs."""
    pointer = run_pointer(config)
    try:
        with open(pointer, opener=store.no_follow) as f:
            st = os.fstat(f.fileno())
            path = f.read().strip()
        trusted = (os.getuid(), 0, os.stat(config).st_uid)
    except OSError:
        return None
    if st.st_uid not in trusted or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OperationalError(
            f"{pointer} names the socket of a supervisor run with --state-dir, but it is not to be "
            "trusted: another user's, or others may write it; remove it, or name the socket with --socket"
        )
    return path


def parse_params(pairs, none=False):
    """``key=value`` words as params. With ``none`` (a getnext), ``key=None`` is a None
    param, cmfrontend's index column with no start value; elsewhere it is the text "None"."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ProgrammingError(f"parameter {pair!r} is not key=value")
        if key in params:  # as apply refuses it (commands.py): which value would be meant?
            raise ProgrammingError(f"key {key!r} is given twice")
        params[key] = None if none and value == "None" else value
    return params


# -- output ---------------------------------------------------------------


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def print_table(headers, rows, out=None):
    out = sys.stdout if out is None else out
    rows = [[_cell(v) for v in row] for row in rows]
    if out.isatty():
        headers = [terminal.escaped(h) for h in headers]
        rows = [[terminal.escaped(c) for c in row] for row in rows]
        try:
            from rich.console import Console
            from rich.table import Table
            from rich.text import Text
        except ImportError:
            pass
        else:
            # Text, not str: rich would read "[red]" in a value as markup (and "[/x]" as an error).
            # Folded, not ellipsized, where the terminal is too narrow: a cell wraps at its
            # spaces, a word longer than its column goes on over lines, nothing is cut.
            table = Table()
            for header in headers:
                table.add_column(Text(header), overflow="fold")
            for row in rows:
                table.add_row(*map(Text, row))
            Console(file=out).print(table)
            return
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    if out.isatty():
        widths = _narrowed(headers, widths, shutil.get_terminal_size().columns)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), file=out)
    for row in rows:
        # A cell wider than its column is wrapped within it (a word longer than the column
        # goes on over lines): the row takes more lines, nothing is cut.
        pieces = [[c] if len(c) <= w else textwrap.wrap(c, w, break_on_hyphens=False) for c, w in zip(row, widths)]
        for line in itertools.zip_longest(*pieces, fillvalue=""):
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip(), file=out)


# A column a terminal table narrows keeps at least this many characters, or its header's.
MIN_COLUMN = 10


def _narrowed(headers, widths, room):
    """Column ``widths`` (two spaces apart) narrowed to fit ``room`` characters: the widest
    capped at one width, as wide as fits, none below MIN_COLUMN or its header (so they
    stay wider than ``room`` if they must)."""
    floors = [min(w, max(len(h), MIN_COLUMN)) for h, w in zip(headers, widths)]

    def capped(cap):
        return [max(floor, min(w, cap)) for w, floor in zip(widths, floors)]

    def fits(columns):
        return sum(columns) + 2 * (len(columns) - 1) <= room

    low, high = 0, max(widths)  # the widest cap that fits, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        if fits(capped(middle)):
            low = middle
        else:
            high = middle - 1
    return capped(low)


# -- commands -------------------------------------------------------------


def cmd_run(args):
    # The whole process is the supervisor's: every descriptor the hard limit allows is
    # room for modules and clients (it waits with epoll, never select()).
    fds.raise_soft_limit()
    overrides = {}
    if args.state_dir:
        overrides["state_dir"] = os.path.abspath(args.state_dir)
    if args.log_level:
        overrides["log_level"] = args.log_level
    if load_toml(args.config_file)[3] is None:
        sup = cmactor.Supervisor.from_toml(
            args.config_file, ignore_config=args.ignore_config, recover=not args.saved_only, **overrides
        )
    else:  # a node of a cluster: active or hot standby (cmsupervisor/ha)
        sup = Node.from_toml(
            args.config_file, ignore_config=args.ignore_config, recover=not args.saved_only, **overrides
        )
    logging.basicConfig(
        level=sup.options["log_level"], format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )
    sup.notifier = notify.from_environment()  # under systemd (Type=notify): READY=1, STATUS=, watchdog pings

    # The handler only records the signal and writes to a pipe: raising from it could
    # land inside a logging call, which would swallow the exception and never stop.
    wake_r, wake_w = os.pipe()
    received = []

    def on_signal(signum, frame):
        received.append(signal.Signals(signum).name)
        os.write(wake_w, b"s")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    pointer = None
    try:
        sup.start(strict=args.strict)
        pointer = _leave_run_pointer(args.config_file, sup.socket_path, warn=bool(args.state_dir))
        ready = sum(1 for entry in sup.status().values() if entry["state"] == "READY")
        print(f"cmactor: {ready} of {len(sup.modules)} modules READY; socket {sup.socket_path}", file=sys.stderr)
        print(f"cmactor: clients: export CMACTOR_SOCKET={sup.socket_path}   (Ctrl-C stops)", file=sys.stderr)
        if sup.metrics_url is not None:
            print(f"cmactor: Prometheus metrics at {sup.metrics_url}", file=sys.stderr)
        _say_restconf(sup)
        # A client's `cmactor stop` ends the supervisor on its own: wake up then too.
        threading.Thread(target=lambda: (sup.wait(), os.write(wake_w, b"d")), daemon=True).start()
        os.read(wake_r, 1)
        if received:
            print(f"cmactor: {received[0]}: stopping", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C kills at once
        sup.stop()
        if pointer is not None:
            _remove_run_pointer(pointer, sup.socket_path)
    print("cmactor: stopped", file=sys.stderr)
    return 0


# Seconds `cmactor run` waits for its RESTCONF server's first start to serve (or end) before
# it says where it listens; the server goes on starting after that, if it must.
RESTCONF_WAIT = 15.0


def _say_restconf(sup):
    """Say on stderr where the RESTCONF server run beside the modules listens, and its TLS
    certificate's fingerprint (the operator checks a client's first connection against it),
    once its first start has served or ended."""
    deadline = time.monotonic() + RESTCONF_WAIT
    while True:
        found = sup.restconf_status()
        if found is None:
            return
        if found["state"] != "STARTING" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if found["state"] == "RUNNING":
        print(f"cmactor: RESTCONF at {found['url']}/restconf, pid {found['pid']}", file=sys.stderr)
        if found.get("fingerprint"):
            print(f"cmactor: RESTCONF TLS certificate SHA-256 fingerprint {found['fingerprint']}", file=sys.stderr)
    else:
        why = found["error"] or (f"last exit: {found['last_exit']}" if found["last_exit"] else "still starting")
        terminal.say(
            f"cmactor: warning: RESTCONF is not serving yet ({found['state']}: {why}); `cmactor status` follows it, "
            "the supervisor's log has its output"
        )


def _leave_run_pointer(config, socket_path, warn):
    """Record ``socket_path`` in ``config``'s run_pointer, owner-only as the state_dir's
    own pointer is; its path, or None if it cannot be written (said on stderr when
    ``warn``: with --state-dir, nothing else tells `-c CONFIG` where this supervisor is)."""
    pointer = run_pointer(config)
    try:
        with os.fdopen(store.owner_only(pointer, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as f:
            f.write(socket_path)
    except OSError as exc:
        if warn:
            terminal.say(
                f"cmactor: warning: cannot write {pointer} ({exc.strerror}), so `cmactor -c {config}` will not "
                f"find this supervisor: give its clients --socket {socket_path}"
            )
        return None
    return pointer


def _remove_run_pointer(pointer, socket_path):
    """Remove ``pointer`` unless a later run of the same config has made it its own."""
    try:
        with open(pointer, opener=store.no_follow) as f:
            if f.read() == socket_path:
                os.unlink(pointer)
    except OSError:
        pass  # removed by hand, or never readable: nothing of ours to remove


def _connect(args, print_callback=None):
    return cmactor.connect(username=args.user, print_callback=print_callback, socket=resolve_socket(args))


def cmd_data(args):
    params = parse_params(args.params, none=args.command == "getnext")
    index = walk_index(args, params)
    with _connect(args, terminal.say) as conn:
        cur = conn.cursor(vr_name=args.vr)
        if args.command == "getnext":
            cur.index = index
            if args.max_rows is not None:
                cur.limit = cur.max_rows = args.max_rows  # a page: no "stopped at max_rows" error at its end
        cur.execute(f"{args.command} {args.target}", params)
        rows = [dict(row.field_values) for row in cur.iterrow()]
        more = cur.more
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif rows:
        headers = list(dict.fromkeys(name for row in rows for name in row))
        print_table(headers, [[row.get(h) for h in headers] for row in rows])
    elif args.command in ("set", "setop"):
        print("ok")
    else:
        print("(no rows)")
    if more:
        # On stderr, so that stdout stays the rows (valid JSON with --format json).
        sys.stdout.flush()
        terminal.say(next_page_hint(args, params, index, rows[-1], len(rows)))
    return 0


def walk_index(args, params):
    """A getnext's index columns as the command line names them (--index, else every
    param when one is key=None, as cmfrontend reads params), or None: the agent's."""
    if args.command != "getnext":
        return None
    return args.index if args.index is not None else cmfrontend.open_index(params)


def next_page_hint(args, params, index, last, shown):
    """The line after a getnext page that goes on: the command for the next page."""
    if index is not None:
        # The last row's index values start the next page; a column it lacks keeps
        # the param given, and the other params ride along as they did.
        start = dict(params)
        start.update({column: last[column] for column in index if last.get(column) is not None})
        how = f"after the last row's {', '.join(index)} (the walk's index columns)"
        options = ["--index", ",".join(index)]
    else:
        # Nothing names the index: give what the walk itself sends next, the params
        # with every field of the last row laid over them.
        start = {**params, **{key: value for key, value in last.items() if value is not None}}
        how = "after the last row, all its fields as params (name the index with --index or key=None to shorten it)"
        options = []
    words = ["cmactor"]
    if args.socket:
        for path in args.socket:
            words += ["--socket", path]
    elif args.config:
        words += ["-c", args.config]
    words += ["getnext", args.target]
    words += [f"{key}={'None' if value is None else value}" for key, value in start.items()]
    words += options
    if args.vr is not None:
        words += ["--vr", args.vr]
    words += ["--max-rows", str(args.max_rows)]
    if args.format != "table":
        words += ["--format", args.format]
    return f"cmactor: {shown} rows shown, the table goes on; next page, {how}: {shlex.join(words)}"


def cmd_status(args):
    if args.histograms and args.format != "json":
        args.parser.error("--histograms goes with --format json: the table shows no histograms")
    with _connect(args) as conn:
        reply = conn.request({"op": "status"})
    modules = reply["status"]
    unknown = [name for name in args.modules if name not in modules]
    if unknown:
        names = ", ".join(map(repr, unknown))
        what = f"unknown module {names}" if len(unknown) == 1 else f"unknown modules {names}"
        report(ProgrammingError(f"{what}; the supervisor runs: {', '.join(sorted(modules))}"))
        return EXIT_NO_SUCH_MODULE
    if args.modules:
        modules = {name: modules[name] for name in args.modules}
    audit = reply.get("supervisor", {})
    if args.format == "json":
        print(status.as_json(modules, args.histograms))
    else:
        ha = audit.get("ha", SINGLE_HA)
        if ha["role"] != "single":  # a node of a cluster: which one, and whether it may take writes
            print(status.ha_line(ha))
        status.show(modules, sys.stdout)
        if audit.get("restconf") is not None and not args.modules:
            print(terminal.escaped(status.restconf_line(audit["restconf"])))
    if audit.get("audit_failures"):  # on stderr in both formats: --format json keeps its shape
        terminal.say(
            f"cmactor: warning: {audit['audit_failures']} audit log lines could not be written "
            f"(last: {audit['audit_error']})"
        )
    if audit.get("log_failures"):
        terminal.say(
            f"cmactor: warning: {audit['log_failures']} module log lines could not be written "
            f"(last: {audit['log_error']})"
        )
    return 0 if all(entry["state"] == "READY" for entry in modules.values()) else EXIT_NOT_READY


# -- a hot-standby cluster's roles ---------------------------------------------

HA_COLUMNS = ("socket", "node", "role", "active", "in_sync", "revision", "note")
HA_TIMEOUT = 5.0  # seconds each supervisor has to answer `cmactor ha`


def _ask_ha(args, path):
    """The ``ha`` object of the supervisor at ``path``, and a note (None, or what it is
    for a supervisor without hot standby); Error when it cannot be asked."""
    try:
        with cmactor.connect(username=args.user, socket=path, timeout=HA_TIMEOUT) as conn:
            reply = conn.request({"op": "ha"})
    except ProgrammingError as exc:
        if not str(exc).startswith("unknown op"):
            raise
        return dict(SINGLE_HA), "knows no ha op (a cmactor from before hot standby): runs without HA"
    ha = reply.get("ha")
    if type(ha) is not dict:
        return dict(SINGLE_HA), "says nothing of HA: runs without it"
    return ha, None


def cmd_ha(args):
    target = resolve_socket(args)
    if isinstance(target, str):
        # One supervisor: one that cannot be asked is an error (exit 1), as for every command.
        answers = [(target, *_ask_ha(args, target))]
    else:
        answers = []
        for path in target:
            try:
                ha, note = _ask_ha(args, path)
            except Error as exc:  # a row that says why
                ha, note = None, f"{type(exc).__name__}: {exc}"
            answers.append((path, ha, note))
    if args.format == "json" and isinstance(target, str):
        print(json.dumps(answers[0][1], indent=2))
    elif args.format == "json":
        shown = [
            {"socket": path, **ha} if ha is not None else {"socket": path, "error": note} for path, ha, note in answers
        ]
        print(json.dumps(shown, indent=2))
    else:
        rows = []
        for path, ha, note in answers:
            if ha is None:
                rows.append([path, None, None, None, None, None, f"unreachable: {note}"])
            else:
                rows.append([path, *(ha.get(column) for column in HA_COLUMNS[1:-1]), note])
        print_table(HA_COLUMNS, rows)
    if any(ha is not None and ha.get("role") in cmfrontend.SERVES_WRITES for _, ha, _ in answers):
        return 0
    sys.stdout.flush()
    which = "the supervisor asked is not" if len(answers) == 1 else f"none of the {len(answers)} supervisors asked is"
    terminal.say(
        f"cmactor: no supervisor is active: {which} active or single; a takeover may be under way: ask again in "
        "a few seconds, and if it lasts, check the standbys' HA settings and that they reach etcd"
    )
    return EXIT_NOT_READY


def cmd_save(args):
    with _connect(args) as conn:
        saved = conn.request({"op": "save"})["saved"]
    if args.format == "json":
        print(json.dumps(saved, indent=2))
    else:
        modules = ", ".join(saved["modules"]) or "no module"
        terminal.say(f"saved {saved['rows']} rows of {modules} to {saved['file']}", sys.stdout)
    return 0


# -- an operator's stop, start, restart and reload (supervisor/supervision/admin.py) ----------
# Each request is answered once its module has settled; one line a module on stdout, or,
# for one that did not get where it was asked to, on stderr as an error.

OPERATOR_HELP = (
    "A module stopped stays STOPPED, across restarts of the supervisor too, until `cmactor start` "
    "(state_dir/stopped.json keeps them); requests to it fail at once. A stop or restart ends the worker in "
    "order: once its requests in flight are answered (SIGKILL past stop_timeout); requests that come while a "
    "module restarts are held for it. Its dependents keep running meanwhile, as through a crash. Each "
    "command returns once its modules are READY (STOPPED for a stop), and exits 1 if one is not."
)
RELOAD_HELP = (
    "Read the supervisor's config file again and run its agents: added modules start, removed ones stop in "
    "order and go, changed ones (any agent option differs) restart in order with their new options; the "
    "others are not touched, nor are their requests. A file with errors changes nothing, and every error is "
    "named. [supervisor] keys that changed are listed as needing a restart of the supervisor."
)


def _outcome(entry, prefix=""):
    """Print what became of one module (admin.py's entry); False if it is not where it was asked to be."""
    line = f"{prefix}{entry['name']}: {entry['state']}"
    if entry["pid"] is not None:
        line += f" (pid {entry['pid']})"
    if entry["note"]:
        line += f": {entry['note']}"
    terminal.say(line if entry["ok"] else f"cmactor: {line}", sys.stdout if entry["ok"] else None)
    return entry["ok"]


def _each_module(args, op, **fields):
    """Send ``op`` for each module named, one after the other; exit 1 if one fails."""
    failed = False
    with _connect(args) as conn:
        for name in args.modules:
            try:
                _outcome(conn.request({"op": op, "module": name, **fields})["module"])
            except Error as exc:
                terminal.say(f"cmactor: {name}: {type(exc).__name__}: {exc}")
                failed = True
    return EXIT_ERROR if failed else 0


def cmd_stop(args):
    if args.modules:
        return _each_module(args, "stop")
    return cmd_shutdown(args)


def cmd_shutdown(args):
    with _connect(args) as conn:
        conn.request({"op": "stop"})
    print("supervisor stopping")
    return 0


def cmd_start(args):
    return _each_module(args, "start")


def cmd_restart(args):
    if args.all == bool(args.modules):
        args.parser.error("name the modules to restart, or give --all")
    if args.rolling and not args.all:
        args.parser.error("--rolling goes with --all")
    if not args.all:
        return _each_module(args, "restart", kill=args.kill)
    with _connect(args) as conn:
        reply = conn.request({"op": "restart", "all": True, "rolling": args.rolling, "kill": args.kill})
    return 0 if all([_outcome(entry) for entry in reply["modules"]]) else EXIT_ERROR


def cmd_reload(args):
    with _connect(args) as conn:
        done = conn.request({"op": "reload"})["reload"]
    ok = all([_outcome(entry, f"{entry['change']} ") for entry in done["modules"]])
    if done["unchanged"]:
        terminal.say(f"unchanged: {', '.join(done['unchanged'])}", sys.stdout)
    if done["needs_restart"]:
        terminal.say(
            f"needs a restart: [supervisor] {', '.join(done['needs_restart'])} changed, which applies at the "
            "supervisor's next start",
            sys.stdout,
        )
    return 0 if ok else EXIT_ERROR


def _write_bytes(data):
    """Write bytes to stdout as they are: a log as it was written, an export as UTF-8
    whatever the locale (apply reads UTF-8)."""
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _log_path(args):
    """The module's log file, or the supervisor's own (--supervisor): in the log directory
    the running supervisor names in its status; else, for a supervisor that is not
    running, in the state_dir of the config file (-c, or ./cmactor.toml as for the socket)."""
    try:
        conn = _connect(args)
    except OperationalError as exc:
        config = config_file(args)
        if config is None:
            raise OperationalError(
                f"{exc}; for the logs of a supervisor that is not running, name its config file with -c"
            ) from None
        options, modules, base_dir, _ = load_toml(config)
        log_dir = os.path.join(base_dir, options["state_dir"], "logs")
        who = f"{config} configures"
    else:
        with conn:
            reply = conn.request({"op": "status"})
        modules, log_dir = reply["status"], reply["supervisor"]["log_dir"]
        who = "the supervisor runs"
    if args.supervisor:
        return os.path.join(log_dir, SUPERVISOR_LOG)
    if args.module not in modules:
        raise ProgrammingError(f"unknown module {args.module!r}; {who}: {', '.join(sorted(modules))}")
    return os.path.join(log_dir, f"{args.module}.log")


def cmd_logs(args):
    path = _log_path(args)
    try:
        lines, log_file = tail.last_lines(path, args.lines)
    except FileNotFoundError:
        whose = "the supervisor" if args.supervisor else f"module {args.module!r}"
        raise OperationalError(f"{whose} has no log at {path}: it has not run with this state_dir") from None
    except OSError as exc:
        raise OperationalError(f"cannot read {path}: {exc.strerror}") from None
    _write_bytes(b"".join(lines))
    if args.follow:
        tail.follow(path, log_file, _write_bytes)  # until Ctrl-C
    log_file.close()
    return 0


def cmd_export(args):
    with _connect(args) as conn:
        reply = conn.request({"op": "export", "modules": args.modules or None})
    sections = {name: json.loads(section) for name, section in reply["export"]}
    if args.format == "json":
        text = json.dumps(sections, indent=2, ensure_ascii=False)
        _write_bytes((terminal.json_escaped(text) if sys.stdout.isatty() else text).encode() + b"\n")
        return 0
    _write_commands(
        ("set", module, table, row)
        for module, tables in sections.items()
        for table, rows in tables.items()
        for row in rows
    )
    return 0


def _write_commands(changes):
    """Print (op, module, table, params) as the lines cmactor apply reads: every line made
    before any is printed, so that the output is whole or not at all."""
    try:
        lines = [commands.export_line(module, table, row, op) for op, module, table, row in changes]
    except commands.CommandError as exc:  # a field name key=value cannot hold
        raise DataError(str(exc)) from None
    if sys.stdout.isatty():  # each line on one line: a newline in a value is shown as \n
        lines = map(terminal.escaped, lines)
    _write_bytes("".join(line + "\n" for line in lines).encode())


def cmd_check(args):
    """Read a config file as `cmactor run` would and name every error in it (exit 1), or say what it runs."""
    options, agents, base_dir, ha = load_toml(args.config_file)
    state_dir = os.path.join(base_dir, options["state_dir"])
    node = f"; node {ha['node']} of cluster {ha['cluster']} on etcd {', '.join(ha['etcd'])}" if ha else ""
    restconf = restconf_options(args.config_file)
    if restconf is not None:
        node += f"; RESTCONF on {'https' if restconf['tls'] else 'http'}://{restconf['listen']}"
    print(
        f"{os.path.abspath(args.config_file)}: ok: {len(agents)} modules ({', '.join(agents)}), "
        f"state_dir {state_dir}{node}"
    )
    return 0


def cmd_restconf(args):
    """Run the RESTCONF server of the config's [restconf] table, a client of its supervisor."""
    from cmsupervisor.restconf.run import serve  # here: only this command needs the HTTP server

    config = config_file(args)
    if config is None:
        raise ConfigError(
            "cmactor restconf: give the config with -c CONFIG.toml: its [restconf] table says where to listen"
        )
    options = restconf_options(config)
    if options is None:
        raise ConfigError(
            f'{os.path.abspath(config)}: no [restconf] table; add one, like [restconf] listen = "127.0.0.1:8443"'
        )
    options["config"] = os.path.abspath(config)
    if args.add_user is not None:
        return _add_user(config, options["users"], args.add_user)
    if args.state_dir:  # `cmactor run --state-dir`'s: the self-signed certificate and revisions go there
        options["state_dir"] = os.path.abspath(args.state_dir)
    _end_with_parent()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )
    return serve(options, resolve_socket(args))


def _add_user(config, users, name):
    """`cmactor restconf --add-user NAME`: set NAME's password in the [restconf] users file,
    read twice from the terminal, or once from the first line of stdin (a script's)."""
    from cmsupervisor.restconf.security import add_user

    if users is None:
        raise ConfigError(
            f'{os.path.abspath(config)}: [restconf] has no users = "PATH": add one, naming the htpasswd file '
            "the users are kept in"
        )
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise DataError(f"cmactor restconf --add-user {name}: the two passwords differ; nothing was changed")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise DataError(f"cmactor restconf --add-user {name}: an empty password; nothing was changed")
    try:
        new = add_user(users, name, password)
    except ValueError as exc:
        raise DataError(f"cmactor restconf --add-user {name}: {exc}") from None
    print(f"cmactor: user {name} {'added to' if new else 'given a new password in'} {users}")
    return 0


def _end_with_parent():
    """Run by `cmactor run` (sidecar.py, CMACTOR_PARENT_PID): ask the kernel for SIGTERM when
    that supervisor dies without stopping this server, and end now if it is gone already."""
    parent = os.environ.pop("CMACTOR_PARENT_PID", None)
    if not parent or not parent.isdigit():
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's stop still ends it
    if os.getppid() != int(parent):
        raise OperationalError(f"cmactor restconf: its supervisor (pid {parent}) is gone")


def cmd_journal(args):
    changes = []
    for path in journal.replay_order(args.files):
        try:
            changes += journal.as_commands(path)
        except StoreError as exc:  # not there, unreadable, not one of them: a source not found
            raise OperationalError(
                f"{exc}; name journal files (state_dir/journal/MODULE.jsonl...) or snapshots (MODULE.snapshot...)"
            ) from None
    _write_commands(changes)
    return 0


def _read_commands(path):
    """The text of an apply file (``-``: stdin), as UTF-8."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as exc:
        raise OperationalError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ProgrammingError(
            f"{path} line {line}: not UTF-8 text ({exc.reason}); cmactor export writes UTF-8"
        ) from None


def _commands(count):
    return "1 command" if count == 1 else f"{count} commands"


def _refuse(name, malformed):
    """Report every bad line of an apply file, and refuse it whole."""
    for number, problem in sorted(malformed):
        terminal.say(f"cmactor: {name} line {number}: {problem}")
    bad = "1 bad line" if len(malformed) == 1 else f"{len(malformed)} bad lines"
    raise ProgrammingError(f"{name}: {bad}; nothing was applied (fix the file and apply it again)")


def cmd_apply(args):
    name = "<stdin>" if args.file == "-" else args.file
    # Checked before anything is sent: a malformed line, or a module this supervisor
    # does not run, is a file to fix, not a config to half-apply.
    found, malformed = commands.parse(_read_commands(args.file))
    if malformed:
        _refuse(name, malformed)
    with _connect(args, terminal.say) as conn:
        modules = conn.request({"op": "status"})["status"]
        runs = ", ".join(sorted(modules))
        unknown = [
            (c.line, f"unknown module {c.module!r}; the supervisor runs: {runs}")
            for c in found
            if c.module not in modules
        ]
        if unknown:
            _refuse(name, unknown)
        cur = conn.cursor()
        applied, failed = [], []
        for command in found:
            try:
                cur.execute(f"{command.op} {command.module}.{command.table}", command.params)
            except Error as exc:
                failed.append(command.line)
                problem = f"{name}: line {command.line} failed: {type(exc).__name__}: {exc}"
                if args.keep_going and not conn.closed:
                    terminal.say(f"cmactor: {problem}")
                    continue
                if applied:
                    lines = f"line {applied[0]}" if len(applied) == 1 else f"lines {applied[0]}-{applied[-1]}"
                    went_in = f"applied {lines} ({_commands(len(applied))})"
                else:
                    went_in = "nothing was applied"
                terminal.say(f"cmactor: {problem}; {went_in}; nothing after line {command.line} was sent")
                return 1
            applied.append(command.line)
    if failed:
        terminal.say(
            f"cmactor: {name}: {len(applied)} of {_commands(len(found))} applied; {len(failed)} failed "
            f"({'line' if len(failed) == 1 else 'lines'} {', '.join(map(str, failed))})"
        )
        return 1
    terminal.say(f"applied {_commands(len(applied))} from {name}", sys.stdout)
    return 0


def _count_arg(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of lines, 0 or more; got {text!r}")
    return value


# The options of the commands that talk to a supervisor, given before the command name
# or after it: name -> (flags, add_argument keywords). Each command is given those it
# honours (_options); one given before the name of a command that does not take it is a
# usage error (_settle), as argparse makes one given after it. Their defaults are set
# once the line is parsed: a subcommand's default would overwrite a value given before
# its name (`cmactor --format json status`).
OPTIONS = {
    "socket": (
        ("--socket",),
        {
            "action": "append",
            "metavar": "PATH",
            "help": "the supervisor's socket (default: from --config, $CMACTOR_SOCKET, ./cmactor.toml); given "
            "more than once, the sockets of a hot-standby cluster's supervisors: the command talks to the active",
        },
    ),
    "config": (
        ("-c", "--config"),
        {
            "metavar": "CONFIG.toml",
            "help": "talk to the supervisor this config runs (one run with --state-dir too)",
        },
    ),
    "user": (
        ("--user",),
        {"metavar": "NAME", "help": "user name sent with requests, for the audit log (default: $USER)"},
    ),
    "format": (("--format",), {"choices": ("table", "json"), "help": "output format (default: table)"}),
}
CONNECTS = ("socket", "config", "user")  # what every command that connects takes


def _option_defaults():
    return {"socket": None, "config": None, "user": os.environ.get("USER", "admin"), "format": "table"}


def _add_options(parser, names, before=False):
    for name in names:
        flags, keywords = OPTIONS[name]
        if before and keywords.get("action") == "append":
            # The command's parser would overwrite what was given before its name (argparse
            # copies its namespace over): kept apart, and put first by _settle.
            keywords = {**keywords, "dest": f"{name}_before"}
        parser.add_argument(*flags, default=argparse.SUPPRESS, **keywords)


def _options(*names):
    """A parent parser that gives a command the OPTIONS ``names``, the ones it honours."""
    parent = argparse.ArgumentParser(add_help=False)
    _add_options(parent, names)
    parent.set_defaults(takes=names)
    return parent


def _settle(parser, args):
    """Refuse an option given before the name of a command that does not take it, and set
    the defaults of those it takes."""
    takes = getattr(args, "takes", ())  # a command given no _options takes none
    for name in OPTIONS:
        before = vars(args).pop(f"{name}_before", None)  # `--socket A status --socket B`: [A, B]
        if before is not None:
            setattr(args, name, before + getattr(args, name, []))
    for name, default in _option_defaults().items():
        if name in takes:
            if not hasattr(args, name):
                setattr(args, name, default)
        elif hasattr(args, name):
            parser.error(f"{'/'.join(OPTIONS[name][0])} is not an option of `cmactor {args.command}`")


def version():
    """What `cmactor --version` prints: the installed distribution's version, where it is, and Python's."""
    from cmactor.version import installed  # only when asked: reading the metadata takes ~20 ms

    where = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return f"cmactor {installed()} from {where} (Python {platform.python_version()})"


class _Version(argparse.Action):
    """--version, which reads the distribution's metadata only when it is asked for."""

    def __init__(self, option_strings, dest, **keywords):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **keywords)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version())
        parser.exit()


EXIT_HELP = (
    "Exit status: 0 done; 1 an error, printed as one line 'cmactor: <class in cmactor.errors>: <message>'; "
    "2 a usage error; for status, 3 when a module shown is not READY and 4 when a module named is not one "
    "the supervisor runs; for ha, 3 when no supervisor asked is active; 70 an unexpected internal error (CMACTOR_TRACEBACK=1 shows its traceback); "
    "130 interrupted."
)
RUN_HELP = (
    "Run a supervisor of the modules CONFIG.toml configures, in the foreground: it starts them, dependencies "
    "first, serves clients on its socket until Ctrl-C, SIGTERM or `cmactor stop`, then stops them. It serves "
    "the modules that came up (a module that did not is FAILED, its reason logged and in status), and exits "
    "1 when none did (with --strict, when any did not). With --state-dir it leaves the path of its socket "
    "beside the config (.CONFIG.toml.socket), where `cmactor -c CONFIG.toml` finds it. With a [restconf] "
    "table it also runs the RESTCONF server (`cmactor restconf`) as a process of its own, restarted when it "
    "dies, stopped with it, and says where it listens."
)
STATUS_HELP = (
    "One row per module (or per MODULE named, in that order): its state, worker pid, restarts, uptime, "
    "memory (rss), cpu %, requests queued and in flight, whether it has unsaved changes, and a note saying "
    "why it is not READY or how it last exited. On a terminal the table fits its width (the note wraps, or "
    "goes under its row) and states are coloured (not with NO_COLOR set). --format json prints each "
    "module's whole status entry. As `supervisorctl status` does, it exits 3 when a module shown is not "
    "READY, and 4 (printing nothing else) when a module named is not one the supervisor runs. With [restconf], "
    "a last line of the table gives the RESTCONF server's state, pid, URL and restarts."
)
HA_HELP = (
    "Ask each supervisor named with --socket (or the one the options find) for its place in a hot-standby "
    "cluster: one row per socket with its node name, its role (active: it takes sets; standby: it answers "
    "reads and refuses changes; joining: it is catching up; single: it runs without HA), the node it knows as "
    "active, whether its copy is in sync and the cluster revision it has. A socket that cannot be asked is a "
    "row saying why (with one socket, an error). --format json prints the supervisor's answer as JSON; for "
    'several sockets, a list of them, each with its "socket" (or an "error"). It exits 3 when no '
    "supervisor answering is active or single."
)
PARAMS_HELP = "Params are key=value words, each sent as its text (key=None sends the text None)."
GETNEXT_PARAMS_HELP = (
    "Params are key=value words. A walk's index columns are the ones each next call carries from "
    "the previous row; a param of one is where the walk starts (the rows after it), and the other "
    "params ride along with every call. --index names them; else key=None (a None param: an index "
    "column with no start value) makes every param an index column, as in "
    "cmactor getnext vlan.member vlan=v10 port=None; else the agent's declared index_columns carry "
    "the walk (or every field of the previous row)."
)

LOGS_HELP = (
    "A module's log, state_dir/logs/MODULE.log: its worker's log records and what it (or a process it "
    "started) wrote to stdout or stderr, rotated by size ([supervisor] log_max_bytes, log_backups). The "
    "log directory comes from the running supervisor; when it is not running, from the state_dir of the "
    f"config file given with -c. --supervisor shows the supervisor's own log, state_dir/logs/{SUPERVISOR_LOG}, "
    "rotated alike: what it says of itself and of every module."
)
EXPORT_HELP = (
    "Print the live config of the modules' persistent tables (the save walk, without writing the config "
    "file) as lines 'set MODULE.TABLE key=value ...', quoted as a shell quotes words, so that cmactor apply "
    "reads them back exactly; modules dependencies first, tables in persistent_list order. A value that is "
    "None is left out. Every module named (default: every module) must be READY."
)
JOURNAL_HELP = (
    "Print the changes a module's journal (state_dir/journal/MODULE.jsonl, or one moved aside by "
    "`cmactor run --saved-only`, MODULE.jsonl.aside-TIME, or kept by an earlier cmactor, MODULE.jsonl.old) or its "
    "snapshot (MODULE.snapshot...) holds, as the lines cmactor apply reads: a snapshot's rows as sets, a journal's "
    "records as the set or setop each was, the module named after the file. The files are taken in the order "
    "their changes were made, whatever order they are named in: per module, .old ones, then those moved aside, "
    "oldest first, then the live ones, a snapshot before the journal beside it. Nothing is sent: "
    "`cmactor journal FILE ... | cmactor apply -` replays them into the running supervisor."
)
APPLY_HELP = (
    "Replay FILE, lines of 'set|setop MODULE.TABLE key=value ...' (as cmactor export writes; words quoted "
    "as in a shell, values taken literally: key=None is the text None), in order. Blank lines and lines "
    "starting with # are skipped. The whole file is checked first: if any line is malformed or names a "
    "module the supervisor does not run, every such line is reported and nothing is sent. Then the "
    "commands go one by one; the first that fails stops the apply, saying which lines went in "
    "(--keep-going reports each failure and goes on). Applying adds and changes rows; it deletes none."
)


def _columns(text):
    columns = text.split(",")
    if not all(columns):
        raise argparse.ArgumentTypeError(f"must be column names separated by commas, got {text!r}")
    return columns


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of rows, 1 or more; got {text!r}")
    return value


def cmd_bench(args):
    from cmactor_perf.__main__ import main as bench

    return bench((["--quick"] if args.quick else []) + ["--format", args.format])


def build_parser():
    parser = argparse.ArgumentParser(
        prog="cmactor",
        description="Run and talk to a cmactor supervisor. `cmactor COMMAND --help` describes each command "
        "and its options, which may come before its name too (cmactor -c CONFIG.toml status).",
        epilog=EXIT_HELP,
    )
    parser.add_argument("--version", action=_Version, help="print the version of cmactor and of Python, and exit")
    _add_options(parser, OPTIONS, before=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run a supervisor in the foreground (Ctrl-C stops it)", description=RUN_HELP, epilog=EXIT_HELP
    )
    run.add_argument("config_file", metavar="CONFIG.toml")
    run.add_argument("--state-dir", help="override [supervisor] state_dir")
    run.add_argument("--log-level", help="override [supervisor] log_level (DEBUG, INFO, WARNING, ERROR)")
    run.add_argument(
        "--ignore-config",
        action="store_true",
        help="if the saved config file is unusable, rename it aside and start with defaults",
    )
    start_from = run.add_mutually_exclusive_group()
    start_from.add_argument(
        "--recover",
        action="store_true",
        help="load the saved config and the changes journaled since the last save (the default; kept for scripts)",
    )
    start_from.add_argument(
        "--saved-only",
        action="store_true",
        help="start from the saved config file alone: each module's journal of unsaved changes is moved aside "
        "(journal/MODULE.jsonl.aside-TIME, named in the log, never deleted; `cmactor journal FILE | cmactor "
        "apply -` replays it)",
    )
    run.add_argument(
        "--strict",
        action="store_true",
        help="exit non-zero unless every module is READY after start (default: serve the ones that are)",
    )
    run.set_defaults(func=cmd_run)

    state = sub.add_parser(
        "status",
        parents=[_options(*CONNECTS, "format")],
        help="state of every module, or of those named",
        description=STATUS_HELP,
        epilog=EXIT_HELP,
    )
    state.add_argument("modules", nargs="*", metavar="MODULE", help="the modules to show (default: every module)")
    state.add_argument(
        "--histograms",
        action="store_true",
        help="with --format json, keep the latency histograms' buckets (default: their count and sum only)",
    )
    state.set_defaults(func=cmd_status, parser=state)
    sub.add_parser(
        "ha",
        parents=[_options(*CONNECTS, "format")],
        help="each supervisor's role in a hot-standby cluster: which one is active",
        description=HA_HELP,
        epilog=EXIT_HELP,
    ).set_defaults(func=cmd_ha)
    for name in DATA_OPS:
        data = sub.add_parser(
            name,
            parents=[_options(*CONNECTS, "format")],
            help=f"{name} MODULE.TABLE key=value ...",
            description=GETNEXT_PARAMS_HELP if name == "getnext" else PARAMS_HELP,
        )
        data.add_argument("target", metavar="MODULE.TABLE")
        data.add_argument("params", nargs="*", metavar="key=value", help="params (see above)")
        data.add_argument("--vr", help="VR name passed to the agent as ctx.vr_name")
        if name == "getnext":
            data.add_argument(
                "--index",
                type=_columns,
                metavar="COL,...",
                help="the walk's index columns (default: every param if one is key=None, else the agent's)",
            )
            data.add_argument(
                "--max-rows",
                type=_positive_int,
                metavar="N",
                help="show a page of at most N rows; when the table goes on, a last line (on stderr) gives "
                "the command for the next page (default: the whole table)",
            )
        data.set_defaults(func=cmd_data)
    sub.add_parser(
        "save",
        parents=[_options(*CONNECTS, "format")],
        help="save every module's config to the config file",
        description="Save the persistent tables of every READY module to the config file in state_dir, which "
        "the next start loads; the changes journaled since the last save are folded into it. --format json "
        "prints what was saved as JSON.",
    ).set_defaults(func=cmd_save)
    # An operator's stop, start, restart and reload of modules (admin.py).
    stop = sub.add_parser(
        "stop",
        parents=[_options(*CONNECTS)],
        help="stop modules and keep them stopped; with no module, stop the supervisor",
        description="Stop each MODULE and keep it STOPPED until `cmactor start`. With no MODULE, stop the "
        "supervisor (as `cmactor shutdown`): its modules stop, dependents first, and `cmactor run` exits. "
        + OPERATOR_HELP,
    )
    stop.add_argument("modules", nargs="*", metavar="MODULE")
    stop.set_defaults(func=cmd_stop)
    sub.add_parser(
        "shutdown",
        parents=[_options(*CONNECTS)],
        help="stop the supervisor and all its modules",
        description="Stop the supervisor: its modules stop, dependents first, and `cmactor run` exits.",
    ).set_defaults(func=cmd_shutdown)
    start = sub.add_parser(
        "start",
        parents=[_options(*CONNECTS)],
        help="start modules that were stopped (or are FAILED)",
        description="Start each MODULE that was stopped, or is FAILED. " + OPERATOR_HELP,
    )
    start.add_argument("modules", nargs="+", metavar="MODULE")
    start.set_defaults(func=cmd_start)
    restart = sub.add_parser(
        "restart",
        parents=[_options(*CONNECTS)],
        help="restart modules, or every one (--all), in order; revives a FAILED or stopped one",
        description="Restart each MODULE, or every module but the stopped ones (--all): its worker ends in order "
        "and a new one loads its config again; a FAILED (quarantined) or stopped module is started. --rolling "
        "restarts one at a time, dependencies first (config_deps), each READY before the next; one that does not "
        "come up ends the roll. " + OPERATOR_HELP,
    )
    restart.add_argument("modules", nargs="*", metavar="MODULE")
    restart.add_argument("--all", action="store_true", help="every module but the stopped ones")
    restart.add_argument("--rolling", action="store_true", help="with --all: one at a time, dependencies first")
    restart.add_argument(
        "--kill", action="store_true", help="SIGKILL the worker now: what it was running fails (default: in order)"
    )
    restart.set_defaults(func=cmd_restart, parser=restart)
    sub.add_parser(
        "reload",
        parents=[_options(*CONNECTS)],
        help="read the config file again: start, stop and restart the modules that changed",
        description=RELOAD_HELP,
    ).set_defaults(func=cmd_reload)
    logs = sub.add_parser(
        "logs",
        parents=[_options(*CONNECTS)],
        help="show a module's log (its worker's log records, stdout and stderr), or the supervisor's own",
        description=LOGS_HELP,
    )
    whose = logs.add_mutually_exclusive_group(required=True)
    whose.add_argument("module", nargs="?", metavar="MODULE")
    whose.add_argument(
        "--supervisor",
        action="store_true",
        help=f"the supervisor's own log (state_dir/logs/{SUPERVISOR_LOG}) instead of a module's",
    )
    logs.add_argument(
        "-n", "--lines", type=_count_arg, default=20, metavar="N", help="show the last N lines (default 20)"
    )
    logs.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="then show lines as they are written, across rotations, until Ctrl-C",
    )
    logs.set_defaults(func=cmd_logs)
    export = sub.add_parser(
        "export",
        parents=[_options(*CONNECTS, "format")],
        help="print the live config as set commands, for cmactor apply",
        description=EXPORT_HELP,
    )
    export.add_argument("modules", nargs="*", metavar="MODULE", help="the modules to export (default: every module)")
    export.set_defaults(func=cmd_export)
    check = sub.add_parser(
        "check",
        help="check a config file: every error in it at once, with its line",
        description="Read CONFIG.toml as `cmactor run` reads it and report every error in it at once, each with "
        "its file, line and key (and a did-you-mean for a misspelt key); exit 1 if there is any, 0 with a "
        "one-line summary if there is none. Nothing is started and nothing in the state_dir is touched.",
    )
    check.add_argument("config_file", metavar="CONFIG", help="the cmactor.toml to check")
    check.set_defaults(func=cmd_check)
    restconf = sub.add_parser(
        "restconf",
        parents=[_options("socket", "config")],
        help="run the RESTCONF server (RFC 8040) of the config's [restconf] table, until Ctrl-C",
        description="Serve the modules of the supervisor that CONFIG.toml runs over RESTCONF (RFC 8040), "
        "as its [restconf] table says (listen, users, tls, cert, key): a client of that supervisor in a "
        "process of its own. It prints where it listens; SIGTERM or Ctrl-C stops it.",
    )
    restconf.add_argument(
        "--state-dir", help="override [supervisor] state_dir (where a self-signed certificate is kept)"
    )
    restconf.add_argument(
        "--add-user",
        metavar="NAME",
        help="set NAME's password in the [restconf] users file (asked twice on a terminal, else the first "
        "line of stdin), then exit; a server running reads the file again within a second",
    )
    restconf.set_defaults(func=cmd_restconf)
    replay = sub.add_parser(
        "journal", help="print the changes journal files hold as commands, for cmactor apply", description=JOURNAL_HELP
    )
    replay.add_argument(
        "files", nargs="+", metavar="FILE", help="journal or snapshot files, in the order to replay them"
    )
    replay.set_defaults(func=cmd_journal)
    apply = sub.add_parser(
        "apply",
        parents=[_options(*CONNECTS)],
        help="replay a file of set/setop commands, as cmactor export writes",
        description=APPLY_HELP,
    )
    apply.add_argument("file", metavar="FILE", help="the file of commands; - reads stdin")
    apply.add_argument(
        "--keep-going",
        action="store_true",
        help="on a command that fails, report it and go on (exit non-zero at the end)",
    )
    apply.set_defaults(func=cmd_apply)
    bench = sub.add_parser(
        "bench",
        parents=[_options("format")],
        help="benchmarks against raw baselines measured in the same run (perf/README.md)",
        description="Measure cmactor scenarios and the raw floors they are compared with, in the same run, "
        "each row with its ratio to its floor (perf/README.md). It starts supervisors of its own: it talks to "
        "no running one. --format json prints the figures as JSON.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes: the whole suite in under a minute")
    bench.set_defaults(func=cmd_bench)
    return parser


def _declare_main_module():
    """Present this program to multiprocessing as ``python -m cmsupervisor``.

    A worker started with forkserver (or spawn) re-runs the parent's main script
    unless the main module has a ``__spec__`` named ``*.__main__``. Run as the
    ``cmactor`` console script it has none, and every worker start would import
    the whole CLI again (~15 ms measured); with the spec, workers skip it.
    """
    main_module = sys.modules.get("__main__")
    spec = getattr(main_module, "__spec__", None)
    if main_module is not None and spec is None:
        main_module.__spec__ = importlib.util.find_spec("cmsupervisor.__main__")


def report(exc):
    """Print an error in one line on stderr: its class (cmactor.errors') and its message."""
    terminal.say(f"cmactor: {type(exc).__name__}: {exc}")


def main(argv=None):
    _declare_main_module()
    parser = build_parser()
    args = parser.parse_args(argv)
    _settle(parser, args)
    try:
        return args.func(args)
    except (Error, ConfigError, StartupError) as exc:
        report(exc)
        return EXIT_ERROR
    except BrokenPipeError:  # `cmactor logs vlan | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 0
    except KeyboardInterrupt:
        print("cmactor: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("CMACTOR_TRACEBACK"):
            raise
        # One line whatever the message holds: a user gets an error, not a traceback.
        print(
            f"cmactor: internal error: {type(exc).__name__}: {terminal.escaped(str(exc))}; "
            "run it again with CMACTOR_TRACEBACK=1 in the environment to see the traceback",
            file=sys.stderr,
        )
        return INTERNAL_ERROR
