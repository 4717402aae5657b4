"""The RESTCONF server's security: who a request comes from (HTTP Basic against an
htpasswd file of bcrypt hashes), and the TLS context it is served over.

``Users.load(path)`` reads the users; ``users.check(header)`` answers the name of the
user whose ``Authorization`` header it is, or None; ``users.reload()`` reads the file
again. ``hash_password`` makes a line's hash without Apache's ``htpasswd -B``.

``server_context(cert, key, directory)`` loads the operator's certificate and key, or
a self-signed pair that it generates once into ``directory`` with the ``openssl``
command, and answers the SHA-256 fingerprint of the certificate for the start to print.

Nothing here talks to the supervisor or opens a socket.
"""

import base64
import binascii
import collections
import hashlib
import hmac
import os
import re
import secrets
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from cmsupervisor.persistence.store import replace

# Apache's htpasswd -B writes $2y$; $2a$ and $2b$ are what other tools and the bcrypt
# package write. The three name one algorithm for every password a bcrypt hash can take.
# The cost, then 22 characters of salt and 31 of hash; the salt's last character carries
# 2 bits, so only 4 characters may end it: bcrypt refuses any other at every check.
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{31}\Z")
# Other schemes an htpasswd file may hold, named in the refusal so the operator knows which.
_OTHER_SCHEMES = (
    ("$apr1$", "Apache MD5 ($apr1$)"),
    ("{SHA}", "SHA-1 ({SHA})"),
    ("$1$", "MD5-crypt ($1$)"),
    ("$5$", "SHA-256-crypt ($5$)"),
    ("$6$", "SHA-512-crypt ($6$)"),
    ("$2x$", "the buggy bcrypt variant $2x$"),
)
_REMEDY = "make the user's line again with `htpasswd -B FILE USER` (bcrypt)"
# bcrypt uses the first 72 bytes of a password; htpasswd -B hashes only those, so a longer
# password given at login is cut the same way to match.
_BCRYPT_MAX = 72
_CACHE_SIZE = 1024
# "Basic", any case (RFC 7235 schemes are case-insensitive), then the token68 credentials.
_BASIC = re.compile(r"[ \t]*[Bb][Aa][Ss][Ii][Cc] +([A-Za-z0-9+/]+=*)[ \t]*\Z")


def _bcrypt():
    try:
        import bcrypt
    except ImportError as exc:
        raise ImportError(
            f"the RESTCONF server checks passwords with bcrypt: pip install 'cmactor[restconf]' ({exc})"
        ) from exc
    return bcrypt


def hash_password(password, rounds=12):
    """The htpasswd hash (``$2y$...``, as ``htpasswd -B`` writes) of ``password`` (str or bytes).

    ``rounds`` is bcrypt's cost, 4 to 31: each step doubles the time of a check; 12 takes
    a fraction of a second. ValueError for a password longer than bcrypt's 72 bytes, which
    would be cut silently otherwise."""
    if isinstance(password, str):
        password = password.encode()
    if len(password) > _BCRYPT_MAX:
        raise ValueError(f"a bcrypt password is at most {_BCRYPT_MAX} bytes; this one is {len(password)}")
    bcrypt = _bcrypt()
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(rounds)).decode("ascii")
    return "$2y$" + hashed[4:]


def add_user(path, name, password, rounds=12):
    """Give ``name`` the password ``password`` in the htpasswd file ``path``: its line made
    anew where it was, or added at the end; the other lines and comments kept. A new file
    is owner-only; an existing one keeps its mode and group. Whether the user is new.

    ValueError for a name a line cannot hold, or a file with lines Users.load refuses (they
    are named: mend them first)."""
    _check_name(name, f"{path}: user {name!r}")
    if ":" in name:
        raise ValueError(f"{path}: the user name {name!r} has a ':', which ends a name in the file: rename the user")
    try:
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
        _read(path)
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        before, lines = None, []
    line = f"{name}:{hash_password(password, rounds)}"
    mine = [n for n, text in enumerate(lines) if text.strip().partition(":")[0] == name]
    if mine:
        lines[mine[0]] = line
    else:
        lines.append(line)
    replace(os.path.abspath(path), "".join(text + "\n" for text in lines).encode())
    if before is not None:
        os.chmod(path, stat.S_IMODE(before.st_mode))
        try:
            os.chown(path, -1, before.st_gid)
        except PermissionError:
            pass  # not a member of that group: the file is this user's alone now
    return not mine


class Users:
    """The users of an htpasswd file of bcrypt hashes, and a cache of the credentials verified.

    Thread-safe: the server may check from several threads while another reloads. A check
    that misses the cache runs bcrypt (tens to hundreds of milliseconds, without the GIL):
    an asyncio server runs it in a thread."""

    def __init__(self, path, hashes, dummy, warnings):
        self.path = path
        self.warnings = warnings
        # Swapped together by reload: a check reads both from one snapshot.
        self._state = (hashes, dummy)
        # The cache keys are keyed hashes of the credentials, never the passwords: a memory
        # dump or a debugger shows nothing that a password guess could be tested against offline.
        self._key = secrets.token_bytes(32)
        self._cache = collections.OrderedDict()
        self._lock = threading.Lock()
        self._seen = _identity(path)  # the file as it was read: refresh() reads it again once it changes
        self._look_at = 0.0

    @classmethod
    def load(cls, path):
        """The users of the htpasswd file ``path``; ``users.warnings`` lists what looks wrong
        without stopping the server (a file others may read, no users at all).

        ValueError names the file, the line and the user of a line that is not ``name:bcrypt-hash``,
        of a name used twice, and says what to do; OSError when the file cannot be read."""
        hashes, dummy, warnings = _read(path)
        return cls(path, hashes, dummy, warnings)

    def refresh(self, every=1.0):
        """Read the file again if it changed since it was read (looked at once every ``every``
        seconds at most), so that a user added while the server runs can log in. What is wrong
        with a file that changed and no longer loads (the users then stay as they were), said
        once per change; else None."""
        with self._lock:
            now = time.monotonic()
            if now < self._look_at:
                return None
            self._look_at = now + every
        try:
            seen = _identity(self.path)
        except OSError as exc:
            seen = None
            problem = f"{self.path}: {exc.strerror or exc}"
        with self._lock:
            if seen == self._seen:
                return None
            self._seen = seen
        if seen is None:
            return f"{problem}; the users stay as they were"
        try:
            self.reload()
        except (ValueError, OSError) as exc:
            return f"{exc}; the users stay as they were"
        return None

    def reload(self):
        """Reads the file again; on an error the users stay as they were. Verified credentials stay
        cached only for the users whose hash did not change. Answers the new warnings."""
        hashes, dummy, warnings = _read(self.path)
        with self._lock:
            old = self._state[0]
            changed = {user for user in old if hashes.get(user) != old[user]}
            for key in [key for key, user in self._cache.items() if user in changed]:
                del self._cache[key]
            self._state = (hashes, dummy)
            self.warnings = warnings
        return warnings

    def check(self, authorization):
        """The user name when ``authorization`` (the Authorization header's value, str or bytes)
        is ``Basic base64(user:password)`` for a user of the file and its password; else None.

        Never raises. A wrong password costs a bcrypt check whether or not the user exists, so
        the time of a failure does not tell which names are users."""
        credentials = _basic(authorization)
        if credentials is None:
            return None
        key = hmac.digest(self._key, credentials, "sha256")
        with self._lock:
            user = self._cache.get(key)
            if user is not None:
                self._cache.move_to_end(key)
                return user
            hashes, dummy = self._state
        name, _, password = credentials.partition(b":")
        try:
            user = name.decode("utf-8")
        except UnicodeDecodeError:
            user = None
        stored = hashes.get(user)
        good = _verify(password, dummy if stored is None else stored)
        if not good or stored is None:
            return None
        with self._lock:
            # A reload during the check may have changed this user's hash: cache only what the
            # current file says.
            if self._state[0].get(user) == stored:
                self._cache[key] = user
                if len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        return user


def _basic(authorization):
    """The decoded ``user:password`` bytes of a Basic Authorization header, or None."""
    if isinstance(authorization, bytes):
        authorization = authorization.decode("latin-1")
    if not isinstance(authorization, str) or not authorization.isascii():
        return None
    match = _BASIC.match(authorization)
    if match is None:
        return None
    try:
        credentials = base64.b64decode(match[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    return credentials if b":" in credentials else None


def _identity(path):
    """What tells one version of the file from the next: add_user and editors replace it (a new
    inode), or rewrite it (a new mtime or size)."""
    found = os.stat(path)
    return found.st_ino, found.st_mtime_ns, found.st_size


def _verify(password, stored):
    try:
        return _bcrypt().checkpw(password[:_BCRYPT_MAX], stored)
    except ValueError:  # a password this bcrypt version will not take (their rules differ): it matches nothing
        return False


def _read(path):
    """The users of the file: ({name: hash bytes}, a dummy hash of the file's usual cost, warnings)."""
    bcrypt = _bcrypt()
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        raw = f.read()
    if mode & stat.S_IWOTH:
        # Whoever can write the file can make themselves a user: no setup needs that (sshd refuses such files too).
        raise ValueError(f"{path}: anyone on this host may write it and so add a user: chmod o-w {path}")
    warnings = []
    # Group-readable is the usual way to let a server's account read the file (root:www-data 0640):
    # no warning. The hashes are slow to attack but not impossible: nobody else needs them.
    if mode & stat.S_IROTH:
        warnings.append(f"{path}: anyone on this host may read the password hashes: chmod o-r {path}")
    if mode & stat.S_IWGRP:
        warnings.append(f"{path}: its group may write it and so add a user: chmod g-w {path}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    hashes = {}
    lines = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}, line {number}"
        name, colon, hashed = line.partition(":")
        if not colon:
            raise ValueError(f"{where}: not 'name:hash'; {_REMEDY}")
        _check_name(name, where)
        where += f", user {name!r}"
        if not _BCRYPT.match(hashed):
            raise ValueError(f"{where}: {_scheme(hashed)} is not accepted, only bcrypt hashes are: {_REMEDY}")
        if name in lines:
            raise ValueError(f"{where}: the user is also on line {lines[name]}: keep one of the two lines")
        lines[name] = number
        hashes[name] = hashed.encode("ascii")
    if not hashes:
        warnings.append(f"{path}: no users: every request is refused; add one with `htpasswd -B {path} USER`")
    # An unknown user's password is checked against a hash of the cost most users have, so
    # that it takes as long as a known user's.
    costs = collections.Counter(int(hashed[4:6]) for hashed in hashes.values())
    cost = costs.most_common(1)[0][0] if costs else 12
    dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))
    return hashes, dummy, warnings


def _check_name(name, where):
    # The name goes into every request as its user and into the audit log: printable and
    # without blanks, so that a log line or a status shows it as it is.
    if not name:
        raise ValueError(f"{where}: the user name is empty; write 'name:hash'")
    if not name.isprintable() or any(char.isspace() for char in name):
        raise ValueError(f"{where}: the user name {name!r} has blanks or control characters: rename the user")


def _scheme(hashed):
    for prefix, scheme in _OTHER_SCHEMES:
        if hashed.startswith(prefix):
            return f"a {scheme} hash"
    if hashed.startswith("$2"):
        return "a malformed bcrypt hash"
    return "a crypt(3) or plain-text password"


# TLS.

CERT_FILE = "restconf-cert.pem"
KEY_FILE = "restconf-key.pem"
# 825 days: the longest validity Apple's platforms accept for any TLS server certificate, so
# that a Mac's curl or Python takes it too; a pair that has expired, or will within _RENEW,
# is made again at a start (a new fingerprint, printed).
_DAYS = 825
_RENEW = 30 * 86400
_OPENSSL_TIMEOUT = 60
_DNS_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL)
_PEM_KEY = re.compile(rb"-----BEGIN ((RSA|EC|DSA) )?PRIVATE KEY-----")
_ENCRYPTED_KEY = re.compile(rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: 4,ENCRYPTED")


def server_context(cert=None, key=None, directory=None):
    """The server's TLS context (TLS 1.2 or later, no client certificates), the SHA-256
    fingerprint of its certificate as ``openssl x509 -fingerprint -sha256`` prints it
    (``AA:BB:...``), and whether the pair was generated by this call.

    With ``cert`` and ``key`` (PEM paths), those. Without, ``directory``'s own self-signed pair
    (CERT_FILE, KEY_FILE), generated there by ``openssl`` when missing, corrupt or expiring.
    ValueError for files that are not a usable PEM certificate and key; OSError for files that
    cannot be read, or an ``openssl`` that cannot run."""
    if (cert is None) != (key is None):
        raise ValueError("RESTCONF TLS: give both cert and key, or neither for a self-signed certificate")
    generated = False
    if cert is None:
        if directory is None:
            raise ValueError("RESTCONF TLS: no cert and key, and no directory for a self-signed certificate")
        cert, key, generated = _self_signed(Path(directory))
    context = _context(cert, key)
    return context, fingerprint(_leaf_der(cert)), generated


def fingerprint(der):
    """SHA-256 of a certificate's DER bytes, as ``AA:BB:...``."""
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


def _context(cert, key):
    cert_pem = _read_pem(cert, "certificate")
    key_pem = _read_pem(key, "private key")
    if not _PEM_CERT.search(cert_pem):
        raise ValueError(f"RESTCONF certificate {cert}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it")
    if _ENCRYPTED_KEY.search(key_pem):
        raise ValueError(
            f"RESTCONF private key {key}: it is encrypted, and the server starts unattended: "
            f"write it decrypted, readable by the server only (openssl pkey -in {key} -out NEWFILE; chmod 600 NEWFILE)"
        )
    if not _PEM_KEY.search(key_pem):
        raise ValueError(f"RESTCONF private key {key}: no PEM private key (-----BEGIN PRIVATE KEY-----) in it")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A TLS 1.2 client asking to renegotiate makes the server redo a handshake's work at will.
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        # The password callback: an encrypted key that slipped past the check above must fail,
        # not stop the server on a prompt at its terminal.
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ValueError(f"RESTCONF private key {key} is not the key of the certificate {cert}") from None
        raise ValueError(f"RESTCONF certificate {cert} and key {key}: cannot be loaded ({exc})") from None
    return context


def _no_password():
    raise ValueError("the private key is encrypted")


def _read_pem(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise type(exc)(exc.errno, f"RESTCONF {what} {path}: {exc.strerror}") from None


def _leaf_der(cert):
    """The DER of the file's first certificate: the server's own, before any chain."""
    with open(cert, "rb") as f:
        pem = _PEM_CERT.search(f.read())[0].decode("ascii")
    return ssl.PEM_cert_to_DER_cert(pem)


def _self_signed(directory):
    """The directory's pair, generated when missing, corrupt or expiring: (cert, key, generated).

    A corrupt pair is made again rather than refused: it is cmactor's own, nobody else
    keeps it, and the start prints the new fingerprint. A pair that cannot be read is
    refused (OSError): the server runs as another user than the one who made it, and
    writing a new pair over it would hide that."""
    cert, key = directory / CERT_FILE, directory / KEY_FILE
    if cert.exists() and key.exists():
        try:
            _context(cert, key)
        except ValueError:
            pass
        else:
            if not _expiring(cert):
                return cert, key, False
    _generate(directory, cert, key)
    return cert, key, True


def _expiring(cert):
    try:
        done = _openssl(["x509", "-in", str(cert), "-noout", "-checkend", str(_RENEW)], check=False)
    except OSError:  # no openssl to tell: the pair loads, keep it
        return False
    return done.returncode != 0


def _generate(directory, cert, key):
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    names = ["DNS:localhost", "IP:127.0.0.1", "IP:::1"]
    host = socket.gethostname()
    if _DNS_NAME.match(host) and host != "localhost":
        names.append(f"DNS:{host}")
    else:
        host = "localhost"
    # A config of its own: the system's openssl.cnf differs between distributions, and its
    # defaults (CA:TRUE, no authority key identifier) fail Python 3.13's strict verification.
    config = f"""[req]
distinguished_name = dn
x509_extensions = ext
prompt = no
[dn]
CN = {host}
O = cmactor RESTCONF
[ext]
subjectAltName = {",".join(names)}
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""
    # Made in a private directory and moved into place, key first: the key is never readable
    # by others, and an interrupted run leaves a pair that does not load, made again next time.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".generating-") as tmp:
        tmp = Path(tmp)
        (tmp / "openssl.cnf").write_text(config)
        # EC P-256: a small key, fast handshakes, and every TLS 1.2 client takes it.
        _openssl(
            ["req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
            + ["-sha256", "-days", str(_DAYS), "-config", str(tmp / "openssl.cnf")]
            + ["-keyout", str(tmp / KEY_FILE), "-out", str(tmp / CERT_FILE)]
        )
        os.chmod(tmp / KEY_FILE, 0o600)
        os.chmod(tmp / CERT_FILE, 0o644)
        os.replace(tmp / KEY_FILE, key)
        os.replace(tmp / CERT_FILE, cert)


def _openssl(args, check=True):
    fix = "install it (apt install openssl), or set cert and key in [restconf]"
    try:
        done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=_OPENSSL_TIMEOUT)
    except FileNotFoundError:
        raise FileNotFoundError(f"RESTCONF TLS: no openssl command to make a self-signed certificate: {fix}") from None
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"RESTCONF TLS: openssl {args[0]} took more than {_OPENSSL_TIMEOUT} s") from None
    if check and done.returncode != 0:
        raise OSError(f"RESTCONF TLS: openssl {args[0]} failed ({done.stderr.strip()[-500:]}): {fix}")
    return done
