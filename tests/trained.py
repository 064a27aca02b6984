"""One small model trained on real Fashion-MNIST, shared by test_report.py and test_predict.py.

SimpleConvNet, the seed's recipe, 3,000 training images, 2 epochs, through ``xpcnn train``
(about 20 s here; about 0.78 test accuracy). Trained once per test session, on first use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import unavailable

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_CACHE: dict[str, Path] = {}


def fashion_available() -> bool:
    return ((FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists()
            and (FASHION_DIR / "train-images-idx3-ubyte.gz").exists())


def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the shared checkpoint (trained on first call; skips without Fashion-MNIST)."""
    if not fashion_available():
        unavailable(f"Fashion-MNIST not installed in {FASHION_DIR} (apt-get install dataset-fashion-mnist)")
    if "path" not in _CACHE:
        from xpcnn.cli import main

        out = tmp_path_factory.mktemp("trained")
        code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(FASHION_DIR), "--train-size", "3000",
                     "--test-size", "500", "--epochs", "2", "--seed", "0", "--no-plots", "--quiet", "--out", str(out)])
        assert code == 0
        _CACHE["path"] = out / "checkpoint.npz"
    return _CACHE["path"]


def fashion_test_set() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 Fashion-MNIST test images ``(N, 1, 28, 28)`` float32 and labels."""
    from xpcnn.data import load_split

    return load_split("fashion-mnist", "test", flatten=False, data_dir=FASHION_DIR)
