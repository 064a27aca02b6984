"""`History`: what a training run records (losses, accuracies, timings), saved as JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..fileio import atomic_write_text


@dataclass
class History:
    """What training measured. Per epoch: mean loss, full-set accuracies, time, speed.

    `step_loss` holds every step's loss (gathered from the device at each log point).
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    images_per_second: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    skipped_steps: int = 0

    EPOCH_COLUMNS = ("epoch", "train_loss", "train_acc", "test_acc", "seconds", "eval_seconds", "images_per_second")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*self.EPOCH_COLUMNS, "step_loss", "skipped_steps")}

    def to_json(self) -> str:
        """Strict JSON: a NaN/inf (the loss of a skipped step) is written as null."""
        def clean(value: Any) -> Any:
            if isinstance(value, list):
                return [clean(v) for v in value]
            return None if isinstance(value, float) and not math.isfinite(value) else value
        return json.dumps({key: clean(value) for key, value in self.to_dict().items()}, indent=1, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "History":
        history = cls()
        for key, value in (data or {}).items():
            if hasattr(history, key):
                setattr(history, key, list(value) if isinstance(value, list) else value)
        return history

    def save(self, out_dir: "str | os.PathLike[str]") -> tuple[Path, Path]:
        """Write ``history.json`` (everything) and ``history.csv`` (one row per epoch) into `out_dir`
        (created if needed); `OutputError` if they cannot be written."""
        out = Path(out_dir)
        json_path, csv_path = out / "history.json", out / "history.csv"
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(self.EPOCH_COLUMNS)
        writer.writerows(zip(*(getattr(self, c) for c in self.EPOCH_COLUMNS)))
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json_path, self.to_json())
            atomic_write_text(csv_path, table.getvalue())
        except OSError as exc:
            raise OutputError(f"cannot write the history to {out}: {exc.strerror or exc}") from exc
        return json_path, csv_path
