"""The state directory as a start opens it: its journals and the frontend socket.

Each step either leaves what it opened open and returns it, or closes what it
opened and raises a StartupError that names the file and the way out.
"""

import os

from cmactor.errors import StartupError

from . import server, store
from .journal import Journal


def open_journals(modules, state_dir, recover):
    """Give each module its journal, opened (``recover``: replay what it holds)."""
    directory = os.path.join(state_dir, "journal")
    store.private_dir(directory)
    for mod in modules.values():
        opts = mod.options
        mod.journal = Journal(
            os.path.join(directory, f"{mod.name}.jsonl"), opts["journal_max_records"], opts["journal_max_bytes"]
        )
        try:
            mod.journal.open(recover)
        except store.StoreError as exc:
            close_journals(modules)
            raise StartupError(f"{exc}; remove it, or start without --recover (its changes are then lost)") from None


def close_journals(modules):
    for mod in modules.values():
        if mod.journal is not None:
            mod.journal.close()


def listen(state_dir, base_dir, socket_option, allowed_uids):
    """Bind the frontend socket and record its path for clients; what server.listen returns."""
    path = socket_option or server.default_socket_path(state_dir)
    path = os.path.abspath(os.path.join(base_dir, path))
    try:
        listening = server.listen(path, allowed_uids)
    except OSError as exc:
        raise StartupError(f"cannot listen on {path}: {exc}") from None
    store.remove_leftovers(state_dir)  # ours alone now: no other supervisor listens here
    pointer = server.socket_pointer(state_dir)
    os.makedirs(os.path.dirname(pointer), mode=0o700, exist_ok=True)
    with open(pointer, "w") as f:
        f.write(listening[1])
    return listening
