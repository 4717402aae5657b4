"""An agent in the style of the original platform's apps, for the exos_dbapi tests.

Its getnext treats params as real EXOS agents do: as filters and start keys, not as
a plain "previous row". ``member`` is keyed (vlan, port):
- ``tagged`` (not an index column) filters every call;
- ``vlan`` alone: only that vlan's rows, from its first port;
- ``vlan`` and ``port``: the row after (vlan, port), in (vlan, port) order — which
  may be the next vlan's first: the agent calls ctx.more() while the table goes on,
  and leaves it to the client to stop at the end of the vlan it asked for.
Every call of ``member_get`` is recorded; ``calls`` reads (get) and clears (set) the record.
"""

import json

from cmactor import ready
from cmactor.cmbackend import CmAgent, cmbackend_init

MEMBERS = [
    {"vlan": "v10", "port": "p1", "tagged": "1", "descr": "uplink"},
    {"vlan": "v10", "port": "p2", "tagged": "0", "descr": None},
    {"vlan": "v10", "port": "p3", "tagged": "1", "descr": "server"},
    {"vlan": "v20", "port": "p1", "tagged": "1", "descr": "uplink"},
    {"vlan": "v20", "port": "p4", "tagged": "0", "descr": "printer"},
    {"vlan": "v30", "port": "p2", "tagged": "0", "descr": "camera"},
]


def _key(row):
    return row["vlan"], row["port"]


class Vlans(CmAgent):
    def __init__(self):
        super().__init__()
        self.vlans = {}
        self.calls = []
        self.many_calls = 0

    def event_generate_default(self):
        ready()

    def member_get(self, ctx):
        params = ctx.params
        self.calls.append({"op": "getnext" if ctx.is_getnext else "get", "params": dict(params)})
        table = [row for row in MEMBERS if "tagged" not in params or row["tagged"] == params["tagged"]]
        if not ctx.is_getnext:
            found = [row for row in table if _key(row) == (params.get("vlan"), params.get("port"))]
            if not found:
                ctx.raise_error(f"vlan {params.get('vlan')!r} has no member port {params.get('port')!r}")
            ctx.fields = dict(found[0])
            return
        if "port" in params:
            rows = [row for row in table if _key(row) > (params.get("vlan", ""), params["port"])]
        elif "vlan" in params:
            rows = [row for row in table if row["vlan"] == params["vlan"]]
        else:
            rows = table
        if not rows:
            return
        ctx.fields = dict(rows[0])
        if any(_key(row) > _key(rows[0]) for row in table):
            ctx.more()

    def calls_get(self, ctx):
        ctx.fields = {"calls": json.dumps(self.calls)}

    def calls_set(self, ctx):
        self.calls = []
        ctx.dirty = False

    # vlan: set and read back, by name; no index declared, so a walk carries every field
    def vlan_set(self, ctx):
        name = ctx.params["name"]
        self.vlans[name] = ctx.params.get("tag", "")
        ctx.notify_cli(f"vlan {name} created")
        ctx.notify_cli(f"vlan {name} tag {self.vlans[name]}")
        ctx.fields = {"name": name, "tag": self.vlans[name]}

    def vlan_get(self, ctx):
        name = ctx.params.get("name")
        if ctx.is_getnext:
            names = sorted(n for n in self.vlans if name is None or n > name)
            if not names:
                return
            name = names[0]
            if len(names) > 1:
                ctx.more()
        elif name not in self.vlans:
            ctx.raise_error(f"no vlan {name!r}")
        ctx.fields = {"name": name, "tag": self.vlans[name], "vr": ctx.vr_name, "seen": ",".join(sorted(ctx.params))}

    # member_show: what a `req.method = "show"` runs (cablediag asks its backend this way)
    def member_show(self, ctx):
        self.calls.append({"op": "show", "params": dict(ctx.params)})
        ctx.fields = {"shown": f"{ctx.params.get('vlan')}/{ctx.params.get('port')}", "getnext": str(ctx.is_getnext)}

    # many: a getnext table of `count` rows keyed by n. `fail_at`: the call for that row
    # raises; `blank_at`: that row's key is '' (the rows after it follow from n).
    # Every call is counted: `manycalls` reads the count and clears it.
    def many_get(self, ctx):
        self.many_calls += 1
        count = int(ctx.params.get("count", "10"))
        n = int(ctx.params["n"]) + 1 if "n" in ctx.params else 0
        if n >= count:
            return
        if str(n) == ctx.params.get("fail_at"):
            ctx.raise_error(f"row {n} is broken")
        ctx.fields = {"n": "" if str(n) == ctx.params.get("blank_at") else n}
        if n + 1 < count:
            ctx.more()

    # ports: a getnext that treats its params as a filter, as many platform agents do:
    # given a port, it answers that port's row (and says more follow).
    def ports_get(self, ctx):
        self.calls.append({"op": "getnext" if ctx.is_getnext else "get", "params": dict(ctx.params)})
        names = ["p1", "p2", "p3"]
        port = ctx.params.get("port", names[0])
        if port in names:
            ctx.fields = {"port": port, "speed": "1000"}
            if port != names[-1]:
                ctx.more()

    def manycalls_get(self, ctx):
        ctx.fields = {"calls": self.many_calls}
        self.many_calls = 0


def main():
    cmbackend_init(Vlans())
