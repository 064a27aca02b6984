"""NumPy fast path: a channels-last convolution in cache-sized chunks, and every hot loop on
all of the CPU's cores.

The reference convolution (`reference.conv2d_forward`) builds the whole batch's im2col matrix
(for DeepConvNet's second layer 45 MB, larger than the L3 cache), writes it to memory and
reads it back for the matrix product. This version keeps the activations *channels-last*
in memory (``(N, H, W, C)``) and handles a few images at a time:

* the windows of a chunk of images are one strided view of the padded ``(N, H, W, C)``
  input; copying it gives the chunk's im2col rows ``(n, oh, ow) x (i, j, c)``, whose inner
  ``(j, c)`` run is contiguous in the input, and it stays in cache for the product;
* the product ``(rows, FH*FW*C) @ (FH*FW*C, FN)`` lands in ``(N, OH, OW, FN)`` order, which
  is channels-last again, so nothing is transposed between layers: the result is handed on
  as an ``(N, FN, OH, OW)`` *view* of that memory. ReLU, pooling and the next convolution
  read it as it lies;
* backward recomputes each chunk's windows (cheaper than keeping 45 MB) for ``dW``, and for
  stride 1 gets ``dx`` as a convolution of the padded ``dout`` with the flipped filters,
  chunk by chunk; other strides scatter the columns back (col2im) per chunk.

**Every core.** Each of these operations, and the padding, Affine, ReLU and 2x2 pooling
entries below, cuts the batch into one slice per thread (`cpu_threads.run_in_slices`) with
BLAS held to one thread: the chunks' products are too small and narrow for BLAS to split
well, and the copies and elementwise loops around them run on one core otherwise. Sums over
the batch (dW, db) are kept per slice and added in slice order. BLAS stays at one thread
even where a small operation runs on one slice: its own idle threads would spin for a
while after each call, on the core the next sliced operation needs.

Measured in docs/performance.md ("DeepConvNet on the CPU"). Results equal the reference
within float rounding (tests/ops/test_fast_ops.py, also cut into three slices for every
case); chunks and slices are summed in a fixed order, so runs with the same number of
threads are bit-identical. Registered for NumPy in `ops.table._fast_table`; `reference=True` turns
it off.

Pooling geometries whose windows do not tile the input are left to the reference (the
entries return ``NotImplemented``, `xpcnn.ops.table`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import reference
from .cpu_threads import run_in_slices, run_over
from .geometry import spatial_slices, window_offsets
from .reference import store_gradient

#: About how many bytes of im2col rows one chunk holds: a few images, well inside the
#: L3 cache (and near the L2 of one core), so the copy and the product meet in cache.
CHUNK_BYTES = 2 << 20


def _channels_last(x: np.ndarray) -> np.ndarray:
    """``(N, C, H, W) -> (N, H, W, C)``, a view (contiguous if the memory is channels-last)."""
    return x.transpose(0, 2, 3, 1)


def _padded(x_last: np.ndarray, pad_h: int, pad_w: int) -> np.ndarray:
    """``(N, H, W, C)`` zero-padded on the two spatial axes, C-contiguous (one copy at most),
    each slice of the batch copied by its own thread."""
    if pad_h == 0 and pad_w == 0 and x_last.flags.c_contiguous:
        return np.ascontiguousarray(x_last)
    n, h, w, c = x_last.shape
    out = np.empty((n, h + 2 * pad_h, w + 2 * pad_w, c), dtype=x_last.dtype)

    def one_slice(part: int, start: int, end: int) -> None:
        block = out[start:end]
        for border in (block[:, :pad_h], block[:, pad_h + h:], block[:, pad_h:pad_h + h, :pad_w],
                       block[:, pad_h:pad_h + h, pad_w + w:]):
            border.fill(0)
        block[:, pad_h:pad_h + h, pad_w:pad_w + w] = x_last[start:end]

    run_in_slices(n, one_slice, 2 * out.nbytes, uses_blas=False)
    return out


def _windows(x_pad: np.ndarray, filter_h: int, filter_w: int, stride: int,
             out_h: int, out_w: int) -> np.ndarray:
    """Read-only ``(N, OH, OW, FH, FW, C)`` view:
    ``[n, oh, ow, i, j, c] = x_pad[n, oh*stride + i, ow*stride + j, c]``."""
    s_n, s_h, s_w, s_c = x_pad.strides
    shape = (x_pad.shape[0], out_h, out_w, filter_h, filter_w, x_pad.shape[3])
    return as_strided(x_pad, shape, (s_n, s_h * stride, s_w * stride, s_h, s_w, s_c), writeable=False)


def _chunk_size(n: int, rows_per_image: int, row_len: int, itemsize: int) -> int:
    return max(1, min(n, CHUNK_BYTES // max(1, rows_per_image * row_len * itemsize)))


def _each_chunk_of_columns(windows: np.ndarray, work: Callable[[int, int, int, np.ndarray], None]) -> int:
    """Call ``work(part, start, end, columns)`` for the batch in chunks, each slice of the
    batch on its own core (`cpu_threads.run_in_slices`); `columns` is the chunk's im2col
    matrix ``(images*OH*OW, FH*FW*C)``, copied into a buffer each slice reuses. Returns the
    number of slices."""
    n, out_h, out_w, filter_h, filter_w, c = windows.shape
    row_len = filter_h * filter_w * c
    size = _chunk_size(n, out_h * out_w, row_len, windows.itemsize)

    def one_slice(part: int, first: int, last: int) -> None:
        buffer = np.empty((min(size, last - first),) + windows.shape[1:], dtype=windows.dtype)
        for start in range(first, last, size):
            end = min(start + size, last)
            chunk = buffer[:end - start]
            np.copyto(chunk, windows[start:end])
            work(part, start, end, chunk.reshape(-1, row_len))

    return run_in_slices(n, one_slice, windows.nbytes)


def conv2d_forward(xp: ModuleType, x: Any, W: Any, b: Any, stride: int, pad: int,
                   out_h: int, out_w: int) -> tuple[Any, Any]:
    """``(N, C, H, W) -> (N, FN, OH, OW)``, a view of channels-last memory (see module doc).

    One input channel: the reference's per-image layout, which is faster there (rows of
    FH*FW single floats copy slowly) and lands in NCHW directly.
    """
    filter_num, channels, filter_h, filter_w = W.shape
    if reference.per_image_layout_wins(channels):
        return _per_image_forward(xp, x, W, b, stride, pad, out_h, out_w)
    x_pad = _padded(_channels_last(x), pad, pad)
    w_cols = np.ascontiguousarray(W.transpose(2, 3, 1, 0)).reshape(-1, filter_num)   # rows (i, j, c)
    out = np.empty((x.shape[0], out_h, out_w, filter_num), dtype=x.dtype)
    out_rows = out.reshape(-1, filter_num)
    rows_per_image = out_h * out_w

    def product(part: int, start: int, end: int, columns: np.ndarray) -> None:
        rows = out_rows[start * rows_per_image:end * rows_per_image]
        np.matmul(columns, w_cols, out=rows)
        rows += b

    _each_chunk_of_columns(_windows(x_pad, filter_h, filter_w, stride, out_h, out_w), product)
    return out.transpose(0, 3, 1, 2), (x_pad, tuple(x.shape))


def conv2d_backward(xp: ModuleType, dout: Any, cache: Any, W: Any, stride: int, pad: int,
                    need_input_grad: bool, dW_out: Any = None, db_out: Any = None) -> tuple[Any, Any, Any]:
    """``dout (N, FN, OH, OW) -> (dx (N, C, H, W) or None, dW, db)``; dx is a view of
    channels-last memory."""
    filter_num, channels, filter_h, filter_w = W.shape
    if reference.per_image_layout_wins(channels):
        return _per_image_backward(xp, dout, cache, W, stride, pad, need_input_grad, dW_out, db_out)
    x_pad, (n, _, height, width) = cache
    _, _, out_h, out_w = dout.shape
    dout_last = np.ascontiguousarray(_channels_last(dout))          # (N, OH, OW, FN)
    dout_rows = dout_last.reshape(-1, filter_num)
    rows_per_image = out_h * out_w

    # One sum per slice of the batch (made by the thread that fills it), each chunk added in
    # order, then the slices' sums in order: deterministic for a given number of threads.
    # db is a product with a vector of ones (BLAS: NumPy's sum over the long axis of a
    # narrow matrix is several times slower).
    partial_sums: dict[int, tuple[np.ndarray, ...]] = {}
    cols_shape = (filter_h * filter_w * channels, filter_num)
    ones = np.ones(_chunk_size(n, rows_per_image, filter_h * filter_w * channels, dout.itemsize) * rows_per_image,
                   dtype=dout.dtype)

    def weight_gradient(part: int, start: int, end: int, columns: np.ndarray) -> None:
        if part not in partial_sums:
            partial_sums[part] = (np.zeros(cols_shape, dtype=dout.dtype), np.empty(cols_shape, dtype=dout.dtype),
                                  np.zeros(filter_num, dtype=dout.dtype), np.empty(filter_num, dtype=dout.dtype))
        dW_sum, dW_product, db_sum, db_product = partial_sums[part]
        rows = dout_rows[start * rows_per_image:end * rows_per_image]
        np.matmul(columns.T, rows, out=dW_product)
        np.add(dW_sum, dW_product, out=dW_sum)
        np.matmul(ones[:rows.shape[0]], rows, out=db_product)
        np.add(db_sum, db_product, out=db_sum)

    slices = _each_chunk_of_columns(_windows(x_pad, filter_h, filter_w, stride, out_h, out_w), weight_gradient)
    dW_cols, db = partial_sums[0][0], partial_sums[0][2]
    for part in range(1, slices):
        dW_cols += partial_sums[part][0]
        db += partial_sums[part][2]
    db = store_gradient(db_out, db)
    dW_view = dW_cols.reshape(filter_h, filter_w, channels, filter_num).transpose(3, 2, 0, 1)
    dW = np.ascontiguousarray(dW_view) if dW_out is None else store_gradient(dW_out, dW_view)
    if not need_input_grad:
        return None, dW, db
    if stride == 1 and pad < filter_h and pad < filter_w:
        dx_last = _input_gradient_as_convolution(dout_last, W, pad, height, width)
    else:
        dx_last = _input_gradient_by_col2im(dout_rows, W, stride, pad, (n, height, width, channels), out_h, out_w)
    return dx_last.transpose(0, 3, 1, 2), dW, db


def _input_gradient_as_convolution(dout_last: np.ndarray, W: np.ndarray, pad: int,
                                   height: int, width: int) -> np.ndarray:
    """Stride 1: ``dx = dout (padded by FH-1-pad) convolved with the flipped, transposed
    filters``, ``(N, H, W, C)``."""
    filter_num, channels, filter_h, filter_w = W.shape
    dout_pad = _padded(dout_last, filter_h - 1 - pad, filter_w - 1 - pad)
    flipped_cols = np.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)).reshape(-1, channels)
    dx = np.empty((dout_last.shape[0], height, width, channels), dtype=dout_last.dtype)
    dx_rows = dx.reshape(-1, channels)
    rows_per_image = height * width

    def product(part: int, start: int, end: int, columns: np.ndarray) -> None:
        np.matmul(columns, flipped_cols, out=dx_rows[start * rows_per_image:end * rows_per_image])

    _each_chunk_of_columns(_windows(dout_pad, filter_h, filter_w, 1, height, width), product)
    return dx


def _input_gradient_by_col2im(dout_rows: np.ndarray, W: np.ndarray, stride: int, pad: int,
                              input_shape: tuple, out_h: int, out_w: int) -> np.ndarray:
    """Any stride: each chunk's columns ``dout @ W`` added back into its windows, ``(N, H, W, C)``."""
    n, height, width, channels = input_shape
    filter_num, _, filter_h, filter_w = W.shape
    w_rows = np.ascontiguousarray(W.transpose(0, 2, 3, 1)).reshape(filter_num, -1)   # columns (i, j, c)
    dx_pad = np.zeros((n, height + 2 * pad, width + 2 * pad, channels), dtype=dout_rows.dtype)
    rows_per_image = out_h * out_w
    size = _chunk_size(n, rows_per_image, filter_h * filter_w * channels, dout_rows.itemsize)

    def one_slice(part: int, first: int, last: int) -> None:
        for start in range(first, last, size):       # each chunk adds into its own images only
            end = min(start + size, last)
            columns = dout_rows[start * rows_per_image:end * rows_per_image] @ w_rows
            columns = columns.reshape(end - start, out_h, out_w, filter_h, filter_w, channels)
            for i, j in window_offsets(filter_h, filter_w):
                dx_pad[(slice(start, end),) + spatial_slices(i, j, stride, out_h, out_w)] += columns[:, :, :, i, j, :]

    run_in_slices(n, one_slice, dx_pad.nbytes + dout_rows.nbytes)
    return dx_pad[:, pad:pad + height, pad:pad + width, :]


def _per_image_forward(xp: ModuleType, x: Any, W: Any, b: Any, stride: int, pad: int,
                       out_h: int, out_w: int) -> tuple[Any, Any]:
    """One input channel: the reference's per-image im2col (faster there: rows of FH*FW single
    floats copy slowly, and its product lands in NCHW directly), on each slice of the batch.
    The cache is ``(None, slices, their caches)``; one slice is the reference's own call."""
    n = x.shape[0]
    bounds, caches, whole = {}, {}, []
    out = np.empty((n, W.shape[0], out_h, out_w), dtype=x.dtype)

    def one_slice(part: int, start: int, end: int) -> None:
        result = reference.conv2d_forward(xp, x[start:end], W, b, stride, pad, out_h, out_w)
        if end - start == n:
            whole.append(result)                  # one slice: the reference's own result and cache
            return
        out[start:end], caches[part] = result
        bounds[part] = (start, end)

    if run_in_slices(n, one_slice, 10 * out.nbytes) == 1:
        return whole[0]
    return out, (None, [bounds[part] for part in sorted(bounds)], [caches[part] for part in sorted(caches)])


def _per_image_backward(xp: ModuleType, dout: Any, cache: Any, W: Any, stride: int, pad: int,
                        need_input_grad: bool, dW_out: Any, db_out: Any) -> tuple[Any, Any, Any]:
    """The backward of `_per_image_forward`: the reference's on each slice the forward made,
    the slices' dW and db summed in order."""
    if cache[0] is not None:                     # one slice: the reference's own cache
        return reference.conv2d_backward(xp, dout, cache, W, stride, pad, need_input_grad, dW_out, db_out)
    _, bounds, caches = cache
    n = bounds[-1][1]
    dx = np.empty((n,) + tuple(caches[0][1][1:]), dtype=dout.dtype) if need_input_grad else None
    grads: dict[int, tuple[Any, Any]] = {}

    def one_slice(part: int, start: int, end: int) -> None:
        dx_part, dW, db = reference.conv2d_backward(xp, dout[start:end], caches[part], W, stride, pad,
                                                    need_input_grad)
        if need_input_grad:
            dx[start:end] = dx_part
        grads[part] = (dW, db)

    run_over(bounds, one_slice)
    dW, db = grads[0]
    for part in range(1, len(bounds)):
        dW = dW + grads[part][0]
        db = db + grads[part][1]
    return dx, store_gradient(dW_out, dW), store_gradient(db_out, db)


# ------------------------------------------------------------ Affine, ReLU, max pooling
# Memory-bound loops NumPy runs on one core: each slice of the batch on its own.

def affine_forward(xp: ModuleType, x: Any, W: Any, b: Any) -> Any:
    """``(N, in) @ (in, out) + (out,)``. Each thread takes a slice of the input features
    (``x[:, rows] @ W[rows]``): it reads only its part of W, and the partial products are added
    in slice order. (Slices of the batch had each thread read all of W: SimpleConvNet's
    ``(100, 4320) @ (4320, 100)`` took 0.80-0.85 against 0.69 ms, docs/performance.md.)"""
    parts: dict[int, Any] = {}

    def one_slice(part: int, start: int, end: int) -> None:
        parts[part] = np.matmul(x[:, start:end], W[start:end])

    slices = run_in_slices(x.shape[1], one_slice, x.nbytes + W.nbytes)
    out = parts[0]
    for part in range(1, slices):
        out += parts[part]
    out += b
    return out


def affine_backward(xp: ModuleType, dout: Any, x: Any, W: Any, need_input_grad: bool,
                    dW_out: Any = None, db_out: Any = None) -> tuple[Any, Any, Any]:
    """``dout (N, out) -> (dx (N, in) or None, dW, db)``. Each thread takes a slice of the input
    features, for dW's rows (``x[:, rows].T @ dout``, the whole batch at once, so no partial
    sums to add and the same numbers on any number of threads) and for dx's columns
    (``dout @ W[rows].T``): the forward's slice of x and W again, the only part of W it reads."""
    n, features = x.shape
    dW = dW_out if dW_out is not None and dW_out.flags.c_contiguous else np.empty((features, W.shape[1]),
                                                                                  dtype=dout.dtype)
    dx = np.empty_like(x, dtype=dout.dtype) if need_input_grad else None

    def one_slice(part: int, start: int, end: int) -> None:
        np.matmul(x[:, start:end].T, dout, out=dW[start:end])
        if need_input_grad:
            np.matmul(dout, W[start:end].T, out=dx[:, start:end])

    run_in_slices(features, one_slice, x.nbytes + 2 * W.nbytes + 2 * dout.nbytes)
    db = dout.sum(axis=0)
    return dx, store_gradient(dW_out, dW) if dW is not dW_out else dW, store_gradient(db_out, db)


def relu_forward(xp: ModuleType, x: Any) -> Any:
    """``max(x, 0)`` in the input's memory layout."""
    out = np.empty_like(x)

    def one_slice(part: int, start: int, end: int) -> None:
        np.maximum(x[start:end], 0.0, out=out[start:end])

    run_in_slices(x.shape[0], one_slice, 2 * x.nbytes, uses_blas=False)
    return out


def relu_backward(xp: ModuleType, out: Any, dout: Any) -> Any:
    """``dout`` where the output was > 0, else 0, in the output's memory layout."""
    dx = np.empty_like(out, dtype=dout.dtype)

    def one_slice(part: int, start: int, end: int) -> None:
        np.multiply(out[start:end] > 0, dout[start:end], out=dx[start:end])

    run_in_slices(out.shape[0], one_slice, 3 * out.nbytes, uses_blas=False)
    return dx


def _window_indices(pool_h: int, pool_w: int, stride: int, out_h: int, out_w: int) -> list[tuple]:
    """The index of each window offset's slice of an ``(N, C, H, W)`` block, in the reference's order."""
    return [(slice(None), slice(None)) + spatial_slices(i, j, stride, out_h, out_w)
            for i, j in window_offsets(pool_h, pool_w)]


def maxpool2d_forward(xp: ModuleType, x: Any, pool_h: int, pool_w: int, stride: int, pad: int,
                      out_h: int, out_w: int) -> tuple[Any, Any]:
    """Windows that tile the input (DeepConvNet's 2x2, stride 2): the elementwise maximum of
    the window slices, written slice by slice; other geometries: the reference."""
    if not reference.pool_tiles(x.shape, pool_h, pool_w, stride, pad):
        return NotImplemented
    windows = _window_indices(pool_h, pool_w, stride, out_h, out_w)
    out = np.empty_like(x[windows[0]])                   # the input's memory layout

    def one_slice(part: int, start: int, end: int) -> None:
        block, target = x[start:end], out[start:end]
        np.copyto(target, block[windows[0]])
        for window in windows[1:]:
            np.maximum(target, block[window], out=target)

    run_in_slices(x.shape[0], one_slice, x.nbytes + out.nbytes, uses_blas=False)
    return out, ("tiles", x, out, windows)


def maxpool2d_backward(xp: ModuleType, dout: Any, cache: Any) -> Any:
    """Each window's gradient to its first maximum (as the reference), slice by slice."""
    if not isinstance(cache[0], str):            # the reference's cache
        return NotImplemented
    _, x, out, windows = cache
    dx = np.empty_like(x, dtype=dout.dtype)              # every pixel is in one window: written once

    def one_slice(part: int, start: int, end: int) -> None:
        block, maxima, target = x[start:end], out[start:end], dx[start:end]
        remaining = dout[start:end]                      # gradient of windows whose max is not found yet
        for k, window in enumerate(windows):
            if k == len(windows) - 1:
                grad = remaining
            else:
                grad = np.multiply(block[window] == maxima, remaining)
                remaining = remaining - grad if k == 0 else np.subtract(remaining, grad, out=remaining)
            target[window] = grad

    run_in_slices(x.shape[0], one_slice, 2 * x.nbytes + 2 * out.nbytes, uses_blas=False)
    return dx


def fast_ops() -> dict[str, Callable[..., Any]]:
    """NumPy's entries for the operation table (`xpcnn.ops.table`)."""
    return {"conv2d_forward": conv2d_forward, "conv2d_backward": conv2d_backward,
            "affine_forward": affine_forward, "affine_backward": affine_backward,
            "relu_forward": relu_forward, "relu_backward": relu_backward,
            "maxpool2d_forward": maxpool2d_forward, "maxpool2d_backward": maxpool2d_backward}
