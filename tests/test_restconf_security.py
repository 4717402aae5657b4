"""The RESTCONF server's security (issue 27, item 6), with real files, the real openssl
command and real TLS handshakes: the users of an htpasswd file of bcrypt hashes and
HTTP Basic checks against them (the cache of verified credentials included), and the
TLS context, from the operator's pair or a self-signed one generated once."""

import base64
import hashlib
import shutil
import socket
import ssl
import subprocess
import sys
import threading

import bcrypt
import pytest
from hypothesis import given, settings, strategies as st

from cmsupervisor.restconf import security
from cmsupervisor.restconf.security import CERT_FILE, KEY_FILE, Users, hash_password, server_context

# bcrypt's lowest cost: a check takes about a millisecond.
ROUNDS = 4
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


def basic(user, password):
    raw = user.encode() if isinstance(user, str) else user
    raw += b":" + (password.encode() if isinstance(password, str) else password)
    return "Basic " + base64.b64encode(raw).decode()


def htpasswd(tmp_path, text, mode=0o600):
    path = tmp_path / "users"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def alice_bob(tmp_path):
    """A file of two users: alice's hash from hash_password ($2y$, as htpasswd -B), bob's from bcrypt ($2b$)."""
    bob = bcrypt.hashpw(b"bob-pw", bcrypt.gensalt(ROUNDS)).decode()
    text = f"# RESTCONF users\n\nalice:{hash_password('alice-pw', rounds=ROUNDS)}\n  \nbob:{bob}\n"
    return htpasswd(tmp_path, text)


@pytest.fixture
def checkpw_calls(monkeypatch):
    """The hashes bcrypt.checkpw was called with, in order."""
    calls = []
    real = bcrypt.checkpw

    def counting(password, hashed):
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return calls


# Users.


def test_users_of_a_good_file(alice_bob):
    users = Users.load(alice_bob)
    assert users.warnings == []
    assert alice_bob.read_text().splitlines()[2].startswith("alice:$2y$04$")
    assert users.check(basic("alice", "alice-pw")) == "alice"
    assert users.check(basic("bob", "bob-pw")) == "bob"
    assert users.check(basic("alice", "bob-pw")) is None
    assert users.check(basic("carol", "alice-pw")) is None
    # The scheme is case-insensitive (RFC 7235), and a server may hand the header over as bytes.
    assert users.check("basic " + basic("bob", "bob-pw")[6:]) == "bob"
    assert users.check(basic("bob", "bob-pw").encode()) == "bob"


def test_hash_password():
    hashed = hash_password("pw", rounds=ROUNDS)
    assert hashed.startswith("$2y$04$") and len(hashed) == 60
    assert bcrypt.checkpw(b"pw", hashed.encode())
    assert bcrypt.checkpw("né".encode(), hash_password("né", rounds=ROUNDS).encode())
    with pytest.raises(ValueError, match="at most 72 bytes"):
        hash_password("x" * 73, rounds=ROUNDS)


def test_a_password_is_cut_at_72_bytes_as_htpasswd_cuts_it(tmp_path):
    # htpasswd -B hashes the first 72 bytes of a longer password, as every bcrypt does.
    long = b"p" * 80
    path = htpasswd(tmp_path, f"dave:{bcrypt.hashpw(long[:72], bcrypt.gensalt(ROUNDS)).decode()}\n")
    assert Users.load(path).check(basic("dave", long)) == "dave"


@pytest.mark.parametrize(
    "hashed, scheme",
    [
        ("$apr1$Hg3ftT0S$pqGfsSw5yfgvVYvfqWbBd/", "Apache MD5"),
        ("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
        ("$1$saltsalt$qjXMvbEw8oaL.CzflDugX/", "MD5-crypt"),
        ("$5$saltsalt$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZF4ZGPh4A", "SHA-256-crypt"),
        (
            "$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/",
            "SHA-512",
        ),
        ("$2x$04$" + "." * 53, "$2x$"),
        ("$2b$04$tooshort", "malformed bcrypt"),
        ("$2b$03$" + "." * 53, "malformed bcrypt"),
        ("$2b$04$" + "A" * 53, "malformed bcrypt"),  # a salt bcrypt refuses at every check
        ("abJnggxhB/yWI", "crypt(3) or plain-text"),
        ("secret", "crypt(3) or plain-text"),
    ],
)
def test_a_hash_that_is_not_bcrypt_is_refused(tmp_path, hashed, scheme):
    path = htpasswd(tmp_path, f"alice:{hash_password('pw', rounds=ROUNDS)}\n# a comment\ncarol:{hashed}\n")
    with pytest.raises(ValueError) as refused:
        Users.load(path)
    message = str(refused.value)
    assert f"{path}, line 3, user 'carol'" in message
    assert scheme in message and "htpasswd -B" in message


@pytest.mark.parametrize(
    "line, problem",
    [
        ("carol", "not 'name:hash'"),
        (":$2b$04$" + "." * 53, "user name is empty"),
        ("car ol:$2b$04$" + "." * 53, "blanks or control characters"),
        ("car\x7fol:$2b$04$" + "." * 53, "blanks or control characters"),
    ],
)
def test_a_line_that_is_not_name_and_hash_is_refused(tmp_path, line, problem):
    path = htpasswd(tmp_path, f"\n{line}\n")
    with pytest.raises(ValueError, match=problem) as refused:
        Users.load(path)
    assert f"{path}, line 2" in str(refused.value)


def test_a_user_named_twice_is_refused_naming_both_lines(tmp_path):
    hashed = hash_password("pw", rounds=ROUNDS)
    path = htpasswd(tmp_path, f"alice:{hashed}\nbob:{hashed}\nalice:{hashed}\n")
    with pytest.raises(ValueError, match=r"line 3, user 'alice': the user is also on line 1"):
        Users.load(path)


def test_file_that_is_not_utf8_or_missing(tmp_path):
    path = tmp_path / "users"
    path.write_bytes(b"al\xffice:x\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        Users.load(path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Users.load(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "mode, warned",
    [
        (0o600, []),
        (0o640, []),  # the usual way to let the server's group read it
        (0o644, ["chmod o-r"]),
        (0o660, ["chmod g-w"]),
    ],
)
def test_file_modes_warned(alice_bob, mode, warned):
    alice_bob.chmod(mode)
    users = Users.load(alice_bob)
    assert [fix for fix in ("chmod o-r", "chmod g-w") if any(fix in warning for warning in users.warnings)] == warned
    assert users.check(basic("alice", "alice-pw")) == "alice"


def test_a_file_anyone_may_write_is_refused(alice_bob):
    alice_bob.chmod(0o602)
    with pytest.raises(ValueError, match="chmod o-w"):
        Users.load(alice_bob)


def test_a_file_without_users_is_warned(tmp_path):
    users = Users.load(htpasswd(tmp_path, "# nobody yet\n"))
    assert len(users.warnings) == 1 and "no users" in users.warnings[0]
    assert users.check(basic("alice", "pw")) is None


def test_without_bcrypt_load_says_what_to_install(alice_bob, monkeypatch):
    monkeypatch.setitem(sys.modules, "bcrypt", None)
    with pytest.raises(ImportError, match=r"pip install 'cmactor\[restconf\]'"):
        Users.load(alice_bob)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Basic",
        "Basic ",
        "Bearer " + base64.b64encode(b"alice:alice-pw").decode(),
        "Basic !!!!",
        "Basic YWxpY2U6YWxpY2UtcHc",  # the padding cut
        "Basic " + base64.b64encode(b"alice").decode(),  # no ':'
        "Basic " + base64.b64encode(b"\xffalice:alice-pw").decode(),  # a name that is not UTF-8
        "Basic " + base64.b64encode(b":alice-pw").decode(),
        "Basic " + base64.b64encode(b"alice:alice-pw").decode() + " extra",
        "Basic " + base64.b64encode(b"alice:alice-pw\x00").decode(),
        "Basic " + base64.b64encode(b"alice:alice-pw").decode().replace("=", "") + "é",
        b"\xff\xfe",
        12,
        ["Basic", "x"],
    ],
)
def test_malformed_headers_are_refused(alice_bob, header):
    assert Users.load(alice_bob).check(header) is None


@pytest.fixture(scope="module")
def hostile_users(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "users"
    path.write_text(f"alice:{hash_password('alice-pw', rounds=ROUNDS)}\n")
    path.chmod(0o600)
    return Users.load(path)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.binary(),
        st.binary().map(lambda raw: "Basic " + base64.b64encode(raw).decode()),
        st.text().map(lambda password: basic("alice", password)),
        st.binary(max_size=100).map(lambda password: basic("alice", password)),
        st.text().map(lambda text: "Basic " + text),
    )
)
def test_hostile_headers_never_raise_nor_pass(hostile_users, header):
    assert hostile_users.check(header) is None


def test_verified_credentials_are_cached(alice_bob, checkpw_calls):
    users = Users.load(alice_bob)
    for _ in range(3):
        assert users.check(basic("alice", "alice-pw")) == "alice"
    assert len(checkpw_calls) == 1
    # Another header for the same credentials ("basic", bytes) is the same cache entry.
    assert users.check("basic  " + basic("alice", "alice-pw")[6:]) == "alice"
    assert users.check(basic("alice", "alice-pw").encode()) == "alice"
    assert len(checkpw_calls) == 1


def test_a_wrong_password_is_never_cached(alice_bob, checkpw_calls):
    users = Users.load(alice_bob)
    for _ in range(3):
        assert users.check(basic("alice", "wrong")) is None
    assert len(checkpw_calls) == 3
    assert users.check(basic("alice", "alice-pw")) == "alice"


def test_an_unknown_user_costs_a_check_of_the_usual_cost(tmp_path, checkpw_calls):
    path = htpasswd(tmp_path, "".join(f"u{n}:{hash_password('pw', rounds=5)}\n" for n in range(2)))
    path.write_text(path.read_text() + f"u2:{hash_password('pw', rounds=ROUNDS)}\n")
    users = Users.load(path)
    assert users.check(basic("nobody", "pw")) is None
    assert users.check(basic("nobody", "pw")) is None
    # Checked each time against a hash of the cost most users have, as a known user's password is.
    assert len(checkpw_calls) == 2 and all(hashed.startswith(b"$2b$05$") for hashed in checkpw_calls)


def test_the_cache_is_bounded(tmp_path, checkpw_calls, monkeypatch):
    monkeypatch.setattr(security, "_CACHE_SIZE", 2)
    path = htpasswd(tmp_path, "".join(f"u{n}:{hash_password(f'pw{n}', rounds=ROUNDS)}\n" for n in range(3)))
    users = Users.load(path)
    for n in (0, 1, 2):
        assert users.check(basic(f"u{n}", f"pw{n}")) == f"u{n}"
    assert users.check(basic("u2", "pw2")) == "u2"
    assert len(checkpw_calls) == 3
    assert users.check(basic("u0", "pw0")) == "u0"  # the least recently used, dropped
    assert len(checkpw_calls) == 4


def test_reload_forgets_the_users_whose_hash_changed(alice_bob, checkpw_calls):
    users = Users.load(alice_bob)
    assert users.check(basic("alice", "alice-pw")) == "alice"
    assert users.check(basic("bob", "bob-pw")) == "bob"
    alice_line = alice_bob.read_text().splitlines()[2]
    alice_bob.write_text(f"{alice_line}\nbob:{hash_password('new-pw', rounds=ROUNDS)}\n")
    assert users.reload() == []
    del checkpw_calls[:]
    assert users.check(basic("alice", "alice-pw")) == "alice"
    assert checkpw_calls == []  # alice's line did not change: still cached
    assert users.check(basic("bob", "bob-pw")) is None
    assert users.check(basic("bob", "new-pw")) == "bob"
    alice_bob.write_text("")
    users.reload()
    assert users.check(basic("alice", "alice-pw")) is None


def test_a_reload_that_fails_keeps_the_users(alice_bob):
    users = Users.load(alice_bob)
    alice_bob.write_text("alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    with pytest.raises(ValueError, match="SHA-1"):
        users.reload()
    assert users.check(basic("alice", "alice-pw")) == "alice"


def test_a_check_during_a_reload_is_not_cached_for_the_old_hash(alice_bob, monkeypatch):
    users = Users.load(alice_bob)
    real = bcrypt.checkpw
    calls = []

    def reloading(password, hashed):
        # The file changes, and is reloaded, while alice's old password is being checked.
        if not calls:
            alice_bob.write_text(f"alice:{hash_password('new-pw', rounds=ROUNDS)}\n")
            users.reload()
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", reloading)
    assert users.check(basic("alice", "alice-pw")) == "alice"  # good when the check began
    assert users.check(basic("alice", "alice-pw")) is None
    assert users.check(basic("alice", "new-pw")) == "alice"


def test_checks_from_threads(alice_bob):
    users = Users.load(alice_bob)
    answers = []

    def client(n):
        for _ in range(20):
            answers.append(users.check(basic("alice", "alice-pw" if n % 2 else "wrong")))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (answers.count("alice"), answers.count(None)) == (80, 80)


# TLS.


def openssl(*args):
    return subprocess.run([OPENSSL, *args], check=True, capture_output=True, text=True, timeout=60).stdout


def openssl_fingerprint(cert):
    """What openssl prints: "sha256 Fingerprint=AA:BB:..." (OpenSSL 3), "SHA256 Fingerprint=..." (1.1)."""
    return openssl("x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256").strip().split("=", 1)[1]


def make_pair(directory, name, days=30, cn="localhost"):
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    openssl(
        "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", str(days), "-subj", f"/CN={cn}", "-addext", f"subjectAltName=DNS:{cn},IP:127.0.0.1",
        "-keyout", str(key), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def serve_once(context):
    """A TLS server on 127.0.0.1 answering one HTTP request with "ok": (port, thread)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve():
        with listener:
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                return
            raw.settimeout(10)
            try:
                with context.wrap_socket(raw, server_side=True) as tls:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        chunk = tls.recv(4096)
                        if not chunk:
                            return
                        request += chunk
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            except (ssl.SSLError, OSError):  # a client that refuses the certificate
                raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def handshake(context, cafile, server_hostname="localhost"):
    """The server certificate's SHA-256 as seen by a verifying client (Python 3.13's strict checks)."""
    port, thread = serve_once(context)
    client = ssl.create_default_context(cafile=str(cafile))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client.wrap_socket(raw, server_hostname=server_hostname) as tls:
            der = tls.getpeercert(binary_form=True)
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
    thread.join(10)
    assert answer.endswith(b"\r\n\r\nok")
    return security.fingerprint(der)


@needs_openssl
def test_a_self_signed_pair_is_generated_once(tmp_path):
    directory = tmp_path / "state" / "restconf"
    context, fingerprint, generated = server_context(directory=directory)
    assert generated
    assert (directory.stat().st_mode & 0o777) == 0o700
    assert ((directory / KEY_FILE).stat().st_mode & 0o777) == 0o600
    assert sorted(path.name for path in directory.iterdir()) == [CERT_FILE, KEY_FILE]
    assert fingerprint == openssl_fingerprint(directory / CERT_FILE)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    again, same, generated = server_context(directory=directory)
    assert (same, generated) == (fingerprint, False)
    text = openssl("x509", "-in", str(directory / CERT_FILE), "-noout", "-text")
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text and "IP Address:0:0:0:0:0:0:0:1" in text
    assert "prime256v1" in text


@needs_openssl
def test_a_real_handshake_with_the_generated_certificate(tmp_path):
    context, fingerprint, _ = server_context(directory=tmp_path)
    cert = tmp_path / CERT_FILE
    assert handshake(context, cert) == fingerprint
    assert handshake(context, cert, server_hostname="127.0.0.1") == fingerprint
    port, thread = serve_once(context)
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(cert), f"https://localhost:{port}/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    thread.join(10)
    assert (done.returncode, done.stdout) == (0, "ok"), done.stderr


@needs_openssl
def test_a_client_without_the_certificate_is_refused(tmp_path):
    context, _, _ = server_context(directory=tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(context, make_pair(tmp_path, "other")[0])


@needs_openssl
@pytest.mark.parametrize("damage", ["garbage cert", "garbage key", "no key", "other key", "expiring"])
def test_a_corrupt_or_expiring_pair_is_made_again(tmp_path, damage):
    _, fingerprint, _ = server_context(directory=tmp_path)
    cert, key = tmp_path / CERT_FILE, tmp_path / KEY_FILE
    if damage == "garbage cert":
        cert.write_text("garbage")
    elif damage == "garbage key":
        key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    elif damage == "no key":
        key.unlink()
    elif damage == "other key":
        key.write_bytes(make_pair(tmp_path, "other")[1].read_bytes())
    else:
        made, made_key = make_pair(tmp_path, "short", days=2)
        made.replace(cert)
        made_key.replace(key)
    context, new, generated = server_context(directory=tmp_path)
    assert generated and new != fingerprint
    assert handshake(context, cert) == new


@needs_openssl
def test_without_openssl_generation_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"install it .*or set cert and key"):
        server_context(directory=tmp_path / "restconf")


@needs_openssl
def test_the_operators_pair_is_used(tmp_path):
    cert, key = make_pair(tmp_path, "mine")
    directory = tmp_path / "restconf"
    context, fingerprint, generated = server_context(cert, key, directory)
    assert not generated and not directory.exists()
    assert fingerprint == openssl_fingerprint(cert)
    assert handshake(context, cert) == fingerprint


@needs_openssl
def test_a_chain_is_fingerprinted_by_its_first_certificate(tmp_path):
    cert, key = make_pair(tmp_path, "leaf")
    chain = tmp_path / "chain.pem"
    chain.write_bytes(cert.read_bytes() + make_pair(tmp_path, "ca", cn="ca")[0].read_bytes())
    assert server_context(chain, key)[1] == openssl_fingerprint(cert)


@needs_openssl
def test_bad_operator_files_are_named(tmp_path):
    cert, key = make_pair(tmp_path, "mine")
    _, other_key = make_pair(tmp_path, "other")
    with pytest.raises(ValueError, match=f"{other_key} is not the key of the certificate {cert}"):
        server_context(cert, other_key)
    with pytest.raises(FileNotFoundError, match=f"certificate {tmp_path}/nowhere.pem: No such file"):
        server_context(tmp_path / "nowhere.pem", key)
    with pytest.raises(FileNotFoundError, match=f"private key {tmp_path}/nowhere.pem: No such file"):
        server_context(cert, tmp_path / "nowhere.pem")
    der = tmp_path / "cert.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(cert.read_text()))
    with pytest.raises(ValueError, match=f"certificate {der}: no PEM certificate"):
        server_context(der, key)
    with pytest.raises(ValueError, match=f"private key {cert}: no PEM private key"):
        server_context(cert, cert)
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match=f"certificate {broken} and key {key}: cannot be loaded"):
        server_context(broken, key)
    with pytest.raises(ValueError, match="give both cert and key"):
        server_context(cert, None, tmp_path)


@needs_openssl
def test_an_encrypted_key_is_refused_without_a_prompt(tmp_path):
    cert, key = make_pair(tmp_path, "mine")
    encrypted = tmp_path / "encrypted.pem"
    openssl("pkey", "-in", str(key), "-aes256", "-passout", "pass:secret", "-out", str(encrypted))
    with pytest.raises(ValueError, match="encrypted"):
        server_context(cert, encrypted)


def test_fingerprint_format():
    der = b"any bytes"
    expected = hashlib.sha256(der).hexdigest().upper()
    assert security.fingerprint(der).replace(":", "") == expected
    assert len(security.fingerprint(der)) == 32 * 3 - 1


# -- adding users ----------------------------------------------------------------------


def test_add_user_makes_the_file_then_replaces_a_line_in_place(tmp_path):
    path = tmp_path / "users"
    assert security.add_user(path, "alice", "one", rounds=ROUNDS) is True
    assert oct(path.stat().st_mode & 0o777) == "0o600"  # a new file: owner-only
    path.chmod(0o640)
    with open(path, "a") as f:
        f.write("# the operators\n")
    assert security.add_user(path, "bob", "two", rounds=ROUNDS) is True
    assert security.add_user(path, "alice", "three", rounds=ROUNDS) is False
    lines = path.read_text().splitlines()
    assert [line.partition(":")[0] for line in lines] == ["alice", "# the operators", "bob"]
    assert oct(path.stat().st_mode & 0o777) == "0o640"  # an existing file keeps its mode
    users = Users.load(path)
    assert users.check(basic("alice", "three")) == "alice" and users.check(basic("alice", "one")) is None
    assert users.check(basic("bob", "two")) == "bob"


@pytest.mark.parametrize("name", ["", "a b", "tab\there", "colon:name"])
def test_add_user_refuses_a_name_a_line_cannot_hold(tmp_path, name):
    with pytest.raises(ValueError, match="user name"):
        security.add_user(tmp_path / "users", name, "pw", rounds=ROUNDS)
    assert not (tmp_path / "users").exists()


def test_add_user_leaves_a_file_with_a_refused_line_alone(tmp_path):
    path = htpasswd(tmp_path, "carol:$apr1$abc$def\n")
    with pytest.raises(ValueError, match=r"line 1, user 'carol'"):
        security.add_user(path, "alice", "pw", rounds=ROUNDS)
    assert path.read_text() == "carol:$apr1$abc$def\n"


def test_the_cli_adds_a_user_from_stdin_to_the_configs_users_file(tmp_path):
    config = tmp_path / "cmactor.toml"
    config.write_text('[restconf]\nlisten = "127.0.0.1:0"\ntls = false\nusers = "users"\n[agents.x]\nentry = "m:f"\n')
    done = subprocess.run(
        [sys.executable, "-m", "cmsupervisor", "restconf", "--add-user", "alice", "-c", str(config)],
        input="s3cret\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert f"user alice added to {tmp_path / 'users'}" in done.stdout
    assert Users.load(tmp_path / "users").check(basic("alice", "s3cret")) == "alice"
    empty = subprocess.run(
        [sys.executable, "-m", "cmsupervisor", "restconf", "--add-user", "bob", "-c", str(config)],
        input="\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert empty.returncode != 0 and "an empty password; nothing was changed" in empty.stderr
    config.write_text('[restconf]\nlisten = "127.0.0.1:0"\ntls = false\n[agents.x]\nentry = "m:f"\n')
    none = subprocess.run(
        [sys.executable, "-m", "cmsupervisor", "restconf", "--add-user", "bob", "-c", str(config)],
        input="pw\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert none.returncode != 0 and '[restconf] has no users = "PATH"' in none.stderr


def test_refresh_reads_the_file_again_once_it_changed_and_keeps_the_users_if_it_breaks(tmp_path):
    path = tmp_path / "users"
    security.add_user(path, "alice", "one", rounds=ROUNDS)
    users = Users.load(path)
    assert users.refresh(every=0) is None  # unchanged: not read again
    assert users.check(basic("bob", "two")) is None
    security.add_user(path, "bob", "two", rounds=ROUNDS)
    assert users.refresh(every=60) is None and users.check(basic("bob", "two")) == "bob"
    security.add_user(path, "carol", "three", rounds=ROUNDS)
    assert users.refresh(every=60) is None  # looked at a moment ago: not again yet
    assert users.check(basic("carol", "three")) is None
    users = Users.load(path)
    with open(path, "a") as f:
        f.write("dave:{SHA}abc\n")
    problem = users.refresh(every=0)
    assert "line 4, user 'dave'" in problem and problem.endswith("the users stay as they were")
    assert users.refresh(every=0) is None  # said once per change
    assert users.check(basic("alice", "one")) == "alice"
    path.unlink()
    assert "the users stay as they were" in users.refresh(every=0)
    assert users.check(basic("carol", "three")) == "carol"
