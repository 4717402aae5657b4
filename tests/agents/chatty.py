"""A test agent that writes to its log, stdout and stderr on request (tests/test_logs.py)."""

import logging
import os
import subprocess
import sys

from cmactor import ready
from cmactor.cmbackend import CmAgent, cmbackend_init

log = logging.getLogger("chatty")


class Chatty(CmAgent):
    def event_generate_default(self):
        print(f"chatty pid {os.getpid()} started")
        ready()

    # say: text (its "{n}" numbered), count times, to stdout, stderr, log, or raw (fd 1, no newline)
    def say_set(self, ctx):
        text = ctx.params.get("text", "hello")
        to = ctx.params.get("to", "stdout")
        count = int(ctx.params.get("count", "1"))
        for n in range(count):
            line = text.replace("{n}", str(n))
            if to == "stdout":
                print(line)
            elif to == "stderr":
                print(line, file=sys.stderr)
            elif to == "log":
                log.warning("%s", line)
            else:
                os.write(1, line.encode())
        ctx.dirty = False
        ctx.fields = {"said": str(count)}

    # die: last words (count lines of them, "{n}" numbered) on stdout, a last line without
    # its newline on stderr, and gone
    def die_set(self, ctx):
        text = ctx.params.get("text", "last words")
        for n in range(int(ctx.params.get("count", "1"))):
            print(text.replace("{n}", str(n)))
        os.write(2, ctx.params.get("tail", "").encode())
        os._exit(int(ctx.params.get("code", "3")))

    # spawn: a child that leaves the worker's process group and keeps its stdout open
    def spawn_set(self, ctx):
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time; print('child says hi', flush=True); time.sleep(float(sys.argv[1]))",
                ctx.params.get("secs", "5"),
            ],
            start_new_session=True,
        )
        ctx.dirty = False
        ctx.fields = {"pid": str(child.pid)}


def main():
    cmbackend_init(Chatty())
