"""The core moderation pipeline: source → decode → faces → crops → model → verdict.

A `Moderator` loads the detector and the model once and then scores any number of videos; each
call returns a verdict and never raises for bad input.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import structlog
import torch

from worker.cpus import available_cpus, bound_thread_pools, thread_budget
from worker.decision import DecisionPolicy
from worker.decode import Limits, SampledFrame, VideoReader
from worker.engine import Engine, load_engine
from worker.engine.base import checked_probabilities
from worker.errors import ConfigurationError  # noqa: F401 - importable from here too (it was defined here)
from worker.errors import Internal, Interrupted, ModerationError, TransientError
from worker.faces import FaceDetector, create_detector
from worker.prefetch import prefetch
from worker.preprocess import crop_face
from worker.settings import Settings
from worker.shadow import ShadowModel
from worker.source import LocalSource, Source
from worker.tracks import faces_to_score
from worker.verdict import aggregate_mean, error_verdict, no_face_verdict, ok_verdict

log = structlog.get_logger("worker.pipeline")

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def check_device(device: str) -> None:
    """A CUDA device where this PyTorch has none is a configuration error, said in one line (torch's own
    is an AssertionError from deep inside the first `.to()`)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        why = "was built without CUDA" if torch.version.cuda is None else "sees no CUDA GPU"
        raise ConfigurationError(f"device {device!r} (DEEPFAKE_DEVICE / --device): this PyTorch {why}")


def resolve_model_dir(model_dir: Path | None) -> Path:
    """The configured model directory, or the packaged demo model when none is set."""
    path = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
    if not (path / "model.json").is_file():
        hint = "" if model_dir is not None else " (no packaged default model: pass --model DIR or set DEEPFAKE_MODEL_DIR)"
        raise ConfigurationError(f"no model.json in {path}{hint}")
    return path


class StageTimer:
    """Accumulates wall time per stage in milliseconds."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()  # stages may run in the prefetch thread

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.ms[name] += (time.perf_counter() - start) * 1000.0

    def timed(self, name: str, items: Iterator[SampledFrame]) -> Iterator[SampledFrame]:
        """Charge the time spent producing each item of `items` to `name`."""
        while True:
            with self.stage(name):
                item = next(items, None)
            if item is None:
                return
            yield item

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self.ms.items()}


@dataclass
class CropChunk:
    """One `detect_batch` of sampled frames: their face records, and the crops of those scored."""

    frames: int
    frames_with_face: int = 0
    faces: list[dict] = field(default_factory=list)
    scored: list[int] = field(default_factory=list)  # index into `faces` of each crop's face
    crops: list[np.ndarray] = field(default_factory=list)
    shadow_crops: list[np.ndarray] = field(default_factory=list)  # when the shadow model cuts otherwise


def check_recipe(card, detector: str) -> None:  # card: ModelCard
    """Log where the worker cuts a model's crops otherwise than its training crops were cut: with
    another detector (boxes differ a little), or with a newer preprocessing version."""
    if trained := card.other_detector(detector):
        log.warning("model_crops_differ", model=card.name, trained_with=trained, detector=detector,
                    note="faces are found with another detector than the model's training crops were")
    recipe = card.recipe()
    if changes := recipe.changes_since():
        log.info("model_preprocessing_older", model=card.name, trained_with_version=recipe.version,
                 changes_since=changes)


def face_record(t: float, frame_index: int, face, largest: bool) -> dict:
    return {
        "t": round(t, 3),
        "frame": frame_index,
        "box": [round(float(v), 1) for v in face.box],
        "detector_score": round(float(face.score), 4),
        "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in face.landmarks],
        "largest": largest,
        "fake_score": None,
    }


class Moderator:
    """Scores videos with one detector and one model engine, both loaded once."""

    def __init__(self, settings: Settings, *, detector: FaceDetector | None = None, engine: Engine | None = None,
                 shadow_engine: Engine | None = None) -> None:
        self.settings = settings
        check_device(settings.device)
        self.limits = Limits(settings.max_duration_s, settings.max_pixels, settings.decode_timeout_s,
                             fast_pass_max_bytes=settings.fast_pass_max_mb << 20)
        self.decode_threads = settings.decode_threads or available_cpus()
        bound_thread_pools(thread_budget(settings.engine_threads))
        self.engine = engine or self._load_engine(resolve_model_dir(settings.model_dir))
        self.model_block = self.engine.describe()
        if settings.require_vetted_model and self.model_block.get("warning"):  # before the rest loads
            raise ConfigurationError(
                f"DEEPFAKE_REQUIRE_VETTED_MODEL: the model {self.model_block.get('name')!r} is not one to moderate "
                f"with: {self.model_block['warning']} (set DEEPFAKE_MODEL_DIR to a trained model)")
        if shadow_engine is None and settings.shadow_model_dir is not None:
            try:
                shadow_engine = self._load_engine(resolve_model_dir(settings.shadow_model_dir))
            except ConfigurationError as exc:  # said as the shadow's, not to be looked for in DEEPFAKE_MODEL_DIR
                raise ConfigurationError(f"DEEPFAKE_SHADOW_MODEL_DIR: {exc}") from exc
        self.shadow = ShadowModel.for_engine(shadow_engine, settings) if shadow_engine is not None else None
        if detector is None:
            try:
                detector = create_detector(
                    settings.detector, weights=settings.detector_weights, device=settings.device,
                    score_threshold=settings.detector_score_threshold, max_size=settings.detector_max_size,
                )
            except (ValueError, OSError) as exc:  # an unknown name, weights missing or unreadable
                weights = f" with DEEPFAKE_DETECTOR_WEIGHTS {settings.detector_weights}" if settings.detector_weights else ""
                raise ConfigurationError(f"DEEPFAKE_DETECTOR {settings.detector!r}{weights}: {exc}") from exc
        self.detector = detector
        if settings.overlap == "auto":
            self.overlap = not settings.device.startswith("cpu")
        else:
            self.overlap = settings.overlap == "on"
        try:
            self.policy = DecisionPolicy.from_settings(self.engine.card, settings)
        except ValueError as exc:  # DEEPFAKE_REVIEW_THRESHOLD above the card's threshold
            raise ConfigurationError(f"DEEPFAKE_REVIEW_THRESHOLD: {exc}") from exc
        self.recipe = self.engine.card.recipe()  # cut crops as the model's training crops were cut
        self.crop_size = self.recipe.size
        check_recipe(self.engine.card, self.detector.name)
        if self.shadow is not None:
            check_recipe(self.shadow.engine.card, self.detector.name)
        self._report_model = None

    def _load_engine(self, model_dir: Path) -> Engine:
        from worker.engine.tensorrt_engine import TensorRTUnavailable  # does not import tensorrt itself

        s = self.settings
        try:
            return load_engine(
                model_dir, backend=s.engine, device=s.device, batch_size=s.model_batch_size(), precision=s.precision,
                channels_last=s.channels_last, compile=s.torch_compile or False, cuda_graphs=s.cuda_graphs,
                threads=s.engine_threads, cache_dir=s.cache_dir, calibration=s.int8_calibration,
            )
        except TensorRTUnavailable as exc:
            raise ConfigurationError(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - truncated weights, a corrupt model.onnx (ONNX Runtime's own
            # exception types), no permission, a torch.compile mode that does not exist: the worker must not start
            raise ConfigurationError(f"cannot load the model in {model_dir}: {type(exc).__name__}: {exc}") from exc

    @property
    def threshold(self) -> float:
        """The model card's fake threshold (the policy's)."""
        return self.policy.threshold

    def moderate_path(self, path: str | Path, *, frames: int | None = None, report_dir: Path | None = None) -> dict:
        """Verdict for a local file; a missing or unreadable path gives an error verdict."""
        try:
            source = LocalSource.resolve(path, max_bytes=self.settings.max_bytes)
        except ModerationError as exc:
            return self._reported(self._error(str(path), exc, StageTimer(), None), report_dir, {})
        return self.moderate(source, frames=frames, report_dir=report_dir)

    def moderate(self, source: Source, *, frames: int | None = None, report_dir: Path | None = None) -> dict:
        """The verdict; with `report_dir`, also the HTML report (worker.report) written there."""
        timer = StageTimer()
        reader: VideoReader | None = None
        crops: dict[int, np.ndarray] | None = {} if report_dir is not None else None
        started = time.perf_counter()
        try:
            with timer.stage("open"):
                reader = VideoReader(source.open(), self.limits, threads=self.decode_threads)
            with reader:
                verdict = self._score(source, reader, frames or self.settings.frames, timer, crops)
        except ModerationError as exc:
            return self._reported(self._error(source.uri, exc, timer, reader), report_dir, {})
        except (TransientError, Interrupted):  # the store, or the job stopped mid-read: no verdict about the bytes
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must cost one verdict, not the worker
            log.exception("internal_error", source=source.uri)
            error = self._error(source.uri, Internal(f"{type(exc).__name__}: {exc}"), timer, reader)
            return self._reported(error, report_dir, {})
        verdict["timings_ms"]["total"] = round((time.perf_counter() - started) * 1000.0, 1)
        log.info(
            "verdict", source=source.uri, status=verdict["status"], label=verdict["label"], action=verdict["action"],
            score=verdict["score"],
            frames=verdict["video"]["frames_sampled"], timings_ms=verdict["timings_ms"],
        )
        return self._reported(verdict, report_dir, crops or {})

    def _reported(self, verdict: dict, report_dir: Path | None, crops: dict[int, np.ndarray]) -> dict:
        if report_dir is None:
            return verdict
        from worker.report import write_report

        try:
            page = write_report(verdict, Path(report_dir), crops, model=self.report_model(),
                                reference=self.reference_face())
            verdict["report"] = str(page)
        except Exception:  # noqa: BLE001 - a report failure must not cost the verdict
            log.exception("report_failed", source=verdict["source"])
        return verdict

    def reference_face(self) -> np.ndarray | None:
        """The model card's real reference crop (training.export writes it), for the report's spectra."""
        name = self.engine.card.files.get("reference_face")
        model_dir = getattr(self.engine, "model_dir", None)
        if not name or model_dir is None or not (Path(model_dir) / name).is_file():
            return None
        import cv2

        return cv2.cvtColor(cv2.imread(str(Path(model_dir) / name)), cv2.COLOR_BGR2RGB)

    def report_model(self):
        """A PyTorch model for Grad-CAM: the engine's own, or the card's architecture rebuilt on the CPU."""
        model = getattr(self.engine, "model", None)
        if isinstance(model, torch.nn.Module):
            return model
        if self._report_model is None:
            from training.models import create_model

            card = self.engine.card
            weights = Path(self.engine.model_dir) / card.files["weights"]
            m = create_model(card.architecture, **card.architecture_kwargs)
            m.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            self._report_model = m.eval()
        return self._report_model

    def _score(self, source: Source, reader: VideoReader, n_frames: int, timer: StageTimer,
               keep: dict[int, np.ndarray] | None = None) -> dict:
        faces: list[dict] = []
        counts = {"frames": 0, "frames_with_face": 0}
        chunks = self._crop_chunks(reader, n_frames, timer)
        streaming = self.overlap or self.settings.early_exit_frames > 0
        most_held = self.settings.model_batch_size()  # crops held unscored (and one chunk): all of 1024 frames took GBs
        if self.overlap:
            chunks = prefetch(chunks, depth=2, name="decode-detect", abort=getattr(source, "cancel", None))
        scored: list[int] = []  # index into `faces` of each crop's face
        pending: list[np.ndarray] = []
        shadow_pending: list[np.ndarray] = []  # the shadow model's own crops, when they are cut differently
        shadow = self.shadow.start(source.uri) if self.shadow is not None else None
        early_exit = False

        def score_pending() -> None:
            batch = scored[len(scored) - len(pending):]
            with timer.stage("model"):
                probs = checked_probabilities(self.engine.predict(np.stack(pending)), len(pending))
            for face_index, p in zip(batch, probs):
                faces[face_index]["fake_score"] = round(float(p), 6)
            if shadow is not None:
                with timer.stage("shadow"):
                    shadow.score(batch, np.stack(shadow_pending or pending))
            pending.clear()
            shadow_pending.clear()

        try:
            for chunk in chunks:
                face_indices = [len(faces) + i for i in chunk.scored]
                faces.extend(chunk.faces)
                counts["frames"] += chunk.frames
                counts["frames_with_face"] += chunk.frames_with_face
                scored.extend(face_indices)
                pending.extend(chunk.crops)
                shadow_pending.extend(chunk.shadow_crops)
                if keep is not None:
                    keep.update(zip(face_indices, chunk.crops))
                if streaming and pending:  # score now, while the next frames decode
                    score_pending()
                    if self.policy.decisive([f["fake_score"] for f in faces if f["largest"]],
                                            frames=self.settings.early_exit_frames,
                                            margin=self.settings.early_exit_margin):
                        early_exit = True
                        break
                elif len(pending) >= most_held:
                    score_pending()
        finally:  # stops decoding (an early exit), and joins a producer thread before the reader closes
            chunks.close()
        if pending:
            score_pending()

        video = reader.info.to_dict()
        video["frames_sampled"] = counts["frames"]
        video["frames_with_face"] = counts["frames_with_face"]
        video["early_exit"] = early_exit
        log.info("decoded", source=source.uri, **{k: video[k] for k in ("codec", "width", "height", "frames_sampled")},
                 faces=len(faces), early_exit=early_exit, truncated=reader.info.truncated,
                 decode_errors=reader.info.decode_errors)
        if not scored:
            return no_face_verdict(source.uri, threshold=self.threshold, action=self.policy.no_face_action, video=video,
                                   model=self.model_block, timings_ms=timer.as_dict())
        score = aggregate_mean([f["fake_score"] for f in faces if f["largest"]])  # the paper's video score
        label, action, decision = self.policy.decide(faces, score)
        verdict = ok_verdict(source.uri, score=score, label=label, action=action, threshold=self.threshold,
                             video=video, faces=faces, tracks=decision.pop("tracks"), decision=decision,
                             model=self.model_block, timings_ms=timer.as_dict())
        if shadow is not None and (block := shadow.block(faces, action=action)) is not None:
            verdict["shadow"] = block
        return verdict

    def _crop_chunks(self, reader: VideoReader, n_frames: int, timer: StageTimer) -> Iterator[CropChunk]:
        """Decode → detect → crop, `detect_batch` frames at a time.

        Up to `max_faces_scored` faces per frame are cropped: the largest (the one the paper's video
        score uses) and, in a frame with more faces than that, the others in turn (`faces_to_score`).
        A chunk carries its own face records, so that what a producer thread made ahead of an early
        exit never enters the verdict.
        """
        chunk: list[SampledFrame] = []
        limit = self.settings.max_faces_scored
        own = (self.recipe.size, self.recipe.scale)
        shadow = (self.shadow.recipe.size, self.shadow.recipe.scale) if self.shadow is not None else own

        def flush() -> CropChunk:
            with timer.stage("detect"):
                detections = self._detect(chunk)
            out = CropChunk(frames=len(chunk))
            with timer.stage("crop"):
                for frame, found in zip(chunk, detections):
                    if not found:
                        continue
                    out.frames_with_face += 1
                    by_area = sorted(found, key=lambda f: -f.area)
                    scored = set(faces_to_score([f.box for f in by_area], frame.index, limit))
                    for rank, face in enumerate(by_area):
                        out.faces.append(face_record(frame.t, frame.index, face, rank == 0))
                        if rank in scored:
                            out.scored.append(len(out.faces) - 1)
                            out.crops.append(crop_face(frame.image, face.box, *own))
                            if shadow != own:  # cut again from the frame, not resized
                                out.shadow_crops.append(crop_face(frame.image, face.box, *shadow))
            chunk.clear()
            return out

        for frame in timer.timed("decode", reader.sample(
                n_frames, mode=self.settings.sampling, max_gap_s=self.settings.max_sample_gap_s)):
            chunk.append(frame)
            if len(chunk) >= self.settings.detect_batch:
                yield flush()
        if chunk:
            yield flush()

    def _detect(self, frames: list[SampledFrame]) -> list[list]:
        """Detect in batches of same-sized frames (a stream may change size mid-way)."""
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, f in enumerate(frames):
            by_shape[f.image.shape].append(i)
        out: list[list] = [[] for _ in frames]
        for indices in by_shape.values():
            found = self.detector.detect([frames[i].image for i in indices])  # not stacked: shrunk one by one
            for i, faces in zip(indices, found):
                out[i] = faces
        return out

    def _error(self, uri: str, exc: ModerationError, timer: StageTimer, reader: VideoReader | None) -> dict:
        log.warning("error_verdict", source=uri, code=exc.code.value, message=exc.message)
        video = reader.info.to_dict() if reader is not None else None
        return error_verdict(uri, exc, action=self.policy.error_action(exc.code.value), threshold=self.threshold,
                             model=self.model_block, video=video, timings_ms=timer.as_dict())
