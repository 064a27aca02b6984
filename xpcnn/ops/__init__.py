"""The operations a network computes, on any array-API namespace.

    geometry.py    output sizes, window offsets, padding, im2col/col2im (the book's and two
                   faster layouts)
    functions.py   the book's functions: softmax, one-hot, the label check, cross-entropy
    reference.py   the hot operations (convolution, pooling, ReLU, Affine, softmax with loss,
                   optimizer updates), written once against the array API
    fast_numpy.py  NumPy's faster convolution (channels-last, cache-sized chunks)
    fast_cupy.py   CuPy's kernels for the hot operations
    fused.py       the fused operations (a convolution with its ReLU and pooling, Affine with
                   its ReLU), defined on the table's own entries
    table.py       `Ops`, `ops_for`: one table per namespace, reference entries overridden by
                   the fast ones

Layers ask the table for an operation by name (``ops.conv2d_forward(...)``); they never ask
which backend they run on.
"""

from .functions import as_one_hot, check_labels, cross_entropy_error, host_class_labels, log_softmax, one_hot, softmax
from .geometry import check_rank, check_stride_pad, col2im, conv_output_size, im2col, spatial_slices, window_offsets
from .reference import store_gradient
from .table import OP_SIGNATURES, Ops, ops_for, ops_of

__all__ = [
    "as_one_hot", "check_labels", "cross_entropy_error", "host_class_labels", "log_softmax", "one_hot", "softmax",
    "check_rank", "check_stride_pad", "col2im", "conv_output_size", "im2col", "spatial_slices",
    "window_offsets", "store_gradient", "OP_SIGNATURES", "Ops", "ops_for", "ops_of",
]
