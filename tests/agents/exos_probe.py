"""An EXOS app, run as a python-module, that imports what a test asks it to.

``get probe.imported code=STATEMENTS`` runs the import statements, which bind
``found``, and replies with str(found), or with the ImportError's text.
"""

import threading

from exos.api import CmAgent, cmbackend_init, ready


class Probe(CmAgent):
    def event_generate_default(self):
        ready()

    def imported_get(self, context, logger=None):
        namespace = {}
        try:
            exec(context.params["code"], namespace)
        except ImportError as exc:
            context.fields = {"found": "", "error": str(exc)}
            return
        context.fields = {"found": str(namespace["found"]), "error": ""}


cmbackend_init(Probe())
threading.Event().wait()
