"""Tests of the switch demo's agents, as their author writes them with cmactor's pytest plugin.

Run from the repository: python -m pytest examples/switch/test_switch_agents.py
"""

import pytest

import cmactor
from cmactor.testing import get_row, get_rows, kill_worker, set_row, setop


@pytest.fixture
def switch(cmactor_supervisor):
    # Relative to this file; the plugin gives each test its own state_dir and socket.
    return cmactor_supervisor("cmactor.toml")


def test_ports_start_with_defaults(switch):
    ports = get_rows(switch, "ports.port")
    assert [port["name"] for port in ports] == [str(n) for n in range(1, 9)]
    assert get_row(switch, "ports.port", name=3) == {"name": "3", "enabled": "1", "speed": "1000", "description": ""}


def test_a_port_refuses_a_speed_it_does_not_have(switch):
    with pytest.raises(cmactor.DatabaseError, match="speed must be one of 10, 100, 1000, 10000"):
        set_row(switch, "ports.port", name=1, speed=25)
    assert set_row(switch, "ports.port", name=1, speed=100)["speed"] == "100"


def test_setop_disables_every_port(switch):
    assert setop(switch, "ports.port", action="disable_all") == {"changed": "8"}
    assert {port["enabled"] for port in get_rows(switch, "ports.port")} == {"0"}


def test_vlan_members_must_be_ports(switch):
    assert set_row(switch, "vlan.vlan", name="v10", tag=10) == {"name": "v10", "tag": "10"}
    set_row(switch, "vlan.member", vlan="v10", port=3)  # an async action: it asks the ports module
    with pytest.raises(cmactor.DatabaseError, match="port '99' does not exist"):
        set_row(switch, "vlan.member", vlan="v10", port=99)
    assert get_rows(switch, "vlan.member") == [{"vlan": "v10", "port": "3"}]


def test_setop_deletes_a_vlan_member(switch):
    set_row(switch, "vlan.vlan", name="v10", tag=10)
    set_row(switch, "vlan.member", vlan="v10", port=3)
    set_row(switch, "vlan.member", vlan="v10", port=4)
    assert setop(switch, "vlan.member", action="delete", vlan="v10", port=3) == {"vlan": "v10", "port": "3"}
    assert get_rows(switch, "vlan.member") == [{"vlan": "v10", "port": "4"}]
    with pytest.raises(cmactor.DatabaseError, match="port '3' is not a member of vlan 'v10'"):
        setop(switch, "vlan.member", action="delete", vlan="v10", port=3)
    with pytest.raises(cmactor.DatabaseError, match="the only action is action=delete"):
        setop(switch, "vlan.member", action="flush", vlan="v10", port=4)


def test_vlan_keeps_its_config_when_its_worker_is_killed(switch):
    set_row(switch, "vlan.vlan", name="v10", tag=10)
    old = switch.status()["vlan"]["pid"]
    assert kill_worker(switch, "vlan") != old
    assert get_row(switch, "vlan.vlan", name="v10") == {"name": "v10", "tag": "10"}
    assert switch.status()["vlan"]["restarts"] == 1


def test_saved_config_loads_on_the_next_start(cmactor_supervisor):
    first = cmactor_supervisor("cmactor.toml")
    set_row(first, "vlan.vlan", name="v20", tag=20)
    set_row(first, "vlan.member", vlan="v20", port=5)
    first.save()
    first.stop()
    second = cmactor_supervisor("cmactor.toml", state_dir=first.state_dir)
    assert get_rows(second, "vlan.member") == [{"vlan": "v20", "port": "5"}]
    assert second.status()["vlan"]["unsaved"] is False


def test_counters_need_no_config(cmactor_supervisor):
    # One agent on its own, from a dict of entries (relative to this file).
    stats = cmactor_supervisor({"stats": "stats.py:main"})
    counters = get_rows(stats, "stats.counters")
    assert [row["port"] for row in counters] == [str(n) for n in range(1, 9)]
    with pytest.raises(cmactor.ProgrammingError, match="counters"):
        set_row(stats, "stats.counters", port=1, rx_packets=0)
