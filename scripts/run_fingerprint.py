#!/usr/bin/env python3
"""Print a fingerprint of fixed training runs: SHA-256 of every step's loss and of the final
weights, for SimpleConvNet and DeepConvNet, float32 and float64 (Fashion-MNIST, the first
1,000 training and test images, 2 epochs, seed 0, one BLAS thread).

Run it on two commits and compare the lines: equal hashes mean bit-identical arithmetic.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/run_fingerprint.py
"""

import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xpcnn import DeepConvNet, SimpleConvNet, Trainer, load_dataset  # noqa: E402

RUNS = (("simple", SimpleConvNet, "adagrad", 0.06), ("deep", DeepConvNet, "adam", 0.001))


def main() -> int:
    (x_train, t_train), (x_test, t_test) = load_dataset("fashion-mnist", normalize=True, flatten=False)
    for dtype in ("float32", "float64"):
        xs, xt = x_train[:1000].astype(dtype), x_test[:1000].astype(dtype)
        for name, cls, optimizer, lr in RUNS:
            net = cls(backend="cpu", dtype=dtype, seed=0)
            trainer = Trainer(net, xs, t_train[:1000], xt, t_test[:1000], epochs=2, mini_batch_size=100,
                              optimizer=optimizer, optimizer_param={"lr": lr}, seed=0, log_every=1,
                              progress=False, verbose=False)
            history = trainer.train()
            losses = np.asarray(history.step_loss, dtype=np.float64)
            weights = hashlib.sha256()
            for key in sorted(net.params):
                weights.update(key.encode() + np.ascontiguousarray(net.backend.to_numpy(net.params[key])).tobytes())
            print(f"{name:6s} {dtype}  steps {losses.size}  last loss {losses[-1]:.10f}  "
                  f"test acc {history.test_acc[-1]:.4f}  "
                  f"losses {hashlib.sha256(losses.tobytes()).hexdigest()[:16]}  weights {weights.hexdigest()[:16]}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
