"""Chaos: clients keep setting and getting while a killer SIGKILLs random agents.

Afterwards every acknowledged set is present, no request waited past
hold_timeout plus a margin, and the supervisor is alive. Runs for
CMACTOR_CHAOS_SECONDS (default 60); CI runs it.
"""

import os
import random
import signal
import threading
import time

import pytest
from helpers import agent, wait_for

import cmactor

ECHO = agent("echo.py:main")
SECONDS = float(os.environ.get("CMACTOR_CHAOS_SECONDS", "60"))
HOLD = 10.0
MARGIN = 5.0
MODULES = ("m0", "m1", "m2")

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(SECONDS + 120)]


def test_acknowledged_sets_survive_random_sigkills(supervisor):
    options = {
        "entry": ECHO,
        "max_restarts": 100000,
        "restart_delay": 0.01,
        "restart_delay_max": 0.1,
        "stable_after": 0.5,
    }
    sup = supervisor({name: dict(options) for name in MODULES}, hold_timeout=HOLD)
    stop = threading.Event()
    acked = {}  # (module, key) -> value
    counts = {"set_ok": 0, "get_ok": 0, "crashed": 0, "unavailable": 0, "kills": 0}
    longest = [0.0]
    lock = threading.Lock()
    failures = []

    def client(n):
        rng = random.Random(n)
        cur = sup.connect(f"client{n}", timeout=HOLD + MARGIN).cursor()
        seq = 0
        while not stop.is_set():
            module = rng.choice(MODULES)
            start = time.monotonic()
            try:
                if rng.random() < 0.6:
                    seq += 1
                    key, value = f"c{n}-{seq}", f"v{seq}"
                    cur.execute(f"set {module}.kv", {"key": key, "value": value})
                    with lock:
                        acked[(module, key)] = value
                        counts["set_ok"] += 1
                else:
                    cur.execute(f"get {module}.kv", {"key": "default"})
                    with lock:
                        counts["get_ok"] += 1
            except cmactor.ModuleUnavailable:
                with lock:
                    counts["unavailable"] += 1
            except cmactor.OperationalError as exc:
                if "crashed" not in str(exc):
                    failures.append(repr(exc))
                    return
                with lock:
                    counts["crashed"] += 1
            except Exception as exc:  # anything else is a bug: recorded, and the test fails
                failures.append(repr(exc))
                return
            took = time.monotonic() - start
            with lock:
                longest[0] = max(longest[0], took)

    def killer():
        rng = random.Random(99)
        while not stop.wait(rng.uniform(0.2, 0.5)):
            pid = sup.status()[rng.choice(MODULES)]["pid"]
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                    counts["kills"] += 1
                except ProcessLookupError:
                    pass

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)] + [threading.Thread(target=killer)]
    for thread in threads:
        thread.start()
    time.sleep(SECONDS)
    stop.set()
    for thread in threads:
        thread.join(HOLD + MARGIN + 10)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert failures == []

    try:
        wait_for(lambda: all(s["state"] == "READY" for s in sup.status().values()), timeout=30)
    except AssertionError:
        raise AssertionError(f"modules not READY after the chaos: {sup.status()}") from None
    cur = sup.connect().cursor()
    present = {}
    for module in MODULES:
        cur.execute(f"getnext {module}.kv")
        present.update({(module, k): v for k, v in cur})
    missing = [k for k, v in acked.items() if present.get(k) != v]
    print(f"\nchaos {SECONDS:g}s: {counts}, longest request {longest[0]:.2f}s, acknowledged sets {len(acked)}")
    assert missing == []
    assert longest[0] <= HOLD + MARGIN
    assert counts["kills"] >= SECONDS / 0.5 * 0.8 and counts["set_ok"] > 100
