"""Winograd's F(2x2, 3x3) convolution for `fast_numba`: 3 x 3 filters, stride 1, several
channels, on channels-last memory ``(N, H, W, C)``. Each 2 x 2 block of output pixels (a
tile) comes from a 4 x 4 patch of the input ``d`` (rows and columns ``2 t - pad`` to
``2 t - pad + 3``; what lies outside the image reads as zero: each image is copied, one at a
time, into a scratch buffer with a border of zeros):

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise, per channel pair, summed over C)

    B^T = [[1, 0, -1,  0],     G = [[1,    0,   0],     A^T = [[1, 1,  1,  0],
           [0, 1,  1,  0],          [1/2,  1/2, 1/2],          [0, 1, -1, -1]]
           [0, -1, 1,  0],          [1/2, -1/2, 1/2],
           [0, 1,  0, -1]]          [0,    0,   1]]

The 16 positions ``p = 4 i + j`` of the 4 x 4 transforms are 16 independent matrix products
``M[p] = V[p] @ U[p]``, ``V (tiles, 16, C)`` the transformed input, ``U (16, C, K)`` the
transformed filters: those stay in BLAS; the transforms are the compiled loops below (the
channel loop innermost, contiguous, so that it vectorises):

    filter_transform        U = G g G^T for every (c, k)
    filter_gradient         dW = G^T dU G (the transposed filter transform)
    input_transform         V = B^T d B for every tile and channel, from the image with its
                            border of zeros (`_pad_image`)
    input_gradient          dx += B dV B^T, summed onto the overlapping patches in the bordered
                            scratch (the transposed input transform), then what lies inside
                            the image added to dx (`_add_image`)
    output_relu             Y = A^T M A + bias, ReLU, the tiles' pixels inside the output
    output_relu_pool        the same with the 2 x 2 max pooling of each tile (the pooling
                            windows are the tiles) and the offset of its first maximum, as
                            `conv_kernels.bias_relu_pool`
    relu_tiles_gradient     dM = A dY A^T of the output's gradient where it passed the ReLU
                            (zeros beyond the output's last row and column), and db
    pool_tiles_gradient     the same for the pooled gradient placed at each window's maximum

**Compiled per channel count.** The kernels are compiled once for each input channel count
C (`input_kernels`) and each filter count K (`output_kernels`), kept per count in the kernel
folder, with the count a constant of the machine code. LLVM then knows the channel loop's
trip count and the 16 positions' rows C (K) apart, and it vectorises that loop with few or
no runtime alias checks. The input side's loops index views (a patch row, a tile's 16 x C
block) with the loop's own index: the same loop on the flat buffer at computed offsets
compiled with no packed subtraction at all (likely because Numba wraps a negative index,
and LLVM cannot tell that such an offset is >= 0). Measured on one core, float32, results equal
bit for bit to the kernels compiled once for any count (the cases of
tests/ops/test_compiled_kernels.py and DeepConvNet's shapes):
- `pool_tiles_gradient` took 0.74 -> 0.21 ms for 20 images at 16 filters.
- `relu_tiles_gradient` took 0.42 -> 0.11 ms at 64 filters (8 x 8).
- `output_relu_pool` took 0.53 -> 0.32 ms at 16 filters, but 0.037 -> 0.046 at 64 (8 x 8
  to 4 x 4). `output_relu` is as fast or faster (1-21% over two runs).
- Over DeepConvNet's five layers, 100 images in its chunks, `input_transform` took
  5.46 -> 2.95 ms and `input_gradient` 4.89 -> 2.95 ms. In float64 the 64-channel layer was
  3-4% slower, the others faster.
The price is a compile per new count (each kept on disk).

An odd output size makes the last row (column) of tiles half outside: their second output
row is computed and dropped (with pooling, which does not cover it, the half tiles are not
computed at all).

**Rounding.** The transforms add and subtract up to 4 x 4 values before the product and
after it (the coefficients 1/2 of G are exact). Measured in float32 against a float64
reference on DeepConvNet's five multi-channel shapes (batch 20, He-scaled filters; max
difference / max value): output 1.9-3.8e-7 and dx 2.0-3.6e-7 (the chunked path: 4.1-5.4e-7,
3.2-5.0e-7), dW 3.4-7.2e-7 (chunked 2.6-3.3e-7), db 1.8-9.2e-7 (chunked 2.1e-7-1.1e-6): within
the tests' float32 tolerance of 1e-5 with room, which stays as it was.

**NaN and infinity.** A NaN in the input reaches exactly the outputs whose 3 x 3 window holds
it, as in the reference: the transforms only add and subtract (never multiply by the
matrices' zeros), and a patch pixel enters only the tile outputs that read it
(tests/ops/test_compiled_kernels.py checks the NaN masks equal). An infinite input, though,
enters several positions of V with both signs, and the output transform then adds +inf and
-inf: NaN where the direct convolution gives +-inf (both non-finite and visible; the
Trainer's NaN check sees either).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from .kernel_cache import kernel, njit

#: Numba's options for these loops: no GIL (the slices of a batch run on their own threads),
#: NumPy's error model.
_OPTIONS = {"nogil": True, "error_model": "numpy"}

#: The F(2x2, 3x3) matrices (documentation, and the float64 check of the compiled loops in
#: tests/ops/test_fast_ops.py; the loops below have their coefficients written out).
B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)


def tiles(out_h: int, out_w: int, pooled: bool) -> tuple[int, int]:
    """Tiles down and across an ``out_h x out_w`` output: all of it, or (pooled) only the
    whole 2 x 2 windows the pooling reads."""
    if pooled:
        return out_h // 2, out_w // 2
    return (out_h + 1) // 2, (out_w + 1) // 2


@kernel(**_OPTIONS)
def filter_transform(W, U):
    """``U[4 p + q, c, k] = (G W[k, c] G^T)[p, q]`` for ``W (K, C, 3, 3)``, ``U (16, C, K)``."""
    t = np.empty((3, 4), dtype=U.dtype)
    for k in range(W.shape[0]):
        for c in range(W.shape[1]):
            g = W[k, c]
            for i in range(3):        # g G^T: rows (g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2)
                t[i, 0] = g[i, 0]
                t[i, 1] = (g[i, 0] + g[i, 1] + g[i, 2]) * 0.5
                t[i, 2] = (g[i, 0] - g[i, 1] + g[i, 2]) * 0.5
                t[i, 3] = g[i, 2]
            for q in range(4):
                U[q, c, k] = t[0, q]
                U[4 + q, c, k] = (t[0, q] + t[1, q] + t[2, q]) * 0.5
                U[8 + q, c, k] = (t[0, q] - t[1, q] + t[2, q]) * 0.5
                U[12 + q, c, k] = t[2, q]


@kernel(**_OPTIONS)
def filter_gradient(dU, dW):
    """``dW[k, c] = G^T dU[:, c, k] G`` (dU's 16 positions as 4 x 4), the transpose of
    `filter_transform`."""
    t = np.empty((3, 4), dtype=dW.dtype)
    for k in range(dW.shape[0]):
        for c in range(dW.shape[1]):        # G^T dU: rows u0 + (u1 + u2) / 2, (u1 - u2) / 2, (u1 + u2) / 2 + u3
            for q in range(4):
                u0, u1, u2, u3 = dU[q, c, k], dU[4 + q, c, k], dU[8 + q, c, k], dU[12 + q, c, k]
                t[0, q] = u0 + (u1 + u2) * 0.5
                t[1, q] = (u1 - u2) * 0.5
                t[2, q] = (u1 + u2) * 0.5 + u3
            for i in range(3):
                dW[k, c, i, 0] = t[i, 0] + (t[i, 1] + t[i, 2]) * 0.5
                dW[k, c, i, 1] = (t[i, 1] - t[i, 2]) * 0.5
                dW[k, c, i, 2] = (t[i, 1] + t[i, 2]) * 0.5 + t[i, 3]


@njit(**_OPTIONS)
def _tile_at(t, first, tiles_h, tiles_w):
    """Tile `t` of a row-major run of whole images' tiles from image `first`: ``(image, tile
    row, tile column)``."""
    per_image = tiles_h * tiles_w
    return first + t // per_image, (t % per_image) // tiles_w, t % tiles_w


@njit(**_OPTIONS)
def _relu(value, zero):
    """ReLU that keeps a NaN."""
    return value if not (value <= 0) else zero


@njit(**_OPTIONS)
def _output_tile(M, t, k):
    """``A^T M[t, :, k] A`` (M's 16 positions as 4 x 4): the tile's pixels (y00, y01, y10, y11).
    Rows first: ``s0 = m0 + m1 + m2``, ``s1 = m1 - m2 - m3`` (rows of 4), then the same on
    their columns."""
    s00 = M[t, 0, k] + M[t, 4, k] + M[t, 8, k]
    s01 = M[t, 1, k] + M[t, 5, k] + M[t, 9, k]
    s02 = M[t, 2, k] + M[t, 6, k] + M[t, 10, k]
    s03 = M[t, 3, k] + M[t, 7, k] + M[t, 11, k]
    s10 = M[t, 4, k] - M[t, 8, k] - M[t, 12, k]
    s11 = M[t, 5, k] - M[t, 9, k] - M[t, 13, k]
    s12 = M[t, 6, k] - M[t, 10, k] - M[t, 14, k]
    s13 = M[t, 7, k] - M[t, 11, k] - M[t, 15, k]
    return s00 + s01 + s02, s01 - s02 - s03, s10 + s11 + s12, s11 - s12 - s13


@njit(**_OPTIONS)
def _store_gradient_tile(g00, g01, g10, g11, dm, at, K):
    """``dM = A dY A^T`` for the tile's gradient ``dY = [[g00, g01], [g10, g11]]``, stored at
    ``dm[at + p K]`` for its 16 positions p: rows ``(g0, g0 + g1, g0 - g1, -g1)`` of dY's rows,
    then the same on the columns."""
    r00, r01 = g00, g01
    r10, r11 = g00 + g10, g01 + g11
    r20, r21 = g00 - g10, g01 - g11
    r30, r31 = -g10, -g11
    dm[at], dm[at + K], dm[at + 2 * K], dm[at + 3 * K] = r00, r00 + r01, r00 - r01, -r01
    dm[at + 4 * K], dm[at + 5 * K], dm[at + 6 * K], dm[at + 7 * K] = r10, r10 + r11, r10 - r11, -r11
    dm[at + 8 * K], dm[at + 9 * K], dm[at + 10 * K], dm[at + 11 * K] = r20, r20 + r21, r20 - r21, -r21
    dm[at + 12 * K], dm[at + 13 * K], dm[at + 14 * K], dm[at + 15 * K] = r30, r30 + r31, r30 - r31, -r31


class InputKernels(NamedTuple):
    """The input side's kernels for one channel count (`input_kernels`)."""
    transform: Any
    gradient: Any


@functools.cache
def input_kernels(channels: int) -> InputKernels:
    """`input_transform` and `input_gradient` compiled for inputs of `channels` channels."""
    C = channels        # a constant of the compiled code (see the module's docstring)

    @kernel(**_OPTIONS)
    def input_transform(x, first, last, pad, tiles_h, tiles_w, padded, V):
        """``V[t] = B^T d B`` for the tiles ``t`` of images ``first:last`` of ``x (N, H, W, C)``
        (row-major, image by image), ``V (tiles, 16, C)``; ``padded (2 tiles_h + 2,
        2 tiles_w + 2, C)`` a scratch buffer for one image with its border of zeros (every
        patch then lies inside it). All C-contiguous."""
        xs, ps, vs = x.reshape(-1), padded.reshape(-1), V.reshape(-1)
        row = padded.shape[1] * C
        t = 0
        for n in range(first, last):
            _pad_image(xs, n, x.shape[1], x.shape[2], pad, C, ps, 2 * tiles_h + 2, padded.shape[1])
            for ty in range(tiles_h):
                for tx in range(tiles_w):
                    at = 2 * ty * row + 2 * tx * C          # the patch's rows: views, so that
                    d0 = ps[at:at + 4 * C]                  # their indices are known >= 0
                    d1, d2, d3 = ps[at + row:at + row + 4 * C], ps[at + 2 * row:at + 2 * row + 4 * C], \
                        ps[at + 3 * row:at + 3 * row + 4 * C]
                    v = vs[16 * t * C:16 * (t + 1) * C]
                    for c in range(C):
                        # B^T d: rows d0 - d2, d1 + d2, d2 - d1, d1 - d3; then (.) B: columns the same
                        a0, a1, a2, a3 = d0[c] - d2[c], d0[C + c] - d2[C + c], d0[2 * C + c] - d2[2 * C + c], \
                            d0[3 * C + c] - d2[3 * C + c]
                        b0, b1, b2, b3 = d1[c] + d2[c], d1[C + c] + d2[C + c], d1[2 * C + c] + d2[2 * C + c], \
                            d1[3 * C + c] + d2[3 * C + c]
                        e0, e1, e2, e3 = d2[c] - d1[c], d2[C + c] - d1[C + c], d2[2 * C + c] - d1[2 * C + c], \
                            d2[3 * C + c] - d1[3 * C + c]
                        f0, f1, f2, f3 = d1[c] - d3[c], d1[C + c] - d3[C + c], d1[2 * C + c] - d3[2 * C + c], \
                            d1[3 * C + c] - d3[3 * C + c]
                        v[c], v[C + c], v[2 * C + c], v[3 * C + c] = a0 - a2, a1 + a2, a2 - a1, a1 - a3
                        v[4 * C + c], v[5 * C + c], v[6 * C + c], v[7 * C + c] = b0 - b2, b1 + b2, b2 - b1, b1 - b3
                        v[8 * C + c], v[9 * C + c], v[10 * C + c], v[11 * C + c] = e0 - e2, e1 + e2, e2 - e1, e1 - e3
                        v[12 * C + c], v[13 * C + c], v[14 * C + c], v[15 * C + c] = f0 - f2, f1 + f2, f2 - f1, f1 - f3
                    t += 1

    @kernel(**_OPTIONS)
    def input_gradient(dV, first, last, pad, tiles_h, tiles_w, patch, padded, dx):
        """``dx[n, patch rows, patch columns] += B dV[t] B^T`` for the tiles of images
        ``first:last`` (the transpose of `input_transform`): each image's sums are made in
        ``padded`` (as `input_transform`'s) and what lies inside the image is added to dx,
        what falls on the border dropped; ``patch (4, 4, C)`` holds one tile's. All
        C-contiguous."""
        vs, qs, ps, xs = dV.reshape(-1), patch.reshape(-1), padded.reshape(-1), dx.reshape(-1)
        zero = dx.dtype.type(0)
        row, rows = padded.shape[1] * C, 2 * tiles_h + 2
        t = 0
        for n in range(first, last):
            for f in range(rows * row):
                ps[f] = zero
            for ty in range(tiles_h):
                for tx in range(tiles_w):
                    v = vs[16 * t * C:16 * (t + 1) * C]
                    for c in range(C):
                        # (.) B^T on the rows of dV: columns v0, v1 - v2 + v3, v1 + v2 - v0, -v3
                        a0, a1, a2, a3 = v[c], v[C + c] - v[2 * C + c] + v[3 * C + c], v[C + c] + v[2 * C + c] - v[c], \
                            -v[3 * C + c]
                        b0, b1, b2, b3 = v[4 * C + c], v[5 * C + c] - v[6 * C + c] + v[7 * C + c], \
                            v[5 * C + c] + v[6 * C + c] - v[4 * C + c], -v[7 * C + c]
                        e0, e1, e2, e3 = v[8 * C + c], v[9 * C + c] - v[10 * C + c] + v[11 * C + c], \
                            v[9 * C + c] + v[10 * C + c] - v[8 * C + c], -v[11 * C + c]
                        f0, f1, f2, f3 = v[12 * C + c], v[13 * C + c] - v[14 * C + c] + v[15 * C + c], \
                            v[13 * C + c] + v[14 * C + c] - v[12 * C + c], -v[15 * C + c]
                        # B (.): rows the same
                        qs[c], qs[C + c], qs[2 * C + c], qs[3 * C + c] = a0, a1, a2, a3
                        qs[4 * C + c], qs[5 * C + c], qs[6 * C + c], qs[7 * C + c] = \
                            b0 - e0 + f0, b1 - e1 + f1, b2 - e2 + f2, b3 - e3 + f3
                        qs[8 * C + c], qs[9 * C + c], qs[10 * C + c], qs[11 * C + c] = \
                            b0 + e0 - a0, b1 + e1 - a1, b2 + e2 - a2, b3 + e3 - a3
                        qs[12 * C + c], qs[13 * C + c], qs[14 * C + c], qs[15 * C + c] = -f0, -f1, -f2, -f3
                    at = 2 * ty * row + 2 * tx * C
                    for i in range(4):
                        _add_row(qs[4 * i * C:4 * (i + 1) * C], ps[at + i * row:at + i * row + 4 * C])
                    t += 1
            _add_image(ps, rows, padded.shape[1], pad, C, xs, n, dx.shape[1], dx.shape[2])

    return InputKernels(input_transform, input_gradient)


@njit(**_OPTIONS)
def _add_row(source, target):
    """``target += source`` (two views of the same length)."""
    for f in range(source.shape[0]):
        target[f] += source[f]


@njit(**_OPTIONS)
def _pad_image(xs, n, height, width, pad, channels, ps, rows, cols):
    """Image `n` of the flat ``xs`` (images of `height` x `width` pixels of `channels` values)
    into the flat ``ps`` of `rows` x `cols` pixels, `pad` rows and columns down and across,
    zeros around it; what of the image lies beyond ``ps`` is left out."""
    zero = ps.dtype.type(0)
    line, left = cols * channels, min(pad, cols) * channels
    take = max(0, min(width, cols - pad)) * channels
    for r in range(rows):
        y, target = r - pad, ps[r * line:(r + 1) * line]
        if 0 <= y < height:
            source = xs[((n * height + y) * width) * channels:]
            for f in range(left):
                target[f] = zero
            for f in range(take):
                target[left + f] = source[f]
            for f in range(left + take, line):
                target[f] = zero
        else:
            for f in range(line):
                target[f] = zero


@njit(**_OPTIONS)
def _add_image(ps, rows, cols, pad, channels, xs, n, height, width):
    """The transpose of `_pad_image`: what of the flat ``ps`` (`rows` x `cols` pixels) lies
    inside image `n` added to it (``xs``, images of `height` x `width` pixels), the border
    dropped."""
    line = cols * channels
    take = max(0, min(width, cols - pad)) * channels
    for y in range(min(height, rows - pad)):
        source = ps[(y + pad) * line + pad * channels:]
        target = xs[((n * height + y) * width) * channels:]
        _add_row(source[:take], target[:take])


class OutputKernels(NamedTuple):
    """The output side's kernels for one filter count (`output_kernels`)."""
    relu: Any
    relu_pool: Any
    relu_gradient: Any
    pool_gradient: Any


@functools.cache
def output_kernels(filters: int) -> OutputKernels:
    """`output_relu`, `output_relu_pool`, `relu_tiles_gradient` and `pool_tiles_gradient`
    compiled for outputs of `filters` channels."""
    K = filters         # a constant of the compiled code

    @kernel(**_OPTIONS)
    def output_relu(M, b, first, tiles_h, tiles_w, scratch, out):
        """``out[image, 2 x 2 pixels of the tile] = relu(A^T M[t] A + b)`` for the tiles of
        ``M (tiles, 16, K)`` (whole images from `first`, row-major), ``out (N, OH, OW, K)``; a
        tile's pixels beyond the output's last row or column are dropped (``scratch (4, K)``
        holds such a tile). A NaN stays NaN."""
        out_h, out_w = out.shape[1], out.shape[2]
        zero = out.dtype.type(0)
        for t in range(M.shape[0]):
            n, ty, tx = _tile_at(t, first, tiles_h, tiles_w)
            y0, x0 = 2 * ty, 2 * tx
            if y0 + 1 < out_h and x0 + 1 < out_w:
                top, bottom = out[n, y0], out[n, y0 + 1]
                for k in range(K):
                    y00, y01, y10, y11 = _output_tile(M, t, k)
                    top[x0, k] = _relu(y00 + b[k], zero)
                    top[x0 + 1, k] = _relu(y01 + b[k], zero)
                    bottom[x0, k] = _relu(y10 + b[k], zero)
                    bottom[x0 + 1, k] = _relu(y11 + b[k], zero)
            else:
                for k in range(K):
                    y00, y01, y10, y11 = _output_tile(M, t, k)
                    scratch[0, k] = _relu(y00 + b[k], zero)
                    scratch[1, k] = _relu(y01 + b[k], zero)
                    scratch[2, k] = _relu(y10 + b[k], zero)
                    scratch[3, k] = _relu(y11 + b[k], zero)
                for a in range(2):
                    for col in range(2):
                        if y0 + a < out_h and x0 + col < out_w:
                            out[n, y0 + a, x0 + col] = scratch[2 * a + col]

    @kernel(**_OPTIONS)
    def output_relu_pool(M, b, first, pooled, arg):
        """``pooled = relu(maxpool2x2(A^T M A + b))``: each tile is one pooling window, ``pooled``
        and ``arg (N, OH/2, OW/2, K)`` from image `first`; ``arg`` the offset ``2 r + c`` of the
        window's first maximum (row-major), or -1 where the ReLU passed nothing back (maximum <= 0,
        or NaN); a NaN wins its window (the first NaN) and stays NaN, as
        `conv_kernels.bias_relu_pool`."""
        tiles_h, tiles_w = pooled.shape[1], pooled.shape[2]
        zero = pooled.dtype.type(0)
        for t in range(M.shape[0]):
            n, ty, tx = _tile_at(t, first, tiles_h, tiles_w)
            best_row, where_row = pooled[n, ty, tx], arg[n, ty, tx]
            for k in range(K):
                y00, y01, y10, y11 = _output_tile(M, t, k)
                bias = b[k]
                best, where = y00 + bias, 0
                value = y01 + bias
                if not (value <= best) and best == best:     # larger, or the first NaN
                    best, where = value, 1
                value = y10 + bias
                if not (value <= best) and best == best:
                    best, where = value, 2
                value = y11 + bias
                if not (value <= best) and best == best:
                    best, where = value, 3
                where_row[k] = where if best > 0 else -1
                best_row[k] = _relu(best, zero)

    @kernel(**_OPTIONS)
    def relu_tiles_gradient(dout, out, first, tiles_h, tiles_w, dM, db):
        """``dM[t] = A dY A^T`` with ``dY = dout * (out > 0)`` on the tile's pixels (zero
        beyond the output's last row or column), ``dout`` and ``out (N, OH, OW, K)``, the
        tiles of whole images from `first`; ``db +=`` the sums of dY. All C-contiguous."""
        out_h, out_w = out.shape[1], out.shape[2]
        ds, os, dms = dout.reshape(-1), out.reshape(-1), dM.reshape(-1)
        zero = dM.dtype.type(0)
        for t in range(dM.shape[0]):
            n, ty, tx = _tile_at(t, first, tiles_h, tiles_w)
            y0, x0 = 2 * ty, 2 * tx
            y1, x1 = min(y0 + 1, out_h - 1), min(x0 + 1, out_w - 1)     # a half tile reads its last pixel twice...
            keep_y, keep_x = y0 + 1 < out_h, x0 + 1 < out_w               # ...and drops it
            p00, p01 = ((n * out_h + y0) * out_w + x0) * K, ((n * out_h + y0) * out_w + x1) * K
            p10, p11 = ((n * out_h + y1) * out_w + x0) * K, ((n * out_h + y1) * out_w + x1) * K
            for k in range(K):
                g00 = ds[p00 + k] if os[p00 + k] > 0 else zero
                g01 = ds[p01 + k] if os[p01 + k] > 0 and keep_x else zero
                g10 = ds[p10 + k] if os[p10 + k] > 0 and keep_y else zero
                g11 = ds[p11 + k] if os[p11 + k] > 0 and keep_y and keep_x else zero
                db[k] += (g00 + g01) + (g10 + g11)
                _store_gradient_tile(g00, g01, g10, g11, dms, 16 * t * K + k, K)

    @kernel(**_OPTIONS)
    def pool_tiles_gradient(dout, arg, first, dM, db):
        """``dM[t] = A dY A^T`` with ``dY`` the pooled gradient ``dout (N, PH, PW, K)`` placed
        at the window's offset ``arg`` (where >= 0), zeros elsewhere, the tiles (windows) of
        whole images from `first`; ``db +=`` what was placed. All C-contiguous."""
        per_image = arg.shape[1] * arg.shape[2]
        ds, args, dms = dout.reshape(-1), arg.reshape(-1), dM.reshape(-1)
        zero = dM.dtype.type(0)
        for t in range(dM.shape[0]):
            at = (first * per_image + t) * K
            for k in range(K):
                where = args[at + k]
                g = ds[at + k] if where >= 0 else zero
                db[k] += g
                _store_gradient_tile(g if where == 0 else zero, g if where == 1 else zero,
                                     g if where == 2 else zero, g if where == 3 else zero, dms, 16 * t * K + k, K)

    return OutputKernels(output_relu, output_relu_pool, relu_tiles_gradient, pool_tiles_gradient)
