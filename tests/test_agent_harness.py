"""The README's agent, as written there: unit-tested in-process through the harness, and run
by a real supervisor through a save, a worker restart and a supervisor restart."""

import importlib.util
import os
import re

import pytest

import cmactor
from cmactor import cmbackend
from cmactor.harness import AgentHarness
from cmactor.testing import get_row, get_rows, kill_worker, set_row

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PORTS = "from cmactor import ready\n\ndef main():\n    ready()\n"


def readme_agent(tmp_path):
    """The first Python block of README's "Writing an agent", as a file; its path."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## Writing an agent") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    path = tmp_path / "vlan.py"
    path.write_text(code)
    return path


def module_of(path):
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_agent_unit_tested_through_the_harness(tmp_path, cmactor_agent):
    vlan = module_of(readme_agent(tmp_path))
    agent = cmactor_agent.start(vlan.main)
    assert cmactor_agent.persistent_list == ["vlan"] and cmactor_agent.config_deps == ["ports"]
    assert not cmactor_agent.ready_called
    cmactor_agent.generate_default()
    assert cmactor_agent.ready_called  # recorded, where a test process without a harness refuses ready()
    assert cmactor_agent.set("vlan", name="v10", tag=10) == {}
    with pytest.raises(cmactor.DatabaseError, match="tag must be a number"):
        cmactor_agent.set("vlan", name="v11", tag="x")
    assert cmactor_agent.get("vlan", name="v10") == {"name": "v10", "tag": "10"}
    with pytest.raises(cmactor.DatabaseError, match="no vlan 'v99'"):
        cmactor_agent.get("vlan", name="v99")
    assert cmactor_agent.walk("vlan") == [{"name": "default", "tag": "1"}, {"name": "v10", "tag": "10"}]
    assert cmactor_agent.walk("vlan", name="default") == [{"name": "v10", "tag": "10"}]
    saved = cmactor_agent.save()
    assert saved == {"vlan": [{"name": "default", "tag": "1"}, {"name": "v10", "tag": "10"}]}
    assert agent.vlans == {"default": "1", "v10": "10"}
    with AgentHarness() as second:  # a second life, from what was saved
        second.start(vlan.main)
        second.load(saved)
        assert second.ready_called and second.walk("vlan") == saved["vlan"]
    assert cmbackend._runtime is cmactor_agent  # the inner harness put the outer one back


def test_the_harness_says_what_is_missing():
    with AgentHarness() as harness:
        with pytest.raises(cmactor.ProgrammingError, match="start\\(main\\) first"):
            harness.get("vlan", name="x")
        with pytest.raises(cmactor.ProgrammingError, match="returned without calling cmbackend_init"):
            harness.start(lambda: None)
    assert cmbackend._runtime is None
    with pytest.raises(RuntimeError, match="ready\\(\\) must be called inside a cmactor worker"):
        cmactor.ready()  # outside a harness, as before


def test_the_readme_agent_comes_back_with_its_config_after_a_save_and_restarts(supervisor, tmp_path):
    (tmp_path / "ports.py").write_text(PORTS)
    agents = {"ports": str(tmp_path / "ports.py:main"), "vlan": str(readme_agent(tmp_path)) + ":main"}
    sup = supervisor(agents)
    set_row(sup, "vlan.vlan", name="v10", tag=10)
    sup.save()
    kill_worker(sup, "vlan")  # back READY: event_load_complete calls ready()
    assert get_row(sup, "vlan.vlan", name="v10") == {"name": "v10", "tag": "10"}
    sup.stop()
    again = supervisor(agents)  # the same state_dir: loads what was saved
    assert get_rows(again, "vlan.vlan") == [{"name": "default", "tag": "1"}, {"name": "v10", "tag": "10"}]


def test_an_agent_that_calls_ready_only_without_saved_config_is_told_why_it_is_stuck(supervisor, tmp_path):
    (tmp_path / "ports.py").write_text(PORTS)
    code = readme_agent(tmp_path).read_text()
    slip = code.replace(
        "    def event_load_complete(self):         # saved config loaded (vlan_set ran per row)\n        ready()\n", ""
    )
    assert slip != code
    (tmp_path / "vlan.py").write_text(slip)
    agents = {
        "ports": str(tmp_path / "ports.py:main"),
        "vlan": {"entry": str(tmp_path / "vlan.py:main"), "load_timeout": 0.5},
    }
    sup = supervisor(agents)
    set_row(sup, "vlan.vlan", name="v10", tag=10)
    sup.save()
    with pytest.raises(cmactor.ModuleUnavailable) as caught:
        kill_worker(sup, "vlan", timeout=5)
    assert "stuck: ready() not called within 0.5s; last event event_load_complete" in str(caught.value)
    assert "call ready() after event_load_complete too" in str(caught.value)
