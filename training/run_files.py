"""What a training run writes into its directory: checkpoints replaced atomically, the per-epoch
metrics CSV and (when the tensorboard package is installed) TensorBoard events; what a resumed
run does with settings that differ from the checkpoint's; whether the crops fit the model; how many
processes read its crops; and a checkpoint loaded back as a model (evaluate, export)."""
from __future__ import annotations

import csv
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from worker.preprocess import CropRecipe

log = logging.getLogger(__name__)

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


# Settings a resumed run takes from the checkpoint whatever it is told: the optimizer's and the
# scheduler's saved state hold them (a plateau may have lowered the learning rate since).
KEPT_ON_RESUME = ("lr", "stitch_lr", "betas", "eps", "weight_decay", "plateau_factor", "plateau_patience")
# Settings a resumed run applies from its next epoch, so that it no longer draws the batches an
# unbroken run would have drawn.
CHANGED_ON_RESUME = ("batch_size", "seed", "processes", "amp", "balance", "paired", "max_steps_per_epoch",
                     "loader_workers")


def resume_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One line per setting of `now` that differs from the `saved` run's config, saying what happens."""
    lines = []
    for name in (*KEPT_ON_RESUME, *CHANGED_ON_RESUME):
        if name in saved and name in now and _norm(saved[name]) != _norm(now[name]):
            effect = ("ignored: the optimizer and scheduler resume with their saved state" if name in KEPT_ON_RESUME
                      else "applies from the next epoch: the run no longer matches an unbroken one")
            lines.append(f"{name} {saved[name]!r} -> {now[name]!r}: {effect}")
    return lines


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


MAX_AUTO_LOADER_WORKERS = 8


def loader_workers(requested: int | None, device: torch.device, processes: int = 1) -> int:
    """DataLoader worker processes: `requested`, or when None ("auto") none on the CPU, where the
    model's step is hundreds of times slower than reading its crops, and on CUDA up to 8, one fewer
    than this process's share of the usable CPUs but at least 1: the training process alone reads
    about 260 crops/s of 299 px (`bench/bench_crop_loading.py`), a third of what an H200 is estimated
    to train. Workers draw hflip and augmentation from their own seeds, so a run repeats exactly for
    the same count, not across counts (the checkpoint records it: `loader_workers`)."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    from worker.cpus import available_cpus

    return max(1, min(MAX_AUTO_LOADER_WORKERS, available_cpus() // max(1, processes) - 1))


def check_crops_fit(model: nn.Module, train_ds: Dataset) -> None:
    """Raise before training when the crops are not the side the model takes (its spectrum layer is
    built for one side), rather than a shape error deep in the first forward pass."""
    side = getattr(model, "input_size", None)
    if side is None or len(train_ds) == 0:  # type: ignore[arg-type]
        return
    with torch.random.fork_rng(devices=[]):  # the item's flips and augmentation must not move the seeded draws
        got = tuple(train_ds[0][0].shape[-2:])
    if got != (side, side):
        name = (getattr(model, "model_config", None) or {}).get("architecture", "the model")
        raise ValueError(f"the training crops are {got[1]}×{got[0]} px but {name} takes {side}×{side}: pass "
                         f"--model-arg input_size={got[0]}, or extract crops with --size {side}")


def resumed_recipe(saved: dict[str, Any] | None, now: CropRecipe | None, path: Any, warn: bool = True) -> CropRecipe | None:
    """The recipe a resumed run records: this run's, with the older preprocessing version of the two;
    crops cut differently from the checkpoint's are named in a warning."""
    if saved is None or now is None:  # told none now: the checkpoint's stands
        return now if saved is None else CropRecipe.from_dict(saved)
    before = CropRecipe.from_dict(saved)
    if warn and (conflicts := before.conflicts(now)):
        log.warning("resuming %s on crops cut differently from its earlier epochs': %s", path, ", ".join(conflicts))
    return replace(now, version=min(before.version, now.version))


def load_checkpoint_model(path: Path) -> nn.Module:
    """Rebuild the architecture recorded in a train checkpoint and load its weights, in eval mode;
    `crop_recipe` set to how its training crops were cut (export puts it in the card)."""
    from training.models import create_model
    from worker.torch_files import load_tensors

    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = load_tensors(path)
    cfg = ckpt.get("model_config") if isinstance(ckpt, dict) else None
    if not cfg:
        raise ValueError(f"{path} has no model_config: not a checkpoint written by `python -m training train`")
    model = create_model(cfg["architecture"], **cfg["kwargs"])
    model.load_state_dict(ckpt["model"])
    model.crop_recipe = ckpt.get("crop_recipe")
    return model.eval()


def trained_recipe(model: nn.Module) -> CropRecipe | None:
    """How a loaded checkpoint's training crops were cut (None: a checkpoint from before recipes)."""
    recipe = getattr(model, "crop_recipe", None)
    return CropRecipe.from_dict(recipe) if recipe else None
