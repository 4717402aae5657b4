"""Runs as __main__ from "pmpkg.app": a relative import resolves inside the package."""

import sys
import threading

from cmactor.cmbackend import CmAgent, cmbackend_init, ready

from . import helper


class Pkg(CmAgent):
    def event_generate_default(self):
        ready()

    def info_get(self, ctx):
        ctx.fields = {"argv": " ".join(sys.argv), "name": __name__, "package": __package__, "helper": helper.WORD}


if __name__ == "__main__":
    cmbackend_init(Pkg())
    threading.Event().wait()
