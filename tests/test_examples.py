"""The examples run as documented."""

import json
import os
import subprocess
import sys

from helpers import wait_for

import cmactor
from cmactor.exos.cli import exec_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_switch_demo(tmp_path):
    config = os.path.join(ROOT, "examples", "switch", "cmactor.toml")
    with cmactor.Supervisor.from_toml(config, state_dir=str(tmp_path)) as sup:
        cur = sup.connect().cursor()
        cur.execute("getnext ports.port")
        assert cur.rowcount == 8
        cur.execute("set vlan.vlan", {"name": "v10", "tag": 10})
        cur.execute("set vlan.member", {"vlan": "v10", "port": 3})  # async: asks ports
        try:
            cur.execute("set vlan.member", {"vlan": "v10", "port": 99})
        except cmactor.DatabaseError as exc:
            assert "port '99' does not exist" in str(exc)
        else:
            raise AssertionError("a member on a missing port was accepted")
        cur.execute("getnext stats.counters")
        assert [row[0] for row in cur] == [str(n) for n in range(1, 9)]
        sup.save()
    with cmactor.Supervisor.from_toml(config, state_dir=str(tmp_path)) as sup:
        cur = sup.connect().cursor()
        cur.execute("getnext vlan.member")  # loaded from the saved config, after ports
        assert cur.fetchall() == [("v10", "3")]


def test_lanes_example():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "lanes", "run.py")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "would deadlock: beta → alpha → beta" in result.stdout
    assert "async lane:  total = 7" in result.stdout


EXOS_APPS = os.path.join(ROOT, "examples", "exos")


def test_exos_apps_import_only_what_the_platform_has():
    # The promise README.md makes: an EXOS app runs after a Python 3 port and nothing
    # else. These are written as EXOS apps are; not one line of them names cmactor.
    for name in ("vlanmgr.py", "portsum.py"):
        with open(os.path.join(EXOS_APPS, name)) as f:
            source = f.read()
        imports = [line.split()[1] for line in source.splitlines() if line.lstrip().startswith(("import ", "from "))]
        assert not [module for module in imports if module.startswith("cmactor")], name
        assert "exsh" in imports and "exos.api" in imports, name


def test_exos_apps_run_as_python_modules(tmp_path, monkeypatch):
    config = os.path.join(EXOS_APPS, "cmactor.toml")
    with cmactor.Supervisor.from_toml(config, state_dir=str(tmp_path)) as sup:
        cur = sup.connect().cursor()
        cur.execute("set vlanmgr.vlan", {"name": "v10", "tag": 10})
        for port, tagged in (("1", "no"), ("2", "yes"), ("3", "no")):
            cur.execute("set vlanmgr.member", {"vlan": "v10", "port": port, "tagged": tagged})
        cur.execute("set vlanmgr.member", {"vlan": "default", "port": "9"})
        cur.execute("setop portsum.summary", {"action": "refresh"})  # queued for its dispatcher
        wait_for(
            lambda: (
                cur.execute("getnext portsum.summary").fetchall()
                == [("default", "9", "1", "0"), ("v10", "1,2,3", "3", "1")]
            )
        )
        # A walk with a filter that is not an index column: only the tagged members.
        cur.execute("getnext vlanmgr.member", {"tagged": "yes"})
        assert cur.fetchall() == [("v10", "2", "yes")]
        # A script's page of members from v10 on: vlan starts the walk, the declared key carries it.
        monkeypatch.setenv("CMACTOR_SOCKET", sup.socket_path)
        page = json.loads(exec_cli(["debug cfgmgr show next maximum-rows 3 vlanmgr.member vlan=v10"]))
        assert [(row["vlan"], row["port"], row["status"]) for row in page["data"]] == [
            ("v10", "1", "MORE"),
            ("v10", "2", "MORE"),
            ("v10", "3", "SUCCESS"),
        ]
        cur.execute("setop portsum.watch", {"action": "delete", "name": "default"})  # watched from its args
        sup.save()
    with cmactor.Supervisor.from_toml(config, state_dir=str(tmp_path)) as sup:
        cur = sup.connect().cursor()
        cur.execute("getnext portsum.watch")  # loaded from the saved config after vlanmgr
        assert cur.fetchall() == [("v10",)]
        wait_for(lambda: cur.execute("getnext portsum.summary").fetchall() == [("v10", "1,2,3", "3", "1")])
