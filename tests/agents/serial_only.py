"""An agent without any @async_action: its worker runs serial actions on the thread
that reads the socket, and nothing reads while one runs."""

import time

from cmactor import ready
from cmactor.cmbackend import CmAgent, cmbackend_init


class SerialOnly(CmAgent):
    def __init__(self):
        super().__init__()
        self.order = []

    def event_generate_default(self):
        ready()

    def sleep_get(self, ctx):
        time.sleep(float(ctx.params.get("secs", "0.1")))
        ctx.fields = {"slept": ctx.params.get("secs", "0.1")}

    def order_set(self, ctx):
        time.sleep(float(ctx.params.get("delay", "0")))
        self.order.append(ctx.params["n"])

    def order_get(self, ctx):
        ctx.fields = {"order": ",".join(self.order)}


def main():
    cmbackend_init(SerialOnly())
