"""training.data: self-blended images, the demo set, the crop cache, extraction and data-set readers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from media import carphone_frames, encode
from training.data import (
    CropCache,
    CropCacheMismatch,
    CropDataset,
    DatasetLayoutError,
    VideoItem,
    build_demo_crops,
    cache_recipe,
    caches_recipe,
    celebdf_videos,
    count_items,
    dfd_videos,
    extract_videos,
    ffpp_videos,
    read_index,
    self_blend,
    video_labels,
)
from training.data.crops import INDEX, MANIFEST, SPLITS
from worker.faces import Face, create_detector
from worker.preprocess import PREPROCESSING_VERSION, CropRecipe


@pytest.fixture(scope="module")
def detector():
    # One intra-op thread: on a shared 2-core box a second thread that spin-waits made detection ~7× slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield create_detector("retinaface-mobilenet")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def real_faces(detector) -> list[tuple[np.ndarray, Face]]:
    from skimage import data

    frames = [carphone_frames()[0], carphone_frames()[110], data.astronaut()]
    return [(f, detector.detect([f])[0][0]) for f in frames]


# -- self-blended images -------------------------------------------------------------------------
def test_self_blend_changes_only_the_face(real_faces):
    for frame, face in real_faces:
        for seed in range(6):
            fake, mask = self_blend(frame, face, np.random.default_rng(seed))
            assert fake.shape == frame.shape and fake.dtype == np.uint8
            assert mask.shape == frame.shape[:2] and mask.dtype == np.float32
            assert 0.0 <= mask.min() and mask.max() <= 1.0 and mask.max() >= 0.24
            ys, xs = np.nonzero(mask)
            w = mask[ys, xs]
            cx, cy = (xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()
            x1, y1, x2, y2 = face.box
            assert x1 < cx < x2 and y1 < cy < y2, "mask centroid outside the face box"
            assert np.array_equal(fake[mask == 0], frame[mask == 0]), "pixels outside the mask changed"
            inside = mask >= 0.5 * mask.max()
            diff = np.abs(fake.astype(np.int16) - frame.astype(np.int16)).mean(axis=2)
            assert diff[inside].mean() > 1.5, f"face barely changed (seed {seed})"
            assert inside.sum() > 0.2 * face.area, "mask far smaller than the face"


def test_self_blend_is_deterministic_per_seed(real_faces):
    frame, face = real_faces[0]
    a, ma = self_blend(frame, face, np.random.default_rng(7))
    b, mb = self_blend(frame, face, np.random.default_rng(7))
    c, mc = self_blend(frame, face, np.random.default_rng(8))
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert not np.array_equal(a, c) and not np.array_equal(ma, mc)


def test_self_blend_without_landmarks_and_bad_input(real_faces):
    frame, face = real_faces[2]
    boxed = Face(box=face.box, score=face.score, landmarks=None)  # type: ignore[arg-type]
    fake, mask = self_blend(frame, boxed, np.random.default_rng(0))
    assert mask.max() > 0 and np.array_equal(fake[mask == 0], frame[mask == 0])
    with pytest.raises(ValueError):
        self_blend(frame.astype(np.float32), face, np.random.default_rng(0))  # type: ignore[arg-type]


# -- demo set and crop cache ---------------------------------------------------------------------
SMALL = dict(size=64, astronaut_frames=4, lfw_faces=40)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory, detector) -> Path:
    root = tmp_path_factory.mktemp("demo")
    stats = build_demo_crops(root, detector=detector, **SMALL)
    assert stats.written > 200 and stats.skipped == 0
    return root


def test_demo_set_is_balanced_with_disjoint_videos(demo_root):
    ids: dict[str, set[str]] = {}
    for split in SPLITS:
        recs = read_index(demo_root, split)
        labels = [r.label for r in recs]
        assert labels.count(0) == labels.count(1) > 0, split
        ids[split] = {r.video_id for r in recs}
        for r in recs:  # every fake pairs with a real crop of the same frame
            assert r.label == (1 if r.video_id.endswith("_sbi") else 0)
            assert (r.manipulation == "sbi") == bool(r.label)
        fakes = {v.removesuffix("_sbi") for v in ids[split] if v.endswith("_sbi")}
        assert fakes == {v for v in ids[split] if not v.endswith("_sbi")}
        assert len(ids[split]) >= 4, "video-level metrics need several videos per split"
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert {r.source for r in read_index(demo_root, "test")} == {"carphone", "lfw"}
    labels = video_labels(demo_root, "val")
    assert set(labels.values()) == {0, 1}


def test_crop_dataset(demo_root):
    ds = CropDataset(demo_root, "val")
    x, label, vid = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert label in (0, 1) and isinstance(vid, str)
    mem = CropDataset(demo_root, "val", in_memory=True)
    assert torch.equal(mem[3][0], ds[3][0])
    torch.manual_seed(0)
    flipped = CropDataset(demo_root, "val", hflip=True, transform=lambda t: t * 2)
    outs = [flipped[3][0] for _ in range(12)]
    assert any(torch.equal(o, ds[3][0] * 2) for o in outs) and any(torch.equal(o, ds[3][0].flip(-1) * 2) for o in outs)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch[0].shape == (8, 3, 64, 64) and batch[1].dtype == torch.int64 and len(batch[2]) == 8
    with pytest.raises(FileNotFoundError):
        CropDataset(demo_root, "nonexistent")


def test_the_frequency_normalisation_is_fitted_on_crops_as_served_not_augmented(demo_root):
    """`train --augment` gives the training set a transform: the normalisation fitted through it
    described crops no model is ever served (validation, test and the worker never augment)."""
    from torch.utils.data import ConcatDataset, Subset

    from training.models import create_model
    from training.normalise import fit_frequency_norm

    def fitted(dataset) -> tuple[list[float], list[float]]:
        model = create_model("mdcsd_tiny", input_size=64)
        return fit_frequency_norm(model, dataset, crops=64, progress=False)

    plain = fitted(CropDataset(demo_root, "train"))
    augmented = CropDataset(demo_root, "train", hflip=True, transform=lambda t: (t * 0.3).clamp(0, 1))
    assert fitted(augmented) == plain
    assert fitted(Subset(ConcatDataset([augmented]), range(len(augmented)))) == plain
    assert augmented.transform is not None and augmented.hflip  # the training set keeps its augmentation


def test_labels_of_several_caches_come_from_their_indexes_not_their_crops(demo_root):
    """`train --balance` on several --data caches weighs crops by label: read from each cache's index,
    not by decoding every crop of the set (390k PNGs for FF++) before the first step."""
    from torch.utils.data import ConcatDataset

    from training.sampling import labels_of

    class Unreadable(CropDataset):
        def __getitem__(self, i):
            raise AssertionError("a crop was decoded for its label")

    val, test = Unreadable(demo_root, "val"), Unreadable(demo_root, "test")
    labels = labels_of(ConcatDataset([val, test]))
    assert labels == [r.label for r in read_index(demo_root, "val") + read_index(demo_root, "test")]
    assert set(labels) == {0, 1} and len(labels) == len(val) + len(test)


def test_demo_build_resumes(demo_root, tmp_path, detector):
    again = build_demo_crops(demo_root, detector=detector, **SMALL)
    assert again.written == 0 and again.skipped > 200
    part = build_demo_crops(tmp_path, detector=detector, max_new=101, **SMALL)  # an interrupted build
    assert part.written == 101
    with open(tmp_path / "train" / INDEX, "a") as fh:
        fh.write("carphone_c00/000099.png,0,carph")  # a torn line, as a kill mid-write leaves
    rest = build_demo_crops(tmp_path, detector=detector, **SMALL)
    assert rest.written + part.written == again.skipped and rest.counts == again.counts
    for split in SPLITS:
        full = {(r.video_id, r.frame): r.path for r in read_index(demo_root, split)}
        resumed = {(r.video_id, r.frame): r.path for r in read_index(tmp_path, split)}
        assert full == resumed
        for key in list(full)[::25]:  # the same randomness per item whatever the build order
            assert (demo_root / split / full[key]).read_bytes() == (tmp_path / split / resumed[key]).read_bytes()


def test_cache_rejects_bad_crops(tmp_path):
    cache = CropCache(tmp_path, CropRecipe(size=8))
    crop = np.zeros((8, 8, 3), np.uint8)
    assert cache.add("train", crop, label=1, video_id="a/b c", frame=3)
    assert not cache.add("train", crop, label=1, video_id="a/b c", frame=3)
    with pytest.raises(ValueError):
        cache.add("train", crop, label=2, video_id="x", frame=0)
    with pytest.raises(ValueError):
        cache.add("train", crop.astype(np.float32), label=0, video_id="x", frame=0)
    with pytest.raises(ValueError, match="expected a 8×8 crop"):
        cache.add("train", np.zeros((9, 9, 3), np.uint8), label=0, video_id="x", frame=0)
    assert CropCache(tmp_path, CropRecipe(size=8)).has("train", "a/b c", 3)


def test_a_cache_records_how_its_crops_were_cut_and_refuses_crops_cut_otherwise(tmp_path, caplog):
    crop = np.zeros((8, 8, 3), np.uint8)
    recipe = CropRecipe(size=8)
    assert cache_recipe(tmp_path) is None and not (tmp_path / MANIFEST).exists()  # nothing added, nothing written
    CropCache(tmp_path, recipe).add("train", crop, label=0, video_id="v", frame=0)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest == {"schema": "deepfake-crop-cache/1", "recipe": recipe.to_dict(), "inferred": False}
    assert cache_recipe(tmp_path) == recipe and recipe.version == PREPROCESSING_VERSION
    for other, named in ((CropRecipe(size=16), "size 16, not 8"), (CropRecipe(size=8, scale=1.5), "scale 1.5, not 1.3"),
                         (CropRecipe(size=8, detector="retinaface-resnet50"),
                          "detector retinaface-resnet50, not retinaface-mobilenet")):
        with pytest.raises(CropCacheMismatch, match=named):
            CropCache(tmp_path, other)
    assert read_index(tmp_path, "train")[0].video_id == "v"  # nothing was added

    # A cache from before manifests: its recipe inferred (size from its crops, version 1) and written,
    # with a warning, by the first run that adds to it; that run's crops do not make it newer.
    (tmp_path / MANIFEST).unlink()
    assert cache_recipe(tmp_path) == CropRecipe(size=8, version=1)
    with caplog.at_level("WARNING", logger="training.data.crops"):
        legacy = CropCache(tmp_path, recipe)
    assert "made by preprocessing version 1" in caplog.text and "HDR" in caplog.text
    legacy.add("val", crop, label=1, video_id="w", frame=0)
    assert json.loads((tmp_path / MANIFEST).read_text())["inferred"] is True
    assert cache_recipe(tmp_path) == CropRecipe(size=8, version=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "train", "val"]  # no temporary file left

    # Several caches read together: one recipe, the oldest version; cut differently, refused.
    newer = tmp_path / "newer"
    CropCache(newer, recipe).add("train", crop, label=0, video_id="n", frame=0)
    assert caches_recipe([newer, tmp_path]) == CropRecipe(size=8, version=1)
    # Crops by an older preprocessing added to a newer cache make it older.
    CropCache(newer, CropRecipe(size=8, version=1)).add("train", crop, label=0, video_id="n", frame=1)
    assert cache_recipe(newer) == CropRecipe(size=8, version=1)
    bigger = tmp_path / "bigger"
    CropCache(bigger, CropRecipe(size=16)).add("train", np.zeros((16, 16, 3), np.uint8), label=0, video_id="b", frame=0)
    with pytest.raises(CropCacheMismatch, match="were cut differently .*size 16, not 8"):
        caches_recipe([tmp_path, bigger])
    (bigger / MANIFEST).write_text("{}")
    with pytest.raises(ValueError, match="not a readable crop-cache manifest"):
        cache_recipe(bigger)


# -- extraction ----------------------------------------------------------------------------------
def test_extract_videos(tmp_path, detector):
    clip = encode(tmp_path / "carphone.mp4", carphone_frames()[::2], rate=15)
    bad = tmp_path / "broken.mp4"
    bad.write_text("not a video\n" * 10)
    items = [VideoItem(clip, 0, "car_even", "test", compression="h264", source="carphone"),
             VideoItem(clip, 1, "car_consec", "train", manipulation="x", frames=10),
             VideoItem(bad, 1, "broken", "train")]
    out = tmp_path / "crops"
    stats = extract_videos(items[:1], out, frames_per_video=40, size=96, detector=detector, progress=False)
    assert stats.videos == 1 and stats.frames == 40 and stats.crops >= 38 and not stats.failed  # faces in ≥ 95 %
    recs = read_index(out, "test")
    assert len({r.frame for r in recs}) == len(recs) and max(r.frame for r in recs) > 50  # spread over the clip
    stats = extract_videos(items, out, frames_per_video=40, size=96, detector=detector, mode="consecutive",
                           progress=False)
    assert stats.skipped == 1 and stats.videos == 1 and [v for v, _ in stats.failed] == ["broken"]
    assert [r.frame for r in read_index(out, "train")] == list(range(10))
    assert CropDataset(out, "train")[0][0].shape == (3, 96, 96)
    again = extract_videos(items, out, frames_per_video=40, size=96, detector=detector, progress=False)
    assert again.skipped == 2 and again.crops == 0 and len(again.failed) == 1
    assert cache_recipe(out) == CropRecipe(size=96, detector=detector.name)
    with pytest.raises(CropCacheMismatch, match="size 128, not 96.*extract into a new directory"):
        extract_videos(items, out, frames_per_video=40, size=128, detector=detector, progress=False)


# -- data-set readers ----------------------------------------------------------------------------
def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_ffpp_reader(tmp_path):
    splits = {"train": [["000", "001"], ["002", "003"]], "val": [["004", "005"]], "test": [["006", "007"]]}
    (tmp_path / "splits").mkdir()
    for name, pairs in splits.items():
        (tmp_path / "splits" / f"{name}.json").write_text(json.dumps(pairs))
        for a, b in pairs:
            for comp in ("c23", "c40"):
                _touch(tmp_path / f"original_sequences/youtube/{comp}/videos/{a}.mp4")
                _touch(tmp_path / f"original_sequences/youtube/{comp}/videos/{b}.mp4")
                for m in ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures"):
                    _touch(tmp_path / f"manipulated_sequences/{m}/{comp}/videos/{a}_{b}.mp4")
                    _touch(tmp_path / f"manipulated_sequences/{m}/{comp}/videos/{b}_{a}.mp4")
    items = ffpp_videos(tmp_path)
    assert count_items(items) == {("test", 0): 2, ("test", 1): 8, ("train", 0): 4, ("train", 1): 16,
                                  ("val", 0): 2, ("val", 1): 8}
    assert all(i.compression == "c23" and "/c23/" in i.path.as_posix() for i in items)
    assert len({i.video_id for i in items}) == len(items)
    df = ffpp_videos(tmp_path, splits=["train"], manipulations=["Deepfakes"], compression="c40")
    assert sorted(i.path.name for i in df if i.label) == ["000_001.mp4", "001_000.mp4", "002_003.mp4", "003_002.mp4"]
    assert {i.manipulation for i in df} == {"", "Deepfakes"} and {i.split for i in df} == {"train"}
    (tmp_path / "manipulated_sequences/Face2Face/c23/videos/005_004.mp4").unlink()
    with pytest.raises(DatasetLayoutError, match="missing"):
        ffpp_videos(tmp_path, splits=["val"])
    assert len(ffpp_videos(tmp_path, splits=["val"], missing="skip")) == 9
    with pytest.raises(DatasetLayoutError, match="raw"):
        ffpp_videos(tmp_path, compression="raw")
    with pytest.raises(DatasetLayoutError):
        ffpp_videos(tmp_path / "nowhere")
    with pytest.raises(ValueError):
        ffpp_videos(tmp_path, manipulations=["Nope"])
    # DeepFakeDetection's fakes are not <target>_<source>.mp4: accepted, it read nothing or failed on names
    # no such file has (its reader is dfd_videos)
    with pytest.raises(ValueError, match="DeepFakeDetection is a dataset of its own: dfd_videos"):
        ffpp_videos(tmp_path, manipulations=["DeepFakeDetection"], missing="skip")


def test_celebdf_reader(tmp_path):
    for folder, n in (("Celeb-real", 3), ("Youtube-real", 2), ("Celeb-synthesis", 5)):  # some copies spell it so
        for i in range(n):
            _touch(tmp_path / folder / f"{i:05d}.mp4")
    (tmp_path / "List_of_testing_videos.txt").write_text(
        "1 YouTube-real/00000.mp4\n1 Celeb-real/00001.mp4\n"
        "0 Celeb-synthesis/00000.mp4\n0 Celeb-synthesis/00003.mp4\n\n")
    test = celebdf_videos(tmp_path)
    assert [(i.label, i.path.parent.name, i.path.name) for i in test] == [
        (0, "Youtube-real", "00000.mp4"), (0, "Celeb-real", "00001.mp4"),
        (1, "Celeb-synthesis", "00000.mp4"), (1, "Celeb-synthesis", "00003.mp4")]
    train = celebdf_videos(tmp_path, split="train")
    assert count_items(train) == {("train", 0): 3, ("train", 1): 3}
    assert not {i.video_id for i in train} & {i.video_id for i in test}
    (tmp_path / "List_of_testing_videos.txt").write_text("0 Celeb-real/00000.mp4\n")  # labels disagree
    with pytest.raises(ValueError, match="labelled fake"):
        celebdf_videos(tmp_path)
    with pytest.raises(DatasetLayoutError):
        celebdf_videos(tmp_path / "Celeb-real")


def test_dfd_reader(tmp_path):
    for name in ("01__walk.mp4", "02__talk.mp4"):
        _touch(tmp_path / "original_sequences/actors/c23/videos" / name)
    for name in ("01_02__walk__AB.mp4", "02_01__talk__CD.mp4", "01_03__walk__EF.mp4"):
        _touch(tmp_path / "manipulated_sequences/DeepFakeDetection/c23/videos" / name)
    items = dfd_videos(tmp_path)
    assert count_items(items) == {("test", 0): 2, ("test", 1): 3}
    assert {i.manipulation for i in items if i.label} == {"DeepFakeDetection"}
    with pytest.raises(DatasetLayoutError, match="c40"):
        dfd_videos(tmp_path, compression="c40")
    with pytest.raises(DatasetLayoutError):
        dfd_videos(tmp_path / "original_sequences")
