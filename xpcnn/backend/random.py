"""`RandomSource`: seeded uniform numbers made on a backend's device (the array API has none).

The generator itself is the backend's (`Backend.new_generator`, `uniform`, `generator_state`,
`restore_generator` in devices.py); this class counts the draws and keeps the snapshot."""

from __future__ import annotations

from typing import Any

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
        self._generator = self.backend.new_generator(seed)

    def uniform(self, shape: tuple, dtype: Any) -> Any:
        """Uniform numbers in [0, 1) of `shape` and float `dtype`, on the backend's device."""
        self.draws += 1
        return self.backend.uniform(self._generator, tuple(shape), dtype_name(dtype))

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot (see the class docstring)."""
        return {"seed": self.seed, "draws": self.draws, **self.backend.generator_state(self._generator)}

    def set_state(self, snapshot: dict[str, Any]) -> None:
        """Continue from a `state()` snapshot (taken on any backend)."""
        if not isinstance(snapshot, dict) or "draws" not in snapshot:
            raise ConfigError(f"RandomSource.set_state: expected a snapshot from state(), got {snapshot!r:.80}")
        self.seed, self.draws = snapshot.get("seed"), int(snapshot["draws"])
        generator = self.backend.restore_generator(snapshot)
        if generator is not None:
            self._generator = generator
        else:
            # No readable state of this backend's kind (CuPy's, or a snapshot taken on another
            # backend): a stream keyed by the seed and the draws so far.
            self._make(None if self.seed is None else (int(self.seed) % 2**32) * 2**31 + self.draws % 2**31)
