"""Entries that fail in each way a startup can fail."""

from cmactor import ready
from cmactor.cmbackend import CmAgent, cmbackend_init


class Quiet(CmAgent):
    """Never calls ready()."""


class Ready(CmAgent):
    def event_generate_default(self):
        ready()


def raises():
    raise ValueError("entry exploded")


def no_init():
    return None


def never_ready():
    cmbackend_init(Quiet())


def init_twice():
    cmbackend_init(Ready())
    cmbackend_init(Ready())


def bad_list():
    cmbackend_init(Ready(), persistent_list="kv")


def not_an_agent():
    cmbackend_init(object())


def own_loop():
    """An entry that runs its own loop after cmbackend_init, as some agents do."""
    import threading

    cmbackend_init(Ready())
    threading.Event().wait()


NOT_CALLABLE = 3
