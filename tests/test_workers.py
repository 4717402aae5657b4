"""Worker processes on the supervisor's side (supervision/workers.py), with a fake loop."""

import multiprocessing
import socket

from cmactor.wire import protocol as P
from cmsupervisor.supervision.modules import Module
from cmsupervisor.supervision.workers import Channel, Workers


class QuietLoop:
    def unwatch(self, fd):
        pass

    def close_endpoint(self, endpoint):
        pass

    def mark(self, endpoint):
        pass


def test_what_a_dead_worker_sent_last_is_handled_while_its_process_can_still_be_asked(tmp_path):
    """The reap reads the replies a worker sent before it died; their handlers may still ask
    its process (a READY line names its pid), so it is closed only after them."""
    workers = Workers(QuietLoop(), socket_path=str(tmp_path / "cm.sock"), base_dir=str(tmp_path), log_level="INFO")
    seen = []
    workers.handle(P.Ready, lambda mod, message: seen.append(mod.pid))
    process = multiprocessing.get_context("fork").Process(target=lambda: None)
    process.start()
    process.join()
    ours, theirs = socket.socketpair()
    theirs.sendall(P.pack(P.Ready()))  # its last words, not read before the sentinel fired
    theirs.close()
    mod = Module("echo", {}, None)
    mod.process = process  # what Module.started sets, without a worker of its own
    doorbell, rung = socket.socketpair()
    mod.channel = Channel(ours, doorbell, iter(()), lambda endpoint: None)
    pid = process.pid
    assert workers.reap(mod) == (pid, 0)
    assert seen == [pid]
    rung.close()
