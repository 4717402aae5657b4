"""Lists a read-only statistics table in persistent_list, as some EXOS apps do."""

from cmactor.cmbackend import CmAgent, cmbackend_init, ready


class Stats(CmAgent):
    def __init__(self):
        super().__init__()
        self.names = {}

    def event_generate_default(self):
        ready()

    def event_load_complete(self):
        ready()

    def name_get(self, ctx):
        if ctx.is_getnext:
            after = ctx.params.get("key", "")
            keys = sorted(k for k in self.names if k > after)
            if keys:
                ctx.fields = {"key": keys[0], "value": self.names[keys[0]]}
                if len(keys) > 1:
                    ctx.more()
        elif ctx.params.get("key") in self.names:
            ctx.fields = {"key": ctx.params["key"], "value": self.names[ctx.params["key"]]}

    def name_set(self, ctx):
        self.names[ctx.params["key"]] = ctx.params.get("value", "")

    def counters_get(self, ctx):
        if not ctx.params:
            ctx.fields = {"rx": "10", "tx": "20"}


def main():
    cmbackend_init(Stats(), persistent_list=["counters", "name"])
