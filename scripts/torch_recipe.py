#!/usr/bin/env python3
"""The seed's recipe (`xpcnn train`'s defaults) written in plain PyTorch, as a whole-process
baseline for `xpcnn train`: SimpleConvNet (30 5x5 filters, 2x2 pooling, hidden 100), AdaGrad
lr 0.06 (eps 1e-7, the book's), batch 100, weights from `SimpleConvNet(seed=s)`, each epoch's
batches from ``numpy.random.default_rng(s)`` as `xpcnn.Trainer` draws them, and after every
epoch the accuracy on the FULL train and test sets (batches of 500) and a checkpoint written,
as `xpcnn train` does. Prints one line per epoch.

    /usr/bin/time -v python scripts/torch_recipe.py --epochs 10
    /usr/bin/time -v xpcnn train --backend cpu --epochs 10 --quiet --out runs/timed

Threads: torch uses as many as NumPy's BLAS would (one per core unless OMP_NUM_THREADS or
OPENBLAS_NUM_THREADS says otherwise), as xpcnn does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xpcnn import SimpleConvNet, load_dataset  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: a temporary one)")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    threads = int(os.environ.get("OMP_NUM_THREADS") or os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count())
    torch.set_num_threads(threads)
    (x_train, t_train), (x_test, t_test) = load_dataset(args.dataset, flatten=False)
    start = time.perf_counter()
    net = SimpleConvNet(seed=args.seed)                       # the same initial weights as xpcnn train
    params = {k: torch.tensor(np.array(v)).requires_grad_() for k, v in net.params.items()}
    optimizer = torch.optim.Adagrad(list(params.values()), lr=0.06, initial_accumulator_value=0.0, eps=1e-7)
    xs, ts = torch.from_numpy(x_train), torch.from_numpy(t_train.astype(np.int64))
    xt, tt = torch.from_numpy(x_test), torch.from_numpy(t_test.astype(np.int64))
    rng = np.random.default_rng(args.seed)
    out = args.out or Path(tempfile.mkdtemp(prefix="torch-recipe-"))
    out.mkdir(parents=True, exist_ok=True)

    def scores(x):
        h = F.max_pool2d(F.relu(F.conv2d(x, params["W1"], params["b1"])), 2)
        h = F.relu(h.flatten(1) @ params["W2"] + params["b2"])
        return h @ params["W3"] + params["b3"]

    def accuracy(x, t):
        with torch.no_grad():
            return sum(int((scores(x[i:i + 500]).argmax(1) == t[i:i + 500]).sum())
                       for i in range(0, len(x), 500)) / len(x)

    for epoch in range(1, args.epochs + 1):
        began = time.perf_counter()
        order = torch.from_numpy(rng.permutation(len(x_train)))
        losses = []
        for first in range(0, len(x_train), 100):
            idx = order[first:first + 100]
            optimizer.zero_grad()
            loss = F.cross_entropy(scores(xs[idx]), ts[idx])
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        train_acc, test_acc = accuracy(xs, ts), accuracy(xt, tt)
        torch.save({k: v.detach() for k, v in params.items()}, out / "checkpoint.pt")
        print(f"epoch {epoch}/{args.epochs}  loss {float(torch.stack(losses).mean()):.4f}  train acc {train_acc:.4f}  "
              f"test acc {test_acc:.4f}  ({time.perf_counter() - began:.1f} s)", flush=True)
    print(f"done in {time.perf_counter() - start:.1f} s (torch {torch.__version__}, {threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
