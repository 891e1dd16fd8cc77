"""Exported model directories: the worker loads them, ONNX Runtime agrees with PyTorch, the card is complete;
and the bare ONNX export of a calibrated network with a dynamic batch axis."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from calibrated import astronaut_crops, calibrate
from torch import nn

from training.export import (
    ONNX_FILE,
    WEIGHTS_FILE,
    OnnxParityError,
    export_model_dir,
    onnx_parity,
    parity_inputs,
    save_model_dir,
    verify_model_dir,
)
from training.models import create_model
from worker.engine import load_engine
from worker.engine.model_card import ModelCard, sha256_file
from worker.preprocess import crops_to_tensor_layout

SIZE = 64


@pytest.fixture(scope="module")
def trained_like_model(corpus_crops):
    """A tiny model whose outputs on real crops spread over (0, 1) instead of all ~0.5 (a random
    classifier's), so parity is tested where probabilities are sensitive."""
    torch.manual_seed(0)
    model = create_model("mdcsd_tiny", input_size=SIZE).eval()
    x = torch.from_numpy(crops_to_tensor_layout(corpus_crops))
    with torch.no_grad():
        d = model(x)[:, 1] - model(x)[:, 0]
        gain = 2.0 / max(float(d.std()), 1e-6)
        model.classifier.weight.mul_(gain)
        model.classifier.bias.mul_(gain)
        model.classifier.bias[1] -= float(d.mean()) * gain
    return model


@pytest.fixture(scope="module")
def exported(trained_like_model, tmp_path_factory, corpus_crops):
    out = tmp_path_factory.mktemp("exported")
    card = export_model_dir(
        trained_like_model, out, name="tiny-test", version="0.0.1", trained=False,
        training_data="none: test fixture", metrics={"note": "test"}, parity_crops=corpus_crops,
        calibration={"real_scores": [0.1, 0.2, 0.3, 0.9], "target_fpr": 0.25, "level": "video", "data": "test"},
        provenance={"command": "pytest"},
    )
    return out, card


@pytest.fixture(scope="module")
def corpus_crops():
    """Real face crops: carphone frames through the worker's detector and cropper."""
    from media import carphone_frames

    from worker.faces import create_detector
    from worker.preprocess import crop_face

    frames = carphone_frames()[::20]
    det = create_detector("retinaface-mobilenet")
    crops = []
    for frame, faces in zip(frames, det.detect(np.stack(frames))):
        face = max(faces, key=lambda f: f.area)
        crops.append(crop_face(frame, face.box, size=SIZE))
    return np.stack(crops)


def test_card_fields_and_files(exported, trained_like_model):
    out, card = exported
    assert sorted(p.name for p in out.iterdir()) == ["model.json", ONNX_FILE, WEIGHTS_FILE]
    data = json.loads((out / "model.json").read_text())
    for key in ("name", "version", "architecture", "architecture_kwargs", "input_size", "normalization", "threshold",
                "operating_point", "trained", "training_data", "metrics", "files", "sha256", "onnx"):
        assert key in data, key
    assert data["architecture"] == "mdcsd_tiny" and data["input_size"] == SIZE
    assert data["architecture_kwargs"] == trained_like_model.model_config["kwargs"]
    assert data["files"] == {"weights": WEIGHTS_FILE, "onnx": ONNX_FILE}
    assert data["normalization"]["transform"] == "dct" and data["normalization"]["rgb_mean"] == [0.5] * 3
    # calibration: at most 1 of 4 reals may reach the threshold -> just above 0.3
    assert 0.3 < data["threshold"] <= 0.9 and data["operating_point"]["achieved_fpr"] == 0.25
    assert data["operating_point"]["target_fpr"] == 0.25 and "real_scores" not in data["operating_point"]
    assert data["onnx"]["parity"]["max_abs_diff_prob"] <= 1e-4 and data["onnx"]["opset"] >= 17
    assert data["provenance"] == {"command": "pytest"}
    ModelCard.load(out)  # the worker's own schema accepts it


def test_sha256_match_files(exported):
    out, card = exported
    digests = json.loads((out / "model.json").read_text())["sha256"]
    assert set(digests) == {WEIGHTS_FILE, ONNX_FILE}
    for name, digest in digests.items():
        assert sha256_file(out / name) == digest
    assert verify_model_dir(out) == {WEIGHTS_FILE: True, ONNX_FILE: True}
    (out / ONNX_FILE).write_bytes((out / ONNX_FILE).read_bytes() + b"\0")
    try:
        assert verify_model_dir(out)[ONNX_FILE] is False
    finally:
        (out / ONNX_FILE).write_bytes((out / ONNX_FILE).read_bytes()[:-1])
    assert verify_model_dir(out)[ONNX_FILE] is True


def test_worker_engine_loads_and_matches(exported, trained_like_model, corpus_crops):
    out, card = exported
    engine = load_engine(out)
    probs = engine.predict(corpus_crops)
    assert probs.shape == (len(corpus_crops),) and probs.dtype == np.float32
    with torch.no_grad():
        ref = torch.softmax(trained_like_model(torch.from_numpy(crops_to_tensor_layout(corpus_crops))), 1)[:, 1]
    np.testing.assert_allclose(probs, ref.numpy(), atol=1e-6)
    assert engine.describe()["sha256"] == sha256_file(out / WEIGHTS_FILE)
    assert engine.card.threshold == card.threshold


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_runtime_parity(exported, trained_like_model, corpus_crops, batch):
    out, _ = exported
    model = onnx.load(str(out / ONNX_FILE))
    onnx.checker.check_model(model)
    assert not list(out.glob("*.data")), "the graph must be one self-contained file"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    sess = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    x = crops_to_tensor_layout(np.resize(corpus_crops, (batch, SIZE, SIZE, 3)) if batch > len(corpus_crops)
                               else corpus_crops[:batch])
    logits, prob = sess.run(["logits", "fake_prob"], {"crops": x})
    with torch.no_grad():
        ref_logits = trained_like_model(torch.from_numpy(x))
    ref = torch.softmax(ref_logits, 1)[:, 1].numpy()
    assert prob.shape == (batch,) and logits.shape == (batch, 2)
    assert np.abs(prob - ref).max() <= 1e-4
    assert batch == 1 or np.ptp(ref) > 0.2  # outputs are not all alike
    assert np.abs(logits - ref_logits.numpy()).max() <= 1e-3


def test_parity_check_raises_on_mismatch(trained_like_model, tmp_path, monkeypatch):
    import training.export as export_mod

    real = export_mod.onnx_parity

    def broken(*args, **kwargs):
        res = real(*args, **kwargs)
        res["max_abs_diff_prob"] = 0.5
        return res

    monkeypatch.setattr(export_mod, "onnx_parity", broken)
    with pytest.raises(OnnxParityError):
        export_model_dir(trained_like_model, tmp_path, name="x", version="0", trained=False)
    assert not (tmp_path / ONNX_FILE).exists() and not (tmp_path / "model.json").exists()


@pytest.fixture(scope="module")
def old_model_dir(trained_like_model, tmp_path_factory):
    """A complete model directory (weights, graph, card) to export over; each test copies it."""
    out = tmp_path_factory.mktemp("old") / "model"
    export_model_dir(trained_like_model, out, name="old", version="1", trained=False)
    return out


@pytest.mark.parametrize("failure", ["parity", "card"])
def test_a_failed_export_over_a_model_directory_leaves_it_as_it_was(failure, old_model_dir, tmp_path, monkeypatch):
    """The worker loads what the directory holds: new weights beside the old card (and no graph) used to
    be left by an export that failed its parity check or its card's validation."""
    import training.export as export_mod

    out = tmp_path / "model"
    shutil.copytree(old_model_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    changed = create_model("mdcsd_tiny", input_size=SIZE)  # other weights
    if failure == "parity":
        real = export_mod.onnx_parity
        monkeypatch.setattr(export_mod, "onnx_parity", lambda *a, **k: {**real(*a, **k), "max_abs_diff_prob": 0.5})
        with pytest.raises(OnnxParityError):
            export_model_dir(changed, out, name="new", version="2", trained=False)
    else:  # a review threshold above the threshold: the card refuses it, after the files were written
        with pytest.raises(ValueError, match="review_threshold 0.9 is above threshold 0.5"):
            export_model_dir(changed, out, name="new", version="2", trained=False, threshold=0.5,
                             review_threshold=0.9)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging directory left behind
    assert all(verify_model_dir(out).values()) and load_engine(out).card.name == "old"


def test_export_through_a_link_to_the_model_directory(trained_like_model, tmp_path):
    """A model directory reached by a symlink (a mounted volume, elsewhere): staged beside where it
    points, so the files move in by rename, which fails across filesystems (EXDEV). The volume is
    on /dev/shm (tmpfs) where there is one, another filesystem than the test's directory."""
    import tempfile

    shm = Path("/dev/shm")
    volume = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path / "volume"
    try:
        if shm.is_dir():  # what makes a rename from beside the link fail (EXDEV)
            assert volume.stat().st_dev != tmp_path.stat().st_dev
        real = volume / "model"
        real.mkdir(parents=True)
        link = tmp_path / "deploy" / "model"
        link.parent.mkdir()
        link.symlink_to(real, target_is_directory=True)
        export_model_dir(trained_like_model, link, name="linked", version="1", trained=False, onnx=False)
        assert link.is_symlink() and (real / "model.json").is_file() and load_engine(link).card.name == "linked"
        assert sorted(p.name for p in volume.iterdir()) == ["model"]  # no staging directory left behind
    finally:
        shutil.rmtree(volume, ignore_errors=True)


def test_parity_helper_and_synthetic_inputs(exported, trained_like_model):
    out, _ = exported
    crops = parity_inputs(SIZE, n=3)
    assert crops.shape == (3, SIZE, SIZE, 3) and crops.dtype == np.uint8 and crops.std() > 10
    res = onnx_parity(trained_like_model, out / ONNX_FILE, crops, batch_sizes=(1, 2))
    assert set(res["per_batch_size"]) == {"1", "2"} and res["max_abs_diff_prob"] <= 1e-4


def test_save_model_dir_still_works(trained_like_model, tmp_path):
    card = save_model_dir(trained_like_model, tmp_path, name="n", version="v", architecture="mdcsd_tiny",
                          architecture_kwargs=trained_like_model.model_config["kwargs"], trained=False,
                          input_size=SIZE)
    assert card.files == {"weights": WEIGHTS_FILE}
    assert load_engine(tmp_path).predict(np.zeros((2, SIZE, SIZE, 3), np.uint8)).shape == (2,)


def test_export_without_onnx(trained_like_model, tmp_path):
    card = export_model_dir(trained_like_model, tmp_path, name="n", version="v", trained=False, onnx=False)
    assert card.files == {"weights": WEIGHTS_FILE} and not (tmp_path / ONNX_FILE).exists()


def test_worker_onnx_engine_matches_pytorch(exported, trained_like_model, corpus_crops):
    out, _ = exported
    engine = load_engine(out, backend="onnxruntime")
    probs = engine.predict(corpus_crops)
    with torch.no_grad():
        ref = torch.softmax(trained_like_model(torch.from_numpy(crops_to_tensor_layout(corpus_crops))), 1)[:, 1]
    np.testing.assert_allclose(probs, ref.numpy(), atol=1e-4)
    assert engine.describe()["sha256"] == sha256_file(out / ONNX_FILE)


# -- bare ONNX export -------------------------------------------------------------------------------

class _Probabilities(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,S,S) -> (B,2)
        return torch.softmax(self.model(x), dim=1)


def export_and_compare(model: nn.Module, path: Path, crops: np.ndarray) -> tuple[float, float]:
    """Export probabilities with a dynamic batch axis; max |ORT - torch| over batches 1 and 3, and
    the spread of the fake-probability (so a constant output cannot pass)."""
    wrapped = _Probabilities(model).eval()
    torch.onnx.export(
        wrapped, (torch.rand(2, 3, 299, 299),), str(path), input_names=["crops"], output_names=["probs"],
        dynamic_axes={"crops": {0: "batch"}, "probs": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    assert not list(path.parent.glob("*.data"))  # weights inside the one file
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for b in (1, 3):
        x = crops[:b]
        with torch.no_grad():
            ref = wrapped(torch.from_numpy(x)).numpy()
        out = sess.run(None, {"crops": x})[0]
        assert out.shape == (b, 2)
        worst = max(worst, float(np.abs(out - ref).max()))
    return worst, float(np.ptp(ref[:, 1]))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter is deprecated, still works
def test_onnx_export_dynamic_batch(tmp_path: Path) -> None:
    real_crops = astronaut_crops()
    torch.manual_seed(0)
    calib = torch.cat([torch.from_numpy(real_crops), torch.rand(5, 3, 299, 299)])
    model = calibrate(create_model("mdcsd_tiny"), calib)
    err, spread = export_and_compare(model, tmp_path / "mdcsd_tiny.onnx", real_crops)
    assert err < 1e-4 and spread > 1e-3  # measured ~1e-7

    # float64 spectrum products (the reference precision) export and agree too.
    model64 = calibrate(create_model("mdcsd_tiny", spectrum_precision="float64"), calib)
    err64, _ = export_and_compare(model64, tmp_path / "mdcsd_tiny_fp64.onnx", real_crops)
    assert err64 < 1e-4
