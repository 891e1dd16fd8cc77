"""Model engines: every backend available here agrees with the PyTorch reference on real face crops;
`auto` selection; TensorRT's absence is a clear error; ONNX Runtime INT8; the PyTorch engine's options.
(The engine cache: test_engine_cache.py; CPU quotas: test_cpus.py.)

Parity tolerance: 1e-4 on the fake probability (measured ~1e-7 for onnxruntime-cpu and 0 for the
PyTorch engine, both against the model called directly). The model is `mdcsd_tiny` with BatchNorm
statistics set from a batch and a scaled-up classifier (as tests/test_models.py does), so its
probabilities spread over the crops instead of all sitting at ~0.5.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort  # a dependency: a broken install fails here, never skips
import pytest
import torch
from calibrated import calibrate
from media import carphone_frames
from torch import nn

from worker.engine import ENGINES, Engine, load_engine, resolve_backend
from worker.engine.model_card import ModelCard, sha256_file
from worker.engine.onnx_engine import OnnxRuntimeEngine
from worker.engine.torch_engine import TorchEngine, graph_buckets
from worker.preprocess import crop_face, crops_to_tensor_layout

TOL = 1e-4
N_CROPS = 12
BATCH_SIZES = (1, 5, 8, 32)  # 12 crops: 5 → 5+5+2 and 8 → 8+4 end on a ragged batch; 32 > N

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def face_crops() -> np.ndarray:
    """12 real 299×299 face crops: RetinaFace's best face in every 10th carphone frame, cropped 1.3×."""
    from worker.faces import create_detector

    frames = carphone_frames()[::10][:N_CROPS]
    faces = create_detector().detect(np.stack(frames))
    assert all(faces), "the detector must find the face in every sampled frame"
    return np.stack([crop_face(f, fs[0].box) for f, fs in zip(frames, faces)])


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory, face_crops) -> tuple[nn.Module, Path]:
    """A calibrated mdcsd_tiny exported by training.export (weights.pt + model.onnx + card)."""
    from training.export import export_model_dir
    from training.models import create_model

    torch.manual_seed(0)
    x = torch.from_numpy(crops_to_tensor_layout(face_crops))
    model = calibrate(create_model("mdcsd_tiny"), torch.cat([x, torch.rand(6, 3, 299, 299)]))
    out = tmp_path_factory.mktemp("engines_model")
    card = export_model_dir(model, out, name="mdcsd-tiny-engines", version="0.0.0-test", trained=False,
                            parity_crops=face_crops[:5], training_data="none: test model")
    assert card.files.get("onnx")
    return model, out


@pytest.fixture(scope="module")
def reference(model_and_dir, face_crops) -> np.ndarray:
    """The PyTorch reference: the model called directly on all crops at once."""
    model, _ = model_and_dir
    with torch.no_grad():
        logits = model(torch.from_numpy(crops_to_tensor_layout(face_crops)))
    return torch.softmax(logits, dim=1)[:, 1].numpy()


def available_engines() -> list[str]:
    names = ["pytorch", "onnxruntime"]
    try:
        from worker.engine.tensorrt_engine import tensorrt_available

        if tensorrt_available():
            names.append("tensorrt")
    except Exception:
        pass
    return names


def test_reference_is_not_constant(reference: np.ndarray) -> None:
    assert reference.shape == (N_CROPS,)
    assert np.ptp(reference) > 1e-2, reference  # outputs differ by crop, so parity means something


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("backend", ["pytorch", "onnxruntime"])
def test_engine_matches_pytorch_reference(backend, batch_size, model_and_dir, face_crops, reference) -> None:
    _, model_dir = model_and_dir
    engine = load_engine(model_dir, backend=backend, batch_size=batch_size)
    assert isinstance(engine, Engine)
    probs = engine.predict(face_crops)
    assert probs.dtype == np.float32 and probs.shape == (N_CROPS,)
    assert np.all((probs >= 0) & (probs <= 1))
    assert float(np.abs(probs - reference).max()) <= TOL
    # Order and ragged batching: a prefix alone scores as it did inside the whole set.
    np.testing.assert_allclose(engine.predict(face_crops[:3]), probs[:3], atol=TOL, rtol=0)
    assert engine.predict(face_crops[:0]).shape == (0,)


def test_engine_identity(model_and_dir) -> None:
    _, model_dir = model_and_dir
    pt = load_engine(model_dir, backend="pytorch")
    ox = load_engine(model_dir, backend="onnxruntime")
    assert pt.backend == "pytorch-cpu" and ox.backend == "onnxruntime-cpu"
    assert pt.sha256 == sha256_file(model_dir / "weights.pt")
    assert ox.sha256 == sha256_file(model_dir / "model.onnx") != pt.sha256
    block = ox.describe()
    assert block["backend"] == "onnxruntime-cpu" and block["sha256"] == ox.sha256
    assert block["warning"]  # untrained model says so
    assert ox.output_name == "fake_prob" and ox.input_name == "crops"


def test_the_demo_models_caveat_rides_on_every_verdict() -> None:
    """The packaged demo model's card says it was not trained on deepfake data; its verdicts say so too."""
    from worker.pipeline import DEFAULT_MODEL_DIR

    card = ModelCard.load(DEFAULT_MODEL_DIR)
    assert card.trained and "not on deepfake data" in card.warning
    assert load_engine(DEFAULT_MODEL_DIR, backend="onnxruntime").describe()["warning"] == card.warning


def _legacy_export(model: nn.Module, path: Path, output: str, probs: bool) -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.model(x)
            return torch.softmax(y, dim=1) if probs else y

    torch.onnx.export(Head().eval(), (torch.rand(2, 3, 299, 299),), str(path), input_names=["input"],
                      output_names=[output], dynamic_axes={"input": {0: "batch"}, output: {0: "batch"}},
                      opset_version=17, dynamo=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter is deprecated, still works
@pytest.mark.parametrize("output,probs,kind", [("logits", False, "logits"), ("probs", True, "probs")])
def test_onnxruntime_reads_logits_or_probabilities(tmp_path, model_and_dir, face_crops, reference,
                                                   output, probs, kind) -> None:
    """A graph with only (N,2) logits, or (N,2) probabilities, and another input name, is read right."""
    from training.export import save_model_dir

    model, _ = model_and_dir
    d = tmp_path / output
    save_model_dir(model, d, name="t", version="0", architecture="mdcsd_tiny",
                   architecture_kwargs=model.model_config["kwargs"], trained=False,
                   files={"weights": "weights.pt", "onnx": "graph.onnx"})
    _legacy_export(model, d / "graph.onnx", output, probs)
    engine = OnnxRuntimeEngine(d, batch_size=5)
    assert (engine.input_name, engine.output_name, engine.output_kind) == ("input", output, kind)
    assert float(np.abs(engine.predict(face_crops) - reference).max()) <= TOL


def test_onnxruntime_io_binding_path_agrees(model_and_dir, face_crops, reference) -> None:
    _, model_dir = model_and_dir
    engine = OnnxRuntimeEngine(model_dir, batch_size=5, io_binding=True)
    assert float(np.abs(engine.predict(face_crops) - reference).max()) <= TOL


def test_onnxruntime_needs_an_onnx_file(random_model_dir) -> None:
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        OnnxRuntimeEngine(random_model_dir)


# -- selection ------------------------------------------------------------------------------------------

def test_auto_picks_the_best_available(model_and_dir, random_model_dir) -> None:
    _, model_dir = model_and_dir
    assert ENGINES == ("pytorch", "onnxruntime", "tensorrt")
    # On this machine (no TensorRT/GPU, or device cpu) a directory with an ONNX file runs onnxruntime …
    assert resolve_backend(model_dir, "auto", "cpu") == "onnxruntime"
    engine = load_engine(model_dir, backend="auto")
    assert isinstance(engine, OnnxRuntimeEngine) and engine.backend == "onnxruntime-cpu"
    # … and one with weights only runs PyTorch.
    assert resolve_backend(random_model_dir, "auto", "cpu") == "pytorch"
    assert isinstance(load_engine(random_model_dir, backend="auto"), TorchEngine)
    if not torch.cuda.is_available():  # asking for CUDA on a machine without a GPU: the CPU choice stands
        assert resolve_backend(model_dir, "auto", "cuda") == "onnxruntime"
    elif "tensorrt" not in available_engines() and "CUDAExecutionProvider" not in ort.get_available_providers():
        assert resolve_backend(model_dir, "auto", "cuda") == "pytorch"  # torch on the GPU, not ORT on the CPU
    with pytest.raises(ValueError, match="unknown engine"):
        load_engine(model_dir, backend="tflite")


def test_options_a_backend_cannot_honour(model_and_dir, caplog) -> None:
    _, model_dir = model_and_dir
    with pytest.raises(ValueError, match="does not support precision"):
        load_engine(model_dir, backend="onnxruntime", precision="fp16")
    with pytest.raises(ValueError, match="does not support precision"):
        load_engine(model_dir, backend="pytorch", precision="bf16")  # autocast precisions are for CUDA
    with pytest.raises(ValueError, match="does not support channels_last"):  # PyTorch-only switches
        load_engine(model_dir, backend="onnxruntime", channels_last=True)
    with pytest.raises(ValueError, match="does not support compile"):
        load_engine(model_dir, backend="onnxruntime", compile="default")
    # under auto they are dropped with a warning instead
    assert load_engine(model_dir, backend="auto", precision="fp16", channels_last=True).backend == "onnxruntime-cpu"
    assert "does not support channels_last; ignoring it" in caplog.text


def test_tensorrt_missing_is_a_clear_error(model_and_dir, monkeypatch) -> None:
    from worker.engine.tensorrt_engine import TensorRTUnavailable

    _, model_dir = model_and_dir
    present = "tensorrt" in sys.modules or "tensorrt" in available_engines()
    if present:  # an image without it, on a machine with it: `import tensorrt` fails
        monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable, match=r"'tensorrt'.*not installed.*nvcr\.io/nvidia/tensorrt"):
        load_engine(model_dir, backend="tensorrt", device="cuda")
    if not present:
        assert "tensorrt" not in sys.modules  # importing worker.engine never pulled it in


# -- onnxruntime int8 ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_crops() -> np.ndarray:
    """40 real face crops at the packaged demo model's input size (every 3rd carphone frame)."""
    from worker.faces import create_detector
    from worker.pipeline import DEFAULT_MODEL_DIR

    size = ModelCard.load(DEFAULT_MODEL_DIR).input_size
    frames = carphone_frames()[::3]
    faces = create_detector().detect(np.stack(frames))
    return np.stack([crop_face(f, fs[0].box, size=size) for f, fs in zip(frames, faces) if fs])


def test_onnxruntime_int8_stays_near_fp32_and_is_built_once(tmp_path, demo_crops) -> None:
    """The trained demo model, quantised on 32 real crops: held-out crops move by at most 0.06 in
    probability (measured 0.052 with VNNI; 0.012 with 7-bit weights on an AVX2-only EPYC, 0.157 with 8),
    the drift is reported in the model block, and a second engine
    reuses the cached graph instead of quantising again."""
    from worker.pipeline import DEFAULT_MODEL_DIR

    calibration, held_out = tmp_path / "calibration.npy", demo_crops[32:]
    np.save(calibration, demo_crops[:32])
    cache = tmp_path / "cache"
    fp32 = load_engine(DEFAULT_MODEL_DIR, backend="onnxruntime")
    int8 = load_engine(DEFAULT_MODEL_DIR, backend="onnxruntime", precision="int8", calibration=calibration,
                       cache_dir=cache)
    assert int8.backend == "onnxruntime-cpu-int8" and int8.describe()["int8_max_abs_diff"] > 0
    assert int8.describe()["sha256"] == fp32.describe()["sha256"]  # the model it was made from
    a, b = fp32.predict(held_out), int8.predict(held_out)
    assert float(np.abs(a - b).max()) < 0.06 and not np.array_equal(a, b)
    [graph] = cache.glob("*.engine")
    stamp = graph.stat().st_mtime_ns
    again = load_engine(DEFAULT_MODEL_DIR, backend="onnxruntime", precision="int8", calibration=calibration,
                        cache_dir=cache)
    assert graph.stat().st_mtime_ns == stamp and len(list(cache.glob("*.engine"))) == 1
    assert again.int8_max_abs_diff == int8.int8_max_abs_diff
    np.testing.assert_array_equal(again.predict(held_out), b)
    # other calibration crops are another graph
    np.save(calibration, demo_crops[8:40])
    load_engine(DEFAULT_MODEL_DIR, backend="onnxruntime", precision="int8", calibration=calibration, cache_dir=cache)
    assert len(list(cache.glob("*.engine"))) == 2


def test_calibration_crops_from_a_crop_cache_split(tmp_path, demo_crops) -> None:
    """A directory is searched recursively, so a crop cache's split (one folder per video) works."""
    import cv2

    from worker.engine.calibration import load_calibration_crops

    for i, crop in enumerate(demo_crops[:3]):
        (tmp_path / f"video{i}").mkdir()
        cv2.imwrite(str(tmp_path / f"video{i}" / "000000.png"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    (tmp_path / "index.json").write_text("{}")
    crops = load_calibration_crops(tmp_path, demo_crops.shape[1])
    np.testing.assert_array_equal(crops, demo_crops[:3])  # PNG is lossless: the same bytes, in order
    with pytest.raises(ValueError, match="must be N×64×64×3"):
        load_calibration_crops(demo_crops, 64)


def test_onnxruntime_int8_needs_calibration_and_the_cpu() -> None:
    from worker.pipeline import DEFAULT_MODEL_DIR

    with pytest.raises(ValueError, match="DEEPFAKE_INT8_CALIBRATION"):
        load_engine(DEFAULT_MODEL_DIR, backend="onnxruntime", precision="int8")
    with pytest.raises(ValueError, match="does not support precision 'int8' on cuda"):
        load_engine(DEFAULT_MODEL_DIR, backend="onnxruntime", precision="int8", device="cuda")


def test_spectrum_convolution_stays_fp32() -> None:
    """The one convolution reading the log-spectrum is kept out of INT8 (it would quantise the spectrum)."""
    import onnx

    from worker.engine.ort_int8 import spectrum_convs
    from worker.pipeline import DEFAULT_MODEL_DIR

    graph = onnx.load(str(DEFAULT_MODEL_DIR / "model.onnx")).graph
    found = spectrum_convs(graph)
    assert len(found) == 1
    producer = {o: n for n in graph.node for o in n.output}
    conv = next(n for n in graph.node if n.name == found[0])
    chain, t = [], conv.input[0]
    while t in producer and producer[t].op_type != "Log":
        chain.append(producer[t].op_type)
        t = producer[t].input[0]
    assert t in producer and "Conv" not in chain  # Log → (normalisation) → this Conv


# -- torch engine options -----------------------------------------------------------------------------

def test_torch_engine_cpu_options(model_and_dir, face_crops, reference) -> None:
    _, model_dir = model_and_dir
    with pytest.raises(ValueError, match="needs a CUDA device"):
        TorchEngine(model_dir, precision="fp16")
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        TorchEngine(model_dir, cuda_graphs=True)
    with pytest.raises(ValueError, match="precision must be one of"):
        TorchEngine(model_dir, precision="int4")
    cl = TorchEngine(model_dir, batch_size=5, channels_last=True)
    assert float(np.abs(cl.predict(face_crops) - reference).max()) <= TOL


def test_graph_buckets() -> None:
    assert graph_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert graph_buckets(5) == (1, 2, 4, 5)
    assert graph_buckets(1) == (1,)


@cuda
def test_torch_engine_cuda_fp32_and_graphs(model_and_dir, face_crops, reference) -> None:
    _, model_dir = model_and_dir
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # strict fp32 for the parity check
    try:
        eager = TorchEngine(model_dir, device="cuda", batch_size=5)
        graphs = TorchEngine(model_dir, device="cuda", batch_size=5, cuda_graphs=True)
        assert eager.backend == "pytorch-cuda"
        p_eager = eager.predict(face_crops)
        assert float(np.abs(p_eager - reference).max()) <= TOL  # H200: 9.8e-6 (cuDNN summation order)
        p_graph = graphs.predict(face_crops)  # 5+5+2: the last chunk runs the padded bucket-2 graph
        assert sorted(graphs._graphs) == [1, 2, 4, 5]  # warm-up captured every bucket
        np.testing.assert_allclose(p_graph, p_eager, atol=1e-5, rtol=0)
        np.testing.assert_allclose(graphs.predict(face_crops[:3]), p_eager[:3], atol=1e-5, rtol=0)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_torch_engine_cuda_autocast(model_and_dir, face_crops, reference, precision) -> None:
    _, model_dir = model_and_dir
    engine = load_engine(model_dir, backend="pytorch", device="cuda", batch_size=5, precision=precision,
                         channels_last=True, cuda_graphs=True)
    assert engine.backend == f"pytorch-cuda-{precision}"
    err = float(np.abs(engine.predict(face_crops) - reference).max())
    # autocast is not a parity mode; H200 measured 2.5e-3 (bf16) and 2.8e-4 (fp16)
    assert err <= (1e-2 if precision == "bf16" else 2e-3), err


def test_tensorrt_fp32_pinning_covers_the_spectrum_and_stops_at_its_convolution() -> None:
    """What TensorRTEngine._pin_spectrum_fp32 pins, run over the packaged model's real ONNX graph laid
    out as TensorRT's parser lays it out (one layer per node, a constant layer per tensor initializer).
    TensorRT itself cannot run here (no GPU, no package): its layer API is stood in for by the few
    attributes the method reads. The engine itself has not yet run with real TensorRT: bench/gpu_verify.py
    has no TensorRT section, and the device machine has no TensorRT; that check needs an NGC TensorRT
    image (docs/deploy.md)."""
    import onnx

    from worker.engine.tensorrt_engine import TensorRTEngine
    from worker.pipeline import DEFAULT_MODEL_DIR

    kinds = {"MatMul": "MATRIX_MULTIPLY", "Gemm": "MATRIX_MULTIPLY", "Abs": "UNARY", "Log": "UNARY",
             "Add": "ELEMENTWISE", "Sub": "ELEMENTWISE", "Mul": "ELEMENTWISE", "Div": "ELEMENTWISE",
             "Softmax": "SOFTMAX", "Conv": "CONVOLUTION", "Relu": "ACTIVATION", "MaxPool": "POOLING",
             "ReduceMean": "REDUCE", "Concat": "CONCATENATION", "Gather": "GATHER", "Reshape": "SHUFFLE"}
    trt = types.SimpleNamespace(LayerType=types.SimpleNamespace(**{k: k for k in {*kinds.values(), "CONSTANT"}}),
                                float32="float32", float16="float16")

    class Tensor:
        def __init__(self, name: str) -> None:
            self.name, self.dtype = name, "float32"

    class Layer:
        def __init__(self, kind: str, inputs: list[str], outputs: list[str]) -> None:
            self.type, self.precision, self.output_types = kind, None, {}
            self._in, self._out = [Tensor(n) for n in inputs], [Tensor(n) for n in outputs]
            self.num_inputs, self.num_outputs = len(inputs), len(outputs)

        def get_input(self, j: int) -> Tensor:
            return self._in[j]

        def get_output(self, j: int) -> Tensor:
            return self._out[j]

        def set_output_type(self, j: int, dtype: str) -> None:
            self.output_types[j] = dtype

    graph = onnx.load(str(DEFAULT_MODEL_DIR / "model.onnx")).graph
    weights = {i.name for i in graph.initializer}
    layers: list[Layer] = []
    for node in graph.node:
        tensor_inputs = list(node.input) if node.op_type != "Conv" else node.input[:1]  # a conv's are its weights
        layers += [Layer("CONSTANT", [], [name]) for name in tensor_inputs if name in weights]
        layers.append(Layer(kinds[node.op_type], tensor_inputs, list(node.output)))
    network = types.SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__)
    engine = TensorRTEngine.__new__(TensorRTEngine)
    engine.trt = trt
    count = engine._pin_spectrum_fp32(network)

    pinned = {layer.get_output(0).name for layer in layers if layer.precision == "float32"}
    assert count == len(pinned)
    spectrum = {"matmul", "matmul_1", "abs_1", "add_25", "log", "sub_8", "div_1"}  # DCT · DCTᵀ → |·|+ε → log → norm
    assert spectrum <= pinned
    assert {"model.freq_transform.dct", "model.freq_transform.dct_t", "val_0", "model.freq_mean",
            "model.freq_std"} <= pinned  # the matrices and constants they read, never stored in FP16
    assert all(layer.output_types == {0: "float32"} for layer in layers if layer.precision == "float32")
    # It stops at the convolution reading the spectrum: no convolution, no cross-stitch, no residual
    # sum and not the RGB branch's own normalisation (sub, div on the crops) runs in FP32.
    assert not any(layer.type in ("CONVOLUTION", "POOLING", "ACTIVATION") for layer in layers
                   if layer.precision == "float32")
    elementwise = {layer.get_output(0).name for layer in layers if layer.type == "ELEMENTWISE"}
    assert elementwise & pinned == {"add_25", "sub_8", "div_1"}
    # The classifier's matrix products and the softmax are pinned too (small, and the probabilities' last step).
    assert {"linear", "linear_1", "logits", "softmax"} <= pinned


# -- tensorrt without TensorRT: what can be checked with a stand-in module --------------------------------

def _fake_tensorrt(monkeypatch, version: str) -> types.ModuleType:
    """A ``tensorrt`` module of `version` and a torch that sees a GPU, for this test only: only the
    version and selection logic run, never a TensorRT call."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return trt


def test_auto_passes_over_a_tensorrt_major_the_engine_refuses(monkeypatch) -> None:
    from worker.engine.tensorrt_engine import TensorRTEngine, TensorRTUnavailable, tensorrt_available
    from worker.pipeline import DEFAULT_MODEL_DIR

    without_trt = "onnxruntime" if "CUDAExecutionProvider" in ort.get_available_providers() else "pytorch"
    _fake_tensorrt(monkeypatch, "11.0.0")
    assert not tensorrt_available()
    assert resolve_backend(DEFAULT_MODEL_DIR, "auto", "cuda") == without_trt  # as if TensorRT were absent
    with pytest.raises(TensorRTUnavailable, match=r"written for TensorRT 10\.x; this is 11\.0\.0"):
        TensorRTEngine(DEFAULT_MODEL_DIR)  # explicitly: a clear error
    _fake_tensorrt(monkeypatch, "10.13.0")
    assert tensorrt_available() and resolve_backend(DEFAULT_MODEL_DIR, "auto", "cuda") == "tensorrt"


def test_auto_drops_what_tensorrt_cannot_honour(monkeypatch, caplog) -> None:
    """Settings allow precision bf16 (PyTorch's): under auto, a TensorRT choice runs its default with a
    warning, as the other backends do; with engine=tensorrt it is an error. PyTorch-only switches too."""
    import worker.engine.tensorrt_engine as trt_engine
    from worker.pipeline import DEFAULT_MODEL_DIR

    _fake_tensorrt(monkeypatch, "10.13.0")
    built: list[dict] = []
    monkeypatch.setattr(trt_engine, "TensorRTEngine", lambda model_dir, **kw: built.append(kw) or kw)
    load_engine(DEFAULT_MODEL_DIR, backend="auto", device="cuda", precision="bf16", channels_last=True)
    assert built[-1]["precision"] == "fp16"
    assert "does not support precision 'bf16'" in caplog.text and "does not support channels_last" in caplog.text
    with pytest.raises(ValueError, match="does not support precision 'bf16'"):
        load_engine(DEFAULT_MODEL_DIR, backend="tensorrt", device="cuda", precision="bf16")
    with pytest.raises(ValueError, match="does not support cuda_graphs"):
        load_engine(DEFAULT_MODEL_DIR, backend="tensorrt", device="cuda", cuda_graphs=True)
    load_engine(DEFAULT_MODEL_DIR, backend="tensorrt", device="cuda", precision="int8")
    assert built[-1]["precision"] == "int8" and len(built) == 2


@pytest.mark.parametrize("outputs,picked", [
    ({"fake_prob": (-1,), "logits": (-1, 2)}, ("fake_prob", "prob")), ({"logits": (-1, 2)}, ("logits", "logits")),
    ({"probs": (-1, 2)}, ("probs", "probs")), ({"p_prob": (-1,)}, ("p_prob", "prob")),  # (N,): not two classes
    ({"p_prob": (-1,), "scores": (-1, 2)}, ("p_prob", "prob")),
    ({"out": (-1,)}, ("out", "prob")), ({"out": (-1, 2)}, ("out", "logits")),
])
def test_tensorrt_reads_the_output_onnxruntime_reads(outputs, picked) -> None:
    """TensorRTEngine._bind_names picks the output and its kind as OnnxRuntimeEngine._pick_output does."""
    from worker.engine.tensorrt_engine import TensorRTEngine

    io = {"crops": (-1, 3, 299, 299), **outputs}
    names = list(io)
    engine = TensorRTEngine.__new__(TensorRTEngine)
    engine.trt = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"))
    engine.engine = types.SimpleNamespace(num_io_tensors=len(names), get_tensor_name=names.__getitem__,
                                          get_tensor_mode=lambda n: "in" if n == "crops" else "out",
                                          get_tensor_shape=lambda n: io[n])
    engine._bind_names()
    assert (engine.output_name, engine.output_kind) == picked
    ort_outputs = [types.SimpleNamespace(name=n, shape=shape) for n, shape in outputs.items()]
    assert OnnxRuntimeEngine._pick_output(ort_outputs) == picked

