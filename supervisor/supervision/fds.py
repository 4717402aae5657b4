"""File descriptors: how many a supervisor needs for its modules, and its soft limit.

Each module holds about seven of the supervisor's descriptors while its worker runs
(its channel, doorbell and output sockets, the process sentinel and multiprocessing's
own pipe; measured: 21 + 7.1 a module), and a restart opens a few more for a moment.
The common soft limit of 1,024 is too few for 200 modules, while the hard limit is
usually far higher: the soft one is raised towards it, as servers that use epoll
(not select()) do, and a start that cannot fit says so with the numbers instead of
failing module by module.
"""

import resource

from cmactor.errors import StartupError

BASE = 32  # the loop, the listener, the logs, the journals' directory, a few clients
PER_MODULE = 8


def needed(modules):
    """Descriptors a supervisor of ``modules`` modules needs, about."""
    return BASE + PER_MODULE * modules


def raise_soft_limit(wanted=None):
    """Raise the soft RLIMIT_NOFILE to ``wanted`` (None: to the hard limit), never past the
    hard one and never down; return (soft, hard) as they are then."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else wanted
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target > soft and target != resource.RLIM_INFINITY:  # the kernel caps an unlimited one itself
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard


def ensure(modules):
    """Make room for ``modules`` modules, or raise StartupError with the numbers."""
    need = needed(modules)
    soft, hard = raise_soft_limit(need)
    if soft < need:
        raise StartupError(
            f"{modules} modules need about {need:,} file descriptors in the supervisor ({BASE} + {PER_MODULE} a "
            f"module), and it may open {soft:,} (hard limit {hard:,}): raise the hard limit (`ulimit -Hn`, "
            "LimitNOFILE= in a systemd unit), or run fewer modules"
        )
