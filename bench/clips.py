"""Benchmark inputs made from real footage: the carphone face upscaled into 720p/1080p H.264 clips."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from media import carphone_frames, encode, encode_hdr  # noqa: E402


def face_clip(path: Path, *, seconds: float = 10.0, height: int = 720, fps: int = 30, slices: int = 1,
              transfer: str | None = None) -> Path:
    """`seconds` of the carphone clip (looped back and forth) scaled to `height`, centred on a 16:9 canvas.

    Encoded with x264's defaults (GOP 250, B-frames, one slice per frame, as x264 and ffmpeg write
    uploads). PyAV's encoder otherwise asks x264 for sliced threads, which cut each frame into as many
    slices as it has threads and let a decoder spread one frame over cores: `slices=2` makes such a clip.
    With `transfer` (`sdr`, `hlg`, `pq`): 10-bit HEVC instead, as tests/media.py's `encode_hdr` stores it.
    """
    if path.exists():
        return path
    source = carphone_frames()
    loop = source + source[::-1]
    width = (height * 16 // 9) // 2 * 2
    scaled_w = int(round(176 * height / 144)) // 2 * 2
    frames = []
    for i in range(int(seconds * fps)):
        canvas = np.full((height, width, 3), 40, np.uint8)
        face = cv2.resize(loop[i % len(loop)], (scaled_w, height), interpolation=cv2.INTER_CUBIC)
        x = (width - scaled_w) // 2
        canvas[:, x : x + scaled_w] = face
        frames.append(canvas)
    path.parent.mkdir(parents=True, exist_ok=True)
    if transfer is not None:
        return encode_hdr(path, frames, transfer, rate=fps, x265_params="preset=ultrafast:crf=18")
    params = "sliced-threads=0" if slices == 1 else f"sliced-threads=1:threads={slices}:slices={slices}"
    return encode(path, frames, rate=fps, options={"x264-params": params})


def self_blended_clip(path: Path, frames: list[np.ndarray], detector, *, seed: int, fps: int = 8) -> Path:
    """A fake clip of `frames`: each frame's largest face self-blended (training.data.sbi, the demo
    model's kind of fake), a fresh blend per frame from `seed`; frames without a face stay real.
    Among equal faces (a tiled clip) the top-left one is blended, so reruns make the same clip."""
    from training.data.sbi import self_blend

    rng = np.random.default_rng(seed)
    fakes = []
    for frame, faces in zip(frames, detector.detect(np.stack(frames))):
        if faces:
            largest = max(faces, key=lambda f: (round((f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), -2),
                                                -f.box[1], -f.box[0]))
            frame = self_blend(frame, largest, rng)[0]
        fakes.append(frame)
    path.parent.mkdir(parents=True, exist_ok=True)
    return encode(path, fakes, rate=fps)
