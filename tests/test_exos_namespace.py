"""The `exos` namespace is shared: cmactor serves its own names, an app's own packages and
the directories of [exos] path supply the rest, and what nobody supplies says where it
was looked for."""

import re
import shutil
import sys

import pytest
from helpers import agent

import cmactor
from cmactor import exos
from cmactor.errors import ConfigError
from cmactor.testing import get_row

PROBE = agent("exos_probe.py")

VLAN = "from exos.api import vlan\nfound = vlan.WHO"


def write(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def imported(sup, code, module="probe"):
    """What the probe's import statements bound to ``found``; AssertionError with the
    ImportError's text if they raised one."""
    row = get_row(sup, f"{module}.imported", code=code)
    assert not row["error"], row["error"]
    return row["found"]


def import_error(sup, code):
    row = get_row(sup, "probe.imported", code=code)
    assert row["error"], f"imported: {row['found']}"
    return row["error"]


def simulation(root, who):
    """A directory supplying exos.api.vlan (whose WHO is ``who``) and _exos_ext_ems."""
    write(root / "exos" / "api" / "vlan.py", f"WHO = {who!r}\n")
    write(root / "_exos_ext_ems.py", "EMS_LEVEL_ERROR = 'supplied'\n")
    return root


def toml(tmp_path, text):
    return write(tmp_path / "cmactor.toml", f"{text}\n[agents.probe]\nentry = {PROBE!r}\n")


# -- what apps and users supply, in workers --------------------------------------------------


def test_an_apps_own_exos_package_beside_it_imports_and_exos_api_stays_cmactors(supervisor, tmp_path):
    app = tmp_path / "httpapp"
    app.mkdir()
    shutil.copy(PROBE, app / "app.py")
    write(app / "exos" / "httpd" / "__init__.py", "from exos.httpd.auth import REALM\nSERVED = 'by the app'\n")
    write(app / "exos" / "httpd" / "auth.py", "REALM = 'switch'\n")
    write(app / "exos" / "__init__.py", "raise RuntimeError('the app shadowed cmactor exos package')\n")
    sup = supervisor({"probe": str(app / "app.py")})
    assert imported(sup, "from exos.httpd import SERVED as found") == "by the app"
    assert imported(sup, "import exos.httpd.auth\nfound = exos.httpd.auth.REALM") == "switch"
    assert imported(sup, "import exos.httpd\nfound = exos.httpd.__file__") == str(
        app / "exos" / "httpd" / "__init__.py"
    )
    same = "import exos.api, cmactor.cmbackend\nfound = exos.api.CmAgent is cmactor.cmbackend.CmAgent"
    assert imported(sup, same) == "True"


def test_exos_path_in_the_toml_supplies_platform_modules(cmactor_supervisor, tmp_path):
    simulation(tmp_path / "sim", "the simulation")
    sup = cmactor_supervisor(toml(tmp_path, '[exos]\npath = ["sim"]'))
    assert imported(sup, VLAN) == "the simulation"
    assert imported(sup, "import exos.api.vlan\nfound = exos.api.vlan.__file__") == str(
        tmp_path / "sim" / "exos" / "api" / "vlan.py"
    )


def test_exos_path_of_the_embedding_api_is_relative_to_base_dir_and_supplies_exos_ext_modules(supervisor, tmp_path):
    simulation(tmp_path / "sim", "embedded")
    sup = supervisor({"probe": PROBE}, base_dir=tmp_path, exos_path=["sim"])
    assert imported(sup, VLAN) == "embedded"
    assert imported(sup, "from _exos_ext_ems import EMS_LEVEL_ERROR as found") == "supplied"


def test_an_agents_own_exos_path_comes_before_the_shared_one(supervisor, tmp_path):
    simulation(tmp_path / "shared", "shared")
    simulation(tmp_path / "device", "the device adapter")
    agents = {"probe": PROBE, "adapted": {"entry": PROBE, "exos_path": ["device"]}}
    sup = supervisor(agents, base_dir=tmp_path, exos_path=["shared"])
    assert imported(sup, VLAN) == "shared"
    assert imported(sup, VLAN, module="adapted") == "the device adapter"


def test_exos_ext_cmfe_is_cmactors_with_the_platforms_values(supervisor):
    sup = supervisor({"probe": PROBE})
    assert imported(sup, "from _exos_ext_cmfe import CM_FLAG_GETNEXT as found") == "2"
    same = "import _exos_ext_cmfe, cmactor.exos.ext_cmfe\nfound = _exos_ext_cmfe is cmactor.exos.ext_cmfe"
    assert imported(sup, same) == "True"


def test_a_supplied_directory_cannot_shadow_cmactors_names(supervisor, tmp_path):
    sim = tmp_path / "sim"
    for shadow in ("exos/__init__.py", "exos/api/__init__.py", "exos/api/cmbackend.py"):
        write(sim / shadow, f"raise RuntimeError('{shadow} ran')\n")
    write(sim / "_exos_ext_cmfe.py", "CM_FLAG_GETNEXT = 99\n")
    sup = supervisor({"probe": PROBE}, exos_path=[sim])  # the probe imports exos.api as it starts
    same = "import exos.api.cmbackend, cmactor.cmbackend\nfound = exos.api.cmbackend is cmactor.cmbackend"
    assert imported(sup, same) == "True"
    assert imported(sup, "from _exos_ext_cmfe import CM_FLAG_GETNEXT as found") == "2"


def test_what_nobody_supplies_is_an_import_error_naming_it_where_it_was_looked_for_and_how_to_supply_it(
    supervisor, tmp_path
):
    sim = simulation(tmp_path / "sim", "the simulation")
    sup = supervisor({"probe": PROBE}, exos_path=[sim])
    for statement in ("from exos.api import acl as found", "import exos.api.acl"):
        error = import_error(sup, statement)
        assert error.startswith("exos.api.acl is an EXOS platform API that cmactor does not provide"), error
        assert f"looked in {sim} and on sys.path" in error
        assert "DIR/exos/api/acl.py with DIR listed in [exos] path" in error
    assert "DIR/_exos_ext_nosuch.py" in import_error(sup, "import _exos_ext_nosuch")


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[exos]\npath = ["missing"]', "[exos].path: directory {tmp}/missing does not exist"),
        ('[exos]\npaths = ["sim"]', "[exos]: unknown key 'paths'; did you mean 'path'?"),
        ('[exos]\npath = "sim"', "[exos].path: expected a list of directories, got 'sim'"),
        ("[exos]\npath = [1]", "[exos].path: expected a list of directories, got [1]"),
        ('exos = "sim"', "[exos]: expected a table of options, got 'sim'"),
    ],
)
def test_a_bad_exos_table_is_refused_naming_the_file_the_key_and_the_problem(tmp_path, table, message):
    (tmp_path / "sim").mkdir()
    path = toml(tmp_path, table)
    with pytest.raises(ConfigError) as caught:
        cmactor.Supervisor.from_toml(path)
    # Each error names the file and the line the [exos] table or key is on.
    [problem] = caught.value.problems
    assert re.match(rf"{re.escape(str(path))}:\d+: {re.escape(message.format(tmp=tmp_path))}", problem), problem


def test_a_bad_exos_path_of_an_agent_or_of_the_embedding_api_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=rf"agents.probe.exos_path: directory {tmp_path}/gone does not exist"):
        cmactor.Supervisor({"probe": {"entry": PROBE, "exos_path": ["gone"]}}, tmp_path, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=rf"Supervisor exos_path: directory {tmp_path}/gone does not exist"):
        cmactor.Supervisor({"probe": PROBE}, tmp_path, base_dir=tmp_path, exos_path=["gone"])
    with pytest.raises(ConfigError, match="Supervisor exos_path: expected a list of directories, got 'sim'"):
        cmactor.Supervisor({"probe": PROBE}, tmp_path, exos_path="sim")


def test_the_exos_path_reaches_every_agent_after_its_own(tmp_path):
    for name in ("sim", "own"):
        (tmp_path / name).mkdir()
    path = write(
        tmp_path / "cmactor.toml",
        f'[exos]\npath = ["sim"]\n[agents.a]\nentry = {PROBE!r}\n'
        f'[agents.b]\nentry = {PROBE!r}\nexos_path = ["own", "sim"]\n',
    )
    sup = cmactor.Supervisor.from_toml(path)
    assert sup.modules["a"].options["exos_path"] == [str(tmp_path / "sim")]
    assert sup.modules["b"].options["exos_path"] == [str(tmp_path / "own"), str(tmp_path / "sim")]


# -- the finder, in this process -------------------------------------------------------------


@pytest.fixture
def installed():
    """exos.install, undone afterwards: the hook and every EXOS module it imported."""
    before = list(sys.meta_path)
    yield exos.install
    sys.meta_path[:] = before
    for name in [n for n in sys.modules if n == "exos" or n.startswith(("exos.", "_exos_ext_"))]:
        del sys.modules[name]


def test_configured_directories_come_before_sys_path(installed, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(simulation(tmp_path / "on_path", "sys.path")))
    installed(search=[simulation(tmp_path / "configured", "configured")])
    from exos.api import vlan

    assert vlan.WHO == "configured"


def test_sys_path_is_searched_as_it_is_at_the_import(installed, tmp_path, monkeypatch):
    installed()
    with pytest.raises(ImportError, match="looked on sys.path"):
        __import__("exos.api.vlan")
    monkeypatch.syspath_prepend(str(simulation(tmp_path / "later", "added later")))
    import exos.api.vlan

    assert exos.api.vlan.WHO == "added later"


def test_both_import_forms_of_a_missing_api_give_the_text(installed):
    installed()
    for statement in ("import exos.api.acl", "from exos.api import acl"):
        with pytest.raises(ImportError, match="exos.api.acl is an EXOS platform API") as caught:
            exec(statement, {})
        assert caught.value.name == "exos.api.acl"
        assert type(caught.value) is ImportError  # not ModuleNotFoundError, which the from form would drop


def test_names_outside_the_exos_namespace_are_left_to_the_other_finders(installed):
    installed()
    with pytest.raises(ModuleNotFoundError, match="No module named 'exosphere'"):
        __import__("exosphere")
