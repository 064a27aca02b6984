"""Every CUDA kernel of xpcnn/ops/fast_cupy.py checked without a GPU (docs/cuda-emulation.md).

- Compiled by NVRTC for sm_80 and sm_90, float and double: the sources CuPy generates for
  the calls fast_cupy.py's own wrappers make (recorded through the emulation's stand-in).
- Run through the CPU emulation against the reference ops: test_fast_ops.py's cases on its
  "cupy-emulated" backend; here, the same cases (fast_cases.py) as a list of mismatches.
- The product kernel (every matrix product of the fast path: no cuBLAS) against NumPy on odd
  shapes, float32 and float64.
- Mutation controls: a syntax error, removed barriers and off-by-one indices, each applied to
  a copy of fast_cupy.py's text, must be caught.

Skipped with the reason where CuPy's wheels (cupy-cuda12x, nvidia-cuda-nvrtc-cu12,
nvidia-cuda-runtime-cu12) or g++ are missing; failing instead under CI=true (.ci/run installs
them). The CuPy version is pinned (emulation/cupy_internals.py).
"""

from __future__ import annotations

import re

import array_api_compat.numpy as xp_numpy
import numpy as np
import pytest

from xpcnn import AdaGrad, Adam, DeepConvNet, SimpleConvNet
from xpcnn.backend.counting import count_calls, counting_backend
from xpcnn.ops import ops_for, reference

from emulation import cupy_internals, emulator
from emulation.available import require_cupy_wheels
from fast_cases import (
    CONV_GEOMETRIES,
    OPTIMIZER_CASES,
    OPTIMIZER_STATE_STARTS,
    POOL_GEOMETRIES,
    PRODUCT_SHAPES,
    SCORE_ROWS,
    TOL,
    out_size,
)
from helpers import unavailable

SOURCE = emulator.FAST_CUPY.read_text()
#: Every kernel fast_cupy.py defines, by its CUDA name.
KERNEL_NAMES = sorted(set(re.findall(r'"(xpcnn_\w+)"', SOURCE)))


def exercise_every_kernel(module, dtype: str) -> None:
    """Call every wrapper of `module` (a fast_cupy loaded on the stand-in) once, in `dtype`,
    so that every kernel it defines is launched (KERNEL_NAMES)."""
    module = emulator.HostEntries(module)
    rng = np.random.default_rng(0)
    xp = xp_numpy
    n, c, h, w, fn, fh, fw, stride, pad = CONV_GEOMETRIES[1]
    oh, ow = out_size(h, fh, stride, pad), out_size(w, fw, stride, pad)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    W = rng.standard_normal((fn, c, fh, fw)).astype(dtype)
    b = np.zeros(fn, dtype)
    out, cache = module.conv2d_forward(xp, x, W, b, stride, pad, oh, ow)
    module.conv2d_backward(xp, np.ones_like(out), cache, W, stride, pad, True)
    out, cache = module.conv2d_relu_forward(xp, x, W, b, stride, pad, oh, ow)
    module.conv2d_relu_backward(xp, np.ones_like(out), cache, W, stride, pad, True)
    pool = (2, 2, 2, 0, oh // 2, ow // 2)
    out, cache = module.conv2d_relu_maxpool2d_forward(xp, x, W, b, stride, pad, oh, ow, pool)
    for need_input_grad in (True, False):
        module.conv2d_relu_maxpool2d_backward(xp, np.ones_like(out), cache, W, stride, pad, need_input_grad)
    module.matmul(rng.standard_normal((100, 4320)).astype(dtype), rng.standard_normal((4320, 10)).astype(dtype))
    features = rng.standard_normal((7, 12)).astype(dtype)
    weights, bias = rng.standard_normal((12, 5)).astype(dtype), np.zeros(5, dtype)
    out = module.affine_forward(xp, features, weights, bias)
    module.affine_backward(xp, out, features, weights, True)
    out, cache = module.affine_relu_forward(xp, features, weights, bias)
    module.affine_relu_backward(xp, out, cache, features, weights, True)
    out, cache = module.maxpool2d_forward(xp, x, 2, 2, 2, 0, h // 2, w // 2)
    module.maxpool2d_backward(xp, np.ones_like(out), cache)
    module.relu_backward(xp, module.relu_forward(xp, x), x)
    scores, labels = rng.standard_normal((SCORE_ROWS[-1], 10)).astype(dtype), rng.integers(0, 10, SCORE_ROWS[-1])
    _, cache = module.softmax_cross_entropy_forward(xp, scores, labels)
    module.softmax_cross_entropy_backward(xp, cache, 2.0)
    module.count_correct(xp, scores, labels)
    for name, args in OPTIMIZER_CASES:
        param, grad, *state = (rng.standard_normal(100).astype(dtype) for _ in range(4))
        n_state = {"sgd_update": 0, "momentum_update": 1, "adagrad_update": 1, "adam_update": 2}[name]
        getattr(module, name)(xp, param, grad, *[np.abs(s) for s in state[:n_state]], *args)
    lr_t, *adam_args = OPTIMIZER_CASES[-1][1]       # Adam's step size read from the device (a captured step)
    module.adam_update(xp, param, grad, np.abs(state[0]), np.abs(state[1]), np.array([lr_t], dtype), *adam_args)


def record_sources(source: str | None = None) -> dict[tuple[str, str], str]:
    """{(kernel name, element type): full CUDA source} of every kernel launched by the
    wrappers of fast_cupy.py (or of the `source` text), in float32 and float64."""
    recorder = emulator.Recorder()
    module = emulator.load_fast_cupy(emulator.StandInCupy(recorder), source)
    with np.errstate(all="ignore"):             # nothing runs: the arrays hold whatever memory held
        for dtype in ("float32", "float64"):
            exercise_every_kernel(module, dtype)
    return recorder.sources


@pytest.fixture(scope="module")
def recorded_sources():
    require_cupy_wheels()
    return record_sources()


# ------------------------------------------------------------------- CuPy's internals

def test_cupy_is_the_pinned_version():
    """cupy_internals.py leans on CuPy's private code generator and compiler: a new CuPy must
    be checked against it before the pin moves (this fails loudly until then)."""
    try:
        cupy = cupy_internals.cupy_module()
    except ImportError as exc:
        unavailable(f"CuPy is not installed ({exc}); pip install -e '.[dev,cuda-check]'")
    assert cupy.__version__ == cupy_internals.CUPY_VERSION, (
        f"CuPy {cupy.__version__} installed, tests/ops/emulation/cupy_internals.py is written for "
        f"{cupy_internals.CUPY_VERSION}: check it against the new version, then move the pin")


def test_the_code_generator_sees_the_argument_kinds_given():
    """The private argument-kind numbers: an array, a scalar and the indexer come out as such."""
    require_cupy_wheels()
    kernel = cupy_internals.elementwise_kernel("raw T x, int32 k", "T y", "y = x[i] * k", "probe")
    _, _, type_map = cupy_internals.decide_types(kernel, (np.dtype("float32"), None), (np.dtype("float32"),))
    source = cupy_internals.elementwise_source(
        kernel, type_map, [cupy_internals.ArrayArg(np.dtype("float32"), 2, False, True),
                           cupy_internals.ScalarArg(np.dtype("int32")),
                           cupy_internals.ArrayArg(np.dtype("float32"), 1, True, True)], 1, True)
    assert "const CArray<float, 2, 0, 1> x, const int k, CArray<float, 1, 1, 1> _raw_y, CIndexer<1, 1> _ind" in source
    assert "#include <cupy/carray.cuh>" in source


def test_every_kernel_is_launched_in_float_and_double(recorded_sources):
    launched = {name for name, _ in recorded_sources}
    assert launched == set(KERNEL_NAMES), f"defined but never launched: {set(KERNEL_NAMES) - launched}"
    for name in KERNEL_NAMES:
        types = {t for kernel, t in recorded_sources if kernel == name}
        assert {"float32", "float64"} <= types, (name, types)


@pytest.mark.parametrize("n", [300, SCORE_ROWS[-1]])
def test_the_row_reductions_spread_over_blocks(n):
    """softmax-CE and count_correct give each block its own rows, so they scale with N (on one
    block of 256 threads, one SM of an H200's 132 did all the work)."""
    require_cupy_wheels()
    recorder = emulator.Recorder()
    module = emulator.HostEntries(emulator.load_fast_cupy(emulator.StandInCupy(recorder)))
    scores, labels = np.zeros((n, 10)), np.zeros(n, dtype=np.int64)
    module.softmax_cross_entropy_forward(xp_numpy, scores, labels)
    module.count_correct(xp_numpy, scores, labels)
    for name in ("xpcnn_softmax_ce", "xpcnn_count_correct"):
        grid, block = recorder.geometry[name]
        assert grid * block >= n and grid >= 2, f"{name}: {grid} block(s) of {block} threads for {n} rows"


# ----------------------------------------------------------------------------- NVRTC

@pytest.mark.parametrize("arch", cupy_internals.ARCHS)
def test_every_kernel_compiles_with_nvrtc(recorded_sources, arch):
    require_cupy_wheels(need_nvrtc=True)
    failures = {}
    for key, source in sorted(recorded_sources.items()):
        try:
            cubin = cupy_internals.nvrtc_compile(source, arch)
        except cupy_internals.CudaCompileError as exc:
            failures[key] = str(exc)
        else:
            assert len(cubin) > 0, key
    assert not failures, "\n\n".join(f"{key}:\n{log}" for key, log in failures.items())
    print(f"sm_{arch}: {len(recorded_sources)} kernel sources ({len(KERNEL_NAMES)} kernels) compiled by NVRTC "
          f"{cupy_internals.nvrtc_version()}")


# ---------------------------------------------------- the emulation against the reference

def _relative(got, want, scale: float = 0.0) -> float:
    """The largest difference over the largest value of `want` (or `scale`, where larger)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if not want.size:
        return 0.0
    return float(np.max(np.abs(got - want))) / max(float(np.max(np.abs(want))), scale, 1e-30)   # NaN: a mismatch


def mismatches(module, dtype: str) -> list[str]:
    """Where `module`'s wrappers (a fast_cupy loaded on the emulation) differ from the
    reference on the shared cases; an emulation error counts as a mismatch."""
    module = emulator.HostEntries(module)
    rng = np.random.default_rng(7)
    xp, found = xp_numpy, []

    def check(what, got, want, exact=False, scale=0.0):
        """`scale`: the size of the terms `want` is a difference of, where that is larger than
        `want` itself (the softmax gradient ``(y - onehot) / N`` of a row whose largest
        probability is near 1 cancels to far less than 1/N, and both sides' float32 rounding
        of y is then a large part of it)."""
        relative = _relative(got, want, scale)
        if np.shape(got) != np.shape(want):
            found.append(f"{what}: shape {np.shape(got)} != {np.shape(want)}")
        elif exact and not np.array_equal(got, want, equal_nan=True):
            found.append(f"{what}: not equal")
        elif not exact and not relative <= TOL[dtype]:
            found.append(f"{what}: relative difference {relative:.2e}")

    def guarded(what, function):
        try:
            function()
        except emulator.EmulationError as exc:
            found.append(f"{what}: {exc}")

    def conv(geometry):
        n, c, h, w, fn, fh, fw, stride, pad = geometry
        oh, ow = out_size(h, fh, stride, pad), out_size(w, fw, stride, pad)
        x, W = rng.standard_normal((n, c, h, w)).astype(dtype), rng.standard_normal((fn, c, fh, fw)).astype(dtype)
        b, dout = rng.standard_normal(fn).astype(dtype), rng.standard_normal((n, fn, oh, ow)).astype(dtype)
        got, cache_f = module.conv2d_forward(xp, x, W, b, stride, pad, oh, ow)
        want, cache_r = reference.conv2d_forward(xp, x, W, b, stride, pad, oh, ow)
        check(f"conv forward {geometry}", got, want)
        for name, g, r in zip(("dx", "dW", "db"), module.conv2d_backward(xp, dout, cache_f, W, stride, pad, True),
                              reference.conv2d_backward(xp, dout, cache_r, W, stride, pad, True)):
            check(f"conv {name} {geometry}", g, r)

    def pool(geometry):
        n, c, h, w, ph, pw, stride, pad = geometry
        oh, ow = out_size(h, ph, stride, pad), out_size(w, pw, stride, pad)
        x, dout = rng.standard_normal((n, c, h, w)).astype(dtype), rng.standard_normal((n, c, oh, ow)).astype(dtype)
        got, cache_f = module.maxpool2d_forward(xp, x, ph, pw, stride, pad, oh, ow)
        want, cache_r = reference.maxpool2d_forward(xp, x, ph, pw, stride, pad, oh, ow)
        check(f"pool forward {geometry}", got, want, exact=True)
        check(f"pool backward {geometry}", module.maxpool2d_backward(xp, dout, cache_f),
              reference.maxpool2d_backward(xp, dout, cache_r), exact=True)

    def scores(n):
        s, t = (rng.standard_normal((n, 10)) * 5).astype(dtype), rng.integers(0, 10, n)
        loss_f, cache_f = module.softmax_cross_entropy_forward(xp, s, t)
        loss_r, cache_r = reference.softmax_cross_entropy_forward(xp, s, t)
        check(f"softmax-CE loss n={n}", loss_f, loss_r)
        check(f"softmax n={n}", cache_f[0], cache_r[0])
        for dout in (1, 2.5):
            check(f"softmax-CE backward n={n} dout={dout}", module.softmax_cross_entropy_backward(xp, cache_f, dout),
                  reference.softmax_cross_entropy_backward(xp, cache_r, dout), scale=dout / n)
        check(f"count_correct n={n}", module.count_correct(xp, s, t), reference.count_correct(xp, s, t), exact=True)

    def fused_conv(geometry, pool):
        """The fused convolutions (with ReLU, and with ReLU and max pooling) against their
        composed definitions on the reference table, forward and backward."""
        n, c, h, w, fn, fh, fw, stride, pad = geometry
        oh, ow = out_size(h, fh, stride, pad), out_size(w, fw, stride, pad)
        x, W = rng.standard_normal((n, c, h, w)).astype(dtype), rng.standard_normal((fn, c, fh, fw)).astype(dtype)
        b = rng.standard_normal(fn).astype(dtype)
        ref = ops_for(xp, reference=True)
        args = (x, W, b, stride, pad, oh, ow)
        names = ("conv2d_relu_forward", "conv2d_relu_backward") if pool is None else \
            ("conv2d_relu_maxpool2d_forward", "conv2d_relu_maxpool2d_backward")
        extra = () if pool is None else (pool,)
        got, cache_f = getattr(module, names[0])(xp, *args, *extra)
        want, cache_r = getattr(ref, names[0])(*args, *extra)
        check(f"{names[0]} {geometry} {pool}", got, want)
        dout = rng.standard_normal(want.shape).astype(dtype)
        for need_input_grad in (True, False):
            for name, g, r in zip(("dx", "dW", "db"),
                                  getattr(module, names[1])(xp, dout, cache_f, W, stride, pad, need_input_grad),
                                  getattr(ref, names[1])(dout, cache_r, W, stride, pad, need_input_grad)):
                if r is not None:
                    check(f"{names[1]} {name} {geometry} {pool}", g, r)

    def affine(n, features, units):
        ref = ops_for(xp, reference=True)
        x, W = rng.standard_normal((n, features)).astype(dtype), rng.standard_normal((features, units)).astype(dtype)
        b, dout = rng.standard_normal(units).astype(dtype), rng.standard_normal((n, units)).astype(dtype)
        check(f"affine forward {n}x{features}x{units}", module.affine_forward(xp, x, W, b), ref.affine_forward(x, W, b))
        for name, g, r in zip(("dx", "dW", "db"), module.affine_backward(xp, dout, x, W, True),
                              ref.affine_backward(dout, x, W, True)):
            check(f"affine {name} {n}x{features}x{units}", g, r)
        got, cache_f = module.affine_relu_forward(xp, x, W, b)
        want, cache_r = ref.affine_relu_forward(x, W, b)
        check(f"affine+relu forward {n}x{features}x{units}", got, want)
        for name, g, r in zip(("dx", "dW", "db"), module.affine_relu_backward(xp, dout, cache_f, x, W, True),
                              ref.affine_relu_backward(dout, cache_r, x, W, True)):
            check(f"affine+relu {name} {n}x{features}x{units}", g, r)

    def relu():
        x, dout = rng.standard_normal((7, 5, 3)).astype(dtype), rng.standard_normal((7, 5, 3)).astype(dtype)
        out = module.relu_forward(xp, x)
        check("relu forward", out, reference.relu_forward(xp, x), exact=True)
        check("relu backward", module.relu_backward(xp, out, dout), reference.relu_backward(xp, out, dout), exact=True)

    def optimizer(name, args, start):
        n_state = {"sgd_update": 0, "momentum_update": 1, "adagrad_update": 1, "adam_update": 2}[name]
        host = [rng.standard_normal(1000) for _ in range(2 + n_state)]
        host[2:] = [np.abs(h) if start == "abs-randn" else np.zeros_like(h) for h in host[2:]]
        runs = []
        for update in (getattr(module, name), getattr(reference, name)):
            param, grad, *state = (h.astype(dtype) for h in host)
            for _ in range(3):
                update(xp, param, grad, *state, *args)
            runs.append([param, *state])
        if name == "adam_update":            # the step size read from the device, as a captured step reads it
            param, grad, *state = (h.astype(dtype) for h in host)
            for _ in range(3):
                module.adam_update(xp, param, grad, *state, np.array([args[0]], dtype), *args[1:])
            for k, (got, want) in enumerate(zip([param, *state], runs[0])):
                check(f"adam_update (step size on the device) array {k}", got, want, exact=True)
        for k, (got, want) in enumerate(zip(*runs)):
            check(f"{name} array {k}", got, want)

    for geometry in CONV_GEOMETRIES:
        guarded(f"conv {geometry}", lambda: conv(geometry))
    for geometry in CONV_GEOMETRIES:
        n, c, h, w, fn, fh, fw, stride, pad = geometry
        oh, ow = out_size(h, fh, stride, pad), out_size(w, fw, stride, pad)
        guarded(f"conv+relu {geometry}", lambda: fused_conv(geometry, None))
        if min(oh, ow) >= 2:
            guarded(f"conv+relu+pool {geometry}", lambda: fused_conv(geometry, (2, 2, 2, 0, oh // 2, ow // 2)))
    n, c, h, w, fn, fh, fw, stride, pad = CONV_GEOMETRIES[2]     # overlapping windows, padded: not tiling
    oh, ow = out_size(h, fh, stride, pad), out_size(w, fw, stride, pad)
    overlapping = (3, 3, 2, 1, out_size(oh, 3, 2, 1), out_size(ow, 3, 2, 1))
    guarded(f"conv+relu+pool {CONV_GEOMETRIES[2]} {overlapping}", lambda: fused_conv(CONV_GEOMETRIES[2], overlapping))
    for shape in ((7, 12, 5), (100, 4320, 20)):                 # the second product's sum is cut into parts
        guarded(f"affine {shape}", lambda: affine(*shape))
    for geometry in POOL_GEOMETRIES:
        guarded(f"pool {geometry}", lambda: pool(geometry))
    for n in SCORE_ROWS:
        guarded(f"scores n={n}", lambda: scores(n))
    guarded("relu", relu)
    for name, args in OPTIMIZER_CASES:
        for start in OPTIMIZER_STATE_STARTS:
            guarded(f"{name} from {start}", lambda: optimizer(name, args, start))
    return found


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_emulated_kernels_match_the_reference(emulated_fast_cupy, dtype):
    """The control for the mutations below: the kernels as they are show no mismatch."""
    assert mismatches(emulated_fast_cupy, dtype) == []


# ------------------------------------------------------------------------- mutations

def mutate(anchor: str, old: str, new: str) -> str:
    """fast_cupy.py's text with the first `old` after `anchor` replaced by `new`."""
    start = SOURCE.index(anchor)
    at = SOURCE.find(old, start)
    assert at >= 0, f"the mutation no longer applies: {old!r} after {anchor!r}; update it to the kernel's text"
    return SOURCE[:at] + new + SOURCE[at + len(old):]


#: name: (anchor, text, replacement), each a bug a kernel could have.
MUTATIONS = {
    "syntax-error-product": ("_PRODUCT = ", "const int tx = threadIdx.x % 8, ty = threadIdx.x / 8;",
                             "const int tx = threadIdx.x % 8, ty = threadIdx.x / 8"),
    "removed-barrier-softmax-ce": ("xpcnn_softmax_ce(", "partial[threadIdx.x] = mine;\n    __syncthreads();",
                                   "partial[threadIdx.x] = mine;\n"),
    "removed-barrier-count-correct": ("xpcnn_count_correct(", "partial[threadIdx.x] = mine;\n    __syncthreads();",
                                      "partial[threadIdx.x] = mine;\n"),
    "off-by-one-window-rows": ("struct Windows {", "y >= 0 && y < H", "y >= 0 && y <= H"),
    "off-by-one-maxpool-backward": ("_POOL_GRAD = ", "if (oh >= OH) continue;", "if (oh > OH) continue;"),
    "off-by-one-softmax-ce-rows": ("xpcnn_softmax_ce(", "row < n;", "row <= n;"),
    # The product kernel and what it reads and writes.
    "removed-barrier-product-loads": ("_PRODUCT = ", "        __syncthreads();\n        for (int kk = 0;",
                                      "        for (int kk = 0;"),
    "removed-barrier-product-sums": ("_PRODUCT = ", "        }\n        __syncthreads();\n    }", "        }\n    }"),
    "off-by-one-product-sum-end": ("_PRODUCT = ", "row0 + r < rows && k0 + kk < k_end",
                                   "row0 + r < rows && k0 + kk <= k_end"),
    "split-sum-drops-a-part": ("xpcnn_split_sum(", "for (int s = 0; s < splits; ++s)",
                               "for (int s = 1; s < splits; ++s)"),
    "no-bias-gradient-line": ("struct Dense {", "if (outer == ones) return (T)1;", "if (outer == ones) return (T)0;"),
    "relu-mask-ignored": ("struct Dense {", "(!masked || mask[at] > (T)0)", "(!masked || mask[at] >= (T)0)"),
    "transposed-conv-ignores-stride": ("struct GradWindows {", "ty % stride != 0 || tx % stride != 0", "false"),
    "pooled-grad-ignores-relu": ("_POOL_GRAD = ", "(!relu || out[o] > (T)0)", "(!relu || out[o] >= (T)0)"),
    "softmax-grad-wrong-label": ("xpcnn_softmax_ce(", "(T)(j == label)", "(T)(j == label + 1)"),
    "adam-device-step-size-misread": ("_adam_device_kernel = ", "step_size[0]", "step_size[1]"),
}


def test_nvrtc_rejects_a_syntax_error():
    require_cupy_wheels(need_nvrtc=True)
    sources = record_sources(mutate(*MUTATIONS["syntax-error-product"]))
    with pytest.raises(cupy_internals.CudaCompileError, match="expected a \";\""):
        cupy_internals.nvrtc_compile(sources[("xpcnn_gemm", "float32")], "90")


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_emulation_catches_a_mutated_kernel(emulation_runner, mutation):
    module = emulator.load_fast_cupy(emulator.StandInCupy(emulation_runner), mutate(*MUTATIONS[mutation]))
    found = mismatches(module, "float64")
    assert found, f"mutation {mutation} went unnoticed by the emulation"
    print(f"{mutation}: {len(found)} mismatches, first: {found[0][:200]}")


# ------------------------------------------------------------- calls per training step

def test_the_stand_in_counts_each_launch_from_outside(emulated_fast_cupy, rng):
    """fast_cupy.py carries no counters: the stand-in counts its kernels, its library calls
    and the operators on its arrays (Affine forward: one product kernel adding the bias;
    backward: one launch for dW, db and dx; the convolution: one product kernel reading the
    image windows in place), and each table call into it."""
    with emulator.use_fast_module(emulated_fast_cupy) as base:
        be = counting_backend(base)
        ops = ops_for(be.xp)
        x, W, b = (be.asarray(rng.standard_normal(shape), "float32") for shape in ((7, 12), (12, 5), (5,)))
        images = be.asarray(rng.standard_normal((2, 1, 6, 6)), "float32")
        filters, bias = be.asarray(rng.standard_normal((4, 1, 3, 3)), "float32"), be.asarray(np.zeros(4), "float32")
        counts = []
        with count_calls() as counter:
            out = ops.affine_forward(x, W, b)
            counts.append(counter.calls)
            ops.affine_backward(out, x, W, True)
            counts.append(counter.calls)
            ops.conv2d_forward(images, filters, bias, 1, 0, 4, 4)
            counts.append(counter.calls)
    assert counts == [1, 2, 3]


#: Array-library calls of one training step on CuPy's fast path (issue 30's budget; 27 and 87
#: before the product kernels and the fused operations, 14 and 36 when this was written). Each
#: call costs 8-28 us from Python on an H200.
FAST_STEP_CALLS = {"simple": 16, "deep": 50}


@pytest.mark.parametrize("model", ["simple", pytest.param("deep", marks=pytest.mark.slow)])
def test_fast_cupy_step_call_count_through_the_emulation(emulated_fast_cupy, emulation_runner, model):
    """Calls (and kernel launches) per training step on CuPy's fast path, batch 100, counted
    on the CPU: the GPU step's floor that can be seen without a GPU."""
    with emulator.use_fast_module(emulated_fast_cupy) as base:
        be = counting_backend(base)
        rng = np.random.default_rng(0)
        with count_calls() as counter:
            if model == "simple":
                net, optimizer = SimpleConvNet(backend=be, seed=0), AdaGrad(lr=0.06)
            else:
                net, optimizer = DeepConvNet(backend=be, seed=0), Adam(lr=0.001)
            x, t = be.asarray(rng.random((100, 1, 28, 28)), "float32"), be.asarray(rng.integers(0, 10, 100))
            optimizer.update(net.params, net.gradient(x, t))
            counter.reset()
            launched = sum(emulation_runner.launches.values())
            optimizer.update(net.params, net.gradient(x, t))
            calls, kernels = counter.calls, sum(emulation_runner.launches.values()) - launched
    print(f"{model}: {calls} array-library calls per training step on CuPy's fast path ({kernels} of them "
          f"xpcnn kernel launches), batch 100")
    assert calls <= FAST_STEP_CALLS[model], f"{calls} calls per step, more than the {FAST_STEP_CALLS[model]} held"


# ----------------------------------------------------------------- the product kernel

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", PRODUCT_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_the_product_kernel_matches_numpy(emulated_fast_cupy, shape, dtype):
    """Every matrix product of the fast path is fast_cupy's own tiled kernel (a captured step may
    not call cuBLAS): ``matmul`` against NumPy's product in float64, on odd shapes, a sum cut into
    parts (100x4320 @ 4320x100) and many tiles (57600x25 @ 25x30)."""
    m, k, n = shape
    rng = np.random.default_rng(m * 7 + k)
    a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    got = emulator.HostEntries(emulated_fast_cupy).matmul(a, b)
    want = a.astype(np.float64) @ b.astype(np.float64)
    assert got.shape == want.shape and got.dtype == np.dtype(dtype)
    assert _relative(got, want) <= TOL[dtype], f"relative difference {_relative(got, want):.2e}"
