"""A candidate model in shadow (DEEPFAKE_SHADOW_MODEL_DIR) on real footage: scored on the same faces,
decided by its own card, recorded and counted beside the production action, never acted on."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from structlog.testing import capture_logs
from verdict_schema import assert_valid_verdict

from worker.decision import ALLOW, BLOCK
from worker.engine.model_card import ModelCard
from worker.metrics import Metrics
from worker.pipeline import DEFAULT_MODEL_DIR, ConfigurationError, Moderator
from worker.runtime import WorkerRuntime


def candidate(src, dst, **card_fields):
    """The same weights under another card (threshold, input size): a stand-in for a retrained model."""
    shutil.copytree(src, dst)
    card = ModelCard.load(dst)
    ModelCard.model_validate({**card.model_dump(by_alias=True), **card_fields}).save(dst)
    return dst


@pytest.fixture(scope="module")
def production(moderator, corpus):
    return moderator.moderate_path(corpus["carphone"])


def test_a_shadow_model_is_recorded_beside_the_verdict_and_never_acts(settings, moderator, corpus, production,
                                                                      random_model_dir, tmp_path):
    # The seeded random model blocks carphone (score a little above its 0.5 threshold); the candidate,
    # with the same weights but a threshold above that score, would allow it.
    top = production["decision"]["score"]
    shadow_dir = candidate(random_model_dir, tmp_path / "candidate", name="candidate", version="2",
                           threshold=round(top + 0.05, 6))
    # DEEPFAKE_REVIEW_THRESHOLD is the production model's: the candidate keeps its own card's (none).
    m = Moderator(settings.model_copy(update={"shadow_model_dir": shadow_dir, "review_threshold": 0.1}),
                  detector=moderator.detector, engine=moderator.engine)
    v = assert_valid_verdict(m.moderate_path(corpus["carphone"]))
    assert (v["label"], v["action"], v["score"]) == (production["label"], BLOCK, production["score"])  # unchanged
    assert v["decision"]["review_threshold"] == 0.1 and v["shadow"]["decision"]["review_threshold"] is None
    shadow = v["shadow"]
    assert shadow["model"]["name"] == "candidate" and shadow["model"]["sha256"] == v["model"]["sha256"]
    assert (shadow["label"], shadow["action"], shadow["agrees"]) == ("real", ALLOW, False)
    assert shadow["score"] == v["score"] and shadow["decision"]["score"] == top  # same weights, same faces
    assert shadow["decision"]["threshold"] == round(top + 0.05, 6) and v["timings_ms"]["shadow"] > 0

    metrics = Metrics()
    metrics.observe_verdict(v)
    metrics.observe_verdict(production)  # no shadow: not counted
    assert metrics.registry.get_sample_value("deepfake_shadow_actions_total",
                                             {"action": BLOCK, "shadow_action": ALLOW}) == 1
    assert metrics.registry.get_sample_value("deepfake_shadow_actions_total",
                                             {"action": BLOCK, "shadow_action": BLOCK}) is None

    # No face, no shadow block; an error verdict has none either.
    assert "shadow" not in m.moderate_path(corpus["no_face_mp4"])
    assert "shadow" not in m.moderate_path(corpus["damaged_tail_mp4"])


def test_a_shadow_model_of_another_input_size_gets_its_own_crops(settings, moderator, corpus, production):
    """The packaged demo model (128-px crops, its own weights) in shadow of the 299-px test model: its
    crops are cut again from the frame at its size, not resized from the production crops."""
    m = Moderator(settings.model_copy(update={"shadow_model_dir": DEFAULT_MODEL_DIR}), detector=moderator.detector,
                  engine=moderator.engine)
    assert m.shadow.crop_size == 128 and m.crop_size == 299
    v = assert_valid_verdict(m.moderate_path(corpus["carphone"]))
    assert v["score"] == production["score"] and v["shadow"]["model"]["name"] == "mdcsd-tiny-sbi-demo"
    assert v["shadow"]["score"] < 0.3 and v["shadow"]["action"] == ALLOW  # the demo model knows this clip as real
    shadow_crops, indices = _first_chunk(m, corpus["carphone"])
    assert len(shadow_crops) == len(indices) > 0 and {c.shape for c in shadow_crops} == {(128, 128, 3)}


def test_crops_are_cut_as_each_model_card_says_its_training_crops_were(settings, moderator, corpus, production,
                                                                     random_model_dir, tmp_path):
    """A card's crop recipe decides the enlargement the worker cuts with, for the production model and
    for a shadow of the same input size (cut again from the frame, not shared); a card without one
    gets the paper's 1.3×."""
    from worker.decode import VideoReader
    from worker.pipeline import StageTimer
    from worker.preprocess import CROP_SCALE, CropRecipe, crop_face

    assert ModelCard.load(random_model_dir).crop_recipe is None  # a card from before recipes: 1.3×, version 1
    assert moderator.recipe == CropRecipe(size=299, scale=CROP_SCALE, version=1)
    wide_recipe = {"size": 299, "scale": 1.8, "detector": "retinaface-mobilenet", "version": 2}
    wide = candidate(random_model_dir, tmp_path / "wide", name="wide", crop_recipe=wide_recipe)
    m = Moderator(settings.model_copy(update={"model_dir": wide, "shadow_model_dir": random_model_dir}),
                  detector=moderator.detector)
    assert (m.recipe.scale, m.shadow.recipe.scale, m.shadow.crop_size) == (1.8, CROP_SCALE, 299)
    with VideoReader(str(corpus["carphone"]), m.limits) as reader:
        frames = [f.image for f in reader.sample(8, mode=settings.sampling, max_gap_s=settings.max_sample_gap_s)]
    found = moderator.detector.detect(frames)
    with VideoReader(str(corpus["carphone"]), m.limits) as reader:
        chunks = m._crop_chunks(reader, 8, StageTimer())
        first = next(chunks)
        chunks.close()
    crops, shadow_crops, indices = first.crops, first.shadow_crops, first.scored
    boxes = [max(fs, key=lambda f: f.area).box for fs in found if fs][:len(crops)]
    assert len(crops) == len(shadow_crops) == len(indices) == len(boxes) > 0
    for crop, shadow_crop, box, frame in zip(crops, shadow_crops, boxes, [f for f, fs in zip(frames, found) if fs]):
        assert np.array_equal(crop, crop_face(frame, box, 299, 1.8))
        assert np.array_equal(shadow_crop, crop_face(frame, box, 299, CROP_SCALE))
    v = assert_valid_verdict(m.moderate_path(corpus["carphone"]))
    assert v["shadow"]["score"] == production["score"] != v["score"]  # same weights: only the crops differ

    other = candidate(random_model_dir, tmp_path / "resnet", name="resnet",
                      crop_recipe={**wide_recipe, "detector": "retinaface-resnet50", "version": 1})
    with capture_logs() as logs:
        Moderator(settings.model_copy(update={"model_dir": other}), detector=moderator.detector)
    [differ] = [e for e in logs if e["event"] == "model_crops_differ"]
    assert (differ["trained_with"], differ["detector"]) == ("retinaface-resnet50", "retinaface-mobilenet")
    [older] = [e for e in logs if e["event"] == "model_preprocessing_older"]
    assert older["trained_with_version"] == 1 and "HDR" in older["changes_since"][0]
    with pytest.raises(ValueError, match="crop_recipe size 128 is not input_size 299"):
        candidate(random_model_dir, tmp_path / "bad", crop_recipe={**wide_recipe, "size": 128})


def test_a_failing_shadow_model_never_costs_the_verdict(settings, moderator, corpus, production, random_model_dir,
                                                        tmp_path):
    """A candidate whose card disagrees with its own graph (128-px crops for a network built for 299)
    raises on every batch: the production verdict is whole, without a shadow block, and logged."""
    broken = candidate(random_model_dir, tmp_path / "broken", name="broken", input_size=128)
    m = Moderator(settings.model_copy(update={"shadow_model_dir": broken}), detector=moderator.detector,
                  engine=moderator.engine)
    with capture_logs() as logs:
        v = assert_valid_verdict(m.moderate_path(corpus["carphone"]))
    assert v["status"] == "ok" and v["score"] == production["score"] and v["action"] == production["action"]
    assert "shadow" not in v
    [failed] = [e for e in logs if e["event"] == "shadow_failed"]  # once: the rest of the job skips it
    assert failed["model"] == "broken" and failed["source"] == str(corpus["carphone"])


def test_the_queue_worker_counts_shadow_failures(settings, moderator, corpus, random_model_dir, s3_server, tmp_path):
    s3 = s3_server.bucket_with("shadow-broken", {"a.mp4": corpus["carphone"].read_bytes()})
    s = settings.model_copy(update={
        "s3_endpoint_url": s3_server.endpoint, "allowed_buckets": "shadow-broken", "frames": 4,
        "verdict_prefix": f"v-{tmp_path.name}/",
        "shadow_model_dir": candidate(random_model_dir, tmp_path / "broken", name="broken", input_size=128)})
    rt = WorkerRuntime(s, moderator=Moderator(s, detector=moderator.detector, engine=moderator.engine), s3_client=s3)
    v = rt.moderate_s3("shadow-broken", "a.mp4")
    assert v["status"] == "ok" and "shadow" not in v
    assert rt.metrics.registry.get_sample_value("deepfake_shadow_failures_total") == 1
    rt.moderate_s3("shadow-broken", "a.mp4")  # reused: nothing ran, nothing failed
    assert rt.metrics.registry.get_sample_value("deepfake_shadow_failures_total") == 1


def _first_chunk(m: Moderator, path):
    """The first chunk's shadow crops and face indices, through the pipeline's own cropping."""
    from worker.decode import VideoReader
    from worker.pipeline import StageTimer

    with VideoReader(str(path), m.limits) as reader:
        chunks = m._crop_chunks(reader, 8, StageTimer())
        first = next(chunks)
        chunks.close()
    return first.shadow_crops, first.scored


def test_the_queue_worker_publishes_and_stores_the_shadow(settings, moderator, corpus, random_model_dir, s3_server,
                                                          tmp_path):
    s3 = s3_server.bucket_with("shadowed", {"a.mp4": corpus["carphone"].read_bytes()})
    s = settings.model_copy(update={"s3_endpoint_url": s3_server.endpoint, "allowed_buckets": "shadowed", "frames": 4,
                                    "verdict_prefix": f"v-{tmp_path.name}/",
                                    "shadow_model_dir": candidate(random_model_dir, tmp_path / "c", name="next")})
    rt = WorkerRuntime(s, moderator=Moderator(s, detector=moderator.detector, engine=moderator.engine), s3_client=s3)
    assert rt.published()["shadow_model"]["name"] == "next"
    assert rt.published()["decision_policy"] == moderator.policy.published()  # duplicates match as before
    v = rt.moderate_s3("shadowed", "a.mp4")
    stored = json.loads(s3.get_object(Bucket="shadowed", Key=f"{s.verdict_prefix}a.mp4.json")["Body"].read())
    assert stored["shadow"] == v["shadow"] and v["shadow"]["agrees"] is True  # same card threshold: same action


def test_the_setting_from_the_environment_and_a_missing_directory(random_model_dir, corpus, tmp_path):
    env = {**os.environ, "DEEPFAKE_LOG_FORMAT": "json", "DEEPFAKE_SHADOW_MODEL_DIR": str(random_model_dir)}
    proc = subprocess.run([sys.executable, "-m", "worker", "moderate", "--model", str(random_model_dir), "--frames",
                           "4", str(corpus["carphone"])], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["shadow"]["agrees"] is True
    env["DEEPFAKE_SHADOW_MODEL_DIR"] = str(tmp_path / "nowhere")
    proc = subprocess.run([sys.executable, "-m", "worker", "moderate", "--model", str(random_model_dir),
                           str(corpus["carphone"])], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and f"no model.json in {tmp_path / 'nowhere'}" in proc.stderr
    with pytest.raises(ConfigurationError):
        from worker.settings import Settings

        Moderator(Settings(model_dir=random_model_dir, shadow_model_dir=tmp_path / "nowhere"))
