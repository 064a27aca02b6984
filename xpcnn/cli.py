"""``python -m xpcnn.cli`` and the ``xpcnn`` console script: the command line lives in
`xpcnn.app.cli`."""

import sys

from .app.cli import main

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
