"""Typed settings read from `DEEPFAKE_*` environment variables, with documented defaults.

The README's settings table mirrors this class; `Settings()` is built once at start-up and passed
down explicitly (no module-level global).
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.decision import parse_error_actions
from worker.video import MAX_SAMPLED_FRAMES, frames_to_sample

MAX_RESULT_TTL_S = 366 * 24 * 3600  # a job's verdict, and what is kept beside it, stays in Redis a year at most


DEFAULT_QUEUE = "deepfake"  # the queue the image's `rq worker deepfake` and deploy/ (KEDA) name

class Settings(BaseSettings):
    # An empty variable counts as unset (`DEEPFAKE_MODEL_DIR=` is the packaged model, not ".").
    model_config = SettingsConfigDict(env_prefix="DEEPFAKE_", extra="ignore", protected_namespaces=(),
                                      populate_by_name=True, env_ignore_empty=True,
                                      hide_input_in_errors=True,  # a refused URL or key may hold a secret
                                      allow_inf_nan=False)  # `inf` seconds overflowed deriving a job's limit

    # What to score
    frames: int = Field(
        32, ge=1, le=MAX_SAMPLED_FRAMES, description="Frames sampled evenly over each video's duration."
    )
    max_sample_gap_s: float = Field(
        5.0, ge=0.0, description="On long videos, more frames than `frames`, so that samples lie at most this many "
        "seconds apart (a spliced-in deepfake cannot fall between them); at most 1024; 0 = off.",
    )
    sampling: Literal["fast", "exact"] = Field(
        "fast", description="fast: decode the frame at each sample time and the frames other frames refer to (the "
        "rest skipped), exact when a slice has no decoded frame or the held frames pass fast_pass_max_mb; exact: "
        "decode every frame. Both give the same frames."
    )
    model_dir: Path | None = Field(
        None, description="Model directory (model.json + weights); unset = the packaged demo model."
    )
    require_vetted_model: bool = Field(
        False, description="Refuse to start on a model whose card carries a warning (the packaged demo model's, "
        "a randomly initialised one); the manifests set it (deploy/base/settings.env).",
    )
    shadow_model_dir: Path | None = Field(
        None, description="A candidate model scored on the same faces and recorded in each verdict's shadow block, "
        "never acted on; unset = none.",
    )
    detector: str = Field("retinaface-mobilenet", description="Face detector: retinaface-mobilenet | retinaface-resnet50.")
    detector_weights: Path | None = Field(
        None, description="Local RetinaFace .pth; unset = the embedded MobileNet-0.25 weights (resnet50 needs one)."
    )
    detector_score_threshold: float = Field(0.6, ge=0.0, le=1.0, description="Minimum face confidence.")
    detector_max_size: int = Field(640, ge=64, description="Frames are shrunk so their long side is at most this for detection "
                                   "(panoramas keep a short side of up to 9/16 of it, within 4x its square).")
    max_faces_scored: int = Field(
        4, ge=1,
        description="Faces per frame cropped and scored: the largest, the others in turn when a frame has more.",
    )
    decision: Literal["tracks", "mean"] = Field(
        "tracks", description="tracks: fake when any long enough face track is fake, or the paper's mean of largest faces is (the higher decides); mean: the paper's mean alone."
    )
    track_score: Literal["mean", "confident"] = Field(
        "mean", description="How a track's frame scores combine: mean, or the DFDC winner's confident strategy."
    )
    min_track_frames: int = Field(3, ge=1, description="Scored frames a track needs before it can flag a video.")
    review_threshold: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Scores from this up to the model's threshold get action review; unset = the model card's (none: no band).",
    )
    no_face_action: Literal["allow", "review", "block"] = Field(
        "allow", description="Action for a video in which no face was found: allow (most platforms), or review where "
        "every upload should show a face (identity checks, selfie videos).",
    )
    error_actions: str = Field(
        "", description="code=action pairs (allow, review, block, none) over the default action per error code "
        "(worker.decision.DEFAULT_ERROR_ACTIONS), e.g. corrupt=block,too_long=allow.",
    )
    early_exit_frames: int = Field(0, ge=0, description="Stop sampling once this many frames are all decisive; 0 = off.")
    early_exit_margin: float = Field(0.3, gt=0, le=1, description="How far from the threshold a decisive score lies.")
    detect_batch: int = Field(8, ge=1, description="Frames per detector forward pass (and frames held in memory).")
    batch_size: int | None = Field(
        None, ge=1, description="Face crops per model pass; unset = 8 on the CPU (same speed, a third of the memory), 32 on a GPU."
    )
    engine: Literal["auto", "pytorch", "onnxruntime", "tensorrt"] = Field(
        "auto", description="Model engine; auto = TensorRT on CUDA when installed, ONNX Runtime when the model has ONNX, else PyTorch."
    )
    precision: Literal["fp32", "fp16", "bf16", "int8"] | None = Field(
        None, description="Engine precision; unset = the engine's default (PyTorch fp32, TensorRT fp16). GPU: fp16 (see README)."
    )
    channels_last: bool = Field(False, description="PyTorch engine: channels-last memory format.")
    torch_compile: str = Field("", description="PyTorch engine: a torch.compile mode (e.g. default); empty = off.")
    cuda_graphs: bool = Field(False, description="PyTorch engine on CUDA: replay CUDA graphs per batch size.")
    decode_threads: int | None = Field(
        None, ge=1, description="PyAV/FFmpeg decoder threads; unset = the cgroup CPU quota (FFmpeg would take the host's cores)."
    )
    engine_threads: int | None = Field(None, ge=1, description=(
        "ONNX Runtime intra-op threads, and PyTorch's and OpenCV's pools; unset = OMP_NUM_THREADS for "
        "those two where set, else the cgroup CPU quota."))
    cache_dir: Path | None = Field(None, description="Engine cache (TensorRT plans, ONNX Runtime INT8 graphs); unset = ~/.cache/deepfake/trt.")
    int8_calibration: Path | None = Field(None, description="INT8 calibration (TensorRT, ONNX Runtime): a folder of crop images or a .npy of crops.")
    overlap: Literal["auto", "on", "off"] = Field(
        "auto", description="Decode/detect the next frames in a thread while the model runs; auto = on for GPUs."
    )
    device: str = Field("cpu", description="torch device for the detector and the PyTorch engine: cpu | cuda | cuda:N.")

    # Limits, checked before work is spent
    max_bytes: int = Field(2 * 1024**3, ge=1, description="Largest input accepted, in bytes.")
    max_duration_s: float = Field(1200.0, gt=0, description="Longest video accepted, in seconds.")
    max_pixels: int = Field(4096 * 2304, ge=1, description="Largest frame accepted, width × height.")
    fast_pass_max_mb: int = Field(
        1024, ge=0, description="The fast sampling pass holds its sampled frames, decoded, until it has them all: "
        "where they would take more (frame size × samples), the exact pass samples instead, one frame at a time.")
    decode_timeout_s: float = Field(300.0, gt=0, description="Wall-clock limit for decoding one video.")

    # Queue and storage (the RQ worker)
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", validation_alias=AliasChoices("DEEPFAKE_REDIS_URL", "RQ_REDIS_URL"),
        description="Redis holding the RQ queue; RQ_REDIS_URL (what `rq worker` reads) is used when this is unset.",
    )
    queue: str = Field(DEFAULT_QUEUE, description="The RQ queue enqueuers use; workers listen on the queue "
                       "their command names (`rq worker deepfake`), which must match.")
    redis_outage_s: float = Field(
        120.0, ge=0, description="How long the worker rides out an unreachable Redis (a restart, a failover) with its "
        "job in hand before giving up as RQ does; 0 = not at all.",
    )
    allowed_buckets: str = Field(
        "", description="Comma-separated buckets the worker may read; empty denies all, * allows any."
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (unset = AWS); credentials come from the AWS_* environment.")
    s3_region: str | None = Field(
        None, description="S3 region; unset = boto3's (AWS_REGION, AWS_DEFAULT_REGION, the AWS config file), else us-east-1."
    )
    verdict_bucket: str | None = Field(
        None, description="Bucket for verdicts, under <verdict_prefix><upload bucket>/<key>.json; unset = the upload's own bucket."
    )
    verdict_prefix: str = Field("verdicts/", description="Verdicts go to <verdict_prefix><key>.json.")
    verdict_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key signing stored verdicts; set, unsigned or forged stored verdicts are recomputed."
    )
    upload_reports: bool = Field(
        False, description="Also upload an HTML report (worker.report) to <verdict_prefix><key>.report/ in S3."
    )
    job_retries: int = Field(3, ge=0, description="Retries of a job that failed for a transient reason or lost its worker.")
    job_retry_backoff_s: str = Field(
        "30,120,600", description="Seconds a failed job waits before each retry, comma-separated (the last repeats "
        "for further retries; 0 = at the scheduler's next pass, within a second): a storage outage or throttling "
        "outlasts retries run back to back.",
    )
    result_ttl_s: int = Field(7 * 24 * 3600, ge=1, le=MAX_RESULT_TTL_S,
                              description="How long a job's verdict stays in Redis (at most a year).")
    result_detail: Literal["summary", "full"] = Field(
        "summary", description="What a job's result in Redis holds: `summary` (the verdict without its face records, "
        "at most 8 tracks, a few KB whatever the video) or `full` (the whole verdict, which grows with frames × faces); "
        "the stored verdict in S3 is always whole.",
    )
    metrics_port: int = Field(9100, ge=0, le=65535, description="Prometheus /metrics and /healthz port; 0 = off.")
    webhook_hosts: str = Field(
        "", description="Comma-separated webhook receivers (names, .domain suffixes, IPs, CIDRs); empty = any public address."
    )
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key signing each webhook body (X-Deepfake-Signature); unset = unsigned."
    )
    webhook_timeout_s: float = Field(5.0, gt=0, le=60, description="Time limit for one webhook, all of it: name lookup, connect, POST and the whole response.")
    model_s_per_frame: float = Field(
        1.0, gt=0, description="Model time budgeted per sampled frame when deriving a job's timeout."
    )

    # Logging
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto = console on a terminal, JSON otherwise; RQ's own lines too, all on stderr."
    )
    log_level: str = Field(
        "INFO", description="Python logging level name: DEBUG, INFO, WARNING, ERROR or CRITICAL (RQ's lines "
        "too; `rq worker --logging_level` overrides it)."
    )

    @field_validator("log_level")
    @classmethod
    def _log_level_known(cls, value: str) -> str:
        if value.upper() not in logging.getLevelNamesMapping():  # WARN, FATAL and NOTSET too
            raise ValueError(f"must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {value!r}")
        return value.upper()

    @field_validator("verdict_secret", "webhook_secret")
    @classmethod
    def _empty_secret_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        """An empty key signs nothing: it is no key (the store and `deepfake check` then agree)."""
        return value if value is not None and value.get_secret_value() else None

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must start with redis://, rediss:// or unix://, not {_scheme_of(value)}")
        parts = _url_parts(value)
        db = unquote(parts.path).replace("/", "")  # as redis-py reads it, unless the query names the db
        if not value.startswith("unix://") and db and not db.isdigit() and "db" not in parse_qs(parts.query):
            raise ValueError("the path must be a database number (redis://host:6379/0): redis-py takes any "
                             "other for database 0")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _s3_endpoint_is_a_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, not {_scheme_of(value)}")
        if value is not None and not _url_parts(value).hostname:
            raise ValueError("must name a host (http://host:port)")
        return value

    @field_validator("error_actions")
    @classmethod
    def _error_actions_parse(cls, value: str) -> str:
        parse_error_actions(value)  # raises ValueError naming the codes and actions allowed
        return value

    @field_validator("job_retry_backoff_s")
    @classmethod
    def _backoff_parses(cls, value: str) -> str:
        _waits(value)  # raises ValueError saying what is wanted
        return value

    @field_validator("verdict_prefix")
    @classmethod
    def _verdict_prefix_is_a_folder(cls, value: str) -> str:
        """Uploads under the prefix are refused (the worker's own output): an empty prefix would refuse
        every upload, and one without a trailing slash every key that merely starts with it."""
        parts = value.split("/")
        if not value.endswith("/") or value.startswith("/") or any(p in ("", ".", "..") for p in parts[:-1]):
            raise ValueError(f"must be a folder such as 'verdicts/' (non-empty, ending in '/', no empty, '.' or "
                             f"'..' segments), not {value!r}")
        return value

    def bucket_allow_list(self) -> frozenset[str]:
        return frozenset(b.strip() for b in self.allowed_buckets.split(",") if b.strip())

    def retry_intervals_s(self) -> list[int]:
        """The wait before each of the `job_retries` retries, as RQ's Retry takes them (it would repeat
        the first wait, not the last, for retries past the list's end)."""
        waits = _waits(self.job_retry_backoff_s)
        return [waits[min(i, len(waits) - 1)] for i in range(self.job_retries)]

    def job_timeout_s(self, frames: int | None = None) -> int:
        """A job's RQ timeout, derived from the limits: decoding, then detection and the model per frame
        (as many frames as the longest video accepted gets)."""
        n = frames_to_sample(self.max_duration_s, frames or self.frames, self.max_sample_gap_s)
        return int(math.ceil(self.decode_timeout_s + 60 + n * self.model_s_per_frame))

    def model_batch_size(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return 8 if self.device.startswith("cpu") else 32


MAX_RETRY_WAIT_S = 24 * 3600


def _waits(value: str) -> list[int]:
    try:
        waits = [int(part) for part in value.split(",")]
    except ValueError:
        waits = []
    if not waits or any(not 0 <= w <= MAX_RETRY_WAIT_S for w in waits):
        raise ValueError(f"must be whole seconds from 0 to {MAX_RETRY_WAIT_S}, comma-separated (e.g. '30,120,600'), "
                         f"not {value!r}")
    return waits


def _url_parts(url: str) -> SplitResult:
    """`url` split, its port checked; a ValueError that never quotes it (it may carry a password)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is no number, or out of range
    except ValueError as exc:
        reason = "its port is not a number from 0 to 65535" if "port" in str(exc).lower() else "it does not parse"
        raise ValueError(f"is not a usable URL: {reason}") from None
    return parts


def _scheme_of(url: str) -> str:
    """A refused URL's scheme for an error message, never the rest: it may carry a password."""
    scheme = url.partition("://")[0] if "://" in url else ""
    return f"{scheme}://..." if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,15}", scheme) else "a URL without a known scheme"


def _env(name: str) -> str | None:
    """A variable as the settings read it: its name in any case, empty as unset."""
    return next((v for k, v in os.environ.items() if k.upper() == name and v), None)


def settings_problems(exc: ValidationError, given: Mapping[str, str] | None = None) -> str:
    """Every refused setting, named by its variable (RQ_REDIS_URL where that is what set the Redis URL),
    or by `given`'s name for it (a command-line option, e.g. {"frames": "--frames"}), for a log event
    or a usage error in one line. Pydantic's input is left out (it may be a secret); the validators'
    own messages quote a value only where none can be (an action, a prefix)."""
    said = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "settings"
        name = field if field.isupper() else f"DEEPFAKE_{field.upper()}"
        name = (given or {}).get(field, name)
        if name == "DEEPFAKE_REDIS_URL" and not _env(name) and _env("RQ_REDIS_URL"):
            name = "RQ_REDIS_URL"
        said.append(f"{name}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(said)


NOT_SETTINGS = frozenset({"DEEPFAKE_BENCH_DIR"})  # read by bench/, not by the worker


def unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """DEEPFAKE_* variables no setting reads: a misspelt one (`DEEPFAKE_FRAME`) changes nothing, silently."""
    environ = dict(os.environ) if environ is None else environ
    known = {f"DEEPFAKE_{name.upper()}" for name in Settings.model_fields} | NOT_SETTINGS
    return sorted(k for k in environ if k.upper().startswith("DEEPFAKE_") and k.upper() not in known)

