"""Out of memory: one clear error naming the batch size and the option to lower, never a raw
traceback; the last checkpoint stays. The allocation failure is faked on the CPU with an
exception of CuPy's type name (cupy.cuda.memory.OutOfMemoryError, a MemoryError); on a GPU
machine tests/test_gpu.py provokes a real one."""

import numpy as np
import pytest

from xpcnn import SimpleConvNet, Trainer
from xpcnn.backend import is_out_of_memory
from xpcnn.errors import DeviceMemoryError

# The same name, module and base class as CuPy's, without needing CuPy.
FakeCupyOOM = type("OutOfMemoryError", (MemoryError,), {"__module__": "cupy.cuda.memory"})


def _raise_oom(*args, **kwargs):
    raise FakeCupyOOM("Out of memory allocating 1,152,000,000 bytes (allocated so far: 0 bytes).")


def _trainer(tmp_path, rng):
    x = rng.random((40, 1, 28, 28)).astype(np.float32)
    t = rng.integers(0, 10, 40)
    net = SimpleConvNet(seed=0)
    return Trainer(net, x, t, x[:20], t[:20], epochs=2, mini_batch_size=20, eval_batch_size=10,
                   verbose=False, checkpoint_path=tmp_path / "ckpt.npz")


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(FakeCupyOOM("x"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"))  # torch's kind
    assert not is_out_of_memory(ValueError("x"))
    # PyTorch on Apple GPUs raises a plain RuntimeError with this wording (a MacBook's MPS
    # allocator; no such machine here, so the exception is built from the message).
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: "
                                         "1.00 GB, max allowed: 18.13 GB). Tried to allocate 256.00 MB "
                                         "on private pool."))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_out_of_memory_in_a_training_step_names_the_batch_size(tmp_path, rng, monkeypatch):
    trainer = _trainer(tmp_path, rng)
    trainer.train()                                   # 2 epochs: a checkpoint exists
    before = (tmp_path / "ckpt.npz").read_bytes()
    trainer.epochs = 3
    monkeypatch.setattr(trainer.network, "gradient", _raise_oom)
    with pytest.raises(DeviceMemoryError, match=r"while training a batch of 20 images .*cupy: Out of memory "
                                               r"allocating 1,152,000,000 bytes.*lower mini_batch_size "
                                               r"\(--batch-size\)"):
        trainer.train()
    assert (tmp_path / "ckpt.npz").read_bytes() == before


def test_out_of_memory_while_scoring_names_the_eval_batch_size(tmp_path, rng, monkeypatch):
    trainer = _trainer(tmp_path, rng)
    monkeypatch.setattr(trainer.network, "accuracy", _raise_oom)
    with pytest.raises(DeviceMemoryError, match=r"while scoring a batch of 10 images .*lower eval_batch_size "
                                               r"\(--eval-batch-size\)"):
        trainer.train()
    assert not (tmp_path / "ckpt.npz").exists()       # the epoch never finished: nothing half-written


def test_other_errors_pass_through(tmp_path, rng, monkeypatch):
    trainer = _trainer(tmp_path, rng)

    def boom(*args, **kwargs):
        raise RuntimeError("not a memory problem")
    monkeypatch.setattr(trainer.network, "gradient", boom)
    with pytest.raises(RuntimeError, match="not a memory problem"):
        trainer.train()


def test_cli_prints_one_line_and_exit_code_8(tmp_path, rng, monkeypatch, capsys):
    from xpcnn import models
    from xpcnn.app import cli

    monkeypatch.setattr(models.SimpleConvNet, "gradient", _raise_oom)
    x = (rng.random((30, 28, 28)) * 255).astype(np.uint8)
    t = rng.integers(0, 10, 30).astype(np.uint8)
    from xpcnn.data import write_idx
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for split, n in (("train", 30), ("t10k", 30)):
        write_idx(data_dir / f"{split}-images-idx3-ubyte", x[:n])
        write_idx(data_dir / f"{split}-labels-idx1-ubyte", t[:n])
    code = cli.main(["train", "--data-dir", str(data_dir), "--batch-size", "10", "--epochs", "1", "--quiet",
                     "--no-plots", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 8
    assert err.count("\n") == 1 and err.startswith("xpcnn: error: out of memory"), err
    assert "lower mini_batch_size (--batch-size)" in err
