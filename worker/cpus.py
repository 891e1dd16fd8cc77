"""The CPUs this process may use: the cgroup CPU quota, which thread pools must be sized from.

ONNX Runtime, FFmpeg and OpenMP size their pools from the host's cores (or the affinity mask), not
from a container's CPU limit: a pod limited to 2 CPUs on a 64-core node then runs dozens of threads
and is throttled to a crawl.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` ("QUOTA PERIOD" in µs, QUOTA may be ``max``) → CPUs, None = unlimited."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    quota = float(parts[0])
    period = float(parts[1]) if len(parts) > 1 else 100_000.0
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def parse_cfs_quota(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` (-1 = unlimited) and ``cpu.cfs_period_us`` → CPUs, None = unlimited."""
    quota, period = float(quota_text.strip()), float(period_text.strip())
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs, or None when there is none (or none readable)."""
    root = Path(root)
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            return parse_cpu_max(v2.read_text())
        for v1 in (root / "cpu", root / "cpu,cpuacct", root):
            q, p = v1 / "cpu.cfs_quota_us", v1 / "cpu.cfs_period_us"
            if q.is_file() and p.is_file():
                return parse_cfs_quota(q.read_text(), p.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: the cgroup quota rounded up, capped by the affinity mask, at least 1.

    Rounding up (as Go's GOMAXPROCS does since 1.25): a 1.5-CPU quota runs 2 threads that are
    throttled a little, rather than 1 thread that leaves half a CPU unused.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def thread_budget(explicit: int | None = None) -> int:
    """Threads for one compute pool: `explicit`, else `OMP_NUM_THREADS` where it is a positive number
    (the manifests set it from the pod's CPU request), else `available_cpus()`."""
    if explicit:
        return explicit
    try:
        omp = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        omp = 0
    return omp if omp > 0 else available_cpus()


def bound_thread_pools(threads: int) -> None:
    """Size PyTorch's intra-op pool (the face detector, the PyTorch engine) and OpenCV's (crop
    resizing) to `threads`. Left alone, PyTorch takes the host's cores whatever the cgroup quota
    (`docker run --cpus 2` on a 64-core host ran 64 threads), and OpenCV does even under
    `OMP_NUM_THREADS`."""
    import cv2
    import torch

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
