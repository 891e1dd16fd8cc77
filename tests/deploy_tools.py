"""What the deployment tests (test_deploy.py, test_dockerfile.py) share: the worker class the image and
the manifests name, how a command-line tool they need is found, and the Dockerfile read as stages."""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
WORKER_CLASS = "worker.rq_worker.DeepfakeWorker"
MISSING_TOOL = "{tool} not found. CI must install it: {how} (the deployment tests never skip for a missing tool)."


def tool(name: str) -> str | None:
    """A tool installed beside this Python (the virtual environment's bin/), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line:
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions, by stage name (every stage must be named)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            m = re.search(r"\bAS\s+(\S+)\s*$", rest, re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            current = m.group(1)
            stages[current] = [(word, rest)]
        elif current:
            stages[current].append((word, rest))
    return stages
