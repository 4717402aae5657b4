"""The examples run as documented."""

import os
import subprocess
import sys

import cmactor

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
