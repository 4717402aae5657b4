"""The worker's CallbackPool on its own: threads in this process, no workers."""

import threading

from cmactor.worker.pool import CallbackPool


def test_callback_pool_gives_every_waiting_action_a_thread_up_to_its_size():
    pool = CallbackPool(5, "test")
    assert pool.size == 5
    barrier = threading.Barrier(5, timeout=10)  # passes only if all 5 run at once
    done = []
    for n in range(5):
        pool.submit(lambda n=n: (barrier.wait(), done.append(n)))
    deadline = threading.Event()
    for _ in range(100):
        if len(done) == 5:
            break
        deadline.wait(0.05)
    assert sorted(done) == [0, 1, 2, 3, 4]


def test_callback_pool_runs_a_burst_and_never_exceeds_its_size():
    pool = CallbackPool(3, "test")
    lock = threading.Lock()
    running = [0, 0]  # now, most at once
    finished = threading.Semaphore(0)

    def work():
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        threading.Event().wait(0.001)
        with lock:
            running[0] -= 1
        finished.release()

    for _ in range(200):
        pool.submit(work)
    for _ in range(200):
        assert finished.acquire(timeout=10)
    assert 1 <= running[1] <= 3
