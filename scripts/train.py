#!/usr/bin/env python3
"""Train SimpleConvNet from a checkout: ``python scripts/train.py --backend cpu|gpu [options]``.

The same as ``xpcnn train`` (see ``xpcnn train --help``); the defaults are the seed's recipe.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xpcnn.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
