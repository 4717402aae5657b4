"""A test app in EXOS's shape, run as a python-module; its argv says what it does.

(no args)            a backend: table info reports sys.argv, __name__ and imports
--plain              a plain process: ready() and nothing else, serving on
--exit N [--after S] then exit with status N (S seconds after ready())
--init-after-ready   call ready(), then cmbackend_init() (a programming error)
--unprovided NAME    try `import NAME` first and report the ImportError text
"""

import argparse
import logging
import sys
import threading
import time

try:
    import exsh  # noqa: F401

    i_am_script = True
except ImportError:
    import exos
    import exos.api
    from exos.api import (  # noqa: F401
        CmAgent as ApiAgent,
        TraceBufferHandler,
        cmbackend,
        cmbackend_init as api_init,  # noqa: F401
        exec_cli,
        exec_cli_async,
        exos_dbapi as dbapi,
        ready,
    )
    from exos.api.cmbackend import CmAgent, cmbackend_init
    from exos.api.cmfrontend import connect  # noqa: F401

    i_am_script = False


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="exos_app")
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--exit", type=int)
    parser.add_argument("--after", type=float, default=0.0)
    parser.add_argument("--init-after-ready", action="store_true")
    parser.add_argument("--unprovided", default="exos.api.vlan")
    parser.add_argument("--trace", default="")
    return parser.parse_args(argv)


class App(CmAgent):
    def __init__(self, args):
        self.args = args  # set before super().__init__(), as EXOS apps do
        try:
            __import__(args.unprovided)
            self.unprovided = "imported"
        except ImportError as exc:
            self.unprovided = str(exc)
        super().__init__()

    def event_generate_default(self):
        ready()

    def info_get(self, context, logger=None):
        import cmactor.cmbackend
        import cmactor.exos.api
        import cmactor.exos_dbapi

        context.fields = {
            "argv": " ".join(sys.argv),
            "name": __name__,
            "same_cmbackend": str(cmbackend is cmactor.cmbackend and ApiAgent is CmAgent),
            "same_dbapi": str(dbapi is cmactor.exos_dbapi and exos.api.cmfrontend is dbapi),
            "exos_api": str(exos.api.__doc__ == cmactor.exos.api.__doc__ and exos.api.ready is cmactor.cmbackend.ready),
            "unprovided": self.unprovided,
        }

    def trace_set(self, context, logger=None):
        """Log the text through a TraceBufferHandler, on a logger that propagates or one that does not."""
        name = context.params["logger"]
        handler = TraceBufferHandler(name, 1024)
        traced = logging.getLogger(name)
        traced.propagate = context.params.get("propagate") == "yes"
        traced.setLevel(logging.INFO)
        traced.addHandler(handler)
        traced.info("%s", context.params["text"])
        traced.removeHandler(handler)
        context.fields = {"buffered": "|".join(handler.lines())}


def main(argv):
    args = parse_args(argv)
    if args.plain or args.init_after_ready:
        ready()
        if args.init_after_ready:
            cmbackend_init(App(args))
        if args.exit is not None:
            time.sleep(args.after)
            sys.exit(args.exit)
        threading.Event().wait()
    cmbackend_init(App(args))
    threading.Event().wait()


if __name__ == "__main__" and not i_am_script:
    main(sys.argv[1:])
