"""Table member keyed by (vlan, port), with a getnext written as real EXOS agents write
theirs: vlan and port say where to go on from, any other param (tagged) filters.
It declares no index_columns, so only the client can say which columns are the key."""

from cmactor.cmbackend import CmAgent, cmbackend_init, ready

ROWS = [
    {"vlan": vlan, "port": port, "tagged": tagged}
    for vlan, port, tagged in [
        ("v10", "1", "no"),
        ("v10", "2", "yes"),
        ("v10", "3", "no"),
        ("v20", "1", "yes"),
        ("v20", "4", "no"),
    ]
]


class Filters(CmAgent):
    def event_generate_default(self):
        ready()

    def member_get(self, ctx):
        key = (ctx.params.get("vlan", ""), ctx.params.get("port", ""))
        tagged = ctx.params.get("tagged")
        if not ctx.is_getnext:
            found = [row for row in ROWS if (row["vlan"], row["port"]) == key]
            if not found:
                ctx.raise_error(f"no member {key[1]!r} in vlan {key[0]!r}")
            ctx.fields = dict(found[0])
            return
        following = [row for row in ROWS if (row["vlan"], row["port"]) > key and tagged in (None, row["tagged"])]
        if following:
            ctx.fields = dict(following[0])
            if len(following) > 1:
                ctx.more()


def main():
    cmbackend_init(Filters())
