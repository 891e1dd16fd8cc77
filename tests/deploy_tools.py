"""What the deployment tests (test_deploy.py, test_dockerfile.py, test_monitoring.py) share: the worker,
job and connection classes the image and the manifests name, how a command-line tool they need is
found, the overlays rendered by kustomize, the Kubernetes versions and hand-written schemas manifests
are validated against, and the Dockerfile read as stages."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache, lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SCHEMAS = ROOT / "deploy" / "schemas"
WORKER_CLASS = "worker.rq_worker.DeepfakeWorker"
JOB_CLASS = "worker.rq_worker.DeepfakeJob"
CONNECTION_CLASS = "worker.redis_client.WaitingRedis"
DEPLOY = ROOT / "deploy"
OVERLAYS_DIR = DEPLOY / "overlays"
WORKER = "deepfake-worker"
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


# -- rendering --------------------------------------------------------------------------------------


KUBECTL_HOW = "bash deploy/ci/install-kubectl.sh (a kubectl v1.27+, for kustomize v5 components; see docs/deploy.md)"


@lru_cache(maxsize=1)
def _kustomize_command() -> tuple[str, ...]:
    kubectl = tool("kubectl")
    if kubectl:
        proc = subprocess.run([kubectl, "version", "--client", "-o", "json"], check=False, capture_output=True, text=True, timeout=60)
        minor = re.sub(r"\D.*", "", json.loads(proc.stdout)["clientVersion"]["minor"]) if proc.returncode == 0 else ""
        if not minor or int(minor) < 27:
            pytest.fail(f"{kubectl} is too old (v1.{minor or '?'}): {KUBECTL_HOW}")
        return (kubectl, "kustomize")
    kustomize = tool("kustomize")
    if kustomize:
        return (kustomize, "build")
    pytest.fail(MISSING_TOOL.format(tool="kubectl (or kustomize)", how=KUBECTL_HOW))


@cache
def render(overlay: str) -> tuple[dict, ...]:
    cmd = [*_kustomize_command(), str(OVERLAYS_DIR / overlay)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def objects(overlay: str, kind: str) -> list[dict]:
    return [d for d in render(overlay) if d["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict:
    found = [d for d in objects(overlay, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind}/{name}, found {len(found)}"
    return found[0]


def worker_deployment(overlay: str) -> dict:
    return one(overlay, "Deployment", WORKER)


def worker_container(overlay: str) -> dict:
    containers = worker_deployment(overlay)["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["worker"]
    return containers[0]


def settings_from_configmap(overlay: str, monkeypatch: pytest.MonkeyPatch):
    """The worker's Settings as the pod builds them: the ConfigMap its envFrom names, nothing else."""
    from worker.settings import Settings

    refs = [e["configMapRef"]["name"] for e in worker_container(overlay).get("envFrom", []) if "configMapRef" in e]
    assert len(refs) == 1, f"{overlay}: the worker should take its settings from one ConfigMap, got {refs}"
    data = one(overlay, "ConfigMap", refs[0]).get("data", {})
    assert data and all(k.startswith("DEEPFAKE_") for k in data), data
    for name in list(os.environ):
        if name.startswith(("DEEPFAKE_", "RQ_")):
            monkeypatch.delenv(name)
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    return Settings(), data


def render_with_component(tmp_path: Path, overlay: str, component: str) -> list[dict]:
    """The overlay, copied with the deploy tree, with deploy/components/<component> added to its
    `components`, as the component's comment tells a user to add it."""
    deploy = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", deploy)
    path = deploy / "overlays" / overlay / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    kustomization.setdefault("components", []).append(f"../../components/{component}")
    path.write_text(yaml.safe_dump(kustomization))
    kubectl = tool("kubectl")
    if not kubectl:
        pytest.fail(MISSING_TOOL.format(tool="kubectl", how="bash deploy/ci/install-kubectl.sh"))
    proc = subprocess.run([kubectl, "kustomize", str(path.parent)], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]
