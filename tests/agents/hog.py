"""A test agent that takes memory when told: a persistent kv table, and hog, whose set
starts a thread that keeps ``chunks`` blocks of ``mib`` MiB (0: without end), one every
``every`` seconds. Each block is written through, so every page of it is resident."""

import threading
import time

from cmactor import ready
from cmactor.cmbackend import CmAgent, cmbackend_init

MIB = 1024 * 1024


class Hog(CmAgent):
    def __init__(self):
        super().__init__()
        self.kv = {}
        self.kept = []

    def event_generate_default(self):
        ready()

    def event_load_complete(self):
        ready()

    def kv_set(self, ctx):
        self.kv[ctx.params["key"]] = ctx.params.get("value", "")

    def kv_get(self, ctx):
        keys = sorted(self.kv)
        key = ctx.params.get("key")
        if ctx.is_getnext:
            later = [each for each in keys if key is None or each > key]
            if not later:
                return
            key = later[0]
            if len(later) > 1:
                ctx.more()
        ctx.fields = {"key": key, "value": self.kv[key]}

    def hog_set(self, ctx):
        size = int(ctx.params.get("mib", "10")) * MIB
        chunks = int(ctx.params.get("chunks", "0"))
        every = float(ctx.params.get("every", "0.02"))
        threading.Thread(target=self._take, args=(size, chunks, every), daemon=True).start()
        ctx.dirty = False  # a command, not config

    def hog_get(self, ctx):
        ctx.fields = {"kept": sum(map(len, self.kept))}

    def _take(self, size, chunks, every):
        while not chunks or len(self.kept) < chunks:
            self.kept.append(b"\x01" * size)
            time.sleep(every)


def main():
    cmbackend_init(Hog(), persistent_list=["kv"])
