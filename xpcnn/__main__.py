"""``python -m xpcnn ...``: the same as the ``xpcnn`` command."""

import sys

from .app.cli import main

sys.exit(main())
