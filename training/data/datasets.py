"""`VideoItem` lists from the official layouts of FaceForensics++, Celeb-DF (v2) and DFD.

Nothing here decodes video: the readers only walk directories and split files, checking that the
layout is what the download scripts produce, so a wrong root fails at once with the path that
was expected instead of hours into extraction. Labels: 0 real, 1 fake (the model's class order).
Video ids carry the data set and compression so several sets can share one crop cache.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Literal, Sequence

from .extract import VideoItem

FFPP_MANIPULATIONS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")  # the paper's four
FFPP_KNOWN = FFPP_MANIPULATIONS + ("FaceShifter",)  # named <target>_<source>.mp4 from the split pairs
# DeepFakeDetection, hosted beside them, is not: its files are named by actors and scenes, its reals sit
# under actors/ (`dfd_videos`, `extract --dataset dfd`).
FFPP_COMPRESSIONS = ("raw", "c23", "c40")
SPLITS = ("train", "val", "test")
CELEBDF_DIRS = {"Celeb-real": 0, "YouTube-real": 0, "Celeb-synthesis": 1}
CELEBDF_LIST = "List_of_testing_videos.txt"
Missing = Literal["error", "skip"]


class DatasetLayoutError(FileNotFoundError):
    """The root does not hold the data set's official layout (or a listed video is missing)."""


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"{what}: expected directory {path} does not exist")
    return path


def _check_compression(compression: str) -> None:
    if compression not in FFPP_COMPRESSIONS:
        raise ValueError(f"compression must be one of {FFPP_COMPRESSIONS}, got {compression!r}")


def _check_missing(paths: Iterable[Path], missing: Missing, what: str) -> None:
    gone = [p for p in paths if not p.is_file()]
    if gone and missing == "error":
        shown = ", ".join(str(p) for p in gone[:3])
        raise DatasetLayoutError(f"{what}: {len(gone)} listed videos are missing (e.g. {shown}); "
                                 "pass --missing skip (missing='skip' in Python) to use only those present")


def read_ffpp_split(root: str | Path, split: str) -> list[tuple[str, str]]:
    """The official pairs of a split: `<root>/splits/<split>.json`, a list of ["071", "054"]."""
    path = Path(root) / "splits" / f"{split}.json"
    if not path.is_file():
        raise DatasetLayoutError(f"FaceForensics++ split file {path} does not exist (get train/val/test.json "
                                 "from the FaceForensics repository's dataset/splits)")
    pairs = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise ValueError(f"{path}: expected a list of [target, source] id pairs")
    return [(str(a), str(b)) for a, b in pairs]


def ffpp_videos(
    root: str | Path,
    *,
    splits: Sequence[str] = SPLITS,
    manipulations: Sequence[str] = FFPP_MANIPULATIONS,
    compression: str = "c23",
    real: bool = True,
    missing: Missing = "error",
) -> list[VideoItem]:
    """FaceForensics++ videos of the official splits (720/140/140 real videos when complete).

    Each pair (a, b) gives the real videos a and b and, per manipulation, the fakes a_b and b_a.
    """
    root = Path(root)
    _need_dir(root, "FaceForensics++ root")
    _check_compression(compression)
    unknown = [m for m in manipulations if m not in FFPP_KNOWN]
    if unknown:
        dfd = " (DeepFakeDetection is a dataset of its own: dfd_videos)" if "DeepFakeDetection" in unknown else ""
        raise ValueError(f"unknown FaceForensics++ manipulations {unknown}; known: {FFPP_KNOWN}{dfd}")
    real_path = root / "original_sequences" / "youtube" / compression / "videos"
    real_dir = _need_dir(real_path, "FaceForensics++ real videos") if real else None
    fake_dirs = {m: _need_dir(root / "manipulated_sequences" / m / compression / "videos", f"FaceForensics++ {m}")
                 for m in manipulations}
    items: list[VideoItem] = []
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        pairs = read_ffpp_split(root, split)
        if real_dir is not None:
            for vid in sorted({v for pair in pairs for v in pair}):
                items.append(VideoItem(real_dir / f"{vid}.mp4", 0, f"ffpp_{compression}_real_{vid}", split,
                                       "", compression, "ffpp"))
        for m, d in fake_dirs.items():
            for a, b in pairs:
                for t, s in ((a, b), (b, a)):
                    items.append(VideoItem(d / f"{t}_{s}.mp4", 1, f"ffpp_{compression}_{m}_{t}_{s}", split,
                                           m, compression, "ffpp"))
    _check_missing([i.path for i in items], missing, "FaceForensics++")
    return [i for i in items if i.path.is_file()]


def _child_dir(root: Path, name: str) -> Path:
    """`root/name`, matched case-insensitively (copies of Celeb-DF spell it YouTube-real or Youtube-real)."""
    if (root / name).is_dir():
        return root / name
    for child in root.iterdir():
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    raise DatasetLayoutError(f"Celeb-DF: expected directory {root / name} does not exist")


def read_celebdf_list(root: str | Path) -> list[tuple[int, str]]:
    """(label, relative path) from List_of_testing_videos.txt.

    The file's first column is 1 for a real video and 0 for a fake one, the opposite of the
    project's labels; it is turned into 0 real / 1 fake here.
    """
    path = Path(root) / CELEBDF_LIST
    if not path.is_file():
        raise DatasetLayoutError(f"Celeb-DF test list {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ("0", "1"):
            raise ValueError(f"{path}:{n}: expected '<1 real|0 fake> <dir>/<name>.mp4', got {line!r}")
        out.append((1 - int(parts[0]), parts[1]))
    return out


def celebdf_videos(
    root: str | Path, *, split: Literal["test", "train"] = "test", missing: Missing = "error"
) -> list[VideoItem]:
    """Celeb-DF v2: the official test list (518 videos), or every other video as "train".

    Labels come from the directory (Celeb-real, YouTube-real: real; Celeb-synthesis: fake) and
    must agree with the list's column. "train" shares celebrities (the `idN` in the names) with the
    test list, as the dataset's own protocol does: a model trained on it and tested on the list has
    seen those faces, so a cross-dataset score (the paper's: trained on FF++) needs the test list alone,
    which is all `python -m training extract --dataset celebdf` reads.
    """
    root = Path(root)
    _need_dir(root, "Celeb-DF root")
    dirs = {name: _child_dir(root, name) for name in CELEBDF_DIRS}
    by_lower = {name.lower(): name for name in CELEBDF_DIRS}
    listed: list[tuple[int, str, str]] = []  # label, canonical dir, file name
    for label, rel in read_celebdf_list(root):
        folder, _, name = rel.replace("\\", "/").partition("/")
        canon = by_lower.get(folder.lower())
        if canon is None or not name:
            raise ValueError(f"Celeb-DF list entry {rel!r} is not in {sorted(CELEBDF_DIRS)}")
        if CELEBDF_DIRS[canon] != label:
            raise ValueError(f"Celeb-DF list entry {rel!r} is labelled {'fake' if label else 'real'} "
                             f"but lies in {canon}")
        listed.append((label, canon, name))
    if split == "test":
        chosen = listed
    elif split == "train":
        test = {(d, n) for _, d, n in listed}
        chosen = [(CELEBDF_DIRS[d], d, p.name) for d, path in dirs.items() for p in sorted(path.glob("*.mp4"))
                  if (d, p.name) not in test]
    else:
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    items = [VideoItem(dirs[d] / name, label, f"celebdf_{d}_{Path(name).stem}", split,
                       "celebdf-synthesis" if label else "", "", "celebdf") for label, d, name in chosen]
    _check_missing([i.path for i in items], missing, "Celeb-DF")
    return [i for i in items if i.path.is_file()]


def dfd_videos(root: str | Path, *, compression: str = "c23", split: str = "test") -> list[VideoItem]:
    """DeepFakeDetection (hosted with FF++): actors' real videos and their DeepFakeDetection fakes."""
    root = Path(root)
    _need_dir(root, "DFD root")
    _check_compression(compression)
    real = _need_dir(root / "original_sequences" / "actors" / compression / "videos", "DFD real videos")
    fake = _need_dir(root / "manipulated_sequences" / "DeepFakeDetection" / compression / "videos", "DFD fake videos")
    items = [VideoItem(p, 0, f"dfd_{compression}_real_{p.stem}", split, "", compression, "dfd")
             for p in sorted(real.glob("*.mp4"))]
    items += [VideoItem(p, 1, f"dfd_{compression}_fake_{p.stem}", split, "DeepFakeDetection", compression, "dfd")
              for p in sorted(fake.glob("*.mp4"))]
    if not items:
        raise DatasetLayoutError(f"DFD: no .mp4 videos under {real} or {fake}")
    return items


def count_items(items: Iterable[VideoItem]) -> dict[tuple[str, int], int]:
    """{(split, label): number of videos}: a quick check against the published counts."""
    return dict(sorted(Counter((i.split, i.label) for i in items).items()))
