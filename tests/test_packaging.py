"""The wheel the images and `pip install` users get holds what the worker needs at run time: built
from this tree, installed apart from the checkout, and run from outside it (the tests otherwise run
the editable checkout, where a file the package data misses is still found)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the files git tracks or would track: setuptools builds in the source tree
    (build/, *.egg-info), and a build/ left there puts deleted modules into later wheels."""
    out, tree = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("tree")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file() and not name.startswith("tests/"):
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(tree)], check=True, capture_output=True, timeout=300, env={**os.environ, "PIP_NO_INPUT": "1"})
    [found] = out.glob("deepfake_moderation-*.whl")
    return found


def test_the_wheel_holds_the_packages_their_data_and_the_licence_and_nothing_else(wheel):
    from worker import __version__

    names = zipfile.ZipFile(wheel).namelist()
    assert wheel.name.startswith(f"deepfake_moderation-{__version__}-")
    assert {"worker/default_model/model.json", "worker/default_model/model.onnx", "worker/default_model/weights.pt",
            "worker/schemas/verdict.schema.json", "worker/rq_worker.py", "training/cli.py"} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert {n.split("/")[0] for n in names} == {"worker", "training", f"deepfake_moderation-{__version__}.dist-info"}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


@pytest.mark.slow
def test_the_installed_wheel_scores_the_sample_clip_from_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPFAKE_", "RQ_"))}
    env |= {"PYTHONPATH": str(site), "DEEPFAKE_LOG_FORMAT": "json"}
    code = ("import sys, worker, training; from worker.cli import main; "
            "assert worker.__file__.startswith(sys.argv[1]), worker.__file__; "
            "sys.exit(main(['moderate', '--example', '--frames', '4']))")
    done = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [verdict] = [json.loads(line) for line in done.stdout.splitlines()]
    assert verdict["status"] == "ok" and verdict["model"]["name"] and verdict["faces"]
    assert "not on deepfake data" in verdict["model"]["warning"]  # the packaged default model, from the wheel
