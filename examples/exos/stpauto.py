"""Example EXOS-style app "stpauto": each vlan, as it is created, joins a spanning-tree domain.

Shaped like the platform's ezspantree, after a Python 3 port, and started as it is
(``create process stpauto python-module stpauto start auto -- --stpd s0``):
- the ``try: import exsh`` block, whose fallback imports ``exos.api.vlan``, a platform
  API only a switch has: off a switch the example supplies a simulation of it
  (``sim/exos/api/vlan.py``, served by the ``[exos] path`` of cmactor.toml);
- a ``CmAgent`` whose ``event_generate_default`` only queues work for a dispatcher
  thread fed by a ``queue.Queue``; the dispatcher calls ``ready()`` and then
  subscribes to ``vlan.notify.vlan_create`` (and ``vlan_delete``);
- the callbacks only queue the vlan: the dispatcher adds it to the domain, one at a
  time, in the order the notifications came;
- a trace buffer on its logger, and a main thread that joins the dispatcher forever.

Notifications announce the vlans created after the subscription only, so after
subscribing the app walks the vlans that already exist (``vlanmgr.vlan`` here; the
platform's vlan table on a switch) and adds those too.

cmactor has no spanning tree, so where ezspantree runs ``configure stpd s0 add vlan
V ports all`` this app keeps the table ``bound`` (vlan, stpd; read-only: rebuilt from
the vlans at each start, so not persistent): a row per vlan in the domain, removed
when the vlan is deleted. ``getnext stpauto.bound stpd=s0`` lists one domain's vlans.
"""

import argparse
import logging
import queue
import sys
import threading

try:
    import exsh  # noqa: F401 - present only in the switch's script shell

    i_am_script = True
except ImportError:
    from exos.api import TraceBufferHandler, exos_dbapi as dbapi, ready, vlan
    from exos.api.cmbackend import CmAgent, cmbackend_init

    i_am_script = False

PROCESS = "stpauto"
VLAN_TABLE = ("vlanmgr", "vlan")  # where the vlans that exist at start are read (name, tag)
log = logging.getLogger(PROCESS)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROCESS, description="add each new vlan to a spanning-tree domain")
    parser.add_argument("--stpd", default="s0", help="the spanning-tree domain new vlans join (default %(default)s)")
    parser.add_argument("--trace-size", type=int, default=8192, help="bytes of trace kept in memory")
    return parser.parse_args(argv)


def existing_vlans():
    """The name of every vlan configured: a getnext walk with the index left open."""
    table = dbapi.Table(*VLAN_TABLE)
    name = dbapi.Column(table, "name")
    req = dbapi.request(dbapi.CM_OP_GET)
    req._op_flag |= dbapi.CM_FLAG_GETNEXT
    req.add_index(name)
    req.add_field("name", name)
    conn = dbapi.connect()
    try:
        cursor = conn.cursor()
        cursor.execute(req)
        return [row.field_values["name"] for row in cursor.iterrow()]
    finally:
        conn.close()


class StpAuto(CmAgent):
    index_columns = {"bound": ("vlan",)}
    columns = {"bound": ("vlan", "stpd")}  # for a RESTCONF server: a list, config false

    def __init__(self, args, work):
        self.args = args
        self.work = work  # (function, arg, ...) for the dispatcher
        self.lock = threading.Lock()  # bound: the dispatcher writes it, actions read it
        self.bound = {}  # vlan -> stpd
        self.started = False  # touched by the dispatcher only
        super().__init__()

    # -- events: they only queue work; the dispatcher does it --------------

    def event_generate_default(self):
        self.work.put((self.start,))

    def event_load_complete(self):
        # Nothing of this module is saved, but a config file may still hold an empty
        # section for it: then the load events come instead of generate_default.
        self.work.put((self.start,))

    # -- the dispatcher's work ---------------------------------------------

    def start(self):
        if self.started:
            return
        self.started = True
        ready()
        vlan.notify.vlan_create.add_observer(self.vlan_created)
        vlan.notify.vlan_delete.add_observer(self.vlan_deleted)
        # Subscribed first, then walked: a vlan created meanwhile is in the walk or
        # announced (or both: adding is idempotent), never in neither.
        self.work.put((self.add_existing,))

    def add_existing(self):
        try:
            names = existing_vlans()
        except dbapi.ModuleUnavailable as exc:
            log.warning("%s is unavailable (%s); waiting for it", exc.module_name, exc)
            exc.when_ready(timeout=5)
            self.work.put((self.add_existing,))
            return
        for name in names:
            self.add_to_stpd(name)

    def add_to_stpd(self, vlan_name):
        # On a switch: configure stpd <stpd> add vlan <vlan> ports all, then
        # enable stpd <stpd> auto-bind vlan <vlan>.
        with self.lock:
            already = self.bound.get(vlan_name) == self.args.stpd
            self.bound[vlan_name] = self.args.stpd
        if not already:
            log.info("vlan %s added to stpd %s", vlan_name, self.args.stpd)

    def remove_from_stpd(self, vlan_name):
        with self.lock:
            stpd = self.bound.pop(vlan_name, None)
        if stpd is not None:
            log.info("vlan %s deleted: gone from stpd %s", vlan_name, stpd)

    # -- platform callbacks: called on the platform's thread; they only queue --

    def vlan_created(self, *args, **kwargs):
        log.debug("vlan_create %s %s", args, kwargs)
        name = kwargs.get("vlan_name")
        if name is None:
            log.warning("vlan_create without vlan_name: %s", kwargs)
            return
        self.work.put((self.add_to_stpd, name))

    def vlan_deleted(self, *args, **kwargs):
        log.debug("vlan_delete %s %s", args, kwargs)
        name = kwargs.get("vlan_name")
        if name is not None:
            self.work.put((self.remove_from_stpd, name))

    # -- bound: index vlan; stpd is a filter ---------------------------------

    def bound_get(self, context, logger=None):
        params = context.params
        stpd = params.get("stpd")
        with self.lock:
            if not context.is_getnext:
                name = params.get("vlan")
                if name not in self.bound:
                    context.raise_error(f"vlan {name!r} is in no spanning-tree domain")
                context.fields = {"vlan": name, "stpd": self.bound[name]}
                return
            after = params.get("vlan", "")
            following = sorted(n for n, s in self.bound.items() if n > after and stpd in (None, s))
            if not following:
                return
            if len(following) > 1:
                context.more()
            context.fields = {"vlan": following[0], "stpd": self.bound[following[0]]}


def dispatch(work):
    """The app's own thread: runs the queued work in order; a failure is logged, not fatal."""
    while True:
        func, *params = work.get()
        try:
            func(*params)
        except Exception:
            log.exception("%s%r failed", func.__name__, tuple(params))


def main(argv):
    args = parse_args(argv)
    log.setLevel(logging.DEBUG)
    log.addHandler(TraceBufferHandler(PROCESS, args.trace_size))
    work = queue.Queue()
    agent = StpAuto(args, work)
    dispatcher = threading.Thread(target=dispatch, args=(work,), name=f"{PROCESS}-dispatch")
    dispatcher.start()
    cmbackend_init(agent, config_deps=[VLAN_TABLE[0]])
    dispatcher.join()


if __name__ == "__main__" and not i_am_script:
    main(sys.argv[1:])
