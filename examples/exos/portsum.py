"""Example EXOS-style app "portsum": how many member ports each watched vlan has.

Shaped like the platform's own apps (ezvxlan and friends), after a Python 3 port:
- the ``try: import exsh`` block that tells the switch's script shell from a process;
- started as a python-module with its arguments in ``sys.argv``
  (``create process portsum python-module portsum start auto -- --watch default``;
  here the ``args`` key of cmactor.toml), parsed with argparse;
- a ``CmAgent`` subclass that sets its attributes before ``super().__init__()``
  and whose events only queue work for a dispatcher thread, which calls
  ``ready()`` once the first summary is built;
- other modules queried through ``exos_dbapi`` (a filtered getnext walk with
  ``Column``, ``add_index`` and ``CM_FLAG_GETNEXT``), waiting with
  ``when_ready()`` when one is unavailable, and paged through ``exec_cli``'s
  ``debug cfgmgr show next maximum-rows N``;
- a trace buffer on its logger, and a main thread that joins the dispatcher forever.

Tables: ``watch`` (name; persistent: the vlans to watch, none meaning all) and
``summary`` (vlan, ports, count, tagged; read-only), with
``setop portsum.summary action=refresh`` to rebuild it.
"""

import argparse
import json
import logging
import queue
import sys
import threading

try:
    import exsh  # noqa: F401 - present only in the switch's script shell

    i_am_script = True
except ImportError:
    from exos.api import TraceBufferHandler, exec_cli, exos_dbapi as dbapi, ready
    from exos.api.cmbackend import CmAgent, cmbackend_init

    i_am_script = False

PROCESS = "portsum"
log = logging.getLogger(PROCESS)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROCESS, description="member ports per vlan")
    parser.add_argument("-w", "--watch", nargs="*", default=[], help="vlans to watch when none are configured")
    parser.add_argument("--page", type=int, default=50, help="vlans per 'debug cfgmgr show next' page")
    parser.add_argument("--trace-size", type=int, default=8192, help="bytes of trace kept in memory")
    return parser.parse_args(argv)


def members_of(vlan):
    """(port, tagged) of each member of ``vlan``: a getnext walk held at vlan=<vlan>."""
    members = dbapi.Table("vlanmgr", "member")
    vlan_col, port_col = dbapi.Column(members, "vlan"), dbapi.Column(members, "port")
    req = dbapi.request(dbapi.CM_OP_GET)
    req._op_flag |= dbapi.CM_FLAG_GETNEXT
    req.add_index(vlan_col)
    req.add_index(port_col)
    req.add_param(vlan_col, vlan)
    req.add_field("port", port_col)
    req.add_field("tagged", dbapi.Column(members, "tagged"))
    conn = dbapi.connect()
    try:
        cursor = conn.cursor()
        cursor.execute(req)
        return [(row.field_values["port"], row.field_values["tagged"]) for row in cursor.iterrow()]
    finally:
        conn.close()


def all_vlans(page):
    """Every vlan's name, paged through the config manager's CLI as ezvxlan pages it."""
    names, last = [], None
    while True:
        output = exec_cli([f"debug cfgmgr show next maximum-rows {page} vlanmgr.vlan name={last}"])
        rows = json.loads(output)["data"]
        for row in rows:
            if row["status"] == "ERROR":
                raise RuntimeError(f"vlanmgr.vlan: {row['message']}")
            names.append(row["name"])
        if not rows or rows[-1]["status"] != "MORE":
            return names
        last = rows[-1]["name"]


class PortSum(CmAgent):
    # Its schema, for a RESTCONF server: watch a list a DELETE removes entries of
    # (watch_setop action=delete), summary a list that is config false.
    index_columns = {"watch": ("name",), "summary": ("vlan",)}
    columns = {"watch": ("name",), "summary": ("vlan", "ports", "count", "tagged")}
    delete_tables = ("watch",)

    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.lock = threading.Lock()
        self.watch = set(args.watch)
        self.summary = {}  # vlan -> [(port, tagged), ...]
        super().__init__()

    # -- events: they only queue work; the dispatcher does it --------------

    def event_generate_default(self):
        self.work.put("start")

    def event_load_start(self):
        with self.lock:
            self.watch = set()

    def event_load_complete(self):
        self.work.put("start")

    def refresh(self):
        with self.lock:
            watched = sorted(self.watch)
        names = watched or all_vlans(self.args.page)
        summary = {name: members_of(name) for name in names}
        with self.lock:
            self.summary = summary
        log.info("summary of %d vlans rebuilt", len(summary))

    # -- watch: the vlans to summarise -------------------------------------

    def watch_get(self, context, logger=None):
        with self.lock:
            names = sorted(self.watch)
        after = context.params.get("name", "")
        if context.is_getnext:
            names = [name for name in names if name > after]
            if not names:
                return
            if len(names) > 1:
                context.more()
        elif after not in names:
            context.raise_error(f"portsum does not watch vlan {after!r}")
        context.fields = {"name": names[0] if context.is_getnext else after}

    def watch_set(self, context, logger=None):
        name = context.params.get("name")
        if not name:
            context.raise_error("set portsum.watch: give name=<vlan>")
        with self.lock:
            self.watch.add(name)
        if not context.is_load:
            self.work.put("refresh")

    def watch_setop(self, context, logger=None):
        if context.params.get("action") != "delete":
            context.raise_error("setop portsum.watch: the only action is action=delete name=<vlan>")
        with self.lock:
            self.watch.discard(context.params.get("name"))
        self.work.put("refresh")

    # -- summary: read-only --------------------------------------------------

    def summary_get(self, context, logger=None):
        with self.lock:
            summary = dict(self.summary)
        vlan = context.params.get("vlan", "")
        if context.is_getnext:
            names = sorted(name for name in summary if name > vlan)
            if not names:
                return
            if len(names) > 1:
                context.more()
            vlan = names[0]
        elif vlan not in summary:
            context.raise_error(f"no summary for vlan {vlan!r}: watch it with set portsum.watch name={vlan}")
        members = summary[vlan]
        context.fields = {
            "vlan": vlan,
            "ports": ",".join(port for port, _ in members),
            "count": len(members),
            "tagged": sum(1 for _, tagged in members if tagged == "yes"),
        }

    def summary_setop(self, context, logger=None):
        if context.params.get("action") != "refresh":
            context.raise_error("setop portsum.summary: the only action is action=refresh")
        self.work.put("refresh")


def dispatch(agent, work):
    """The app's own thread: refreshes the summary, and calls ready() after the first."""
    announced = False
    while True:
        item = work.get()
        try:
            agent.refresh()
        except dbapi.ModuleUnavailable as exc:
            log.warning("%s is unavailable (%s); waiting for it", exc.module_name, exc)
            exc.when_ready(timeout=5)
            work.put(item)
            continue
        except (dbapi.Error, RuntimeError) as exc:
            log.error("summary not rebuilt: %s", exc)
        if item == "start" and not announced:
            ready()
            announced = True


def main(argv):
    args = parse_args(argv)
    log.setLevel(logging.DEBUG)
    log.addHandler(TraceBufferHandler(PROCESS, args.trace_size))
    work = queue.Queue()
    agent = PortSum(args, work)
    dispatcher = threading.Thread(target=dispatch, args=(agent, work), name=f"{PROCESS}-dispatch")
    dispatcher.start()
    cmbackend_init(agent, persistent_list=["watch"], config_deps=["vlanmgr"])
    dispatcher.join()


if __name__ == "__main__" and not i_am_script:
    main(sys.argv[1:])
