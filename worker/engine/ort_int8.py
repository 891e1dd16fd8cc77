"""INT8 for ONNX Runtime on the CPU: the model's ONNX graph statically quantised with real face crops.

The convolutions and fully connected layers (nearly all of the FLOPs) become INT8 with per-channel
weights and unsigned 8-bit activations (QDQ format: what x86's VNNI kernels run; on an x86 CPU
without VNNI the weights use 7 bits, see `weights_7bit`); the frequency
branch's log-spectrum (the DCT matrix products, |·|, log), the convolution that reads it and the
input normalisation stay FP32, for the reason the TensorRT build pins them (small DCT coefficients
are differences of large sums).
Activation ranges come from MinMax calibration over the crops.

Quantising the full model takes ~0.4 s per calibration crop on 2 cores (64 crops: 27 s, 1.6 GB peak),
so the result is kept in the engine cache (`worker.engine.cache`)
under the ONNX file's sha256, a digest of the calibration crops, the ONNX Runtime version and the weight width; pods
that share the cache volume reuse it. Each build records the largest |Δ probability| against the
FP32 graph on the calibration crops, which the engine reports in the verdict's model block.
"""
from __future__ import annotations

import hashlib
import logging
import platform
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.cache import EngineCache, EngineKey
from worker.preprocess import crops_to_tensor_layout

log = logging.getLogger(__name__)

QUANTIZED_OPS = ["Conv", "Gemm"]  # everything else (MatMul of the DCT, Abs, Log, Sub, Div...) stays FP32
CALIBRATION_BATCH = 1  # crops per calibration run: memory grows with it (see quantize)


def int8_key(onnx_sha256: str, crops: np.ndarray, input_size: int) -> EngineKey:
    import onnxruntime as ort

    return EngineKey(
        gpu_name="cpu", compute_capability="any", tensorrt_version="none", onnx_sha256=onnx_sha256,
        precision="int8", batch_profile=(1, 0, 0), input_size=input_size,  # (1, 0, 0): any batch size
        extra={"runtime": "onnxruntime-qdq", "onnxruntime": ort.__version__, "ops": QUANTIZED_OPS,
               "fp32": "spectrum-convs", "weight_bits": 7 if weights_7bit() else 8,
               "calibration_sha256": hashlib.sha256(np.ascontiguousarray(crops).tobytes()).hexdigest(),
               "calibration_crops": int(len(crops))},
    )


def spectrum_convs(graph: Any) -> list[str]:
    """Conv nodes that read the log-spectrum directly (a Log upstream, no Conv in between): their
    INT8 input would quantise the spectrum itself. On the demo model, keeping the frequency branch's
    first convolution in FP32 halved the INT8 drift (max |Δp| 0.061 → 0.030 on 32 real crops)."""
    producer = {out: node for node in graph.node for out in node.output}
    found = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        stack, seen, reads_log = [node.input[0]], set(), False
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor not in producer:
                continue
            seen.add(tensor)
            up = producer[tensor]
            if up.op_type == "Conv":
                continue
            reads_log |= up.op_type == "Log"
            stack.extend(up.input)
        if reads_log:
            found.append(node.name)
    return found


def quantize(onnx_path: Path, crops: np.ndarray) -> bytes:
    """The INT8 QDQ graph of `onnx_path`, calibrated on `crops` (N×S×S×3 uint8)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [crops_to_tensor_layout(crops[i:i + CALIBRATION_BATCH]).astype(np.float32)
               for i in range(0, len(crops), CALIBRATION_BATCH)]

    class Crops(CalibrationDataReader):
        """Batches of crops, handed to the calibrator one range at a time (see CalibStridedMinMax)."""

        def __init__(self, input_name: str) -> None:
            self.input_name = input_name
            self.it = iter(batches)

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.it = iter(batches[start_index:end_index])

        def get_next(self) -> dict | None:
            x = next(self.it, None)
            return None if x is None else {self.input_name: x}

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deepfake-int8-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre), load_external_data=False).graph
        quantize_static(str(pre), str(out), Crops(graph.input[0].name), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        reduce_range=weights_7bit(),
                        op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=spectrum_convs(graph),
                        # MinMax keeps every intermediate tensor of every batch until the end: 64 full-model
                        # crops in batches of 8 peaked at 7.5 GB. One crop per run, ranges merged after each,
                        # peaked at 1.6 GB whatever the count, and ran faster (26.8 vs 40.9 s).
                        # (CalibMaxIntermediateOutputs would be the knob, but ORT 1.32 drops that data.)
                        extra_options={"CalibStridedMinMax": 1})
        data = out.read_bytes()
    log.info("quantised %s to INT8 on %d crops in %.1f s", onnx_path.name, len(crops), time.perf_counter() - t0)
    return data


def load_or_quantize(onnx_path: Path, onnx_sha256: str, crops: np.ndarray, input_size: int,
                     cache_dir: Path | str | None) -> tuple[bytes, bool, Path]:
    """(INT8 graph bytes, quantised now?, its cache path): from the cache, else quantised and stored."""
    cache = EngineCache(cache_dir)
    key = int8_key(onnx_sha256, crops, input_size)
    data, built = cache.get_or_build(key, lambda: quantize(onnx_path, crops))
    return data, built, cache.path_for(key)


@lru_cache(maxsize=1)
def weights_7bit() -> bool:
    """Whether to quantise weights to 7 bits (ONNX Runtime's reduce_range): on an x86 CPU without VNNI
    its U8S8 kernels add pairs of products in int16 (VPMADDUBSW), which saturates with 8-bit weights.
    On this project's AVX2-only CI machine (AMD EPYC) that moved the demo model's held-out
    probabilities by up to 0.157 from FP32; 7-bit weights there: within 0.06, as 8-bit on VNNI."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True  # unknown: the safe choice costs a little precision, never saturates
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)
