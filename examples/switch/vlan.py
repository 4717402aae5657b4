"""Demo agent "vlan": vlans and their member ports; depends on "ports".

Tables ``vlan`` (name, tag) and ``member`` (vlan, port); ``setop vlan.vlan
action=delete name=V`` deletes a vlan and its members, ``setop vlan.member
action=delete vlan=V port=P`` one member (and a RESTCONF DELETE of either: both
are in ``delete_tables``). ``member_set`` is an
@async_action: it asks the ports module whether the port exists, a blocking call
that must not run on the serial lane. Because it runs concurrently with the
serial lane, the agent guards its state with a lock. What it does is logged through
``logging``: the lines reach the module's log (``cmactor logs -f vlan``).
"""

import logging
import threading

import cmactor
from cmactor import async_action, ready
from cmactor.cmbackend import CmAgent, cmbackend_init

log = logging.getLogger("vlan")


class Vlan(CmAgent):
    # Its schema, for a RESTCONF server: two lists, whose entries a DELETE removes
    # (through vlan_setop and member_setop, with action=delete and the keys).
    index_columns = {"vlan": ("name",), "member": ("vlan", "port")}
    columns = {"vlan": ("name", "tag"), "member": ("vlan", "port")}
    delete_tables = ("vlan", "member")

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.vlans = {}  # name -> tag
        self.members = set()  # (vlan, port)
        self._conn = threading.local()

    def event_generate_default(self):
        with self.lock:
            self.vlans = {"default": "1"}
            self.members = set()
        ready()

    def event_load_start(self):
        with self.lock:
            self.vlans = {"default": "1"}
            self.members = set()

    def event_load_complete(self):
        with self.lock:
            log.info("config loaded: %d vlans, %d members", len(self.vlans), len(self.members))
        ready()

    def event_save_complete(self):
        with self.lock:
            log.info("config saved: %d vlans, %d members", len(self.vlans), len(self.members))

    # -- vlan table ------------------------------------------------------

    def vlan_get(self, ctx):
        with self.lock:
            names = sorted(self.vlans)
            name = ctx.params.get("name")
            if ctx.is_getnext:
                following = names if name is None else [n for n in names if n > name]
                if not following:
                    return
                name = following[0]
                if name != names[-1]:
                    ctx.more()
            elif name not in self.vlans:
                ctx.raise_error(f"vlan {name!r} does not exist")
            ctx.fields = {"name": name, "tag": self.vlans[name]}

    def vlan_set(self, ctx):
        name = ctx.params.get("name")
        tag = ctx.params.get("tag", "")
        if not name:
            ctx.raise_error("set vlan.vlan: give name=<vlan> tag=<1-4094>")
        if not tag.isdigit() or not 1 <= int(tag) <= 4094:
            ctx.raise_error(f"vlan {name}: tag must be a number from 1 to 4094, got {tag!r}")
        with self.lock:
            for other, other_tag in self.vlans.items():
                if other != name and other_tag == tag:
                    ctx.raise_error(f"vlan {name}: tag {tag} is already used by vlan {other!r}")
            self.vlans[name] = tag
        if not ctx.is_load:  # the rows of a load are counted once, at its end
            log.info("vlan %s set, tag %s", name, tag)
        ctx.fields = {"name": name, "tag": tag}

    def vlan_setop(self, ctx):
        if ctx.params.get("action") != "delete":
            ctx.raise_error("setop vlan.vlan: the only action is action=delete name=<vlan>")
        name = ctx.params.get("name")
        with self.lock:
            if name not in self.vlans:
                ctx.raise_error(f"vlan {name!r} does not exist")
            del self.vlans[name]
            self.members = {m for m in self.members if m[0] != name}
        log.info("vlan %s deleted, and its members", name)
        ctx.fields = {"deleted": name}

    # -- member table ----------------------------------------------------

    def member_get(self, ctx):
        with self.lock:
            rows = sorted(self.members)
            if ctx.is_getnext:
                if "vlan" in ctx.params and "port" in ctx.params:
                    rows = [r for r in rows if r > (ctx.params["vlan"], ctx.params["port"])]
                if not rows:
                    return
                if len(rows) > 1:
                    ctx.more()
                vlan, port = rows[0]
            else:
                vlan, port = ctx.params.get("vlan"), ctx.params.get("port")
                if (vlan, port) not in self.members:
                    ctx.raise_error(f"port {port!r} is not a member of vlan {vlan!r}")
            ctx.fields = {"vlan": vlan, "port": port}

    @async_action
    def member_set(self, ctx):
        vlan, port = ctx.params.get("vlan"), ctx.params.get("port")
        with self.lock:
            if vlan not in self.vlans:
                ctx.raise_error(f"vlan {vlan!r} does not exist")
        if not ctx.is_load:
            # A blocking call to another module: fine here, on the async lane.
            try:
                self._ports().cursor().execute("get ports.port", {"name": port})
            except cmactor.DatabaseError as exc:
                log.warning("port %s not added to vlan %s: %s", port, vlan, exc)
                ctx.raise_error(f"cannot add port {port!r} to vlan {vlan!r}: {exc}")
        with self.lock:
            self.members.add((vlan, port))
        if not ctx.is_load:
            log.info("port %s added to vlan %s", port, vlan)
        ctx.fields = {"vlan": vlan, "port": port}

    def member_setop(self, ctx):
        if ctx.params.get("action") != "delete":
            ctx.raise_error("setop vlan.member: the only action is action=delete vlan=<vlan> port=<port>")
        vlan, port = ctx.params.get("vlan"), ctx.params.get("port")
        with self.lock:
            if (vlan, port) not in self.members:
                ctx.raise_error(f"port {port!r} is not a member of vlan {vlan!r}")
            self.members.discard((vlan, port))
        log.info("port %s removed from vlan %s", port, vlan)
        ctx.fields = {"vlan": vlan, "port": port}

    def _ports(self):
        conn = getattr(self._conn, "conn", None)
        if conn is None or conn.closed:
            conn = self._conn.conn = cmactor.connect(username="vlan")
        return conn


def main():
    cmbackend_init(Vlan(), persistent_list=["vlan", "member"], config_deps=["ports"])
