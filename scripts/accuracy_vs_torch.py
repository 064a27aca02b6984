#!/usr/bin/env python3
"""Train the seed's recipe in xpcnn and in PyTorch from the SAME initial weights on the SAME
batches, and compare the accuracies after every epoch.

    python scripts/accuracy_vs_torch.py --dataset fashion-mnist --epochs 10 --seeds 0 1 2
    python scripts/accuracy_vs_torch.py --model deep --epochs 20 --seeds 0 [--only xpcnn|torch]

``--model deep``: the book's DeepConvNet recipe (Adam lr 0.001, batch 100, He init, dropout
0.5): both start from `DeepConvNet(seed=s)`'s weights, take the same batches, and use the
SAME Dropout masks (the torch twin draws them from a `RandomSource` seeded like the xpcnn
network's, in the same order; see scripts/torch_models.py). ``--only`` runs one side (two
processes can then share the machine, one thread each); each epoch's line is printed as it
finishes.

Both start from `SimpleConvNet(seed=s)`'s weights (PyTorch copies them) and draw each epoch's
permutation from ``numpy.random.default_rng(s)`` exactly as `xpcnn.Trainer` does, so any
difference in accuracy comes from the arithmetic (float32 rounding, summation order), not
from the recipe. AdaGrad: lr 0.06, eps 1e-7 (the book's), batch 100, weight std 0.01.
Needs torch (CPU is fine). Prints one line per epoch and a summary; ``--json`` saves them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xpcnn import SimpleConvNet, Trainer, load_dataset  # noqa: E402
from xpcnn.backend import RandomSource, get_backend  # noqa: E402
from xpcnn.models import DeepConvNet  # noqa: E402
from xpcnn.nn.network import DROPOUT_STREAM, derived_seed  # noqa: E402
from xpcnn.nn.optim import Adam  # noqa: E402


def deep_xpcnn_run(seed: int, data, epochs: int, batch_size: int, lr: float, label: str) -> list[float]:
    """The Trainer's loop, written out: one permutation per epoch from default_rng(seed)."""
    (x_train, t_train), (x_test, t_test) = data
    net, opt, rng = DeepConvNet(seed=seed), Adam(lr=lr), np.random.default_rng(seed)
    accuracies = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = rng.permutation(len(x_train))
        for first in range(0, len(x_train), batch_size):
            idx = order[first:first + batch_size]
            opt.update(net.params, net.gradient(x_train[idx], t_train[idx]))
        accuracies.append(net.accuracy(x_test, t_test, batch_size=500))
        print(f"{label} seed {seed} epoch {epoch:2d}: test acc xpcnn {accuracies[-1]:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return accuracies


def deep_torch_run(seed: int, data, epochs: int, batch_size: int, lr: float, threads: int, label: str) -> list[float]:
    import torch
    import torch.nn.functional as F

    from torch_models import TorchDeepConvNet

    torch.set_num_threads(threads)
    (x_train, t_train), (x_test, t_test) = data
    init = DeepConvNet(seed=seed)
    host = {k: np.asarray(v) for k, v in init.params.items()}
    pads = [init.config[f"conv_param_{i}"]["pad"] for i in range(1, 7)]
    masks = RandomSource(get_backend("cpu"), derived_seed(seed, DROPOUT_STREAM))
    net = TorchDeepConvNet(host, pads, init.config["dropout_ratio"], masks)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    xt, tt = torch.from_numpy(x_train), torch.from_numpy(t_train.astype(np.int64))
    xs, ts = torch.from_numpy(x_test), torch.from_numpy(t_test.astype(np.int64))
    rng = np.random.default_rng(seed)
    accuracies = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = torch.from_numpy(rng.permutation(len(x_train)))
        for first in range(0, len(x_train), batch_size):
            idx = order[first:first + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net.forward(xt[idx], train=True), tt[idx]).backward()
            opt.step()
        with torch.no_grad():
            correct = sum(int((net.forward(xs[i:i + 500]).argmax(1) == ts[i:i + 500]).sum())
                          for i in range(0, len(xs), 500))
        accuracies.append(correct / len(xs))
        print(f"{label} seed {seed} epoch {epoch:2d}: test acc torch {accuracies[-1]:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return accuracies


def torch_run(net_init: SimpleConvNet, data, epochs: int, batch_size: int, lr: float, seed: int,
              threads: int) -> list[float]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    (x_train, t_train), (x_test, t_test) = data
    p = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in net_init.params.items()}
    conv = torch.nn.Conv2d(1, p["W1"].shape[0], p["W1"].shape[2])
    fc1 = torch.nn.Linear(p["W2"].shape[0], p["W2"].shape[1])
    fc2 = torch.nn.Linear(p["W3"].shape[0], p["W3"].shape[1])
    with torch.no_grad():
        conv.weight.copy_(p["W1"])
        conv.bias.copy_(p["b1"])
        fc1.weight.copy_(p["W2"].T)
        fc1.bias.copy_(p["b2"])
        fc2.weight.copy_(p["W3"].T)
        fc2.bias.copy_(p["b3"])
    modules = torch.nn.ModuleList([conv, fc1, fc2])

    def forward(x):
        h = F.max_pool2d(F.relu(conv(x)), 2, 2)
        return fc2(F.relu(fc1(h.flatten(1))))

    optimizer = torch.optim.Adagrad(modules.parameters(), lr=lr, initial_accumulator_value=0.0, eps=1e-7)
    xt, tt = torch.from_numpy(x_train), torch.from_numpy(t_train)
    xs, ts = torch.from_numpy(x_test), torch.from_numpy(t_test)
    rng = np.random.default_rng(seed)
    accuracies = []
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x_train)))
        for start in range(0, len(x_train), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(forward(xt[idx]), tt[idx]).backward()
            optimizer.step()
        with torch.no_grad():
            correct = sum(int((forward(xs[i:i + 500]).argmax(1) == ts[i:i + 500]).sum())
                          for i in range(0, len(xs), 500))
        accuracies.append(correct / len(xs))
    return accuracies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["simple", "deep"], default="simple")
    parser.add_argument("--only", choices=["both", "xpcnn", "torch"], default="both", help="run one side only (deep)")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=None, help="default 0.06 (simple, AdaGrad) or 0.001 (deep, Adam)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (numpy's BLAS uses its own default)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    try:
        import torch  # noqa: F401
    except ImportError:
        print("accuracy_vs_torch: PyTorch is not installed (pip install torch)", file=sys.stderr)
        return 2

    data = load_dataset(args.dataset, flatten=False, data_dir=args.data_dir)
    (x_train, t_train), (x_test, t_test) = data
    if args.model == "deep":
        return deep_main(args, data)
    args.lr = 0.06 if args.lr is None else args.lr
    results = []
    for seed in args.seeds:
        start = time.perf_counter()
        net = SimpleConvNet(seed=seed)
        init = SimpleConvNet(seed=seed)   # untouched copy of the initial weights for torch
        history = Trainer(net, x_train, t_train, x_test, t_test, epochs=args.epochs, mini_batch_size=args.batch_size,
                          optimizer="adagrad", optimizer_param={"lr": args.lr}, seed=seed, verbose=False).train()
        xpcnn_seconds = time.perf_counter() - start
        start = time.perf_counter()
        torch_acc = torch_run(init, data, args.epochs, args.batch_size, args.lr, seed, args.threads)
        torch_seconds = time.perf_counter() - start
        for epoch, (a, b) in enumerate(zip(history.test_acc, torch_acc), start=1):
            print(f"seed {seed} epoch {epoch:2d}: test acc xpcnn {a:.4f}  torch {b:.4f}", flush=True)
        results.append({"seed": seed, "xpcnn_test_acc": history.test_acc, "torch_test_acc": torch_acc,
                        "xpcnn_train_acc": history.train_acc, "xpcnn_seconds": xpcnn_seconds,
                        "torch_seconds": torch_seconds})
    final_x = [r["xpcnn_test_acc"][-1] for r in results]
    final_t = [r["torch_test_acc"][-1] for r in results]
    print(f"final test acc over seeds {args.seeds}: xpcnn {final_x} (median {np.median(final_x):.4f}); "
          f"torch {final_t} (median {np.median(final_t):.4f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


def deep_main(args, data) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    lr = 0.001 if args.lr is None else args.lr
    results = []
    for seed in args.seeds:
        entry: dict = {"seed": seed}
        if args.only in ("both", "xpcnn"):
            start = time.perf_counter()
            entry["xpcnn_test_acc"] = deep_xpcnn_run(seed, data, args.epochs, args.batch_size, lr, "deep")
            entry["xpcnn_seconds"] = time.perf_counter() - start
        if args.only in ("both", "torch"):
            start = time.perf_counter()
            entry["torch_test_acc"] = deep_torch_run(seed, data, args.epochs, args.batch_size, lr, args.threads, "deep")
            entry["torch_seconds"] = time.perf_counter() - start
        results.append(entry)
        if args.json:   # after every seed, so a long run keeps what finished
            Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    for side in ("xpcnn", "torch"):
        finals = [r[f"{side}_test_acc"][-1] for r in results if f"{side}_test_acc" in r]
        if finals:
            print(f"final test acc over seeds {args.seeds}: {side} {finals} (median {np.median(finals):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
