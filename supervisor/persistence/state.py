"""The state directory as a start opens it: its lock, its journals, the modules an operator
stopped (``stopped.json``, written again at each stop or start of one) and the frontend socket.

One supervisor per state directory: ``lock()`` takes an exclusive ``flock`` on
``state_dir/supervisor.lock`` before anything in the directory is read, renamed
or created, and a second supervisor (another ``cmactor run``, or an embedded
one) fails at once naming the pid that holds it, touching nothing. The kernel
drops the lock with the process that held it, so a supervisor that died never
blocks the next.

Each step either leaves what it opened open and returns it, or closes what it
opened and raises a StartupError that names the file and the way out.
"""

import fcntl
import json
import logging
import os
import shlex
import stat

from cmactor.errors import StartupError
from cmsupervisor.front import server
from cmsupervisor.persistence import store
from cmsupervisor.persistence.journal import Journal

log = logging.getLogger("cmactor.supervisor")

LOCK_NAME = "supervisor.lock"


class StateLock:
    """The held lock of one state directory; ``release()`` when the supervisor is gone."""

    def __init__(self, path, fd):
        self.path = path
        self._fd = fd

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor of the open file drops the flock
            self._fd = None


def lock(state_dir, mode):
    """Make ``state_dir`` (``mode``) if it is missing, check that it is ours and private
    enough to trust, and lock it; a StateLock, or StartupError naming who holds it."""
    try:
        os.makedirs(state_dir, mode=mode, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"state_dir {state_dir} cannot be made: {exc.strerror}; choose another state_dir") from None
    _check_owner(state_dir)
    path = os.path.join(state_dir, LOCK_NAME)
    try:
        fd = store.owner_only(path, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise StartupError(f"cannot open the lock file {path}: {store.reason(exc, _fix(state_dir))}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        who = f"the supervisor pid {holder}" if holder else "another supervisor"
        raise StartupError(
            f"state_dir {state_dir} is in use: {who} holds its lock {path}; stop it first "
            "(`cmactor stop`, or SIGTERM to its pid), or choose another state_dir; nothing was changed"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateLock(path, fd)


def _holder(fd):
    """The pid written in a lock file held by another process, or None."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _check_owner(state_dir):
    """Refuse a state_dir another user could tamper with: one owned by someone else (a
    symbolic link to it included) or writable by others. Config values are kept there,
    and a planted link could make the supervisor write where it never meant to."""
    link = os.lstat(state_dir)
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (os.geteuid(), 0):
        raise StartupError(
            f"state_dir {state_dir} is a symbolic link owned by uid {link.st_uid}, who could point it anywhere; "
            "use a directory of your own"
        )
    st = os.stat(state_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"state_dir {state_dir} is not a directory; move it away or choose another state_dir")
    if st.st_uid != os.geteuid():
        raise StartupError(
            f"state_dir {state_dir} belongs to uid {st.st_uid}, not to uid {os.geteuid()} that runs the supervisor: "
            "its owner could read or replace the config kept there; use a directory of your own"
        )
    if st.st_mode & 0o022:
        raise StartupError(
            f"state_dir {state_dir} can be written by others (mode {stat.S_IMODE(st.st_mode):04o}), who could plant "
            f"files or links in it; `chmod go-w {state_dir}`, or choose another state_dir"
        )


def _fix(state_dir):
    return f"make {state_dir} a directory that uid {os.geteuid()} can write, or choose another state_dir"


def open_journals(modules, state_dir, recover):
    """Give each module its journal, opened. ``recover`` (the default of every start): its
    records are loaded after the saved config; else they are moved aside, and named."""
    directory = os.path.join(state_dir, "journal")
    try:
        store.private_dir(directory)
    except OSError as exc:
        raise StartupError(
            f"journal directory {directory} cannot be used: {store.reason(exc, _fix(state_dir))}"
        ) from None
    for mod in modules.values():
        opts = mod.options
        mod.use_journal(
            Journal(
                os.path.join(directory, f"{mod.name}.jsonl"), opts["journal_max_records"], opts["journal_max_bytes"]
            )
        )
        try:
            moved = mod.journal.open(recover)
        except store.StoreError as exc:
            close_journals(modules)
            raise StartupError(
                f"{exc}; move it away to start without it (its changes are then not loaded), or start with "
                "`cmactor run --saved-only`, which moves every journal aside"
            ) from None
        except OSError as exc:
            close_journals(modules)
            raise StartupError(
                f"journal {mod.journal.path} cannot be opened: {store.reason(exc, _fix(state_dir))}"
            ) from None
        if moved:
            log.warning(
                "module %s: started from the saved config alone (--saved-only): its unsaved changes are moved "
                "aside to %s; to replay them: %s",
                mod.name,
                " and ".join(moved),
                replay_command(moved),
            )
        old = mod.journal.left_by_older_versions()
        if old:
            log.warning(
                "module %s: %s holds changes an earlier cmactor set aside at a start and that no running "
                "config has; they are not loaded; to replay them: %s (or remove the files)",
                mod.name,
                " and ".join(old),
                replay_command(old),
            )


def replay_command(paths):
    """The command line that replays journal or snapshot files into a running supervisor."""
    return f"cmactor journal {' '.join(map(shlex.quote, paths))} | cmactor apply -"


def close_journals(modules):
    for mod in modules.values():
        if mod.journal is not None:
            mod.journal.close()


STOPPED_NAME = "stopped.json"


def stopped_path(state_dir):
    """The file that keeps the modules an operator stopped: they stay stopped across restarts."""
    return os.path.join(state_dir, STOPPED_NAME)


def read_stopped(state_dir):
    """Module name -> who stopped it and when, for each module an operator stopped and has
    not started since ({} with no file); StartupError naming the file if it cannot be used."""
    path = stopped_path(state_dir)
    fix = "remove it to start every module (then stop again the ones to keep stopped)"
    try:
        with open(path, "rb", opener=store.no_follow) as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StartupError(f"{path} cannot be read: {store.reason(exc, fix)}") from None
    except ValueError:
        raise StartupError(f"{path} is not JSON; {fix}") from None
    stopped = data.get("stopped") if isinstance(data, dict) else None
    if not isinstance(stopped, dict) or not all(isinstance(v, str) for v in stopped.values()):
        raise StartupError(f'{path} does not hold {{"stopped": {{module: who, ...}}}}; {fix}')
    return stopped


def write_stopped(state_dir, stopped):
    """Keep ``stopped`` (module name -> who stopped it and when) for the next start:
    atomically and owner-only, as the config file. OSError if it cannot be written."""
    store.replace(stopped_path(state_dir), json.dumps({"stopped": stopped}, indent=1).encode() + b"\n")


def listen(state_dir, base_dir, socket_option, allowed_uids):
    """Bind the frontend socket and record its path for clients; what server.listen returns."""
    path = socket_option or server.default_socket_path(state_dir)
    path = os.path.abspath(os.path.join(base_dir, path))
    try:
        listening = server.listen(path, allowed_uids)
    except OSError as exc:
        raise StartupError(f"cannot listen on {path}: {exc}") from None
    pointer = server.socket_pointer(state_dir)
    try:
        os.makedirs(os.path.dirname(pointer), mode=0o700, exist_ok=True)  # made and checked by listen() by default
        fd = store.owner_only(pointer, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "w") as f:
            f.write(listening[1])
    except OSError as exc:
        server.unlisten(*listening)
        raise StartupError(
            f"cannot record the socket's path in {pointer}: {store.reason(exc, _fix(state_dir))}"
        ) from None
    return listening
