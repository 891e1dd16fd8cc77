"""The paper's training recipe (MD-CSDNetwork section II-C), for one process or many under ``torchrun``.

Defaults are the paper's: Adam (β 0.9/0.999, ε 1e-8), lr 2e-4 and 1e-3 for the cross-stitch alphas,
batch 32, cross-entropy, the learning rate ×0.2 whenever the validation loss has not decreased for
three consecutive epochs, and the checkpoint with the highest validation accuracy kept for testing
(ties: the lower validation loss). What the paper leaves open (epochs, augmentation) is a setting;
so is ending a run once ``stop_after`` epochs in a row bring no new best (off by default).
Before the first step a fresh model's frequency branch gets its input normalisation from the
training crops (paper II-B, ``training.normalise``); a full-width RGB branch without ImageNet
weights (``imagenet_path``, paper II-C) starts random, with a warning.

Files under ``out_dir`` (rank 0 only): ``best.pt`` (weights of the best epoch + its metrics),
``last.pt`` (model, optimizer, scheduler, epoch, best and history: resume from it), both with the
crops' ``crop_recipe`` (how they were cut, which export puts in the model card),
``metrics.csv`` (one row per epoch), ``config.json`` and TensorBoard events when tensorboard is
installed. Validation metrics are frame-level unless named ``video``. Nothing is written before the
checks of ``training.run_checks`` pass: an ``out_dir`` holding another run is refused (``overwrite``).

Multi-GPU: ``torchrun --nproc_per_node=N -m training train ...`` sets WORLD_SIZE>1; each process
then trains batch_size // N crops a step (the step's batch stays the paper's 32, as when it trained
on three GPUs) on its DistributedSampler shard under DistributedDataParallel (NCCL on CUDA, gloo on
CPU) and validates on a 1/N slice whose predictions are gathered, so every rank takes the same
scheduler and checkpoint decisions.
"""
from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from worker.preprocess import CropRecipe

from training.models import create_model
from training.models.cross_stitch import param_groups
from training.normalise import fit_frequency_norm
from training.run_checks import (best_plan, check_classes, check_out_dir, check_settings, load_resumed, prepare_run_dir,
                                 read_resumed)
from training.run_files import (check_crops_fit, loader_workers, resume_changes, resumed_recipe, save_atomic,
                                 tensorboard_writer, write_csv)
from training.sampling import Augment, EpochCycle, PairedBatchSampler, labels_of, sbi_pair_key
from training.validation import AMP_DTYPES, autocast_for, validate

__all__ = ["Augment", "EpochCycle", "PairedBatchSampler", "TrainConfig", "TrainResult", "build_optimizer",
           "build_scheduler", "is_better", "sbi_pair_key", "seed_everything", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a run needs; ``config.json`` in the output directory records it."""

    model: str = "mdcsd"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # create_model overrides, e.g. input_size
    imagenet_path: str | None = None  # classic Xception weights for the RGB branch (paper II-C), if you have them
    epochs: int = 20  # the paper does not say; the best-validation checkpoint makes extra epochs safe
    batch_size: int = 32  # the whole step's batch: torchrun's processes take batch_size // N each
    lr: float = 2e-4
    stitch_lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    plateau_factor: float = 0.2
    plateau_patience: int = 3  # epochs in a row without a val-loss decrease before the LR drops (paper)
    stop_after: int = 0  # end the run after this many epochs in a row without a new best.pt (0: never, as the paper)
    seed: int = 0
    freq_norm_crops: int = 256  # training crops whose log-spectrum stats normalise the freq branch (0: model defaults)
    num_workers: int | None = None  # DataLoader processes; None: none on the CPU, up to 8 on CUDA (loader_workers)
    amp: str = "none"  # "bf16" | "fp16" | "none"; autocast on CUDA only (CPU always runs fp32)
    device: str = "auto"  # "auto" = cuda when available, else cpu
    out_dir: str = "runs/train"
    resume: str | None = None  # a last.pt to continue from
    overwrite: bool = False  # replace the run already in out_dir (else refused: training.run_checks)
    log_every: int = 20  # steps between progress-bar / TensorBoard loss updates
    balance: bool = False  # sample real and fake crops equally often (single process only)
    paired: bool = False  # keep a frame's real and SBI crops in one batch (PairedBatchSampler; single process)
    eval_batch_size: int = 64
    max_steps_per_epoch: int | None = None  # cap for smoke runs
    progress: bool = True
    tensorboard: bool = True  # only if the tensorboard package is installed

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.amp not in ("none", *AMP_DTYPES):
            raise ValueError(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        if self.plateau_patience < 1:
            raise ValueError("plateau_patience must be >= 1")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError("num_workers must be >= 0, or None for the device's default")
        if self.stop_after < 0:
            raise ValueError("stop_after must be >= 0 (0: train every epoch)")
        if self.freq_norm_crops < 0:
            raise ValueError("freq_norm_crops must be >= 0 (0: keep the model's constants)")


@dataclass
class TrainResult:
    model: nn.Module  # the best-validation-accuracy weights, unwrapped, in eval mode
    best_epoch: int
    best: dict[str, float]
    history: list[dict[str, Any]]
    out_dir: Path
    best_path: Path
    last_path: Path
    seconds: float


# -- the pieces the tests check ------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with two groups: the network at `lr`, the cross-stitch alphas at `stitch_lr`."""
    return torch.optim.Adam(param_groups(model, cfg.lr, cfg.stitch_lr), betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """×`plateau_factor` once the val loss has not decreased for `plateau_patience` epochs in a row.

    PyTorch's ``patience`` counts the bad epochs it tolerates (it reduces on the one after), the
    paper (and Keras, which it used) reduces on the third, so torch gets ``plateau_patience - 1``.
    "Decrease" is strict: threshold 0.
    """
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience - 1,
        threshold=0.0, threshold_mode="abs")


def is_better(acc: float, loss: float, best: dict[str, float] | None) -> bool:
    """The paper keeps the highest validation accuracy; equal accuracy goes to the lower val loss."""
    if best is None:
        return True
    if acc != best["val_acc"]:
        return acc > best["val_acc"]
    return loss < best["val_loss"]


# -- helpers -------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:  # numpy/random in DataLoader workers follow torch's per-worker seed
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _dist_setup(cfg: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, we_initialised) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        init = not dist.is_initialized()
        if init:
            dist.init_process_group("nccl" if cuda else "gloo")
        return dist.get_rank(), world, device, init
    if cfg.device == "auto":
        return 0, 1, torch.device("cuda" if cuda else "cpu"), False
    return 0, 1, torch.device(cfg.device), False


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- training ------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset, *, model: nn.Module | None = None,
    callbacks: Sequence[Callable[[dict[str, Any], nn.Module], None]] = (), crop_recipe: CropRecipe | None = None,
) -> TrainResult:
    """Train `cfg.model` (or `model`) on (x, label, video_id) items; returns the best-val-accuracy model.

    `callbacks` run after every epoch with the epoch's metrics row and the unwrapped model.
    `crop_recipe`: how the crops were cut (`training.data.caches_recipe`); checkpoints record it, the
    returned model carries it as ``crop_recipe`` and export puts it in the model card.
    """
    t0 = time.perf_counter()
    rank, world, device, own_group = _dist_setup(cfg)
    out_dir = Path(cfg.out_dir)
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    check_settings(cfg.batch_size, world, cfg.balance, cfg.paired)
    ckpt = read_resumed(cfg.resume, device) if cfg.resume else None
    check_out_dir(out_dir, cfg.resume, cfg.overwrite)  # nothing is written into out_dir before the checks pass
    seed_everything(cfg.seed)
    fresh = model is None
    if model is None:
        model = create_model(cfg.model, imagenet_path=cfg.imagenet_path, **cfg.model_kwargs)
    check_crops_fit(model, train_ds)  # before the frequency normalisation's first forward pass
    check_classes(train_ds, val_ds, warn=rank == 0)
    if ckpt is not None:
        load_resumed(ckpt, str(cfg.resume), model, cfg.model_kwargs)
    plan = best_plan(ckpt, cfg.resume, best_path, cfg.overwrite)
    # Worker processes draw the flips and augmentation from their own seeds: the count is part of the run.
    workers = loader_workers(cfg.num_workers, device, world)
    run_config = {**asdict(cfg), "processes": world, "loader_workers": workers}
    if rank == 0:
        prepare_run_dir(out_dir, run_config, plan, ckpt, cfg.resume)
    if fresh:
        full_width = getattr(model, "init_kwargs", {}).get("width") == 1.0  # ImageNet weights fit only this
        if cfg.imagenet_path is None and "rgb" in getattr(model, "branches", ()) and full_width and not cfg.resume \
                and rank == 0:
            log.warning("the RGB branch starts from random weights: the paper starts it from ImageNet Xception "
                        "weights (--imagenet PATH, a local legacy_xception file)")
        if cfg.freq_norm_crops > 0 and not cfg.resume and "freq_mean" not in cfg.model_kwargs:
            # Every rank draws the same crops with the same seed, so all fit the same constants.
            stats = fit_frequency_norm(model, train_ds, cfg.freq_norm_crops, progress=cfg.progress and rank == 0)
            if stats is not None and rank == 0:
                tqdm.write("frequency-branch normalisation from the training crops: mean "
                           f"{[round(v, 4) for v in stats[0]]} std {[round(v, 4) for v in stats[1]]}", file=sys.stderr)
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp == "fp16")

    start_epoch, best, history = 0, None, []
    if ckpt is not None:  # its weights are in the model already (load_resumed)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best, history = int(ckpt["epoch"]), plan.best, list(ckpt.get("history", []))
        crop_recipe = resumed_recipe(ckpt.get("crop_recipe"), crop_recipe, cfg.resume, warn=rank == 0)
        for change in resume_changes(ckpt.get("config") or {}, run_config) if rank == 0 else ():
            log.warning("resuming %s with %s", cfg.resume, change)
        del ckpt  # its tensors (the optimizer's moments) need not outlive the loading
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    batch = cfg.batch_size // world  # the paper's batch is the whole step's, however many GPUs share it
    if cfg.batch_size % world and rank == 0:
        log.warning("batch_size %d does not split over %d processes: each takes %d, %d a step",
                    cfg.batch_size, world, batch, batch * world)
    gen = torch.Generator()
    if world > 1:
        sampler: Any = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    elif cfg.balance:
        labels = np.asarray(labels_of(train_ds))
        weights = 1.0 / np.bincount(labels, minlength=2)[labels]
        sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(labels), generator=gen)
    else:
        sampler = None
    pin = device.type == "cuda"
    if cfg.num_workers is None and workers and rank == 0:
        tqdm.write(f"reading crops with {workers} DataLoader worker processes (--workers)", file=sys.stderr)
    if cfg.paired:
        loader = DataLoader(train_ds, batch_sampler=PairedBatchSampler(train_ds, batch, gen),
                            num_workers=workers, pin_memory=pin, worker_init_fn=_seed_worker)
    else:
        loader = DataLoader(train_ds, batch_size=batch, shuffle=sampler is None, sampler=sampler,
                            generator=gen, num_workers=workers, pin_memory=pin, worker_init_fn=_seed_worker)
    val_part = Subset(val_ds, range(rank, len(val_ds), world)) if world > 1 else val_ds  # type: ignore[arg-type]
    val_loader = DataLoader(val_part, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=workers,
                            pin_memory=pin)
    tb = tensorboard_writer(out_dir, cfg.tensorboard) if rank == 0 else None
    loss_fn = nn.CrossEntropyLoss()
    step = start_epoch * len(loader)

    for epoch in range(start_epoch, cfg.epochs):
        if cfg.stop_after and best is not None and epoch - best["epoch"] >= cfg.stop_after:
            if rank == 0:  # every rank decides alike: the validation metrics are gathered
                tqdm.write(f"stopping after epoch {epoch}/{cfg.epochs}: no new best validation accuracy for "
                           f"{epoch - best['epoch']} epochs (--stop-after {cfg.stop_after}); best epoch "
                           f"{best['epoch']}", file=sys.stderr)
            break
        e_start = time.perf_counter()
        # Per-epoch seeds make a resumed run draw the same batches, flips and dropout as an unbroken one.
        gen.manual_seed(cfg.seed * 1000 + epoch)
        torch.manual_seed(cfg.seed * 1000 + epoch * 10 + rank)
        for obj in (sampler, train_ds):
            if hasattr(obj, "set_epoch"):  # DistributedSampler, EpochCycle
                obj.set_epoch(epoch)
        net.train()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.float64)
        seen = torch.zeros((), device=device, dtype=torch.float64)
        total = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                   disable=not cfg.progress or rank != 0)
        for i, (x, y, _) in enumerate(loader):
            if i >= total:
                break
            x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
            with autocast_for(device, cfg.amp):
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            step += 1
            bar.update(1)
            if step % max(cfg.log_every, 1) == 0:
                bar.set_postfix(loss=f"{float(loss_sum / seen):.4f}")
                if tb is not None:
                    tb.add_scalar("train/loss_step", float(loss), step)
        bar.close()
        if world > 1:
            for t in (loss_sum, correct, seen):
                dist.all_reduce(t)
        val = validate(net, val_loader, device, cfg.amp, world)
        row: dict[str, Any] = {
            "epoch": epoch + 1, "train_loss": float(loss_sum / seen.clamp(min=1)),
            "train_acc": float(correct / seen.clamp(min=1)), "train_crops": int(seen), **val,
            "lr": optimizer.param_groups[0]["lr"],  # what the epoch trained at: read before the plateau step
            "stitch_lr": optimizer.param_groups[1]["lr"] if len(optimizer.param_groups) > 1 else math.nan,
            "seconds": time.perf_counter() - e_start,
        }
        scheduler.step(val["val_loss"])
        improved = is_better(val["val_acc"], val["val_loss"], best)
        row["best"] = int(improved)
        if improved:
            best = {"epoch": epoch + 1, **{k: float(v) for k, v in val.items()}}
        history.append(row)
        if rank == 0:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            meta = {"model_config": getattr(model, "model_config", None), "config": run_config,
                    "crop_recipe": crop_recipe.to_dict() if crop_recipe is not None else None}
            if improved:
                save_atomic({"model": state, "epoch": epoch + 1, "metrics": best, **meta}, best_path)
            save_atomic({"model": state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict(), "epoch": epoch + 1, "best": best, "history": history, **meta},
                  last_path)
            write_csv(out_dir / "metrics.csv", history)
            if tb is not None:
                for k, v in row.items():
                    if k not in ("epoch", "best") and isinstance(v, float) and math.isfinite(v):
                        tb.add_scalar(k.replace("_", "/", 1), v, epoch + 1)
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} val_loss "  # bars or not
                       f"{val['val_loss']:.4f} val_acc {val['val_acc']:.4f} val_auc {val['val_auc']:.4f} "
                       f"video_auc {val['val_video_auc']:.4f} lr {row['lr']:.2e} "
                       f"{row['seconds']:.0f}s{' *' if improved else ''}", file=sys.stderr)
        for cb in callbacks:
            cb(row, model)
        if world > 1:
            dist.barrier()

    if tb is not None:
        tb.close()
    if best is None:
        raise ValueError(f"nothing to train: epochs={cfg.epochs} and the resumed run had no epochs")
    ckpt = torch.load(best_path, map_location=device, weights_only=True)
    model.load_state_dict(ckpt["model"])
    if own_group:
        dist.destroy_process_group()
    model.crop_recipe = ckpt.get("crop_recipe")  # the best epoch's: a resumed run may have changed it since
    return TrainResult(model=model.eval(), best_epoch=int(best["epoch"]), best=best, history=history,
                       out_dir=out_dir, best_path=best_path, last_path=last_path,
                       seconds=time.perf_counter() - t0)
