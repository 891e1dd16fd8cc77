"""The ONNX Runtime engine: runs the model directory's ``model.onnx`` (``card.files["onnx"]``).

CPU by default; ``device="cuda[:N]"`` asks for the CUDAExecutionProvider and falls back to the CPU
(with a warning, and ``backend`` says which one runs) when this onnxruntime build has none.

Which output is read, in order of preference (the graph ``training.export`` writes has the first two):

1. ``fake_prob`` — (N,) probability of class 1 computed in the graph; used as is.
2. ``logits`` — (N,2); the engine takes softmax(logits)[:, 1] (float32, as PyTorch does).
3. an output whose name contains ``prob`` with shape (N,2) — class probabilities; column 1 is used.
4. otherwise the first output: (N,) is taken as the probability, (N,2) as logits.

Threads: ``intra_op_num_threads`` = the CPUs this process may use — the cgroup CPU quota (v2
``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``) rounded up, capped by the CPU
affinity mask — because ONNX Runtime otherwise sizes its pool from the host's cores and a pod
limited to 2 CPUs on a 64-core node gets throttled to a crawl. One inter-op thread, sequential
execution (the graph is a chain; parallel branches buy nothing at 2 CPUs).

Memory pattern: off by default (``mem_pattern=False``). With it on, ORT pre-plans one block for all
intermediate tensors on top of its arena; on the full-width model that raised a bare ORT
process's peak RSS from 1.86 to 3.26 GB at batch 32 (0.74 → 1.07 GB at batch 8) with no
measurable speed gain on the 2-core box (bench/README.md).

INT8 (``precision="int8"``, CPU only): the graph statically quantised with calibration crops
(``worker.engine.ort_int8``), cached in the engine cache; the verdict's model block then carries
``int8_max_abs_diff``, the largest |Δ probability| against FP32 measured when it was built.

IO binding: off on the CPU (``session.run`` already reads the numpy input in place and the output
is a few floats per crop; measured no difference within noise, bench/README.md). On CUDA the
engine binds the output on the device and the input from host memory so ORT copies each once.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from worker.cpus import available_cpus
from worker.engine.base import describe_engine
from worker.engine.model_card import ModelCard, sha256_file
from worker.preprocess import crops_to_tensor_layout

log = logging.getLogger(__name__)

ONNX_DEFAULT_FILE = "model.onnx"
PARITY_CROPS = 64  # calibration crops an INT8 build is compared with FP32 on
# -- engine -------------------------------------------------------------------------------------------

def onnx_path_of(model_dir: Path, card: ModelCard) -> Path | None:
    """The model directory's ONNX file (the card's ``files["onnx"]``, else ``model.onnx``), if present."""
    name = card.files.get("onnx")
    if name:
        path = Path(model_dir) / name
        return path if path.is_file() else None
    path = Path(model_dir) / ONNX_DEFAULT_FILE
    return path if path.is_file() else None


def _softmax_class1(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e[:, 1] / e.sum(axis=1)).astype(np.float32)


class OnnxRuntimeEngine:
    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        intra_op_threads: int | None = None,
        io_binding: bool | None = None,
        mem_pattern: bool = False,
        precision: str = "fp32",
        calibration: Any = None,
        cache_dir: Path | str | None = None,
    ) -> None:
        import onnxruntime as ort

        if precision not in ("fp32", "int8"):
            raise ValueError(f"onnxruntime runs precision fp32 or int8, not {precision!r}")
        if precision == "int8" and device != "cpu":
            raise ValueError("onnxruntime int8 runs on the CPU (on a GPU, use tensorrt for int8)")
        if precision == "int8" and calibration is None:
            raise ValueError("precision 'int8' needs calibration crops: set DEEPFAKE_INT8_CALIBRATION (training "
                             "evaluate: --int8-calibration) to a directory of face-crop images or a .npy of "
                             "N×S×S×3 uint8 crops")
        self.precision = precision
        self.int8_max_abs_diff: float | None = None

        self.model_dir = Path(model_dir)
        self.card = ModelCard.load(self.model_dir)
        path = onnx_path_of(self.model_dir, self.card)
        if path is None:
            raise FileNotFoundError(
                f"no ONNX file in model directory {self.model_dir} (card files: {self.card.files}); "
                "export one with training.export.export_model_dir"
            )
        self.onnx_path = path
        self.sha256 = sha256_file(path)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = batch_size

        providers: list = ["CPUExecutionProvider"]
        self.device_type = "cpu"
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                device_id = int(device.split(":", 1)[1]) if ":" in device else 0
                providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
                self.device_type = "cuda"
                self.device_id = device_id
            else:
                log.warning("onnxruntime has no CUDAExecutionProvider (providers: %s); running on the CPU",
                            ", ".join(ort.get_available_providers()))
        elif device != "cpu":
            raise ValueError(f"unsupported device {device!r} for onnxruntime: cpu | cuda | cuda:N")

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.threads = intra_op_threads or available_cpus()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.enable_mem_pattern = mem_pattern
        self._session_options = so
        self.io_binding = (self.device_type == "cuda") if io_binding is None else io_binding
        if precision == "int8":
            self._load_int8(calibration, cache_dir)
        else:
            self._open(str(path), providers)
            if self.device_type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
                self.device_type = "cpu"  # the provider failed to initialise (no driver, no GPU)
                self.io_binding = bool(io_binding)
            self.backend = f"onnxruntime-{self.device_type}"

    def _open(self, source: str | bytes, providers: list | None = None) -> None:
        """Make `source` (a path or a serialised graph) the session `predict` runs, and find its tensors."""
        import onnxruntime as ort

        self.session = ort.InferenceSession(source, self._session_options,
                                            providers=providers or ["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"expected one graph input, got {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        self.output_name, self.output_kind = self._pick_output(self.session.get_outputs())

    def _load_int8(self, calibration: Any, cache_dir: Path | str | None) -> None:
        """Run the cached (or newly quantised) INT8 graph. Only a new build opens the FP32 graph, to
        measure the INT8 one against it on the calibration crops; that figure is kept beside the graph."""
        import json

        from worker.engine.calibration import load_calibration_crops
        from worker.engine.ort_int8 import load_or_quantize

        crops = load_calibration_crops(calibration, self.card.input_size)
        data, built, path = load_or_quantize(self.onnx_path, self.sha256, crops, self.card.input_size, cache_dir)
        fp32 = None
        if built:
            self._open(str(self.onnx_path))
            fp32 = self.predict(crops[:PARITY_CROPS])
        self._open(data)
        self.backend = "onnxruntime-cpu-int8"
        record = path.with_suffix(".parity.json")
        if fp32 is not None:
            self.int8_max_abs_diff = round(float(np.abs(self.predict(crops[:PARITY_CROPS]) - fp32).max()), 6)
            log.info("INT8 graph: max |Δ probability| %.4f vs FP32 on %d calibration crops",
                     self.int8_max_abs_diff, min(len(crops), PARITY_CROPS))
            try:
                record.write_text(json.dumps({"max_abs_diff": self.int8_max_abs_diff,
                                              "crops": int(min(len(crops), PARITY_CROPS))}) + "\n")
            except OSError as exc:  # a read-only cache: the figure is in the log
                log.warning("could not record INT8 parity beside %s (%s)", path, exc)
        else:
            try:
                self.int8_max_abs_diff = json.loads(record.read_text())["max_abs_diff"]
            except (OSError, ValueError, KeyError):
                self.int8_max_abs_diff = None

    @staticmethod
    def _pick_output(outputs) -> tuple[str, str]:  # type: ignore[no-untyped-def]
        """(name, kind) with kind "prob" (N,), "probs" (N,2) or "logits" (N,2); see the module docstring."""
        by_name = {o.name: o for o in outputs}
        if "fake_prob" in by_name:
            return "fake_prob", "prob"
        if "logits" in by_name:
            return "logits", "logits"
        for o in outputs:
            if "prob" in o.name.lower() and len(o.shape) == 2:
                return o.name, "probs"
        first = outputs[0]
        return first.name, ("prob" if len(first.shape) == 1 else "logits")

    def _to_prob(self, out: np.ndarray) -> np.ndarray:
        if self.output_kind == "prob":
            return out.reshape(-1).astype(np.float32)
        if self.output_kind == "probs":
            return out[:, 1].astype(np.float32)
        return _softmax_class1(out)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if not self.io_binding:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        if self.device_type == "cuda":
            binding.bind_output(self.output_name, "cuda", self.device_id)
        else:
            binding.bind_output(self.output_name)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def predict(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0,), dtype=np.float32)
        x = crops_to_tensor_layout(crops)
        out = [self._to_prob(self._run(x[i : i + self.batch_size])) for i in range(0, len(x), self.batch_size)]
        return np.concatenate(out).astype(np.float32)

    def describe(self) -> dict:
        block = describe_engine(self.card, self.backend, self.sha256)
        if self.precision == "int8":
            block["int8_max_abs_diff"] = self.int8_max_abs_diff  # vs FP32, on the calibration crops
        return block
