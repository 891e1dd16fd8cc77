"""What `train` checks before it writes anything into its run directory: that it replaces no other
run there, that a resumed checkpoint is a last.pt of the model the command asks for, which best.pt
goes with it, and that the training crops hold both classes.

A refusal that the command line can fix (another --out, --resume, --overwrite) is a `UsageError`:
``python -m training`` says it in one line and exits 2, as argparse does for other slips.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CLASS_NAMES = ("real", "fake")  # label 0, label 1
# Normalisation constants a fresh run fits on its training crops (training.normalise): the
# checkpoint holds them, the command line does not, unless it gives them itself.
FITTED_KWARGS = ("freq_mean", "freq_std")


class UsageError(ValueError):
    """A command that would lose, mix or misplace a run: said in one line, exit status 2."""


def _same_file(a: str | Path | None, b: Path) -> bool:
    return a is not None and Path(a).resolve() == b.resolve()


def check_settings(batch_size: int, world: int, balance: bool, paired: bool) -> None:
    """Settings that cannot work, refused before the run directory is touched."""
    if batch_size // world < 1:
        raise ValueError(f"batch_size {batch_size} is smaller than the {world} processes sharing it")
    if world > 1 and balance:
        raise ValueError("balance=True is not supported with several processes")
    if paired and (world > 1 or balance):
        raise ValueError("paired=True works in a single process and without balance")


def check_out_dir(out_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse an `out_dir` that holds another run's checkpoints: a new run would replace a finished
    one's last.pt, and its first (worse) epoch its best.pt. Resuming that run, or `overwrite`, is fine."""
    held = [name for name in ("last.pt", "best.pt") if (out_dir / name).exists()]
    last = out_dir / "last.pt"
    if not held or overwrite or _same_file(resume, last):
        return
    if resume is None:
        raise UsageError(f"{out_dir} already holds a run ({' and '.join(held)}): continue it with --resume {last}, "
                         "train into a new --out, or pass --overwrite to replace it")
    if last.exists():
        raise UsageError(f"{out_dir} holds another run's last.pt than --resume {resume}: train into a new --out, "
                         "or pass --overwrite to replace it")
    # best.pt alone: kept when it is the resumed run's best (best_plan)


def check_classes(train_ds: Any, val_ds: Any, warn: bool = True) -> None:
    """Refuse training crops of one class (the loss is trivially zero and validation says nothing);
    warn when the validation crops are, since then val_auc is undefined and val_acc one-sided."""
    import torch

    from training.sampling import EpochCycle, labels_of

    with torch.random.fork_rng(devices=[]):  # labels read from items must not move the seeded draws
        for ds in train_ds.datasets if isinstance(train_ds, EpochCycle) else [train_ds]:
            if missing := _missing_classes(labels_of(ds)):
                raise ValueError(f"the training split holds no {' or '.join(missing)} crops: training needs both "
                                 "real and fake ones")
        missing = _missing_classes(labels_of(val_ds))
    if missing and warn:
        log.warning("the validation split holds no %s crops: val_auc is undefined (null) and val_acc counts one "
                    "class only", " or ".join(missing))


def _missing_classes(labels: list[int]) -> list[str]:
    present = {int(label) for label in labels}
    return [name for label, name in enumerate(CLASS_NAMES) if label not in present]


def read_resumed(path: str, device: Any) -> dict[str, Any]:
    """The last.pt to resume from; refused when it is a best.pt, which holds no optimizer state."""
    from worker.torch_files import load_tensors

    ckpt = load_tensors(path, map_location=device)  # a text file, a cut one: said in one line
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UsageError(f"--resume {path}: not a checkpoint written by `python -m training train`")
    if "optimizer" not in ckpt:
        raise UsageError(f"--resume {path} holds weights only (a best.pt); resume from the last.pt beside it")
    return ckpt


def load_resumed(ckpt: dict[str, Any], path: str, model: Any, explicit_kwargs: dict[str, Any]) -> None:
    """Load the checkpoint's weights into `model`; refused when it was another architecture, or built
    with other constructor arguments, than the command asks for (--model, --model-arg)."""
    now = getattr(model, "model_config", None)
    if mismatch := model_mismatch(ckpt.get("model_config"), now, explicit_kwargs):
        raise UsageError(f"--resume {path} is {mismatch[0]}; this command asks for {mismatch[1]}: resume with "
                         "the same --model/--model-arg, or train into a new --out")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # a checkpoint from before model_config: torch's message runs to kilobytes
        name = (now or {}).get("architecture", type(model).__name__)
        raise UsageError(f"--resume {path}: its weights do not fit {name} ({str(exc).count(chr(10))} mismatched "
                         "tensors): resume with the model it was trained as, or train into a new --out") from None


def model_mismatch(saved: dict[str, Any] | None, now: dict[str, Any] | None,
                   explicit_kwargs: dict[str, Any]) -> tuple[str, str] | None:
    """(the checkpoint's model, the command's), each named with the arguments that differ; None when
    they agree or a side records no model_config. An argument only one side knows (a checkpoint of
    an older version) is left to the weights' shapes."""
    if not saved or not now:
        return None
    skip = {k for k in FITTED_KWARGS if k not in explicit_kwargs}
    a, b = saved.get("kwargs", {}), now.get("kwargs", {})
    keys = sorted(k for k in (a.keys() & b.keys()) - skip if a[k] != b[k])
    if saved.get("architecture") == now.get("architecture") and not keys:
        return None

    def named(cfg: dict[str, Any], kwargs: dict[str, Any]) -> str:
        args = ", ".join(f"{k}={_arg(kwargs.get(k))}" for k in keys)
        return f"{cfg.get('architecture')} ({args})" if args else str(cfg.get("architecture"))

    return named(saved, a), named(now, b)


def _arg(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)  # as --model-arg takes it


@dataclass
class BestPlan:
    """The best epoch a resumed run starts from, and what puts its weights at ``<out>/best.pt``."""

    best: dict[str, Any] | None
    copy_from: Path | None = None  # the resumed run's best.pt, from another directory
    from_last: bool = False  # the resumed last.pt's own weights are the best epoch's
    remove: bool = False  # <out>/best.pt is none of the resumed run's: it goes


def best_plan(ckpt: dict[str, Any] | None, resume: str | None, best_path: Path, overwrite: bool) -> BestPlan:
    """Which best.pt a run keeps, decided before anything is written.

    A fresh run keeps none (check_out_dir let an existing one through only with `overwrite`). A
    resumed run keeps the --out's best.pt only when it is the checkpoint's recorded best epoch:
    another run's is refused unless `overwrite` (then replaced), one left by an epoch that was cut
    short and is now redone goes. A missing one is copied from beside --resume, or written from
    last.pt when that is the best epoch; else the weights are gone, and best.pt is the best of the
    epochs still to come (said in a warning).
    """
    if ckpt is None:
        return BestPlan(None, remove=best_path.exists())
    best, epoch = ckpt.get("best"), int(ckpt["epoch"])
    held = _best_epoch(best_path)
    if held is not None:
        if _matches(held, best):
            return BestPlan(best)
        interrupted = _same_file(resume, best_path.with_name("last.pt")) and held["epoch"] > epoch
        if not (overwrite or interrupted):
            their = f"epoch {best['epoch']}" if best else "none yet"
            raise UsageError(f"{best_path} is another run's best.pt, not the best epoch of --resume {resume} ({their})"
                             ": train into a new --out, or pass --overwrite to replace it")
    plan = BestPlan(best, remove=best_path.exists())
    source = Path(resume).with_name("best.pt") if resume else None
    if best is None:
        return plan
    if source is not None and not _same_file(source, best_path) and _matches(_best_epoch(source), best):
        plan.copy_from = source
    elif int(best["epoch"]) == epoch:
        plan.from_last = True
    else:
        log.warning("no best.pt of epoch %s beside --resume %s: best.pt will be the best of the epochs from %d on",
                    best["epoch"], resume, epoch + 1)
        plan.best = None
    return plan


def _best_epoch(path: Path) -> dict[str, Any] | None:
    """best.pt's epoch and metrics; None when there is none, epoch -1 when it is no checkpoint of `train`'s."""
    from worker.torch_files import load_tensors

    if not path.is_file():
        return None
    try:
        ckpt = load_tensors(path)
    except ValueError:
        return {"epoch": -1}
    return {"epoch": int(ckpt.get("epoch", -1)), **(ckpt.get("metrics") or {})} if isinstance(ckpt, dict) \
        else {"epoch": -1}


def _matches(held: dict[str, Any] | None, best: dict[str, Any] | None) -> bool:
    return held is not None and best is not None and all(_same(held.get(k), best.get(k))
                                                         for k in ("epoch", "val_acc", "val_loss"))


def _same(a: Any, b: Any) -> bool:
    """Equal, a NaN included: an epoch whose loss overflowed (fp16) is still the same epoch."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def prepare_run_dir(out_dir: Path, config: dict[str, Any], plan: BestPlan, ckpt: dict[str, Any] | None,
                    resume: str | None) -> None:
    """Rank 0, once every check has passed: clear what the run replaces (check_out_dir let it through:
    checkpoints, TensorBoard events, metrics.csv), put the resumed run's best.pt in place and record
    the run's config.json."""
    import json
    import shutil

    import torch

    from training.run_files import save_atomic

    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    out_dir.mkdir(parents=True, exist_ok=True)
    if last_path.exists() and not _same_file(resume, last_path):
        last_path.unlink()  # another run's, to be replaced (--overwrite): not left beside this run's config
    if not _same_file(resume, last_path):  # a new run: the replaced one's curves would mix with its own
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
        (out_dir / "metrics.csv").unlink(missing_ok=True)
    if plan.remove:
        best_path.unlink(missing_ok=True)
    if plan.copy_from is not None:  # whole or not at all: other torchrun ranks may be reading best.pt
        shutil.copy2(plan.copy_from, best_path.with_suffix(".tmp"))
        best_path.with_suffix(".tmp").replace(best_path)
    elif plan.from_last and ckpt is not None:
        state = {k: v.detach().cpu() for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}
        save_atomic({"model": state, "epoch": int(ckpt["epoch"]), "metrics": plan.best,
                     **{k: ckpt.get(k) for k in ("model_config", "config", "crop_recipe")}}, best_path)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def interrupted_hint(out_dir: Path, resume: str | Path | None = None, started: float | None = None) -> str:
    """What to run after Ctrl-C or an error: the last finished epoch is in last.pt, resumable. Only
    for this run's last.pt: the one it resumed, or one written since `started` (a time.time()); a
    run it was to replace (--overwrite) is not this run's to continue."""
    from worker.torch_files import load_tensors

    last = Path(out_dir) / "last.pt"
    try:
        if started is not None and not _same_file(resume, last) and last.stat().st_mtime < started:
            return ""
        epoch = int(load_tensors(last)["epoch"])
    except (OSError, ValueError, KeyError, TypeError):  # no epoch finished (or no run of ours)
        return ""
    return f"; epoch {epoch} is the last finished: continue with --resume {last}"
