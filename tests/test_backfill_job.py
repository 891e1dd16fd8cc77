"""deploy/components/backfill: the one-off `deepfake backfill` Job, added to each overlay as the
component's comment says, runs the workers' image with their settings and secrets, passes the
strict Kubernetes schemas, and the trial Redis lets it in."""
from __future__ import annotations

import pytest
from deploy_tools import k8s_versions, render_with_component

OVERLAYS = ["cpu", "gpu", "trial"]


def render_with_backfill(tmp_path, overlay: str) -> list[dict]:
    return render_with_component(tmp_path, overlay, "backfill")


def the(docs: list[dict], kind: str, name: str | None = None) -> dict:
    [found] = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_job_runs_the_workers_image_with_their_settings_and_secrets(tmp_path, overlay):
    import kubernetes_validate

    docs = render_with_backfill(tmp_path, overlay)
    job = the(docs, "Job", "deepfake-backfill")
    worker_pod = the(docs, "Deployment", "deepfake-worker")["spec"]["template"]["spec"]
    [worker] = worker_pod["containers"]
    pod = job["spec"]["template"]["spec"]
    [backfill] = pod["containers"]
    assert job["metadata"]["namespace"] == "deepfake"
    assert backfill["image"] == worker["image"] and ":" in backfill["image"]  # the overlay's tag
    assert backfill["command"] == ["deepfake", "backfill"] and backfill["args"][0].startswith("s3://")
    settings = the(docs, "ConfigMap", next(e["configMapRef"]["name"] for e in worker["envFrom"] if "configMapRef" in e))
    assert backfill["envFrom"] == worker["envFrom"]  # the generated (hashed) settings and the S3 keys
    redis_url = next(e for e in backfill["env"] if e["name"] == "RQ_REDIS_URL")
    assert redis_url in worker["env"] and settings["data"]["DEEPFAKE_QUEUE"] == "deepfake"
    # no GPU, no model: a small pod, locked down like the workers
    assert "nvidia.com/gpu" not in str(backfill["resources"]) and pod["restartPolicy"] == "Never"
    assert pod["securityContext"] == worker_pod["securityContext"]
    assert backfill["securityContext"] == worker["securityContext"]
    assert pod["serviceAccountName"] == worker_pod["serviceAccountName"] and pod["automountServiceAccountToken"] is False
    for version in k8s_versions():
        kubernetes_validate.validate(job, version, strict=True)
    # it is not a worker: the PodDisruptionBudget and the worker selectors do not count it
    selector = the(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_the_trial_redis_admits_the_job(tmp_path):
    docs = render_with_backfill(tmp_path, "trial")
    labels = the(docs, "Job", "deepfake-backfill")["spec"]["template"]["metadata"]["labels"]
    policy = the(docs, "NetworkPolicy", "deepfake-redis")
    admitted = [peer["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for peer in rule["from"]
                if "podSelector" in peer and "namespaceSelector" not in peer]
    assert any(sel.items() <= labels.items() for sel in admitted), admitted
