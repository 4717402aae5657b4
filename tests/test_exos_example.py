"""examples/exos/stpauto.py, an app that imports a platform API only a switch has
(exos.api.vlan), run against the example's simulation of it (examples/exos/sim)."""

import ast
import importlib.util
import logging
import os
import sys
import threading

import pytest
from helpers import wait_for

import cmactor
from cmactor import exos
from cmactor.testing import get_row, get_rows, set_row, setop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "exos")
CONFIG = os.path.join(EXAMPLE, "cmactor.toml")
STPAUTO = os.path.join(EXAMPLE, "stpauto.py")
SIM_VLAN = os.path.join(EXAMPLE, "sim", "exos", "api", "vlan.py")

# The modules a platform app may import besides the standard library: the script
# shell's module and the platform's exos.api, with the switch's exos.api.vlan.
PLATFORM = {"exsh", "exos.api", "exos.api.cmbackend", "exos.api.exos_dbapi", "exos.api.vlan"}


def imports_of(path):
    """(modules, names): what a file imports; ``from m import n`` counts m, and m.n among names."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    modules, names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules, names


@pytest.mark.parametrize("path", [STPAUTO, SIM_VLAN], ids=["stpauto", "sim-vlan"])
def test_the_app_and_the_simulation_import_only_what_the_platform_has(path):
    # The app is written for the switch, and the simulation stands in for a switch
    # module: neither leans on cmactor, only on what an EXOS process has.
    from cmactor.exos import api

    modules, names = imports_of(path)
    others = {m for m in modules if m.split(".")[0] not in ("exos", "exsh")}
    assert not {m.split(".")[0] for m in others} - set(sys.stdlib_module_names), others
    assert {m for m in modules if m.split(".")[0] == "exos"} <= PLATFORM
    # `from exos.api import X`: X is a platform module or one of exos.api's own names.
    from_api = {name for name in names if name.startswith("exos.api.")}
    assert not {n for n in from_api - PLATFORM if not hasattr(api, n.rsplit(".", 1)[1])}, from_api
    if path == STPAUTO:
        assert {"exsh", "exos.api"} <= modules and "exos.api.vlan" in names


def bound(sup, **params):
    return [(row["vlan"], row["stpd"]) for row in get_rows(sup, "stpauto.bound", **params)]


def test_stpauto_puts_each_vlan_in_its_stpd_and_takes_it_out_when_the_vlan_is_deleted(tmp_path):
    with cmactor.Supervisor.from_toml(CONFIG, state_dir=str(tmp_path)) as sup:
        # vlanmgr's default vlan existed before stpauto subscribed: stpauto's own walk adds it.
        wait_for(lambda: bound(sup) == [("default", "s0")])
        set_row(sup, "vlanmgr.vlan", name="v10", tag="10")
        set_row(sup, "vlanmgr.vlan", name="v20", tag="20")
        # Announced by the simulated exos.api.vlan within its poll (0.5 s in the example's toml).
        wait_for(lambda: bound(sup) == [("default", "s0"), ("v10", "s0"), ("v20", "s0")])
        # getnext from vlan=v10: the rows after it, as vlanmgr walks.
        assert get_rows(sup, "stpauto.bound", vlan="v10") == [{"vlan": "v20", "stpd": "s0"}]
        assert bound(sup, stpd="s1") == []  # stpd is a filter
        setop(sup, "vlanmgr.vlan", action="delete", name="v10")
        wait_for(lambda: bound(sup) == [("default", "s0"), ("v20", "s0")])
        with pytest.raises(cmactor.DatabaseError, match="vlan 'v10' is in no spanning-tree domain"):
            get_row(sup, "stpauto.bound", vlan="v10")
        # The callbacks got the switch's keyword arguments, the tag as a number (stpauto logs them).
        log = tmp_path / "logs" / "stpauto.log"
        wait_for(lambda: "vlan_delete () {'vlan_name': 'v10', 'vlan_id': 10}" in log.read_text())
        assert "vlan_create () {'vlan_name': 'v20', 'vlan_id': 20}" in log.read_text()
        status = sup.status()["stpauto"]
        assert status["state"] == "READY" and status["restarts"] == 0


def test_without_the_exos_path_stpauto_fails_to_start_naming_exos_api_vlan(supervisor, tmp_path):
    agents = {
        "vlanmgr": os.path.join(EXAMPLE, "vlanmgr.py"),
        "stpauto": {"entry": STPAUTO, "args": ["--stpd", "s0"]},
    }
    sup = supervisor(agents, state_dir=tmp_path / "s", start=False)
    sup.start(strict=False)  # vlanmgr comes up; stpauto is left FAILED with its reason
    status = sup.status()
    assert status["vlanmgr"]["state"] == "READY"
    assert status["stpauto"]["state"] == "FAILED"
    assert "exos.api.vlan is an EXOS platform API that cmactor does not provide" in status["stpauto"]["error"]
    log = (tmp_path / "s" / "logs" / "stpauto.log").read_text()
    assert "exos.api.vlan is an EXOS platform API" in log


# -- the simulation itself, in this process, its vlanmgr walk replaced by a script --------


@pytest.fixture
def sim_vlan(monkeypatch):
    """A fresh copy of the simulated exos.api.vlan whose walks return ``reads`` in turn."""
    before = list(sys.meta_path)
    exos.install()  # its `from exos.api import exos_dbapi`, as in a worker
    spec = importlib.util.spec_from_file_location("sim_exos_api_vlan", SIM_VLAN)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        reads = []
        walked = threading.Event()

        def read():
            walked.set()
            step = reads.pop(0) if len(reads) > 1 else reads[0]
            if isinstance(step, Exception):
                raise step
            return dict(step)

        module._read = read
        module.poll = 0.01
        module.reads, module.walked = reads, walked
        yield module
    finally:
        poller, module._poller = module._poller, None  # stops it at its next poll
        if poller is not None:
            poller.join(5)
        sys.meta_path[:] = before
        for name in [n for n in sys.modules if n == "exos" or n.startswith("exos.")]:
            del sys.modules[name]


def test_the_simulation_announces_changes_after_the_baseline_and_survives_failures(sim_vlan, caplog):
    unavailable = cmactor.ModuleUnavailable("module vlanmgr is restarting", "vlanmgr")
    sim_vlan.reads[:] = [
        {"default": "1", "v5": "5"},  # the baseline, read by add_observer: not announced
        {"default": "1", "v5": "5", "v10": "10"},
        unavailable,  # a failed walk announces nothing, deletions least of all
        {"default": "1", "v10": "10"},
    ]
    events = []
    done = threading.Event()

    def created(**kwargs):
        events.append(("create", kwargs))

    def deleted(**kwargs):
        events.append(("delete", kwargs))
        done.set()

    def broken(**kwargs):
        raise RuntimeError("observer bug")

    sim_vlan.notify.vlan_create.add_observer(broken)  # logged; the others are still called
    sim_vlan.notify.vlan_create.add_observer(created)
    sim_vlan.notify.vlan_create.add_observer(created)  # once is enough
    sim_vlan.notify.vlan_delete.add_observer(deleted)
    with caplog.at_level(logging.INFO, logger="exos.api.vlan"):
        assert done.wait(5)
    assert events == [
        ("create", {"vlan_name": "v10", "vlan_id": 10}),
        ("delete", {"vlan_name": "v5", "vlan_id": 5}),
    ]
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("vlan_create observer") for m in messages) and "RuntimeError: observer bug" in caplog.text
    assert any("vlan notifications paused" in m for m in messages)
    assert any("vlan notifications resumed" in m for m in messages)

    sim_vlan.notify.vlan_create.remove_observer(created)
    sim_vlan.notify.vlan_create.remove_observer(created)  # not there any more: ignored
    with pytest.raises(AttributeError, match="vlan_port_create is not simulated"):
        sim_vlan.notify.vlan_port_create.add_observer(created)
