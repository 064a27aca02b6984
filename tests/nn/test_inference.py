"""Batched inference: an image's probabilities do not depend on the images batched with it
(what ``xpcnn serve`` relies on to gather requests into one forward pass, and what makes
``xpcnn predict a.png`` and ``xpcnn predict a.png b.png`` agree bit for bit)."""

import numpy as np

from xpcnn import MultiLayerNetExtend, SimpleConvNet
from xpcnn.nn.inference import predict_proba

from helpers import unavailable


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


# ------------------------------------------------------------------ every backend, ndonnx included

def _small_nets(backend="cpu"):
    """A 3-channel convolution with padding (the whole-batch im2col layout and a padded buffer),
    a 1-channel one (the per-image layout), and the fully connected net with BatchNorm and Dropout."""
    return {
        "conv-3-channels": SimpleConvNet((3, 8, 8), {"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1},
                                         hidden_size=8, output_size=5, weight_init_std=0.3, backend=backend, seed=0),
        "conv-1-channel": SimpleConvNet((1, 8, 8), {"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1},
                                        hidden_size=8, output_size=5, weight_init_std=0.3, backend=backend, seed=1),
        "mlp-batchnorm-dropout": MultiLayerNetExtend(64, [12, 12], 5, use_batchnorm=True, use_dropout=True,
                                                     dropout_ration=0.3, backend=backend, seed=2),
    }


def test_predict_proba_agrees_on_every_backend(inference_backend, rng):
    # ndonnx computes each operation of constant arrays as it is recorded: the same layer code,
    # the batch padded to 16 rows as on any backend.
    x = rng.random((19, 3, 8, 8), dtype=np.float32)
    for (name, net), reference in zip(_small_nets(inference_backend).items(), _small_nets().values()):
        images = x if name == "conv-3-channels" else x[:, :1]
        got = inference_backend.to_numpy(predict_proba(net, images, batch_size=16))
        np.testing.assert_allclose(got, reference.backend.to_numpy(predict_proba(reference, images)), rtol=0,
                                   atol=1e-6, err_msg=name)


def test_the_forward_code_traced_on_ndonnx_takes_any_batch(rng):
    """The reference forward pass on an ndonnx argument with a dynamic batch ("N") writes an ONNX
    graph that ONNX Runtime runs on any batch size: no reshape or buffer spells out the batch."""
    try:
        import ndonnx
        import onnxruntime
    except ImportError as exc:
        unavailable(f"ndonnx or ONNX Runtime is not installed ({exc}): pip install 'xpcnn[export]'")
    from xpcnn.ops.functions import softmax

    for (name, net), reference in zip(_small_nets("ndonnx").items(), _small_nets().values()):
        shape = (3, 8, 8) if name == "conv-3-channels" else (1, 8, 8)
        images = ndonnx.argument(shape=("N", *shape), dtype=ndonnx.float32)
        model = ndonnx.build({"images": images}, {"probabilities": softmax(net.predict(images))})
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        for n in (1, 5, 37):
            x = rng.random((n, *shape), dtype=np.float32)
            got = session.run(None, {"images": x})[0]
            np.testing.assert_allclose(got, reference.backend.to_numpy(predict_proba(reference, x)), rtol=0,
                                       atol=1e-6, err_msg=f"{name}, batch {n}")
