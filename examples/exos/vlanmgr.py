"""Example EXOS-style backend "vlanmgr": vlans and their member ports.

Written the way the platform's own apps are, and started the way EXOS starts
them (``create process vlanmgr python-module vlanmgr start auto``): the file
runs as ``__main__``, its imports come from ``exos.api``, its main thread
registers the agent and then blocks forever.

Its getnext is written as real EXOS agents write theirs: the index params
(``name``; ``vlan`` and ``port``) say where to go on from, and any other param
is a filter (``member`` rows with ``tagged=yes`` only, say). ``index_columns``
carries the index over from the original app's schema, so that a walk that names
no index (``cmactor getnext vlanmgr.member``, the save walk) hands the agent
only the previous row's key, never its other fields as filters.
"""

import threading

try:
    import exsh  # noqa: F401 - present only in the switch's script shell

    i_am_script = True
except ImportError:
    from exos.api import ready
    from exos.api.cmbackend import CmAgent, cmbackend_init

    i_am_script = False


class VlanMgr(CmAgent):
    index_columns = {"vlan": ("name",), "member": ("vlan", "port")}
    # Every column, for a RESTCONF server; a DELETE of a vlan runs vlan_setop action=delete.
    columns = {"vlan": ("name", "tag"), "member": ("vlan", "port", "tagged")}
    delete_tables = ("vlan",)

    def __init__(self):
        self.lock = threading.Lock()
        self.vlans = {}  # name -> tag
        self.members = {}  # (vlan, port) -> "yes" | "no" (tagged)
        super().__init__()

    # -- events ------------------------------------------------------------

    def event_generate_default(self):
        self.event_load_start()
        ready()

    def event_load_start(self):
        with self.lock:
            self.vlans = {"default": "1"}
            self.members = {}

    def event_load_complete(self):
        ready()

    # -- vlan: index name ----------------------------------------------------

    def vlan_get(self, context, logger=None):
        params = context.params
        with self.lock:
            if context.is_getnext:
                after = params.get("name", "")
                following = sorted(name for name in self.vlans if name > after)
                if not following:
                    return
                name = following[0]
                if len(following) > 1:
                    context.more()
            else:
                name = params.get("name")
                if name not in self.vlans:
                    context.raise_error(f"vlan {name!r} does not exist")
            context.fields = {"name": name, "tag": self.vlans[name]}

    def vlan_set(self, context, logger=None):
        name, tag = context.params.get("name"), context.params.get("tag", "")
        if not name:
            context.raise_error("set vlanmgr.vlan: give name=<vlan> tag=<1-4094>")
        if not tag.isdigit() or not 1 <= int(tag) <= 4094:
            context.raise_error(f"vlan {name}: tag must be a number from 1 to 4094, got {tag!r}")
        with self.lock:
            self.vlans[name] = tag

    def vlan_setop(self, context, logger=None):
        name = context.params.get("name")
        if context.params.get("action") != "delete":
            context.raise_error("setop vlanmgr.vlan: the only action is action=delete name=<vlan>")
        with self.lock:
            if self.vlans.pop(name, None) is None:
                context.raise_error(f"vlan {name!r} does not exist")
            self.members = {key: tagged for key, tagged in self.members.items() if key[0] != name}

    # -- member: index vlan, port; tagged is a filter ------------------------

    def member_get(self, context, logger=None):
        params = context.params
        key = (params.get("vlan", ""), params.get("port", ""))
        tagged = params.get("tagged")
        with self.lock:
            if not context.is_getnext:
                if key not in self.members:
                    context.raise_error(f"port {key[1]!r} is not a member of vlan {key[0]!r}")
                context.fields = {"vlan": key[0], "port": key[1], "tagged": self.members[key]}
                return
            following = sorted(k for k, t in self.members.items() if k > key and tagged in (None, t))
            if not following:
                return
            vlan, port = following[0]
            if len(following) > 1:
                context.more()
            context.fields = {"vlan": vlan, "port": port, "tagged": self.members[(vlan, port)]}

    def member_set(self, context, logger=None):
        vlan, port = context.params.get("vlan"), context.params.get("port")
        tagged = context.params.get("tagged", "no")
        if tagged not in ("yes", "no"):
            context.raise_error(f"member {vlan}/{port}: tagged is yes or no, got {tagged!r}")
        with self.lock:
            if vlan not in self.vlans:
                context.raise_error(f"vlan {vlan!r} does not exist: set vlanmgr.vlan name={vlan} first")
            if not port:
                context.raise_error("set vlanmgr.member: give vlan=<vlan> port=<port>")
            self.members[(vlan, port)] = tagged


if __name__ == "__main__" and not i_am_script:
    cmbackend_init(VlanMgr(), persistent_list=["vlan", "member"])
    threading.Event().wait()  # the agent runs on the runtime's threads from here on
