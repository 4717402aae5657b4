"""The YANG modules generated from the agents' declarations (issue 27), checked by real YANG
tools: pyang --strict (and --lint, RFC 8407) for the language, yangson for validating
RFC 7951 instance data against them; bad names refused; the revision store."""

import datetime
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yangson
from yangson.enumerations import ContentType
from yangson.exceptions import RawMemberError, RawTypeError, SchemaError

from cmsupervisor.restconf.yang import module_text, revision_for

# The test extra installs pyang's script beside this interpreter.
PYANG = shutil.which("pyang", path=os.path.dirname(sys.executable))
REVISION = "2024-05-01"
DAY = datetime.date(2024, 5, 1)


def table(index=(), columns=(), config=True, setop=False, delete=False):
    """One table of a module's schema, as the supervisor reports it."""
    return {"index": list(index), "columns": list(columns), "config": config, "setop": setop, "delete": delete}


VLAN = {
    "tables": {
        "vlan": table(["name"], ["name", "vid", "descr"], setop=True, delete=True),
        "member": table(["vlan", "port"], ["tagged"]),
        "stats": table([], ["count"], config=False),
    }
}


def pyang_tree(tmp_path, module, schema):
    """pyang's tree of the module generated for ``schema``: each line without its tree
    drawing's indent and padding. Fails on any error or warning."""
    assert PYANG, f"pyang is not installed beside {sys.executable}: pip install -e '.[test]'"
    path = tmp_path / f"cmactor-{module}.yang"
    path.write_text(module_text(module, schema, REVISION))
    done = subprocess.run(
        [PYANG, "--strict", "--lint", "-f", "tree", str(path)], capture_output=True, text=True, timeout=50
    )
    assert (done.returncode, done.stderr) == (0, ""), path.read_text()
    return [" ".join(re.sub(r"^[\s|]*", "", line).split()) for line in done.stdout.splitlines()]


def in_order(expected, lines):
    """Whether ``expected`` are among ``lines``, in this order."""
    rest = iter(lines)
    return all(line in rest for line in expected)


@pytest.mark.parametrize(
    "schema, expected",
    [
        pytest.param(
            {"tables": {"vlan": table(["name"], ["name", "vid"])}},
            ["+--rw sys", "+--rw vlan* [name]", "+--rw name string", "+--rw vid? string"],
            id="list-one-key",
        ),
        pytest.param(
            {"tables": {"member": table(["vlan", "port"], ["tagged"])}},
            ["+--rw member* [vlan port]", "+--rw vlan string", "+--rw port string", "+--rw tagged? string"],
            id="list-two-keys-not-among-columns",
        ),
        pytest.param(
            {"tables": {"settings": table([], ["hostname", "contact"])}},
            ["+--rw settings", "+--rw hostname? string", "+--rw contact? string"],
            id="container",
        ),
        pytest.param(
            {"tables": {"counters": table(["port"], ["rx", "port"], config=False)}},
            ["+--rw sys", "+--ro counters* [port]", "+--ro port string", "+--ro rx? string"],
            id="config-false-list",
        ),
        pytest.param(
            {"tables": {"vlan": table(["name"], ["vid"], setop=True, delete=True)}},
            [
                "+--rw vlan* [name]",
                "rpcs:",
                "+---x vlan-setop",
                "+---w input",
                "+---w name? string",
                "+---w vid? string",
                "+---w action? string",
                "+--ro output",
                "+--ro name? string",
                "+--ro vid? string",
                "+--ro message* string",
            ],
            id="setop",
        ),
        pytest.param(
            {"tables": {"job": table([], ["action", "target"], setop=True)}},
            ["+---x job-setop", "+---w action? string", "+---w target? string", "+--ro output"],
            id="setop-with-a-column-named-action",
        ),
        pytest.param({"tables": {}}, ["module: cmactor-sys", "+--rw sys"], id="nothing-exposed"),
    ],
)
def test_pyang_strict_accepts_each_shape(tmp_path, schema, expected):
    lines = pyang_tree(tmp_path, "sys", schema)
    assert in_order(expected, lines), "\n".join(lines)


def test_pyang_tree_of_a_module_with_several_tables(tmp_path):
    lines = pyang_tree(tmp_path, "vlan", VLAN)
    assert lines[0] == "module: cmactor-vlan"
    expected = [
        "+--rw vlan",
        "+--rw vlan* [name]",
        "+--rw name string",
        "+--rw vid? string",
        "+--rw descr? string",
        "+--rw member* [vlan port]",
        "+--rw vlan string",
        "+--rw port string",
        "+--rw tagged? string",
        "+--ro stats",
        "+--ro count? string",
        "rpcs:",
        "+---x vlan-setop",
    ]
    assert in_order(expected, lines), "\n".join(lines)
    assert sum(line.startswith("+---x") for line in lines) == 1  # only vlan has a setop


def test_header_names_the_module_namespace_prefix_and_revision():
    text = module_text("vlan", VLAN, REVISION)
    assert text.startswith("module cmactor-vlan {\n  yang-version 1.1;\n")
    assert '  namespace "urn:cmactor:vlan";\n  prefix vlan;\n' in text
    assert f"  revision {REVISION} {{\n" in text


@pytest.fixture
def vlan_model(tmp_path):
    """A yangson DataModel of the generated cmactor-vlan, from an RFC 7895 YANG library (yangson's form)."""
    (tmp_path / f"cmactor-vlan@{REVISION}.yang").write_text(module_text("vlan", VLAN, REVISION))
    library = {
        "ietf-yang-library:modules-state": {
            "module-set-id": "cmactor",
            "module": [
                {
                    "name": "cmactor-vlan",
                    "revision": REVISION,
                    "namespace": "urn:cmactor:vlan",
                    "conformance-type": "implement",
                }
            ],
        }
    }
    return yangson.DataModel(json.dumps(library), [str(tmp_path)])


def validate(model, document, subschema=None, content=ContentType.all):
    model.from_raw(document, subschema).validate(ctype=content)


def test_yangson_validates_get_bodies(vlan_model):
    walk = {
        "cmactor-vlan:vlan": {
            "vlan": [{"name": "v1", "vid": "10"}, {"name": "v2", "vid": "20", "descr": "lab"}],
            "member": [{"vlan": "v1", "port": "1:1", "tagged": "true"}],
            "stats": {"count": "2"},
        }
    }
    validate(vlan_model, walk)
    validate(vlan_model, {"cmactor-vlan:vlan": {"vlan": [{"name": "v1", "vid": "10"}]}}, content=ContentType.config)
    with pytest.raises(RawMemberError, match="bogus"):
        validate(vlan_model, {"cmactor-vlan:vlan": {"vlan": [{"name": "v1", "bogus": "x"}]}})
    with pytest.raises(RawTypeError, match="vid"):
        validate(vlan_model, {"cmactor-vlan:vlan": {"vlan": [{"name": "v1", "vid": 10}]}})
    with pytest.raises(SchemaError, match="list-key-missing"):
        validate(vlan_model, {"cmactor-vlan:vlan": {"member": [{"vlan": "v1", "tagged": "true"}]}})
    # stats is config false: not part of the configuration (RESTCONF's content=config)
    with pytest.raises(SchemaError):
        validate(vlan_model, {"cmactor-vlan:vlan": {"stats": {"count": "2"}}}, content=ContentType.config)


def test_yangson_validates_setop_input_and_output(vlan_model):
    rpc = "cmactor-vlan:vlan-setop"
    validate(vlan_model, {"cmactor-vlan:input": {"name": "v1", "action": "delete"}}, rpc)
    validate(vlan_model, {"cmactor-vlan:output": {"name": "v1", "message": ["vlan v1 deleted"]}}, rpc)
    with pytest.raises(RawMemberError, match="deleted"):
        validate(vlan_model, {"cmactor-vlan:output": {"deleted": "v1"}}, rpc)


@pytest.mark.parametrize(
    "module, schema, named",
    [
        ("xmlstats", {"tables": {}}, "module 'xmlstats'"),
        ("vlan", {"tables": {"9lives": table(["a"], ["b"])}}, "module 'vlan', table '9lives'"),
        ("vlan", {"tables": {"XMLtab": table([], ["b"])}}, "module 'vlan', table 'XMLtab'"),
        ("vlan", {"tables": {"vlan": table(["name"], ["rx bytes"])}}, "module 'vlan', table 'vlan', column 'rx bytes'"),
        ("vlan", {"tables": {"vlan": table(["if:index"], ["b"])}}, "module 'vlan', table 'vlan', column 'if:index'"),
        ("vlan", {"tables": {"vlan": table([], [""])}}, "module 'vlan', table 'vlan', column ''"),
        ("vlan", {"tables": {"vlan": table([], ["xmlns"])}}, "module 'vlan', table 'vlan', column 'xmlns'"),
        ("vlan", {"tables": {"vlan": table([], [7])}}, "module 'vlan', table 'vlan', column 7"),
    ],
)
def test_names_yang_cannot_take_are_refused(module, schema, named):
    with pytest.raises(ValueError, match=re.escape(named)) as caught:
        module_text(module, schema, REVISION)
    assert re.search(r"rename|leave", str(caught.value))


def test_conflicting_declarations_are_refused():
    with pytest.raises(ValueError, match=r"table 'vlan': columns names vid twice"):
        module_text("vlan", {"tables": {"vlan": table(["name"], ["vid", "vid"])}}, REVISION)
    with pytest.raises(ValueError, match=r"table 'log', column 'message'.*leave it out of columns"):
        module_text("sys", {"tables": {"log": table([], ["message"], setop=True)}}, REVISION)
    for revision in ("2024-13-01", "20240501", "2024-W18-3"):
        with pytest.raises(ValueError, match=rf"revision '{revision}' is not a date"):
            module_text("vlan", VLAN, revision)


def test_revision_is_kept_while_the_schema_is(tmp_path):
    store = tmp_path / "yang-revisions.json"
    assert revision_for("vlan", VLAN, store, today=DAY) == "2024-05-01"
    assert revision_for("vlan", VLAN, store, today=DAY + datetime.timedelta(days=30)) == "2024-05-01"
    assert revision_for("sys", {"tables": {}}, store, today=DAY + datetime.timedelta(days=30)) == "2024-05-31"
    assert revision_for("vlan", VLAN, store) == "2024-05-01"


def test_revision_changes_with_the_schema_even_twice_a_day(tmp_path):
    store = tmp_path / "yang-revisions.json"
    first = revision_for("vlan", VLAN, store, today=DAY)
    more = {"tables": {**VLAN["tables"], "fdb": table(["mac"], ["port"])}}
    second = revision_for("vlan", more, store, today=DAY)
    reordered = {"tables": {**more["tables"], "member": table(["vlan", "port"], ["tagged", "pvid"])}}
    third = revision_for("vlan", reordered, store, today=DAY)
    assert (first, second, third) == ("2024-05-01", "2024-05-02", "2024-05-03")
    assert revision_for("vlan", VLAN, store, today=DAY + datetime.timedelta(days=10)) == "2024-05-11"
    assert revision_for("vlan", VLAN, store, today=DAY + datetime.timedelta(days=11)) == "2024-05-11"


def test_revision_store_is_replaced_atomically(tmp_path):
    store = tmp_path / "yang-revisions.json"
    revision_for("vlan", VLAN, store, today=DAY)
    before = os.stat(store).st_ino
    revision_for("vlan", {"tables": {}}, store, today=DAY)
    assert os.stat(store).st_ino != before  # a new file renamed over the old one, not the old one rewritten
    assert os.listdir(tmp_path) == ["yang-revisions.json"]  # no temporary file left behind
    assert json.loads(store.read_text())["vlan"]["revision"] == "2024-05-02"


@pytest.mark.parametrize(
    "content", ["{not json", "[]", '{"vlan": {"digest": "x"}}', '{"vlan": {"digest": "x", "revision": "soon"}}']
)
def test_a_corrupt_revision_store_is_named_with_the_fix(tmp_path, content):
    store = tmp_path / "yang-revisions.json"
    store.write_text(content)
    with pytest.raises(ValueError, match=rf"{re.escape(str(store))}: not a store of YANG revisions .*delete it"):
        revision_for("vlan", VLAN, store, today=DAY)
    assert store.read_text() == content
