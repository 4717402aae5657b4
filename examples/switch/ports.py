"""Demo agent "ports": the switch's ports, a persistent table.

Table ``port``: name, enabled ("1"/"0"), speed (Mb/s), description.
``setop ports.port action=enable_all|disable_all`` reports progress with notify_cli.
Each change is logged through ``logging``: ``cmactor logs -f ports`` shows it.
"""

import logging

from cmactor import ready
from cmactor.cmbackend import CmAgent, cmbackend_init

log = logging.getLogger("ports")

PORT_COUNT = 8
SPEEDS = ("10", "100", "1000", "10000")


def _default_port():
    return {"enabled": "1", "speed": "1000", "description": ""}


def _order(name):
    return int(name) if name.isdigit() else 1 << 30


class Ports(CmAgent):
    # Its schema, for a RESTCONF server: a list of ports keyed by name.
    index_columns = {"port": ("name",)}
    columns = {"port": ("name", "enabled", "speed", "description")}

    def __init__(self):
        super().__init__()
        self.ports = {}

    def _defaults(self):
        self.ports = {str(n): _default_port() for n in range(1, PORT_COUNT + 1)}

    def event_generate_default(self):
        self._defaults()
        ready()

    def event_load_start(self):
        self._defaults()

    def event_load_complete(self):
        disabled = [name for name, port in self.ports.items() if port["enabled"] == "0"]
        log.info("config loaded: %d ports, disabled: %s", len(self.ports), ", ".join(disabled) or "none")
        ready()

    def event_save_complete(self):
        log.info("config saved: %d ports", len(self.ports))

    def port_get(self, ctx):
        names = sorted(self.ports, key=_order)
        name = ctx.params.get("name")
        if ctx.is_getnext:
            # First call: no name, start at the first port. Next calls carry the
            # previous row's fields, so continue after that port.
            following = names if name is None else [n for n in names if _order(n) > _order(name)]
            if not following:
                return
            name = following[0]
            if name != names[-1]:
                ctx.more()
        elif name not in self.ports:
            ctx.raise_error(f"port {name!r} does not exist; ports are {', '.join(names)}")
        ctx.fields = {"name": name, **self.ports[name]}

    def port_set(self, ctx):
        name = ctx.params.get("name")
        if name not in self.ports:
            ctx.raise_error(f"port {name!r} does not exist; ports are 1-{PORT_COUNT}")
        port = dict(self.ports[name])
        if "enabled" in ctx.params:
            if ctx.params["enabled"] not in ("0", "1"):
                ctx.raise_error(f"port {name}: enabled must be 0 or 1, got {ctx.params['enabled']!r}")
            port["enabled"] = ctx.params["enabled"]
        if "speed" in ctx.params:
            if ctx.params["speed"] not in SPEEDS:
                ctx.raise_error(f"port {name}: speed must be one of {', '.join(SPEEDS)}, got {ctx.params['speed']!r}")
            port["speed"] = ctx.params["speed"]
        if "description" in ctx.params:
            port["description"] = ctx.params["description"]
        if not ctx.is_load:  # the rows of a load are summed up once, at its end
            changed = {key: value for key, value in port.items() if self.ports[name][key] != value}
            if changed:
                # A port taken down is what an operator reading the log looks for first.
                level = logging.WARNING if changed.get("enabled") == "0" else logging.INFO
                log.log(level, "port %s set: %s", name, ", ".join(f"{key}={value}" for key, value in changed.items()))
        self.ports[name] = port
        ctx.fields = {"name": name, **port}

    def port_setop(self, ctx):
        action = ctx.params.get("action")
        if action not in ("enable_all", "disable_all"):
            ctx.raise_error(f"setop ports.port: action must be enable_all or disable_all, got {action!r}")
        value = "1" if action == "enable_all" else "0"
        for name in sorted(self.ports, key=_order):
            self.ports[name]["enabled"] = value
            ctx.notify_cli(f"port {name}: enabled={value}")
        log.warning("every port %s", "enabled" if value == "1" else "disabled")
        ctx.fields = {"changed": len(self.ports)}


def main():
    cmbackend_init(Ports(), persistent_list=["port"])
