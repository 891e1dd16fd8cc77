"""The container image and Kubernetes manifests agree with the code, and validate offline.

- Every overlay under deploy/overlays renders with `kubectl kustomize` (or a `kustomize` binary).
- The rendered built-in kinds validate against the Kubernetes OpenAPI schemas in strict mode
  (PyPI `kubernetes-validate`: unknown fields fail), for every Kubernetes minor from 1.30 to the
  newest it bundles; KEDA's ScaledObject/TriggerAuthentication validate against the hand-written
  JSON Schemas in deploy/schemas (see its README: a documented subset, not KEDA's own CRD).
- The invariants that matter hold, read from the code rather than restated (how workers stop, roll
  out and keep their jobs: test_deploy_lifecycle.py): the probes and scrape annotations use the settings' metrics
  port, KEDA watches RQ's list for the settings' queue in the database the workers' RQ_REDIS_URL
  names (over TLS when it does), the container runs `rq worker <queue>` with DeepfakeWorker (and its job
  class, and the connection class that waits out a full Redis), the GPU overlay runs the engine
  measured on a GPU, nothing secret is inlined, the pod runs as non-root on a read-only root
  filesystem, and the trial's Redis fills up below its memory limit.
- The image tags the overlays use are Dockerfile targets (the Dockerfile itself: test_dockerfile.py).

Needs: kubectl (v1.27+, for kustomize v5 components; deploy/ci/install-kubectl.sh provides one) or
kustomize, beside this Python or on PATH; `kubernetes-validate`,
`jsonschema` and `pyyaml` from PyPI. Missing tools fail the
tests with what to install: they are never skipped.
"""
from __future__ import annotations

import base64
import importlib
import json
import re
import textwrap
import urllib.parse
from pathlib import Path

import pytest
import yaml
from deploy_tools import (
    CONNECTION_CLASS,
    DEPLOY,
    JOB_CLASS,
    OVERLAYS_DIR,
    WORKER,
    WORKER_CLASS,
    dockerfile_stages,
    k8s_versions,
    objects,
    one,
    render,
    schema_errors,
    schema_validator,
    settings_from_configmap,
    worker_container,
    worker_deployment,
)

ROOT = Path(__file__).resolve().parents[1]
# The overlays the docs promise; any further overlay is rendered and checked too.
REQUIRED_OVERLAYS = {"gpu", "cpu", "trial"}
OVERLAYS = sorted(p.parent.name for p in OVERLAYS_DIR.glob("*/kustomization.yaml"))
SECRET_WORDS = ("KEY", "SECRET", "PASSWORD", "TOKEN")


def pod_templates(overlay: str) -> list[tuple[str, dict]]:
    out = []
    for d in render(overlay):
        spec = d.get("spec") or {}
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", spec["template"]["spec"]))
        elif d["kind"] == "CronJob":
            out.append((f"CronJob/{d['metadata']['name']}", spec["jobTemplate"]["spec"]["template"]["spec"]))
        elif d["kind"] == "Pod":
            out.append((f"Pod/{d['metadata']['name']}", spec))
    return out


# -- the renders ------------------------------------------------------------------------------------


def test_overlays_present():
    assert REQUIRED_OVERLAYS <= set(OVERLAYS), OVERLAYS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders(overlay):
    kinds = {d["kind"] for d in render(overlay)}
    assert {"Deployment", "ConfigMap", "ServiceAccount", "PodDisruptionBudget", "ScaledObject",
            "TriggerAuthentication"} <= kinds, kinds
    for d in render(overlay):
        assert d["metadata"].get("namespace") == "deepfake", f"{overlay}: {d['kind']}/{d['metadata']['name']}"


KEDA_SCHEMAS = {
    "ScaledObject": "keda-scaledobject.schema.json",
    "TriggerAuthentication": "keda-triggerauthentication.schema.json",
}


def keda_validator(kind: str):
    return schema_validator(KEDA_SCHEMAS[kind])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_schemas_strict(overlay):
    import kubernetes_validate

    versions = k8s_versions()
    assert versions, "kubernetes-validate bundles no schema for Kubernetes 1.30 or newer"
    errors = []
    for d in render(overlay):
        if d["apiVersion"].startswith("keda.sh/"):
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{d['kind']}/{d['metadata']['name']} @ {version}: {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                errors.append(f"{d['kind']}/{d['metadata']['name']} @ {version}: {exc.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_schemas(overlay):
    keda = [d for d in render(overlay) if d["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for d in keda} == set(KEDA_SCHEMAS), [d["kind"] for d in keda]
    errors = [e for d in keda for e in schema_errors(KEDA_SCHEMAS[d["kind"]], d)]
    assert not errors, "\n".join(errors)


def test_keda_schemas_are_strict():
    """The hand-written schemas catch what matters: a misspelt field, an int where KEDA wants a string."""
    so = json.loads(json.dumps(one("cpu", "ScaledObject", WORKER)))
    assert not list(keda_validator("ScaledObject").iter_errors(so))
    typo = json.loads(json.dumps(so))
    typo["spec"]["minReplicas"] = 0
    assert list(keda_validator("ScaledObject").iter_errors(typo))
    not_a_string = json.loads(json.dumps(so))
    not_a_string["spec"]["triggers"][0]["metadata"]["listLength"] = 2
    assert list(keda_validator("ScaledObject").iter_errors(not_a_string))
    bad_key = json.loads(json.dumps(so))
    bad_key["spec"]["triggers"][0]["metadata"]["listname"] = "rq:queue:deepfake"
    assert list(keda_validator("ScaledObject").iter_errors(bad_key))
    # what docs/deploy.md says to set for a TLS Redis and another database passes
    tls = json.loads(json.dumps(so))
    tls["spec"]["triggers"][0]["metadata"].update(enableTLS="true", databaseIndex="3")
    assert not list(keda_validator("ScaledObject").iter_errors(tls))
    ta = json.loads(json.dumps(one("cpu", "TriggerAuthentication", "deepfake-redis")))
    ta["spec"]["secretTargetRef"][0].pop("key")
    assert list(keda_validator("TriggerAuthentication").iter_errors(ta))


# -- invariants: manifests vs code ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_command_and_class(overlay, monkeypatch):
    settings, _ = settings_from_configmap(overlay, monkeypatch)
    c = worker_container(overlay)
    argv = list(c.get("command", [])) + list(c.get("args", []))
    assert argv[:3] == ["rq", "worker", settings.queue], argv
    assert all(a.startswith("-") for a in argv[3:]), f"only flags may follow the queue name: {argv}"
    env = {e["name"]: e for e in c.get("env", [])}
    assert env["RQ_WORKER_CLASS"].get("value") == WORKER_CLASS
    # for `rq info` and other RQ tools run in the pod: they move abandoned jobs on with the worker's job class
    assert env["RQ_JOB_CLASS"].get("value") == JOB_CLASS
    assert env["RQ_CONNECTION_CLASS"].get("value") == CONNECTION_CLASS
    for dotted in (WORKER_CLASS, JOB_CLASS, CONNECTION_CLASS):
        module, _, cls = dotted.rpartition(".")
        assert hasattr(importlib.import_module(module), cls)
    # RQ reads its Redis URL from RQ_REDIS_URL: from a Secret, never inline.
    assert "secretKeyRef" in env["RQ_REDIS_URL"].get("valueFrom", {}), env["RQ_REDIS_URL"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_metrics_port(overlay, monkeypatch):
    settings, _ = settings_from_configmap(overlay, monkeypatch)
    port = settings.metrics_port
    assert port > 0, "the probes need /healthz: DEEPFAKE_METRICS_PORT must not be 0"
    c = worker_container(overlay)
    named = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert port in named.values(), named
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz", (probe, get)
        assert named.get(get["port"], get["port"]) == port, (probe, get)
    annotations = worker_deployment(overlay)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_the_rq_queue(overlay, monkeypatch):
    settings, _ = settings_from_configmap(overlay, monkeypatch)
    so = one(overlay, "ScaledObject", WORKER)
    spec = so["spec"]
    assert spec["scaleTargetRef"]["name"] == WORKER
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert spec["minReplicaCount"] == 0, "idle queues scale to zero"
    assert spec["maxReplicaCount"] >= 1 and spec["cooldownPeriod"] > 0
    assert "replicas" not in worker_deployment(overlay)["spec"], "KEDA owns the replica count"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == f"rq:queue:{settings.queue}"
    for secret_word in ("address", "password", "host"):
        assert secret_word not in trigger["metadata"], "connection details come from the TriggerAuthentication"
    auth = one(overlay, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    params = {r["parameter"] for r in auth["spec"]["secretTargetRef"]}
    assert "address" in params, params
    # KEDA reads the database the workers' RQ_REDIS_URL names, over TLS when that URL does: another
    # database holds an empty list, and no worker would ever start.
    url = urllib.parse.urlsplit(rq_redis_url(overlay))
    assert trigger["metadata"].get("databaseIndex", "0") == (url.path.strip("/") or "0"), (trigger, url.path)
    assert (trigger["metadata"].get("enableTLS", "false") == "true") == (url.scheme == "rediss"), trigger


def rq_redis_url(overlay: str) -> str:
    """RQ_REDIS_URL as the overlay renders it (the trial's Secret) or as deploy/secret.example.yaml shows it."""
    [ref] = [e["valueFrom"]["secretKeyRef"] for e in worker_container(overlay)["env"] if e["name"] == "RQ_REDIS_URL"]
    for s in objects(overlay, "Secret"):
        if s["metadata"]["name"] == ref["name"]:
            if ref["key"] in (s.get("stringData") or {}):
                return s["stringData"][ref["key"]]
            return base64.b64decode(s["data"][ref["key"]]).decode()
    [example] = [d for d in yaml.safe_load_all((DEPLOY / "secret.example.yaml").read_text())
                 if d and d["metadata"]["name"] == ref["name"]]
    return example["stringData"][ref["key"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_security(overlay, monkeypatch):
    _, data = settings_from_configmap(overlay, monkeypatch)
    spec = worker_deployment(overlay)["spec"]["template"]["spec"]
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc.get("runAsUser", 1) != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False, "service links would inject *_PORT variables into DEEPFAKE_*"
    sa = one(overlay, "ServiceAccount", spec["serviceAccountName"])
    assert sa["automountServiceAccountToken"] is False
    c = worker_container(overlay)
    csc = c["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"] and not csc["capabilities"].get("add")
    assert not csc.get("privileged")
    # The writable paths are emptyDirs: /tmp and the engine cache.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    for path in ("/tmp", data["DEEPFAKE_CACHE_DIR"]):
        assert path in mounts and "emptyDir" in volumes[mounts[path]], (path, mounts)
    for m in c["volumeMounts"]:
        if "emptyDir" not in volumes[m["name"]]:
            assert m.get("readOnly") is True, f"only the emptyDirs are writable: {m}"
    res = c["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]


def test_gpu_and_cpu_overlays(monkeypatch):
    gpu, _ = settings_from_configmap("gpu", monkeypatch)
    assert gpu.device.startswith("cuda")
    # `auto` would pick TensorRT, never measured on a GPU: opt-in (docs/deploy.md), not the default.
    assert gpu.engine == "pytorch"
    res = worker_container("gpu")["resources"]
    assert str(res["limits"]["nvidia.com/gpu"]) == "1"
    from worker import __version__

    # Tagged with the version (<version>-<target>): a new build gets a new tag, and the rollout replaces
    # every pod. Under a reused tag (`:gpu`) and IfNotPresent, nodes ran whatever build they had cached.
    assert worker_container("gpu")["image"].endswith(f":{__version__}-gpu")
    cpu, _ = settings_from_configmap("cpu", monkeypatch)
    assert cpu.device == "cpu"
    assert "nvidia.com/gpu" not in worker_container("cpu")["resources"].get("limits", {})
    assert worker_container("cpu")["image"].endswith(f":{__version__}-cpu")
    assert worker_container("trial")["image"].endswith(f":{__version__}-cpu")
    # production never moderates with the demo model an image built without MODEL_DIR holds; a trial may
    trial, _ = settings_from_configmap("trial", monkeypatch)
    assert cpu.require_vetted_model and gpu.require_vetted_model and not trial.require_vetted_model
    # The image tags name Dockerfile targets.
    stages = dockerfile_stages()
    assert {"gpu", "cpu"} <= set(stages)


def test_the_model_claim_binds_only_to_the_documented_volume():
    """The gpu overlay's model claim: a default StorageClass must not provision an empty volume for
    it, and the PersistentVolume docs/deploy.md shows is valid and binds to it."""
    import kubernetes_validate

    [claim] = [d for d in render("gpu") if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["storageClassName"] == "" and claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    docs = (ROOT / "docs" / "deploy.md").read_text()
    [volume] = [d for block in re.findall(r"```yaml\n(.*?)```", docs, re.S)
                for d in yaml.safe_load_all(textwrap.dedent(block)) if d and d.get("kind") == "PersistentVolume"]
    for version in k8s_versions():
        kubernetes_validate.validate(volume, version, strict=True)
    spec = volume["spec"]
    assert spec["claimRef"] == {"namespace": claim["metadata"]["namespace"], "name": claim["metadata"]["name"]}
    assert spec["storageClassName"] == claim["spec"]["storageClassName"]
    assert set(claim["spec"]["accessModes"]) <= set(spec["accessModes"])
    assert spec["capacity"]["storage"] == claim["spec"]["resources"]["requests"]["storage"]
    assert spec["persistentVolumeReclaimPolicy"] == "Retain"  # deleting the claim never deletes the models


# -- secrets ----------------------------------------------------------------------------------------


def _secret_refs(overlay: str) -> set[tuple[str, str | None]]:
    """(Secret name, key) pairs the render reads; key None = the whole Secret (envFrom)."""
    refs: set[tuple[str, str | None]] = set()
    for _, spec in pod_templates(overlay):
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
            for e in c.get("envFrom", []):
                if "secretRef" in e:
                    refs.add((e["secretRef"]["name"], None))
    for auth in objects(overlay, "TriggerAuthentication"):
        for r in auth["spec"].get("secretTargetRef", []):
            refs.add((r["name"], r["key"]))
    return refs


def test_the_trial_redis_refuses_writes_when_full_instead_of_being_oom_killed(tmp_path):
    """The trial's Redis keeps nothing on disk: grown to its memory limit and killed, it would lose every
    queued job. Its own command line, run by a real redis-server, caps it below the limit with
    noeviction, so a full Redis refuses writes (which the workers wait out: test_redis_client.py)."""
    from redis import Redis
    from servers import RedisServer, stop

    [container] = one("trial", "Deployment", "deepfake-redis")["spec"]["template"]["spec"]["containers"]
    argv = container["command"]
    assert argv[0] == "redis-server"
    server = RedisServer.start(tmp_path, *argv[1:])
    try:
        config = Redis(port=server.port).config_get("maxmemory*")
    finally:
        stop(server.proc)
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    assert config["maxmemory-policy"] == "noeviction"
    # room under the limit for Redis' own overhead, fragmentation and client buffers
    assert 0 < int(config["maxmemory"]) <= 0.8 * int(limit[:-2]) * 1024**2, (config, limit)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_inline_secrets(overlay):
    for where, spec in pod_templates(overlay):
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for e in c.get("env", []):
                if any(w in e["name"].upper() for w in SECRET_WORDS):
                    assert "value" not in e, f"{overlay} {where}: {e['name']} is inlined; use a secretKeyRef"
                    assert "secretKeyRef" in (e.get("valueFrom") or {}), f"{overlay} {where}: {e}"
    for cm in objects(overlay, "ConfigMap"):
        for k in cm.get("data", {}):
            assert not any(w in k.upper() for w in SECRET_WORDS), f"{overlay}: {k} in ConfigMap {cm['metadata']['name']}"
    secrets = objects(overlay, "Secret")
    for s in secrets:
        if not (s.get("data") or s.get("stringData")):
            continue
        # Only the trial's Redis Secret carries data, and no credential in it.
        assert s["metadata"]["name"] == "deepfake-redis" and overlay == "trial", f"{overlay}: Secret/{s['metadata']['name']}"
        values = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
        values.update(s.get("stringData") or {})
        assert not any(w in k for k in values for w in ("PASSWORD", "TOKEN")), values
        assert not any(re.search(r"//[^/@]*:[^/@]+@", v) for v in values.values()), "a password in a URL"
    text = "\n".join(yaml.safe_dump(d) for d in render(overlay))
    assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), "an AWS access key id in the manifests"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_references_documented(overlay):
    """Every Secret key the pods or KEDA read is either rendered (the trial Redis) or in secret.example.yaml."""
    example = {d["metadata"]["name"]: set((d.get("stringData") or {}) | (d.get("data") or {}))
               for d in yaml.safe_load_all((DEPLOY / "secret.example.yaml").read_text()) if d}
    rendered = {s["metadata"]["name"]: set((s.get("data") or {}) | (s.get("stringData") or {}))
                for s in objects(overlay, "Secret")}
    for name, key in _secret_refs(overlay):
        keys = rendered.get(name, example.get(name))
        assert keys is not None, f"{overlay}: Secret {name} is neither rendered nor in deploy/secret.example.yaml"
        assert key is None or key in keys, f"{overlay}: key {key} of Secret {name} is not documented"


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def test_secret_example_not_in_any_kustomization():
    for k in DEPLOY.rglob("kustomization.yaml"):
        assert not any("secret.example" in s for s in _strings(yaml.safe_load(k.read_text()))), k
    for overlay in OVERLAYS:
        assert not any("CHANGE-ME" in s for d in render(overlay) for s in _strings(d)), overlay


# -- docs -------------------------------------------------------------------------------------------


