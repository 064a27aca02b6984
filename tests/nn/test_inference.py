"""Batched inference: an image's probabilities do not depend on the images batched with it
(what ``xpcnn serve`` relies on to gather requests into one forward pass, and what makes
``xpcnn predict a.png`` and ``xpcnn predict a.png b.png`` agree bit for bit)."""

import numpy as np

from xpcnn import SimpleConvNet
from xpcnn.nn.inference import predict_proba


def test_an_images_probabilities_do_not_depend_on_its_batch(rng):
    # On OpenBLAS a row of a matrix product depends on its place in the batch (a batch of 1 takes
    # another kernel; rows of an edge tile are summed differently): up to 6e-7 on these models.
    net = SimpleConvNet((1, 28, 28), weight_init_std=0.1, seed=0)
    x = rng.random((45, 1, 28, 28), dtype=np.float32)
    alone = np.concatenate([net.backend.to_numpy(predict_proba(net, x[i:i + 1])) for i in range(x.shape[0])])
    for batch_size in (2, 3, 7, 16, 45, 100):
        np.testing.assert_array_equal(net.backend.to_numpy(predict_proba(net, x, batch_size)), alone,
                                      err_msg=f"batch_size {batch_size}")
    order = rng.permutation(x.shape[0])[:29]
    np.testing.assert_array_equal(net.backend.to_numpy(predict_proba(net, x[order], 64)), alone[order])


def test_padding_rows_never_reach_the_result():
    net = SimpleConvNet((1, 28, 28), weight_init_std=0.1, seed=0)
    for n in (1, 15, 16, 17):
        assert net.backend.to_numpy(predict_proba(net, np.zeros((n, 1, 28, 28), np.float32), 500)).shape == (n, 10)
