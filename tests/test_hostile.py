"""Hostile clients and users: what they send, how fast, how much, and where the socket lives.

Each bound a client could push past has a test here: the fields of a request, the
requests in flight, the replies it leaves unread, the frames it leaves unfinished,
the file descriptors it takes, and the directory another user could reach into.
"""

import os
import stat

import pytest
from conftest import agent

from cmactor.errors import StartupError

ECHO = agent("echo.py:main")
NOBODY = 65534

def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# -- the socket's directory ------------------------------------------------------


def test_a_socket_directory_others_can_write_is_refused_and_left_as_it_is(supervisor, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    sup = supervisor({"echo": ECHO}, start=False, socket=str(shared / "cm.sock"))
    with pytest.raises(StartupError) as caught:
        sup.start()
    message = str(caught.value)
    assert f"the socket's directory {shared} can be written by others (mode 1777)" in message
    assert "another user could replace the socket" in message and "state_dir/run" in message
    assert mode(shared) == 0o1777


def test_a_socket_directory_owned_by_another_user_is_refused(supervisor, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    sup = supervisor({"echo": ECHO}, start=False, socket=str(theirs / "cm.sock"))
    with pytest.raises(StartupError, match=f"{theirs} belongs to uid {NOBODY}, who could replace the socket"):
        sup.start()


def test_a_file_that_is_not_a_socket_is_never_removed(supervisor, tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    precious = run / "cm.sock"
    precious.write_text("not a socket")
    sup = supervisor({"echo": ECHO}, start=False, socket=str(precious))
    with pytest.raises(StartupError, match=f"{precious} exists and is not a socket; cmactor removes only a socket"):
        sup.start()
    assert precious.read_text() == "not a socket"


def test_an_existing_socket_directory_keeps_its_mode(supervisor, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o750)
    sup = supervisor({"echo": ECHO}, socket=str(run / "cm.sock"))
    assert mode(run) == 0o750
    cur = sup.connect().cursor()
    cur.execute("get echo.kv", {"key": "default"})
    assert cur.fetchone() == ("default", "yes")
