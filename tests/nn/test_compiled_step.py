"""`Network.compile_step` where CUDA graphs are not to be had: one-line errors, before any work.

The capture and replay themselves are checked on the emulated GPU (tests/ops/test_cuda_graphs.py).
"""

import numpy as np
import pytest

from xpcnn import AdaGrad, SimpleConvNet, Trainer
from xpcnn.errors import ConfigError
from xpcnn.nn.compiled_step import check_graph_support, graph_support


def test_numpy_has_no_cuda_graphs_and_says_so():
    net = SimpleConvNet(input_dim=(1, 12, 12), seed=0)
    assert graph_support(net.xp) is None
    words = r"need --backend gpu without --reference, got backend numpy \(cpu\)"
    with pytest.raises(ConfigError, match=words) as caught:
        net.compile_step(AdaGrad())
    assert "\n" not in str(caught.value)


def test_the_reference_path_is_refused_for_its_cublas_calls():
    net = SimpleConvNet(input_dim=(1, 12, 12), seed=0, reference=True)
    with pytest.raises(ConfigError, match="--reference runs the array-API reference code, which calls cuBLAS"):
        check_graph_support(net.backend)


@pytest.mark.parametrize("on_nan, words", [("skip", "on_nan='skip'"), ("stop", "--backend gpu")])
def test_the_trainer_refuses_cuda_graph_where_it_cannot_replay(on_nan, words):
    x, t = np.zeros((4, 1, 12, 12), np.float32), np.zeros(4, np.int64)
    with pytest.raises(ConfigError, match=words):
        Trainer(SimpleConvNet(input_dim=(1, 12, 12), seed=0), x, t, x, t, mini_batch_size=2, verbose=False,
                on_nan=on_nan, cuda_graph=True)
