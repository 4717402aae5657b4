"""The saved config file: written atomically, verified when read.

The file is two JSON lines. The first is a header: format name and version, the
time of the save, the modules saved, where each module's section sits in the
body (offset and length in bytes), the body's length and its SHA-256. The second
is the body: ``{"ports": {"port": [row, ...]}, "vlan": {...}}``. Each worker
encodes its own section, and the supervisor hands each section back to its worker
at load time as bytes: the supervisor checks the file but never parses rows.
"""

import datetime
import errno
import hashlib
import json
import logging
import os
import stat
import tempfile

log = logging.getLogger("cmactor.supervisor")

FORMAT = "cmactor-config"
VERSION = 1
FILENAME = "config.jsonl"


class StoreError(Exception):
    """The config file cannot be used; the message names the file and what is wrong."""


def read(path, what="config file"):
    """Sections by module name ({} when there is no file yet), or StoreError naming the file
    as ``what`` (a journal snapshot has the config file's format)."""
    try:
        with open(path, "rb", opener=no_follow) as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StoreError(f"{what} {path} cannot be read: {reason(exc)}") from None
    head, newline, body = data.partition(b"\n")
    try:
        header = json.loads(head)
    except ValueError:
        raise StoreError(f"{what} {path} is not a cmactor config file: its first line is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StoreError(f"{what} {path} is not a cmactor config file (no format {FORMAT!r} header)")
    if header.get("version") != VERSION:
        raise StoreError(
            f"{what} {path} has format version {header.get('version')!r}; this cmactor reads version {VERSION}"
        )
    body = body[:-1] if body.endswith(b"\n") else body
    length = header.get("length")
    if not newline or len(body) != length:
        raise StoreError(f"{what} {path} is truncated: its body has {len(body)} bytes, the header says {length}")
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise StoreError(f"{what} {path} fails its checksum: it was damaged or edited after it was saved")
    modules = header.get("modules", {})
    if not isinstance(modules, dict):
        raise StoreError(f"{what} {path}: its header's module table is a {type(modules).__name__}, not a map")
    sections = {}
    for name, span in modules.items():
        if not (
            isinstance(span, list)
            and len(span) == 2
            and all(type(n) is int for n in span)
            and 0 <= span[0] <= span[0] + span[1] <= len(body)
        ):
            raise StoreError(f"{what} {path}: bad section bounds for module {name!r}: {span!r}")
        sections[name] = body[span[0] : span[0] + span[1]]
    return sections


def write(path, sections):
    """Write ``sections`` (module name -> JSON bytes) atomically; return the header."""
    parts = [b"{"]
    offset = 1
    spans = {}
    for i, (name, section) in enumerate(sections.items()):
        key = (b"," if i else b"") + json.dumps(name).encode() + b":"
        parts.append(key)
        offset += len(key)
        spans[name] = [offset, len(section)]
        parts.append(section)
        offset += len(section)
    parts.append(b"}")
    body = b"".join(parts)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "modules": spans,
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    replace(path, json.dumps(header).encode() + b"\n", body, b"\n")  # no copy of the body
    return header


def replace(path, *chunks):
    """Make ``chunks`` (bytes) the whole of file ``path``, atomically and owner-only (mkstemp's 0600):
    written beside it and fsynced, renamed over it, the rename fsynced. A supervisor
    killed meanwhile leaves the old file whole, and a ``.config-*.tmp`` that the next
    start removes (remove_leftovers)."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def no_follow(path, flags):
    """open() opener that refuses a symbolic link (ELOOP) instead of following it: nothing
    under state_dir is a link cmactor made, and one planted there could point anywhere."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)


def reason(exc, fix=None):
    """An OSError's reason, and ``fix`` (what to do about it) if given; a symbolic link is
    named for what it is, with its own fix."""
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link, which cmactor never follows under state_dir; remove it"
    return exc.strerror if fix is None else f"{exc.strerror}; {fix}"


def owner_only(path, flags):
    """open() opener for a file that holds config values (which may be secrets): made
    0600, and one left readable by others (by hand, or by an older cmactor) is made 0600.
    A symbolic link is refused, not followed (OSError, errno ELOOP)."""
    fd = no_follow(path, flags)
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        try:
            os.fchmod(fd, 0o600)
        except OSError as exc:  # another user's file: we may write it, not change it
            log.warning(
                "%s: cannot make it owner-only (%s); others may read the config values in it", path, exc.strerror
            )
    return fd


def private_dir(path):
    """Make directory ``path`` (0700) if it is missing; one of ours that others may enter is
    made 0700 where it can be. OSError if it cannot be made (FileExistsError: a file is
    in the way) or is a symbolic link (never followed)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, f"{path} is a symbolic link, which cmactor never follows under state_dir; remove it")
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        try:
            os.chmod(path, 0o700)
        except OSError as exc:  # e.g. a read-only mount: what is in it is checked on its own
            log.warning(
                "%s: cannot make it owner-only (%s); others may read what cmactor keeps there", path, exc.strerror
            )


def remove_leftovers(state_dir):
    """Remove temporary files that a supervisor killed in the middle of writing them left
    in ``state_dir``: a save's ``.config-*.tmp``, a journal truncation's ``*.jsonl.tmp``."""
    candidates = [
        os.path.join(state_dir, n) for n in _listdir(state_dir) if n.startswith(".config-") and n.endswith(".tmp")
    ]
    journal_dir = os.path.join(state_dir, "journal")
    candidates += [os.path.join(journal_dir, n) for n in _listdir(journal_dir) if n.endswith(".tmp")]
    for path in candidates:
        try:
            os.unlink(path)
        except OSError as exc:
            log.warning("cannot remove %s, left by an interrupted write: %s", path, exc)
        else:
            log.info("removed %s, left by an interrupted write", path)


def _listdir(path):
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def set_aside(path):
    """Rename an unusable config file out of the way; return its new name."""
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    new = f"{path}.bad-{stamp}"
    os.replace(path, new)
    return new
