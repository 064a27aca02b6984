"""The compiled CPU kernels (`xpcnn/ops/fast_numba.py`) as a user meets them: chosen by
default, switched off by ``XPCNN_CPU_KERNELS=numpy``, missing Numba falling back to NumPy's
path without an error, kept compiled in the user's cache folder, and a kept kernel that cannot
be read compiled again. Their arithmetic is checked against the reference with every other
fast path (tests/ops/test_fast_ops.py); the seeded bugs below must be caught there."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xpcnn.errors import ConfigError
from xpcnn.ops import cpu_kernels, ops_for
from xpcnn.ops import table as op_table

from helpers import REPO, isolated_env

FAST_NUMBA = REPO / "xpcnn" / "ops" / "fast_numba.py"

#: A SimpleConvNet step and a score in a fresh process; prints what the table runs and the loss.
STEP = """
import numpy as np
from xpcnn import AdaGrad, SimpleConvNet
from xpcnn.ops.table import describe, ops_of
net = SimpleConvNet(input_dim=(1, 12, 12), conv_param={"filter_num": 4, "filter_size": 3}, hidden_size=8, seed=0)
rng = np.random.default_rng(0)
x, t = rng.random((6, 1, 12, 12), dtype=np.float32), rng.integers(0, 10, 6)
AdaGrad(0.06).update(net.params, net.gradient(x, t))
print("runs:", describe(ops_of(net.backend)))
print("fused:", "conv2d_relu_maxpool2d_forward" in ops_of(net.backend).fast_names)
print("loss: %.6f" % float(net.last_layer.loss), "accuracy:", net.accuracy(x, t))
"""


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)


@pytest.fixture
def kernels_variable(monkeypatch):
    """Sets XPCNN_CPU_KERNELS for the test (the table cache cleared before and after)."""
    def set_to(value):
        monkeypatch.setenv(cpu_kernels.KERNELS_VARIABLE, value)
        op_table.ops_for.cache_clear()
    yield set_to
    monkeypatch.undo()
    op_table.ops_for.cache_clear()


def test_compiled_kernels_are_the_default_and_the_switch_selects_numpy(kernels_variable):
    import array_api_compat.numpy as xp

    kernels_variable("")
    compiled = ops_for(xp)
    assert "conv2d_relu_maxpool2d_forward" in compiled.fast_names and "adagrad_update" in compiled.fast_names
    assert "compiled kernels (Numba" in op_table.describe(compiled)
    kernels_variable("numpy")
    calls = ops_for(xp)
    assert "conv2d_relu_maxpool2d_forward" not in calls.fast_names and "conv2d_forward" in calls.fast_names
    assert "XPCNN_CPU_KERNELS=numpy" in op_table.describe(calls)


def test_a_bad_switch_is_one_clear_error(kernels_variable, tmp_path):
    kernels_variable("fortran")
    with pytest.raises(ConfigError, match="XPCNN_CPU_KERNELS must be one of numba, numpy, got 'fortran'"):
        cpu_kernels.requested()
    done = subprocess.run([sys.executable, "-m", "xpcnn", "train", "--epochs", "1", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=isolated_env(tmp_path, XPCNN_CPU_KERNELS="fortran"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "xpcnn: error: XPCNN_CPU_KERNELS must be one of numba, numpy, got 'fortran'"


def test_without_numba_numpys_path_runs_and_says_why(tmp_path):
    """An unsupported platform: `import numba` fails. Training runs on NumPy's calls, with
    the same loss as the compiled kernels, and the banner line says why."""
    blocked = "import sys; sys.modules['numba'] = None\n" + STEP
    without = _run(blocked, isolated_env(tmp_path))
    with_numba = _run(STEP, isolated_env(tmp_path))
    assert without.returncode == 0 and with_numba.returncode == 0, without.stderr + with_numba.stderr
    assert "compiled kernels unavailable: ModuleNotFoundError" in without.stdout and "fused: False" in without.stdout
    assert "compiled kernels (Numba" in with_numba.stdout and "fused: True" in with_numba.stdout
    loss = [line for line in without.stdout.splitlines() if line.startswith("loss")]
    assert loss == [line for line in with_numba.stdout.splitlines() if line.startswith("loss")]


def test_kernels_are_kept_in_the_users_cache_and_a_damaged_cache_is_rebuilt(tmp_path):
    """First run: the kernels are compiled and kept in XPCNN_KERNEL_CACHE. Then every kept
    file is overwritten with garbage: the next run still trains, with the same loss, and
    leaves readable files behind (a third run loads them)."""
    cache = tmp_path / "kernels"
    env = isolated_env(tmp_path, XPCNN_KERNEL_CACHE=str(cache))
    first = _run(STEP, env)
    assert first.returncode == 0, first.stderr
    kept = sorted(cache.rglob("*.nb*"))
    assert any(p.suffix == ".nbi" for p in kept) and any(p.suffix == ".nbc" for p in kept), kept
    assert str(cache) in first.stdout
    for path in kept:
        path.write_bytes(b"\x80\x05not a pickle at all")
    second = _run(STEP, env)
    assert second.returncode == 0, second.stderr
    assert [line for line in second.stdout.splitlines() if line.startswith("loss")] == \
        [line for line in first.stdout.splitlines() if line.startswith("loss")]
    third = _run(STEP + "\nfrom xpcnn.ops import fast_numba\n"
                 "print('loaded from cache:', all(k.dispatcher.stats.cache_hits for k in "
                 "(fast_numba._conv1_relu_pool2_forward, fast_numba._adagrad)))", env)
    assert "loaded from cache: True" in third.stdout, third.stdout + third.stderr


def test_a_cache_folder_that_cannot_be_made_compiles_in_memory(tmp_path):
    """XPCNN_KERNEL_CACHE under a plain file (no folder can be made there; as root, a
    read-only folder would still be written): training runs, the kernels compiled in memory."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = _run(STEP, isolated_env(tmp_path, XPCNN_KERNEL_CACHE=str(blocker / "kernels")))
    assert done.returncode == 0, done.stderr
    assert "loss:" in done.stdout and "fused: True" in done.stdout


def test_a_kernels_own_error_is_raised_without_discarding_the_kept_kernels(tmp_path, monkeypatch):
    """A kernel that raises for its input, with argument types it ran with before, raises that
    error as it is: the kept kernels are not discarded (a first call that fails is what
    discards them, then compiles afresh)."""
    from xpcnn.ops import kernel_cache

    monkeypatch.setenv(cpu_kernels.CACHE_VARIABLE, str(tmp_path / "kernels"))
    monkeypatch.setattr(kernel_cache, "_DISPATCHERS", [])         # this test's kernel only
    forgotten: list = []
    monkeypatch.setattr(kernel_cache, "_forget_kept_kernels", lambda: forgotten.append("discarded"))

    @kernel_cache.kernel(nogil=True)
    def checked(x):
        if x < 0:
            raise ValueError("negative input")
        return x + 1

    assert checked(1) == 2
    with pytest.raises(ValueError, match="negative input"):
        checked(-1)
    assert forgotten == []
    with pytest.raises(Exception, match="(?i)typing"):              # a first call (new types) that fails
        checked("text")
    assert forgotten == ["discarded"]


def test_a_kernel_lets_go_of_its_linking_copy_and_a_helper_keeps_it(tmp_path, monkeypatch):
    """A kernel (called only from Python) drops Numba's copy of its IR for linking, once
    compiled and kept and once loaded from the folder, and still runs; a helper, which kernels
    link in, keeps it (a second kernel calling it still compiles)."""
    from xpcnn.ops import kernel_cache

    monkeypatch.setenv(cpu_kernels.CACHE_VARIABLE, str(tmp_path / "kernels"))
    monkeypatch.setattr(kernel_cache, "_DISPATCHERS", [])

    @kernel_cache.njit(nogil=True)
    def twice(x):
        return 2 * x

    def plus_one(x):
        return twice(x) + 1

    def plus_two(x):
        return twice(x) + 2

    def linking_copy(dispatcher):
        (result,) = dispatcher.overloads.values()
        return result.library._shared_module

    compiled = kernel_cache.kernel(nogil=True)(plus_one)
    assert compiled(3) == 7 and compiled.dispatcher.stats.cache_misses
    assert linking_copy(compiled.dispatcher) is None
    assert linking_copy(twice) is not None
    loaded = kernel_cache.kernel(nogil=True)(plus_one)
    assert loaded(4) == 9 and loaded.dispatcher.stats.cache_hits
    assert linking_copy(loaded.dispatcher) is None
    assert kernel_cache.kernel(nogil=True)(plus_two)(5) == 12


def test_the_installed_package_folder_is_not_written(tmp_path):
    """Kernels are kept in the user's folder, not next to the source (a read-only install)."""
    env = isolated_env(tmp_path, XPCNN_KERNEL_CACHE=str(tmp_path / "kernels"))
    before = set((REPO / "xpcnn").rglob("*.nb*"))
    assert _run(STEP, env).returncode == 0
    assert set((REPO / "xpcnn").rglob("*.nb*")) == before


# ------------------------------------------------------------------ seeded bugs (controls)

#: name: (anchor, text, replacement): a bug each compiled kernel could have.
MUTATIONS = {
    "off-by-one-window-3-wide": ("def _conv1_plane(", "image[at + 1:at + 1 + size], image[at + 2:at + 2 + size]\n",
                                 "image[at + 1:at + 1 + size], image[at + 3:at + 3 + size]\n"),
    "off-by-one-window-5-wide": ("def _conv1_plane(", "W[f, 0, i, 3], W[f, 0, i, 4]\n",
                                 "W[f, 0, i, 3], W[f, 0, i, 3]\n"),
    "dW-tap-5-wide": ("def _conv1_plane_backward(", "t4 += g * s4[p]", "t4 += g * s3[p]"),
    "pair-second-filter-tap": ("def _conv1_plane_pair(", "W[f + 1, 0, i, 4])", "W[f, 0, i, 4])"),
    "pair-3-wide-window": ("def _conv1_plane_pair(", "plane2[p] += u0 * v0 + u1 * v1 + u2 * v2",
                           "plane2[p] += u0 * v0 + u1 * v1 + u1 * v2"),
    "pair-backward-second-filter": ("def _dots_with_five(", "u4 += hp * v4", "u4 += gp * v4"),
    "pair-backward-3-wide-second-filter": ("def _conv1_plane_backward_pair(", "u2 += h * v2", "u2 += g * v2"),
    "filter-row-overwrites": ("def _add_to_filter_row(", "dW[f, 0, i, j] += sums[j]", "dW[f, 0, i, j] = sums[j]"),
    "picked-dW-tap-5-wide": ("def _picked_row_dots(", "t4 += gf * (c5 if right else c4)",
                             "t4 += gf * (c4 if right else c4)"),
    "picked-dW-row-choice": ("def _picked_row_dots(", "(w0, w1, w2, w3, w4, w5) if kf >= 2",
                             "(w0, w1, w2, w3, w4, w5) if kf >= 1"),
    "picked-dW-second-filter-offset": ("def _picked_row_dots(", "if kg >= 2 else", "if kf >= 2 else"),
    "picked-dW-column-choice": ("def _pick(", "return right if k & 1 else left", "return left if k & 1 else right"),
    "picked-dW-3-wide-tap": ("def _picked_dW_pair(", "bottom[j], bottom[j + 1]", "bottom[j], bottom[j]"),
    "shifted-planes-padding": ("def _load_shifted(", "2 * ph + u - pad", "2 * ph + u"),
    "missing-bias": ("def _conv1_plane(", "plane[p] = bias\n", "plane[p] = 0\n"),
    "argmax-tie-takes-the-last": ("def _pool_offset_planes(", "value = third[p]\n        take = not (value <= best)",
                                  "value = third[p]\n        take = not (value < best)"),
    "argmax-wrong-offset": ("def _pool_offset_planes(", "(value, 2) if take", "(value, 1) if take"),
    "offset-planes-forward-tap": ("def _offset_planes(", "w3 * v4 + w4 * v5", "w3 * v4 + w4 * v4"),
    "offset-planes-forward-second-filter": ("def _offset_planes(", "left2[p] += u0 * v0 + u1 * v1",
                                            "left2[p] += w0 * v0 + u1 * v1"),
    "offset-planes-forward-3-wide": ("def _offset_planes(", "source, w, u = row[c + j]", "source, w, u = row[j]"),
    "offset-planes-forward-bias": ("def _offset_planes(", "plane2[p] = b[g]", "plane2[p] = b[f]"),
    "argmax-tie-takes-the-last-wider-window": ("def _pool_plane(", "if not (candidate[pw] <= best[pw])",
                                               "if not (candidate[pw] < best[pw])"),
    "unpool-2-wrong-offset": ("def _conv1_relu_pool_backward(", "bottom[2 * pw] = g if o == 2",
                              "bottom[2 * pw] = g if o == 3"),
    "db-counts-blocked-maxima": ("def _passed_sum(", "if arg[p] >= 0 else zero", "if arg[p] >= -1 else zero"),
    "relu-lets-negatives-through": ("def _conv1_relu_forward(", "if not (value <= 0) else 0",
                                    "if True else 0"),
    "relu-gradient-ignores-the-mask": ("def _conv1_relu_backward(", "pixel[f] if kept[f] > 0 else zero",
                                       "pixel[f]"),
    "relu-gradient-wrong-filter": ("def _conv1_relu_backward(", "grads[f], grads[f + 1], dW",
                                   "grads[f], grads[f], dW"),
    "adagrad-formula": ("def _adagrad(", "(np.sqrt(h[i]) + eps) * lr", "(h[i] + eps) * lr"),
    "adam-formula": ("def _adam(", "m[i] += one_minus_beta1 * (grad[i] - m[i])",
                     "m[i] += one_minus_beta2 * (grad[i] - m[i])"),
    "softmax-gradient": ("def _softmax_cross_entropy(", "(1 if j == labels[r] else 0)",
                         "(1 if j == labels[r] - 1 else 0)"),
    "count-correct-last-maximum": ("def _count_correct(", "row[j] > row[best]", "row[j] >= row[best]"),
}


#: Seeded bugs in the multi-channel loops (`conv_kernels.py`), run through fast_numba's entries.
CONV_KERNEL_MUTATIONS = {
    "pool-tie-takes-the-last": ("def bias_relu_pool(", "if not (value <= best[k])", "if not (value < best[k])"),
    "pool-missing-bias": ("def bias_relu_pool(", "best[k] = first[k] + b[k]", "best[k] = first[k]"),
    "relu-epilogue-keeps-negatives": ("def bias_relu(", "row[k] = value if not (value <= 0) else 0",
                                      "row[k] = value"),
    "relu-gradient-ignores-the-mask": ("def relu_gradient(", "source[k] if passed[k] > 0 else 0", "source[k]"),
    "unpool-wrong-column": ("def unpool_gradient(", "pw * pool + offset % pool", "pw * pool + offset // pool"),
}
CONV_KERNELS = REPO / "xpcnn" / "ops" / "conv_kernels.py"

#: Seeded bugs in Winograd's transforms (`winograd.py`), run through fast_numba's entries.
WINOGRAD_MUTATIONS = {
    "input-transform-B-coefficient": ("def input_transform(", "b0, b1, b2, b3 = d1[c] + d2[c]",
                                      "b0, b1, b2, b3 = d1[c] - d2[c]"),
    "filter-transform-G-half": ("def filter_transform(", "t[i, 2] = (g[i, 0] - g[i, 1] + g[i, 2]) * 0.5",
                                "t[i, 2] = (g[i, 0] - g[i, 1] + g[i, 2])"),
    "filter-gradient-G-transposed": ("def filter_gradient(", "t[2, q] = (u1 + u2) * 0.5 + u3",
                                     "t[2, q] = (u1 - u2) * 0.5 + u3"),
    "output-transform-A-row": ("def _output_tile(", "s10 = M[t, 4, k] - M[t, 8, k] - M[t, 12, k]",
                               "s10 = M[t, 4, k] - M[t, 8, k] + M[t, 12, k]"),
    "gradient-transform-A-transposed": ("def _store_gradient_tile(", "r30, r31 = -g10, -g11", "r30, r31 = g10, -g11"),
    "dx-transform-B-transposed": ("def input_gradient(", "b0 + e0 - a0, b1 + e1 - a1", "b0 + e0 + a0, b1 + e1 - a1"),
    "dx-sums-kept-from-the-last-image": ("def input_gradient(", "ps[f] = zero", "ps[f] += zero"),
    "dx-tile-row-misplaced": ("def input_gradient(", "ps[at + i * row:at + i * row + 4 * C]",
                              "ps[at + i * C:at + i * C + 4 * C]"),
    "dx-border-off-by-one": ("def _add_image(", "for y in range(min(height, rows - pad)):",
                             "for y in range(1, min(height, rows - pad)):"),
    "padding-offset": ("def _pad_image(", "line, left = cols * channels, min(pad, cols) * channels",
                       "line, left = cols * channels, 0"),
    "padding-rows-offset": ("def _pad_image(", "y, target = r - pad, ps", "y, target = r, ps"),
    "half-tile-kept": ("def relu_tiles_gradient(", "keep_y, keep_x = y0 + 1 < out_h, x0 + 1 < out_w",
                       "keep_y, keep_x = True, x0 + 1 < out_w"),
    "half-tile-written-short": ("def output_relu(", "if y0 + a < out_h and x0 + col < out_w:",
                                "if y0 + a < out_h - 1 and x0 + col < out_w:"),
    "missing-bias": ("def output_relu(", "top[x0, k] = _relu(y00 + b[k], zero)", "top[x0, k] = _relu(y00, zero)"),
    "pool-tie-takes-the-last": ("def output_relu_pool(", "value = y10 + bias\n                if not (value <= best)",
                                "value = y10 + bias\n                if not (value < best)"),
    "tile-ignores-the-first-image": ("def _tile_at(", "return first + t // per_image", "return t // per_image"),
    "pool-gradient-wrong-offset": ("def pool_tiles_gradient(", "g if where == 1 else zero",
                                   "g if where == 2 else zero"),
    "pool-gradient-ignores-the-first-image": ("def pool_tiles_gradient(", "at = (first * per_image + t) * K",
                                              "at = t * K"),
    "gradient-tile-rows-too-close": ("def _store_gradient_tile(", "dm[at + 4 * K], dm[at + 5 * K]",
                                     "dm[at + 3 * K], dm[at + 5 * K]"),
    "relu-gradient-wrong-row": ("def relu_tiles_gradient(", "p10, p11 = ((n * out_h + y1) * out_w + x0) * K",
                                "p10, p11 = ((n * out_h + y0) * out_w + x0) * K"),
}
WINOGRAD = REPO / "xpcnn" / "ops" / "winograd.py"


def _mutated_module(name: str, tmp_path: Path, mutations: dict = MUTATIONS, source: Path = FAST_NUMBA):
    """A copy of fast_numba.py with the mutation `name`, imported as a module of xpcnn.ops."""
    anchor, old, new = mutations[name]
    text = source.read_text()
    at = text.find(old, text.index(anchor))
    assert at >= 0, f"the mutation no longer applies: {old!r} after {anchor!r}"
    path = tmp_path / f"{source.stem}_{name.replace('-', '_')}.py"
    path.write_text(text[:at] + new + text[at + len(old):])
    spec = importlib.util.spec_from_file_location(f"xpcnn.ops._mutant_{path.stem}", path,
                                                  submodule_search_locations=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "xpcnn.ops"
    spec.loader.exec_module(module)
    return module


def _mismatches(module) -> list[str]:
    """Where `module`'s entries differ from the reference on small float64 cases."""
    import array_api_compat.numpy as xp

    from xpcnn.ops import reference
    reference_table = ops_for(xp, reference=True)
    rng = np.random.default_rng(0)
    found = []

    def differ(what, got, want):
        got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-9, atol=1e-12, equal_nan=True):
            found.append(what)

    x = rng.standard_normal((3, 1, 10, 10))
    W, b = rng.standard_normal((5, 1, 3, 3)), rng.standard_normal(5)     # 5 filters: a pair and a single one
    # SimpleConvNet's 5x5 (pad 1: the same 8x8 output), 5 filters: a pair and a single one.
    wide, wide_b = rng.standard_normal((5, 1, 5, 5)), rng.standard_normal(5)
    tied_W = np.zeros_like(W)                  # every window ties: the first maximum must win
    tie_b = np.abs(b) + 0.1                    # (and passes the ReLU, so that the tie rule shows)
    # Small whole numbers seen through the centre tap: windows with ties in every arrangement
    # (a maximum below tied with one beside, say: the first in the window's order wins).
    whole, centre = rng.integers(0, 3, (3, 1, 10, 10)).astype(np.float64), np.zeros_like(W)
    centre[:, 0, 1, 1] = 1
    pool = (2, 2, 2, 0, 4, 4)
    for label, inputs, filters, bias in (("conv-relu-pool", x, W, b), ("conv-relu-pool ties", x, tied_W, tie_b),
                                         ("conv-relu-pool ties in every arrangement", whole, centre, tie_b),
                                         ("conv-relu-pool 5x5", x, wide, wide_b)):
        pad = (filters.shape[2] - 3) // 2
        dout = rng.standard_normal((3, filters.shape[0], 4, 4))
        out, cache = module.conv2d_relu_maxpool2d_forward(xp, inputs, filters, bias, 1, pad, 8, 8, pool)
        want, cache_r = reference_table.conv2d_relu_maxpool2d_forward(inputs, filters, bias, 1, pad, 8, 8, pool)
        differ(label, out, want)
        for need_dx in (True, False):          # without dx (a first layer): the offset planes
            for k, (g, r) in enumerate(zip(
                    module.conv2d_relu_maxpool2d_backward(xp, dout, cache, filters, 1, pad, need_dx),
                    reference_table.conv2d_relu_maxpool2d_backward(dout, cache_r, filters, 1, pad, need_dx))):
                if r is not None:
                    differ(f"{label} gradient {k}{'' if need_dx else ' (no dx)'}", g, r)
    # 4 x 4 windows (the general pooling loop; the book's 2 x 2 has its own), ties included.
    for label, filters, bias in (("conv-relu-pool 4x4 windows", W, b),
                                 ("conv-relu-pool 4x4 windows, ties", tied_W, tie_b)):
        out, cache = module.conv2d_relu_maxpool2d_forward(xp, x, filters, bias, 1, 0, 8, 8, (4, 4, 4, 0, 2, 2))
        want, cache_r = reference_table.conv2d_relu_maxpool2d_forward(x, filters, bias, 1, 0, 8, 8, (4, 4, 4, 0, 2, 2))
        differ(label, out, want)
        coarse = rng.standard_normal((3, filters.shape[0], 2, 2))
        for k, (g, r) in enumerate(zip(module.conv2d_relu_maxpool2d_backward(xp, coarse, cache, filters, 1, 0, True),
                                       reference_table.conv2d_relu_maxpool2d_backward(coarse, cache_r, filters, 1, 0,
                                                                                      True))):
            differ(f"{label} gradient {k}", g, r)
    # Without pooling, full planes: 3 x 3 and 5 x 5 filters, a pair and a single one each.
    for label, filters, bias, pad in (("conv-relu", W, b, 1), ("conv-relu 5x5", wide, wide_b, 2)):
        out, cache = module.conv2d_relu_forward(xp, x, filters, bias, 1, pad, 10, 10)
        want, cache_r = reference_table.conv2d_relu_forward(x, filters, bias, 1, pad, 10, 10)
        differ(label, out, want)
        grad = rng.standard_normal(want.shape)
        for need_dx in (True, False):
            for k, (g, r) in enumerate(zip(module.conv2d_relu_backward(xp, grad, cache, filters, 1, pad, need_dx),
                                           reference_table.conv2d_relu_backward(grad, cache_r, filters, 1, pad,
                                                                                need_dx))):
                if r is not None:
                    differ(f"{label} gradient {k}{'' if need_dx else ' (no dx)'}", g, r)
    # Several channels (the chunked path with its compiled epilogues), ties included.
    x3, W3, b3 = rng.standard_normal((3, 3, 10, 10)), rng.standard_normal((5, 3, 3, 3)), rng.standard_normal(5)
    # (ties: a positive bias, so that the ReLU passes the tied maxima and the tie rule shows)
    for label, filters, b3 in (("multi-channel", W3, b3), ("multi-channel ties", np.zeros_like(W3), np.abs(b3) + 0.1)):
        out, cache = module.conv2d_relu_maxpool2d_forward(xp, x3, filters, b3, 1, 1, 10, 10, (2, 2, 2, 0, 5, 5))
        want, cache_r = reference_table.conv2d_relu_maxpool2d_forward(x3, filters, b3, 1, 1, 10, 10, (2, 2, 2, 0, 5, 5))
        differ(f"{label} pool", out, want)
        grad = rng.standard_normal((3, 5, 5, 5))
        for k, (g, r) in enumerate(zip(module.conv2d_relu_maxpool2d_backward(xp, grad, cache, filters, 1, 1, True),
                                       reference_table.conv2d_relu_maxpool2d_backward(grad, cache_r, filters, 1, 1,
                                                                                      True))):
            differ(f"{label} pool gradient {k}", g, r)
        out, cache = module.conv2d_relu_forward(xp, x3, filters, b3, 1, 1, 10, 10)
        want, cache_r = reference_table.conv2d_relu_forward(x3, filters, b3, 1, 1, 10, 10)
        differ(f"{label} relu", out, want)
        grad = rng.standard_normal((3, 5, 10, 10))
        for k, (g, r) in enumerate(zip(module.conv2d_relu_backward(xp, grad, cache, filters, 1, 1, True),
                                       reference_table.conv2d_relu_backward(grad, cache_r, filters, 1, 1, True))):
            differ(f"{label} relu gradient {k}", g, r)
    # Winograd's edges: pad 0 and 2, odd output sizes (half tiles), a batch of one.
    for label, (n, c, h, w, pad) in (("pad 0", (2, 3, 8, 8, 0)), ("pad 2, odd", (1, 4, 7, 9, 2)),
                                     ("pad 1, odd", (3, 5, 7, 7, 1))):
        xs, Ws, bs = rng.standard_normal((n, c, h, w)), rng.standard_normal((4, c, 3, 3)), rng.standard_normal(4)
        oh, ow = h + 2 * pad - 2, w + 2 * pad - 2
        out, cache = module.conv2d_relu_forward(xp, xs, Ws, bs, 1, pad, oh, ow)
        want, cache_r = reference_table.conv2d_relu_forward(xs, Ws, bs, 1, pad, oh, ow)
        differ(f"multi-channel {label} relu", out, want)
        grad = rng.standard_normal(want.shape)
        for k, (g, r) in enumerate(zip(module.conv2d_relu_backward(xp, grad, cache, Ws, 1, pad, True),
                                       reference_table.conv2d_relu_backward(grad, cache_r, Ws, 1, pad, True))):
            differ(f"multi-channel {label} relu gradient {k}", g, r)
        pool = (2, 2, 2, 0, oh // 2, ow // 2)       # an odd output: the last row (column) left out
        result = module.conv2d_relu_maxpool2d_forward(xp, xs, Ws, bs, 1, pad, oh, ow, pool)
        if result is not NotImplemented:            # (the chunked path takes only tiling pools)
            out, cache = result
            want, cache_r = reference_table.conv2d_relu_maxpool2d_forward(xs, Ws, bs, 1, pad, oh, ow, pool)
            differ(f"multi-channel {label} pool", out, want)
            grad = rng.standard_normal(want.shape)
            for k, (g, r) in enumerate(zip(
                    module.conv2d_relu_maxpool2d_backward(xp, grad, cache, Ws, 1, pad, True),
                    reference_table.conv2d_relu_maxpool2d_backward(grad, cache_r, Ws, 1, pad, True))):
                differ(f"multi-channel {label} pool gradient {k}", g, r)
    scores, labels = rng.standard_normal((9, 10)), rng.integers(0, 10, 9)
    scores[0, 3] = scores[0, 7] = 9.0          # a tied maximum: the first counts
    loss, cache = module.softmax_cross_entropy_forward(xp, scores, labels)
    loss_r, cache_r = reference.softmax_cross_entropy_forward(xp, scores, labels)
    differ("softmax-CE loss", loss, loss_r)
    differ("softmax-CE gradient", module.softmax_cross_entropy_backward(xp, cache, 1),
           reference.softmax_cross_entropy_backward(xp, cache_r, 1))
    differ("count_correct", module.count_correct(xp, scores, np.full(9, 3)),
           reference.count_correct(xp, scores, np.full(9, 3)))
    for name, args in (("adagrad_update", (0.06, 1e-7)), ("adam_update", (0.001, 0.9, 0.999, 1e-8))):
        states = 1 if name == "adagrad_update" else 2
        arrays = [[a.copy() for a in [rng.standard_normal(50), rng.standard_normal(50)]
                   + [np.abs(rng.standard_normal(50)) for _ in range(states)]]]
        arrays.append([a.copy() for a in arrays[0]])
        getattr(module, name)(xp, *arrays[0], *args)
        getattr(reference, name)(xp, *arrays[1], *args)
        differ(name, arrays[0][0], arrays[1][0])
    return found


def _without_winograd(module):
    """`module` with its multi-channel 3 x 3 cases on the chunked path, whose kernels this
    process has compiled already: these mutations seed none of Winograd's code, and each
    mutant's fresh kernel folder would compile its transforms again (about 6 s a mutant)."""
    module.WINOGRAD = False
    return module


def test_the_kernels_as_they_are_match_the_reference(tmp_path):
    """The control for the mutations: fast_numba.py unchanged (loaded the same way) shows no
    mismatch."""
    MUTATIONS["unchanged"] = ("def _conv1_plane(", "", "")
    try:
        assert _mismatches(_without_winograd(_mutated_module("unchanged", tmp_path))) == []
    finally:
        del MUTATIONS["unchanged"]


@pytest.mark.parametrize("mutation", sorted(CONV_KERNEL_MUTATIONS))
def test_a_seeded_bug_in_a_multi_channel_loop_is_caught(mutation, tmp_path, monkeypatch):
    from xpcnn.ops import fast_numba

    monkeypatch.setenv(cpu_kernels.CACHE_VARIABLE, str(tmp_path / "kernels"))
    monkeypatch.setattr(fast_numba, "conv_kernels",
                        _mutated_module(mutation, tmp_path, CONV_KERNEL_MUTATIONS, CONV_KERNELS))
    monkeypatch.setattr(fast_numba, "WINOGRAD", False)        # the chunked path, whose loops these are
    found = _mismatches(fast_numba)
    assert found, f"mutation {mutation} went unnoticed"
    print(f"{mutation}: caught by {found}")


def test_the_multi_channel_loops_without_winograd_match_the_reference(monkeypatch):
    """The control for the chunked path's mutations: with Winograd off, no mismatch."""
    from xpcnn.ops import fast_numba

    monkeypatch.setattr(fast_numba, "WINOGRAD", False)
    assert _mismatches(fast_numba) == []


def test_winograd_in_chunks_of_one_image_matches_the_reference(monkeypatch):
    """The control for Winograd's mutations: as they run it (one image a chunk), no mismatch."""
    from xpcnn.ops import fast_numba

    monkeypatch.setattr(fast_numba, "WINOGRAD", True)
    monkeypatch.setattr(fast_numba, "WINOGRAD_CHUNK_BYTES", 1)
    assert _mismatches(fast_numba) == []


# Each control compiles a mutated copy of the transforms (about 5 s): marked slow to keep the
# default run under 10 minutes; CI runs them (`pytest -m slow`).
@pytest.mark.slow
@pytest.mark.parametrize("mutation", sorted(WINOGRAD_MUTATIONS))
def test_a_seeded_bug_in_a_winograd_transform_is_caught(mutation, tmp_path, monkeypatch):
    from xpcnn.ops import fast_numba

    monkeypatch.setenv(cpu_kernels.CACHE_VARIABLE, str(tmp_path / "kernels"))
    monkeypatch.setattr(fast_numba, "winograd", _mutated_module(mutation, tmp_path, WINOGRAD_MUTATIONS, WINOGRAD))
    monkeypatch.setattr(fast_numba, "WINOGRAD", True)
    monkeypatch.setattr(fast_numba, "WINOGRAD_CHUNK_BYTES", 1)       # a chunk an image: chunks start past 0
    found = _mismatches(fast_numba)
    assert found, f"mutation {mutation} went unnoticed"
    print(f"{mutation}: caught by {found}")


# Each control compiles a mutated copy of fast_numba.py (about 14 s on 2 cores): marked slow
# to keep the default run under 10 minutes; CI runs them (`pytest -m slow`).
@pytest.mark.slow
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_seeded_bug_in_a_compiled_kernel_is_caught(mutation, tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_kernels.CACHE_VARIABLE, str(tmp_path / "kernels"))   # no mutant in the real cache
    found = _mismatches(_without_winograd(_mutated_module(mutation, tmp_path)))
    assert found, f"mutation {mutation} went unnoticed"
    print(f"{mutation}: caught by {found}")


@pytest.mark.parametrize("pooled", [False, True])
def test_winograd_keeps_a_nan_where_the_reference_does(pooled):
    """A NaN in the input reaches exactly the outputs (and pooled windows) the reference's
    3 x 3 windows carry it to, no more: the transforms add without multiplying by the
    matrices' zeros, so a patch's NaN stays in the tile's outputs that read it. Infinity is
    not compared (inf - inf in the transforms gives NaN where the reference has +-inf: see
    `xpcnn.ops.winograd`)."""
    import array_api_compat.numpy as xp

    from xpcnn.ops import fast_numba

    rng = np.random.default_rng(5)
    reference_table = ops_for(xp, reference=True)
    x, W, b = rng.standard_normal((2, 3, 10, 10)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    x[0, 0, 0, 0] = x[0, 1, 4, 5] = x[1, 2, 9, 3] = x[1, 0, 6, 6] = np.nan     # corner, inside, last row, middle
    for dtype in ("float32", "float64"):
        xs, Ws, bs = x.astype(dtype), W.astype(dtype), b.astype(dtype)
        if pooled:
            got, cache = fast_numba.conv2d_relu_maxpool2d_forward(xp, xs, Ws, bs, 1, 1, 10, 10, (2, 2, 2, 0, 5, 5))
            want, _ = reference_table.conv2d_relu_maxpool2d_forward(xs, Ws, bs, 1, 1, 10, 10, (2, 2, 2, 0, 5, 5))
        else:
            got, cache = fast_numba.conv2d_relu_forward(xp, xs, Ws, bs, 1, 1, 10, 10)
            want, _ = reference_table.conv2d_relu_forward(xs, Ws, bs, 1, 1, 10, 10)
        assert cache[1] == "winograd"
        assert np.isnan(want).sum() >= 4 * (4 if pooled else 9)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), rtol=1e-5, atol=1e-5)
