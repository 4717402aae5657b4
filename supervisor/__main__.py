"""``python -m cmsupervisor``: the ``cmactor`` command."""

import sys

from .cli import main

sys.exit(main())
