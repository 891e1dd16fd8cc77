"""Typed settings read from `DEEPFAKE_*` environment variables, with documented defaults.

The README's settings table mirrors this class; `Settings()` is built once at start-up and passed
down explicitly (no module-level global).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPFAKE_", extra="ignore", protected_namespaces=())

    # What to score
    frames: int = Field(32, ge=1, le=1024, description="Frames sampled evenly over each video's duration.")
    model_dir: Path | None = Field(
        None, description="Model directory (model.json + weights); unset = the packaged demo model."
    )
    detector: str = Field("retinaface-mobilenet", description="Face detector: retinaface-mobilenet | retinaface-resnet50.")
    detector_weights: Path | None = Field(
        None, description="Local RetinaFace .pth; unset = the embedded MobileNet-0.25 weights (resnet50 needs one)."
    )
    detector_score_threshold: float = Field(0.6, ge=0.0, le=1.0, description="Minimum face confidence.")
    detector_max_size: int = Field(640, ge=64, description="Frames are shrunk so their long side is at most this for detection.")
    detect_batch: int = Field(8, ge=1, description="Frames per detector forward pass (and frames held in memory).")
    batch_size: int = Field(32, ge=1, description="Face crops per model forward pass.")
    engine: str = Field("pytorch", description="Model engine: pytorch.")
    device: str = Field("cpu", description="torch device for the detector and the PyTorch engine: cpu | cuda | cuda:N.")

    # Limits, checked before work is spent
    max_bytes: int = Field(2 * 1024**3, ge=1, description="Largest input accepted, in bytes.")
    max_duration_s: float = Field(1200.0, gt=0, description="Longest video accepted, in seconds.")
    max_pixels: int = Field(4096 * 2304, ge=1, description="Largest frame accepted, width × height.")
    decode_timeout_s: float = Field(300.0, gt=0, description="Wall-clock limit for decoding one video.")

    # Logging
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto = console on a terminal, JSON otherwise."
    )
    log_level: str = Field("INFO", description="Python logging level name.")
