"""The PyTorch engine: rebuilds the card's architecture from `training.models` and loads its weights.

On the CPU (the default) it runs the model eagerly in float32, as it always has. On CUDA it has
opt-in speed options, all off by default:

* ``precision`` — "fp32" (no autocast, and TF32 turned off for cuDNN and matmuls in this process:
  on the H200 TF32 moved probabilities by up to 0.109 against the CPU, strict fp32 by 5e-6), "bf16"
  or "fp16" autocast (measured 0.069 and 0.004: fp16 is the GPU recommendation). The frequency
  branch's log-spectrum disables autocast itself, so it stays float32 either way.
* ``channels_last`` — NHWC memory format for the weights and the input (faster cuDNN convolutions
  under autocast on tensor-core GPUs).
* ``compile`` — ``torch.compile``: True = mode "default"; or a mode string such as
  "max-autotune-no-cudagraphs" (slower to compile, faster kernels). "reduce-overhead" (torch's own
  CUDA graphs) cannot be combined with ``cuda_graphs``.
* ``cuda_graphs`` — capture one CUDA graph per batch-size bucket (powers of two up to
  ``batch_size``, and ``batch_size``), lazily or at warm-up; a chunk of n crops runs the smallest
  bucket ≥ n with its tail padded by zeros (eval-mode BatchNorm: padding cannot change other
  rows). The graphs share one memory pool; they are replayed one at a time and each result is
  copied out before the next replay, which keeps the sharing safe.

``channels_last`` and ``compile`` also work on the CPU; autocast precisions and CUDA graphs need CUDA.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.engine.base import describe_engine
from worker.engine.model_card import ModelCard, sha256_file
from worker.preprocess import crops_to_tensor_layout
from worker.torch_files import load_tensors

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def graph_buckets(batch_size: int) -> tuple[int, ...]:
    """Batch sizes CUDA graphs are captured for: powers of two below `batch_size`, and `batch_size`."""
    sizes = {batch_size}
    b = 1
    while b < batch_size:
        sizes.add(b)
        b *= 2
    return tuple(sorted(sizes))


class TorchEngine:
    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool | str = False,  # noqa: A002 - mirrors torch.compile
        cuda_graphs: bool = False,
        warmup: bool | None = None,
    ) -> None:
        from training.models import create_model  # the one place architectures are defined

        self.model_dir = Path(model_dir)
        self.card = ModelCard.load(self.model_dir)
        weights = self.model_dir / self.card.files["weights"]
        self.sha256 = sha256_file(weights)
        self.device = torch.device(device)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = batch_size
        if precision not in AMP_DTYPES:
            raise ValueError(f"precision must be one of {tuple(AMP_DTYPES)}, got {precision!r}")
        cuda = self.device.type == "cuda"
        if precision != "fp32" and not cuda:
            raise ValueError(f"precision {precision!r} (autocast) needs a CUDA device; the CPU engine runs fp32 "
                             "(for a faster CPU path use the onnxruntime engine)")
        if cuda_graphs and not cuda:
            raise ValueError("cuda_graphs needs a CUDA device")
        if cuda and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but torch sees no CUDA GPU "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
        mode = None if compile is False else ("default" if compile is True else str(compile))
        if cuda_graphs and mode == "reduce-overhead":
            raise ValueError("compile mode 'reduce-overhead' captures its own CUDA graphs; do not also set cuda_graphs")
        self.precision = precision
        self.amp_dtype = AMP_DTYPES[precision]
        self.channels_last = channels_last
        self.compile_mode = mode
        self.cuda_graphs = cuda_graphs

        if cuda and precision == "fp32":
            # PyTorch lets cuDNN use TF32 by default; process-wide, as torch only offers it that way.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        model = create_model(self.card.architecture, **self.card.architecture_kwargs)
        state = load_tensors(weights)  # never unpickle code
        model.load_state_dict(state)
        self.model = model.eval().to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.runner: Any = self.model
        if mode is not None:
            self.runner = torch.compile(self.model, mode=mode, dynamic=False if cuda_graphs else None)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.buckets = graph_buckets(batch_size) if cuda_graphs else ()
        self.backend = f"pytorch-{self.device.type}" + ("" if precision == "fp32" else f"-{precision}")
        if warmup if warmup is not None else (cuda and (cuda_graphs or mode is not None)):
            self.warmup()

    # -- CPU: the original eager fp32 path --------------------------------------------------------------

    def _predict_cpu(self, crops: np.ndarray) -> np.ndarray:
        x = crops_to_tensor_layout(crops)
        out = []
        for i in range(0, len(x), self.batch_size):
            batch = torch.from_numpy(x[i : i + self.batch_size]).to(self.device)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            logits = self.runner(batch)
            out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    # -- CUDA -------------------------------------------------------------------------------------------

    def _upload(self, crops: np.ndarray) -> torch.Tensor:
        """uint8 N×S×S×3 → float32 N×3×S×S in [0,1] on the GPU (4× smaller upload; x/255 in float32 is
        correctly rounded on both sides, so the values equal ``crops_to_tensor_layout``'s)."""
        t = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device, non_blocking=False)
        x = t.permute(0, 3, 1, 2).float() / 255.0
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def _forward_prob(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.amp_dtype or torch.float16, enabled=self.amp_dtype is not None):
            logits = self.runner(x)
        return torch.softmax(logits.float(), dim=1)[:, 1]

    def _graph(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        if b in self._graphs:
            return self._graphs[b]
        s = self.card.input_size
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        static_in = torch.zeros((b, 3, s, s), device=self.device).contiguous(memory_format=fmt)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up iterations (cuDNN algorithm choice, compilation) off-graph
            for _ in range(3):
                self._forward_prob(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self._forward_prob(static_in)
        self._graphs[b] = (graph, static_in, static_out)
        return self._graphs[b]

    def _predict_cuda(self, crops: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(crops), self.batch_size):
            x = self._upload(crops[i : i + self.batch_size])
            n = x.shape[0]
            if self.cuda_graphs:
                b = next(k for k in self.buckets if k >= n)
                graph, static_in, static_out = self._graph(b)
                static_in[:n].copy_(x)
                if n < b:
                    static_in[n:].zero_()
                graph.replay()
                out.append(static_out[:n].cpu().numpy())  # copied out before any other replay
            else:
                out.append(self._forward_prob(x).cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    @torch.inference_mode()
    def predict(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0,), dtype=np.float32)
        if self.device.type == "cuda":
            if crops.ndim != 4 or crops.shape[-1] != 3:
                raise ValueError(f"expected N×H×W×3 crops, got shape {crops.shape}")
            return self._predict_cuda(crops)
        return self._predict_cpu(crops)

    def warmup(self) -> None:
        """Compile and capture ahead of the first job: one pass per graph bucket (or at `batch_size`)."""
        s = self.card.input_size
        for b in self.buckets or (self.batch_size,):
            self.predict(np.zeros((b, s, s, 3), dtype=np.uint8))

    def describe(self) -> dict:
        return describe_engine(self.card, self.backend, self.sha256)
