"""What the training commands check before their long work, and what they say when something fails:
missing and corrupt crops are refused before the first epoch, a chosen --threshold drops the card's
review band, `extract` names the videos it skipped, `export` keeps another model's directory, and a
missing `train` extra is one line."""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import training.cli as cli
from test_training import SIZE
from training.cli import main
from training.data import CropCache, CropDataset, read_index
from training.export import export_model_dir
from training.models import create_model
from worker.preprocess import CropRecipe


def _noise_cache(root, videos: int = 2, frames: int = 2):
    """A crop cache of random crops (no detector): `videos` real and fake videos per split."""
    cache = CropCache(root, CropRecipe(size=SIZE))
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for v in range(videos):
            for label in (0, 1):
                for f in range(frames):
                    cache.add(split, rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), label=label,
                              video_id=f"{split}_{v}_{label}", frame=f)
    return root


def _checkpoint(path):
    """A best.pt of an untrained mdcsd_tiny, as `train` writes one."""
    model = create_model("mdcsd_tiny", input_size=SIZE)
    torch.save({"model": model.state_dict(), "model_config": model.model_config,
                "crop_recipe": CropRecipe(size=SIZE).to_dict()}, path)
    return path


def _train_argv(data, out) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--model", "mdcsd_tiny", "--model-arg",
            f"input_size={SIZE}", "--epochs", "1", "--batch-size", "4", "--no-progress"]


# -- 1. missing and corrupt crops -----------------------------------------------------------------------------


def test_missing_crops_are_refused_when_the_dataset_is_built(tmp_path, capsys):
    data = _noise_cache(tmp_path / "data")
    gone = data / "train" / read_index(data, "train")[5].path
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 8 crops indexed in .*train/index.csv are missing: "
                                                 + re.escape(str(gone))):
        CropDataset(data, "train")
    capsys.readouterr()
    assert main(_train_argv(data, tmp_path / "run")) == 1  # not an OSError in epoch 1
    err = capsys.readouterr().err
    assert f"are missing: {gone}; restore them" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_check_crops_names_every_corrupt_crop_before_training(tmp_path, capsys):
    data = _noise_cache(tmp_path / "data")
    bad = [data / split / read_index(data, split)[i].path for split, i in (("train", 2), ("val", 0))]
    for path in bad:
        path.write_bytes(path.read_bytes()[:60])  # cut short, as a full disk leaves one
    capsys.readouterr()
    assert main([*_train_argv(data, tmp_path / "run"), "--check-crops"]) == 1
    err = capsys.readouterr().err
    assert f"2 of 16 crops do not decode (cut short or corrupt): {bad[0]}, {bad[1]}" in err, err
    assert not (tmp_path / "run").exists()
    # --in-memory decodes every crop anyway: all the corrupt ones named at once, not the first alone
    assert main([*_train_argv(data, tmp_path / "run"), "--in-memory", "--check-crops"]) == 1
    assert "1 of 8 crops do not decode (cut short or corrupt): " + str(bad[0]) in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(_checkpoint(tmp_path / "best.pt")), "--data", str(data),
                 "--split", "val", "--out", str(tmp_path / "ev"), "--check-crops"]) == 1
    assert f"1 of 8 crops do not decode (cut short or corrupt): {bad[1]}" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


# -- 2. evaluate --threshold with a card's review band ------------------------------------------------------


def test_evaluate_threshold_drops_the_cards_review_band(tmp_path, caplog):
    data = _noise_cache(tmp_path / "data")
    model_dir = tmp_path / "model"
    export_model_dir(create_model("mdcsd_tiny", input_size=SIZE), model_dir, name="m", version="1", trained=False,
                     threshold=0.6, review_threshold=0.55, onnx=False)

    def evaluate(out, *extra):
        assert main(["evaluate", "--model-dir", str(model_dir), "--data", str(data), "--out", str(tmp_path / out),
                     *extra]) == 0
        return json.loads((tmp_path / out / "results.json").read_text())

    assert evaluate("card")["video_actions"]["review_threshold"] == 0.55  # the card's band under its threshold
    with caplog.at_level(logging.WARNING, logger="training.cli"):
        res = evaluate("chosen", "--threshold", "0.5")  # was refused: review threshold 0.55 above 0.5
    assert res["threshold"] == 0.5 and "video_actions" not in res
    said = [r.getMessage() for r in caplog.records if r.name == "training.cli"]
    assert said == ["--threshold 0.5 is not the model card's (0.6): its review band (from 0.55) is left out; "
                    "pass --review-threshold for one"], said
    assert evaluate("both", "--threshold", "0.5", "--review-threshold", "0.4")["video_actions"]["review_threshold"] == 0.4
    assert evaluate("same", "--threshold", "0.6")["video_actions"]["review_threshold"] == 0.55


# -- 3. extract names the videos it skipped ----------------------------------------------------------------


def _ffpp(root, broken: str):
    """A miniature FF++ layout of carphone clips, one fake video (`broken`) not a video at all."""
    from media import carphone_path

    (root / "splits").mkdir(parents=True)
    for split, pairs in (("train", [["000", "001"]]), ("val", []), ("test", [])):
        (root / "splits" / f"{split}.json").write_text(json.dumps(pairs))
    real = root / "original_sequences" / "youtube" / "c23" / "videos"
    fake = root / "manipulated_sequences" / "Deepfakes" / "c23" / "videos"
    for d, names in ((real, ["000", "001"]), (fake, ["000_001", "001_000"])):
        d.mkdir(parents=True)
        for n in names:
            if n == broken:
                (d / f"{n}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
            else:
                (d / f"{n}.mp4").symlink_to(carphone_path())
    return root


def test_extract_names_the_videos_that_failed(tmp_path, capsys, monkeypatch):
    root = _ffpp(tmp_path / "ffpp", broken="001_000")  # the last video: no success updates the bar after it
    argv = ["extract", "--dataset", "ffpp", "--root", str(root), "--out", str(tmp_path / "cache"),
            "--manipulations", "Deepfakes", "--splits", "train", "--frames", "1", "--size", "32"]
    # `python -m training` configures no logging: the root logger as it starts, not as a worker's
    # configure_logging, run by earlier tests in this process, left it
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    capsys.readouterr()
    assert main(argv) == 1
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["failed"] == 1 and summary["videos"] == 3, summary
    [failed] = summary["failed_videos"]
    assert failed["video"] == "ffpp_c23_Deepfakes_001_000" and failed["error"] and "\n" not in failed["error"]
    assert "failed=1" in err  # the bar counts it
    at = err.index("skipping ffpp_c23_Deepfakes_001_000")  # on a line of its own, not glued onto the bar's
    assert at == 0 or err[at - 1] in "\r\n", repr(err[max(0, at - 80):at + 40])
    # Many failures: the first 100 named, the rest counted.
    from training.data import ExtractStats

    many = ExtractStats(failed=[(f"v{i}", "unreadable") for i in range(130)])
    monkeypatch.setattr("training.data.extract_videos", lambda *a, **k: many)
    assert main(argv) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["failed"] == 130 and len(summary["failed_videos"]) == 100
    assert summary["failed_videos"][0] == {"video": "v0", "error": "unreadable"}
    assert summary["failed_videos_not_listed"] == 30


# -- 4. export keeps another model's directory ----------------------------------------------------------------


def test_export_refuses_to_replace_another_model(tmp_path, capsys):
    from worker.engine.model_card import ModelCard

    ckpt, out = _checkpoint(tmp_path / "best.pt"), tmp_path / "model"

    def export(name, version, *extra):
        return main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--name", name, "--version", version,
                     "--training-data", "noise", "--no-onnx", *extra])

    assert export("prod", "1.0") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    for name, version in (("other", "1.0"), ("prod", "2.0")):
        with pytest.raises(SystemExit) as exc:
            export(name, version)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err, err
        assert f"{out} holds model prod version 1.0, not {name} version {version}: export into another directory, " \
               "or pass --force to replace it" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert export("prod", "1.0") == 0  # the same model again: re-exported
    assert export("prod", "2.0", "--force") == 0 and ModelCard.load(out).version == "2.0"
    (out / "model.json").write_text("not a card")
    with pytest.raises(SystemExit):
        export("prod", "2.0")
    assert "holds a model.json that is not a model card" in capsys.readouterr().err
    # demo-model refuses before its minutes of training; a rerun over its own model is let through
    with pytest.raises(SystemExit) as exc:
        main(["demo-model", "--out", str(out), "--work", str(tmp_path / "work"), "--no-progress"])
    assert exc.value.code == 2 and "not mdcsd-tiny-sbi-demo version 0.1.0-demo" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
    from training.demo_commands import DEMO_NAME, DEMO_VERSION
    from training.export import check_replaces

    check_replaces(Path(__file__).parents[1] / "worker" / "default_model", DEMO_NAME, DEMO_VERSION)  # the packaged demo: no refusal


# -- 5. a missing `train` extra -------------------------------------------------------------------------------


def test_a_missing_train_extra_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # `import skimage` raises ModuleNotFoundError
    capsys.readouterr()
    assert main(["make-demo-data", "--out", str(tmp_path / "demo"), "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert err == "python -m training make-demo-data: needs skimage (pip install 'deepfake-moderation[train]')\n"

    def needs(module):
        def handler(args, parser):
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
        return handler

    monkeypatch.setattr(cli, "cmd_export", needs("onnxscript._framework_apis"))
    argv = ["export", "--checkpoint", "x.pt", "--out", "m", "--name", "n", "--version", "1", "--training-data", "t"]
    assert main(argv) == 2
    assert capsys.readouterr().err == ("python -m training export: needs onnxscript "
                                       "(pip install 'deepfake-moderation[train]')\n")
    monkeypatch.setattr(cli, "cmd_export", needs("torchvision"))  # not the extra's: a bug, its traceback kept
    with pytest.raises(ModuleNotFoundError):
        main(argv)
