"""`cmactor restconf -c CONFIG`: the RESTCONF server of a config's [restconf] table, run
in this process as a client of the supervisor at the config's socket, until SIGTERM or
Ctrl-C."""

import logging
import os
import signal
import sys
import threading

import cmactor
from cmactor.errors import ConfigError
from cmsupervisor.config import parse_address
from cmsupervisor.restconf import security
from cmsupervisor.restconf.library import Library
from cmsupervisor.restconf.server import CM_TIMEOUT, Server, connector

log = logging.getLogger("cmactor.restconf")


def build(options, socket_path):
    """A Server for the [restconf] ``options`` (config.restconf_options), bound, not yet serving;
    and the lines that say where it listens."""
    where = f"{options.get('config', 'the config')}: [restconf]"
    context = None
    notes = []
    if options["tls"]:
        directory = os.path.join(options["state_dir"], "restconf")
        try:
            context, fingerprint, generated = security.server_context(options["cert"], options["key"], directory)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if options["cert"] is not None:
            what = "certificate " + options["cert"]
        else:  # generated at the first start, the same one at the next
            what = f"a self-signed certificate {'generated' if generated else 'kept'} in {directory}"
        notes.append(f"cmactor restconf: TLS with {what}; its SHA-256 fingerprint: {fingerprint}")
    if options["users"] is not None:
        try:
            users = security.Users.load(options["users"])
        except (ValueError, OSError, ImportError) as exc:  # ImportError: bcrypt is not installed
            raise ConfigError(f"{where}.users: {exc}") from None
        notes += [f"cmactor restconf: warning: {text}" for text in users.warnings]

        def user_of(headers):
            problem = users.refresh()
            if problem is not None:
                log.warning("restconf: %s", problem)
            return users.check(headers.get("Authorization"))
    else:
        name = options["user"]

        def user_of(headers):
            return name

    fetch_conn = {}
    fetch_lock = threading.Lock()

    def fetch():
        """The schema op, on a connection of the library's own (opened again if it broke)."""
        with fetch_lock:
            conn = fetch_conn.get("conn")
            if conn is None or conn.closed:
                conn = fetch_conn["conn"] = cmactor.connect(
                    username=options["user"], socket=socket_path, timeout=CM_TIMEOUT
                )
            return conn.request({"op": "schema"})["schema"]

    library = Library(fetch, os.path.join(options["state_dir"], "restconf", "yang-revisions.json"))
    host, port = parse_address(f"{where}.listen", options["listen"])
    try:
        server = Server(
            (host, int(port)),
            library,
            connector(socket_path),
            user_of,
            max_connections=options["max_connections"],
            max_body=options["max_body"],
            idle_timeout=options["idle_timeout"],
            request_timeout=options["request_timeout"],
            ssl_context=context,
        )
    except OSError as exc:
        raise ConfigError(f"{where}.listen: cannot listen on {options['listen']}: {exc.strerror or exc}") from None
    server.fetch_conn = fetch_conn
    try:
        library.refresh()
        modules = ", ".join(mod.yang_name for mod in library.modules.values()) or "none yet"
        notes.append(f"cmactor restconf: modules {modules}")
    except Exception as exc:  # a RestconfError: the supervisor is not there yet; asked again at each request
        notes.append(f"cmactor restconf: warning: {getattr(exc, 'message', exc)}")
    return server, notes


def serve(options, socket_path, out=sys.stderr):
    """Run the server until SIGTERM or SIGINT; 0."""
    server, notes = build(options, socket_path)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    try:
        thread.start()
        for line in notes:
            print(line, file=out)
        print(
            f"cmactor restconf: serving {server.url}/restconf for the supervisor at {socket_path} (Ctrl-C stops)",
            file=out,
            flush=True,
        )
        while not stop.wait(1.0):
            pass
        print("cmactor restconf: stopping", file=out, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.shutdown()
        server.server_close()
        conn = server.fetch_conn.get("conn")
        if conn is not None:
            conn.close()
    print("cmactor restconf: stopped", file=out, flush=True)
    return 0
