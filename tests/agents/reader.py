"""A test agent for reads that talk back: notify_cli from a get, and from an async one."""

import time

from cmactor import async_action, ready
from cmactor.cmbackend import CmAgent, cmbackend_init


class Reader(CmAgent):
    def event_generate_default(self):
        ready()

    def say_get(self, ctx):
        for i in range(int(ctx.params.get("times", "2"))):
            ctx.notify_cli(f"line {i} for {ctx.vr_name}")
        ctx.fields = {"said": ctx.params.get("times", "2")}

    def touch_get(self, ctx):
        ctx.dirty = True  # a read that changed something: the module has unsaved changes
        ctx.fields = {"touched": "1"}

    def slowsay_get(self, ctx):
        ctx.notify_cli("started")
        time.sleep(float(ctx.params.get("secs", "0.5")))
        ctx.fields = {"said": "1"}

    def threadless_get(self, ctx):
        # From now on the worker's direct socket cannot start a new reader, as in a process
        # out of threads (tests/test_direct.py).
        from cmactor.worker import direct

        class Refused:
            def start(self):
                raise RuntimeError("can't start new thread")

        direct.DirectServer._new_reader = lambda server, turn: Refused()
        ctx.fields = {"threadless": "1"}

    def unwatchable_get(self, ctx):
        # From now on the worker's direct socket cannot watch a new client, as with epoll
        # out of memory (tests/test_direct.py).
        import errno

        from cmactor import cmbackend

        server = cmbackend._runtime.direct
        real = server._epoll

        class Refusing:
            def register(self, fd, events):
                raise OSError(errno.ENOMEM, "Cannot allocate memory")

            def __getattr__(self, name):
                return getattr(real, name)

        server._epoll = Refusing()
        ctx.fields = {"unwatchable": "1"}

    @async_action
    def asay_get(self, ctx):
        ctx.notify_cli("from the async lane")
        ctx.fields = {"said": "1"}


def main():
    cmbackend_init(Reader())
