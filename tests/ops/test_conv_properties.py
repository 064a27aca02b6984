"""Property tests (hypothesis) of convolution and max pooling over random geometries (stride
1-3, pad 0-2, windows 1-4, outputs 1-4 pixels a side): forward against the loop references,
and backward against a directional central difference. im2col/col2im adjointness over the same
geometries, on every backend: `test_functions_and_geometry.py`."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from xpcnn.nn.layers import Convolution, Pooling

from helpers import (
    SEEDS,
    conv_geometries,
    directional_derivatives,
    naive_conv,
    naive_maxpool,
    pool_geometries,
    tie_free,
)

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _convolution_case(geometry, seed):
    """A float64 input, filters and biases of `geometry`, and the layer over them."""
    n, c, h, w, fn, fh, fw, stride, pad = geometry
    rng = np.random.default_rng(seed)
    x, W, b = rng.standard_normal((n, c, h, w)), rng.standard_normal((fn, c, fh, fw)), rng.standard_normal(fn)
    return rng, x, W, b, Convolution(W, b, stride, pad)


@PROPERTY_SETTINGS
@given(geometry=conv_geometries(), seed=SEEDS)
def test_property_convolution_equals_loop(geometry, seed):
    _, x, W, b, layer = _convolution_case(geometry, seed)
    np.testing.assert_allclose(layer.forward(x), naive_conv(x, W, b, layer.stride, layer.pad), rtol=1e-10, atol=1e-10)


@PROPERTY_SETTINGS
@given(geometry=pool_geometries(), seed=SEEDS)
def test_property_pooling_equals_loop_max(geometry, seed):
    n, c, h, w, ph, pw, stride, pad = geometry
    x = tie_free(np.random.default_rng(seed), (n, c, h, w))
    out = Pooling(ph, pw, stride, pad).forward(x)
    np.testing.assert_array_equal(out, naive_maxpool(x, ph, pw, stride, pad))


@PROPERTY_SETTINGS
@given(geometry=conv_geometries(), seed=SEEDS)
def test_property_convolution_gradient_directional(geometry, seed):
    rng, x, W, b, layer = _convolution_case(geometry, seed)
    weights = rng.standard_normal(layer.forward(x).shape)   # loss = sum(out * weights)
    dx = layer.backward(weights)
    grads = [dx, layer.dW, layer.db]
    directions = [rng.standard_normal(a.shape) for a in (x, W, b)]
    analytic, numeric = directional_derivatives(lambda: float(np.sum(layer.forward(x) * weights)), grads, [x, W, b],
                                                directions)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-6)


@PROPERTY_SETTINGS
@given(geometry=pool_geometries(), seed=SEEDS)
def test_property_pooling_gradient_directional(geometry, seed):
    n, c, h, w, ph, pw, stride, pad = geometry
    rng = np.random.default_rng(seed)
    x = tie_free(rng, (n, c, h, w))          # values at least 4/size apart: h cannot flip a max
    layer = Pooling(ph, pw, stride, pad)
    weights = rng.standard_normal(layer.forward(x).shape)
    dx = layer.backward(weights)
    direction = rng.standard_normal(x.shape)
    analytic, numeric = directional_derivatives(lambda: float(np.sum(layer.forward(x) * weights)), [dx], [x],
                                                [direction], h=1e-7)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-6)
