#!/usr/bin/env python
"""Time 10,000 images through xpcnn's own `predict_proba` and through the exported ONNX files
(both routes: ``direct`` and ``ndonnx``) in ONNX Runtime, in one process (docs/export.md).

    python scripts/bench_onnx.py                         # simple, deep, mlp; batches of 500
    python scripts/bench_onnx.py --models deep --batch-size 100 1000 --repeats 7 --json out.json
    python scripts/bench_onnx.py --threads 1             # one thread each (steadier on a busy machine)

For each model (seeded weights; mlp: 4 x 100 with BatchNorm and Dropout), the two files are
exported with `xpcnn.export_onnx` into a temporary folder. The contenders run round-robin (the
order rotates each round) over the same 10,000 images (Fashion-MNIST's test set where installed,
else seeded noise), after one untimed pass each; the median and the fastest of `--repeats` rounds
are reported, each with its ratio to xpcnn's. Speeds depend on the machine and on what else runs
(on a shared machine the fastest round is the steadier figure): compare the ratios, not the
seconds, across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xpcnn import DeepConvNet, MultiLayerNetExtend, SimpleConvNet, export_onnx  # noqa: E402
from xpcnn.nn.inference import predict_proba  # noqa: E402

MODELS: dict[str, Callable[[], Any]] = {
    "simple": lambda: SimpleConvNet(weight_init_std=0.05, seed=0),
    "deep": lambda: DeepConvNet(seed=0),
    "mlp": lambda: MultiLayerNetExtend(784, [100, 100, 100, 100], 10, use_batchnorm=True, use_dropout=True, seed=0),
}


def images(count: int) -> tuple[np.ndarray, str]:
    try:
        from xpcnn.data import load_split

        x, _ = load_split("fashion-mnist", "test", flatten=False)
        return x[:count], f"Fashion-MNIST test images ({count})"
    except Exception as exc:                   # no dataset here: seeded noise
        return (np.random.default_rng(0).random((count, 1, 28, 28), dtype=np.float32),
                f"seeded noise ({count}; Fashion-MNIST not found: {exc})")


def contenders(model: str, folder: Path, batch_size: int,
               threads: int | None) -> tuple[dict[str, Callable[[np.ndarray], Any]], dict]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1

    net = MODELS[model]()
    runs: dict[str, Callable[[np.ndarray], Any]] = {"xpcnn": lambda x: predict_proba(net, x, batch_size)}
    sizes = {}
    for via in ("direct", "ndonnx"):
        result = export_onnx(net, folder / f"{model}-{via}.onnx", via=via)
        sizes[via] = {"nodes": result.nodes, "bytes": result.size_bytes, "opset": result.opset}
        session = onnxruntime.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"])

        def run(x: np.ndarray, session: Any = session) -> list:
            return [session.run(["probabilities"], {"images": x[i:i + batch_size]})[0]
                    for i in range(0, x.shape[0], batch_size)]

        runs[f"onnxruntime-{via}"] = run
    return runs, sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch-size", type=int, nargs="+", default=[500])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of each contender: xpcnn's slices and BLAS, ONNX Runtime's intra-op pool "
                             "(default: each library's own, here both cores)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import onnxruntime
    from threadpoolctl import threadpool_limits

    if args.threads:
        os.environ["XPCNN_CPU_THREADS"] = str(args.threads)      # xpcnn's NumPy fast path: slices per call
        threadpool_limits(args.threads)                           # BLAS

    x, source = images(args.images)
    print(f"{source}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, NumPy {np.__version__}, "
          f"ONNX Runtime {onnxruntime.__version__}; seconds per {args.images} images, median and fastest of "
          f"{args.repeats} rounds (ratio to xpcnn's predict_proba); threads: {args.threads or 'default'}")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            for batch_size in args.batch_size:
                runs, sizes = contenders(model, Path(folder), batch_size, args.threads)
                for run in runs.values():
                    run(x)                                 # warm-up: first-call allocations and kernel choice
                times: dict[str, list[float]] = {name: [] for name in runs}
                names = list(runs)
                for round_ in range(args.repeats):
                    for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                        started = time.perf_counter()
                        runs[name](x)
                        times[name].append(time.perf_counter() - started)
                base, base_min = statistics.median(times["xpcnn"]), min(times["xpcnn"])
                for name, seconds in times.items():
                    median, fastest = statistics.median(seconds), min(seconds)
                    via = name.removeprefix("onnxruntime-")
                    graph = f", {sizes[via]['nodes']} nodes, {sizes[via]['bytes'] / 1e6:.2f} MB" if via in sizes else ""
                    print(f"{model:6} batch {batch_size:5}  {name:20} median {median:7.3f} s ({median / base:.2f}x)  "
                          f"fastest {fastest:7.3f} s ({fastest / base_min:.2f}x){graph}")
                    results.append({"model": model, "batch_size": batch_size, "contender": name, "median_s": median,
                                    "ratio_to_xpcnn": median / base, "fastest_s": fastest,
                                    "fastest_ratio_to_xpcnn": fastest / base_min, "all_s": seconds,
                                    **sizes.get(via, {})})
    if args.json:
        args.json.write_text(json.dumps({"images": source, "threads": args.threads, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
