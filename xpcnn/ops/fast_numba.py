"""Compiled CPU kernels (Numba) for NumPy's operation table: each fused pass is one kernel.

Beside `fast_numpy` (NumPy calls) and `fast_cupy` (CUDA kernels), with the same signatures,
each function here replaces an operation of the table with compiled loops that make one pass
over memory where NumPy makes several:

    operation                               kernel
    conv2d_relu_maxpool2d_*, one channel,   the convolution computed plane by plane, two
    stride 1                                filters per pass (one long vectorised multiply-add
                                            per filter row), its bias, ReLU and the pooling's
                                            maximum with the window offset of the maximum while
                                            the planes are in cache (2 x 2 pooling: the four
                                            window offsets' planes from shifted copies of the
                                            image, pooled elementwise); backward: the gradient
                                            placed at the pooled maxima that passed the ReLU,
                                            then dW as one dot product per tap; without an
                                            input gradient and with 2 x 2 pooling, dW from the
                                            pooled gradient times the value each window's
                                            maximum read, picked from shifted copies of the
                                            image (no full-size gradient plane)
    conv2d_relu_*, one channel, stride 1    the same convolution with its bias and ReLU
    conv2d_relu[_maxpool2d]_*, several      Winograd's F(2x2, 3x3): compiled input, output and
    channels, 3 x 3 filters, stride 1,      gradient transforms around BLAS's 16 products per
    pad <= 2 (2 x 2 pooling)                chunk, bias, ReLU (and pooling) in the output
                                            transform (`_WinogradConvolution`, `winograd`;
                                            ``WINOGRAD = False`` switches it off)
    conv2d_relu[_maxpool2d]_*, several      fast_numpy's window copies and BLAS products chunk
    channels, stride 1, pad < filter        by chunk, with bias, ReLU (and pooling) in one
                                            compiled pass on each chunk's product
                                            (`_ChunkedConvolution`, `conv_kernels`)
    softmax_cross_entropy_*                 one pass per row: probabilities, loss, and the
                                            gradient for ``dout = 1`` (backward returns it)
    count_correct                           argmax and comparison in one pass
    sgd / momentum / adagrad / adam         one pass over the flat parameter buffer

The unfused operations (the plain convolution, Affine, ReLU, pooling) stay `fast_numpy`'s;
this module's entries are laid over that table. Cases without a kernel here (stride 2,
pooling that does not tile, one-hot labels, ...) return ``NotImplemented`` and take the
table's other path (for a fused operation, its definition on fast_numpy's entries).

**Threads.** The kernels release the GIL (``nogil``) and run on the slices of the batch (or
of the flat buffer) of `cpu_threads.run_in_slices`: one pool of threads for the whole fast
path, the same one the BLAS products use, never Numba's own parallel loops beside it (two
pools would wait on each other's spinning threads). Sums over the batch are kept per slice
and added in slice order, so runs with the same number of threads are bit-identical.

**NaN rules** as the reference: a NaN in a pooling window wins it and stays visible through
the ReLU (its gradient is zero, as the reference's ReLU gives); argmax takes the first NaN.

**Compilation.** Each kernel is compiled on its first call for each dtype (a few seconds in
all, the first time) and cached on disk (`kernel_cache`); a cache that cannot be read is
discarded and the kernel compiled again. Imported only where Numba imports
(`xpcnn.ops.table`); ``XPCNN_CPU_KERNELS=numpy`` selects NumPy's path instead.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, NamedTuple

import numpy as np

from . import conv_kernels, fast_numpy, kernel_cache, reference, winograd
from .cpu_threads import run_in_slices
from .functions import one_hot
from .reference import store_gradient

njit, kernel = kernel_cache.njit, kernel_cache.kernel

#: Fast-math flags for the sums of products (reassociation lets LLVM vectorise them; no
#: "nnan"/"ninf": NaN and infinity must stay visible).
_SUMS = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: The tag of this module's caches (a backward tells its own forward's cache by it).
_TAG = "numba"

#: About how many bytes of im2col rows one chunk of images holds (as `fast_numpy`'s): a few
#: images, so that the rows, their product and the epilogue meet in cache.
CHUNK_BYTES = 2 << 20

#: Whether 3 x 3, stride-1 convolutions of several channels take Winograd's F(2x2, 3x3)
#: (`_WinogradConvolution`); False: the window copies and products of `_ChunkedConvolution`
#: (for comparisons: tests, scripts/deep_step_ab.py).
WINOGRAD = True

#: About how many bytes of transformed tiles (input V and product M) one Winograd chunk holds.
WINOGRAD_CHUNK_BYTES = 1 << 20


# --------------------------------------------------------------------- one-channel convolution
# Stride 1. An image is padded into a flat buffer of `width` columns; the output pixel
# (oh, ow) of a filter is then ``plane[oh * width + ow]`` and its tap (i, j) reads
# ``image[oh * width + ow + i * width + j]``: each tap is one long contiguous multiply-add over
# the whole plane (``out_h * width`` values, the columns past ``out_w`` computed and never
# read), which vectorises; the image buffer has ``filter_w`` spare values at its end for the
# last row's unread columns. (Slices, not computed indices, in the inner loops: Numba checks
# a computed index for a negative value, which keeps LLVM from vectorising the loop.)

@njit(nogil=True, error_model="numpy")
def _load_image(x, n, pad, width, image):
    """Image `n` of ``x (N, 1, H, W)`` into the flat zero-padded `image` (borders stay zero)."""
    for y in range(x.shape[2]):
        start = (y + pad) * width + pad
        image[start:start + x.shape[3]] = x[n, 0, y]


@njit(nogil=True, error_model="numpy", fastmath=_SUMS)
def _conv1_plane(image, width, W, f, bias, plane):
    """``plane[p] = bias + sum_ij W[f, 0, i, j] * image[p + i * width + j]``: one pass over the
    plane per filter row for the book's 5- and 3-wide filters (fewer loads and stores of the
    plane: measured 1.8 against 3.1 ms for SimpleConvNet's batch), four taps a pass otherwise."""
    filter_h, filter_w, size = W.shape[2], W.shape[3], plane.shape[0]
    for p in range(size):
        plane[p] = bias
    for i in range(filter_h):
        at = i * width
        if filter_w == 5:
            s0, s1, s2, s3, s4 = (image[at:at + size], image[at + 1:at + 1 + size], image[at + 2:at + 2 + size],
                                  image[at + 3:at + 3 + size], image[at + 4:at + 4 + size])
            w0, w1, w2, w3, w4 = W[f, 0, i, 0], W[f, 0, i, 1], W[f, 0, i, 2], W[f, 0, i, 3], W[f, 0, i, 4]
            for p in range(size):
                plane[p] += w0 * s0[p] + w1 * s1[p] + w2 * s2[p] + w3 * s3[p] + w4 * s4[p]
            continue
        if filter_w == 3:
            s0, s1, s2 = image[at:at + size], image[at + 1:at + 1 + size], image[at + 2:at + 2 + size]
            w0, w1, w2 = W[f, 0, i, 0], W[f, 0, i, 1], W[f, 0, i, 2]
            for p in range(size):
                plane[p] += w0 * s0[p] + w1 * s1[p] + w2 * s2[p]
            continue
        j = 0
        while j + 4 <= filter_w:
            at = i * width + j
            s0, s1, s2, s3 = (image[at:at + size], image[at + 1:at + 1 + size], image[at + 2:at + 2 + size],
                              image[at + 3:at + 3 + size])
            w0, w1, w2, w3 = W[f, 0, i, j], W[f, 0, i, j + 1], W[f, 0, i, j + 2], W[f, 0, i, j + 3]
            for p in range(size):
                plane[p] += w0 * s0[p] + w1 * s1[p] + w2 * s2[p] + w3 * s3[p]
            j += 4
        while j < filter_w:
            at = i * width + j
            s0, w0 = image[at:at + size], W[f, 0, i, j]
            for p in range(size):
                plane[p] += w0 * s0[p]
            j += 1


@njit(nogil=True, error_model="numpy", fastmath=_SUMS)
def _conv1_plane_pair(image, width, W, f, b, plane, plane2):
    """`_conv1_plane` for filters `f` and ``f + 1`` at once, each slice of the image read once
    for both (5- and 3-wide filters: 0.56 against 0.92 ms for SimpleConvNet's 50 images x 30
    filters; three filters at once measured 0.63); other widths one filter at a time."""
    filter_h, filter_w, size = W.shape[2], W.shape[3], plane.shape[0]
    if filter_w != 5 and filter_w != 3:
        _conv1_plane(image, width, W, f, b[f], plane)
        _conv1_plane(image, width, W, f + 1, b[f + 1], plane2)
        return
    for p in range(size):
        plane[p] = b[f]
        plane2[p] = b[f + 1]
    for i in range(filter_h):
        at = i * width
        if filter_w == 5:
            s0, s1, s2, s3, s4 = (image[at:at + size], image[at + 1:at + 1 + size], image[at + 2:at + 2 + size],
                                  image[at + 3:at + 3 + size], image[at + 4:at + 4 + size])
            w0, w1, w2, w3, w4 = W[f, 0, i, 0], W[f, 0, i, 1], W[f, 0, i, 2], W[f, 0, i, 3], W[f, 0, i, 4]
            u0, u1, u2, u3, u4 = (W[f + 1, 0, i, 0], W[f + 1, 0, i, 1], W[f + 1, 0, i, 2], W[f + 1, 0, i, 3],
                                  W[f + 1, 0, i, 4])
            for p in range(size):
                v0, v1, v2, v3, v4 = s0[p], s1[p], s2[p], s3[p], s4[p]
                plane[p] += w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4
                plane2[p] += u0 * v0 + u1 * v1 + u2 * v2 + u3 * v3 + u4 * v4
        else:
            s0, s1, s2 = image[at:at + size], image[at + 1:at + 1 + size], image[at + 2:at + 2 + size]
            w0, w1, w2 = W[f, 0, i, 0], W[f, 0, i, 1], W[f, 0, i, 2]
            u0, u1, u2 = W[f + 1, 0, i, 0], W[f + 1, 0, i, 1], W[f + 1, 0, i, 2]
            for p in range(size):
                v0, v1, v2 = s0[p], s1[p], s2[p]
                plane[p] += w0 * v0 + w1 * v1 + w2 * v2
                plane2[p] += u0 * v0 + u1 * v1 + u2 * v2


@njit(nogil=True, error_model="numpy", fastmath=_SUMS)
def _conv1_planes(image, width, W, f, b, planes):
    """Filter `f`'s plane into ``planes[0]`` and, where there is one, filter ``f + 1``'s into
    ``planes[1]`` (`_conv1_plane_pair`); returns how many were made."""
    if f + 1 < W.shape[0]:
        _conv1_plane_pair(image, width, W, f, b, planes[0], planes[1])
        return 2
    _conv1_plane(image, width, W, f, b[f], planes[0])
    return 1


@njit(nogil=True, error_model="numpy", fastmath=_SUMS)
def _dots_with_five(g, h, s0, s1, s2, s3, s4):
    """The dot products of `g` and of `h` with each of five equal-length slices ``s0..s4``
    (a 5-wide filter row's taps, for two filters' gradients) in one pass:
    ``(g.s0, ..., g.s4), (h.s0, ..., h.s4)``."""
    zero = g.dtype.type(0)
    t0 = t1 = t2 = t3 = t4 = u0 = u1 = u2 = u3 = u4 = zero
    for p in range(g.shape[0]):
        gp, hp = g[p], h[p]
        v0, v1, v2, v3, v4 = s0[p], s1[p], s2[p], s3[p], s4[p]
        t0 += gp * v0
        t1 += gp * v1
        t2 += gp * v2
        t3 += gp * v3
        t4 += gp * v4
        u0 += hp * v0
        u1 += hp * v1
        u2 += hp * v2
        u3 += hp * v3
        u4 += hp * v4
    return (t0, t1, t2, t3, t4), (u0, u1, u2, u3, u4)


@njit(nogil=True, error_model="numpy")
def _add_to_filter_row(dW, f, i, sums):
    """Row `i` of filter `f` plus the tap sums: ``dW[f, 0, i, :] += sums``."""
    for j in range(len(sums)):
        dW[f, 0, i, j] += sums[j]


@njit(nogil=True, error_model="numpy", fastmath=_SUMS)
def _conv1_plane_backward(image, width, W, f, grad, dW, dimage):
    """The gradient `grad` of filter `f`'s plane: ``dW[f, 0, i, j] += sum_p grad[p] * image[p + i *
    width + j]`` (a filter row of 5 or 3 taps in one pass over `grad`), and, when `dimage` is not
    empty, ``dimage[p + i * width + j] += W[f, 0, i, j] * grad[p]``."""
    filter_h, filter_w, size = W.shape[2], W.shape[3], grad.shape[0]
    zero = dW.dtype.type(0)
    for i in range(filter_h):
        at = i * width
        if filter_w == 5:
            s0, s1, s2, s3, s4 = (image[at:at + size], image[at + 1:at + 1 + size], image[at + 2:at + 2 + size],
                                  image[at + 3:at + 3 + size], image[at + 4:at + 4 + size])
            t0 = t1 = t2 = t3 = t4 = zero
            for p in range(size):
                g = grad[p]
                t0 += g * s0[p]
                t1 += g * s1[p]
                t2 += g * s2[p]
                t3 += g * s3[p]
                t4 += g * s4[p]
            dW[f, 0, i, 0] += t0
            dW[f, 0, i, 1] += t1
            dW[f, 0, i, 2] += t2
            dW[f, 0, i, 3] += t3
            dW[f, 0, i, 4] += t4
        elif filter_w == 3:
            s0, s1, s2 = image[at:at + size], image[at + 1:at + 1 + size], image[at + 2:at + 2 + size]
            t0 = t1 = t2 = zero
            for p in range(size):
                g = grad[p]
                t0 += g * s0[p]
                t1 += g * s1[p]
                t2 += g * s2[p]
            dW[f, 0, i, 0] += t0
            dW[f, 0, i, 1] += t1
            dW[f, 0, i, 2] += t2
        else:
            for j in range(filter_w):
                source = image[at + j:at + j + size]
                total = zero
                for p in range(size):
                    total += grad[p] * source[p]
                dW[f, 0, i, j] += total
        if dimage.shape[0] > 0:
            for j in range(filter_w):
                target, weight = dimage[at + j:at + j + size], W[f, 0, i, j]
                for p in range(size):
                    target[p] += weight * grad[p]


@njit(nogil=True, error_model="numpy", fastmath=_SUMS)
def _conv1_plane_backward_pair(image, width, W, f, grad, grad2, dW, dimage):
    """`_conv1_plane_backward` for filters `f` and ``f + 1`` (gradient planes `grad`, `grad2`),
    each slice of the image read once for both filters' dW (5- and 3-wide filters)."""
    filter_h, filter_w, size = W.shape[2], W.shape[3], grad.shape[0]
    if filter_w != 5 and filter_w != 3:
        _conv1_plane_backward(image, width, W, f, grad, dW, dimage)
        _conv1_plane_backward(image, width, W, f + 1, grad2, dW, dimage)
        return
    zero = dW.dtype.type(0)
    for i in range(filter_h):
        at = i * width
        if filter_w == 5:
            first, second = _dots_with_five(grad, grad2, image[at:at + size], image[at + 1:at + 1 + size],
                                            image[at + 2:at + 2 + size], image[at + 3:at + 3 + size],
                                            image[at + 4:at + 4 + size])
            _add_to_filter_row(dW, f, i, first)
            _add_to_filter_row(dW, f + 1, i, second)
        else:
            s0, s1, s2 = image[at:at + size], image[at + 1:at + 1 + size], image[at + 2:at + 2 + size]
            t0 = t1 = t2 = u0 = u1 = u2 = zero
            for p in range(size):
                g, h = grad[p], grad2[p]
                v0, v1, v2 = s0[p], s1[p], s2[p]
                t0 += g * v0
                t1 += g * v1
                t2 += g * v2
                u0 += h * v0
                u1 += h * v1
                u2 += h * v2
            _add_to_filter_row(dW, f, i, (t0, t1, t2))
            _add_to_filter_row(dW, f + 1, i, (u0, u1, u2))
        if dimage.shape[0] > 0:
            for j in range(filter_w):
                target, weight, weight2 = dimage[at + j:at + j + size], W[f, 0, i, j], W[f + 1, 0, i, j]
                for p in range(size):
                    target[p] += weight * grad[p] + weight2 * grad2[p]


# dW of a one-channel convolution followed by 2 x 2 pooling, without a gradient plane: the
# gradient reaches only each window's maximum, at offset (r, c) of its window (``arg`` is
# 2r + c). Make, once per image, the shifted planes ``shifted[u, v, ph, pw] = image[2 ph + u,
# 2 pw + v]`` (u < filter_h + 1, v < filter_w + 1). Tap (i, j) of window (ph, pw) whose maximum
# is at (r, c) reads image[2 ph + r + i, 2 pw + c + j] = shifted[r + i, c + j, ph, pw], so
#     dW[f, 0, i, j] = sum over the windows p of  dout[f, p] * shifted[r_p + i, c_p + j, p]
# : each window's value picked from one of four contiguous planes by its offset (a select, not
# a branch), dot products over the pooled plane, the shifted planes shared by every filter.
# (The gradient split into four offset planes, each dotted with its shifted planes, took 0.80
# against 0.56 ms for SimpleConvNet's 50 images on one core: three quarters of its products
# were with zeros.) Nothing is scattered into a full-size gradient plane (loops over 12
# windows a row, too short to vectorise). A NaN or infinity in the image reaches dW only
# through the values the windows' maxima read; the reference's dense product also multiplies
# the other offsets' zeros by it (NaN, where this gives a number).

@njit(nogil=True, error_model="numpy")
def _load_shifted(x, n, pad, shifted):
    """``shifted[u, v, ph, pw]`` = image `n` of `x`, zero-padded by `pad`, at (2 ph + u - pad,
    2 pw + v - pad) (zero outside the image)."""
    height, width = x.shape[2], x.shape[3]
    for u in range(shifted.shape[0]):
        for v in range(shifted.shape[1]):
            for ph in range(shifted.shape[2]):
                y = 2 * ph + u - pad
                row = shifted[u, v, ph]
                if y < 0 or y >= height:
                    row[:] = 0
                    continue
                source = x[n, 0, y]
                for pw in range(shifted.shape[3]):
                    column = 2 * pw + v - pad
                    row[pw] = source[column] if 0 <= column < width else 0


@njit(nogil=True, error_model="numpy", fastmath=_SUMS)
def _passed_sum(dout, arg):
    """The sum of the pooled gradient `dout` (a flat plane) where the ReLU passed it
    (``arg >= 0``): the plane's part of db."""
    zero = dout.dtype.type(0)
    total = zero
    for p in range(dout.shape[0]):
        total += dout[p] if arg[p] >= 0 else zero
    return total


@njit(nogil=True, error_model="numpy")
def _pick(k, top_left, top_right, bottom_left, bottom_right):
    """The value at window offset `k` (2r + c) of the four; a stopped window's (-1) is never
    used (its gradient is zero)."""
    left, right = (bottom_left, bottom_right) if k >= 2 else (top_left, top_right)
    return right if k & 1 else left


@njit(nogil=True, error_model="numpy", fastmath=_SUMS)
def _picked_row_dots(dout_f, arg_f, dout_g, arg_g, top, bottom):
    """Filter row i of two filters' dW, 5-wide filters, in one pass over the windows: tap j's
    sum of the gradient times the value its window's offset picks of ``top[j]``, ``top[j + 1]``,
    ``bottom[j]``, ``bottom[j + 1]`` (``top, bottom = shifted[i], shifted[i + 1]``, flat), for
    filter f (`dout_f`, `arg_f`) and filter g; returns ``(t0..t4), (u0..u4)``."""
    zero = dout_f.dtype.type(0)
    t0 = t1 = t2 = t3 = t4 = u0 = u1 = u2 = u3 = u4 = zero
    a0, a1, a2, a3, a4, a5 = top[0], top[1], top[2], top[3], top[4], top[5]
    b0, b1, b2, b3, b4, b5 = bottom[0], bottom[1], bottom[2], bottom[3], bottom[4], bottom[5]
    for p in range(dout_f.shape[0]):
        kf, kg = arg_f[p], arg_g[p]
        gf = dout_f[p] if kf >= 0 else zero
        gg = dout_g[p] if kg >= 0 else zero
        v0, v1, v2, v3, v4, v5 = a0[p], a1[p], a2[p], a3[p], a4[p], a5[p]
        w0, w1, w2, w3, w4, w5 = b0[p], b1[p], b2[p], b3[p], b4[p], b5[p]
        c0, c1, c2, c3, c4, c5 = (w0, w1, w2, w3, w4, w5) if kf >= 2 else (v0, v1, v2, v3, v4, v5)
        right = (kf & 1) == 1
        t0 += gf * (c1 if right else c0)
        t1 += gf * (c2 if right else c1)
        t2 += gf * (c3 if right else c2)
        t3 += gf * (c4 if right else c3)
        t4 += gf * (c5 if right else c4)
        c0, c1, c2, c3, c4, c5 = (w0, w1, w2, w3, w4, w5) if kg >= 2 else (v0, v1, v2, v3, v4, v5)
        right = (kg & 1) == 1
        u0 += gg * (c1 if right else c0)
        u1 += gg * (c2 if right else c1)
        u2 += gg * (c3 if right else c2)
        u3 += gg * (c4 if right else c3)
        u4 += gg * (c5 if right else c4)
    return (t0, t1, t2, t3, t4), (u0, u1, u2, u3, u4)


@njit(nogil=True, error_model="numpy", fastmath=_SUMS)
def _picked_dW_pair(shifted, dout_f, arg_f, dout_g, arg_g, W, f, g, dW):
    """dW of filters `f` and `g` of any width from their pooled gradients and offsets (flat
    planes), a tap at a time, summed into `dW`; `g` may be `f` (a last, single filter:
    written once)."""
    filter_h, filter_w, size = W.shape[2], W.shape[3], dout_f.shape[0]
    zero = dW.dtype.type(0)
    for i in range(filter_h):
        top, bottom = shifted[i], shifted[i + 1]
        for j in range(filter_w):
            top_left, top_right, bottom_left, bottom_right = top[j], top[j + 1], bottom[j], bottom[j + 1]
            t = u = zero
            for p in range(size):
                kf, kg = arg_f[p], arg_g[p]
                t += (dout_f[p] if kf >= 0 else zero) * _pick(kf, top_left[p], top_right[p], bottom_left[p],
                                                              bottom_right[p])
                u += (dout_g[p] if kg >= 0 else zero) * _pick(kg, top_left[p], top_right[p], bottom_left[p],
                                                              bottom_right[p])
            dW[f, 0, i, j] += t
            if g != f:
                dW[g, 0, i, j] += u


@kernel(nogil=True, error_model="numpy", fastmath=_SUMS)
def _conv1_pool2_dW(x, W, dout, arg, pad, start, end, dW, db):
    """Images ``start..end-1`` of a one-channel convolution with 2 x 2 pooling: dW and db
    summed (into `dW`, `db`) from the windows' maxima and the shifted planes (see above), two
    filters at a time; no input gradient."""
    pooled_h, pooled_w = dout.shape[2], dout.shape[3]
    filters, size = W.shape[0], pooled_h * pooled_w
    shifted = np.empty((W.shape[2] + 1, W.shape[3] + 1, pooled_h, pooled_w), dtype=x.dtype)
    flat_shifted = shifted.reshape(W.shape[2] + 1, W.shape[3] + 1, size)
    for n in range(start, end):
        _load_shifted(x, n, pad, shifted)
        for f in range(0, filters, 2):
            g = min(f + 1, filters - 1)
            dout_f, arg_f = dout[n, f].reshape(-1), arg[n, f].reshape(-1)
            dout_g, arg_g = dout[n, g].reshape(-1), arg[n, g].reshape(-1)
            db[f] += _passed_sum(dout_f, arg_f)
            if g != f:
                db[g] += _passed_sum(dout_g, arg_g)
            if W.shape[3] != 5:
                _picked_dW_pair(flat_shifted, dout_f, arg_f, dout_g, arg_g, W, f, g, dW)
                continue
            for i in range(W.shape[2]):     # the book's 5 x 5: a filter row's five taps in one pass
                first, second = _picked_row_dots(dout_f, arg_f, dout_g, arg_g, flat_shifted[i], flat_shifted[i + 1])
                _add_to_filter_row(dW, f, i, first)
                if g != f:
                    _add_to_filter_row(dW, g, i, second)


# The forward of a one-channel convolution with 2 x 2 pooling, on the same shifted planes: the
# output at offset (r, c) of every window, ``conv[2 ph + r, 2 pw + c]``, is the pooled-size
# plane ``b + sum_ij W[f, 0, i, j] * shifted[r + i, c + j]`` (offset k = 2r + c). Four such
# planes a filter, each a few long multiply-adds over contiguous planes; the pooling is then
# the maximum of the four, elementwise and flat over the pooled plane, which vectorises (a
# pooled row of SimpleConvNet's is 12 windows, too few for a loop over rows). No full-size
# plane, and no columns computed past the output's width.

@njit(nogil=True, error_model="numpy", fastmath=_SUMS)
def _offset_planes(shifted, W, f, g, b, planes, planes2):
    """``planes[k]`` (k = 2r + c): filter `f`'s output at offset (r, c) of every 2 x 2 window;
    ``planes2[k]`` filter `g`'s (`g` may be `f`, for a last, single filter). 5-wide filters:
    a filter row's two column offsets in one pass over its six shifted planes (SimpleConvNet's
    50 images x 30 filters, one core: 0.69 against 1.16 ms for full planes pooled afterwards)."""
    filter_h, filter_w, size = W.shape[2], W.shape[3], planes.shape[1]
    for k in range(4):
        plane, plane2 = planes[k], planes2[k]
        for p in range(size):
            plane[p] = b[f]
            plane2[p] = b[g]
    for r in range(2):
        for i in range(filter_h):
            row = shifted[r + i]
            if filter_w == 5:
                left, right, left2, right2 = planes[2 * r], planes[2 * r + 1], planes2[2 * r], planes2[2 * r + 1]
                s0, s1, s2, s3, s4, s5 = row[0], row[1], row[2], row[3], row[4], row[5]
                w0, w1, w2, w3, w4 = W[f, 0, i, 0], W[f, 0, i, 1], W[f, 0, i, 2], W[f, 0, i, 3], W[f, 0, i, 4]
                u0, u1, u2, u3, u4 = W[g, 0, i, 0], W[g, 0, i, 1], W[g, 0, i, 2], W[g, 0, i, 3], W[g, 0, i, 4]
                for p in range(size):
                    v0, v1, v2, v3, v4, v5 = s0[p], s1[p], s2[p], s3[p], s4[p], s5[p]
                    left[p] += w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4
                    right[p] += w0 * v1 + w1 * v2 + w2 * v3 + w3 * v4 + w4 * v5
                    left2[p] += u0 * v0 + u1 * v1 + u2 * v2 + u3 * v3 + u4 * v4
                    right2[p] += u0 * v1 + u1 * v2 + u2 * v3 + u3 * v4 + u4 * v5
                continue
            for c in range(2):
                plane, plane2 = planes[2 * r + c], planes2[2 * r + c]
                for j in range(filter_w):
                    source, w, u = row[c + j], W[f, 0, i, j], W[g, 0, i, j]
                    for p in range(size):
                        plane[p] += w * source[p]
                        plane2[p] += u * source[p]


@njit(nogil=True, error_model="numpy")
def _pool_offset_planes(planes, out, arg):
    """``out = relu(max_k planes[k])`` elementwise (flat pooled planes), ``arg`` the offset k of
    the first maximum in the window's order (top left, top right, bottom left, bottom right),
    or -1 where the ReLU passed nothing back (maximum <= 0, or NaN); a NaN wins and stays NaN."""
    first, second, third, fourth = planes[0], planes[1], planes[2], planes[3]
    for p in range(out.shape[0]):
        best, k = first[p], 0
        # Each next offset takes over if larger, or a NaN over a number (`not <=`), never on a tie.
        value = second[p]
        take = not (value <= best) and best == best
        best, k = (value, 1) if take else (best, k)
        value = third[p]
        take = not (value <= best) and best == best
        best, k = (value, 2) if take else (best, k)
        value = fourth[p]
        take = not (value <= best) and best == best
        best, k = (value, 3) if take else (best, k)
        out[p] = best if not (best <= 0) else 0                  # a NaN stays NaN
        arg[p] = k if best > 0 else -1


@kernel(nogil=True, error_model="numpy", fastmath=_SUMS)
def _conv1_relu_pool2_forward(x, W, b, pad, start, end, out, arg):
    """Images ``start..end-1``: ``out[n, f] = maxpool2x2(relu(conv(x[n], W[f]) + b[f]))`` and
    the offsets of the maxima (`arg`), from each image's shifted planes, two filters a pass."""
    filters, size = W.shape[0], out.shape[2] * out.shape[3]
    shifted = np.empty((W.shape[2] + 1, W.shape[3] + 1, out.shape[2], out.shape[3]), dtype=x.dtype)
    flat_shifted = shifted.reshape(W.shape[2] + 1, W.shape[3] + 1, size)
    planes = np.empty((2, 4, size), dtype=x.dtype)
    for n in range(start, end):
        _load_shifted(x, n, pad, shifted)
        for f in range(0, filters, 2):
            g = min(f + 1, filters - 1)
            _offset_planes(flat_shifted, W, f, g, b, planes[0], planes[1])
            for k in range(g - f + 1):
                _pool_offset_planes(planes[k], out[n, f + k].reshape(-1), arg[n, f + k].reshape(-1))


@njit(nogil=True, error_model="numpy")
def _gradient_buffers(x, W, pad, out_h, want_dx, planes):
    """``(width, image, grads, dimage)`` for a backward kernel: the padded width, a flat padded
    image (`_load_image`), `planes` gradient planes of zeros (the columns past the output's
    width stay zero), and the input gradient's plane (empty unless `want_dx`)."""
    width = x.shape[3] + 2 * pad
    image = np.zeros((x.shape[2] + 2 * pad) * width + W.shape[3], dtype=x.dtype)
    dimage = np.zeros(image.shape[0] if want_dx else 0, dtype=x.dtype)
    return width, image, np.zeros((planes, out_h * width), dtype=x.dtype), dimage


@njit(nogil=True, error_model="numpy")
def _store_input_gradient(dimage, n, pad, width, dx):
    """The middle of the flat padded `dimage` into ``dx[n, 0]``."""
    for y in range(dx.shape[2]):
        start = (y + pad) * width + pad
        dx[n, 0, y] = dimage[start:start + dx.shape[3]]


@njit(nogil=True, error_model="numpy")
def _pool_plane(plane, width, pool, out, arg, best, offset):
    """``out = relu(maxpool(plane))`` for tiling ``pool x pool`` windows of a plane `width`
    values wide, ``out``/``arg (PH, PW)``: a pooled row at a time, each window offset a strided
    slice across the row's windows. ``arg`` is the offset ``r * pool + c`` of the window's
    first maximum, or -1 where the ReLU passed nothing back (maximum <= 0, or NaN); a NaN wins
    its window and stays NaN."""
    pooled_w = out.shape[1]
    for ph in range(out.shape[0]):
        corner = ph * pool * width
        first = plane[corner:corner + pooled_w * pool:pool]
        for pw in range(pooled_w):
            best[pw] = first[pw]
            offset[pw] = 0
        for k in range(1, pool * pool):
            at = corner + (k // pool) * width + k % pool
            candidate = plane[at:at + pooled_w * pool:pool]
            for pw in range(pooled_w):
                # Larger, or a NaN: a NaN wins and stays (`not <=` is true for a NaN).
                if not (candidate[pw] <= best[pw]) and best[pw] == best[pw]:
                    best[pw] = candidate[pw]
                    offset[pw] = k
        target, where = out[ph], arg[ph]
        for pw in range(pooled_w):
            value = best[pw]
            target[pw] = value if not (value <= 0) else 0        # a NaN stays NaN
            where[pw] = offset[pw] if value > 0 else -1


@kernel(nogil=True, error_model="numpy", fastmath=_SUMS)
def _conv1_relu_pool_forward(x, W, b, pad, pool, start, end, out, arg):
    """Images ``start..end-1``: ``out[n, f] = maxpool(relu(conv(x[n], W[f]) + b[f]))`` for a
    tiling ``pool x pool`` window (`_pool_plane`), the plane still in cache (2 x 2 windows:
    `_conv1_relu_pool2_forward`)."""
    width = x.shape[3] + 2 * pad
    out_h = x.shape[2] + 2 * pad - W.shape[2] + 1
    image = np.zeros((x.shape[2] + 2 * pad) * width + W.shape[3], dtype=x.dtype)
    planes = np.empty((2, out_h * width), dtype=x.dtype)
    best, offset = np.empty(out.shape[3], dtype=x.dtype), np.empty(out.shape[3], dtype=np.int32)
    for n in range(start, end):
        _load_image(x, n, pad, width, image)
        for f in range(0, W.shape[0], 2):
            for k in range(_conv1_planes(image, width, W, f, b, planes)):
                _pool_plane(planes[k], width, pool, out[n, f + k], arg[n, f + k], best, offset)


@kernel(nogil=True, error_model="numpy", fastmath=_SUMS)
def _conv1_relu_pool_backward(x, W, dout, arg, pad, pool, start, end, dW, db, dx):
    """Images ``start..end-1``: dW and db summed (into `dW`, `db`) over the pooled maxima that
    passed the ReLU; `dx` (or an empty array when not wanted) gets the input gradient. Filters
    two at a time (`_conv1_plane_backward_pair`)."""
    width, image, grads, dimage = _gradient_buffers(x, W, pad, x.shape[2] + 2 * pad - W.shape[2] + 1,
                                                    dx.shape[0] > 0, 2)     # a pair of filters
    zero = dout.dtype.type(0)       # (outside the windows, a 2 x 2 pooling's planes are never written: zero)
    for n in range(start, end):
        _load_image(x, n, pad, width, image)
        dimage[:] = 0
        for f in range(0, W.shape[0], 2):
            count = min(2, W.shape[0] - f)
            for k in range(count):
                grad = grads[k]
                if pool == 2:
                    # Every value of the 2 x 2 windows written, selects not branches; db as a
                    # second, vectorised pass.
                    for ph in range(dout.shape[2]):
                        top = grad[2 * ph * width:2 * ph * width + 2 * dout.shape[3]]
                        bottom = grad[(2 * ph + 1) * width:(2 * ph + 1) * width + 2 * dout.shape[3]]
                        source, where = dout[n, f + k, ph], arg[n, f + k, ph]
                        for pw in range(dout.shape[3]):
                            o, g = where[pw], source[pw]
                            top[2 * pw] = g if o == 0 else zero
                            top[2 * pw + 1] = g if o == 1 else zero
                            bottom[2 * pw] = g if o == 2 else zero
                            bottom[2 * pw + 1] = g if o == 3 else zero
                    total = _passed_sum(dout[n, f + k].reshape(-1), arg[n, f + k].reshape(-1))
                else:
                    grad[:] = 0
                    total = zero
                    for ph in range(dout.shape[2]):
                        for pw in range(dout.shape[3]):
                            offset = arg[n, f + k, ph, pw]
                            if offset >= 0:
                                g = dout[n, f + k, ph, pw]
                                grad[(ph * pool + offset // pool) * width + pw * pool + offset % pool] = g
                                total += g
                db[f + k] += total
            if count == 2:
                _conv1_plane_backward_pair(image, width, W, f, grads[0], grads[1], dW, dimage)
            else:
                _conv1_plane_backward(image, width, W, f, grads[0], dW, dimage)
        if dx.shape[0] > 0:
            _store_input_gradient(dimage, n, pad, width, dx)


@kernel(nogil=True, error_model="numpy", fastmath=_SUMS)
def _conv1_relu_forward(x, W, b, pad, start, end, out):
    """Images ``start..end-1``: ``out[n, :, :, f] = relu(conv(x[n], W[f]) + b[f])`` (NaN
    stays NaN), `out` channels-last ``(N, OH, OW, F)``: each plane stored across the filters,
    while in cache, as the next layer's Winograd or chunked path reads it."""
    width, filters = x.shape[3] + 2 * pad, W.shape[0]
    out_h, out_w = out.shape[1], out.shape[2]
    image = np.zeros((x.shape[2] + 2 * pad) * width + W.shape[3], dtype=x.dtype)
    planes = np.empty((filters, out_h * width), dtype=x.dtype)
    for n in range(start, end):
        _load_image(x, n, pad, width, image)
        for f in range(0, filters, 2):
            _conv1_planes(image, width, W, f, b, planes[f:f + 2])
        for oh in range(out_h):
            target = out[n, oh]
            for ow in range(out_w):
                pixel, at = target[ow], oh * width + ow
                for f in range(filters):
                    value = planes[f, at]
                    pixel[f] = value if not (value <= 0) else 0      # a NaN stays NaN


@kernel(nogil=True, error_model="numpy", fastmath=_SUMS)
def _conv1_relu_backward(x, W, dout, out, pad, start, end, dW, db, dx):
    """Images ``start..end-1``: dW and db summed where the output passed the ReLU; `dx` as in
    `_conv1_relu_pool_backward`. `dout` and `out` channels-last ``(N, OH, OW, F)``."""
    out_h, out_w, filters = dout.shape[1], dout.shape[2], W.shape[0]
    width, image, grads, dimage = _gradient_buffers(x, W, pad, out_h, dx.shape[0] > 0, filters)
    zero = dout.dtype.type(0)
    for n in range(start, end):
        _load_image(x, n, pad, width, image)
        dimage[:] = 0
        for oh in range(out_h):                  # every filter's gradient plane, pixel by pixel
            rows, passed = dout[n, oh], out[n, oh]
            for ow in range(out_w):
                pixel, kept, at = rows[ow], passed[ow], oh * width + ow
                for f in range(filters):
                    value = pixel[f] if kept[f] > 0 else zero
                    grads[f, at] = value
                    db[f] += value
        for f in range(0, filters, 2):
            if f + 1 < filters:
                _conv1_plane_backward_pair(image, width, W, f, grads[f], grads[f + 1], dW, dimage)
            else:
                _conv1_plane_backward(image, width, W, f, grads[f], dW, dimage)
        if dx.shape[0] > 0:
            _store_input_gradient(dimage, n, pad, width, dx)


# ------------------------------------------------------------------ softmax with cross-entropy

@kernel(nogil=True, error_model="numpy")
def _softmax_cross_entropy(scores, labels, scale, probs, grad):
    """Row by row: the softmax into `probs`, ``(probs - onehot) * scale`` into `grad`; returns
    the sum of the rows' losses ``-log softmax[label]`` (NaN rows stay NaN)."""
    total_loss = scores.dtype.type(0)
    for r in range(scores.shape[0]):
        row = scores[r]
        top = row[0]
        for j in range(1, row.shape[0]):
            if row[j] > top or np.isnan(row[j]):
                top = row[j]
                if np.isnan(top):
                    break
        total = row.dtype.type(0)
        for j in range(row.shape[0]):
            total += np.exp(row[j] - top)
        log_total = np.log(total)
        for j in range(row.shape[0]):
            probs[r, j] = np.exp(row[j] - top - log_total)
            grad[r, j] = (probs[r, j] - (1 if j == labels[r] else 0)) * scale
        total_loss -= row[labels[r]] - top - log_total
    return total_loss


@kernel(nogil=True, error_model="numpy")
def _count_correct(scores, labels):
    """Rows whose first maximum (or first NaN) is at their label."""
    hits = 0
    for r in range(scores.shape[0]):
        row = scores[r]
        best = 0
        for j in range(1, row.shape[0]):
            if np.isnan(row[best]):
                break
            if row[j] > row[best] or np.isnan(row[j]):
                best = j
        hits += best == labels[r]
    return hits


# ------------------------------------------------------------------------------ optimizers
# The reference's formulas in its order of operations, with the hyper-parameters in the
# buffer's dtype (as NumPy computes them): elementwise, so any slicing gives the same bits.

@kernel(nogil=True, error_model="numpy")
def _sgd(param, grad, lr, start, end):
    param, grad = param[start:end], grad[start:end]      # slices: the loops below vectorise
    for i in range(param.shape[0]):
        param[i] -= lr * grad[i]


@kernel(nogil=True, error_model="numpy")
def _momentum(param, grad, v, lr, momentum, start, end):
    param, grad, v = param[start:end], grad[start:end], v[start:end]
    for i in range(param.shape[0]):
        v[i] = v[i] * momentum - lr * grad[i]
        param[i] += v[i]


@kernel(nogil=True, error_model="numpy")
def _adagrad(param, grad, h, lr, eps, start, end):
    param, grad, h = param[start:end], grad[start:end], h[start:end]
    for i in range(param.shape[0]):
        h[i] += grad[i] * grad[i]
        param[i] -= grad[i] / (np.sqrt(h[i]) + eps) * lr


@kernel(nogil=True, error_model="numpy")
def _adam(param, grad, m, v, lr_t, one_minus_beta1, one_minus_beta2, eps, start, end):
    param, grad, m, v = param[start:end], grad[start:end], m[start:end], v[start:end]
    for i in range(param.shape[0]):
        m[i] += one_minus_beta1 * (grad[i] - m[i])
        v[i] += one_minus_beta2 * (grad[i] * grad[i] - v[i])
        param[i] -= lr_t * m[i] / (np.sqrt(v[i]) + eps)


# --------------------------------------------------------------------------- the table's entries

def _tiling_pool(pool: tuple, out_h: int, out_w: int) -> int:
    """The window size of a pooling whose square windows tile the convolution's output (0 if not)."""
    pool_h, pool_w, pool_stride, pool_pad, _, _ = pool
    tiles = pool_h == pool_w == pool_stride and pool_pad == 0 and out_h % pool_h == 0 and out_w % pool_w == 0
    return pool_h if tiles and pool_h <= 11 else 0


def _one_channel_stride_1(W: Any, stride: int) -> bool:
    """Whether the one-channel kernels take this convolution (one input channel, stride 1)."""
    return W.shape[1] == 1 and stride == 1


def _sum_slices(sums: dict, slices: int) -> tuple:
    """The per-slice ``(dW, db)`` sums added in slice order."""
    dW, db = sums[0]
    for part in range(1, slices):
        dW += sums[part][0]
        db += sums[part][1]
    return dW, db


def _pool_2x2_floor(pool: tuple, out_h: int, out_w: int) -> bool:
    """Whether `pool` is 2 x 2 windows at stride 2 without padding over an `out_h` x `out_w`
    output: they tile it, or leave its last row (column) out where that is odd."""
    pool_h, pool_w, pool_stride, pool_pad, pooled_h, pooled_w = pool
    return (pool_h == pool_w == pool_stride == 2 and pool_pad == 0 and pooled_h == out_h // 2
            and pooled_w == out_w // 2)


def conv2d_relu_maxpool2d_forward(xp: ModuleType, x: Any, W: Any, b: Any, stride: int, pad: int, out_h: int,
                                  out_w: int, pool: tuple) -> Any:
    """Stride 1 and a tiling pooling: one channel, one kernel; several, the chunks' products
    with their bias, pooling and ReLU in one pass (see the module docstring). Winograd's path
    also takes 2 x 2 pooling of an odd output (7 x 7 to 3 x 3, say): its tiles are the windows,
    so the last row (column), which no window reads, is not computed."""
    if stride != 1:
        return NotImplemented
    if W.shape[1] > 1 and _pool_2x2_floor(pool, out_h, out_w) and _WinogradConvolution.takes(W, pad):
        return _WinogradConvolution(x, W, pad, out_h, out_w, pooled=True).forward_pooled(b)
    size = _tiling_pool(pool, out_h, out_w)
    if not size:
        return NotImplemented
    if W.shape[1] > 1:
        if not _ChunkedConvolution.takes(W, pad):
            return NotImplemented
        return _ChunkedConvolution(x, W, pad, out_h, out_w).forward_pooled(b, size)
    x = np.ascontiguousarray(x)
    n, filter_num = x.shape[0], W.shape[0]
    out = np.empty((n, filter_num, out_h // size, out_w // size), dtype=x.dtype)
    arg = np.empty(out.shape, dtype=np.int8)

    def one_slice(part: int, start: int, end: int) -> None:
        if size == 2:                                # the book's 2 x 2: offset planes
            _conv1_relu_pool2_forward(x, W, b, pad, start, end, out, arg)
        else:
            _conv1_relu_pool_forward(x, W, b, pad, size, start, end, out, arg)

    run_in_slices(n, one_slice, 8 * out.nbytes * size * size, uses_blas=False)
    return out, (_TAG, "one channel", x, arg, size)


def conv2d_relu_maxpool2d_backward(xp: ModuleType, dout: Any, cache: Any, W: Any, stride: int, pad: int,
                                   need_input_grad: bool, dW_out: Any = None, db_out: Any = None) -> Any:
    """dW and db from the pooled maxima that passed the ReLU; dx where asked for."""
    if cache[0] != _TAG:
        return NotImplemented
    if cache[1] in ("chunked", "winograd"):
        return cache[2].backward_pooled(dout, cache[3], cache[4], need_input_grad, dW_out, db_out)
    _, _, x, arg, size = cache
    dout = np.ascontiguousarray(dout)
    dx = np.zeros_like(x) if need_input_grad else np.empty((0,) + x.shape[1:], dtype=x.dtype)
    sums: dict[int, tuple] = {}

    def one_slice(part: int, start: int, end: int) -> None:
        sums[part] = (np.zeros(W.shape, dtype=dout.dtype), np.zeros(W.shape[0], dtype=dout.dtype))
        if size == 2 and not need_input_grad:        # a first layer's 2 x 2 pooling: offset planes
            _conv1_pool2_dW(x, W, dout, arg, pad, start, end, *sums[part])
        else:
            _conv1_relu_pool_backward(x, W, dout, arg, pad, size, start, end, *sums[part], dx)

    dW, db = _sum_slices(sums, run_in_slices(x.shape[0], one_slice, 8 * dout.nbytes * size * size,
                                             uses_blas=False))
    return (dx if need_input_grad else None), store_gradient(dW_out, dW), store_gradient(db_out, db)


def conv2d_relu_forward(xp: ModuleType, x: Any, W: Any, b: Any, stride: int, pad: int,
                        out_h: int, out_w: int) -> Any:
    """Stride 1: one channel, one kernel for the convolution, its bias and ReLU; several, the
    chunks' products with their bias and ReLU added in cache."""
    if stride != 1:
        return NotImplemented
    if W.shape[1] > 1:
        if _WinogradConvolution.takes(W, pad):
            return _WinogradConvolution(x, W, pad, out_h, out_w, pooled=False).forward_relu(b)
        if not _ChunkedConvolution.takes(W, pad):
            return NotImplemented
        return _ChunkedConvolution(x, W, pad, out_h, out_w).forward_relu(b)
    x = np.ascontiguousarray(x)
    out = np.empty((x.shape[0], out_h, out_w, W.shape[0]), dtype=x.dtype)      # channels-last
    run_in_slices(x.shape[0], lambda part, start, end: _conv1_relu_forward(x, W, b, pad, start, end, out),
                  8 * out.nbytes, uses_blas=False)
    return out.transpose(0, 3, 1, 2), (_TAG, "one channel", x, out)


def conv2d_relu_backward(xp: ModuleType, dout: Any, cache: Any, W: Any, stride: int, pad: int,
                         need_input_grad: bool, dW_out: Any = None, db_out: Any = None) -> Any:
    """dW and db where the output passed the ReLU; dx where asked for."""
    if cache[0] != _TAG:
        return NotImplemented
    if cache[1] in ("chunked", "winograd"):
        return cache[2].backward_relu(dout, cache[3], need_input_grad, dW_out, db_out)
    _, _, x, out = cache
    dx = np.zeros_like(x) if need_input_grad else np.empty((0,) + x.shape[1:], dtype=x.dtype)
    dout_last = dout.transpose(0, 2, 3, 1)          # channels-last, as `out`
    sums: dict[int, tuple] = {}

    def one_slice(part: int, start: int, end: int) -> None:
        sums[part] = (np.zeros(W.shape, dtype=dout.dtype), np.zeros(W.shape[0], dtype=dout.dtype))
        # The gradient usually arrives as an NCHW view of the next layer's channels-last
        # memory, and is then read as it is; otherwise the slice is made channels-last on its
        # own thread.
        part_dout = np.ascontiguousarray(dout_last[start:end])
        part_dx = dx[start:end] if need_input_grad else dx
        _conv1_relu_backward(x[start:end], W, part_dout, out[start:end], pad, 0, end - start, *sums[part], part_dx)

    dW, db = _sum_slices(sums, run_in_slices(x.shape[0], one_slice, 8 * dout.nbytes, uses_blas=False))
    return (dx if need_input_grad else None), store_gradient(dW_out, dW), store_gradient(db_out, db)


class _ChunkedConvolution:
    """A multi-channel, stride-1 convolution on channels-last memory, a few images (a chunk) at
    a time and each slice of the batch on its own thread (`cpu_threads.run_in_slices`, BLAS at
    one thread), as `fast_numpy`'s convolution (whose padding and window copies it uses: NumPy
    copies a strided window view faster than a compiled loop here), with the bias, ReLU (and
    pooling) applied by a compiled pass while the chunk's product is in cache; the pooled
    variant never writes the convolution's own output to memory. Backward does the same per
    chunk: the gradient through the ReLU (and pooling) is made for the chunk, dW takes its
    product with the chunk's windows, and dx (stride 1) is the convolution of that gradient
    with the flipped filters. Sums over the batch (dW, db) are kept per slice and added in
    slice order."""

    @staticmethod
    def takes(W: Any, pad: int) -> bool:
        """Whether its input gradient (the output's gradient convolved with the flipped
        filters, padded by ``filter - 1 - pad``) applies: pad smaller than the filter."""
        return pad < W.shape[2] and pad < W.shape[3]

    def __init__(self, x: Any, W: Any, pad: int, out_h: int, out_w: int):
        self.x = fast_numpy._padded(x.transpose(0, 2, 3, 1), pad, pad)     # (N, H + 2 pad, W + 2 pad, C)
        self.input_shape = (x.shape[0], x.shape[2], x.shape[3], x.shape[1])   # (N, H, W, C)
        self.W, self.pad, self.out_h, self.out_w = W, pad, out_h, out_w
        filter_num, channels, self.filter_h, self.filter_w = W.shape
        self.row_len = self.filter_h * self.filter_w * channels
        self.pixels = out_h * out_w
        self.chunk = max(1, CHUNK_BYTES // (self.pixels * self.row_len * x.itemsize))
        self.windows = fast_numpy._windows(self.x, self.filter_h, self.filter_w, 1, out_h, out_w)

    def _slices(self, work: Callable[[int, int, int], None], nbytes: int) -> int:
        return run_in_slices(self.x.shape[0], work, nbytes)

    def _columns(self, first: int, last: int) -> np.ndarray:
        """A slice's buffer for a chunk's windows, ``(images, OH, OW, FH, FW, C)``."""
        return np.empty((min(self.chunk, last - first),) + self.windows.shape[1:], dtype=self.x.dtype)

    def _gather(self, start: int, end: int, columns: np.ndarray) -> np.ndarray:
        """The chunk's im2col rows ``(images * OH * OW, FH * FW * C)``."""
        chunk = columns[:end - start]
        np.copyto(chunk, self.windows[start:end])
        return chunk.reshape(-1, self.row_len)

    def _w_cols(self) -> np.ndarray:
        """The filters as rows (i, j, c), one column per filter."""
        return np.ascontiguousarray(self.W.transpose(2, 3, 1, 0)).reshape(self.row_len, -1)

    def forward_relu(self, b: Any) -> tuple:
        n, filter_num = self.x.shape[0], self.W.shape[0]
        out = np.empty((n, self.out_h, self.out_w, filter_num), dtype=self.x.dtype)
        w_cols = self._w_cols()

        def one_slice(part: int, first: int, last: int) -> None:
            columns = self._columns(first, last)
            for start in range(first, last, self.chunk):
                end = min(start + self.chunk, last)
                rows = out[start:end].reshape(-1, filter_num)
                np.matmul(self._gather(start, end, columns), w_cols, out=rows)
                conv_kernels.bias_relu(rows, b)

        self._slices(one_slice, self.x.nbytes + out.nbytes)
        return out.transpose(0, 3, 1, 2), (_TAG, "chunked", self, out)

    def forward_pooled(self, b: Any, pool: int) -> tuple:
        n, filter_num = self.x.shape[0], self.W.shape[0]
        pooled = np.empty((n, self.out_h // pool, self.out_w // pool, filter_num), dtype=self.x.dtype)
        arg = np.empty(pooled.shape, dtype=np.int8)
        w_cols = self._w_cols()

        def one_slice(part: int, first: int, last: int) -> None:
            columns = self._columns(first, last)
            conv = np.empty((min(self.chunk, last - first), self.out_h, self.out_w, filter_num), dtype=self.x.dtype)
            for start in range(first, last, self.chunk):
                end = min(start + self.chunk, last)
                chunk = conv[:end - start]
                np.matmul(self._gather(start, end, columns), w_cols, out=chunk.reshape(-1, filter_num))
                conv_kernels.bias_relu_pool(chunk, b, pool, pooled[start:end], arg[start:end])

        self._slices(one_slice, self.x.nbytes + pooled.nbytes * pool * pool)
        return pooled.transpose(0, 3, 1, 2), (_TAG, "chunked", self, arg, pool)

    def backward_relu(self, dout: Any, out: np.ndarray, need_input_grad: bool, dW_out: Any, db_out: Any) -> tuple:
        dout_last = dout.transpose(0, 2, 3, 1)

        def gradient(start: int, end: int, grad: np.ndarray, db: np.ndarray) -> None:
            conv_kernels.relu_gradient(dout_last[start:end], out[start:end], grad, db)

        return self._backward(gradient, need_input_grad, dW_out, db_out, dout.nbytes)

    def backward_pooled(self, dout: Any, arg: np.ndarray, pool: int, need_input_grad: bool, dW_out: Any,
                        db_out: Any) -> tuple:
        dout_last = dout.transpose(0, 2, 3, 1)

        def gradient(start: int, end: int, grad: np.ndarray, db: np.ndarray) -> None:
            conv_kernels.unpool_gradient(dout_last[start:end], arg[start:end], pool, grad, db)

        return self._backward(gradient, need_input_grad, dW_out, db_out, dout.nbytes * pool * pool)

    def _backward(self, gradient: Callable, need_input_grad: bool, dW_out: Any, db_out: Any, nbytes: int) -> tuple:
        n, height, width, channels = self.input_shape
        filter_num, dtype, fh, fw = self.W.shape[0], self.x.dtype, self.filter_h, self.filter_w
        dx = np.empty((n, height, width, channels), dtype=dtype) if need_input_grad else None
        if need_input_grad:                  # stride 1: dx is the gradient convolved with the flipped filters
            flipped = np.ascontiguousarray(self.W[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)).reshape(-1, channels)
            pad_h, pad_w = fh - 1 - self.pad, fw - 1 - self.pad      # the gradient's padding on each axis
        sums: dict[int, tuple] = {}

        def one_slice(part: int, first: int, last: int) -> None:
            images = min(self.chunk, last - first)
            columns = self._columns(first, last)
            dW, dW_chunk, db = (np.zeros((self.row_len, filter_num), dtype=dtype),
                                np.empty((self.row_len, filter_num), dtype=dtype), np.zeros(filter_num, dtype=dtype))
            if need_input_grad:      # the chunk's gradient inside a zero border (the border is written once)
                padded = np.zeros((images, self.out_h + 2 * pad_h, self.out_w + 2 * pad_w, filter_num), dtype=dtype)
                grad = padded[:, pad_h:pad_h + self.out_h, pad_w:pad_w + self.out_w]
                grad_windows = fast_numpy._windows(padded, fh, fw, 1, height, width)
                grad_columns = np.empty((images,) + grad_windows.shape[1:], dtype=dtype)
            else:
                grad = np.empty((images, self.out_h, self.out_w, filter_num), dtype=dtype)
            grad_rows = np.empty((images * self.pixels, filter_num), dtype=dtype)
            for start in range(first, last, self.chunk):
                end = min(start + self.chunk, last)
                m = end - start
                gradient(start, end, grad[:m], db)
                rows = grad_rows[:m * self.pixels]
                np.copyto(rows.reshape(m, self.out_h, self.out_w, filter_num), grad[:m])
                np.matmul(self._gather(start, end, columns).T, rows, out=dW_chunk)
                dW += dW_chunk
                if need_input_grad:
                    np.copyto(grad_columns[:m], grad_windows[:m])
                    np.matmul(grad_columns[:m].reshape(m * height * width, -1), flipped,
                              out=dx[start:end].reshape(-1, channels))
            sums[part] = (dW, db)

        dW_cols, db = _sum_slices(sums, self._slices(one_slice, self.x.nbytes + nbytes))
        dW_view = dW_cols.reshape(fh, fw, channels, filter_num).transpose(3, 2, 0, 1)
        dW = np.ascontiguousarray(dW_view) if dW_out is None else store_gradient(dW_out, dW_view)
        return (None if dx is None else dx.transpose(0, 3, 1, 2)), dW, store_gradient(db_out, db)


class _WinogradScratch(NamedTuple):
    """One slice's scratch for `_WinogradConvolution`."""
    v: np.ndarray           #: flat, for a chunk's transformed input V (or its gradient dV)
    m: np.ndarray           #: flat, for a chunk's products M (or their gradient dM)
    padded: np.ndarray      #: one image with its border of zeros (the input transform and dx)
    patch: np.ndarray       #: one tile's 4 x 4 x C patch (dx only; empty otherwise)


class _WinogradConvolution:
    """A 3 x 3, stride-1 convolution of several channels by Winograd's F(2x2, 3x3)
    (`winograd`: the transforms compiled, the 16 products ``(tiles x C) @ (C x K)`` of each
    chunk in BLAS), on channels-last memory, a few images (a chunk) at a time and each slice of
    the batch on its own thread (BLAS at one thread), with the bias, ReLU (and the 2 x 2
    pooling) in the output transform. Backward: the gradient through the pooling (or ReLU) is
    transformed per tile (dM), then ``dU[p] += V[p]^T @ dM[p]`` (V made again from the input)
    and ``dV[p] = dM[p] @ U[p]^T``, scattered back onto the input's patches; dW is
    ``G^T dU G`` of the sums over the batch, kept per slice and added in slice order. Its cache
    has `_ChunkedConvolution`'s shape (the backward entries call the same methods)."""

    @staticmethod
    def takes(W: Any, pad: int) -> bool:
        """3 x 3 filters over several channels, pad at most 2 (`WINOGRAD` on)."""
        return WINOGRAD and W.shape[1] > 1 and W.shape[2] == 3 and W.shape[3] == 3 and pad <= 2

    def __init__(self, x: Any, W: Any, pad: int, out_h: int, out_w: int, pooled: bool):
        self.x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))          # (N, H, W, C)
        self.W, self.pad, self.out_h, self.out_w = W, pad, out_h, out_w
        filter_num, channels = W.shape[:2]
        self.tiles_h, self.tiles_w = winograd.tiles(out_h, out_w, pooled)
        self.per_image = self.tiles_h * self.tiles_w
        self.input_kernels = winograd.input_kernels(channels)
        self.output_kernels = winograd.output_kernels(filter_num)
        self.U = np.empty((16, channels, filter_num), dtype=x.dtype)
        winograd.filter_transform(np.ascontiguousarray(W, dtype=x.dtype), self.U)
        tile_bytes = 16 * (channels + filter_num) * x.itemsize
        self.chunk = max(1, WINOGRAD_CHUNK_BYTES // (max(1, self.per_image) * tile_bytes))

    def _scratch(self, first: int, last: int, for_dx: bool = False) -> "_WinogradScratch":
        """A slice's scratch (`_WinogradScratch`) for images ``first:last``."""
        tiles = min(self.chunk, last - first) * self.per_image
        channels, filter_num, dtype = self.x.shape[3], self.W.shape[0], self.x.dtype
        return _WinogradScratch(np.empty(16 * tiles * channels, dtype=dtype),
                                np.empty(16 * tiles * filter_num, dtype=dtype),
                                np.empty((2 * self.tiles_h + 2, 2 * self.tiles_w + 2, channels), dtype=dtype),
                                np.empty((4, 4, channels) if for_dx else (0, 0, channels), dtype=dtype))

    def _chunks(self, first: int, last: int, scratch: "_WinogradScratch"):
        """``(start, end, V, M)`` for the chunks of images ``first:last``: V and M contiguous
        ``(tiles, 16, C)`` and ``(tiles, 16, K)`` views of the slice's buffers (each tile's 16
        positions together for the transforms; the products read them as ``(16, tiles, .)``
        views with rows 16 C apart: the position-major layout put its 16 planes a power of two
        apart for DeepConvNet's chunks, and the transforms' 16 streams then collided in cache:
        4.7 against 1.1 ms for a gradient transform)."""
        v_flat, m_flat = scratch.v, scratch.m
        channels, filter_num = self.x.shape[3], self.W.shape[0]
        for start in range(first, last, self.chunk):
            end = min(start + self.chunk, last)
            tiles = (end - start) * self.per_image
            yield (start, end, v_flat[:16 * tiles * channels].reshape(tiles, 16, channels),
                   m_flat[:16 * tiles * filter_num].reshape(tiles, 16, filter_num))

    def _transform_input(self, start: int, end: int, V: np.ndarray, padded: np.ndarray) -> None:
        self.input_kernels.transform(self.x, start, end, self.pad, self.tiles_h, self.tiles_w, padded, V)

    def forward_relu(self, b: Any) -> tuple:
        n, filter_num = self.x.shape[0], self.W.shape[0]
        out = np.empty((n, self.out_h, self.out_w, filter_num), dtype=self.x.dtype)
        b = np.ascontiguousarray(b, dtype=self.x.dtype)

        def one_slice(part: int, first: int, last: int) -> None:
            scratch = self._scratch(first, last)
            half_tile = np.empty((4, filter_num), dtype=self.x.dtype)
            for start, end, V, M in self._chunks(first, last, scratch):
                self._transform_input(start, end, V, scratch.padded)
                np.matmul(V.transpose(1, 0, 2), self.U, out=M.transpose(1, 0, 2))
                self.output_kernels.relu(M, b, start, self.tiles_h, self.tiles_w, half_tile, out)

        run_in_slices(n, one_slice, self.x.nbytes + out.nbytes)
        return out.transpose(0, 3, 1, 2), (_TAG, "winograd", self, out)

    def forward_pooled(self, b: Any) -> tuple:
        n, filter_num = self.x.shape[0], self.W.shape[0]
        pooled = np.empty((n, self.tiles_h, self.tiles_w, filter_num), dtype=self.x.dtype)
        arg = np.empty(pooled.shape, dtype=np.int8)
        b = np.ascontiguousarray(b, dtype=self.x.dtype)

        def one_slice(part: int, first: int, last: int) -> None:
            scratch = self._scratch(first, last)
            for start, end, V, M in self._chunks(first, last, scratch):
                self._transform_input(start, end, V, scratch.padded)
                np.matmul(V.transpose(1, 0, 2), self.U, out=M.transpose(1, 0, 2))
                self.output_kernels.relu_pool(M, b, start, pooled, arg)

        run_in_slices(n, one_slice, self.x.nbytes + pooled.nbytes * 4)
        return pooled.transpose(0, 3, 1, 2), (_TAG, "winograd", self, arg, 2)

    def backward_relu(self, dout: Any, out: np.ndarray, need_input_grad: bool, dW_out: Any, db_out: Any) -> tuple:
        dout_last = np.ascontiguousarray(dout.transpose(0, 2, 3, 1))     # no copy when handed channels-last

        def gradient(start: int, dM: np.ndarray, db: np.ndarray) -> None:
            self.output_kernels.relu_gradient(dout_last, out, start, self.tiles_h, self.tiles_w, dM, db)

        return self._backward(gradient, need_input_grad, dW_out, db_out, dout.nbytes)

    def backward_pooled(self, dout: Any, arg: np.ndarray, pool: int, need_input_grad: bool, dW_out: Any,
                        db_out: Any) -> tuple:
        dout_last = np.ascontiguousarray(dout.transpose(0, 2, 3, 1))

        def gradient(start: int, dM: np.ndarray, db: np.ndarray) -> None:
            self.output_kernels.pool_gradient(dout_last, arg, start, dM, db)

        return self._backward(gradient, need_input_grad, dW_out, db_out, dout.nbytes * 4)

    def _backward(self, gradient: Callable, need_input_grad: bool, dW_out: Any, db_out: Any, nbytes: int) -> tuple:
        n, channels, filter_num, dtype = self.x.shape[0], self.x.shape[3], self.W.shape[0], self.x.dtype
        dx = np.zeros(self.x.shape, dtype=dtype) if need_input_grad else None
        # (16, K, C), contiguous: NumPy's matmul onto dV's strided view took 1.6-2.8x as long
        # with the transposed view of U (docs/performance.md, "Fourth session")
        u_t = np.ascontiguousarray(self.U.transpose(0, 2, 1))
        sums: dict[int, tuple] = {}

        def one_slice(part: int, first: int, last: int) -> None:
            scratch = self._scratch(first, last, for_dx=need_input_grad)
            dU, dU_chunk = np.zeros((16, channels, filter_num), dtype=dtype), np.empty((16, channels, filter_num),
                                                                                        dtype=dtype)
            db = np.zeros(filter_num, dtype=dtype)
            for start, end, V, dM in self._chunks(first, last, scratch):
                gradient(start, dM, db)
                self._transform_input(start, end, V, scratch.padded)
                np.matmul(V.transpose(1, 2, 0), dM.transpose(1, 0, 2), out=dU_chunk)
                dU += dU_chunk
                if need_input_grad:
                    np.matmul(dM.transpose(1, 0, 2), u_t, out=V.transpose(1, 0, 2))     # dV, in V's place
                    self.input_kernels.gradient(V, start, end, self.pad, self.tiles_h, self.tiles_w, scratch.patch,
                                                scratch.padded, dx)
            sums[part] = (dU, db)

        dU, db = _sum_slices(sums, run_in_slices(n, one_slice, self.x.nbytes + nbytes))
        dW = np.empty(self.W.shape, dtype=dtype)
        winograd.filter_gradient(dU, dW)
        return (None if dx is None else dx.transpose(0, 3, 1, 2)), store_gradient(dW_out, dW), \
            store_gradient(db_out, db)


def softmax_cross_entropy_forward(xp: ModuleType, scores: Any, t: Any) -> Any:
    """Integer labels: one pass; one-hot labels take the reference."""
    if t.ndim != 1:
        return NotImplemented
    scores = np.ascontiguousarray(scores)
    n = scores.shape[0]
    probs, grad = np.empty_like(scores), np.empty_like(scores)
    labels = np.ascontiguousarray(t, dtype=np.int64)
    loss = _softmax_cross_entropy(scores, labels, scores.dtype.type(1 / n), probs, grad)
    return np.asarray(loss / scores.dtype.type(n), dtype=scores.dtype), (probs, labels, grad)


def softmax_cross_entropy_backward(xp: ModuleType, cache: Any, dout: Any) -> Any:
    """``dout = 1``: the gradient the forward pass wrote; any other ``dout``: the reference's
    formula on the one-hot labels."""
    if len(cache) != 3:
        return NotImplemented
    probs, labels, grad = cache
    if isinstance(dout, (int, float)) and dout == 1:
        return grad
    return reference.softmax_cross_entropy_backward(xp, (probs, one_hot(labels, probs.shape[1], probs.dtype, xp=xp)),
                                                    dout)


def count_correct(xp: ModuleType, scores: Any, t: Any) -> Any:
    return np.asarray(_count_correct(np.ascontiguousarray(scores), np.ascontiguousarray(t, dtype=np.int64)),
                      dtype=np.int64)


def _elementwise(param: Any, work: Callable[[int, int], None], arrays: int) -> None:
    """`work(start, end)` over the flat buffer in slices, one per thread."""
    run_in_slices(param.shape[0], lambda part, start, end: work(start, end), arrays * param.nbytes, uses_blas=False)


def sgd_update(xp: ModuleType, param: Any, grad: Any, lr: float) -> Any:
    if param.ndim != 1:
        return NotImplemented
    t = param.dtype.type
    _elementwise(param, lambda start, end: _sgd(param, grad, t(lr), start, end), 2)


def momentum_update(xp: ModuleType, param: Any, grad: Any, v: Any, lr: float, momentum: float) -> Any:
    if param.ndim != 1:
        return NotImplemented
    t = param.dtype.type
    _elementwise(param, lambda start, end: _momentum(param, grad, v, t(lr), t(momentum), start, end), 3)


def adagrad_update(xp: ModuleType, param: Any, grad: Any, h: Any, lr: float, eps: float) -> Any:
    if param.ndim != 1:
        return NotImplemented
    t = param.dtype.type
    _elementwise(param, lambda start, end: _adagrad(param, grad, h, t(lr), t(eps), start, end), 3)


def adam_update(xp: ModuleType, param: Any, grad: Any, m: Any, v: Any, lr_t: float,
                beta1: float, beta2: float, eps: float) -> Any:
    if param.ndim != 1:
        return NotImplemented
    t = param.dtype.type
    _elementwise(param, lambda start, end: _adam(param, grad, m, v, t(lr_t), t(1.0 - beta1), t(1.0 - beta2), t(eps),
                                                 start, end), 4)


def numba_version() -> str:
    return kernel_cache.numba.__version__


def fast_ops() -> dict[str, Callable[..., Any]]:
    """The entries this module lays over NumPy's table (`xpcnn.ops.table`)."""
    return {name: globals()[name] for name in (
        "conv2d_relu_maxpool2d_forward", "conv2d_relu_maxpool2d_backward", "conv2d_relu_forward",
        "conv2d_relu_backward", "softmax_cross_entropy_forward", "softmax_cross_entropy_backward", "count_correct",
        "sgd_update", "momentum_update", "adagrad_update", "adam_update")}
