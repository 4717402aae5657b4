"""The ``cmactor`` command line: ``main`` runs it (the console script and ``python -m cmsupervisor``)."""

from cmsupervisor.cli.program import main

__all__ = ["main"]
