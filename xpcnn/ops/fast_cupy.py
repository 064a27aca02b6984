"""CuPy fast paths for the hot operations of `xpcnn.ops.reference` (float32 and float64).

Each function here replaces one operation of the table with one or a few kernel launches:
where the reference makes several array-library calls (each a launch and 8-28 us of Python
on the host), these make one or two. Results match the reference within rounding
(tests/ops/test_fast_ops.py). Deterministic by construction: nothing uses atomics; every sum
runs in an order fixed by the shapes alone, so two runs from the same seed give bit-identical
weights.

No cuBLAS: every matrix product is a tiled product kernel of this module (`_PRODUCT`), for
three reasons. A CUDA graph captured by CuPy may not call cuBLAS (cupy/cupy#6290), and the
training step is meant to be captured (`cuda_graphs`, `xpcnn.nn.compiled_step`); a kernel of
our own can read its operands where they are (the convolutions read the image windows in
place, no im2col copy; the ReLU and max-pooling gradients are applied while the operand is
loaded) and finish in place (bias, ReLU, the bias gradient as one more row or column of the
product); and it is deterministic by construction. A product over many terms and few output
tiles is cut along the sum into parts that run side by side, then added in a second launch
in a fixed order (`_splits`).

Calls per training step (counted through the CPU emulation, docs/cuda-emulation.md):
SimpleConvNet 14, DeepConvNet 36 (27 and 87 before the products and the fused kernels).

Imported only when CuPy is in use (`xpcnn.ops.table._fast_table`).
"""

from __future__ import annotations

import contextlib
import functools
import types
from types import ModuleType
from typing import Any, Callable

import cupy
import numpy as np

from . import fused, reference
from .functions import one_hot

_C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double", np.dtype(np.int64): "long long"}

#: The tag that starts every cache this module's fused operations make (`fused.COMPOSED` starts
#: the composed definitions' caches, which go back to the composed backward).
_CACHE_TAG = "fast_cupy"


def _c_type(dtype: Any) -> str:
    return _C_TYPES[np.dtype(dtype)]


@functools.lru_cache(maxsize=None)
def _raw_kernel(source: str, name: str, c_type: str) -> Any:
    """`source` compiled with ``T`` standing for `c_type` (float, double or long long), once per type."""
    return cupy.RawKernel(f"typedef {c_type} T;\n{source}", name)


def _i32(value: int) -> Any:
    return np.int32(value)


def _i64(value: int) -> Any:
    return np.int64(value)


# ------------------------------------------------------------------------ max pooling

# The gradient at one input pixel of a max pooling (then a ReLU where `relu`): shared by the
# pooling's backward kernel and the convolution's backward kernel, which reads the pooled
# gradient through it instead of a copy of the unpooled one.
_POOL_GRAD = r"""
template <typename T, class D, class A, class O>
__device__ T xpcnn_pool_grad(const D& dout, const A& arg, const O& out, const int relu, const long long plane,
                             const int y, const int x, const int PH, const int PW, const int stride, const int pad,
                             const int OH, const int OW) {
    // The sum, in window order, of dout over the windows whose first maximum pixel (y, x) was
    // (and, where relu, whose pooled value was > 0: the ReLU after the pooling passed it).
    const long long base = plane * OH * OW;
    T sum = 0;
    for (int pi = 0; pi < PH; ++pi) {
        const int ty = y + pad - pi;
        if (ty < 0 || ty % stride != 0) continue;
        const int oh = ty / stride;
        if (oh >= OH) continue;
        for (int pj = 0; pj < PW; ++pj) {
            const int tx = x + pad - pj;
            if (tx < 0 || tx % stride != 0) continue;
            const int ow = tx / stride;
            if (ow >= OW) continue;
            const long long o = base + oh * OW + ow;
            if (arg[o] == pi * PW + pj && (!relu || out[o] > (T)0)) sum += dout[o];
        }
    }
    return sum;
}
"""

_maxpool_forward_kernel = cupy.ElementwiseKernel(
    "raw T x, int32 H, int32 W, int32 PH, int32 PW, int32 OH, int32 OW, int32 stride, int32 pad, int32 relu",
    "T out, int32 arg",
    """
    // out (N, C, OH, OW): the window's first maximum (row-major); padding never wins. A NaN
    // wins over any number, as in the reference's `maximum` (the first NaN; its gradient goes
    // to that pixel), so a NaN stays visible. Where relu, the maximum then clipped at zero
    // (ReLU and max pooling commute).
    const int ow = i % OW;
    const int oh = (i / OW) % OH;
    const ptrdiff_t plane = i / (OW * OH);
    const ptrdiff_t image = plane * H * W;
    int best = -1;
    T best_value = 0;
    for (int pi = 0; pi < PH; ++pi) {
        const int y = oh * stride + pi - pad;
        if (y < 0 || y >= H) continue;
        for (int pj = 0; pj < PW; ++pj) {
            const int xx = ow * stride + pj - pad;
            if (xx < 0 || xx >= W) continue;
            const T value = x[image + y * W + xx];
            if (best < 0 || value > best_value || (isnan(value) && !isnan(best_value))) {
                best = pi * PW + pj;
                best_value = value;
            }
        }
    }
    out = (!relu || best_value >= (T)0 || isnan(best_value)) ? best_value : (T)0;
    arg = best;
    """,
    "xpcnn_maxpool_forward",
)

_maxpool_backward_kernel = cupy.ElementwiseKernel(
    "raw T dout, raw int32 arg, int32 H, int32 W, int32 PH, int32 PW, int32 OH, int32 OW, int32 stride, int32 pad",
    "T dx",
    """
    // dx (N, C, H, W): a pixel gathers the gradient of every window whose maximum it was.
    dx = xpcnn_pool_grad<T>(dout, arg, dout, 0, i / (W * H), (i / W) % H, i % W, PH, PW, stride, pad, OH, OW);
    """,
    "xpcnn_maxpool_backward",
    preamble=_POOL_GRAD,
)


def _maxpool(x: Any, pool_h: int, pool_w: int, stride: int, pad: int, out_h: int, out_w: int,
             relu: bool) -> tuple[Any, Any]:
    n, c, h, w = x.shape
    out = cupy.empty((n, c, out_h, out_w), dtype=x.dtype)
    arg = cupy.empty((n, c, out_h, out_w), dtype=cupy.int32)
    _maxpool_forward_kernel(cupy.ascontiguousarray(x), h, w, pool_h, pool_w, out_h, out_w, stride, pad, int(relu),
                            out, arg)
    return out, arg


def maxpool2d_forward(xp: ModuleType, x: Any, pool_h: int, pool_w: int, stride: int, pad: int,
                      out_h: int, out_w: int) -> tuple[Any, Any]:
    """One kernel: the maxima and, per window, the offset of its first maximum."""
    out, arg = _maxpool(x, pool_h, pool_w, stride, pad, out_h, out_w, relu=False)
    return out, (arg, tuple(x.shape), pool_h, pool_w, stride, pad)


def maxpool2d_backward(xp: ModuleType, dout: Any, cache: Any) -> Any:
    """One kernel: each pixel gathers the gradients of the windows it was the maximum of."""
    arg, (n, c, h, w), pool_h, pool_w, stride, pad = cache
    _, _, out_h, out_w = dout.shape
    dx = cupy.empty((n, c, h, w), dtype=dout.dtype)
    _maxpool_backward_kernel(cupy.ascontiguousarray(dout), arg, h, w, pool_h, pool_w, out_h, out_w, stride, pad, dx)
    return dx


# ---------------------------------------------------------------------------- products

#: Each block computes a TILE x TILE tile of C with THREADS threads (8 x 8, each 4 x 4 values),
#: DEPTH terms of the sum between two barriers.
_TILE, _DEPTH, _THREADS = 32, 16, 64
#: A product over many terms whose output has fewer tiles than this is split along its sum.
_TARGET_BLOCKS = 128
#: Each part of a split sum adds at least this many terms; never more than _MAX_SPLITS parts.
_MIN_SPLIT_DEPTH, _MAX_SPLITS = 1024, 64

_PRODUCT = f"""
#define XPCNN_TILE {_TILE}
#define XPCNN_DEPTH {_DEPTH}
#define XPCNN_THREADS {_THREADS}
""" + r"""
// C(r, c) of a product: where it goes, what is added to it, and whether it is clipped at zero.
struct Output {
    T* c; long long s_r, s_c;        // C(r, c) at c[r * s_r + c * s_c]
    T* extra; int extra_axis;        // 1: the last row of C goes to extra[c] (Affine's db);
                                     // 2: the last column to extra[r] (a convolution's db)
    const T* bias; int bias_axis;    // 1: bias[c] added (Affine); 2: bias[r] (a convolution's filters)
    int relu;                        // then max(v, 0), a NaN kept (as the reference's maximum)
    long long rows, cols;
    __device__ void operator()(const long long r, const long long col, T v) const {
        if (extra_axis == 1 && r == rows - 1) { extra[col] = v; return; }
        if (extra_axis == 2 && col == cols - 1) { extra[r] = v; return; }
        if (bias_axis == 1) v += bias[col];
        else if (bias_axis == 2) v += bias[r];
        if (relu) v = (v >= (T)0 || isnan(v)) ? v : (T)0;
        c[r * s_r + col * s_c] = v;
    }
};

// One part of a split sum: C(r, c) of part `split`, for xpcnn_split_sum to add.
struct Partial {
    T* p; long long rows, cols, split;
    __device__ void operator()(const long long r, const long long c, const T v) const {
        p[(split * rows + r) * cols + c] = v;
    }
};

// An operand stored as a strided matrix: element (outer, k) at p[outer * s_outer + k * s_k]. Where
// `masked`, zero unless mask (at the same place) > 0: a ReLU's output, so that the gradient passes
// where the ReLU did. Line `ones` is all ones (the bias gradient as one more line of the product).
struct Dense {
    const T* p; long long s_outer, s_k; const T* mask; int masked; long long ones; int k_fast;
    __device__ T operator()(const long long outer, const long long k) const {
        if (outer == ones) return (T)1;
        const long long at = outer * s_outer + k * s_k;
        return (!masked || mask[at] > (T)0) ? p[at] : (T)0;
    }
};

// C (rows x cols) += A (rows x depth, terms k_begin..k_end) B: the tile at (row0, col0), stored
// by `store`. A(r, k) is a(r, k), B(k, c) is b(c, k). Thread t holds rows ty + 8i, columns tx + 8j.
template <class A, class B, class Store>
__device__ void xpcnn_tile(const A& a, const B& b, const Store& store, const long long rows, const long long cols,
                           const long long k_begin, const long long k_end, const long long row0,
                           const long long col0) {
    __shared__ T a_tile[XPCNN_DEPTH][XPCNN_TILE];
    __shared__ T b_tile[XPCNN_DEPTH][XPCNN_TILE];
    const int tx = threadIdx.x % 8, ty = threadIdx.x / 8;
    T acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0;
    for (long long k0 = k_begin; k0 < k_end; k0 += XPCNN_DEPTH) {
        // Neighbouring threads load neighbouring memory: along k where the operand is stored along k.
        for (int e = threadIdx.x; e < XPCNN_DEPTH * XPCNN_TILE; e += XPCNN_THREADS) {
            const int kk = a.k_fast ? e % XPCNN_DEPTH : e / XPCNN_TILE;
            const int r = a.k_fast ? e / XPCNN_DEPTH : e % XPCNN_TILE;
            a_tile[kk][r] = (row0 + r < rows && k0 + kk < k_end) ? a(row0 + r, k0 + kk) : (T)0;
        }
        for (int e = threadIdx.x; e < XPCNN_DEPTH * XPCNN_TILE; e += XPCNN_THREADS) {
            const int kk = b.k_fast ? e % XPCNN_DEPTH : e / XPCNN_TILE;
            const int c = b.k_fast ? e / XPCNN_DEPTH : e % XPCNN_TILE;
            b_tile[kk][c] = (col0 + c < cols && k0 + kk < k_end) ? b(col0 + c, k0 + kk) : (T)0;
        }
        __syncthreads();
        for (int kk = 0; kk < XPCNN_DEPTH; ++kk) {
            T av[4], bv[4];
            for (int i = 0; i < 4; ++i) av[i] = a_tile[kk][ty + 8 * i];
            for (int j = 0; j < 4; ++j) bv[j] = b_tile[kk][tx + 8 * j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
            const long long r = row0 + ty + 8 * i, c = col0 + tx + 8 * j;
            if (r < rows && c < cols) store(r, c, acc[i][j]);
        }
}

// Block `block` of a product cut into `splits` parts of `chunk` terms: part-major, then tile rows, then tile columns.
template <class A, class B>
__device__ void xpcnn_product_block(const A& a, const B& b, const Output& out, T* partials, const long long rows,
                                    const long long cols, const long long depth, const int splits,
                                    const long long chunk, const long long block) {
    const long long tiles_c = (cols + XPCNN_TILE - 1) / XPCNN_TILE;
    const long long tiles = ((rows + XPCNN_TILE - 1) / XPCNN_TILE) * tiles_c;
    const long long split = block / tiles, tile = block % tiles;
    const long long k_begin = split * chunk;
    const long long k_end = depth < k_begin + chunk ? depth : k_begin + chunk;
    const long long row0 = (tile / tiles_c) * XPCNN_TILE, col0 = (tile % tiles_c) * XPCNN_TILE;
    if (splits == 1) xpcnn_tile(a, b, out, rows, cols, k_begin, k_end, row0, col0);
    else xpcnn_tile(a, b, Partial{partials, rows, cols, split}, rows, cols, k_begin, k_end, row0, col0);
}

"""

_WINDOWS = r"""
// x (N, C, H, W): the pixel that window offset k = (c, fi, fj) of output pixel p = (oh, ow) of
// image n reads (the im2col matrix, read in place); 0 in the padding.
struct Windows {
    const T* x; int C, H, W, FH, FW, OH, OW, stride, pad;
    __device__ T at(const long long n, const long long k, const long long p) const {
        const int c = (int)(k / (FH * FW)), fi = (int)((k / FW) % FH), fj = (int)(k % FW);
        const int y = (int)(p / OW) * stride + fi - pad, xx = (int)(p % OW) * stride + fj - pad;
        return (y >= 0 && y < H && xx >= 0 && xx < W) ? x[((n * C + c) * H + y) * W + xx] : (T)0;
    }
};

"""

_OUTPUT_GRAD = r"""
// The gradient at output pixel (y, x) of filter f of image n of a convolution: dout itself
// (mode 0), dout where the ReLU after it passed (1: `out` is the ReLU's output), or through a
// max pooling then a ReLU (2: dout, `out` and `arg` are the pooled gradient, output and argmax).
struct OutputGrad {
    const T* dout; const T* out; const int* arg; int mode; int FN, OH, OW; int PH, PW, pool_stride, pool_pad, POH, POW;
    __device__ T at(const long long n, const int f, const int y, const int x) const {
        const long long plane = n * FN + f;
        if (mode == 2)
            return xpcnn_pool_grad<T>(dout, arg, out, 1, plane, y, x, PH, PW, pool_stride, pool_pad, POH, POW);
        const long long i = (plane * OH + y) * OW + x;
        return (mode == 0 || out[i] > (T)0) ? dout[i] : (T)0;
    }
};
"""


def _product_parameters(p: int) -> str:
    """The parameters of product `p` of `xpcnn_gemm`: its two `Dense` operands, sizes, parts, output."""
    operands = ", ".join(f"const T* {o}{p}, const long long {o}{p}_so, const long long {o}{p}_sk, "
                         f"const T* {o}{p}_mask, const int {o}{p}_masked, const long long {o}{p}_ones, "
                         f"const int {o}{p}_kfast" for o in "ab")
    return (f"{operands}, const long long rows{p}, const long long cols{p}, const long long depth{p}, "
            f"const int splits{p}, const long long chunk{p}, T* partials{p}, T* c{p}, const long long c{p}_sr, "
            f"const long long c{p}_sc, T* extra{p}, const int extra_axis{p}, const T* bias{p}, const int bias_axis{p}, "
            f"const int relu{p}")


def _product_run(p: int, block: str) -> str:
    operands = ", ".join(f"Dense{{{o}{p}, {o}{p}_so, {o}{p}_sk, {o}{p}_mask, {o}{p}_masked, {o}{p}_ones, {o}{p}_kfast}}"
                         for o in "ab")
    return (f"xpcnn_product_block({operands}, Output{{c{p}, c{p}_sr, c{p}_sc, extra{p}, extra_axis{p}, bias{p}, "
            f"bias_axis{p}, relu{p}, rows{p}, cols{p}}}, partials{p}, rows{p}, cols{p}, depth{p}, splits{p}, "
            f"chunk{p}, {block})")


_GEMM_SOURCE = _PRODUCT + f"""
extern "C" __global__ void xpcnn_gemm({_product_parameters(0)}, {_product_parameters(1)}, const long long blocks0) {{
    // Two products in one launch (a layer's weight and input gradients): blocks 0..blocks0-1
    // compute the first, the others the second.
    if ((long long)blockIdx.x < blocks0) {_product_run(0, "(long long)blockIdx.x")};
    else {_product_run(1, "(long long)blockIdx.x - blocks0")};
}}
"""

_CONV_FORWARD_SOURCE = _PRODUCT + _WINDOWS + r"""
struct FilterRows {  // A(f, k): the filters W (FN, K)
    const T* w; long long K; static const int k_fast = 1;
    __device__ T operator()(const long long f, const long long k) const { return w[f * K + k]; }
};
struct ImageWindows {  // B(k, p) of image n, as b(p, k)
    Windows windows; long long n; static const int k_fast = 0;
    __device__ T operator()(const long long p, const long long k) const { return windows.at(n, k, p); }
};

extern "C" __global__ void xpcnn_conv_forward(const T* x, const T* w, const T* bias, T* out, const int C,
                                              const int H, const int W, const int FN, const int FH, const int FW,
                                              const int OH, const int OW, const int stride, const int pad,
                                              const int relu) {
    // out (N, FN, OH, OW) = W (FN, C*FH*FW) @ im2col(x) per image, + bias, then ReLU where relu.
    const long long K = (long long)C * FH * FW, P = (long long)OH * OW;
    const long long tiles_c = (P + XPCNN_TILE - 1) / XPCNN_TILE;
    const long long tiles = ((FN + XPCNN_TILE - 1) / XPCNN_TILE) * tiles_c;
    const long long n = blockIdx.x / tiles, tile = blockIdx.x % tiles;
    const Output o{out + n * FN * P, P, 1, out, 0, bias, 2, relu, FN, P};
    xpcnn_tile(FilterRows{w, K}, ImageWindows{Windows{x, C, H, W, FH, FW, OH, OW, stride, pad}, n}, o, FN, P, 0, K,
               (tile / tiles_c) * XPCNN_TILE, (tile % tiles_c) * XPCNN_TILE);
}
"""

_CONV_BACKWARD_SOURCE = _POOL_GRAD + _PRODUCT + _WINDOWS + _OUTPUT_GRAD + r"""
struct GradRows {  // A(f, q) of dW: the output gradient at q = (n, p)
    OutputGrad g; long long P; int OW; static const int k_fast = 1;
    __device__ T operator()(const long long f, const long long q) const {
        const long long p = q % P;
        return g.at(q / P, (int)f, (int)(p / OW), (int)(p % OW));
    }
};
struct WindowColumns {  // B(q, k) of dW, as b(k, q): the image windows, and a column of ones at k == K (db)
    Windows windows; long long P, K; static const int k_fast = 1;
    __device__ T operator()(const long long k, const long long q) const {
        return k == K ? (T)1 : windows.at(q / P, k, q % P);
    }
};
struct FlippedFilters {  // A(c, j) of dx, j = (f, fi, fj): W[f, c, fi, fj]
    const T* w; int C, FHFW; static const int k_fast = 1;
    __device__ T operator()(const long long c, const long long j) const {
        return w[((j / FHFW) * C + c) * FHFW + j % FHFW];
    }
};
// B(j, pixel) of dx of image n, as b(pixel, j): the gradient at the output pixel whose window
// offset j = (f, fi, fj) reads this pixel.
struct GradWindows {
    OutputGrad g; long long n; int W, FH, FW, stride, pad; static const int k_fast = 0;
    __device__ T operator()(const long long pixel, const long long j) const {
        const int f = (int)(j / (FH * FW)), fi = (int)((j / FW) % FH), fj = (int)(j % FW);
        const int ty = (int)(pixel / W) + pad - fi, tx = (int)(pixel % W) + pad - fj;
        if (ty < 0 || tx < 0 || ty % stride != 0 || tx % stride != 0) return (T)0;
        const int oh = ty / stride, ow = tx / stride;
        return (oh < g.OH && ow < g.OW) ? g.at(n, f, oh, ow) : (T)0;
    }
};

extern "C" __global__ void xpcnn_conv_backward(const T* x, const T* w, const T* dout, const T* out, const int* arg,
                                               const int mode, const int N, const int C, const int H, const int W,
                                               const int FN, const int FH, const int FW, const int OH, const int OW,
                                               const int stride, const int pad, const int PH, const int PW,
                                               const int pool_stride, const int pool_pad, const int POH,
                                               const int POW, T* dw, T* db, const int splits, const long long chunk,
                                               T* partials, const long long filter_blocks, T* dx) {
    // Blocks 0..filter_blocks-1: dW (FN, K) and db (FN) as one product over the batch and the
    // output pixels, [dW | db] = G @ [im2col(x) | 1]^T (cut into `splits` parts of its sum);
    // the others: dx (N, C, H, W) per image, the transposed convolution of G.
    const OutputGrad g{dout, out, arg, mode, FN, OH, OW, PH, PW, pool_stride, pool_pad, POH, POW};
    const Windows windows{x, C, H, W, FH, FW, OH, OW, stride, pad};
    const long long K = (long long)C * FH * FW, P = (long long)OH * OW;
    if ((long long)blockIdx.x < filter_blocks) {
        const Output o{dw, K, 1, db, 2, dw, 0, 0, FN, K + 1};
        xpcnn_product_block(GradRows{g, P, OW}, WindowColumns{windows, P, K}, o, partials, FN, K + 1, N * P, splits,
                            chunk, (long long)blockIdx.x);
        return;
    }
    const long long block = (long long)blockIdx.x - filter_blocks, HW = (long long)H * W;
    const long long tiles_c = (HW + XPCNN_TILE - 1) / XPCNN_TILE;
    const long long tiles = ((C + XPCNN_TILE - 1) / XPCNN_TILE) * tiles_c;
    const long long n = block / tiles, tile = block % tiles;
    const Output o{dx + n * C * HW, HW, 1, dx, 0, dx, 0, 0, C, HW};
    xpcnn_tile(FlippedFilters{w, C, FH * FW}, GradWindows{g, n, W, FH, FW, stride, pad}, o, C, HW, 0,
               (long long)FN * FH * FW, (tile / tiles_c) * XPCNN_TILE, (tile % tiles_c) * XPCNN_TILE);
}
"""

_SPLIT_SUM_SOURCE = _PRODUCT + r"""
extern "C" __global__ void xpcnn_split_sum(const T* partials, const int splits, const long long rows,
                                           const long long cols, T* c, const long long s_r, const long long s_c,
                                           T* extra, const int extra_axis, const T* bias, const int bias_axis,
                                           const int relu) {
    // The parts of a split product added in part order, then finished as the product would have been.
    const Output o{c, s_r, s_c, extra, extra_axis, bias, bias_axis, relu, rows, cols};
    const long long total = rows * cols;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        T v = 0;
        for (int s = 0; s < splits; ++s) v += partials[s * total + e];
        o(e / cols, e % cols, v);
    }
}
"""


def _tiles(rows: int, cols: int) -> int:
    return -(-rows // _TILE) * -(-cols // _TILE)


def _splits(tiles: int, depth: int) -> tuple[int, int]:
    """(parts, terms per part) of a product of `tiles` output tiles over `depth` terms: one part
    unless its tiles are too few to keep a GPU busy and each part still adds `_MIN_SPLIT_DEPTH`
    terms or more. A function of the shapes alone, so every run adds in the same order."""
    parts = 1 if tiles >= _TARGET_BLOCKS else max(1, min(-(-_TARGET_BLOCKS // tiles), depth // _MIN_SPLIT_DEPTH,
                                                         _MAX_SPLITS))
    chunk = -(-depth // parts)
    chunk = -(-chunk // _DEPTH) * _DEPTH
    return -(-depth // chunk) if depth else 1, max(chunk, _DEPTH)


def _output(c: Any, s_r: int, s_c: int, extra: Any = None, extra_axis: int = 0, bias: Any = None,
            bias_axis: int = 0, relu: bool = False) -> tuple:
    """The arguments of an `Output`: C(r, c) at ``c[r * s_r + c * s_c]`` (unused pointers are `c`)."""
    return (c, _i64(s_r), _i64(s_c), c if extra is None else extra, _i32(extra_axis), c if bias is None else bias,
            _i32(bias_axis), _i32(relu))


def _split_sum(partials: Any, splits: int, rows: int, cols: int, output: tuple) -> None:
    blocks = max(1, min(-(-(rows * cols) // 256), 1024))
    _raw_kernel(_SPLIT_SUM_SOURCE, "xpcnn_split_sum", _c_type(partials.dtype))(
        (blocks,), (256,), (partials, _i32(splits), _i64(rows), _i64(cols), *output))


class _Product:
    """One product for `xpcnn_gemm`: C (rows x cols) = A (rows x depth) B, each operand a
    `Dense` (array, stride of its outer index, stride along the sum, mask, line of ones,
    whether neighbouring memory runs along the sum), the output an `_output`."""

    def __init__(self, a: tuple, b: tuple, rows: int, cols: int, depth: int, output: tuple):
        self.a, self.b, self.rows, self.cols, self.depth, self.output = a, b, rows, cols, depth, output
        self.splits, self.chunk = _splits(_tiles(rows, cols), depth)
        self.blocks = self.splits * _tiles(rows, cols)
        self.partials = (cupy.empty(self.splits * rows * cols, dtype=output[0].dtype) if self.splits > 1
                         else output[0])

    def arguments(self) -> tuple:
        return (*self.a, *self.b, _i64(self.rows), _i64(self.cols), _i64(self.depth), _i32(self.splits),
                _i64(self.chunk), self.partials, *self.output)


def _dense(array: Any, s_outer: int, s_k: int, *, k_fast: bool, mask: Any = None, ones: int = -1) -> tuple:
    return (array, _i64(s_outer), _i64(s_k), array if mask is None else mask, _i32(mask is not None), _i64(ones),
            _i32(k_fast))


def _gemm(first: _Product, second: _Product | None = None) -> None:
    """One launch of `xpcnn_gemm` for one or two products, then one `xpcnn_split_sum` for each
    product cut into parts."""
    products = [first] if second is None else [first, second]
    dtype = first.output[0].dtype
    blocks = sum(p.blocks for p in products)
    arguments = first.arguments() + (second or first).arguments() + (_i64(first.blocks),)
    _raw_kernel(_GEMM_SOURCE, "xpcnn_gemm", _c_type(dtype))((blocks,), (_THREADS,), arguments)
    for p in products:
        if p.splits > 1:
            _split_sum(p.partials, p.splits, p.rows, p.cols, p.output)


def _target(given: Any, shape: tuple, dtype: Any) -> Any:
    """`given` where it is a C-contiguous array (a view of a gradient buffer), else a new array."""
    if given is not None and given.flags.c_contiguous:
        return given
    return cupy.empty(shape, dtype=dtype)


def _into(given: Any, result: Any) -> Any:
    """`result`, copied into `given` where that was not written directly."""
    if given is None or given is result:
        return result
    given[...] = result
    return given


def matmul(a: Any, b: Any) -> Any:
    """``a @ b`` of two 2-d arrays by the product kernel (no cuBLAS): ``(M, K) @ (K, N) -> (M, N)``."""
    a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
    (m, k), (_, n) = a.shape, b.shape
    out = cupy.empty((m, n), dtype=a.dtype)
    _gemm(_Product(_dense(a, k, 1, k_fast=True), _dense(b, 1, n, k_fast=False), m, n, k, _output(out, n, 1)))
    return out


# ----------------------------------------------------------------------------------- Affine

def _affine(x: Any, W: Any, b: Any, relu: bool) -> Any:
    x, W = cupy.ascontiguousarray(x), cupy.ascontiguousarray(W)
    (n, features), (_, units) = x.shape, W.shape
    out = cupy.empty((n, units), dtype=x.dtype)
    _gemm(_Product(_dense(x, features, 1, k_fast=True), _dense(W, 1, units, k_fast=False), n, units, features,
                   _output(out, units, 1, bias=cupy.ascontiguousarray(b), bias_axis=1, relu=relu)))
    return out


def _affine_backward(dout: Any, relu_out: Any, x: Any, W: Any, need_input_grad: bool, dW_out: Any,
                     db_out: Any) -> tuple[Any, Any, Any]:
    """[dW; db] = [x | 1]^T G and dx = G W^T in one launch, G = dout (where the ReLU passed)."""
    dout, x, W = cupy.ascontiguousarray(dout), cupy.ascontiguousarray(x), cupy.ascontiguousarray(W)
    (n, features), (_, units) = x.shape, W.shape
    dW, db = _target(dW_out, (features, units), dout.dtype), _target(db_out, (units,), dout.dtype)
    weights = _Product(_dense(x, 1, features, k_fast=False, ones=features),
                       _dense(dout, 1, units, k_fast=False, mask=relu_out), features + 1, units, n,
                       _output(dW, units, 1, extra=db, extra_axis=1))
    dx = cupy.empty((n, features), dtype=dout.dtype) if need_input_grad else None
    inputs = (_Product(_dense(dout, units, 1, k_fast=True, mask=relu_out), _dense(W, units, 1, k_fast=True),
                       n, features, units, _output(dx, features, 1)) if need_input_grad else None)
    _gemm(weights, inputs)
    return dx, _into(dW_out, dW), _into(db_out, db)


def affine_forward(xp: ModuleType, x: Any, W: Any, b: Any) -> Any:
    """``x @ W + b``: one product kernel adding the bias."""
    return _affine(x, W, b, relu=False)


def affine_backward(xp: ModuleType, dout: Any, x: Any, W: Any, need_input_grad: bool,
                    dW_out: Any = None, db_out: Any = None) -> tuple[Any, Any, Any]:
    """dW, db (one more row of the same product) and dx: one launch, written straight into the
    gradient buffer's views."""
    return _affine_backward(dout, None, x, W, need_input_grad, dW_out, db_out)


def affine_relu_forward(xp: ModuleType, x: Any, W: Any, b: Any) -> tuple[Any, Any]:
    """``relu(x @ W + b)``: one product kernel adding the bias and clipping at zero."""
    out = _affine(x, W, b, relu=True)
    return out, (_CACHE_TAG, out)


def affine_relu_backward(xp: ModuleType, dout: Any, cache: Any, x: Any, W: Any, need_input_grad: bool,
                         dW_out: Any = None, db_out: Any = None) -> tuple[Any, Any, Any]:
    """As `affine_backward`, the ReLU's gradient applied as the products read dout."""
    if cache[0] == fused.COMPOSED:
        return NotImplemented
    return _affine_backward(dout, cache[1], x, W, need_input_grad, dW_out, db_out)


# ------------------------------------------------------------------------------ convolution

def _conv(x: Any, W: Any, b: Any, stride: int, pad: int, out_h: int, out_w: int, relu: bool) -> tuple[Any, Any]:
    """(out, x as read): one product kernel over the image windows in place, the bias added."""
    x, W = cupy.ascontiguousarray(x), cupy.ascontiguousarray(W)
    n, c, h, w = x.shape
    filters, _, filter_h, filter_w = W.shape
    out = cupy.empty((n, filters, out_h, out_w), dtype=x.dtype)
    blocks = n * _tiles(filters, out_h * out_w)
    _raw_kernel(_CONV_FORWARD_SOURCE, "xpcnn_conv_forward", _c_type(x.dtype))(
        (blocks,), (_THREADS,), (x, W, cupy.ascontiguousarray(b), out, *map(_i32, (c, h, w, filters, filter_h, filter_w,
                                                                                  out_h, out_w, stride, pad, relu))))
    return out, x


def _conv_backward(x: Any, W: Any, dout: Any, out: Any, arg: Any, pool: tuple, mode: int, stride: int, pad: int,
                   conv_hw: tuple[int, int], need_input_grad: bool, dW_out: Any, db_out: Any) -> tuple[Any, Any, Any]:
    """dW, db and dx of a convolution in one launch (and one more adding the parts of dW's sum
    where it is cut): the gradient at its output is dout (mode 0), dout where the ReLU passed
    (1), or the pooled gradient routed through the pooling's argmax and the ReLU (2)."""
    n, c, h, w = x.shape
    filters, _, filter_h, filter_w = W.shape
    out_h, out_w = conv_hw
    dout = cupy.ascontiguousarray(dout)
    k = c * filter_h * filter_w
    dW, db = _target(dW_out, tuple(W.shape), dout.dtype), _target(db_out, (filters,), dout.dtype)
    splits, chunk = _splits(_tiles(filters, k + 1), n * out_h * out_w)
    partials = cupy.empty(splits * filters * (k + 1), dtype=dout.dtype) if splits > 1 else dW
    filter_blocks = splits * _tiles(filters, k + 1)
    dx = cupy.empty((n, c, h, w), dtype=dout.dtype) if need_input_grad else None
    data_blocks = n * _tiles(c, h * w) if need_input_grad else 0
    if arg is None:
        arg = cupy.empty(1, dtype=cupy.int32)         # not read (modes 0 and 1)
    pool_h, pool_w, pool_stride, pool_pad, pool_out_h, pool_out_w = pool
    _raw_kernel(_CONV_BACKWARD_SOURCE, "xpcnn_conv_backward", _c_type(dout.dtype))(
        (filter_blocks + data_blocks,), (_THREADS,),
        (x, cupy.ascontiguousarray(W), dout, dout if out is None else out, arg,
         *map(_i32, (mode, n, c, h, w, filters, filter_h, filter_w, out_h, out_w, stride, pad, pool_h, pool_w,
                     pool_stride, pool_pad, pool_out_h, pool_out_w)),
         dW, db, _i32(splits), _i64(chunk), partials, _i64(filter_blocks), dW if dx is None else dx))
    if splits > 1:
        _split_sum(partials, splits, filters, k + 1, _output(dW, k, 1, extra=db, extra_axis=2))
    return dx, _into(dW_out, dW), _into(db_out, db)


_NO_POOL = (1, 1, 1, 0, 1, 1)


def conv2d_forward(xp: ModuleType, x: Any, W: Any, b: Any, stride: int, pad: int,
                   out_h: int, out_w: int) -> tuple[Any, Any]:
    """One product kernel reading the image windows in place (no im2col copy), adding the bias."""
    out, x = _conv(x, W, b, stride, pad, out_h, out_w, relu=False)
    return out, (x, (out_h, out_w))


def conv2d_backward(xp: ModuleType, dout: Any, cache: Any, W: Any, stride: int, pad: int,
                    need_input_grad: bool, dW_out: Any = None, db_out: Any = None) -> tuple[Any, Any, Any]:
    """dW, db and dx in one launch (see `_conv_backward`)."""
    x, conv_hw = cache
    return _conv_backward(x, W, dout, None, None, _NO_POOL, 0, stride, pad, conv_hw, need_input_grad, dW_out,
                          db_out)


def conv2d_relu_forward(xp: ModuleType, x: Any, W: Any, b: Any, stride: int, pad: int,
                        out_h: int, out_w: int) -> tuple[Any, Any]:
    """``relu(conv(x))``: one product kernel, the bias added and the result clipped at zero."""
    out, x = _conv(x, W, b, stride, pad, out_h, out_w, relu=True)
    return out, (_CACHE_TAG, x, out)


def conv2d_relu_backward(xp: ModuleType, dout: Any, cache: Any, W: Any, stride: int, pad: int,
                         need_input_grad: bool, dW_out: Any = None, db_out: Any = None) -> tuple[Any, Any, Any]:
    """As `conv2d_backward`, the ReLU's gradient applied as the product reads dout."""
    if cache[0] == fused.COMPOSED:
        return NotImplemented
    _, x, out = cache
    return _conv_backward(x, W, dout, out, None, _NO_POOL, 1, stride, pad, tuple(out.shape[2:]), need_input_grad,
                          dW_out, db_out)


def conv2d_relu_maxpool2d_forward(xp: ModuleType, x: Any, W: Any, b: Any, stride: int, pad: int, out_h: int,
                                  out_w: int, pool: tuple) -> tuple[Any, Any]:
    """``maxpool(relu(conv(x)))``: the product kernel (bias added), then one pooling kernel that
    keeps each window's argmax and clips at zero."""
    conv_out, x = _conv(x, W, b, stride, pad, out_h, out_w, relu=False)
    out, arg = _maxpool(conv_out, *pool, relu=True)
    return out, (_CACHE_TAG, x, out, arg, tuple(pool), (out_h, out_w))


def conv2d_relu_maxpool2d_backward(xp: ModuleType, dout: Any, cache: Any, W: Any, stride: int, pad: int,
                                   need_input_grad: bool, dW_out: Any = None,
                                   db_out: Any = None) -> tuple[Any, Any, Any]:
    """One launch (two where dW's sum is cut): the products read the pooled gradient through the
    stored argmax and the ReLU's mask, so the unpooled gradient is never written."""
    if cache[0] == fused.COMPOSED:
        return NotImplemented
    _, x, out, arg, pool, conv_hw = cache
    return _conv_backward(x, W, cupy.ascontiguousarray(dout), out, arg, pool, 2, stride, pad, conv_hw,
                          need_input_grad, dW_out, db_out)


# ------------------------------------------------------------------------------------- ReLU

_relu_backward_kernel = cupy.ElementwiseKernel(
    "T out, T dout", "T dx", "dx = out > (T)0 ? dout : (T)0", "xpcnn_relu_backward")


def relu_forward(xp: ModuleType, x: Any) -> Any:
    return cupy.maximum(x, 0)


def relu_backward(xp: ModuleType, out: Any, dout: Any) -> Any:
    return _relu_backward_kernel(out, dout)


# ------------------------------------------------------------ softmax with cross-entropy

# The two row reductions (softmax-CE's loss, scoring's count) spread their rows over blocks,
# so that they scale with N: thread t of block b takes rows b * 256 + t, then strides over the
# grid; each block adds its threads' values in a fixed tree order. One block writes the result
# itself; several write one sum each, which `xpcnn_sum_blocks` adds in a fixed order. The grid
# depends only on N, so the result is the same every run (no atomics).
_THREADS_PER_ROW_BLOCK = 256
_MAX_BLOCKS = 1024

_SOFTMAX_CE_SOURCE = r"""
extern "C" __global__ void xpcnn_softmax_ce(const T* scores, const long long* labels, T* probs, T* grad,
                                            const T scale, T* loss_sums, const int n, const int k) {
    // probs = softmax(scores) row by row; grad = (probs - onehot(labels)) * scale, the loss's
    // gradient for dout = 1 (scale = 1/n), so that the backward pass launches nothing.
    __shared__ T partial[256];
    T mine = 0;
    for (long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x; row < n;
         row += (long long)gridDim.x * blockDim.x) {
        const T* s = scores + row * k;
        T* y = probs + row * k;
        T* g = grad + row * k;
        const long long label = labels[row];
        T top = s[0];
        for (int j = 1; j < k; ++j) top = s[j] > top ? s[j] : top;
        T total = 0;
        for (int j = 0; j < k; ++j) total += exp(s[j] - top);
        const T log_total = log(total);
        for (int j = 0; j < k; ++j) {
            const T p = exp(s[j] - top - log_total);
            y[j] = p;
            g[j] = (p - (T)(j == label)) * scale;
        }
        mine -= s[label] - top - log_total;
    }
    partial[threadIdx.x] = mine;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    // One block: the mean loss itself; several: this block's sum, for xpcnn_sum_blocks.
    if (threadIdx.x == 0) loss_sums[blockIdx.x] = gridDim.x == 1 ? partial[0] / (T)n : partial[0];
}
"""

_SUM_BLOCKS_SOURCE = r"""
extern "C" __global__ void xpcnn_sum_blocks(const T* block_sums, T* result, const int blocks, const T divisor) {
    // One block: the per-block sums of a reduction added in a fixed order, over `divisor`.
    __shared__ T partial[256];
    T mine = 0;
    for (int b = threadIdx.x; b < blocks; b += blockDim.x) mine += block_sums[b];
    partial[threadIdx.x] = mine;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) result[0] = partial[0] / divisor;
}
"""


def _blocks(rows: int) -> int:
    """Blocks of 256 threads for a row reduction over `rows` rows: a row per thread up
    to `_MAX_BLOCKS` blocks (then the threads stride over the rest)."""
    return max(1, min(-(-rows // _THREADS_PER_ROW_BLOCK), _MAX_BLOCKS))


def _row_reduction(source: str, name: str, c_type: str, result_dtype: Any, before: tuple, after: tuple, rows: int,
                   divisor: Any) -> Any:
    """Launch the row reduction `name` (arguments ``*before, sums, *after``) on `_blocks(rows)`
    blocks and return its 0-d result: 1 launch for one block, 2 (the per-block sums, then
    `xpcnn_sum_blocks`) for more."""
    blocks = _blocks(rows)
    result = cupy.empty((), dtype=result_dtype)
    if blocks == 1:
        _raw_kernel(source, name, c_type)((1,), (_THREADS_PER_ROW_BLOCK,), (*before, result, *after))
        return result
    block_sums = cupy.empty(blocks, dtype=result_dtype)
    _raw_kernel(source, name, c_type)((blocks,), (_THREADS_PER_ROW_BLOCK,), (*before, block_sums, *after))
    _raw_kernel(_SUM_BLOCKS_SOURCE, "xpcnn_sum_blocks", _c_type(result_dtype))(
        (1,), (_THREADS_PER_ROW_BLOCK,), (block_sums, result, np.int32(blocks), divisor))
    return result


_softmax_ce_backward_kernel = cupy.ElementwiseKernel(
    "raw T probs, raw int64 labels, int32 k, T scale", "T dx",
    "const int row = i / k; dx = (probs[i] - (T)((i % k) == labels[row])) * scale;",
    "xpcnn_softmax_ce_backward",
)


def softmax_cross_entropy_forward(xp: ModuleType, scores: Any, t: Any) -> tuple[Any, Any]:
    """One kernel for integer labels (probabilities, the mean loss, and the gradient for
    ``dout = 1``; a second one adds the blocks' sums above 256 rows); one-hot labels take the
    reference path."""
    if t.ndim != 1:
        return NotImplemented
    n, k = scores.shape
    scores = cupy.ascontiguousarray(scores)
    labels = cupy.ascontiguousarray(t if t.dtype == cupy.int64 else t.astype(cupy.int64))
    probs, grad = cupy.empty_like(scores), cupy.empty_like(scores)
    loss = _row_reduction(_SOFTMAX_CE_SOURCE, "xpcnn_softmax_ce", _c_type(scores.dtype), scores.dtype,
                          (scores, labels, probs, grad, scores.dtype.type(1 / n)), (np.int32(n), np.int32(k)), n,
                          scores.dtype.type(n))
    return loss, (probs, labels, "labels", grad)


def softmax_cross_entropy_backward(xp: ModuleType, cache: Any, dout: Any) -> Any:
    """``(y - onehot(t)) * dout / N``: for ``dout = 1`` the gradient the forward kernel wrote
    (no launch); one kernel for another number."""
    if len(cache) != 4:            # the reference's forward ran (one-hot labels)
        return NotImplemented
    probs, labels, _, grad = cache
    if isinstance(dout, (int, float)) and dout == 1:
        return grad
    if not isinstance(dout, (int, float)):   # an array dout: the reference's formula on the one-hot labels
        t_hot = one_hot(labels, probs.shape[1], probs.dtype)
        return reference.softmax_cross_entropy_backward(t_hot.__array_namespace__(), (probs, t_hot), dout)
    n, k = probs.shape
    dx = cupy.empty_like(probs)
    _softmax_ce_backward_kernel(probs, labels, k, probs.dtype.type(dout / n), dx)
    return dx


# ---------------------------------------------------------------------------------- scoring

_COUNT_CORRECT_SOURCE = r"""
extern "C" __global__ void xpcnn_count_correct(const T* scores, const long long* labels,
                                               long long* counts, const int n, const int k) {
    __shared__ long long partial[256];
    long long mine = 0;
    for (long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x; row < n;
         row += (long long)gridDim.x * blockDim.x) {
        const T* s = scores + row * k;
        int best = 0;
        // The first maximum, as argmax; a NaN counts as the maximum (argmax picks the first NaN).
        for (int j = 1; j < k && !isnan(s[best]); ++j) if (s[j] > s[best] || isnan(s[j])) best = j;
        mine += (best == labels[row]);
    }
    partial[threadIdx.x] = mine;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) counts[blockIdx.x] = partial[0];
}
"""


def count_correct(xp: ModuleType, scores: Any, t: Any) -> Any:
    """Argmax of each row against its label, counted in a fixed order: one kernel (a second
    one adds the blocks' counts above 256 rows)."""
    n, k = scores.shape
    labels = t if t.dtype == cupy.int64 else t.astype(cupy.int64)
    return _row_reduction(_COUNT_CORRECT_SOURCE, "xpcnn_count_correct", _c_type(scores.dtype), np.dtype(np.int64),
                          (cupy.ascontiguousarray(scores), cupy.ascontiguousarray(labels)),
                          (np.int32(n), np.int32(k)), n, np.int64(1))


# ------------------------------------------------------------------------------- optimizers
# One fused kernel over the whole (flat) parameter buffer each, in the reference's order of
# operations.

_sgd_kernel = cupy.ElementwiseKernel("T grad, T lr", "T param", "param -= lr * grad", "xpcnn_sgd")
_momentum_kernel = cupy.ElementwiseKernel(
    "T grad, T lr, T momentum", "T param, T v", "v = v * momentum - lr * grad; param += v", "xpcnn_momentum")
_adagrad_kernel = cupy.ElementwiseKernel(
    "T grad, T lr, T eps", "T param, T h",
    "h += grad * grad; param -= (grad / (sqrt(h) + eps)) * lr;", "xpcnn_adagrad")
# `1 - beta` comes computed on the host in double and rounded once, as the reference does:
# computed in float from the rounded 0.999f it is 9.99987e-4, not 1e-3 (a 1.3e-5 relative error
# in `v`, visible from the zero state).
_ADAM = ("m += one_minus_beta1 * (grad - m); v += one_minus_beta2 * (grad * grad - v); "
         "param -= lr_t * m / (sqrt(v) + eps);")
_adam_kernel = cupy.ElementwiseKernel(
    "T grad, T lr_t, T one_minus_beta1, T one_minus_beta2, T eps", "T param, T m, T v", _ADAM, "xpcnn_adam")
# The same formula with the step size read from device memory: a captured step's update, whose
# step size changes every step while a CUDA graph keeps its kernels' arguments (the step size
# is written there before each replay, see xpcnn.nn.compiled_step).
_adam_device_kernel = cupy.ElementwiseKernel(
    "T grad, raw T step_size, T one_minus_beta1, T one_minus_beta2, T eps", "T param, T m, T v",
    "const T lr_t = step_size[0]; " + _ADAM, "xpcnn_adam_device")


def sgd_update(xp: ModuleType, param: Any, grad: Any, lr: float) -> None:
    t = param.dtype.type
    _sgd_kernel(grad, t(lr), param)


def momentum_update(xp: ModuleType, param: Any, grad: Any, v: Any, lr: float, momentum: float) -> None:
    t = param.dtype.type
    _momentum_kernel(grad, t(lr), t(momentum), param, v)


def adagrad_update(xp: ModuleType, param: Any, grad: Any, h: Any, lr: float, eps: float) -> None:
    t = param.dtype.type
    _adagrad_kernel(grad, t(lr), t(eps), param, h)


def adam_update(xp: ModuleType, param: Any, grad: Any, m: Any, v: Any, lr_t: Any,
                beta1: float, beta2: float, eps: float) -> None:
    """`lr_t` is a number, or a one-element device array holding it (a captured step's)."""
    t = param.dtype.type
    if isinstance(lr_t, (int, float)):
        _adam_kernel(grad, t(lr_t), t(1.0 - beta1), t(1.0 - beta2), t(eps), param, m, v)
    else:
        _adam_device_kernel(grad, lr_t, t(1.0 - beta1), t(1.0 - beta2), t(eps), param, m, v)


# ------------------------------------------------------------------------------ CUDA graphs

class WarmedBuffers:
    """Every allocation of one training step, made once and handed out again in the same order.

    Inside `recording()` each allocation is a new block of CuPy's memory pool, kept here (an
    eager step runs inside it); inside `serving()` the same sequence of sizes is answered with
    the same blocks (the step runs again there, under stream capture). So a captured graph
    reads and writes memory that nothing else is given while these buffers live: memory the
    pool handed out during a capture would go back to it afterwards, and each replay would
    overwrite whatever array got it next. A step that asks for other sizes than the recorded
    one is an error, not a silent reuse.
    """

    def __init__(self) -> None:
        self._blocks: list[tuple[int, Any]] = []
        self._served = 0

    @property
    def nbytes(self) -> int:
        return sum(size for size, _ in self._blocks)

    def _record(self, size: int) -> Any:
        block = cupy.get_default_memory_pool().malloc(size)
        self._blocks.append((size, block))
        return block

    def _serve(self, size: int) -> Any:
        served = self._served
        if served >= len(self._blocks) or self._blocks[served][0] != size:
            recorded = f"{self._blocks[served][0]} bytes" if served < len(self._blocks) else "no more allocations"
            raise RuntimeError(f"the captured step asked for {size} bytes at its allocation {served + 1}, where the "
                               f"recorded step made {recorded}: a step must allocate the same way every time")
        self._served += 1
        return self._blocks[served][1]

    def recording(self) -> Any:
        self._blocks, self._served = [], 0
        return cupy.cuda.using_allocator(self._record)

    @contextlib.contextmanager
    def serving(self) -> Any:
        self._served = 0
        with cupy.cuda.using_allocator(self._serve):
            yield
        if self._served != len(self._blocks):
            raise RuntimeError(f"the captured step made {self._served} of the {len(self._blocks)} allocations the "
                               f"recorded step made: a step must allocate the same way every time")


def capture_graph(step: Callable[[], Any], buffers: WarmedBuffers) -> tuple[Any, Any]:
    """(graph, what `step()` returned): `step` run once under stream capture on a side stream
    (nothing runs; its launches become the graph), its allocations served by `buffers`. An
    error inside ends the capture and is raised as it was."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            with buffers.serving():
                result = step()
        except BaseException:
            with contextlib.suppress(Exception):     # the capture the error invalidated
                stream.end_capture()
            raise
        graph = stream.end_capture()
    return graph, result


def launch_graph(graph: Any) -> None:
    """Replay `graph` on the current stream (where xpcnn's other work runs, so in order with it)."""
    graph.launch(stream=cupy.cuda.get_current_stream())


_CUDA_GRAPHS = types.SimpleNamespace(WarmedBuffers=WarmedBuffers, capture=capture_graph, launch=launch_graph)


def cuda_graphs() -> Any:
    """What `xpcnn.nn.compiled_step` needs of CuPy to capture and replay a step:
    ``WarmedBuffers``, ``capture(step, buffers) -> (graph, result)``, ``launch(graph)``."""
    return _CUDA_GRAPHS


def fast_ops() -> dict[str, Callable[..., Any]]:
    """The entries this module replaces in CuPy's operation table."""
    return {name: globals()[name] for name in (
        "conv2d_forward", "conv2d_backward", "affine_forward", "affine_backward", "maxpool2d_forward",
        "maxpool2d_backward", "relu_forward", "relu_backward", "softmax_cross_entropy_forward",
        "softmax_cross_entropy_backward", "count_correct",
        "sgd_update", "momentum_update", "adagrad_update", "adam_update",
        "conv2d_relu_forward", "conv2d_relu_backward", "conv2d_relu_maxpool2d_forward",
        "conv2d_relu_maxpool2d_backward", "affine_relu_forward", "affine_relu_backward")}
