"""Demo agent "stats": read-only per-port traffic counters (a getnext table).

Table ``counters``: port, rx_packets, tx_packets. Nothing to set or save: the
agent has no counters_set, so a set is refused with an error naming the table.
"""

import time

from cmactor import ready
from cmactor.cmbackend import CmAgent, cmbackend_init

PORTS = [str(n) for n in range(1, 9)]


class Stats(CmAgent):
    # Its schema, for a RESTCONF server: a list keyed by port, config false (no counters_set).
    index_columns = {"counters": ("port",)}
    columns = {"counters": ("port", "rx_packets", "tx_packets")}

    def __init__(self):
        super().__init__()
        self.started = time.monotonic()

    def event_generate_default(self):
        ready()

    def _row(self, port):
        elapsed = time.monotonic() - self.started
        rate = 1000 * int(port)
        return {"port": port, "rx_packets": int(elapsed * rate), "tx_packets": int(elapsed * rate / 2)}

    def counters_get(self, ctx):
        port = ctx.params.get("port")
        if ctx.is_getnext:
            following = PORTS if port is None else PORTS[PORTS.index(port) + 1 :] if port in PORTS else []
            if not following:
                return
            port = following[0]
            if port != PORTS[-1]:
                ctx.more()
        elif port not in PORTS:
            ctx.raise_error(f"no counters for port {port!r}; ports are {', '.join(PORTS)}")
        ctx.fields = self._row(port)


def main():
    cmbackend_init(Stats())
