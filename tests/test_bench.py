"""Smoke test of the benchmark suite: `cmactor bench --quick` runs to the end and
prints a row for every scenario. Speeds are not checked: they belong to perf/README.md."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from cmsupervisor.ha.localetcd import ETCD, INSTALL_HINT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The first words of every row of the table (perf/__init__.py, _groups).
ROWS = [
    "floor: one hop, 1 in flight",
    "floor: two hops, 1 in flight",
    "get, sequential (Cursor)",
    "set, sequential (Cursor)",
    "set, persistent table (Cursor)",
    "journal cost per set",
    "get, raw client process, 1 in flight",
    "getnext walk, 10k rows",
    "exos_dbapi walk 10k rows",
    "exos_dbapi first row of a 100k walk",
    "getnext walk, 100k rows",
    "floor: two hops, 1 client x 32 in flight",
    "floor: two hops, 4 clients x 32 in flight",
    "async get, 4 client procs x 32 in flight",
    "chain A(async)->B->C",
    "chain A(async)->B->A",
    "get from an agent, unchecked",
    "get from an agent, checked",
    "deadlock check (WaitGraph.admit)",
    "floor: forkserver Process start",
    "restart after SIGKILL, to answering",
    "restart after SIGKILL, 10k journaled rows",
    "start 10 modules",
    "start 50 modules",
    "save 100k rows",
    "load 100k rows",
    "peer: Ray actor get",  # measured if Ray is installed, else a row saying it was skipped
]


# A row's rate and unit: "12,345  ops/s", "2.9  us/check", or "-  ops/s" when skipped.
FIGURE = re.compile(r"\s(?P<rate>[\d,]+(?:\.\d+)?|-)\s+(?P<unit>[a-z]+/[a-z]+)(\s|$)")


def bench_cmd():
    script = os.path.join(os.path.dirname(sys.executable), "cmactor")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "cmsupervisor"]


@pytest.mark.timeout(300)
def test_bench_quick_prints_every_row():
    result = subprocess.run(bench_cmd() + ["bench", "--quick"], capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: ")
    for name in ROWS:
        rows = [line for line in lines if line.startswith(name)]
        assert rows, f"no row for {name!r} in:\n{result.stdout}"
        figure = FIGURE.search(rows[0][len(name) :])
        assert figure, f"no rate and unit in {rows[0]!r}"
        if figure["rate"] == "-":  # only a skipped peer comparison has no figure
            assert name.startswith("peer: Ray") and "skipped: ray is not importable" in result.stdout, rows[0]
    # The exos_dbapi read of one row costs the agent a few calls, not the whole walk's.
    calls = re.search(r"exos_dbapi first row of a 100k walk .*: agent calls per read: (\d+(?:\.\d+)?)", result.stdout)
    assert calls and float(calls[1]) <= 4, result.stdout
    # The progress lines on stderr name the scenario that runs.
    assert "perf: round 1/3: get, sequential (Cursor)" in result.stderr


@pytest.mark.timeout(300)
def test_ab_pairs_rounds_of_two_installs():
    # Both sides are this install here: the pairing, the runners and the summary work.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "perf.ab",
            sys.executable,
            "--keys",
            "one_hop,get",
            "--pairs",
            "2",
            "--runs",
            "2",
            "--quick",
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for key in ("one_hop", "get"):
        [line] = [line for line in result.stdout.splitlines() if line.startswith(f"{key}: ")]
        assert re.fullmatch(rf"{key}: this/other median \d+\.\d{{3}} over 4 pairs \(quartiles [\d.]+-[\d.]+\)", line)
        assert result.stderr.count(f"{key} this/other median") == 2  # one line per run


@pytest.mark.timeout(120)
def test_ab_names_a_row_it_does_not_know():
    result = subprocess.run(
        [sys.executable, "-m", "perf.ab", sys.executable, "--keys", "nosuch", "--quick"],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "did not start: no such row: nosuch; rows: one_hop," in result.stderr


@pytest.mark.timeout(120)
def test_ab_names_an_other_python_that_cannot_run(tmp_path):
    missing = str(tmp_path / "no-venv" / "bin" / "python")
    result = subprocess.run(
        [sys.executable, "-m", "perf.ab", missing, "--keys", "one_hop", "--quick"],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("perf.ab: ") and missing in result.stderr


# -- perf.instructions: instructions per get, counted by valgrind -----------------------


def _cachegrind_file(path, ir, i1, d1):
    path.write_text(
        "desc: I1 cache: 32768 B, 64 B, 8-way associative\ncmd: python\n"
        "events: Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw\nfl=x.c\nfn=f\n1 5 0 0 0 0 0 0 0 0\n"
        f"summary: {ir} {i1} 0 7 {d1} 0 3 1 0\n"
    )
    return str(path)


def test_instructions_per_get_are_the_difference_of_two_runs_over_the_gets_between(tmp_path):
    from cmactor_perf import instructions as I

    counts = I.read_counts(_cachegrind_file(tmp_path / "a", 1000, 40, 9))
    assert counts["Ir"] == 1000 and counts["I1mr"] == 40 and counts["D1mr"] == 9 and counts["Dw"] == 3
    short = {role: {"Ir": 1000, "I1mr": 40, "D1mr": 9} for role in I.ROLES}
    long = {role: {"Ir": 1000 + 100 * n, "I1mr": 40 + n, "D1mr": 9 + 2 * n} for n, role in enumerate(I.ROLES, 1)}
    figures = I.per_get(short, long, 10)
    assert figures["supervisor"] == {"Ir": 10, "I1mr": 0.1, "D1mr": 0.2}
    assert figures["client"] == {"Ir": 30, "I1mr": 0.3, "D1mr": 0.6}
    lines = I.table({"this": figures, "other": I.per_get(short, long, 5)}).splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["supervisor", "worker", "client", "total"]
    assert lines[-1].split()[1] == "60" and lines[-1].split()[-1] == "0.500"  # 60 a get against 120


def test_instructions_names_a_cachegrind_file_that_is_not_whole(tmp_path):
    from cmactor_perf import instructions as I

    cut = tmp_path / "cut"
    cut.write_text("events: Ir\nfl=x.c\n")
    with pytest.raises(RuntimeError, match=r"cut is not a whole cachegrind output file"):
        I.read_counts(str(cut))


@pytest.mark.timeout(60)
def test_instructions_says_valgrind_is_missing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "perf.instructions"],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
        env={**os.environ, "PATH": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "valgrind is not on PATH" in result.stderr and result.stdout == ""


@pytest.mark.timeout(60)
def test_instructions_names_an_other_python_that_cannot_run(tmp_path):
    missing = str(tmp_path / "no-venv" / "bin" / "python")
    result = subprocess.run(
        [sys.executable, "-m", "perf.instructions", missing, "--gets", "1"],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert (
        result.stderr == f"perf.instructions: {missing} is not an interpreter that can run; give another "
        "install's Python (its venv's bin/python)\n"
    )


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
@pytest.mark.timeout(600)
def test_instructions_counts_each_process_of_a_get():
    result = subprocess.run(
        [sys.executable, "-m", "perf.instructions", "--gets", "300"],
        capture_output=True,
        text=True,
        timeout=580,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Two tables, a blank line between: the brokered get ("per get"), then the direct one.
    tables = result.stdout.strip().split("\n\n")
    assert [table.split()[:2] for table in tables] == [["per", "get"], ["direct", "get"]], result.stdout
    for table, path in zip(tables, ("brokered", "direct")):
        rows = {}
        for line in table.splitlines()[1:]:
            name, *figures = line.split()
            rows[name] = [float(figure.replace(",", "")) for figure in figures]
        assert list(rows) == ["supervisor", "worker", "client", "total"]
        for role in ("supervisor", "worker", "client"):
            if role == "supervisor" and path == "direct":  # serves none of them: start-up noise over 300 gets
                assert abs(rows[role][0]) < 20_000, (path, role, result.stdout)
            else:  # instructions a get: a process's share
                assert 5_000 < rows[role][0] < 1_000_000, (path, role, result.stdout)
        assert abs(rows["total"][0] - sum(rows[role][0] for role in ("supervisor", "worker", "client"))) < 3


@pytest.mark.timeout(120)
def test_walk_lists_the_files_each_walk_runs_code_in():
    result = subprocess.run([sys.executable, "-m", "perf.walk"], capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    walks = {}
    for block in result.stdout.strip().split("\n\n"):
        head, *lines = block.splitlines()
        title, count = re.fullmatch(r"(.+): (\d+) files", head).groups()
        walks[title] = {line.split()[0]: line for line in lines}
        assert len(walks[title]) == int(count)
    assert list(walks) == ["brokered get", "journaled set", "direct get", "SIGKILL to READY"]
    brokered, journaled, direct, crash = walks.values()
    assert "cmsupervisor/front/routing.py" in brokered and "worker: " in brokered["cmactor/worker/process.py"]
    assert "cmsupervisor/persistence/journal.py" in journaled and "cmsupervisor/persistence/journal.py" not in brokered
    assert not [path for path in direct if path.startswith("cmsupervisor/")]  # one hop: the supervisor does nothing
    assert "cmsupervisor/supervision/recovery.py" in crash and "new worker: " in crash["cmactor/worker/process.py"]


# -- perf.ha: the hot standby on a local 3-member etcd ----------------------------------


@pytest.mark.timeout(240)
def test_ha_quick_measures_sets_and_takeovers():
    if ETCD is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    result = subprocess.run(
        [sys.executable, "-m", "perf.ha", "--quick", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["quick"] and report["machine"]["cores"] >= 1
    rows = {row["key"]: row for row in report["results"]}
    assert list(rows) == [
        "local_set",
        "ha_set",
        "local_set_4x32",
        "ha_set_4x32",
        "takeover_ttl1",
        "takeover_ttl2",
        "rejoin",
    ]
    for row in rows.values():
        assert row["rate"] > 0 and row["p50_us"] > 0 and row["p99_us"] >= row["p50_us"], row
    for key in ("ha_set", "ha_set_4x32"):  # compared with the local journal in the same rounds
        assert rows[key]["baseline"] == key.replace("ha_", "local_") and rows[key]["ratio"] > 0
    for ttl in (1, 2):
        row = rows[f"takeover_ttl{ttl}"]
        assert row["lease_ttl"] == ttl and row["rounds"] == 3 and row["max_us"] >= row["p50_us"]
        # Nothing acknowledged is lost in a takeover, and the rejoined standby holds what the active does.
        assert row["lost"] == 0 and row["replicas_differ"] is False, row
    assert rows["rejoin"]["rounds"] == 6


# -- perf.restconf: a GET and a PATCH through RESTCONF against the Cursor's get and set --------


@pytest.mark.timeout(180)
def test_restconf_quick_measures_get_and_patch_against_the_cursor():
    result = subprocess.run(
        [sys.executable, "-m", "perf.restconf", "--quick", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=160,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["quick"] and report["machine"]["cores"] >= 1
    rows = {row["key"]: row for row in report["results"]}
    assert list(rows) == ["cursor_get", "restconf_get", "restconf_get_tls", "cursor_set", "restconf_patch"]
    for row in rows.values():
        assert row["unit"] == "ops/s" and row["rounds"] == 3, row
        assert row["rate"] > 0 and row["p50_us"] > 0 and row["p99_us"] >= row["p50_us"], row
    for key, baseline in (
        ("restconf_get", "cursor_get"),
        ("restconf_get_tls", "cursor_get"),
        ("restconf_patch", "cursor_set"),
    ):
        # compared with the Cursor in the same rounds
        assert rows[key]["baseline"] == baseline and rows[key]["ratio"] > 0, rows[key]
    # A keep-alive GET is not held 40 ms by Nagle's algorithm and a delayed ACK (server.py: TCP_NODELAY).
    assert rows["restconf_get"]["p50_us"] < 20_000, rows["restconf_get"]
