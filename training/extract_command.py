"""The `extract` command of ``python -m training``: which frames of each video to crop (the paper's
numbers, or the worker's sampling to calibrate a threshold on), cut into a resumable crop cache."""
from __future__ import annotations

import argparse
import json

FAILED_LISTED = 100  # failed videos named in the summary; more are counted


def _frames_for(dataset: str, override: int | None, sampling: str = "paper") -> tuple[dict[str, int], str]:
    """Paper III-A: FF++ 270 consecutive train frames, 100 val/test; Celeb-DF 25 frames per video.
    `sampling="worker"`: the worker's default frame count (or `override`) spread over each video."""
    if sampling == "worker":
        from worker.settings import Settings

        n = override if override is not None else Settings.model_fields["frames"].default
        return {s: n for s in ("train", "val", "test")}, "even"
    if override is not None:
        return {s: override for s in ("train", "val", "test")}, "even" if dataset == "celebdf" else "consecutive"
    if dataset == "celebdf":
        return {"train": 25, "val": 25, "test": 25}, "even"
    return {"train": 270, "val": 100, "test": 100}, "consecutive"


def cmd_extract(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from training.data import assign_frames, celebdf_videos, dfd_videos, extract_videos, ffpp_videos
    from training.data.datasets import FFPP_COMPRESSIONS, FFPP_KNOWN

    if args.frames is not None and args.frames < 1:
        parser.error("--frames must be at least 1")
    if args.compression not in FFPP_COMPRESSIONS:  # checked here: the data package is slow to import for --help
        parser.error(f"--compression must be one of {', '.join(FFPP_COMPRESSIONS)}, not {args.compression!r}")
    if unknown := sorted(set(args.manipulations or ()) - set(FFPP_KNOWN)):
        dfd = " (for DeepFakeDetection: --dataset dfd)" if "DeepFakeDetection" in unknown else ""
        parser.error(f"unknown --manipulations {', '.join(unknown)}; FF++ has {', '.join(FFPP_KNOWN)}{dfd}")
    if args.dataset == "ffpp":
        kw = {"manipulations": args.manipulations} if args.manipulations else {}
        items = ffpp_videos(args.root, splits=args.splits, compression=args.compression, missing=args.missing, **kw)
    elif args.dataset == "celebdf":
        items = celebdf_videos(args.root, missing=args.missing)
    else:
        items = dfd_videos(args.root, compression=args.compression)
    frames, mode = _frames_for(args.dataset, args.frames, args.sampling)
    items = assign_frames(items, frames, balance=() if args.no_balance else ("train", "val"))
    stats = extract_videos(items, args.out, frames_per_video=max(frames.values()), size=args.size, mode=mode)
    failed = [{"video": video, "error": error} for video, error in stats.failed]
    summary = {"videos": stats.videos, "skipped": stats.skipped, "frames": stats.frames, "crops": stats.crops,
               "no_face": stats.no_face, "failed": len(failed), "failed_videos": failed[:FAILED_LISTED]}
    if len(failed) > FAILED_LISTED:
        summary["failed_videos_not_listed"] = len(failed) - FAILED_LISTED
    print(json.dumps(summary))
    return 1 if stats.failed else 0
