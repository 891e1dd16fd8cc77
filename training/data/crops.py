"""The on-disk face-crop cache and the torch Dataset that reads it.

Layout (one directory per split, crops lossless so training sees exactly what was cropped)::

    <root>/cache.json                 how the crops were made (worker.preprocess.CropRecipe)
    <root>/<split>/index.csv          path,label,video_id,frame,source,manipulation,compression
    <root>/<split>/videos.csv         video_id,frames,faces  (videos whose extraction finished)
    <root>/<split>/<video_id>/<frame:06d>.png

Writing appends one row per crop after its PNG is on disk and flushes, so an interrupted build
loses at most the crop in flight; a rerun skips every (video_id, frame) already indexed. A torn
last line (a kill mid-write) is ignored on reading and rewritten by the rerun.

`cache.json` records the crops' recipe (side, enlargement, detector, preprocessing version): a run
that would cut crops another way into the cache is refused, training checks the crops fit the
model, and the exported model card carries the recipe to the worker, which cuts crops the same way.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from worker.preprocess import CropRecipe, crops_to_tensor_layout

log = logging.getLogger(__name__)
INDEX = "index.csv"
VIDEOS = "videos.csv"
MANIFEST = "cache.json"
MANIFEST_SCHEMA = "deepfake-crop-cache/1"
SPLITS = ("train", "val", "test")
LABELS = {0: "real", 1: "fake"}  # the model's class order: 1 = fake


@dataclass(frozen=True)
class CropRecord:
    path: str  # relative to the split directory
    label: int  # 0 real, 1 fake
    video_id: str
    frame: int  # frame number in the video (or the item's position for still images)
    source: str = ""  # data set / footage the crop came from
    manipulation: str = ""  # "" for real, else e.g. "Deepfakes", "sbi"
    compression: str = ""  # e.g. "c23", "c40", "raw", "h264"


FIELDS = [f.name for f in fields(CropRecord)]
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(video_id: str) -> str:
    """A file-system-safe directory name for a video id."""
    name = _SAFE.sub("_", video_id).strip("._")
    if not name:
        raise ValueError(f"video id {video_id!r} has no usable characters")
    return name


def _read_rows(path: Path, required: list[str]) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]  # a torn last line: the writer was killed mid-row
    rows = list(csv.DictReader(lines))
    return [r for r in rows if all(r.get(k) not in (None, "") for k in required)]  # drops malformed rows


def read_index(root: str | Path, split: str) -> list[CropRecord]:
    """All crops of one split, in writing order (empty when the split does not exist)."""
    rows = _read_rows(Path(root) / split / INDEX, ["path", "label", "video_id", "frame"])
    return [
        CropRecord(r["path"], int(r["label"]), r["video_id"], int(r["frame"]), r.get("source") or "",
                   r.get("manipulation") or "", r.get("compression") or "")
        for r in rows
    ]


def video_labels(root: str | Path, split: str) -> dict[str, int]:
    """video_id → label for a split: what video-level evaluation aggregates frame scores into."""
    out: dict[str, int] = {}
    for r in read_index(root, split):
        if out.setdefault(r.video_id, r.label) != r.label:
            raise ValueError(f"video {r.video_id!r} in {split} has crops with both labels")
    return out


class CropCacheMismatch(ValueError):
    """Crops cut another way would be mixed: into one cache, or from several caches into one run."""


def cache_recipe(root: str | Path) -> CropRecipe | None:
    """How a cache's crops were made: its manifest's recipe, or None when it has none and no crops.

    A cache made before caches kept one (deepfake 0.3.0 and earlier) gets an inferred recipe: the
    side of its first crop, the enlargement and detector `extract` always used, preprocessing version 1.
    """
    root = Path(root)
    path = root / MANIFEST
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("schema") != MANIFEST_SCHEMA:
                raise ValueError(f"schema {data.get('schema')!r}, not {MANIFEST_SCHEMA!r}")
            return CropRecipe.from_dict(data["recipe"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path} is not a readable crop-cache manifest: {exc}") from exc
    for index in sorted(root.glob(f"*/{INDEX}")):
        records = read_index(root, index.parent.name)
        if records:
            return CropRecipe(size=load_crop(index.parent / records[0].path).shape[0], version=1)
    return None


def caches_recipe(roots: list[str | Path] | list[Path]) -> CropRecipe | None:
    """The one recipe of the crops of several caches read together (its version: the oldest).

    Raises :class:`CropCacheMismatch` when two caches' crops were cut differently."""
    found = [(Path(r), rec) for r in roots if (rec := cache_recipe(r)) is not None]
    if not found:
        return None
    first_root, recipe = found[0]
    for root, other in found[1:]:
        if conflicts := recipe.conflicts(other):
            raise CropCacheMismatch(f"crop caches {first_root} and {root} were cut differently ({root}: "
                                    f"{', '.join(conflicts)}); train or evaluate on caches made the same way")
    return replace(recipe, version=min(r.version for _, r in found))


def recipe_mismatch(root: str | Path, trained: CropRecipe | None) -> str | None:
    """Why a cache's crops are not those a model was trained on (and the worker would cut for it), or None."""
    here = cache_recipe(root)
    if trained is None or here is None or not (conflicts := trained.conflicts(here)):
        return None
    return (f"{root} holds crops cut with {', '.join(conflicts)} as the model's training crops were: its scores "
            "here are not those the worker would give")


class CropCache:
    """Appending writer for a crop cache at `root`; safe to reopen on a half-written cache.

    Every crop added is cut by `recipe`. Reopening a cache whose crops were cut another way raises
    :class:`CropCacheMismatch`; one made by an older preprocessing version is added to with a
    warning, and keeps the older version in its manifest.
    """

    def __init__(self, root: str | Path, recipe: CropRecipe) -> None:
        self.root = Path(root)
        self.recipe = recipe
        self._keys: dict[str, set[tuple[str, int]]] = {}
        self._done: dict[str, dict[str, dict[str, str]]] = {}
        self._existing = cache_recipe(self.root)
        # Written before this object's first crop is indexed: anew for a cache without one, and for one
        # that this run's older preprocessing makes older.
        self._manifest_written = (self.root / MANIFEST).is_file() and not (
            self._existing is not None and recipe.version < self._existing.version)
        if self._existing is not None:
            if conflicts := self._existing.conflicts(recipe):
                raise CropCacheMismatch(
                    f"{self.root} holds crops cut with size {self._existing.size}, scale {self._existing.scale}, "
                    f"detector {self._existing.detector}; this run cuts {', '.join(conflicts)}: "
                    "extract into a new directory")
            if self._existing.version < recipe.version:
                log.warning("%s holds crops made by preprocessing version %d; crops added now are made by "
                            "version %d (%s). The cache keeps version %d; extract into a new directory for crops "
                            "all made the new way", self.root, self._existing.version, recipe.version,
                            "; ".join(self._existing.changes_since()), self._existing.version)

    def _write_manifest(self) -> None:
        """cache.json, before the first crop this object adds is indexed (a cache from 0.3.0 gets its
        inferred recipe); the version is the oldest of its crops'."""
        if self._manifest_written:
            return
        recipe, inferred = self.recipe, False
        if self._existing is not None:
            recipe = replace(recipe, version=min(recipe.version, self._existing.version))
            inferred = not (self.root / MANIFEST).is_file()  # crops made before caches kept manifests
        manifest = {"schema": MANIFEST_SCHEMA, "recipe": recipe.to_dict(), "inferred": inferred}
        tmp = self.root / f"{MANIFEST}.{os.getpid()}.tmp"  # two writers never share a temporary file
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.root / MANIFEST)
        self._manifest_written = True

    def _split_dir(self, split: str) -> Path:
        if not split or "/" in split or split.startswith("."):
            raise ValueError(f"bad split name {split!r}")
        d = self.root / split
        d.mkdir(parents=True, exist_ok=True)
        return d

    def keys(self, split: str) -> set[tuple[str, int]]:
        if split not in self._keys:
            self._keys[split] = {(r.video_id, r.frame) for r in read_index(self.root, split)}
        return self._keys[split]

    def has(self, split: str, video_id: str, frame: int) -> bool:
        return (video_id, int(frame)) in self.keys(split)

    def add(self, split: str, crop: np.ndarray, *, label: int, video_id: str, frame: int, source: str = "",
            manipulation: str = "", compression: str = "") -> bool:
        """Store one S×S×3 uint8 RGB crop; False (nothing written) when it is already indexed."""
        if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
            raise ValueError(f"expected an S×S×3 uint8 crop, got {crop.shape} {crop.dtype}")
        if crop.shape[:2] != (self.recipe.size, self.recipe.size):
            raise ValueError(f"expected a {self.recipe.size}×{self.recipe.size} crop (the cache's recipe), "
                             f"got {crop.shape[1]}×{crop.shape[0]}")
        if label not in LABELS:
            raise ValueError(f"label must be 0 (real) or 1 (fake), got {label!r}")
        if self.has(split, video_id, frame):
            return False
        d = self._split_dir(split)
        rel = f"{safe_name(video_id)}/{int(frame):06d}.png"
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(d / rel), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {d / rel}")
        self._write_manifest()  # after the crop is on disk, before it is indexed
        rec = CropRecord(rel, int(label), video_id, int(frame), source, manipulation, compression)
        self._append(d / INDEX, FIELDS, asdict(rec))
        self.keys(split).add((video_id, int(frame)))
        return True

    @staticmethod
    def _append(path: Path, header: list[str], row: dict) -> None:
        new = not path.is_file() or path.stat().st_size == 0
        if not new:  # a torn last line must not swallow the next row
            with open(path, "rb") as fh:
                fh.seek(-1, 2)
                torn = fh.read(1) != b"\n"
        with open(path, "a", newline="", encoding="utf-8") as fh:
            if not new and torn:
                fh.write("\n")
            w = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
            if new:
                w.writeheader()
            w.writerow(row)
            fh.flush()

    def done_videos(self, split: str) -> dict[str, dict[str, str]]:
        if split not in self._done:
            rows = _read_rows(self.root / split / VIDEOS, ["video_id", "frames", "faces"])
            self._done[split] = {r["video_id"]: r for r in rows}
        return self._done[split]

    def video_done(self, split: str, video_id: str) -> bool:
        return video_id in self.done_videos(split)

    def mark_video_done(self, split: str, video_id: str, *, frames: int, faces: int) -> None:
        """Record that a video's extraction finished (`frames` read, `faces` crops kept)."""
        row = {"video_id": video_id, "frames": str(frames), "faces": str(faces)}
        self._append(self._split_dir(split) / VIDEOS, ["video_id", "frames", "faces"], row)
        self.done_videos(split)[video_id] = row

    def counts(self, split: str) -> dict[int, int]:
        """{label: number of crops} for a split."""
        out = {0: 0, 1: 0}
        for r in read_index(self.root, split):
            out[r.label] += 1
        return out


def load_crop(path: str | Path) -> np.ndarray:
    """A cached crop as S×S×3 uint8 RGB."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"could not read crop {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _some(paths: Sequence[Path], n: int = 5) -> str:
    """The first `n` paths, and how many more: one line however many there are."""
    more = f" and {len(paths) - n} more" if len(paths) > n else ""
    return ", ".join(str(p) for p in paths[:n]) + more


class CropDataset(Dataset):
    """(x: float32 3×S×S in [0, 1], label: int, video_id: str) per cached crop of one split.

    `hflip=True` flips half the crops left-right (torch RNG, so DataLoader worker seeding applies);
    `transform` then gets the 3×S×S tensor. `in_memory=True` decodes every PNG once up front, which
    pays off for small sets trained for many epochs on CPU.

    Every indexed crop must exist (a stat each, checked here): one gone would otherwise end a
    training run when an epoch first reaches it, possibly hours in. Whether each decodes is
    :func:`check_crops`' (``--check-crops``), which reads them all.
    """

    def __init__(self, root: str | Path, split: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 *, hflip: bool = False, in_memory: bool = False) -> None:
        self.root = Path(root)
        self.split = split
        self.records = read_index(self.root, split)
        if not self.records:
            raise FileNotFoundError(f"no crops for split {split!r} under {self.root} "
                                    f"(missing {self.root / split / INDEX})")
        if missing := [p for p in self.paths() if not os.path.isfile(p)]:
            raise FileNotFoundError(f"{len(missing)} of the {len(self.records)} crops indexed in "
                                    f"{self.root / split / INDEX} are missing: {_some(missing)}; restore them, "
                                    "or extract into a new directory")
        self.transform = transform
        self.hflip = hflip
        self._cache = _decode_all([self], progress=False, keep=True) if in_memory else None

    def __len__(self) -> int:
        return len(self.records)

    def paths(self) -> list[Path]:
        """Each crop's file, in index order."""
        return [self.root / self.split / r.path for r in self.records]

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        r = self.records[i]
        try:
            img = self._cache[i] if self._cache is not None else load_crop(self.root / self.split / r.path)
        except OSError as exc:  # deleted, unreadable, cut short or corrupt since the index was written
            raise OSError(f"{exc} (gone, unreadable or corrupt): remove its row from {self.root / self.split / INDEX}, or "
                          "extract into a new directory; --check-crops names every such crop before the "
                          "first epoch") from exc
        x = torch.from_numpy(crops_to_tensor_layout(img[None])[0])  # the worker's own conversion
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.transform is not None:
            x = self.transform(x)
        return x, r.label, r.video_id


def _decode_all(datasets: Iterable[CropDataset], progress: bool, keep: bool) -> list[np.ndarray]:
    """Decode every crop of `datasets`, in order (kept when `keep`: a check of a large set must not
    hold them all); raises ValueError naming all that do not decode."""
    paths = [p for ds in datasets for p in ds.paths()]
    images, bad = [], []
    for path in tqdm(paths, desc="check crops", unit="crop", disable=not progress, leave=False):
        try:
            image = load_crop(path)
        except OSError:
            bad.append(path)
            continue
        if keep:
            images.append(image)
    if bad:
        raise ValueError(f"{len(bad)} of {len(paths)} crops do not decode (cut short or corrupt): {_some(bad, 20)}; "
                         "remove their rows from index.csv, or extract into a new directory")
    return images


def check_crops(datasets: Iterable[CropDataset], progress: bool = True) -> int:
    """Decode every crop before the first epoch (``--check-crops``), so that a corrupt one is named
    now, with all the others, rather than ending the run when an epoch reaches it. Returns how many."""
    datasets = list(datasets)
    _decode_all(datasets, progress, keep=False)
    return sum(len(ds) for ds in datasets)
