"""`RandomSource`: seeded uniform numbers made on a backend's device (the array API has none)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .arrays import dtype_name
from .devices import Backend


class RandomSource:
    """Seeded uniform random numbers made on a backend's device (the array API has none).

    The host backends draw from a ``numpy.random.Generator`` (PCG64): for NumPy the result is
    already the array; for array_api_strict it is moved to the strict device. CuPy draws
    with its own generator on the GPU, and PyTorch with a ``torch.Generator`` on the
    tensors' device, so a Dropout mask never crosses from host to device.

    `state()` / `set_state()` give a JSON-able snapshot. On the host backends it is the
    PCG64 state itself (on PyTorch the generator's state bytes), so a resumed run draws
    exactly the numbers the uninterrupted run would have. CuPy's generator state cannot be
    read back: there the snapshot holds the seed and the number of draws, and a restore
    re-seeds from both (a new, still reproducible, stream: a GPU resume is not bit-exact, a
    CPU resume is).
    """

    def __init__(self, backend: Backend, seed: int | None = None):
        self.backend = backend
        self.seed = seed
        self.draws = 0
        self._make(seed)

    def _make(self, seed: Any) -> None:
        if self.backend.name == "torch":
            import torch

            self._generator = torch.Generator(device=self.backend.device)
            if seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(int(seed))
        elif self.backend.name == "cupy":
            import cupy

            with self.backend.device:
                self._generator = cupy.random.default_rng(seed)
        else:
            self._generator = np.random.default_rng(seed)

    def uniform(self, shape: tuple, dtype: Any) -> Any:
        """Uniform numbers in [0, 1) of `shape` and float `dtype`, on the backend's device."""
        self.draws += 1
        name = dtype_name(dtype)
        if self.backend.name == "torch":
            import torch

            return torch.rand(shape, generator=self._generator, dtype=getattr(torch, name), device=self.backend.device)
        if self.backend.name == "cupy":
            with self.backend.device:
                return self._generator.random(shape, dtype=name)
        host = self._generator.random(shape, dtype=name)
        return host if self.backend.name == "numpy" else self.backend.asarray(host)

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot (see the class docstring)."""
        snapshot: dict[str, Any] = {"seed": self.seed, "draws": self.draws}
        if self.backend.name == "torch":
            snapshot["torch_state"] = self._generator.get_state().tolist()
        elif self.backend.name != "cupy":
            snapshot["bit_generator"] = self._generator.bit_generator.state
        return snapshot

    def set_state(self, snapshot: dict[str, Any]) -> None:
        """Continue from a `state()` snapshot (taken on any backend)."""
        if not isinstance(snapshot, dict) or "draws" not in snapshot:
            raise ConfigError(f"RandomSource.set_state: expected a snapshot from state(), got {snapshot!r:.80}")
        self.seed, self.draws = snapshot.get("seed"), int(snapshot["draws"])
        host_state = snapshot.get("bit_generator")
        if self.backend.name == "torch" and snapshot.get("torch_state") is not None:
            import torch

            self._make(None)
            try:
                self._generator.set_state(torch.tensor(snapshot["torch_state"], dtype=torch.uint8))
            except (RuntimeError, TypeError, ValueError) as exc:
                raise ConfigError(f"RandomSource.set_state: invalid generator state: {exc}") from exc
        elif self.backend.name not in ("cupy", "torch") and host_state is not None:
            bit_generator = np.random.PCG64()
            try:
                bit_generator.state = host_state
            except (TypeError, ValueError, KeyError) as exc:
                raise ConfigError(f"RandomSource.set_state: invalid generator state: {exc}") from exc
            self._generator = np.random.Generator(bit_generator)
        else:
            # No readable state (CuPy): a stream keyed by the seed and the draws so far.
            self._make(None if self.seed is None else (int(self.seed) % 2**32) * 2**31 + self.draws % 2**31)

