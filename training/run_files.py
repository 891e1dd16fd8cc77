"""What a training run writes into its directory: checkpoints replaced atomically, the per-epoch
metrics CSV and (when the tensorboard package is installed) TensorBoard events."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

CSV_FIELDS = ["epoch", "train_loss", "train_acc", "train_crops", "val_loss", "val_acc", "val_auc", "val_video_acc",
              "val_video_auc", "lr", "stitch_lr", "seconds", "best"]


def write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    tmp.replace(path)


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # a kill mid-save never leaves a torn checkpoint


def tensorboard_writer(out_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))
