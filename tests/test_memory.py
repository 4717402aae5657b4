"""memory_max (supervision/memory.py): its values, the RSS watchdog and the cgroups, and a
worker past its limit restarted as after any crash, its journal replayed.

Real supervisors run a test agent that takes memory when told (agents/hog.py). Where this
machine gives no cgroup v2 to make cgroups in, the cgroup path runs against a fake one:
a directory where mkdir makes a cgroup's files, as the kernel would."""

import errno
import os
import re
import subprocess
import sys
import threading
import time

import psutil
import pytest
from helpers import ANY_PORT, agent, kv_rows, scrape, value, wait_for

from cmactor.errors import ConfigError, StartupError
from cmsupervisor.config import load_toml
from cmsupervisor.observability import metrics
from cmsupervisor.supervision import memory

HOG = agent("hog.py:main")
MIB = 1024 * 1024


def hogs(sup, module, **params):
    """Have ``module`` take memory (agents/hog.py's hog table)."""
    sup.connect().cursor().execute(f"set {module}.hog", {key: str(value) for key, value in params.items()})


def restarted(sup, module, restarts=1):
    """Its status once it is READY again after ``restarts`` restarts."""
    return wait_for(
        lambda: (s := sup.status()[module])["state"] == "READY" and s["restarts"] == restarts and s, timeout=20
    )


def module_log(tmp_path, module):
    return (tmp_path / "state" / "logs" / f"{module}.log").read_text()


# -- the values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "bytes_"),
    [
        ("64M", 64 * MIB),
        ("1G", 1024 * MIB),
        ("2048K", 2 * MIB),
        ("1T", 1024**4),
        (3 * MIB, 3 * MIB),
        ("infinity", None),
    ],
)
def test_sizes_are_read_as_systemd_reads_memory_max(supervisor, value, bytes_):
    sup = supervisor({"m": {"entry": HOG, "memory_max": value}}, start=False)
    assert sup.modules["m"].memory_max == bytes_


def test_an_agent_without_a_memory_max_has_the_supervisor_one_and_infinity_has_none(supervisor):
    agents = {
        "own": {"entry": HOG, "memory_max": "64M"},
        "default": HOG,
        "free": {"entry": HOG, "memory_max": "infinity"},
    }
    sup = supervisor(agents, start=False, memory_max="1G")
    assert {name: mod.memory_max for name, mod in sup.modules.items()} == {
        "own": 64 * MIB,
        "default": 1024 * MIB,
        "free": None,
    }
    unset = supervisor({"m": HOG}, start=False, state_dir=sup.state_dir + "2")
    assert unset.modules["m"].memory_max is None


ACCEPTED = (
    r'a number of bytes, a string of digits with a K, M, G or T suffix \(base 1024: "256M", "1.5G"\), '
    r'a percent of the machine\'s memory up to 100 \("50%"\), or "infinity" \(no limit\)'
)


@pytest.mark.parametrize(
    "value", ["64MB", "64m", "64 M", "1.5", "1.G", "", "-1", -1, 1.5, True, ["64M"], "150%", "%", "50 %"]
)
def test_a_malformed_memory_max_is_a_config_error_naming_the_key_and_what_is_accepted(supervisor, value):
    with pytest.raises(ConfigError, match=rf"agents\.m\.memory_max: expected a size .*{ACCEPTED}; got "):
        supervisor({"m": {"entry": HOG, "memory_max": value}}, start=False)
    with pytest.raises(ConfigError, match=rf"Supervisor options\.memory_max: expected a size .*{ACCEPTED}"):
        supervisor({"m": HOG}, start=False, memory_max=value)


def test_a_memory_max_no_worker_fits_in_says_a_bare_number_is_bytes(supervisor):
    with pytest.raises(
        ConfigError, match=r'memory_max: 256 is 256 bytes, .* at least 1M \(a bare number is bytes, .*"256M"'
    ):
        supervisor({"m": {"entry": HOG, "memory_max": 256}}, start=False)
    with pytest.raises(ConfigError, match=r"memory_max: '512K' is 524288 bytes, less than any worker needs; .*1M\Z"):
        supervisor({"m": {"entry": HOG, "memory_max": "512K"}}, start=False)
    with pytest.raises(ConfigError, match=r"memory_max: 0 is 0 bytes"):
        supervisor({"m": HOG}, start=False, memory_max=0)


def test_memory_errors_in_a_config_file_name_file_table_and_key(tmp_path):
    path = tmp_path / "cmactor.toml"
    path.write_text(f'[supervisor]\nmemory_max = "lots"\n[agents.m]\nentry = "{HOG}"\n')
    with pytest.raises(ConfigError, match=rf"{path}:2: \[supervisor\]\.memory_max: expected a size .*got 'lots'"):
        load_toml(path)
    path.write_text(f'[supervisor]\nmemory_max = "1G"\n[agents.m]\nentry = "{HOG}"\nmemory_max = "64Mi"\n')
    with pytest.raises(ConfigError, match=rf"{path}:5: \[agents\]\.m\.memory_max: expected a size .*got '64Mi'"):
        load_toml(path)
    path.write_text(f'[supervisor]\nmemory_enforcement = "cgroups"\n[agents.m]\nentry = "{HOG}"\n')
    with pytest.raises(
        ConfigError,
        match=rf"{path}:2: \[supervisor\]\.memory_enforcement: expected one of 'auto', 'cgroup', 'rss', got 'cgroups'",
    ):
        load_toml(path)
    path.write_text(f'[supervisor]\nmemory_max = "1G"\n[agents.m]\nentry = "{HOG}"\nmemory_max = "infinity"\n')
    options, agents, _, _ = load_toml(path)
    assert options["memory_max"] == 1024 * MIB and agents["m"]["memory_max"] == "infinity"


# -- a worker past its limit --------------------------------------------------


def test_over_memory_max_a_worker_is_killed_and_restarted_with_its_journal(supervisor, tmp_path, monkeypatch):
    """Whichever enforcement "auto" finds here: the kernel's in a cgroup, or the RSS watchdog.
    A module under its limit, and one without, are left alone."""
    monkeypatch.setattr(metrics, "REUSE", 0.0)  # a scrape right after the kill sees it
    agents = {
        "hog": {"entry": HOG, "memory_max": "64M"},
        "calm": HOG,  # the supervisor's 256M
        "free": {"entry": HOG, "memory_max": "infinity"},
    }
    sup = supervisor(agents, memory_max="256M", metrics=ANY_PORT)
    cur = sup.connect().cursor()
    for i in range(20):
        cur.execute("set hog.kv", {"key": f"k{i:02}", "value": str(i)})
    before = sup.status()
    hogs(sup, "calm", mib=10, chunks=3)  # ~30 MiB more, well under 256M
    hogs(sup, "free", mib=10, chunks=5)
    hogs(sup, "hog", mib=10)  # without end
    status = restarted(sup, "hog")
    assert status["last_exit"].startswith("killed by SIGKILL after: memory: ")
    assert "memory_max 64 MiB" in status["last_exit"] and status["memory_kills"] == 1
    assert kv_rows(cur, "hog") == {f"k{i:02}": str(i) for i in range(20)}  # replayed from its journal
    time.sleep(4 * memory.CHECK_EVERY)  # a few checks more, all of them with calm's blocks taken
    after = sup.status()
    for name in ("calm", "free"):
        assert after[name]["pid"] == before[name]["pid"] and after[name]["restarts"] == 0
        assert after[name]["memory_kills"] == 0 and after[name]["rss"] > before[name]["rss"] + 25 * MIB
    assert {name: after[name]["memory_max"] for name in agents} == {"hog": 64 * MIB, "calm": 256 * MIB, "free": None}
    log = module_log(tmp_path, "hog")
    assert f"module hog: worker pid {before['hog']['pid']} killed by SIGKILL after: memory: " in log
    samples = scrape(sup)
    assert value(samples, "cmactor_module_memory_kills_total", module="hog") == 1
    assert value(samples, "cmactor_module_memory_kills_total", module="calm") == 0
    assert value(samples, "cmactor_module_memory_max_bytes", module="hog") == 64 * MIB
    assert ("cmactor_module_memory_max_bytes", (("module", "free"),)) not in samples


def test_the_rss_watchdog_kills_a_worker_over_its_limit(supervisor, tmp_path):
    sup = supervisor({"hog": {"entry": HOG, "memory_max": "64M"}}, memory_enforcement="rss")
    cur = sup.connect().cursor()
    cur.execute("set hog.kv", {"key": "kept", "value": "yes"})
    pid = sup.status()["hog"]["pid"]
    hogs(sup, "hog", mib=10, every=0.05)  # < 200 MiB a second
    status = restarted(sup, "hog")
    assert re.fullmatch(r"killed by SIGKILL after: memory: RSS [0-9.]+ MiB over memory_max 64 MiB", status["last_exit"])
    rss = float(status["last_exit"].split("RSS ")[1].split()[0])
    assert 64 < rss < 64 + 3 * 200 * memory.CHECK_EVERY  # seen within a few checks of passing the limit
    assert kv_rows(cur, "hog") == {"kept": "yes"}
    log = module_log(tmp_path, "hog")
    assert re.search(
        r"ERROR +cmactor\.supervisor: module hog: memory: RSS .* over memory_max 64 MiB; killing the worker", log
    )
    assert f"worker pid {pid} killed by SIGKILL after: memory: RSS" in log


def test_a_worker_that_stays_over_its_limit_is_quarantined_saying_so(supervisor):
    """Each new worker takes the memory again: the restart policy's intensity ends it, as any crash loop."""
    sup = supervisor(
        {"hog": {"entry": HOG, "memory_max": "64M", "max_restarts": 1, "restart_delay": 0.01}},
        memory_enforcement="rss",
    )
    hogs(sup, "hog", mib=10)
    restarted(sup, "hog")
    hogs(sup, "hog", mib=10)
    status = wait_for(lambda: (s := sup.status()["hog"])["state"] == "FAILED" and s, timeout=20)
    assert "crashed more than 1 times" in status["error"] and "memory: RSS" in status["error"]
    assert status["memory_kills"] == 2


def test_without_a_memory_max_no_cgroup_is_looked_for_and_no_thread_started(supervisor, monkeypatch):
    def delegated():
        raise AssertionError("cgroups looked for")

    monkeypatch.setattr(memory, "delegated", delegated)
    sup = supervisor({"m": HOG})
    time.sleep(2 * memory.CHECK_EVERY)
    assert sup.status()["m"]["memory_max"] is None
    assert "cmactor-memory" not in {thread.name for thread in threading.enumerate()}


def test_group_rss_counts_the_worker_and_what_it_started_in_its_group():
    """What a kill of the group ends is what is counted: a process that left the group
    (setsid) is neither."""
    # Each child says its pid in one write(): the two share the pipe.
    take = "import os, sys, time; kept = b'x' * ({} * 1024 * 1024); os.write(1, b'%d\\n' % os.getpid()); time.sleep(60)"
    code = (
        "import os, subprocess, sys, time\n"
        f"kept = b'x' * (40 * 1024 * 1024)\n"
        f"child = subprocess.Popen([sys.executable, '-c', {take.format(30)!r}], stdout=sys.stdout)\n"
        f"away = subprocess.Popen([sys.executable, '-c', {take.format(30)!r}], start_new_session=True, stdout=sys.stdout)\n"
        "time.sleep(60)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", code], process_group=0, stdout=subprocess.PIPE, text=True)
    away = None
    try:
        pids = {int(leader.stdout.readline()), int(leader.stdout.readline())}
        procs = {pid: psutil.Process(pid) for pid in pids}
        away = next(proc for proc in procs.values() if os.getpgid(proc.pid) != leader.pid)
        child = next(proc for proc in procs.values() if proc is not away)
        total = memory.group_rss(leader.pid)
        ours = psutil.Process(leader.pid).memory_info().rss + child.memory_info().rss
        assert abs(total - ours) < 4 * MIB  # the two read a moment apart
        assert total > 70 * MIB
    finally:
        os.killpg(leader.pid, 9)
        if away is not None:
            away.kill()
            away.wait()
        leader.wait()
    assert memory.group_rss(leader.pid) is None


def test_sizes_for_a_person():
    assert [memory.size(n) for n in (64 * MIB, 1536 * MIB, 2 * 1024 * MIB, 1536, 100)] == [
        "64 MiB",
        "1.5 GiB",
        "2 GiB",
        "1.5 KiB",
        "100 B",
    ]


# -- cgroups ------------------------------------------------------------------

INTERFACE = {
    "cgroup.procs": "",
    "cgroup.controllers": "",
    "cgroup.subtree_control": "",
    "memory.max": "max\n",
    "memory.oom.group": "0\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
}


@pytest.fixture
def fake_cgroups(tmp_path, monkeypatch):
    """A fake cgroup2 hierarchy, ``tmp_path/cgroup``: mkdir there makes a cgroup's files as the
    kernel would, rmdir refuses a cgroup a live process is in (EBUSY) and takes its files with
    it. Returns (root, this process's /proc/self/cgroup): in /svc, alone, memory available."""
    root = tmp_path / "cgroup"
    real_mkdir, real_rmdir = os.mkdir, os.rmdir

    def ours(path):
        return os.fspath(path).startswith(os.fspath(root))

    def mkdir(path, mode=0o777, **kwargs):
        real_mkdir(path, mode, **kwargs)
        if ours(path):
            for name, text in INTERFACE.items():
                with open(os.path.join(path, name), "w") as f:
                    f.write(text)

    def rmdir(path, **kwargs):
        if ours(path):
            with open(os.path.join(path, "cgroup.procs")) as f:
                if any(alive(int(pid)) for pid in f.read().split()):
                    raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), os.fspath(path))
            for name in INTERFACE:
                os.unlink(os.path.join(path, name))
        real_rmdir(path, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "rmdir", rmdir)
    os.mkdir(root)
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    os.mkdir(root / "svc")
    (root / "svc" / "cgroup.controllers").write_text("memory pids\n")
    (root / "svc" / "cgroup.procs").write_text(f"{os.getpid()}\n")
    own = tmp_path / "self-cgroup"
    own.write_text("0::/svc\n")
    return root, own


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_supervisor_moves_into_a_leaf_and_hands_memory_to_its_workers_cgroups(fake_cgroups):
    root, own = fake_cgroups
    here = root / "svc"
    assert memory.delegated(str(root), str(own)) == (str(here), None)
    assert (here / "cmactor-supervisor" / "cgroup.procs").read_text() == str(os.getpid())
    assert (here / "cgroup.subtree_control").read_text() == "+memory"
    assert memory.delegated(str(root), str(own)) == (str(here), None)  # once per process
    cgroups = memory.Cgroups(str(here))
    path = cgroups.create("echo", 64 * MIB)
    assert os.path.dirname(path) == str(here) and os.path.basename(path).startswith(f"cmactor-{os.getpid()}-echo-")
    assert open(os.path.join(path, "memory.max")).read() == str(64 * MIB)
    assert open(os.path.join(path, "memory.oom.group")).read() == "1"
    assert cgroups.end(path, 64 * MIB) is None and not os.path.exists(path)
    killed = cgroups.create("echo", 64 * MIB)
    with open(os.path.join(killed, "memory.events"), "w") as f:
        f.write("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
    with open(os.path.join(killed, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))  # a process still in it: removed at a later end
    assert (
        cgroups.end(killed, 64 * MIB) == "memory: the kernel killed it at memory_max 64 MiB (its cgroup's oom_kill: 1)"
    )
    assert os.path.exists(killed)
    open(os.path.join(killed, "cgroup.procs"), "w").close()
    cgroups.end(cgroups.create("other", 64 * MIB), 64 * MIB)
    assert not os.path.exists(killed) and not [
        name for name in os.listdir(here) if name.startswith(f"cmactor-{os.getpid()}-")
    ]


@pytest.mark.parametrize(
    ("setup", "why"),
    [
        (lambda root, own: (root / "cgroup.controllers").unlink(), r"is not a cgroup v2 hierarchy"),
        (lambda root, own: own.write_text("1:memory:/svc\n"), r"self-cgroup names no cgroup v2 of this process"),
        (lambda root, own: (root / "svc" / "cgroup.controllers").write_text("pids\n"), r"memory controller is not"),
        (
            lambda root, own: (root / "svc" / "cgroup.procs").write_text(f"{os.getpid()}\n1\n"),
            r"holds processes other than this one and those it started \(1\), .* Delegate=yes",
        ),
    ],
)
def test_where_cgroups_cannot_be_made_it_says_why_and_changes_nothing(fake_cgroups, setup, why):
    root, own = fake_cgroups
    setup(root, own)
    path, reason = memory.delegated(str(root), str(own))
    assert path is None and re.search(why, reason)
    assert not (root / "svc" / "cmactor-supervisor").exists()
    assert (root / "svc" / "cgroup.subtree_control").read_text() == ""


def test_a_worker_joins_its_cgroup_and_a_kill_of_the_kernels_there_is_a_memory_crash(
    supervisor, tmp_path, fake_cgroups, monkeypatch
):
    """The cgroup path end to end but for the kernel's part: the worker's own cgroup, its
    pid in it, then the OOM kill as the kernel would tell it (memory.events, SIGKILL)."""
    answer = memory.delegated(*map(str, fake_cgroups))
    monkeypatch.setattr(memory, "delegated", lambda: answer)
    sup = supervisor(
        {"hog": {"entry": HOG, "memory_max": "64M"}, "free": HOG},
        memory_enforcement="cgroup",
    )
    here = answer[0]

    def cgroup_of(pid):
        [path] = [
            os.path.join(here, name)
            for name in os.listdir(here)
            if name.startswith("cmactor-") and open(os.path.join(here, name, "cgroup.procs")).read() == str(pid)
        ]
        return path

    cur = sup.connect().cursor()
    cur.execute("set hog.kv", {"key": "kept", "value": "yes"})
    pid = sup.status()["hog"]["pid"]
    path = cgroup_of(pid)
    assert os.path.basename(path).startswith(f"cmactor-{os.getpid()}-hog-")
    assert open(os.path.join(path, "memory.max")).read() == str(64 * MIB)
    assert [name for name in os.listdir(here) if "-free-" in name] == []  # no limit, no cgroup
    with open(os.path.join(path, "memory.events"), "w") as f:
        f.write("low 0\nhigh 0\nmax 40\noom 1\noom_kill 1\n")
    os.killpg(pid, 9)
    status = restarted(sup, "hog")
    assert status["last_exit"] == (
        "killed by SIGKILL after: memory: the kernel killed it at memory_max 64 MiB (its cgroup's oom_kill: 1)"
    )
    assert status["memory_kills"] == 1 and kv_rows(cur, "hog") == {"kept": "yes"}
    assert not os.path.exists(path) and cgroup_of(status["pid"]) != path
    os.killpg(status["pid"], 9)  # a crash of another kind: not the memory's
    status = restarted(sup, "hog", restarts=2)
    assert status["last_exit"] == "killed by SIGKILL" and status["memory_kills"] == 1
    sup.stop()
    assert [name for name in os.listdir(here) if name.startswith("cmactor-")] == ["cmactor-supervisor"]


def test_cgroup_enforcement_where_none_can_be_made_is_a_startup_error_saying_why(supervisor, monkeypatch):
    monkeypatch.setattr(memory, "delegated", lambda: (None, "/sys/fs/cgroup is not a cgroup v2 hierarchy"))
    sup = supervisor({"hog": {"entry": HOG, "memory_max": "64M"}}, memory_enforcement="cgroup", start=False)
    with pytest.raises(
        StartupError, match=r"memory_enforcement = 'cgroup', .*: /sys/fs/cgroup is not a cgroup v2 .*'rss'"
    ):
        sup.start()
    auto = supervisor({"hog": {"entry": HOG, "memory_max": "64M"}}, state_dir=sup.state_dir + "2")
    assert auto.status()["hog"]["state"] == "READY"  # "auto" falls back to the watchdog


def test_memory_max_takes_fractions_and_percents_as_systemd_does(supervisor):
    sup = supervisor({"a": {"entry": HOG, "memory_max": "1.5G"}, "b": {"entry": HOG, "memory_max": "50%"}}, start=False)
    assert sup.modules["a"].memory_max == 3 * 1024**3 // 2
    assert sup.modules["b"].memory_max == psutil.virtual_memory().total // 2
    with pytest.raises(ConfigError, match=r"memory_max: '99999999999T' is more than any machine has"):
        supervisor({"m": {"entry": HOG, "memory_max": "99999999999T"}}, start=False)
