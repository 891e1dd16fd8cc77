"""CPU quotas: the cgroup v2 `cpu.max` and v1 CFS files parsed, and the threads a worker may use
(quota rounded up, capped by the CPU affinity)."""
from __future__ import annotations

import os

import pytest

from worker.cpus import available_cpus, cgroup_cpu_limit, parse_cfs_quota, parse_cpu_max


@pytest.mark.parametrize("text,cpus", [("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5),
                                       ("50000 100000", 0.5), ("max", None), ("", None)])
def test_parse_cpu_max(text, cpus) -> None:
    assert parse_cpu_max(text) == cpus


def test_parse_cfs_quota() -> None:
    assert parse_cfs_quota("-1\n", "100000\n") is None
    assert parse_cfs_quota("300000\n", "100000\n") == 3.0


def test_cgroup_limit_and_available_cpus(tmp_path) -> None:
    affinity = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2) == 1.5
    assert available_cpus(v2) == min(affinity, 2)  # 1.5 CPUs → 2 threads (rounded up), capped by affinity
    (v2 / "cpu.max").write_text("50000 100000\n")
    assert available_cpus(v2) == 1
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(v2) is None and available_cpus(v2) == affinity
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) == 1.0 and available_cpus(v1) == 1
    assert cgroup_cpu_limit(tmp_path / "missing") is None
    assert available_cpus(tmp_path / "missing") == affinity


@pytest.mark.parametrize("env", [{"OMP_NUM_THREADS": "1"}, {"DEEPFAKE_ENGINE_THREADS": "1"}], ids=["omp", "engine"])
def test_the_worker_sizes_torch_and_opencv_pools_to_its_budget(env) -> None:
    """A Moderator sizes PyTorch's pool (detector, PyTorch engine) and OpenCV's to the thread budget:
    OpenCV ignores OMP_NUM_THREADS, and PyTorch's default is the host's cores whatever the quota.
    Run in a fresh process, as the pools are process-wide."""
    import subprocess
    import sys

    if os.cpu_count() == 1:
        pytest.fail("needs a machine with 2 CPUs or more to tell a pool of 1 from the default")
    code = ("import cv2, torch\n"
            "before = cv2.getNumThreads()\n"
            "from worker.pipeline import Moderator\nfrom worker.settings import Settings\n"
            "Moderator(Settings(log_format='json'))\n"
            "print(before, torch.get_num_threads(), cv2.getNumThreads())\n")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DEEPFAKE_ENGINE_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    before, torch_threads, cv2_threads = map(int, out[-3:])
    assert before > 1 and (torch_threads, cv2_threads) == (1, 1)
