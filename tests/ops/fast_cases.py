"""The cases every fast operation is checked on against its reference: one set, run by
tests/ops/test_fast_ops.py on each fast backend (NumPy, CuPy on a GPU, CuPy through the CPU
emulation) and by the mutation controls of tests/ops/test_cuda_kernels.py."""

#: Largest relative difference from the reference allowed per dtype.
TOL = {"float64": 1e-12, "float32": 1e-5}

CONV_GEOMETRIES = [  # (N, C, H, W, FN, FH, FW, stride, pad)
    (3, 1, 28, 28, 30, 5, 5, 1, 0),
    (2, 3, 9, 7, 4, 3, 2, 2, 1),
    (1, 2, 8, 8, 5, 3, 3, 1, 2),
    (2, 16, 14, 14, 32, 3, 3, 1, 1),
    (1, 4, 11, 6, 3, 5, 3, 2, 2),
    (7, 16, 28, 28, 16, 3, 3, 1, 1),   # several chunks on NumPy, the last one short
    (2, 32, 14, 14, 32, 3, 3, 1, 2),   # DeepConvNet's fourth convolution
    (2, 3, 6, 6, 2, 3, 3, 1, 3),       # pad >= filter: the input gradient by col2im
    (3, 1, 28, 28, 16, 3, 3, 1, 1),    # DeepConvNet's first convolution
    (5, 64, 7, 7, 64, 3, 3, 1, 1),     # its sixth: odd sizes, an uneven cut into slices
    (1, 16, 13, 11, 8, 3, 3, 1, 2),    # N = 1, odd sizes, pad 2
    (2, 3, 8, 7, 4, 3, 2, 1, 1),       # stride 1, a filter wider than tall: the input gradient's
    (2, 3, 7, 8, 4, 2, 3, 1, 1),       # padding differs along the two axes (1 and 0, 0 and 1)
    (2, 8, 9, 10, 6, 3, 3, 1, 0),      # Winograd (compiled kernels) without padding, a 7x8 output: half tiles
]
#: Convolution, ReLU and a square max pooling (fused): (N, C, H, W, FN, FH, FW, stride, pad, pool size);
#: the pooling's stride is its size.
CONV_RELU_POOL_GEOMETRIES = [
    (3, 1, 28, 28, 30, 5, 5, 1, 0, 2),   # SimpleConvNet
    (2, 1, 12, 12, 4, 3, 3, 1, 1, 2),    # one channel, padded
    (2, 1, 10, 10, 3, 5, 5, 1, 1, 2),    # one channel, 5x5, padded, an odd filter (a pair and a single one)
    (3, 1, 16, 12, 5, 3, 3, 2, 1, 2),    # stride 2, not square
    (2, 1, 10, 10, 3, 5, 5, 1, 1, 4),    # a 4x4 pooling
    (1, 1, 11, 9, 3, 3, 2, 2, 1, 2),     # output 6x5: the pooling does not tile it
    (2, 16, 14, 14, 16, 3, 3, 1, 1, 2),  # DeepConvNet's second convolution
    (2, 3, 9, 7, 4, 3, 2, 2, 1, 1),      # 1x1 pooling
    (3, 8, 10, 10, 6, 3, 3, 1, 2, 2),    # Winograd's pooled tiles: pad 2 (as DeepConvNet's fourth), 3 images
    (2, 4, 10, 8, 5, 3, 3, 1, 0, 2),     # ... and pad 0, not square
    (2, 8, 7, 7, 6, 3, 3, 1, 1, 2),      # output 7x7 to 3x3: Winograd's tiles skip the last row and column
    (3, 4, 9, 6, 5, 3, 3, 1, 1, 2),      # ... odd down, even across
]
POOL_GEOMETRIES = [  # (N, C, H, W, PH, PW, stride, pad)
    (2, 3, 24, 24, 2, 2, 2, 0),
    (1, 2, 9, 7, 3, 2, 2, 1),
    (2, 1, 8, 8, 3, 3, 1, 1),
    (1, 4, 7, 9, 2, 3, 1, 0),
    (3, 2, 5, 5, 1, 1, 1, 0),          # one-pixel windows: they tile too
]
#: Rows of the softmax-CE and scoring cases: one, fewer and more than a block's 256 threads,
#: many blocks, and more than 256 blocks (65,536 rows): there each thread of the second stage
#: of CuPy's row reductions (`xpcnn_sum_blocks`, 256 threads) adds several blocks' sums.
SCORE_ROWS = (1, 100, 1000, 10000, 70000)
#: (M, K, N) of the matrix products checked against NumPy (CuPy's product kernel): one element,
#: odd sizes, SimpleConvNet's hidden layer at batch 100 (a sum long enough to be cut into parts)
#: and the im2col shape of its convolution at batch 100 (many tiles).
PRODUCT_SHAPES = [(1, 1, 1), (7, 13, 7), (100, 4320, 100), (57600, 25, 30)]
#: (name, hyperparameters) of each optimizer update.
OPTIMIZER_CASES = [("sgd_update", (0.1,)), ("momentum_update", (0.1, 0.9)), ("adagrad_update", (0.06, 1e-7)),
                   ("adam_update", (0.001, 0.9, 0.999, 1e-8))]

#: How the optimizer state starts: |randn| (a state already under way) and zeros (the real
#: start: there Adam's ``v`` is ``(1 - beta2) * grad**2``, so a ``1 - beta2`` computed in float32
#: from the rounded 0.999f shows as a 1.3e-5 relative error).
OPTIMIZER_STATE_STARTS = ("abs-randn", "zeros")


def out_size(size: int, filt: int, stride: int, pad: int) -> int:
    """Output extent of a window of `filt` sliding by `stride` over `size` padded by `pad`."""
    return (size + 2 * pad - filt) // stride + 1
