"""Face extraction for training and evaluation: videos → largest-face 1.3× crops in the crop cache.

Paper section III-A: the largest face per frame, an enlarged crop with scale 1.3, 270 consecutive
frames per training video and 100 per validation/test video (25 per video for Celeb-DF). The
paper used dlib; this uses the project's detector and `worker.preprocess.crop_face`, so training
crops are made exactly as the worker makes them when it serves.

Resumable: a video recorded as finished in the cache is skipped; a half-done one is decoded again
but only the frames not yet cached go through the detector.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Literal, Sequence

import av
import av.error
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from worker.decode import Limits, VideoReader
from worker.errors import ModerationError
from worker.faces import Face, FaceDetector, create_detector
from worker.preprocess import CROP_SCALE, DEFAULT_CROP_SIZE, DEFAULT_DETECTOR, CropRecipe, crop_face

from .crops import CropCache

log = logging.getLogger(__name__)

# Training data is trusted and can be long: only guard against absurd files.
EXTRACT_LIMITS = Limits(max_duration_s=4 * 3600.0, max_pixels=4096 * 4096, decode_timeout_s=3600.0)
Mode = Literal["even", "consecutive"]


@dataclass(frozen=True)
class VideoItem:
    path: Path
    label: int  # 0 real, 1 fake
    video_id: str  # unique across the cache split (data set, compression and name in it)
    split: str  # "train" | "val" | "test"
    manipulation: str = ""  # "" for real
    compression: str = ""  # "raw" | "c23" | "c40" | ...
    source: str = ""  # data set name: "ffpp", "celebdf", "dfd", ...
    frames: int | None = None  # per-video override of frames_per_video (e.g. to balance real/fake)


def assign_frames(items: Sequence[VideoItem], frames: dict[str, int],
                  balance: Sequence[str] = ("train", "val")) -> list[VideoItem]:
    """Each item's frame count: its own, else `frames[split]`; in the `balance` splits the more
    numerous class takes proportionally fewer frames per video (at least one), so that real and fake
    give about as many crops (paper III-A: "for training with all the manipulation types, we balance
    the number of frames for real and fake videos accordingly"; FF++'s four manipulations are 4
    fakes per real). Validation is balanced too: the checkpoint is picked on its accuracy."""
    counts = Counter((i.split, i.label) for i in items)
    out = []
    for item in items:
        n = item.frames or frames.get(item.split, max(frames.values()))
        mine, other = counts[(item.split, item.label)], counts[(item.split, 1 - item.label)]
        if item.frames is None and item.split in balance and other and mine > other:
            n = max(1, math.ceil(n * other / mine))
        out.append(replace(item, frames=n))
    return out


@dataclass
class ExtractStats:
    videos: int = 0  # extracted in this run
    skipped: int = 0  # already complete in the cache
    frames: int = 0  # frames read
    crops: int = 0  # crops written in this run
    no_face: int = 0  # frames where the detector found no face
    failed: list[tuple[str, str]] = field(default_factory=list)  # (video_id, error)


def largest_face(faces: Sequence[Face]) -> Face | None:
    """The face with the largest box, as the paper keeps one face per frame."""
    return max(faces, key=lambda f: f.area) if faces else None


def iter_frames(path: str | Path, n: int, mode: Mode = "even") -> Iterator[tuple[int, np.ndarray]]:
    """(frame number, H×W×3 uint8 RGB) for n frames: spread over the video, or its first n."""
    if mode == "even":
        with VideoReader(str(path), EXTRACT_LIMITS) as reader:
            fps = reader.info.fps or 25.0
            last = -1
            for s in reader.sample(n):
                number = max(int(round(s.t * fps)), last + 1)  # unique even on variable frame rates
                last = number
                yield number, s.image
    elif mode == "consecutive":
        with VideoReader(str(path), EXTRACT_LIMITS) as reader:
            for s in reader.first(n):
                yield s.index, s.image
    else:
        raise ValueError(f"mode must be 'even' or 'consecutive', got {mode!r}")


def _extract_one(item: VideoItem, cache: CropCache, detector: FaceDetector, n: int, mode: Mode, batch_size: int,
                 stats: ExtractStats) -> tuple[int, int]:
    frames_read = kept = 0
    batch: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        nonlocal kept
        if not batch:
            return
        faces = detector.detect(np.stack([img for _, img in batch]))
        for (number, img), found in zip(batch, faces):
            face = largest_face(found)
            if face is None:
                stats.no_face += 1
                continue
            crop = crop_face(img, face.box, cache.recipe.size, cache.recipe.scale)
            if cache.add(item.split, crop, label=item.label, video_id=item.video_id, frame=number,
                         source=item.source, manipulation=item.manipulation, compression=item.compression):
                stats.crops += 1
            kept += 1
        batch.clear()

    for number, img in iter_frames(item.path, n, mode):
        frames_read += 1
        if cache.has(item.split, item.video_id, number):
            kept += 1
            continue
        if batch and batch[0][1].shape != img.shape:
            flush()
        batch.append((number, img))
        if len(batch) >= batch_size:
            flush()
    flush()
    return frames_read, kept


def extract_videos(
    videos: Sequence[VideoItem],
    out_root: str | Path,
    *,
    frames_per_video: int,
    size: int = DEFAULT_CROP_SIZE,
    detector: FaceDetector | None = None,
    mode: Mode = "even",
    scale: float = CROP_SCALE,
    batch_size: int = 16,
    progress: bool = True,
) -> ExtractStats:
    """Detect, keep the largest face, crop (`scale`×, size×size) and cache, video by video.

    A video that cannot be decoded is logged and listed in `failed` and left unmarked, so a rerun
    tries it again; the others go on.
    """
    if frames_per_video < 1:
        raise ValueError(f"frames_per_video must be at least 1, got {frames_per_video}")
    if mode not in ("even", "consecutive"):
        raise ValueError(f"mode must be 'even' or 'consecutive', got {mode!r}")
    ids = [(v.split, v.video_id) for v in videos]
    if len(set(ids)) != len(ids):
        raise ValueError("video ids must be unique within a split")
    recipe = CropRecipe(size=size, scale=scale, detector=detector.name if detector else DEFAULT_DETECTOR)
    cache = CropCache(out_root, recipe)  # refuses a cache cut another way before the detector loads
    detector = detector or create_detector(DEFAULT_DETECTOR)
    stats = ExtractStats()
    # Warnings (a video skipped) go through the bar's own writer, on lines of their own, not onto the bar's.
    with logging_redirect_tqdm() if progress else contextlib.nullcontext():
        bar = tqdm(videos, desc="extract faces", unit="video", disable=not progress)
        for item in bar:
            if cache.video_done(item.split, item.video_id):
                stats.skipped += 1
                continue
            try:
                read, kept = _extract_one(item, cache, detector, item.frames or frames_per_video, mode, batch_size,
                                          stats)
            except (ModerationError, av.error.FFmpegError, FileNotFoundError) as exc:
                reason = " ".join(str(exc).split())  # one line, for the log and the summary
                log.warning("skipping %s (%s): %s", item.video_id, item.path, reason)
                stats.failed.append((item.video_id, reason))
            else:
                stats.frames += read
                stats.videos += 1
                cache.mark_video_done(item.split, item.video_id, frames=read, faces=kept)
            bar.set_postfix(crops=stats.crops, no_face=stats.no_face, failed=len(stats.failed))
    return stats
