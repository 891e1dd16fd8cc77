"""The `export` command of ``python -m training``: a checkpoint into the model directory the worker
loads, its threshold (and review band) calibrated on validation reals when asked."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _real_video_scores(model, root: Path, split: str) -> list[float]:  # type: ignore[no-untyped-def]
    from training.data import CropDataset
    from training.evaluate import predict_dataset, video_level

    pred = predict_dataset(model, CropDataset(root, split), desc=f"calibrate on {split}")
    vs, vl, _ = video_level(pred["scores"], pred["labels"], pred["video_ids"])
    return vs[vl == 0].tolist()


def _some_crops(root: Path, split: str, n: int = 8):  # type: ignore[no-untyped-def]
    """Real uint8 crops (half real, half fake) for the ONNX parity check."""
    import numpy as np

    from training.data import load_crop, read_index

    recs = read_index(root, split)
    picks = [r for r in recs if r.label == 0][: n // 2] + [r for r in recs if r.label == 1][: n - n // 2]
    return np.stack([load_crop(Path(root) / split / r.path) for r in picks]) if picks else None


def cmd_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from training.cli import command_line
    from training.data import recipe_mismatch
    from training.export import check_replaces, export_model_dir
    from training.run_files import load_checkpoint_model, trained_recipe

    check_replaces(args.out, args.name, args.version, force=args.force)  # before calibration's minutes
    model = load_checkpoint_model(args.checkpoint)
    calibration, crops = None, None
    if args.calibrate_on:
        trained = trained_recipe(model)
        if warning := recipe_mismatch(args.calibrate_on, trained):
            log.warning("the threshold is calibrated on other crops than the worker cuts: %s", warning)
        if not 0.0 <= args.target_fpr <= 1.0:
            parser.error("--target-fpr must be in [0, 1]")
        if args.review_fpr is not None and not args.target_fpr <= args.review_fpr <= 1.0:
            parser.error("--review-fpr must lie between --target-fpr and 1")
        calibration = {"real_scores": _real_video_scores(model, args.calibrate_on, args.calibration_split),
                       "target_fpr": args.target_fpr, "level": "video (mean of a video's frame scores)",
                       "data": f"{args.calibrate_on} split {args.calibration_split}"}
        if args.review_fpr is not None:
            calibration["review_fpr"] = args.review_fpr
        crops = _some_crops(args.calibrate_on, args.calibration_split)
    elif args.review_fpr is not None:
        parser.error("--review-fpr needs --calibrate-on")
    metrics = {}
    if args.metrics:
        if not isinstance(results := json.loads(args.metrics.read_text()), dict):
            parser.error(f"--metrics {args.metrics}: not an evaluate results.json (a JSON object)")
        metrics = {k: v for k, v in results.items() if k != "predictions"}
    card = export_model_dir(model, args.out, name=args.name, version=args.version, trained=True,
                            threshold=args.threshold, review_threshold=args.review_threshold,
                            calibration=calibration, training_data=args.training_data,
                            metrics=metrics, onnx=not args.no_onnx, parity_crops=crops,
                            provenance={"command": command_line(), "checkpoint": str(args.checkpoint)})
    print(json.dumps({"out": str(args.out), "threshold": card.threshold, "review_threshold": card.review_threshold,
                      "files": card.files}))
    return 0
