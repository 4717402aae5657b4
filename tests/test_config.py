"""Supervisor configuration errors name the file, the table and the key."""

import pytest
from helpers import agent
from processes import cli

import cmactor
from cmactor.errors import ConfigError
from cmsupervisor.config import AGENT_OPTIONS, SUPERVISOR_OPTIONS, load_toml

ECHO = agent("echo.py:main")


def write(tmp_path, text):
    path = tmp_path / "cmactor.toml"
    path.write_text(text)
    return path


def test_toml_entries_and_state_dir_are_relative_to_the_file(tmp_path):
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "echo.py").write_text(open(ECHO.split(":")[0]).read())
    path = write(
        tmp_path, '[supervisor]\nstate_dir = "st"\nhold_timeout = 2\n[agents.e]\nentry = "agents/echo.py:main"\n'
    )
    sup = cmactor.Supervisor.from_toml(path)
    assert sup.state_dir == str(tmp_path / "st")
    assert sup.hold_timeout == 2.0
    assert sup.modules["e"].options["entry"] == f"{tmp_path}/agents/echo.py:main"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[agents.x\n", "is not valid TOML"),
        (
            "[supervisor]\nhold_timeout = -1\n[agents.x]\nentry='m:f'\n",
            "[supervisor].hold_timeout: expected a number of seconds >= 0, got -1",
        ),
        (
            "[supervisor]\nhold_timeout = '3'\n[agents.x]\nentry='m:f'\n",
            "hold_timeout: expected a number of seconds >= 0, got '3'",
        ),
        ("[supervisor]\nlog_level = 'LOUD'\n[agents.x]\nentry='m:f'\n", "unknown log level 'LOUD'"),
        ("[supervisor]\n", "expected at least one agent"),
        ("[agents.x]\nmax_restarts = 2\n", "[agents].x: missing required key 'entry'"),
        ("[agents.x]\nentry = 'no-such name'\n", "entry 'no-such name' is not 'package.module:function'"),
        ("[agents.x]\nentry = 'pkg.mod:'\n", "entry 'pkg.mod:' is not 'package.module:function'"),
        ("[agents.x]\nentry = 'missing.py:main'\n", "missing.py does not exist"),
        ("[agents.x]\nentry = 'm:f'\nmax_restart = 1\n", "unknown key 'max_restart'; did you mean 'max_restarts'?"),
        ("[agents.x]\nentry = 'm:f'\nenv = { A = 1 }\n", "env: expected a table of string names to string values"),
        ("[agents.x]\nentry = 'm:f'\npool_size = 0\n", "pool_size: expected a whole number >= 1"),
        ("[agents.bad-name]\nentry = 'm:f'\n", "module name 'bad-name' must start with a letter"),
        ("[agent.x]\nentry = 'm:f'\n", "cmactor.toml:1: unknown table [agent]; did you mean [agents]?"),
        (
            "[supervisor]\ndirect_reads = 'yes'\n[agents.x]\nentry='m:f'\n",
            "[supervisor].direct_reads: expected true or false, got 'yes'",
        ),
    ],
)
def test_bad_toml_is_refused_with_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        cmactor.Supervisor.from_toml(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.toml"):
        cmactor.Supervisor.from_toml(tmp_path / "nope.toml")


def test_embedding_arguments_are_checked_too(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'hold'"):
        cmactor.Supervisor({"e": ECHO}, state_dir=tmp_path, hold=3)
    with pytest.raises(ConfigError, match="agents.e.max_restarts: expected a whole number >= 0, got 'x'"):
        cmactor.Supervisor({"e": {"entry": ECHO, "max_restarts": "x"}}, state_dir=tmp_path)
    with pytest.raises(ConfigError, match="expected at least one agent"):
        cmactor.Supervisor({}, state_dir=tmp_path)


FOUR_MISTAKES = """\
[supervisor]
hold_timout = 10
stop_timeout = -1

[agents.vlan]
entry = "nosuch.py:main"
pool_size = 0

[agents.ports]
entry = "ports.py:main"
max_restart = 3
"""


def test_every_error_of_a_file_is_named_at_once_with_its_line(tmp_path):
    (tmp_path / "ports.py").write_text("")
    path = write(tmp_path, FOUR_MISTAKES)
    with pytest.raises(ConfigError) as info:
        cmactor.Supervisor.from_toml(path)
    assert info.value.problems == (
        f"{path}:2: [supervisor]: unknown key 'hold_timout'; did you mean 'hold_timeout'? known keys: "
        + ", ".join(SUPERVISOR_OPTIONS),
        f"{path}:3: [supervisor].stop_timeout: expected a number of seconds >= 0, got -1",
        f"{path}:6: [agents].vlan.entry: entry file {tmp_path / 'nosuch.py'} does not exist",
        f"{path}:7: [agents].vlan.pool_size: expected a whole number >= 1, got 0",
        f"{path}:11: [agents].ports: unknown key 'max_restart'; did you mean 'max_restarts'? known keys: "
        + ", ".join(AGENT_OPTIONS),
    )
    assert str(info.value).startswith(f"{path}: 5 errors:\n  {path}:2: ")
    assert str(info.value).count("\n") == 5


def test_cmactor_check_names_every_error_and_cmactor_run_does_too(tmp_path):
    (tmp_path / "ports.py").write_text("")
    path = write(tmp_path, FOUR_MISTAKES)
    for command in (["check", path], ["run", path]):
        result = cli(*command)
        assert result.returncode == 1, result
        assert result.stderr.startswith(f"cmactor: ConfigError: {path}: 5 errors:\n"), result.stderr
        for line in (2, 3, 6, 7, 11):
            assert f"  {path}:{line}: " in result.stderr
    assert not (tmp_path / ".cmactor").exists()  # nothing was started or made


def test_cmactor_check_of_a_good_file_says_what_it_runs(tmp_path):
    (tmp_path / "a.py").write_text("")
    path = write(tmp_path, "[agents.a]\nentry = 'a.py:main'\n[agents.b]\nentry = 'pkg.mod:main'\n")
    result = cli("check", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: ok: 2 modules (a, b), state_dir {tmp_path / '.cmactor'}\n"
    missing = cli("check", tmp_path / "nosuch.toml")
    assert missing.returncode == 1 and "cannot read config file" in missing.stderr


RESTCONF = "[agents.a]\nentry = 'pkg.mod:main'\n[restconf]\n"


@pytest.mark.parametrize(
    "table, key, message",
    [
        ("tls = false\n", "listen", "[restconf]: missing required key 'listen'"),
        (
            "listen = '0.0.0.0:8080'\ntls = false\n",
            "tls",
            "[restconf].tls: false (plain HTTP) is allowed only on a loopback address, and listen is '0.0.0.0:8080'",
        ),
        ("listen = 'localhost'\n", "listen", '[restconf].listen: expected "host:port"'),
        ("listen = '127.0.0.1:8443'\ncert = 'c.pem'\n", "cert", "[restconf].cert: given without key: give both"),
        ("listen = '127.0.0.1:8443'\ntls = 'no'\n", "tls", "[restconf].tls: expected true or false"),
        ("listen = '127.0.0.1:8443'\nuser = 'a b'\n", "user", "[restconf].user: expected a name"),
        ("listen = '127.0.0.1:8443'\nmax_body = 10\n", "max_body", "at least 1024"),
        ("listen = '127.0.0.1:8443'\nport = 1\n", "port", "[restconf]: unknown key 'port'"),
    ],
)
def test_restconf_table_errors_name_the_key(tmp_path, table, key, message):
    path = write(tmp_path, RESTCONF + table)
    with pytest.raises(ConfigError) as info:
        cmactor.Supervisor.from_toml(path)
    (problem,) = [text for text in info.value.problems if message in text]
    lines = (RESTCONF + table).splitlines()
    at = next((number for number, line in enumerate(lines, 1) if line.startswith(f"{key} =")), 3)  # 3: [restconf]
    assert problem.startswith(f"{path}:{at}: "), problem


def test_restconf_options_and_cmactor_check(tmp_path):
    from cmsupervisor.config import restconf_options

    assert restconf_options(write(tmp_path, "[agents.a]\nentry = 'pkg.mod:main'\n")) is None
    for listen in ("127.0.0.1:8080", "[::1]:8080", "localhost:8080"):
        options = restconf_options(write(tmp_path, RESTCONF + f"listen = '{listen}'\ntls = false\nusers = 'u'\n"))
        assert (options["listen"], options["tls"], options["users"]) == (listen, False, str(tmp_path / "u"))
        assert options["state_dir"] == str(tmp_path / ".cmactor")
    result = cli("check", write(tmp_path, RESTCONF + "listen = '0.0.0.0:8443'\n"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("; RESTCONF on https://0.0.0.0:8443")


def test_restconf_options_read_despite_an_error_elsewhere_in_the_file(tmp_path):
    # A file being edited for a reload: a RESTCONF server that crashed still starts again.
    from cmsupervisor.config import restconf_options

    path = write(tmp_path, RESTCONF + "listen = '127.0.0.1:8080'\ntls = false\n[agents.b]\nrestarts = 'x'\n")
    with pytest.raises(ConfigError):
        load_toml(path)
    assert restconf_options(path)["listen"] == "127.0.0.1:8080"
    with pytest.raises(ConfigError, match=r"\[restconf\]\.tls: expected true or false"):
        restconf_options(write(tmp_path, RESTCONF + "listen = '127.0.0.1:8080'\ntls = 'no'\n"))
