"""A training run never replaces, mixes or misplaces another: resume refuses another model and a
weights-only best.pt, an --out holding a run is refused without --resume or --overwrite, a resumed
run's best.pt is its own; one-class data, --no-progress, Ctrl-C, evaluate's report folders and the
paired batches say or do what they should."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

import training.train as train_mod
from test_training import SIZE, Synthetic, _scripted_validation, cfg_for
from training.run_checks import UsageError
from training.sampling import PairedBatchSampler
from training.train import train


def _digests(run) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def demo32(tmp_path_factory):
    """The real-footage SBI demo cache at 32 px and a one-epoch mdcsd_tiny run on it, through the CLI."""
    from training.cli import main

    root = tmp_path_factory.mktemp("runs")
    data, run = root / "data", root / "run"
    assert main(["make-demo-data", "--out", str(data), "--size", "32"]) == 0
    assert main([*_train_argv(data, run), "--epochs", "1"]) == 0
    return data, run


def _train_argv(data, out) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--model", "mdcsd_tiny", "--model-arg",
            f"input_size={SIZE}", "--batch-size", "16", "--seed", "1", "--no-progress"]


# -- 1. resume takes the checkpoint's model only -----------------------------------------------------------


def test_resume_refuses_another_model_variant_or_kwargs(tmp_path):
    ds, val = Synthetic(16), Synthetic(8, seed=1)
    train(cfg_for(tmp_path, epochs=1, max_steps_per_epoch=1), ds, val)
    run = tmp_path / "run"
    before, last = _digests(run), str(run / "last.pt")
    with pytest.raises(UsageError, match=r"--resume .*last.pt is mdcsd_tiny \(transform=dct\); this command asks "
                                         r"for mdcsd_tiny_fft \(transform=fft\): resume with the same --model"):
        train(cfg_for(tmp_path, model="mdcsd_tiny_fft", epochs=2, resume=last), ds, val)
    with pytest.raises(UsageError, match=r"is mdcsd_tiny \(width=0.125\); this command asks for mdcsd_tiny "
                                         r"\(width=0.25\)"):
        train(cfg_for(tmp_path, model_kwargs={"input_size": SIZE, "width": 0.25}, epochs=2, resume=last), ds, val)
    assert _digests(run) == before  # best.pt, last.pt and config.json untouched


def test_cli_resume_of_another_model_is_a_usage_error(demo32, tmp_path, capsys):
    from training.cli import main

    data, run = demo32
    before = _digests(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*_train_argv(data, run), "--model", "mdcsd_tiny_fft", "--epochs", "2", "--resume", str(run / "last.pt")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 2, err  # usage + error
    assert f"--resume {run / 'last.pt'} is mdcsd_tiny (transform=dct); this command asks for mdcsd_tiny_fft" in err
    assert _digests(run) == before


# -- 2. an --out holding a run ------------------------------------------------------------------------------


def test_out_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path, monkeypatch):
    ds, val = Synthetic(16), Synthetic(8, seed=1)
    _scripted_validation(monkeypatch, accs=[0.9], losses=[0.3])
    train(cfg_for(tmp_path, epochs=1, max_steps_per_epoch=1), ds, val)
    run = tmp_path / "run"
    before = _digests(run)
    with pytest.raises(UsageError, match=r"already holds a run \(last.pt and best.pt\): continue it with --resume "
                                         r".*last.pt, train into a new --out, or pass --overwrite"):
        train(cfg_for(tmp_path, epochs=1, max_steps_per_epoch=1, seed=3), ds, val)
    # A command that fails its checks writes nothing, config.json included, even with --overwrite.
    with pytest.raises(ValueError, match="the training crops are"):
        train(cfg_for(tmp_path, model_kwargs={"input_size": 48}, overwrite=True), ds, val)
    with pytest.raises(ValueError, match="paired=True works in a single process and without balance"):
        train(cfg_for(tmp_path, paired=True, balance=True, overwrite=True), ds, val)
    assert _digests(run) == before
    events = run / "tensorboard" / "events.out.tfevents.1.host"  # the replaced run's curves
    events.parent.mkdir()
    events.write_bytes(b"old run")
    _scripted_validation(monkeypatch, accs=[0.5, 0.6], losses=[0.7, 0.6])  # a worse first epoch: best.pt all the same
    res = train(cfg_for(tmp_path, epochs=1, max_steps_per_epoch=1, seed=3, overwrite=True), ds, val)
    assert res.best["val_acc"] == 0.5 and json.loads((run / "config.json").read_text())["seed"] == 3
    assert torch.load(run / "best.pt", weights_only=True)["metrics"]["val_acc"] == 0.5
    assert not events.parent.exists()  # TensorBoard would have drawn both runs as one
    events.parent.mkdir()
    events.write_bytes(b"this run's first epoch")
    train(cfg_for(tmp_path, epochs=2, max_steps_per_epoch=1, seed=3, resume=str(run / "last.pt")), ds, val)
    assert events.read_bytes() == b"this run's first epoch"  # a resumed run keeps its curves


def test_cli_refuses_an_out_holding_a_run(demo32, capsys):
    from training.cli import main

    data, run = demo32
    before = _digests(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*_train_argv(data, run), "--epochs", "1"])
    assert exc.value.code == 2 and "pass --overwrite to replace it" in capsys.readouterr().err
    assert _digests(run) == before


# -- 3. a resumed run's best.pt -----------------------------------------------------------------------------


def test_resume_into_another_dir_keeps_only_its_own_best(tmp_path, monkeypatch):
    ds, val = Synthetic(16), Synthetic(8, seed=1)
    kw = dict(max_steps_per_epoch=1)
    _scripted_validation(monkeypatch, accs=[0.6, 0.9, 0.7], losses=[0.6, 0.5, 0.4])
    train(cfg_for(tmp_path / "ref", epochs=3, **kw), ds, val)
    _scripted_validation(monkeypatch, accs=[0.95], losses=[0.1])
    train(cfg_for(tmp_path / "x", epochs=1, **kw), ds, val)
    ref, other = tmp_path / "ref" / "run", tmp_path / "other"
    other.mkdir()
    shutil.copy2(tmp_path / "x" / "run" / "best.pt", other / "best.pt")  # another run's best
    resume = str(ref / "last.pt")
    with pytest.raises(UsageError, match=r"is another run's best.pt, not the best epoch of --resume .* \(epoch 2\)"):
        train(cfg_for(tmp_path, out_dir=str(other), epochs=4, resume=resume, **kw), ds, val)
    _scripted_validation(monkeypatch, accs=[0.5], losses=[0.9])
    res = train(cfg_for(tmp_path, out_dir=str(other), epochs=4, resume=resume, overwrite=True, **kw), ds, val)
    assert res.best_epoch == 2 and res.best["val_acc"] == 0.9  # ref's best, at its own best.pt
    assert torch.load(other / "best.pt", weights_only=True)["epoch"] == 2
    # resume from a best.pt: one line, not a KeyError 'optimizer'
    with pytest.raises(UsageError, match=r"holds weights only \(a best.pt\); resume from the last.pt beside it"):
        train(cfg_for(tmp_path, out_dir=str(tmp_path / "y"), epochs=4, resume=str(ref / "best.pt"), **kw), ds, val)


def test_resume_without_a_best_pt_beside_it_ends_with_one(tmp_path, monkeypatch):
    """A last.pt copied alone into a new directory: the run's best.pt comes from last.pt when that is the
    best epoch; otherwise its weights are gone and the coming epochs' best becomes best.pt (not a
    FileNotFoundError at the end)."""
    ds, val = Synthetic(16), Synthetic(8, seed=1)
    kw = dict(max_steps_per_epoch=1)
    for name, accs, best_epoch in (("last-is-best", [0.5, 0.9], 2), ("earlier-best", [0.9, 0.5], 3)):
        _scripted_validation(monkeypatch, accs=accs, losses=[0.5, 0.5])
        train(cfg_for(tmp_path / name, epochs=2, **kw), ds, val)
        lone = tmp_path / name / "lone"
        lone.mkdir()
        shutil.copy2(tmp_path / name / "run" / "last.pt", lone / "last.pt")
        _scripted_validation(monkeypatch, accs=[0.4], losses=[0.9])  # the resumed epoch does not improve
        res = train(cfg_for(tmp_path / name, out_dir=str(tmp_path / name / "new"), epochs=3,
                            resume=str(lone / "last.pt"), **kw), ds, val)
        assert res.best_epoch == best_epoch, name
        assert torch.load(res.best_path, weights_only=True)["epoch"] == best_epoch, name


# -- 4. one class -------------------------------------------------------------------------------------------


class OneClass(Dataset):
    def __init__(self, ds: Dataset, label: int) -> None:
        self.items = [ds[i] for i in range(len(ds)) if ds[i][1] == label]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_one_class_training_split_is_refused_and_validation_warned(tmp_path, caplog):
    ds, val = Synthetic(16), Synthetic(8, seed=1)
    with pytest.raises(ValueError, match="the training split holds no fake crops"):
        train(cfg_for(tmp_path, epochs=1, max_steps_per_epoch=1), OneClass(ds, 0), val)
    assert not (tmp_path / "run").exists()
    with caplog.at_level(logging.WARNING, logger="training.run_checks"):
        res = train(cfg_for(tmp_path, epochs=1, max_steps_per_epoch=1), ds, OneClass(val, 1))
    assert "the validation split holds no real crops: val_auc is undefined" in caplog.text
    assert res.best["val_auc"] != res.best["val_auc"]  # NaN in the API; the CLI prints null


def test_cli_summary_prints_null_not_nan(demo32, tmp_path, monkeypatch, capsys):
    from training.cli import main

    data, _ = demo32
    best = {"epoch": 1, "val_loss": 0.5, "val_acc": 1.0, "val_auc": float("nan"), "val_video_auc": float("nan")}
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: SimpleNamespace(
        best_epoch=1, best=best, best_path=tmp_path / "best.pt", seconds=1.0))
    capsys.readouterr()
    assert main([*_train_argv(data, tmp_path / "run"), "--epochs", "1"]) == 0

    def no_nan(name):
        raise AssertionError(f"{name} is not JSON")

    out = json.loads(capsys.readouterr().out, parse_constant=no_nan)
    assert out["best"]["val_auc"] is None and out["best"]["val_acc"] == 1.0


# -- 5. --no-progress keeps the epoch lines ------------------------------------------------------------------


def test_epoch_line_is_printed_without_progress_bars(tmp_path, capsys):
    train(cfg_for(tmp_path, epochs=2, max_steps_per_epoch=1, progress=False), Synthetic(16), Synthetic(8, seed=1))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"] and "val_acc" in lines[0]
    assert "epoch 1/2" not in captured.out  # stdout stays the command's JSON summary


# -- 6. evaluate's report folders ------------------------------------------------------------------------------


def test_evaluate_refuses_caches_named_alike(demo32, tmp_path, capsys):
    from training.cli import main

    data, run = demo32
    twin = tmp_path / "other" / data.name
    shutil.copytree(data, twin)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(data), str(twin),
              "--out", str(tmp_path / "ev")])
    assert exc.value.code == 2 and f"--data caches named alike ({data.name})" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


# -- 7. Ctrl-C says how to resume -------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_crop_that_no_longer_decodes_ends_the_run_in_one_line_naming_it_and_the_resume(demo32, tmp_path, capsys,
                                                                                          workers):
    """Cut short after extraction: the error names the crop, its index and --check-crops, and the epoch
    to resume from; read by a DataLoader worker process (on CUDA by default) it is the same one line,
    not the worker's traceback."""
    from training.cli import main

    data, run = demo32
    copy, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data, copy)
    shutil.copytree(run, out)  # epoch 1 finished
    crop = sorted((copy / "train").rglob("*.png"))[0]
    crop.write_bytes(crop.read_bytes()[:100])
    capsys.readouterr()
    argv = [*_train_argv(copy, out), "--epochs", "2", "--resume", str(out / "last.pt"), "--workers", workers]
    assert main(argv) == 1
    *before, err = capsys.readouterr().err.strip().splitlines()
    # the one other line a resume with another worker count may print (where logging reaches stderr): its warning
    assert all("with loader_workers 0 -> 1: applies from the next epoch" in line for line in before), before
    assert workers == "1" or not before, before
    assert err.startswith(f"error: OSError: could not read crop {crop} (gone, unreadable or corrupt): remove its row from "
                          f"{copy / 'train' / 'index.csv'}, or extract into a new directory; --check-crops "), err
    assert err.endswith(f"; epoch 1 is the last finished: continue with --resume {out / 'last.pt'}"), err


def test_a_run_that_fails_before_its_first_epoch_does_not_offer_the_replaced_runs_resume(demo32, tmp_path, capsys):
    """--overwrite over another run, refused for crops of another side: that run's last.pt is not
    this command's to continue, so the error line does not offer it."""
    from training.cli import main

    data, run = demo32
    out = tmp_path / "run"
    shutil.copytree(run, out)
    capsys.readouterr()
    argv = [*_train_argv(data, out), "--overwrite", "--model-arg", "input_size=48"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the training crops are 32×32 px but mdcsd_tiny takes 48×48") and "--resume" not in err


def test_interrupt_names_the_resume_command(demo32, tmp_path, monkeypatch, capsys):
    from training.cli import main

    data, run = demo32
    out = tmp_path / "run"
    shutil.copytree(run, out)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "validate", interrupted)  # Ctrl-C in epoch 2's validation
    capsys.readouterr()
    assert main([*_train_argv(data, out), "--epochs", "3", "--resume", str(out / "last.pt")]) == 130
    err = capsys.readouterr().err
    assert calls and f"interrupted; epoch 1 is the last finished: continue with --resume {out / 'last.pt'}" in err


# -- 8. paired batches ---------------------------------------------------------------------------------------


class Records(Dataset):
    """CropDataset-style records: frames with a real crop, most with a self-blended twin."""

    def __init__(self, frames: int, singles: int = 0) -> None:
        self.records = [SimpleNamespace(video_id=f"v{f % 5}{sfx}", frame=f)
                        for f in range(frames) for sfx in ("", "_sbi")[: 1 if f < singles else 2]]

    def __len__(self) -> int:
        return len(self.records)


@pytest.mark.parametrize("batch", [1, 2, 15, 16, 33])
@pytest.mark.parametrize("singles", [0, 7])
def test_paired_batches_fit_the_batch_size_and_len(batch, singles):
    ds = Records(158, singles)
    gen = torch.Generator()
    sampler = PairedBatchSampler(ds, batch, gen)
    for epoch in range(3):
        gen.manual_seed(epoch)
        n = len(sampler)
        batches = list(sampler)
        assert n == len(batches), (batch, singles, epoch)
        assert max(map(len, batches)) <= batch
        assert sorted(i for b in batches for i in b) == list(range(len(ds)))
        if batch > 1:  # a real crop and its twin share a batch
            where = {i: k for k, b in enumerate(batches) for i in b}
            keys = [(r.video_id.removesuffix("_sbi"), r.frame) for r in ds.records]
            assert all(where[i] == where[j] for i in range(len(ds)) for j in (i - 1,) if j >= 0
                       and keys[i] == keys[j])


def test_a_best_epoch_with_a_nan_loss_is_still_recognised_as_the_runs_own():
    """An fp16 overflow can leave epoch 1's val_loss NaN, and NaN never equals itself: the run's own
    best.pt was then taken for another run's, and resuming it in place refused."""
    from training.run_checks import _matches

    nan = float("nan")
    assert _matches({"epoch": 1, "val_acc": 0.5, "val_loss": nan}, {"epoch": 1, "val_acc": 0.5, "val_loss": nan})
    assert not _matches({"epoch": 1, "val_acc": 0.5, "val_loss": nan}, {"epoch": 2, "val_acc": 0.5, "val_loss": nan})
