"""Model engines behind one interface; `load_engine` picks one for a model directory.

Backends: ``pytorch`` (weights.pt, CPU or CUDA), ``onnxruntime`` (model.onnx, CPU or CUDA provider),
``tensorrt`` (model.onnx built into a cached TensorRT plan, CUDA only; the ``tensorrt`` package is
imported only when this backend is chosen), and ``auto``:

* ``tensorrt`` when `device` is a CUDA device, torch sees a GPU, ``tensorrt`` imports and is the major
  version the engine runs (10), and the model directory has an ONNX file;
* else, for a CUDA device, ``onnxruntime`` with its CUDA provider when the build has one and there is
  an ONNX file, else ``pytorch`` on the GPU when torch sees one;
* else ``onnxruntime`` when the model directory has an ONNX file (on the CPU);
* else ``pytorch``.

Options that only some backends understand are passed to those that do; under ``auto`` an option the
chosen backend cannot honour (e.g. precision "fp16" on onnxruntime, "bf16" on tensorrt, channels_last
anywhere but pytorch) is dropped with a warning, with an explicit backend it is an error.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from worker.engine.base import Engine
from worker.engine.model_card import ModelCard

log = logging.getLogger(__name__)

ENGINES = ("pytorch", "onnxruntime", "tensorrt")
BACKENDS = (*ENGINES, "auto")


def has_onnx(model_dir: Path) -> bool:
    from worker.engine.onnx_engine import onnx_path_of

    try:
        card = ModelCard.load(Path(model_dir))
    except FileNotFoundError:
        return False
    return onnx_path_of(Path(model_dir), card) is not None


def resolve_backend(model_dir: Path, backend: str = "auto", device: str = "cpu") -> str:
    """The concrete engine name `backend` means for this model directory and device (see module doc)."""
    if backend in ENGINES:
        return backend
    if backend != "auto":
        raise ValueError(f"unknown engine {backend!r}; available: {', '.join(BACKENDS)}")
    onnx = has_onnx(model_dir)
    if device.startswith("cuda"):
        if onnx:
            from worker.engine.tensorrt_engine import tensorrt_available

            if tensorrt_available():
                return "tensorrt"
            if _ort_has_cuda():
                return "onnxruntime"
        import torch

        if torch.cuda.is_available():
            return "pytorch"  # PyTorch on the GPU beats onnxruntime on the CPU by far
    return "onnxruntime" if onnx else "pytorch"


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def load_engine(
    model_dir: Path,
    *,
    backend: str = "pytorch",
    device: str = "cpu",
    batch_size: int = 32,
    precision: str | None = None,
    channels_last: bool = False,
    compile: bool | str = False,  # noqa: A002 - mirrors torch.compile
    cuda_graphs: bool = False,
    threads: int | None = None,
    cache_dir: Path | str | None = None,
    calibration: Any = None,
) -> Engine:
    """Load `model_dir` with `backend` (pytorch | onnxruntime | tensorrt | auto).

    precision: None = the backend's default (pytorch fp32, tensorrt fp16, onnxruntime the graph's
    fp32); pytorch takes fp32 | bf16 | fp16 (CUDA autocast), tensorrt fp32 | fp16 | int8, onnxruntime
    fp32 | int8 (CPU, statically quantised with the calibration crops).
    channels_last / compile / cuda_graphs: pytorch only. threads: onnxruntime intra-op threads
    (None = the cgroup CPU quota). cache_dir / calibration: the engine cache (TensorRT plans, INT8
    ONNX graphs) and the INT8 calibration crops.
    """
    chosen = resolve_backend(model_dir, backend, device)
    auto = backend == "auto"

    def unsupported(what: str) -> None:
        msg = f"engine {chosen!r} does not support {what}"
        if not auto:
            raise ValueError(msg)
        log.warning("%s; ignoring it (engine 'auto' chose %s)", msg, chosen)

    if chosen != "pytorch":  # PyTorch-only switches: set, they would otherwise vanish without a word
        for name, value in (("channels_last", channels_last), ("compile", compile), ("cuda_graphs", cuda_graphs)):
            if value:
                unsupported(name)
    if chosen == "pytorch":
        from worker.engine.torch_engine import AMP_DTYPES, TorchEngine

        if precision is not None and precision not in AMP_DTYPES:
            unsupported(f"precision {precision!r}")
            precision = None
        if precision not in (None, "fp32") and not device.startswith("cuda"):
            unsupported(f"precision {precision!r} on {device}")
            precision = None
        return TorchEngine(model_dir, device=device, batch_size=batch_size, precision=precision or "fp32",
                           channels_last=channels_last, compile=compile,
                           cuda_graphs=cuda_graphs and device.startswith("cuda"))
    if chosen == "onnxruntime":
        from worker.engine.onnx_engine import OnnxRuntimeEngine

        if precision not in (None, "fp32", "int8") or (precision == "int8" and device != "cpu"):
            unsupported(f"precision {precision!r} on {device} (it runs fp32, and int8 on the CPU)")
            precision = None
        return OnnxRuntimeEngine(model_dir, device=device, batch_size=batch_size, intra_op_threads=threads,
                                 precision=precision or "fp32", calibration=calibration, cache_dir=cache_dir)
    from worker.engine.tensorrt_engine import PRECISIONS, TensorRTEngine

    if precision is not None and precision not in PRECISIONS:
        unsupported(f"precision {precision!r} (it runs {', '.join(PRECISIONS)})")
        precision = None
    return TensorRTEngine(model_dir, device=device, batch_size=batch_size, precision=precision or "fp16",
                          cache_dir=cache_dir, calibration=calibration)


__all__ = ["BACKENDS", "ENGINES", "Engine", "ModelCard", "load_engine", "resolve_backend"]
