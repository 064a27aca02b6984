#!/usr/bin/env python
"""Write the figures of a GPU check's CUDA-graph phases into docs/gpu-results.md.

    python scripts/graph_results.py OUT [--doc docs/gpu-results.md]

OUT is the folder `scripts/gpu_check.sh` wrote: `bench-gpu-100.json` and `bench-gpu-1000.json`
(scripts/bench.py: the eager fast path "xpcnn", its CUDA-graph replay "xpcnn-graph", torch eager
and torch's CUDA graph, median ms per step), `run-gpu-warm/` and `run-gpu-graph/` (the seed
recipe's 10 epochs without and with --cuda-graph: history.json) and `summary.txt`. The section
goes into the document right under "## Runs" and into OUT/gpu-results-graph.md; anything not
measured is said to be missing, never filled in.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

CONTENDERS = [("xpcnn", "xpcnn eager (CuPy fast path)"), ("xpcnn-graph", "xpcnn CUDA graph (--cuda-graph)"),
              ("torch", "torch eager"), ("torch-graph", "torch CUDA graph")]


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run(out: Path, name: str) -> str:
    history = _json(out / name / "history.json")
    if not history or not history.get("seconds"):
        return f"{name}: not measured"
    seconds = sum(history["seconds"]) + sum(history.get("eval_seconds", []))
    return (f"{name}: {len(history['seconds'])} epochs, training {sum(history['seconds']):.1f} s "
            f"(+ scoring {sum(history.get('eval_seconds', [])):.1f} s = {seconds:.1f} s), "
            f"final test acc {history['test_acc'][-1]:.4f}")


def section(out: Path) -> str:
    benches = {batch: _json(out / f"bench-gpu-{batch}.json") for batch in (100, 1000)}
    machine = next((b["machine"] for b in benches.values() if b), {})
    lines = [f"### {datetime.date.today().isoformat()} — CUDA graph replay (issue 30), "
             f"{machine.get('gpu', 'GPU not recorded')}", "",
             f"cupy {machine.get('cupy', '?')}, torch {machine.get('torch', '?')}; "
             f"`scripts/bench.py --backend gpu` (float32, SimpleConvNet + AdaGrad, interleaved in one process), "
             f"median ms per training step:", "",
             "| batch | " + " | ".join(label for _, label in CONTENDERS) + " |",
             "| ---: | " + " | ".join("---:" for _ in CONTENDERS) + " |"]
    for batch, bench in benches.items():
        if bench is None:
            lines.append(f"| {batch} | " + " | ".join("not measured" for _ in CONTENDERS) + " |")
            continue
        steps = bench.get("step_seconds", {})
        lines.append(f"| {batch} | " + " | ".join(f"{steps[name]['median'] * 1e3:.3f}" if name in steps
                                                  else "not run" for name, _ in CONTENDERS) + " |")
    lines += ["", "The seed recipe (Fashion-MNIST, 10 epochs, `xpcnn train --backend gpu`, warm kernel cache):", "",
              f"- {_run(out, 'run-gpu-warm')}", f"- {_run(out, 'run-gpu-graph')}", "",
              "Command: `bash scripts/prepare_gpu_carry.sh` here, then `OUT=$OUT bash scripts/gpu_check.sh` on the "
              "GPU machine (raw logs and JSON in `$OUT`).", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder gpu_check.sh wrote")
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "gpu-results.md")
    args = parser.parse_args()
    text = section(args.out)
    (args.out / "gpu-results-graph.md").write_text(text)
    doc = args.doc.read_text()
    marker = "## Runs\n"
    at = doc.index(marker) + len(marker)
    args.doc.write_text(doc[:at] + "\n" + text + doc[at:])
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
