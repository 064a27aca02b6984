#!/usr/bin/env python
"""DeepConvNet's 3 x 3 multi-channel convolutions (conv2-conv6 of `scripts/conv3x3_study.py`)
with a git revision's compiled kernels (its `xpcnn/ops/fast_numba.py` and `winograd.py`)
against the working tree's, alternating in one process (the order swapping each round):
median forward / backward ms of each layer and their sums, batch 100, float32.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/conv3x3_ab.py 2c65343 --rounds 25
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

import conv3x3_study
import numpy as np

from xpcnn.ops import fast_numba

REPO = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path) -> ModuleType:
    """`path` imported as the module ``xpcnn.ops.<name>`` (its relative imports from xpcnn.ops)."""
    spec = importlib.util.spec_from_file_location(f"xpcnn.ops.{name}", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "xpcnn.ops"
    spec.loader.exec_module(module)
    return module


def kernels_at(revision: str, folder: Path) -> ModuleType:
    """`revision`'s fast_numba module, wired to its own winograd module."""
    for name in ("winograd", "fast_numba"):
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:xpcnn/ops/{name}.py"],
                              capture_output=True, text=True, check=True).stdout
        (folder / f"_at_revision_{name}.py").write_text(text)
    winograd = _load("_at_revision_winograd", folder / "_at_revision_winograd.py")
    module = _load("_at_revision_fast_numba", folder / "_at_revision_fast_numba.py")
    module.winograd = winograd
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("revision", help="the git revision to compare the working tree with")
    p.add_argument("--rounds", type=int, default=25)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        contenders = [(args.revision, kernels_at(args.revision, Path(folder))), ("working tree", fast_numba)]
        rng = np.random.default_rng(0)
        layers = conv3x3_study.LAYERS[1:]                 # the one-channel conv1 has no Winograd
        times: dict = {}
        for r in range(args.rounds + 2):                  # two warm-up rounds (compilation)
            for layer in layers:
                for name, module in (contenders if r % 2 else contenders[::-1]):
                    conv3x3_study.fast_numba = module
                    forward, backward = conv3x3_study.layer_times(layer, rng, 100, "float32")
                    if r >= 2:
                        times.setdefault((layer[0], name), []).append((forward, backward))
    print(f"median ms over {args.rounds} rounds, batch 100, float32 (forward / backward)")
    sums = {name: [0.0, 0.0] for name, _ in contenders}
    print(f"{'layer':28s}" + "".join(f"{name:>24s}" for name, _ in contenders))
    for layer in layers:
        cells = []
        for name, _ in contenders:
            forward = 1e3 * statistics.median(t[0] for t in times[layer[0], name])
            backward = 1e3 * statistics.median(t[1] for t in times[layer[0], name])
            sums[name][0] += forward
            sums[name][1] += backward
            cells.append(f"{forward:11.2f} /{backward:9.2f} ")
        print(f"{layer[0]:28s}" + "".join(cells))
    print(f"{'sum':28s}" + "".join(f"{f:11.2f} /{b:9.2f} " for f, b in sums.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
