"""The prepared H200 check (bench/gpu_verify.py) runs on the CPU in its dry-run mode, every section
without an error: device time is scarce (15 minutes a session, when lent at all), and a section that
fails there is lost. Its parity section once fed 299-px crops to the 128-px demo model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_gpu_check_dry_runs_every_section_without_an_error(tmp_path):
    # the clips are made in a child process: building a 10 s 1080p clip holds ~3 GB of frames, which
    # pytest would otherwise keep as its peak (and pass on to later tests' subprocesses)
    make = ("import sys; from pathlib import Path; from bench.clips import face_clip\n"  # 3 s: a dry run checks paths
            "for h in (720, 1080): face_clip(Path(sys.argv[1]) / f'clip{h}p.mp4', height=h, seconds=3)")
    subprocess.run([sys.executable, "-c", make, str(tmp_path)], cwd=ROOT, check=True, timeout=300)
    proc = subprocess.run([sys.executable, "bench/gpu_verify.py", "--out", str(tmp_path / "out"), "--clips",
                           str(tmp_path), "--dry-run", "--budget-s", "400"], cwd=ROOT, capture_output=True,
                          text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_verify.json").read_text())
    assert {"environment", "parity", "decode", "detect", "pipeline"} <= results.keys(), results.keys()
    failed = {name: r.get("error") for name, r in results.items() if isinstance(r, dict) and "error" in r}
    assert not failed, failed
    # On the CPU the "device" run is the reference model itself (fp32 differs by 0 by construction), so
    # what a dry run can show is that every model and mode is scored, on crops the model tells apart,
    # and that bf16 autocast really ran (it differs from fp32) without wrecking the probabilities.
    parity = {name: r for name, r in results["parity"].items() if isinstance(r, dict)}
    demo = json.loads((ROOT / "worker" / "default_model" / "model.json").read_text())["name"]
    assert results["parity"]["crops"] == 32 and sorted(parity) == sorted([f"demo_{demo}", "mdcsd_tiny_calibrated"])
    for name, r in parity.items():
        assert set(r) == {"cpu_prob_range", "fp32", "fp32_tf32", "bf16"}, (name, r)  # fp16: not on the CPU
        low, high = r["cpu_prob_range"]
        assert 0 <= low < high <= 1, (name, r)
        assert 0 < r["bf16"] < 0.1, (name, r)
    assert results["pipeline"]["clip1080p_pipeline_1w"]["per_worker"][0]["status"] == "ok"


def test_a_misspelt_section_or_mode_stops_the_check_before_any_device_time(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_verify.py", "--out", str(tmp_path), "--sections",
                           "decode,pipline", "--modes", "fp16,fp61"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown section or mode: pipline, fp61" in proc.stderr
    assert not (tmp_path / "gpu_verify.json").exists()  # nothing ran, not even the environment probe


def test_each_section_gets_its_share_of_the_budget_in_whatever_order_they_run():
    sys.path.insert(0, str(ROOT))
    from bench.gpu_verify import deadlines

    # Throughput last (as the README's command runs it) still gets its share, not a deadline long past.
    assert deadlines(["decode", "detect", "pipeline", "throughput"], 0.0, 450.0) == pytest.approx(
        {"decode": 50.0, "detect": 100.0, "pipeline": 250.0, "throughput": 450.0})
    assert deadlines(["throughput"], 10.0, 100.0) == {"throughput": 110.0}
