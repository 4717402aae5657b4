"""``python -m cmsupervisor``: the ``cmactor`` command."""

import sys

from cmsupervisor.cli import main

sys.exit(main())
