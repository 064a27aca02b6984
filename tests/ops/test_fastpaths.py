"""The faster internal paths against loop references and the plain paths they replace.

* `im2col_nchw`/`col2im_nchw` (per-image transposed layout used by `Convolution`) and the
  public book-layout `im2col`/`col2im` against loops (`helpers.naive_im2col`, `naive_col2im`);
* the pooling reference's path for windows that tile the input (2x2 stride 2) and its
  general strided-slice path, forward and backward, ties included, against loops;
* `ReLU`'s mask derived from its output against ``x > 0``.

Each runs on every available backend (NumPy, array_api_strict, CuPy).
"""

import numpy as np
import pytest

from xpcnn.nn.layers import ReLU
from xpcnn.ops import ops_for
from xpcnn.ops import reference as ops_module
from xpcnn.ops.geometry import col2im, col2im_nchw, conv_output_size, im2col, im2col_nchw

from helpers import naive_col2im, naive_im2col, naive_maxpool, naive_maxpool_backward

GEOMETRIES = [  # (N, C, H, W, FH, FW, stride, pad)
    (2, 1, 7, 7, 3, 3, 1, 0),
    (3, 2, 8, 6, 3, 2, 1, 1),
    (2, 3, 9, 9, 3, 3, 2, 1),
    (1, 2, 5, 5, 5, 5, 1, 2),
]


def _per_image_to_book(col_nchw: np.ndarray) -> np.ndarray:
    """(N, C*FH*FW, OH*OW) -> the book's (N*OH*OW, C*FH*FW)."""
    n, k, p = col_nchw.shape
    return col_nchw.transpose(0, 2, 1).reshape(n * p, k)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_im2col_nchw_is_the_book_matrix_per_image(backend, rng, geometry):
    n, c, h, w, fh, fw, stride, pad = geometry
    oh, ow = conv_output_size(h, fh, stride, pad), conv_output_size(w, fw, stride, pad)
    x = backend.asarray(rng.standard_normal((n, c, h, w)), "float64")
    fast = backend.to_numpy(im2col_nchw(x, fh, fw, stride, pad, oh, ow))
    assert fast.shape == (n, c * fh * fw, oh * ow)
    x_host = backend.to_numpy(x)
    expected = naive_im2col(x_host, fh, fw, stride, pad)
    np.testing.assert_array_equal(_per_image_to_book(fast), expected)
    np.testing.assert_array_equal(backend.to_numpy(im2col(x, fh, fw, stride, pad)), expected)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_col2im_nchw_matches_book_col2im(backend, rng, geometry):
    n, c, h, w, fh, fw, stride, pad = geometry
    oh, ow = conv_output_size(h, fh, stride, pad), conv_output_size(w, fw, stride, pad)
    col_host = rng.standard_normal((n, c * fh * fw, oh * ow))
    fast = col2im_nchw(backend.asarray(col_host, "float64"), (n, c, h, w), fh, fw, stride, pad, oh, ow)
    book = col2im(backend.asarray(_per_image_to_book(col_host), "float64"), (n, c, h, w), fh, fw, stride, pad)
    expected = naive_col2im(_per_image_to_book(col_host), (n, c, h, w), fh, fw, stride, pad)
    np.testing.assert_allclose(backend.to_numpy(fast), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(book), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,size", [((2, 3, 8, 6), 2), ((3, 2, 9, 6), 3), ((1, 4, 4, 4), 4)])
@pytest.mark.parametrize("with_ties", [False, True])
def test_tiling_pooling_matches_general_path(backend, rng, monkeypatch, shape, size, with_ties):
    x_host = rng.standard_normal(shape)
    if with_ties:
        # As after a ReLU: many windows hold several equal maxima (zeros), some all zero.
        x_host = np.maximum(x_host, 0.0)
        x_host[..., ::2, :] = np.round(x_host[..., ::2, :])
    assert ops_module.pool_tiles(shape, size, size, size, 0)
    ops = ops_for(backend.xp, reference=True)
    x = backend.asarray(x_host, "float32")
    dout = backend.asarray(rng.standard_normal((shape[0], shape[1], shape[2] // size, shape[3] // size)), "float32")
    out_h, out_w = shape[2] // size, shape[3] // size

    def forward_backward():
        out, cache = ops.maxpool2d_forward(x, size, size, size, 0, out_h, out_w)
        return backend.to_numpy(out), backend.to_numpy(ops.maxpool2d_backward(dout, cache))

    out_fast, dx_fast = forward_backward()
    monkeypatch.setattr(ops_module, "pool_tiles", lambda *args: False)   # the general strided-slice path
    out_general, dx_general = forward_backward()
    dout_host = backend.to_numpy(dout)
    x_loops = backend.to_numpy(x)
    np.testing.assert_array_equal(out_fast, naive_maxpool(x_loops, size, size, size, 0))
    np.testing.assert_array_equal(out_general, naive_maxpool(x_loops, size, size, size, 0))
    expected_dx = naive_maxpool_backward(x_loops, dout_host, size, size, size, 0)
    np.testing.assert_array_equal(dx_fast, expected_dx)
    np.testing.assert_array_equal(dx_general, expected_dx)
    # Each window passes its whole gradient on, to exactly one pixel (the first max).
    nonzero = (dx_fast != 0).reshape(shape[0], shape[1], shape[2] // size, size, shape[3] // size, size)
    assert nonzero.sum(axis=(3, 5)).max() <= 1


def test_relu_mask_is_derived_from_output(backend, rng):
    x_host = rng.standard_normal((4, 5))
    x_host[0, :2] = 0.0
    layer = ReLU()
    layer.forward(backend.asarray(x_host, "float32"))
    np.testing.assert_array_equal(backend.to_numpy(layer.mask), x_host > 0)
    assert ReLU().mask is None
