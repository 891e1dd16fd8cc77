"""The TensorRT engine: builds a plan from the model directory's ONNX file, caches it, runs it on CUDA.

Needs the ``tensorrt`` Python package (TensorRT 10.x: the INT8 calibrator used here is deprecated
since 10.1, superseded by explicit quantization, and the FP16/INT8 builder flags since 10.12 with the
rest of weak typing; 11 drops them, so another major is refused with a clear error and 'auto' passes
it over) and a CUDA GPU with PyTorch's CUDA build — device buffers are torch CUDA tensors and the
stream is a torch stream, so there is no pycuda dependency. ``import tensorrt`` happens only when
this engine is constructed: ``worker.engine`` imports without it, and constructing the engine without
it raises :class:`TensorRTUnavailable` naming what is missing.

How the Docker image provides TensorRT (PyPI's ``tensorrt`` packages are stubs that download the
real wheels from NVIDIA's index at install time, so an offline or PyPI-only build cannot get them):

* base the GPU image on NVIDIA's ``nvcr.io/nvidia/tensorrt:<yy.mm>-py3`` (TensorRT, CUDA, cuDNN and
  the ``tensorrt`` Python bindings preinstalled; pick the release whose CUDA matches the torch
  wheel), or
* in the image build, ``pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13==10.*``
  (``tensorrt-cu13-libs`` and ``tensorrt-cu13-bindings`` come along) next to the CUDA 13 torch
  (``tensorrt-cu12`` beside a CUDA 12 torch).

Precision: ``fp16`` (default), ``fp32``, or ``int8`` (implicit quantisation with an entropy
calibrator over real face crops: a directory of images, a ``.npy`` file of N×S×S×3 uint8 crops, or
such an array; FP16 is also enabled so layers INT8 cannot run fall back to FP16, not FP32). In
fp16/int8 builds the frequency branch's log-spectrum (the DCT matrix products, |·|, log and the
elementwise ops right after) is pinned to FP32: small DCT coefficients are differences of large
sums, and fp16 rounding there moves log|·| by whole units (PyTorch's layer disables autocast for
the same reason). TF32, which TensorRT allows for FP32 layers by default, is turned off in every
build: it rounds products to 10-bit mantissas, and on the H200 TF32 moved PyTorch's probabilities by
up to 0.109 (README).

Batch profile: min 1, opt = max = ``batch_size``; ``predict`` cuts its input into chunks of at most
``batch_size`` and sets the actual shape per chunk. Built plans are cached (``worker.engine.cache``)
under a key of GPU, compute capability, TensorRT version, ONNX sha256, precision, profile and
``BUILD_RECIPE``, bumped whenever the build settings change so that no plan built otherwise is reused.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.base import describe_engine
from worker.engine.cache import EngineCache, EngineKey, atomic_write
from worker.engine.calibration import load_calibration_crops
from worker.engine.model_card import ModelCard, sha256_file
from worker.engine.onnx_engine import onnx_path_of

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
TENSORRT_MAJOR = 10  # the API this engine is written against
# The build settings' version, in the plan cache key: 2 = TF32 off, the whole elementwise chain after
# the spectrum pinned to FP32.
BUILD_RECIPE = 2


class TensorRTUnavailable(RuntimeError):
    """TensorRT, or the CUDA GPU it needs, is not available in this environment."""


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` saying what is missing and how to get it."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional, GPU images only
    except ImportError as exc:
        raise TensorRTUnavailable(
            "the 'tensorrt' engine needs NVIDIA TensorRT's Python package 'tensorrt', which is not installed "
            f"({exc}). Use an image based on nvcr.io/nvidia/tensorrt, or install it with "
            "`pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13`; "
            "or choose engine 'onnxruntime' / 'pytorch' (or 'auto')."
        ) from exc
    return trt


_LOGGER: Any = None


def _logger(trt: Any) -> Any:
    """One ``trt.Logger`` per process: TensorRT registers the first one globally and warns about others."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def _major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def tensorrt_available() -> bool:
    """True when torch sees a CUDA GPU and the ``tensorrt`` package imports and is the major this engine
    runs (what 'auto' checks: an engine it would pick and then refuse is no choice)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        return _major(import_tensorrt()) == TENSORRT_MAJOR
    except Exception:
        return False


def _to_device_nchw(crops: np.ndarray, device: Any) -> Any:
    """uint8 N×S×S×3 → float32 N×3×S×S in [0,1] on `device`: the upload is uint8 (4× fewer bytes) and the
    division runs on the GPU. PyTorch's CUDA kernel divides by a Python scalar as a product with its
    reciprocal, so the values equal ``crops_to_tensor_layout``'s (correctly rounded x/255) within 1 ulp,
    not exactly: in float32, x·(1/255) misses x/255 by 1 ulp for 126 of the 256 byte values."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(crops)).to(device, non_blocking=False)
    return (t.permute(0, 3, 1, 2).float() / 255.0).contiguous()


def _make_calibrator(trt: Any, crops: np.ndarray, batch_size: int, device: Any, cache_file: Path | None) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding `crops` in batches of `batch_size` from torch CUDA memory."""

    class CropCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.crops, self.batch, self.pos, self.current = crops, batch_size, 0, None

        def get_batch_size(self) -> int:
            return self.batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.pos + self.batch > len(self.crops):  # whole batches only (the profile's opt shape)
                return None
            import torch

            self.current = _to_device_nchw(self.crops[self.pos : self.pos + self.batch], device)
            torch.cuda.current_stream(device).synchronize()  # TensorRT reads it on its own stream
            self.pos += self.batch
            return [int(self.current.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            try:  # raising inside TensorRT's callback could abort the process: unreadable is calibrated anew
                return cache_file.read_bytes() if cache_file is not None and cache_file.is_file() else None
            except OSError as exc:
                log.warning("INT8 calibration cache %s unreadable (%s): calibrating anew", cache_file, exc)
                return None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_file is None:
                return
            try:  # raising inside TensorRT's callback could abort the process; a read-only cache is allowed
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(cache_file, bytes(cache))  # another pod's build may be reading it
            except OSError as exc:
                log.warning("could not keep the INT8 calibration cache at %s: %s", cache_file, exc)

    return CropCalibrator()


class TensorRTEngine:
    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cuda",
        batch_size: int = 32,
        precision: str = "fp16",
        cache_dir: Path | str | None = None,
        calibration: Any = None,
        workspace_gib: float = 4.0,
        rebuild: bool = False,
    ) -> None:
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise TensorRTUnavailable("the 'tensorrt' engine needs a CUDA GPU, and torch sees none "
                                      f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if _major(trt) != TENSORRT_MAJOR:
            raise TensorRTUnavailable(f"the 'tensorrt' engine is written for TensorRT 10.x; this is {trt.__version__} "
                                      "(choose engine 'onnxruntime' or 'pytorch')")
        self.trt = trt
        self.model_dir = Path(model_dir)
        self.card = ModelCard.load(self.model_dir)
        path = onnx_path_of(self.model_dir, self.card)
        if path is None:
            raise FileNotFoundError(f"no ONNX file in model directory {self.model_dir}: TensorRT builds from it")
        self.onnx_path = path
        self.sha256 = sha256_file(path)
        self.device = torch.device(device if device.startswith("cuda") else "cuda")
        self.batch_size = batch_size
        self.precision = precision
        self.size = self.card.input_size
        self.workspace_bytes = int(workspace_gib * (1 << 30))
        self.logger = _logger(trt)

        calib_crops = None
        extra: dict[str, Any] = {"recipe": BUILD_RECIPE}
        if precision == "int8":
            if calibration is None:
                raise ValueError("precision 'int8' needs calibration crops (a directory of images, a .npy or an array)")
            calib_crops = load_calibration_crops(calibration, self.size)
            if len(calib_crops) < batch_size:
                raise ValueError(f"{len(calib_crops)} calibration crops: at least one batch ({batch_size}) is needed")
            extra["calibration_sha256"] = hashlib.sha256(calib_crops.tobytes()).hexdigest()
            extra["calibration_crops"] = int(len(calib_crops))

        props = torch.cuda.get_device_properties(self.device)
        self.key = EngineKey(
            gpu_name=props.name, compute_capability=f"{props.major}.{props.minor}",
            tensorrt_version=trt.__version__, onnx_sha256=self.sha256, precision=precision,
            batch_profile=(1, batch_size, batch_size), input_size=self.size, extra=extra,
        )
        self.cache = EngineCache(cache_dir)
        if rebuild:
            self.cache.invalidate(self.key)

        with torch.cuda.device(self.device):
            plan, self.built = self.cache.get_or_build(self.key, lambda: self._build(calib_crops))
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(plan)
            if self.engine is None:  # a plan the cache kept but this runtime rejects: build afresh once
                log.warning("TensorRT could not deserialise the cached engine %s; rebuilding", self.cache.path_for(self.key))
                self.cache.invalidate(self.key)
                plan, self.built = self.cache.get_or_build(self.key, lambda: self._build(calib_crops))
                self.engine = self.runtime.deserialize_cuda_engine(plan)
                if self.engine is None:
                    raise RuntimeError("TensorRT could not deserialise the engine it just built")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device=self.device)
        self._bind_names()
        self.backend = f"tensorrt-{precision}"
        self._lock = threading.Lock()  # one execution context: one batch at a time

    # -- build ----------------------------------------------------------------------------------------

    def _build(self, calib_crops: np.ndarray | None) -> bytes:
        trt = self.trt
        log.info("building a TensorRT %s engine from %s (batch 1..%d); this takes minutes",
                 self.precision, self.onnx_path, self.batch_size)
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # explicit batch, the only kind TensorRT 10 has
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(self.onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {self.onnx_path}: {errors}")

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default for FP32 layers: see the module doc
        inp = network.get_input(0)
        profile = builder.create_optimization_profile()
        shape = lambda b: (b, 3, self.size, self.size)  # noqa: E731
        profile.set_shape(inp.name, shape(1), shape(self.batch_size), shape(self.batch_size))
        config.add_optimization_profile(profile)

        if self.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
            if self._pin_spectrum_fp32(network):  # without this flag the per-layer hints may be ignored
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        if self.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_calibration_profile(profile)
            cache_file = self.cache.calibration_path(self.key)
            config.int8_calibrator = _make_calibrator(trt, calib_crops, self.batch_size, self.device, cache_file)

        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
        return bytes(plan)

    def _pin_spectrum_fp32(self, network: Any) -> int:
        """Keep the log-spectrum in FP32: matrix products, unary ops (abs, log, …), softmax, and the
        chains of elementwise layers that consume their outputs (the +eps, the normalisation's
        subtraction and division), up to the first layer of another kind (the convolution); and the
        constants (the DCT matrices) and reshapes that feed them, so that no weight is stored in FP16
        on its way in."""
        trt = self.trt
        pinned_types = {trt.LayerType.MATRIX_MULTIPLY, trt.LayerType.UNARY, trt.LayerType.SOFTMAX}
        feeder_types = {trt.LayerType.CONSTANT, trt.LayerType.SHUFFLE}
        layers = [network.get_layer(i) for i in range(network.num_layers)]

        def inputs(layer: Any) -> set[str]:
            return {layer.get_input(j).name for j in range(layer.num_inputs) if layer.get_input(j) is not None}

        def outputs(layer: Any) -> set[str]:
            return {layer.get_output(j).name for j in range(layer.num_outputs)}

        def pin(layer: Any) -> set[str]:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (trt.float32, trt.float16):
                    layer.set_output_type(j, trt.float32)
            return outputs(layer)

        pinned_outputs: set[str] = set()
        pinned_inputs: set[str] = set()
        count = 0
        for layer in layers:
            if layer.type in pinned_types or (layer.type == trt.LayerType.ELEMENTWISE and inputs(layer) & pinned_outputs):
                pinned_outputs |= pin(layer)
                pinned_inputs |= inputs(layer)
                count += 1
        for layer in reversed(layers):  # feeders, back from the pinned layers (a constant through a reshape)
            if layer.type in feeder_types and outputs(layer) & pinned_inputs:
                pin(layer)
                pinned_inputs |= inputs(layer)
                count += 1
        log.debug("pinned %d layers to FP32", count)
        return count

    # -- run ------------------------------------------------------------------------------------------

    def _bind_names(self) -> None:
        trt = self.trt
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1:
            raise ValueError(f"expected one engine input, got {inputs}")
        self.input_name = inputs[0]
        self.output_names = outputs
        rank = {n: len(tuple(self.engine.get_tensor_shape(n))) for n in outputs}
        # as OnnxRuntimeEngine._pick_output: a *prob* output counts as class probabilities only when (N,2)
        probs = [n for n in outputs if "prob" in n.lower() and rank[n] == 2]
        if "fake_prob" in outputs:
            self.output_name, self.output_kind = "fake_prob", "prob"
        elif "logits" in outputs:
            self.output_name, self.output_kind = "logits", "logits"
        elif probs:
            self.output_name, self.output_kind = probs[0], "probs"
        else:
            self.output_name = outputs[0]
            self.output_kind = "prob" if rank[outputs[0]] == 1 else "logits"

    def _torch_dtype(self, name: str) -> Any:
        import torch

        np_dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
        return torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype

    def predict(self, crops: np.ndarray) -> np.ndarray:
        import torch

        if len(crops) == 0:
            return np.zeros((0,), dtype=np.float32)
        if crops.ndim != 4 or crops.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"expected N×{self.size}×{self.size}×3 crops, got shape {crops.shape}")
        out: list[np.ndarray] = []
        with self._lock, torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for i in range(0, len(crops), self.batch_size):
                x = _to_device_nchw(crops[i : i + self.batch_size], self.device)
                b = x.shape[0]
                if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
                    raise RuntimeError(f"TensorRT refused input shape {tuple(x.shape)} (profile 1..{self.batch_size})")
                self.context.set_tensor_address(self.input_name, int(x.data_ptr()))
                buffers = {}
                for name in self.output_names:  # every output needs an address, even unused ones
                    shape = tuple(self.context.get_tensor_shape(name))
                    buffers[name] = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
                    self.context.set_tensor_address(name, int(buffers[name].data_ptr()))
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError("TensorRT execute_async_v3 failed")
                y = buffers[self.output_name].float()
                if self.output_kind == "logits":
                    y = torch.softmax(y, dim=1)[:, 1]
                elif self.output_kind == "probs":
                    y = y[:, 1]
                out.append(y.reshape(b).cpu().numpy())  # .cpu() synchronises the stream
        return np.concatenate(out).astype(np.float32)

    def describe(self) -> dict:
        return describe_engine(self.card, self.backend, self.sha256)
