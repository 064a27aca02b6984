#!/usr/bin/env python
"""Before/after: this checkout's SimpleConvNet training step and scoring against another
revision's, interleaved in ONE process (so both see the same machine load).

    python scripts/ab_step.py --base ea602f6            # CPU, float32, batch 100
    python scripts/ab_step.py --base HEAD~3 --rounds 40 --threads 1
    python scripts/ab_step.py --base 9cae339 --model deep      # DeepConvNet + Adam (dropout 0.5)

The base revision is checked out with `git worktree` into a temporary folder and imported
as the package ``xpcnn_base`` (xpcnn's modules import each other relatively, so both
versions load side by side). Each round times one training step (gradient + AdaGrad) and
one scoring pass of each version, alternating which goes first. Prints medians and the
ratio this / base (< 1: this checkout is faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision to compare against (e.g. a commit before a change)")
    p.add_argument("--model", choices=["simple", "deep"], default="simple",
                   help="simple: SimpleConvNet + AdaGrad lr 0.06 (default); deep: DeepConvNet + Adam lr 0.001")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=None, help="BLAS threads (set before NumPy loads)")
    return p.parse_args()


def load_package(name: str, folder: Path):
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    args = parse_args()
    if args.threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="xpcnn-ab-") as tmp:
        base_dir = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_dir), args.base],
                       check=True)
        try:
            versions = {"this": load_package("xpcnn", ROOT / "xpcnn"),
                        "base": load_package("xpcnn_base", base_dir / "xpcnn")}
            rng = np.random.default_rng(0)
            x = rng.random((args.batch_size, 1, 28, 28)).astype(np.float32)
            t = rng.integers(0, 10, args.batch_size)
            x_eval = rng.random((args.eval_images, 1, 28, 28)).astype(np.float32)
            t_eval = rng.integers(0, 10, args.eval_images)
            runs = {}
            for name, pkg in versions.items():
                if args.model == "deep":
                    net, opt = pkg.DeepConvNet(seed=0), pkg.Adam(lr=0.001)
                else:
                    net, opt = pkg.SimpleConvNet(seed=0), pkg.AdaGrad(lr=0.06)
                for _ in range(3):
                    opt.update(net.params, net.gradient(x, t))
                runs[name] = (net, opt)
            samples = {name: {"step": [], "score": []} for name in versions}
            for r in range(args.rounds):
                for name in (("this", "base") if r % 2 == 0 else ("base", "this")):
                    net, opt = runs[name]
                    start = time.perf_counter()
                    opt.update(net.params, net.gradient(x, t))
                    samples[name]["step"].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    net.accuracy(x_eval, t_eval, batch_size=args.eval_batch_size)
                    samples[name]["score"].append(time.perf_counter() - start)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_dir)], check=False)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    print(f"{args.model} model: this checkout ({head}, working tree) vs base {args.base}; "
          f"{args.rounds} interleaved rounds, "
          f"batch {args.batch_size}, scoring {args.eval_images} images at batch {args.eval_batch_size}, "
          f"BLAS threads {args.threads or 'default'}, load average {os.getloadavg()[0]:.2f}")
    print("| what | this ms (median) | base ms (median) | this / base |")
    print("| --- | ---: | ---: | ---: |")
    for what in ("step", "score"):
        mine, base = statistics.median(samples["this"][what]), statistics.median(samples["base"][what])
        print(f"| {what} | {mine * 1e3:.2f} | {base * 1e3:.2f} | {mine / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
