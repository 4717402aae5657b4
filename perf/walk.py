"""Which source files a request or a fault walks through, counted in every process.

    python -m perf.walk

Four walks, each after a warm-up: a brokered get (client -> supervisor -> worker),
a direct get (client -> the worker's own socket), a journaled set (a persistent
table: the supervisor appends it to the journal before it answers), and a worker's
SIGKILL until its module is READY again (the restart, the new worker's start, its
load of the saved config and the journal). For each it prints every file of cmactor
and cmsupervisor whose code ran in the window, with the process it ran in and the
functions it ran, then the number of files.

How: this file runs itself again with a ``sitecustomize`` on its path that installs a
profile hook in every process (the supervisor, the fork server and so every worker
started from it): each call of a function in one of the two packages is written, with
the time, to a file per process. The walk's window is cut from those by time (the
monotonic clock is the machine's). The client's files are the supervisor process's
own here: the driving Cursor runs in it, on its main thread, while the supervisor's
work runs on its loop thread.
"""

import collections
import glob
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

PACKAGES = ("cmactor", "cmsupervisor")

# The hook, written as sitecustomize.py into a directory put first on PYTHONPATH:
# every Python process of the run (the fork server's workers too) loads it at start.
HOOK = """
import os, sys, threading, time
_dirs = tuple(d.rstrip("/") + "/" for d in os.environ["CMACTOR_WALK_DIRS"].split(os.pathsep))
_out = os.environ["CMACTOR_WALK_OUT"]
_files = {}

def _hook(frame, event, arg):
    if event != "call" or not frame.f_code.co_filename.startswith(_dirs):
        return
    pid = os.getpid()
    log = _files.get(pid)
    if log is None:
        log = _files[pid] = open(os.path.join(_out, f"{pid}.log"), "a", buffering=1)
    log.write(f"{time.monotonic():.6f} {threading.current_thread().name} {frame.f_code.co_filename} {frame.f_code.co_name}\\n")

sys.setprofile(_hook)
threading.setprofile(_hook)
"""


def _package_dirs():
    import cmactor
    import cmsupervisor

    return [os.path.dirname(os.path.abspath(package.__file__)) for package in (cmactor, cmsupervisor)]


def _name(path, dirs):
    """A source file as its package path (cmsupervisor/front/routing.py): where it is installed does not matter."""
    for directory, package in zip(dirs, PACKAGES):
        if path.startswith(directory + os.sep):
            return package + path[len(directory) :]
    return path


def _calls(out, start, end, pids, dirs):
    """{file: {role: {functions}}} of the calls made in [start, end] by the processes ``pids`` ({pid: role})."""
    seen = collections.defaultdict(lambda: collections.defaultdict(set))
    for log in glob.glob(os.path.join(out, "*.log")):
        pid = int(os.path.basename(log)[: -len(".log")])
        if pid not in pids:
            continue
        with open(log) as lines:
            for line in lines:
                when, _thread, path, function = line.split()
                if start <= float(when) <= end:
                    seen[_name(path, dirs)][pids[pid]].add(function)
    return seen


def _request_walk(sup, out, dirs, operation, params):
    """The calls of one request after 50 alike (routes asked for, caches filled)."""
    cur = sup.connect().cursor()
    for _ in range(50):
        cur.execute(operation, params)
    time.sleep(0.2)
    start = time.monotonic()
    cur.execute(operation, params)
    end = time.monotonic()
    time.sleep(0.2)  # the hook's lines of the window are written
    return _calls(out, start, end, {os.getpid(): "client+supervisor", sup.modules["bench"].pid: "worker"}, dirs)


def _crash_walk(sup, out, dirs):
    """The calls from a SIGKILL of bench's worker until bench is READY again."""
    mod = sup.modules["bench"]
    ready = threading.Event()
    mod.subscribe(lambda module, before: module.state == "READY" and ready.set())
    start = time.monotonic()
    os.kill(mod.pid, signal.SIGKILL)
    if not ready.wait(30):
        raise RuntimeError("bench was not READY again within 30 s of its worker's SIGKILL")
    end = time.monotonic()
    time.sleep(0.2)
    return _calls(out, start, end, {os.getpid(): "supervisor", mod.pid: "new worker"}, dirs)


def _walks(out):
    """(Under the hook.) Run the four walks; yield (title, {file: {role: functions}})."""
    import cmactor
    from cmactor_perf import scenarios

    dirs = _package_dirs()
    for direct in (False, True):
        with tempfile.TemporaryDirectory() as state_dir:
            sup = cmactor.Supervisor({"bench": scenarios.AGENT}, state_dir, start_timeout=30, direct_reads=direct)
            sup.start()
            try:
                if not direct:
                    yield "brokered get", _request_walk(sup, out, dirs, "get bench.kv", {"key": "k"})
                    yield "journaled set", _request_walk(sup, out, dirs, "set bench.pkv", {"key": "k", "value": "v"})
                    continue
                yield "direct get", _request_walk(sup, out, dirs, "get bench.kv", {"key": "k"})
                # A saved row and a journaled one: the new worker loads both.
                cur = sup.connect().cursor()
                cur.execute("set bench.pkv", {"key": "saved", "value": "1"})
                sup.save()
                cur.execute("set bench.pkv", {"key": "journaled", "value": "2"})
                yield "SIGKILL to READY", _crash_walk(sup, out, dirs)
            finally:
                sup.stop()


def _print(title, files):
    print(f"{title}: {len(files)} files")
    for path in sorted(files):
        roles = "; ".join(f"{role}: {', '.join(sorted(fns))}" for role, fns in sorted(files[path].items()))
        print(f"  {path:45} {roles}")
    print(flush=True)


def main(argv=None):
    if argv is None and os.environ.get("CMACTOR_WALK_OUT"):
        for title, files in _walks(os.environ["CMACTOR_WALK_OUT"]):
            _print(title, files)
        return 0
    with tempfile.TemporaryDirectory() as hook_dir, tempfile.TemporaryDirectory() as out:
        with open(os.path.join(hook_dir, "sitecustomize.py"), "w") as f:
            f.write(HOOK)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([hook_dir, *filter(None, [env.get("PYTHONPATH")])])
        env["CMACTOR_WALK_OUT"] = out
        env["CMACTOR_WALK_DIRS"] = os.pathsep.join(_package_dirs())
        return subprocess.run([sys.executable, "-m", "cmactor_perf.walk"], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
