"""The training step replayed as a CUDA graph (`Network.compile_step`, xpcnn/nn/compiled_step.py),
checked without a GPU on the emulated GPU (tests/ops/emulation/device.py, docs/cuda-emulation.md).

- CuPy's capture rules hold in the emulation: during a capture, cuBLAS, transfers between host
  and device, reads of device values, synchronisation and allocations from the memory pool raise
  and invalidate the capture (each rule beside its control outside a capture); a capture runs
  nothing until its graph is launched.
- The whole step of SimpleConvNet and DeepConvNet captures, and a replayed step equals the eager
  one bit for bit for 50 steps with SGD, Momentum, AdaGrad and Adam (DeepConvNet's Dropout masks
  drawn by the device generator inside the graph).
- Mutation controls: a cuBLAS call, a read of a device value or an allocation outside the warmed
  buffers slipped into fast_cupy.py fails the capture; Adam's step size not fed to the graph
  breaks bit-identity.
- Batches of other shapes, settings changed under a graph, the Trainer, out of memory, and the
  calls a replayed step costs.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from xpcnn import SGD, AdaGrad, Adam, DeepConvNet, Momentum, MultiLayerNetExtend, SimpleConvNet, Trainer
from xpcnn.backend.counting import count_calls
from xpcnn.errors import DeviceMemoryError
from xpcnn.nn import compiled_step

from emulation import device, emulator

OPTIMIZERS = {"sgd": lambda: SGD(lr=0.1), "momentum": lambda: Momentum(lr=0.05), "adagrad": lambda: AdaGrad(lr=0.06),
              "adam": lambda: Adam(lr=0.003)}
COMPILED_STEP = Path(compiled_step.__file__)


def _net(model: str, backend, seed: int = 3):
    """12x12 images keep the emulated steps quick; DeepConvNet keeps every kind of layer (and Dropout)."""
    cls = SimpleConvNet if model == "simple" else DeepConvNet
    return cls(input_dim=(1, 12, 12), backend=backend, seed=seed)


def _batches(steps: int, sizes: tuple = (8,), seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    x, t = rng.random((64, 1, 12, 12)), rng.integers(0, 10, 64)
    picks = [rng.choice(64, sizes[i % len(sizes)], replace=False) for i in range(steps)]
    return [(x[p], t[p]) for p in picks]


def _train(backend, model: str, optimizer: str, batches: list, compiled: bool, step_class=None,
           between=None) -> types.SimpleNamespace:
    """Train on `batches` eagerly or through a compiled step; what came out, on the host.
    `between(i, optimizer)` runs before step i (a change of settings, the same in both runs)."""
    net, opt = _net(model, backend), OPTIMIZERS[optimizer]()
    step = (step_class or compiled_step.CompiledStep)(net, opt) if compiled else None
    losses = []
    for i, (x_host, t_host) in enumerate(batches):
        if between is not None:
            between(i, opt)
        x, t = backend.asarray(x_host, "float32"), backend.asarray(t_host)
        if compiled:
            losses.append(step(x, t))
        else:
            opt.update(net.params, net.gradient(x, t))
            losses.append(net.last_layer.loss)
    return types.SimpleNamespace(
        params=backend.to_numpy(net.params.flat), losses=backend.to_numpy(backend.xp.stack(losses)),
        state={k: backend.to_numpy(v) for k, v in opt.state_dict().items() if k != "iterations"},
        iterations=opt.iterations, draws=None if net.rng is None else net.rng.draws,
        replays=step.replays if compiled else 0)


def _assert_identical(replayed, eager) -> None:
    np.testing.assert_array_equal(replayed.losses, eager.losses)
    np.testing.assert_array_equal(replayed.params, eager.params)
    assert replayed.state.keys() == eager.state.keys()
    for key in eager.state:
        np.testing.assert_array_equal(replayed.state[key], eager.state[key], err_msg=key)
    assert (replayed.iterations, replayed.draws) == (eager.iterations, eager.draws)


# ------------------------------------------------------------------- CuPy's capture rules

def _refused_calls(cp, a) -> dict:
    """name: (what the step might do with device array `a`, the error CuPy raises in a capture, its words)."""
    host = np.ones(a.shape, dtype=a.dtype)
    return {
        "matmul (cuBLAS)": (lambda: cp.matmul(a, a), NotImplementedError, "cuBLAS"),
        "tensordot (cuBLAS)": (lambda: cp.tensordot(a, a, axes=1), NotImplementedError, "cuBLAS"),
        "@ (cuBLAS)": (lambda: a @ a, NotImplementedError, "cuBLAS"),
        "get()": (lambda: a.get(), RuntimeError, "D2H transfers are disallowed"),
        "asnumpy": (lambda: cp.asnumpy(a), RuntimeError, "D2H transfers are disallowed"),
        "float()": (lambda: float(a[0, 0]), RuntimeError, "D2H transfers are disallowed"),
        "int()": (lambda: int(a[0, 0]), RuntimeError, "D2H transfers are disallowed"),
        "bool()": (lambda: bool(a[0, 0]), RuntimeError, "D2H transfers are disallowed"),
        "item()": (lambda: a[0, 0].item(), RuntimeError, "D2H transfers are disallowed"),
        "numpy.asarray": (lambda: np.asarray(a), RuntimeError, "D2H transfers are disallowed"),
        "asarray of host data": (lambda: cp.asarray(host), RuntimeError, "H2D transfers are disallowed"),
        "store of host data": (lambda: a.__setitem__(Ellipsis, host), RuntimeError, "H2D transfers are disallowed"),
        "synchronize": (lambda: cp.cuda.get_current_stream().synchronize(), device.CUDARuntimeError,
                        "not permitted when stream is capturing"),
        "allocation from the pool": (lambda: cp.empty(a.shape, dtype=a.dtype), device.CUDARuntimeError,
                                     "allocation of 64 bytes from the memory pool during capture"),
    }


REFUSED = sorted(_refused_calls(types.SimpleNamespace(), np.zeros((4, 4), np.float32)))


@pytest.mark.parametrize("call", REFUSED)
def test_what_cupy_refuses_during_a_capture_raises_there_only(emulated_fast_cupy, call):
    cp = emulated_fast_cupy.cupy
    a = cp.asarray(np.arange(16, dtype=np.float32).reshape(4, 4))
    action, error, words = _refused_calls(cp, a)[call]
    action()                                           # the control: outside a capture it is fine
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(error, match=words):
            action()
        with pytest.raises(device.CUDARuntimeError, match="invalidated"):
            stream.end_capture()                       # the error invalidated the capture, as in CUDA
    assert device.open_captures() == 0


def test_a_capture_runs_nothing_until_its_graph_is_launched(emulated_fast_cupy):
    cp = emulated_fast_cupy.cupy
    a = cp.asarray(np.zeros(3, np.float32))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        a += 1
        graph = stream.end_capture()
    assert a.get().tolist() == [0, 0, 0]
    graph.launch()
    graph.launch()
    assert a.get().tolist() == [2, 2, 2]


def test_warmed_buffers_serve_the_recorded_allocations_and_nothing_else(emulated_fast_cupy):
    """What a captured step may allocate: the recorded sizes, in order (an extra or a missing
    allocation is an error, never a silent reuse)."""
    cp, graphs = emulated_fast_cupy.cupy, emulated_fast_cupy.cuda_graphs()
    buffers = graphs.WarmedBuffers()
    with buffers.recording():
        first, second = cp.empty(10, dtype=np.float32), cp.empty(3, dtype=np.float64)
    graph, (again, twice) = graphs.capture(lambda: (cp.empty(10, dtype=np.float32), cp.empty(3, dtype=np.float64)),
                                           buffers)
    assert np.shares_memory(again._data, first._data) and np.shares_memory(twice._data, second._data)
    with pytest.raises(RuntimeError, match="asked for 32 bytes at its allocation 2, where the recorded step made 24"):
        graphs.capture(lambda: [cp.empty(10, dtype=np.float32), cp.empty(4, dtype=np.float64)], buffers)
    with pytest.raises(RuntimeError, match="asked for 8 bytes at its allocation 3"):
        graphs.capture(lambda: [cp.empty(10, dtype=np.float32), cp.empty(3, dtype=np.float64),
                                cp.empty(2, dtype=np.float32)], buffers)
    with pytest.raises(RuntimeError, match="made 1 of the 2 allocations"):
        graphs.capture(lambda: cp.empty(10, dtype=np.float32), buffers)
    assert device.open_captures() == 0


# ----------------------------------------------------------------- replay = eager, bit for bit

@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("model", ["simple", pytest.param("deep", marks=pytest.mark.slow)])
def test_a_replayed_step_equals_the_eager_step_for_50_steps(emulated_gpu, model, optimizer):
    """The step captures (nothing in it CuPy would refuse), and 48 replays (after the eager
    step and the recorded one) give the eager run's losses, weights, optimizer state, step count
    and Dropout draws bit for bit."""
    batches = _batches(50)
    eager = _train(emulated_gpu, model, optimizer, batches, compiled=False)
    replayed = _train(emulated_gpu, model, optimizer, batches, compiled=True)
    assert replayed.replays == 48
    _assert_identical(replayed, eager)


def test_deepconvnet_replays_its_dropout_masks_from_the_device_generator(emulated_gpu):
    """The quick version of the slow DeepConvNet cases: Dropout draws inside the graph, so each
    replay gets new masks, the eager run's."""
    batches = _batches(6)
    eager = _train(emulated_gpu, "deep", "adam", batches, compiled=False)
    replayed = _train(emulated_gpu, "deep", "adam", batches, compiled=True)
    assert replayed.replays == 4 and replayed.draws == eager.draws == 12
    _assert_identical(replayed, eager)


def test_the_books_mlp_with_batchnorm_dropout_and_weight_decay_replays_exactly(emulated_gpu):
    """Not only the convolutional networks: MultiLayerNetExtend's step (its BatchNorm and
    weight decay are array-API code, not table entries) captures too, running statistics included."""
    rng = np.random.default_rng(2)
    batches = [(rng.random((16, 36)), rng.integers(0, 10, 16)) for _ in range(8)]
    results = []
    for compiled in (False, True):
        net = MultiLayerNetExtend(36, [20, 15], 10, use_dropout=True, dropout_ratio=0.3, use_batchnorm=True,
                                  weight_decay_lambda=0.01, backend=emulated_gpu, seed=0)
        optimizer = Adam(lr=0.01)
        step = net.compile_step(optimizer)
        for x_host, t_host in batches:
            x, t = emulated_gpu.asarray(x_host, "float32"), emulated_gpu.asarray(t_host)
            step(x, t) if compiled else optimizer.update(net.params, net.gradient(x, t))
        results.append([emulated_gpu.to_numpy(a) for a in (net.params.flat, *net.buffers().values())])
    assert step.replays == 6
    for replayed, eager in zip(results[1], results[0]):
        np.testing.assert_array_equal(replayed, eager)


def test_each_batch_shape_gets_a_graph_and_a_further_shape_runs_eagerly(emulated_gpu, monkeypatch):
    batches = _batches(12, sizes=(8, 5))
    eager = _train(emulated_gpu, "simple", "adam", batches, compiled=False)
    replayed = _train(emulated_gpu, "simple", "adam", batches, compiled=True)
    assert replayed.replays == 12 - 2 * 2               # two shapes, each two calls before its graph
    _assert_identical(replayed, eager)
    monkeypatch.setattr(compiled_step, "MAX_GRAPHS", 1)
    capped = _train(emulated_gpu, "simple", "adam", batches, compiled=True)
    assert capped.replays == 6 - 2                       # the batches of 5 run eagerly
    _assert_identical(capped, eager)


def test_settings_or_state_changed_under_a_graph_are_captured_again(emulated_gpu):
    def change(i, optimizer):
        if i == 6:
            optimizer.lr *= 0.5                          # a graph keeps the learning rate it was captured with
        if i == 12:
            optimizer.load_state_dict(optimizer.state_dict())    # new state buffers (as a resume makes)

    batches = _batches(18)
    eager = _train(emulated_gpu, "simple", "momentum", batches, compiled=False, between=change)
    replayed = _train(emulated_gpu, "simple", "momentum", batches, compiled=True, between=change)
    _assert_identical(replayed, eager)
    assert replayed.replays == 3 * (6 - 2)


# ------------------------------------------------------------------------ mutation controls

def _mutated(text: str, anchor: str, old: str, new: str) -> str:
    at = text.find(old, text.index(anchor))
    assert at >= 0, f"the mutation no longer applies: {old!r} after {anchor!r}"
    return text[:at] + new + text[at + len(old):]


#: name: (anchor, text, replacement in fast_cupy.py, the error the capture raises, its words)
CAPTURE_MUTATIONS = {
    "cublas-call-in-the-step": (
        "def _affine(", "    (n, features), (_, units) = x.shape, W.shape\n",
        "    (n, features), (_, units) = x.shape, W.shape\n    cupy.matmul(x, W)\n", NotImplementedError, "cuBLAS"),
    "get-in-the-step": (
        "def softmax_cross_entropy_forward(", "    n, k = scores.shape\n",
        "    n, k = scores.shape\n    t.get()\n", RuntimeError, "D2H transfers are disallowed"),
    "scalar-read-in-the-step": (
        "def _conv_backward(", "    dout = cupy.ascontiguousarray(dout)\n",
        "    dout = cupy.ascontiguousarray(dout)\n    assert bool(dout.sum() == dout.sum()), 'NaN'\n", RuntimeError,
        "D2H transfers are disallowed"),
    "allocation-outside-the-warmed-buffers": (
        "def capture_graph(", "            with buffers.serving():\n                result = step()",
        "            result = step()", device.CUDARuntimeError, "from the memory pool during capture"),
}


@pytest.mark.parametrize("mutation", sorted(CAPTURE_MUTATIONS))
def test_a_call_cupy_refuses_slipped_into_the_step_fails_the_capture(emulation_runner, mutation):
    anchor, old, new, error, words = CAPTURE_MUTATIONS[mutation]
    module = emulator.load_fast_cupy(emulator.StandInCupy(emulation_runner),
                                     _mutated(emulator.FAST_CUPY.read_text(), anchor, old, new))
    with emulator.use_emulated_device(module) as backend:
        net, optimizer = _net("simple", backend), AdaGrad(lr=0.06)
        step = net.compile_step(optimizer)
        x, t = backend.asarray(_batches(1)[0][0], "float32"), backend.asarray(_batches(1)[0][1])
        step(x, t)                                     # eager: allowed (slow, but legal)
        with pytest.raises(error, match=words):
            step(x, t)                                 # recorded, then captured: refused
        assert device.open_captures() == 0              # the capture was ended


def test_adam_step_size_not_fed_to_the_graph_breaks_bit_identity(emulated_gpu):
    """The control for the replay tests: a graph keeps the step size it was captured with unless
    each step's is written to the device before the launch."""
    text = _mutated(COMPILED_STEP.read_text(), "def _replay(", "            shape.slots[name][...] = value",
                    "            pass")
    mutated = types.ModuleType("xpcnn.nn._compiled_step_mutated")
    mutated.__package__ = "xpcnn.nn"
    exec(compile(text, str(COMPILED_STEP), "exec"), mutated.__dict__)
    mutated.graph_support = compiled_step.graph_support          # the emulated device's graphs
    batches = _batches(8)
    eager = _train(emulated_gpu, "simple", "adam", batches, compiled=False)
    replayed = _train(emulated_gpu, "simple", "adam", batches, compiled=True, step_class=mutated.CompiledStep)
    assert replayed.replays == 6
    assert not np.array_equal(replayed.params, eager.params)
    np.testing.assert_array_equal(replayed.losses[:3], eager.losses[:3])


# -------------------------------------------------------------------------- in a training run

def _trainer(backend, cuda_graph: bool, epochs: int = 3, **kwargs) -> Trainer:
    rng = np.random.default_rng(5)
    x, t = rng.random((70, 1, 12, 12)).astype(np.float32), rng.integers(0, 10, 70)
    return Trainer(_net("simple", backend), x, t, x[:20], t[:20], epochs=epochs, mini_batch_size=16,
                   optimizer="adam", optimizer_param={"lr": 0.003}, verbose=False, seed=0, log_every=3,
                   cuda_graph=cuda_graph, **kwargs)


def test_the_trainer_with_cuda_graph_trains_exactly_as_without(emulated_gpu):
    """70 images in batches of 16: the last batch of each epoch (6 images) gets its own graph."""
    plain, graphed = _trainer(emulated_gpu, False), _trainer(emulated_gpu, True)
    plain.train()
    graphed.train()
    assert graphed._compiled_step.replays == 3 * 5 - 2 * 2
    assert graphed.history.step_loss == plain.history.step_loss
    assert graphed.history.test_acc == plain.history.test_acc
    np.testing.assert_array_equal(emulated_gpu.to_numpy(graphed.network.params.flat),
                                  emulated_gpu.to_numpy(plain.network.params.flat))


@pytest.mark.parametrize("where", ["recording the buffers", "capturing"])
def test_out_of_memory_around_the_capture_is_the_usual_one_line_error(emulated_gpu, emulated_fast_cupy, monkeypatch,
                                                                      where):
    def out_of_memory(self, size):
        raise device.OutOfMemoryError(f"Out of memory allocating {size:,} bytes (allocated so far: 0 bytes).")

    monkeypatch.setattr(emulated_fast_cupy.WarmedBuffers, "_record" if where == "recording the buffers" else "_serve",
                        out_of_memory)
    trainer = _trainer(emulated_gpu, True, epochs=1)
    with pytest.raises(DeviceMemoryError) as caught:
        trainer.train()
    message = str(caught.value)
    assert "\n" not in message and "while training a batch of 16 images" in message
    assert "Out of memory allocating" in message and "lower mini_batch_size (--batch-size)" in message
    assert device.open_captures() == 0


# ----------------------------------------------------------------------------- calls per step

def test_a_replayed_step_costs_a_few_calls(emulated_gpu):
    """Per replay: the two copies of the batch into the captured inputs, Adam's step size written
    to the device, the graph's launch, the copy of the loss; against the eager step's launches."""
    x_host, t_host = _batches(1)[0]
    counts = {}
    for compiled in (False, True):
        net, optimizer = _net("simple", emulated_gpu), Adam(lr=0.003)
        step = net.compile_step(optimizer)
        x, t = emulated_gpu.asarray(x_host, "float32"), emulated_gpu.asarray(t_host)
        for _ in range(3):
            step(x, t) if compiled else optimizer.update(net.params, net.gradient(x, t))
        with count_calls() as counter:
            step(x, t) if compiled else optimizer.update(net.params, net.gradient(x, t))
        counts[compiled] = counter.calls
    print(f"SimpleConvNet step on the emulated GPU: {counts[False]} launches eagerly, {counts[True]} calls replayed")
    assert counts[True] == 5 < counts[False]


# ------------------------------------------------------------------------------- on a GPU

@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("model", ["simple", "deep"])
def test_on_a_gpu_a_replayed_step_equals_the_eager_step(gpu_backend, model, optimizer):
    """The emulated checks above, on a real GPU (skipped without one; scripts/gpu_check.sh runs
    it): CuPy captures the step, and 48 replays give the eager run's numbers bit for bit."""
    batches = _batches(50)
    eager = _train(gpu_backend, model, optimizer, batches, compiled=False)
    replayed = _train(gpu_backend, model, optimizer, batches, compiled=True)
    assert replayed.replays == 48
    _assert_identical(replayed, eager)
