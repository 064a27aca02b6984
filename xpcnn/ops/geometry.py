"""The geometry of convolution and pooling on any array-API namespace: output sizes,
window offsets, padding, im2col/col2im.

Shapes follow the book: images are ``(N, C, H, W)``, filters ``(FN, C, FH, FW)``.
The layers use a per-image transposed form of im2col, `im2col_nchw`:
``(N, C, H, W) -> (N, C*FH*FW, OH*OW)``. Each offset's slice is copied into a contiguous
block (no scattered writes), and ``W.reshape(FN, -1) @ col`` (one matrix product per
image) lands directly in ``(N, FN, OH*OW)``, the NCHW output, so no transpose is needed
on the way out or back (see docs/performance.md for the measurements). The public
`im2col`/`col2im` give the book's ``(N*OH*OW, C*FH*FW)`` matrix, columns in its ``(c, i, j)``
order, from the same code.
"""

from __future__ import annotations

from typing import Any, Iterator

import array_api_compat

from .. import checks
from ..backend.arrays import namespace_of
from ..errors import ShapeError

# ---------------------------------------------------------------------------- geometry


def check_stride_pad(stride: Any, pad: Any, what: str) -> None:
    """Raise `ConfigError` unless stride is an int >= 1 and pad an int >= 0."""
    checks.positive_int(stride, "stride", what)
    checks.non_negative_int(pad, "pad", what)


def conv_output_size(input_size: int, filter_size: int, stride: int = 1, pad: int = 0,
                     *, what: str = "convolution") -> int:
    """``(input_size + 2*pad - filter_size) / stride + 1``, which must be a whole number >= 1.

    Raises:
        ConfigError: stride < 1 or pad < 0.
        ShapeError: the filter does not fit, or the stride does not divide the span.
    """
    check_stride_pad(stride, pad, what)
    span = input_size + 2 * pad - filter_size
    if filter_size < 1 or span < 0:
        raise ShapeError(
            f"{what}: window of size {filter_size} does not fit an input of size {input_size} "
            f"with pad {pad} (expected 1 <= window <= {input_size + 2 * pad})"
        )
    if span % stride != 0:
        raise ShapeError(
            f"{what}: output size does not divide: (input {input_size} + 2*pad {pad} - window "
            f"{filter_size}) = {span} is not a multiple of stride {stride}"
        )
    return span // stride + 1


def check_rank(x: Any, rank: int, what: str, layout: str) -> None:
    """Raise `ShapeError` unless `x` has `rank` dimensions."""
    if x.ndim != rank:
        raise ShapeError(f"{what}: expected a {rank}-D input {layout}, got shape {tuple(x.shape)}")


# ------------------------------------------------------------------ window helpers


def window_offsets(filter_h: int, filter_w: int) -> Iterator[tuple[int, int]]:
    """The ``(i, j)`` offsets inside a window, in the book's (row-major) order."""
    for i in range(filter_h):
        for j in range(filter_w):
            yield i, j


def spatial_slices(i: int, j: int, stride: int, out_h: int, out_w: int) -> tuple[slice, slice]:
    """Row and column slices that cut the pixel at offset (i, j) of every window."""
    return (slice(i, i + stride * (out_h - 1) + 1, stride),
            slice(j, j + stride * (out_w - 1) + 1, stride))


def full_along(x: Any, axis: int, shape: tuple, fill: float = 0.0, *, xp: Any = None) -> Any:
    """A new array of `shape`, filled with `fill` in `x`'s dtype and device, whose `axis` has
    the length of `x`'s axis 0 (the batch): ``shape[axis]`` is ignored.

    The batch size may be unknown: the array API writes an unknown dimension as None (an
    ndonnx argument with a dynamic batch, when the forward pass is traced into an ONNX graph).
    Then the buffer takes its batch axis from `x` by broadcasting instead of by number.
    """
    xp = xp or namespace_of(x)
    n = x.shape[0]
    if n is not None:
        sized = tuple(n if i == axis else size for i, size in enumerate(shape))
        if fill == 0:
            return xp.zeros(sized, dtype=x.dtype, device=array_api_compat.device(x))
        return xp.full(sized, fill, dtype=x.dtype, device=array_api_compat.device(x))
    # (N, 1, ..., 1) zeros moved to `axis`, plus the filled rest: broadcasting gives N there.
    batch = xp.zeros_like(x[(slice(None),) + (slice(0, 1),) * (x.ndim - 1)])
    batch = xp.reshape(batch, (-1,) + (1,) * (len(shape) - 1))
    order = list(range(1, len(shape)))
    order.insert(axis, 0)
    rest = tuple(1 if i == axis else size for i, size in enumerate(shape))
    return xp.permute_dims(batch, tuple(order)) + xp.full(rest, fill, dtype=x.dtype,
                                                          device=array_api_compat.device(x))


def pad_nchw(x: Any, pad: int, fill: float = 0.0) -> Any:
    """Pad the two spatial axes of ``(N, C, H, W)`` by `pad` on each side with `fill`."""
    if pad == 0:
        return x
    xp = namespace_of(x)
    _, c, h, w = x.shape
    out = full_along(x, 0, (None, c, h + 2 * pad, w + 2 * pad), fill, xp=xp)
    out[:, :, pad:pad + h, pad:pad + w] = x
    return out


def im2col_nchw(x: Any, filter_h: int, filter_w: int, stride: int, pad: int,
                out_h: int, out_w: int, *, xp: Any = None) -> Any:
    """``(N, C, H, W) -> (N, C*FH*FW, OH*OW)``: per image, one row per ``(c, i, j)``.

    ``col[n, (c, i, j), (oh, ow)] == x_pad[n, c, oh*stride + i, ow*stride + j]``; it is the
    transpose of image n's block of the book's im2col matrix. Pass `xp` when it is known.
    """
    xp = xp or namespace_of(x)
    c = x.shape[1]
    x_pad = pad_nchw(x, pad)
    patches = [x_pad[(slice(None), slice(None)) + spatial_slices(i, j, stride, out_h, out_w)]
               for i, j in window_offsets(filter_h, filter_w)]
    col = xp.stack(patches, axis=2)  # (N, C, FH*FW, OH, OW), each slice a contiguous block
    # -1, not N: the batch size may be unknown (a traced graph's dynamic batch, see `full_along`).
    return xp.reshape(col, (-1, c * filter_h * filter_w, out_h * out_w))


def col2im_nchw(col: Any, input_shape: tuple, filter_h: int, filter_w: int, stride: int,
                pad: int, out_h: int, out_w: int, *, xp: Any = None) -> Any:
    """Adjoint of `im2col_nchw`: ``(N, C*FH*FW, OH*OW) -> (N, C, H, W)``, overlaps added."""
    xp = xp or namespace_of(col)
    n, c, h, w = input_shape
    col5 = xp.reshape(col, (n, c, filter_h * filter_w, out_h, out_w))
    dx_pad = xp.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=col.dtype, device=array_api_compat.device(col))
    for k, (i, j) in enumerate(window_offsets(filter_h, filter_w)):
        dx_pad[(slice(None), slice(None)) + spatial_slices(i, j, stride, out_h, out_w)] += col5[:, :, k, :, :]
    if pad == 0:
        return dx_pad
    return dx_pad[:, :, pad:pad + h, pad:pad + w]


def im2col_cnhw(x: Any, filter_h: int, filter_w: int, stride: int, pad: int,
                out_h: int, out_w: int, *, xp: Any = None) -> Any:
    """``(N, C, H, W) -> (C*FH*FW, N*OH*OW)``: the whole batch as one matrix, rows ``(c, i, j)``.

    ``col[(c, i, j), (n, oh, ow)] == x_pad[n, c, oh*stride + i, ow*stride + j]``: the transpose
    of the book's im2col matrix. The input is transposed to ``(C, N, H, W)`` (while padding,
    in one copy) so every offset's slice is again one contiguous block of the stack.
    """
    xp = xp or namespace_of(x)
    _, c, h, w = x.shape
    x_cn = full_along(x, 1, (c, None, h + 2 * pad, w + 2 * pad), xp=xp)
    x_cn[:, :, pad:pad + h, pad:pad + w] = xp.permute_dims(x, (1, 0, 2, 3))
    patches = [x_cn[(slice(None), slice(None)) + spatial_slices(i, j, stride, out_h, out_w)]
               for i, j in window_offsets(filter_h, filter_w)]
    col = xp.stack(patches, axis=1)   # (C, FH*FW, N, OH, OW)
    return xp.reshape(col, (c * filter_h * filter_w, -1))


def col2im_cnhw(col: Any, input_shape: tuple, filter_h: int, filter_w: int, stride: int,
                pad: int, out_h: int, out_w: int, *, xp: Any = None) -> Any:
    """Adjoint of `im2col_cnhw`: ``(C*FH*FW, N*OH*OW) -> (N, C, H, W)``, overlaps added.

    The result is a ``(N, C, H, W)`` view of a ``(C, N, H, W)`` array (no copy back).
    """
    xp = xp or namespace_of(col)
    n, c, h, w = input_shape
    col5 = xp.reshape(col, (c, filter_h * filter_w, n, out_h, out_w))
    dx_cn = xp.zeros((c, n, h + 2 * pad, w + 2 * pad), dtype=col.dtype, device=array_api_compat.device(col))
    for k, (i, j) in enumerate(window_offsets(filter_h, filter_w)):
        dx_cn[(slice(None), slice(None)) + spatial_slices(i, j, stride, out_h, out_w)] += col5[:, k, ...]
    if pad:
        dx_cn = dx_cn[:, :, pad:pad + h, pad:pad + w]
    return xp.permute_dims(dx_cn, (1, 0, 2, 3))


# --------------------------------------------------------------------- public im2col


def im2col(x: Any, filter_h: int, filter_w: int, stride: int = 1, pad: int = 0) -> Any:
    """Unfold image windows into rows: ``(N, C, H, W) -> (N*OH*OW, C*FH*FW)``.

    Row ``(n, oh, ow)`` holds the window under output pixel (oh, ow) of image n, with
    columns in the book's ``(c, i, j)`` order, so ``col @ W.reshape(FN, -1).T`` is the
    convolution.
    """
    check_rank(x, 4, "im2col", "(N, C, H, W)")
    out_h = conv_output_size(x.shape[2], filter_h, stride, pad, what="im2col (height)")
    out_w = conv_output_size(x.shape[3], filter_w, stride, pad, what="im2col (width)")
    xp = namespace_of(x)
    col = im2col_nchw(x, filter_h, filter_w, stride, pad, out_h, out_w)   # (N, C*FH*FW, OH*OW)
    return xp.reshape(xp.matrix_transpose(col), (x.shape[0] * out_h * out_w, -1))


def col2im(col: Any, input_shape: tuple, filter_h: int, filter_w: int, stride: int = 1,
           pad: int = 0) -> Any:
    """Fold rows back into images, adding overlaps: ``(N*OH*OW, C*FH*FW) -> (N, C, H, W)``.

    The adjoint of `im2col`: ``<im2col(x), y> == <x, col2im(y)>``.
    """
    if len(input_shape) != 4:
        raise ShapeError(f"col2im: input_shape must be (N, C, H, W), got {tuple(input_shape)}")
    n, c, h, w = (int(s) for s in input_shape)
    out_h = conv_output_size(h, filter_h, stride, pad, what="col2im (height)")
    out_w = conv_output_size(w, filter_w, stride, pad, what="col2im (width)")
    expected = (n * out_h * out_w, c * filter_h * filter_w)
    if tuple(col.shape) != expected:
        raise ShapeError(f"col2im: expected col of shape {expected} for input {tuple(input_shape)}, "
                         f"got {tuple(col.shape)}")
    xp = namespace_of(col)
    col_per_image = xp.matrix_transpose(xp.reshape(col, (n, out_h * out_w, c * filter_h * filter_w)))
    return col2im_nchw(col_per_image, (n, c, h, w), filter_h, filter_w, stride, pad, out_h, out_w)
