"""PyTorch twins of xpcnn's networks, built from an xpcnn network's parameters, for the
comparison scripts (bench.py, accuracy_vs_torch.py) and the float64 tests.

`TorchDeepConvNet` is the book's DeepConvNet as plain tensors and `torch.nn.functional`
calls, with the book's (non-inverted) Dropout: training keeps a unit where a uniform number
is >= the ratio (``x * mask``), inference scales by ``1 - ratio``. Its masks come from an
xpcnn `RandomSource` seeded like the xpcnn network's, drawn in the same order and shapes, so
both see identical masks and any difference is arithmetic.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class TorchDeepConvNet:
    """DeepConvNet in PyTorch from xpcnn host parameters ``W1..W8, b1..b8`` (Affine ``(in, out)``)."""

    def __init__(self, host_params: dict[str, np.ndarray], conv_pads=(1, 1, 1, 2, 1, 1), dropout_ratio: float = 0.5,
                 mask_source: Any = None, dtype: str = "float32", device: str = "cpu"):
        import torch

        self.torch = torch
        self.dtype = getattr(torch, dtype)
        self.params = {k: torch.tensor(np.asarray(v), dtype=self.dtype, device=device).requires_grad_()
                       for k, v in host_params.items()}
        self.pads, self.ratio, self.mask_source, self.device = (tuple(conv_pads), float(dropout_ratio), mask_source,
                                                                device)

    def _dropout(self, h, train: bool):
        if not self.ratio:
            return h
        if not train:
            return h * (1.0 - self.ratio)
        u = self.mask_source.uniform(tuple(h.shape), np.float32 if self.dtype == self.torch.float32 else np.float64)
        mask = self.torch.from_numpy(np.asarray(u) >= self.ratio).to(self.device, self.dtype)
        return h * mask

    def forward(self, x, train: bool = False):
        F, p = self.torch.nn.functional, self.params
        h = x
        for i in range(1, 7):
            h = F.relu(F.conv2d(h, p[f"W{i}"], p[f"b{i}"], padding=self.pads[i - 1]))
            if i % 2 == 0:
                h = F.max_pool2d(h, 2, 2)
        h = F.relu(h.flatten(1) @ p["W7"] + p["b7"])
        h = self._dropout(h, train)
        return self._dropout(h @ p["W8"] + p["b8"], train)

    def parameters(self) -> list:
        return list(self.params.values())
