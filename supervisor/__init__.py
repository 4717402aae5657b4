"""cmsupervisor: the runtime that owns cmactor's worker processes.

Imported as ``cmsupervisor`` (the folder is supervisor/): PyPI's supervisord owns
the import name ``supervisor``. Users reach it through ``cmactor.Supervisor`` and
the ``cmactor`` command.
"""
