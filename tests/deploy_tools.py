"""What the deployment tests (test_deploy.py, test_dockerfile.py, test_monitoring.py) share: the worker
class the image and the manifests name, how a command-line tool they need is found, the Kubernetes
versions and hand-written schemas manifests are validated against, and the Dockerfile read as stages."""
from __future__ import annotations

import json
import re
import shutil
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SCHEMAS = ROOT / "deploy" / "schemas"
WORKER_CLASS = "worker.rq_worker.DeepfakeWorker"
MISSING_TOOL = "{tool} not found. CI must install it: {how} (the deployment tests never skip for a missing tool)."


def tool(name: str) -> str | None:
    """A tool installed beside this Python (the virtual environment's bin/), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def k8s_versions() -> list[str]:
    """Every Kubernetes minor from 1.30 on that kubernetes-validate bundles schemas for."""
    try:
        from kubernetes_validate.utils import all_versions
    except ImportError:
        pytest.fail(MISSING_TOOL.format(tool="kubernetes-validate", how="pip install kubernetes-validate"))
    minors = sorted({".".join(v.split(".")[:2]) for v in all_versions()}, key=lambda v: tuple(map(int, v.split("."))))
    return [v for v in minors if tuple(map(int, v.split("."))) >= (1, 30)]


@cache
def schema_validator(filename: str):
    """A validator for one of the hand-written JSON Schemas in deploy/schemas (see its README)."""
    import jsonschema

    schema = json.loads((SCHEMAS / filename).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def schema_errors(filename: str, doc: dict) -> list[str]:
    return [f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}"
            for e in schema_validator(filename).iter_errors(doc)]


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
