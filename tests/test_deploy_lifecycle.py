"""How the workers stop, roll out and are kept from losing jobs, as the manifests set it up.

- The termination grace period covers the longest job timeout `Settings.job_timeout_s()` derives
  from each overlay's ConfigMap (a job with the most frames a job may ask for), and the docs say so.
- A rollout step fits its deadline; a drain may take half the workers at once.
- With no worker running, the maintenance CronJob moves abandoned jobs on.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from deploy_tools import (
    OVERLAYS_DIR,
    WORKER,
    one,
    settings_from_configmap,
    worker_container,
    worker_deployment,
)

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = sorted(p.parent.name for p in OVERLAYS_DIR.glob("*/kustomization.yaml"))
# Past the job timeout RQ recording the result and the process exiting take this, besides storing the
# timeout verdict and sending the webhooks (grace_margin_s).
EXIT_S = 10
# Kubernetes' rollout deadline covers scheduling and pulling the image besides the pod's own start.
PULL_MARGIN_S = 600


def longest_job_timeout_s(settings) -> int:
    """The longest RQ timeout a job may have under these settings: one enqueued with the most frames a
    job may ask for (the worker holds each job to settings.job_timeout_s(its frames))."""
    from worker.runtime import MAX_JOB_FRAMES

    return max(settings.job_timeout_s(), settings.job_timeout_s(MAX_JOB_FRAMES))


def grace_margin_s(settings) -> float:
    """What a job timed out at its limit still does: store its timeout verdict (at most
    TIMEOUT_VERDICT_S), send its webhooks (at most MAX_WEBHOOKS of the webhook timeout each), exit."""
    from worker.jobs import TIMEOUT_VERDICT_S
    from worker.webhooks import MAX_WEBHOOKS

    return TIMEOUT_VERDICT_S + MAX_WEBHOOKS * settings.webhook_timeout_s + EXIT_S


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_job_timeout(overlay, monkeypatch):
    settings, _ = settings_from_configmap(overlay, monkeypatch)
    spec = worker_deployment(overlay)["spec"]["template"]["spec"]
    grace = spec["terminationGracePeriodSeconds"]
    timeout, margin = longest_job_timeout_s(settings), grace_margin_s(settings)
    assert grace >= timeout + margin, (
        f"{overlay}: terminationGracePeriodSeconds={grace} < the longest job timeout {timeout} s + {margin} s: "
        "a worker stopped mid-job would be killed before its warm shutdown ends"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rollout_deadline_covers_a_rollout_step(overlay):
    """A step of a rollout waits for the new pod's start (the startup probe's budget) plus its image pull,
    and, where no pod surges, first for the old worker's warm shutdown: Kubernetes' default 600 s
    would report a slow but healthy rollout as failed."""
    d = worker_deployment(overlay)
    spec = d["spec"]["template"]["spec"]
    probe = worker_container(overlay)["startupProbe"]
    start = probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    surge = d["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", "25%")
    wait_old = spec["terminationGracePeriodSeconds"] if surge in (0, "0", "0%") else 0
    needed = wait_old + start + PULL_MARGIN_S
    assert d["spec"].get("progressDeadlineSeconds", 600) >= needed, (
        f"{overlay}: progressDeadlineSeconds {d['spec'].get('progressDeadlineSeconds', 600)} < {needed} "
        f"({wait_old} s warm shutdown + {start} s startup probe + {PULL_MARGIN_S} s image pull)")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdb_selects_the_workers(overlay):
    pdb = one(overlay, "PodDisruptionBudget", WORKER)
    assert "maxUnavailable" in pdb["spec"], "minAvailable would block drains once KEDA scaled to zero"
    # Warm shutdown protects the jobs; one worker at a time would make a drain take one grace period per
    # worker (a Terminating pod does not count as healthy). Half the workers at once, rounded up.
    budget = str(pdb["spec"]["maxUnavailable"])
    assert budget.endswith("%") and int(budget[:-1]) >= 50, budget
    labels = worker_deployment(overlay)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_maintenance_cronjob_runs_status_on_the_workers_redis_outside_their_budget(overlay, monkeypatch):
    """With KEDA at zero no worker's maintenance runs: a CronJob runs `deepfake status`, on the workers'
    Redis and queue, as the workers' user, and its pods are none the workers' PodDisruptionBudget or
    scaler count. That `status` moves abandoned jobs on (worker.maintenance.clean_abandoned) is
    test_queue's `test_abandoned_jobs_are_moved_on_once_under_the_workers_maintenance_lock`."""
    job = one(overlay, "CronJob", "deepfake-maintenance")
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    minutes = job["spec"]["schedule"].split()[0]
    assert minutes.startswith("*/") and int(minutes[2:]) <= 10, job["spec"]["schedule"]
    pod = job["spec"]["jobTemplate"]["spec"]["template"]
    [c] = pod["spec"]["containers"]
    assert c["command"] == ["deepfake", "status"]
    worker = worker_container(overlay)
    assert c["image"] == worker["image"]
    env = {e["name"]: e for e in c["env"]}
    assert env["RQ_REDIS_URL"] == {e["name"]: e for e in worker["env"]}["RQ_REDIS_URL"]
    assert [r["configMapRef"]["name"] for r in c["envFrom"]] == [
        r["configMapRef"]["name"] for r in worker["envFrom"] if "configMapRef" in r]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and pod["spec"]["securityContext"]["runAsNonRoot"]
    pdb = one(overlay, "PodDisruptionBudget", WORKER)
    assert not pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_docs_state_the_derived_timeout():
    from worker.settings import Settings

    defaults = {name: f.default for name, f in Settings.model_fields.items()}
    settings = Settings.model_construct(**defaults)
    timeout = settings.job_timeout_s()
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert f"{timeout} s" in text, f"docs/deploy.md should state the default job timeout ({timeout} s)"
    longest = longest_job_timeout_s(settings)
    assert f"{longest} s" in text, f"docs/deploy.md should state the longest job timeout ({longest} s)"
    grace = worker_deployment("cpu")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert f"{grace} s" in text
    for target in ("gpu", "cpu"):
        assert f"--target {target}" in text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_stuck_worker_is_not_given_the_pods_grace_period(overlay):
    """A worker the liveness or startup probe fails is stuck (a job hung past its limit, a model load
    that never ends): its warm shutdown waits for a job that never ends, so with the pod's grace
    period a wedged pod (and its GPU) was held 24 more minutes before the SIGKILL."""
    container = worker_container(overlay)
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe].get("terminationGracePeriodSeconds", 10**6) <= 60, (overlay, probe)
