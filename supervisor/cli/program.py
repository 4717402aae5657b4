"""The ``cmactor`` command: run a supervisor, or talk to a running one.

Client commands find the supervisor's socket from, in order: ``--socket``,
``--config`` (its state_dir), ``$CMACTOR_SOCKET``, ``./cmactor.toml``, and the
default ``.cmactor/run/cm.sock``. Output is a table, or JSON with ``--format json``.
Errors print one line on stderr and exit with status 1; any other exception is a
one-line internal error, status 3 (``CMACTOR_TRACEBACK=1`` shows its traceback).
What comes from data (values, notes, notify_cli text, error messages) is escaped
where it goes to a terminal (terminal.py). ``getnext --max-rows N`` shows a page;
when the table goes on, a line on stderr gives the next page's command. ``logs``
shows a module's log (tail.py); ``export`` and ``apply`` write and replay config as
commands (commands.py).
"""

import argparse
import importlib.util
import json
import logging
import os
import shlex
import signal
import sys
import threading

import cmactor
from cmactor import cmfrontend
from cmactor.errors import ConfigError, Error, OperationalError, StartupError
from cmactor.wire.protocol import DATA_OPS
from cmsupervisor.cli import commands, tail, terminal
from cmsupervisor.config import load_toml
from cmsupervisor.front.server import default_socket_path, socket_pointer
from cmsupervisor.observability import notify
from cmsupervisor.persistence import journal
from cmsupervisor.persistence.store import StoreError
from cmsupervisor.supervision import fds

STATUS_COLUMNS = ("state", "pid", "restarts", "uptime", "rss", "cpu", "queue", "inflight", "unsaved")

# The exit status of an exception the CLI does not expect (a bug, or an environment it
# cannot work in); 1 is an error it reports, 2 a usage error (argparse), 130 Ctrl-C.
INTERNAL_ERROR = 3


class CliError(Exception):
    """A problem to report in one line."""


def config_file(args):
    """The cmactor.toml a command names (-c), else ./cmactor.toml unless --socket or
    $CMACTOR_SOCKET says where the supervisor is; None when there is none."""
    if args.config is not None:
        return args.config
    if not args.socket and not os.environ.get("CMACTOR_SOCKET") and os.path.exists("cmactor.toml"):
        return "cmactor.toml"
    return None


def resolve_socket(args):
    if args.socket:
        return args.socket
    config = config_file(args)
    if config is None:
        return cmfrontend.default_socket()
    options, _, base_dir = load_toml(config)
    if options["socket"]:
        return os.path.join(base_dir, options["socket"])
    state_dir = os.path.join(base_dir, options["state_dir"])
    try:  # the path it bound, which differs from the default when that is too long
        with open(socket_pointer(state_dir)) as f:
            return f.read().strip()
    except OSError:
        return default_socket_path(state_dir)


def parse_params(pairs, none=False):
    """``key=value`` words as params. With ``none`` (a getnext), ``key=None`` is a None
    param, cmfrontend's index column with no start value; elsewhere it is the text "None"."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"parameter {pair!r} is not key=value")
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
            table = Table()
            for header in headers:
                table.add_column(Text(header))
            for row in rows:
                table.add_row(*map(Text, row))
            Console(file=out).print(table)
            return
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)


def _human_bytes(n):
    if n is None:
        return None
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


def show_status(status, fmt):
    if fmt == "json":
        print(json.dumps(status, indent=2, sort_keys=True))
        return
    rows = []
    for name, s in status.items():
        note = s.get("error") or (f"waiting on {s['waiting_on']}" if s.get("waiting_on") else None)
        if not note and s.get("last_exit"):
            note = f"last exit: {s['last_exit']}"
        uptime = None if s["uptime"] is None else f"{s['uptime']:.0f}s"
        rows.append(
            [
                name,
                s["state"],
                s["pid"],
                s["restarts"],
                uptime,
                _human_bytes(s["rss"]),
                s["cpu"],
                s["queue"],
                s["inflight"],
                s["unsaved"],
                note,
            ]
        )
    print_table(("module",) + STATUS_COLUMNS + ("note",), rows)


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
    sup = cmactor.Supervisor.from_toml(
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
    try:
        sup.start(strict=args.strict)
        ready = sum(1 for entry in sup.status().values() if entry["state"] == "READY")
        print(f"cmactor: {ready} of {len(sup.modules)} modules READY; socket {sup.socket_path}", file=sys.stderr)
        print(f"cmactor: clients: export CMACTOR_SOCKET={sup.socket_path}   (Ctrl-C stops)", file=sys.stderr)
        # A client's `cmactor stop` ends the supervisor on its own: wake up then too.
        threading.Thread(target=lambda: (sup.wait(), os.write(wake_w, b"d")), daemon=True).start()
        os.read(wake_r, 1)
        if received:
            print(f"cmactor: {received[0]}: stopping", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C kills at once
        sup.stop()
    print("cmactor: stopped", file=sys.stderr)
    return 0


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
        words += ["--socket", args.socket]
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
    with _connect(args) as conn:
        reply = conn.request({"op": "status"})
    show_status(reply["status"], args.format)
    audit = reply.get("supervisor", {})
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
    return 0


def cmd_save(args):
    with _connect(args) as conn:
        saved = conn.request({"op": "save"})["saved"]
    if args.format == "json":
        print(json.dumps(saved, indent=2))
    else:
        modules = ", ".join(saved["modules"]) or "no module"
        terminal.say(f"saved {saved['rows']} rows of {modules} to {saved['file']}", sys.stdout)
    return 0


def cmd_restart(args):
    with _connect(args) as conn:
        conn.request({"op": "restart", "module": args.module})
    print(f"module {args.module} restarting")
    return 0


def cmd_stop(args):
    with _connect(args) as conn:
        conn.request({"op": "stop"})
    print("supervisor stopping")
    return 0


def _write_bytes(data):
    """Write bytes to stdout as they are: a log as it was written, an export as UTF-8
    whatever the locale (apply reads UTF-8)."""
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _log_path(args):
    """The module's log file: in the log directory the running supervisor names in its
    status; else, for a supervisor that is not running, in the state_dir of the config
    file (-c, or ./cmactor.toml as for the socket)."""
    try:
        conn = _connect(args)
    except OperationalError as exc:
        config = config_file(args)
        if config is None:
            raise CliError(
                f"{exc}; for the logs of a supervisor that is not running, name its config file with -c"
            ) from None
        options, modules, base_dir = load_toml(config)
        log_dir = os.path.join(base_dir, options["state_dir"], "logs")
        who = f"{config} configures"
    else:
        with conn:
            reply = conn.request({"op": "status"})
        modules, log_dir = reply["status"], reply["supervisor"]["log_dir"]
        who = "the supervisor runs"
    if args.module not in modules:
        raise CliError(f"unknown module {args.module!r}; {who}: {', '.join(sorted(modules))}")
    return os.path.join(log_dir, f"{args.module}.log")


def cmd_logs(args):
    path = _log_path(args)
    try:
        lines, log_file = tail.last_lines(path, args.lines)
    except FileNotFoundError:
        raise CliError(f"module {args.module!r} has no log at {path}: it has not run with this state_dir") from None
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
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
    except commands.CommandError as exc:
        raise CliError(str(exc)) from None
    if sys.stdout.isatty():  # each line on one line: a newline in a value is shown as \n
        lines = map(terminal.escaped, lines)
    _write_bytes("".join(line + "\n" for line in lines).encode())


def cmd_journal(args):
    changes = []
    for path in journal.replay_order(args.files):
        try:
            changes += journal.as_commands(path)
        except StoreError as exc:
            raise CliError(
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
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CliError(f"{path} line {line}: not UTF-8 text ({exc.reason}); cmactor export writes UTF-8") from None


def _commands(count):
    return "1 command" if count == 1 else f"{count} commands"


def _refuse(name, malformed):
    """Report every bad line of an apply file, and refuse it whole."""
    for number, problem in sorted(malformed):
        terminal.say(f"cmactor: {name} line {number}: {problem}")
    bad = "1 bad line" if len(malformed) == 1 else f"{len(malformed)} bad lines"
    raise CliError(f"{name}: {bad}; nothing was applied (fix the file and apply it again)")


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


def _common_options(with_defaults):
    """Options every client command takes, before or after the command name.

    Only the top-level parser carries defaults: a subparser's default would
    overwrite a value given before the command (`cmactor --format json status`).
    """
    common = argparse.ArgumentParser(add_help=False)
    default = (lambda value: value) if with_defaults else (lambda value: argparse.SUPPRESS)
    common.add_argument(
        "--socket",
        default=default(None),
        help="the supervisor's socket (default: from --config, $CMACTOR_SOCKET, ./cmactor.toml)",
    )
    common.add_argument(
        "-c", "--config", default=default(None), help="a cmactor.toml: talk to the supervisor it configures"
    )
    common.add_argument(
        "--format", choices=("table", "json"), default=default("table"), help="output format (default: table)"
    )
    common.add_argument("--user", default=default(os.environ.get("USER", "admin")), help="user name sent with requests")
    return common


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
    "config file given with -c."
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
    common = _common_options(with_defaults=False)
    parser = argparse.ArgumentParser(
        prog="cmactor",
        description="Run and talk to a cmactor supervisor.",
        parents=[_common_options(with_defaults=True)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a supervisor in the foreground (Ctrl-C stops it)")
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

    sub.add_parser("status", parents=[common], help="state of every module").set_defaults(func=cmd_status)
    for name in DATA_OPS:
        data = sub.add_parser(
            name,
            parents=[common],
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
    sub.add_parser("save", parents=[common], help="save every module's config to the config file").set_defaults(
        func=cmd_save
    )
    restart = sub.add_parser("restart", parents=[common], help="restart one module (revives a FAILED one)")
    restart.add_argument("module")
    restart.set_defaults(func=cmd_restart)
    sub.add_parser("stop", parents=[common], help="stop the supervisor and all its modules").set_defaults(func=cmd_stop)
    logs = sub.add_parser(
        "logs",
        parents=[common],
        help="show a module's log (its worker's log records, stdout and stderr)",
        description=LOGS_HELP,
    )
    logs.add_argument("module", metavar="MODULE")
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
        parents=[common],
        help="print the live config as set commands, for cmactor apply",
        description=EXPORT_HELP,
    )
    export.add_argument("modules", nargs="*", metavar="MODULE", help="the modules to export (default: every module)")
    export.set_defaults(func=cmd_export)
    replay = sub.add_parser(
        "journal", help="print the changes journal files hold as commands, for cmactor apply", description=JOURNAL_HELP
    )
    replay.add_argument(
        "files", nargs="+", metavar="FILE", help="journal or snapshot files, in the order to replay them"
    )
    replay.set_defaults(func=cmd_journal)
    apply = sub.add_parser(
        "apply",
        parents=[common],
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
        "bench", parents=[common], help="benchmarks against raw baselines measured in the same run (perf/README.md)"
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


def main(argv=None):
    _declare_main_module()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (Error, ConfigError, StartupError, CliError) as exc:
        terminal.say(f"cmactor: {type(exc).__name__}: {exc}")
        return 1
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
