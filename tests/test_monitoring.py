"""The monitoring component (deploy/components/monitoring): it renders onto an overlay, its PodMonitor
scrapes the workers' metrics port, its rules pass `promtool check rules` and the unit tests in
tests/alert_rules_test.yaml; rules and dashboard read only series the worker exports, and a real
Prometheus scraping a real worker's /metrics beside a real redis-server evaluates every rule and
answers every dashboard query.

Needs Debian's `prometheus` package (promtool and prometheus; scripts/setup-env.sh installs it):
missing, the tests fail with what to install, never skip.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from deploy_tools import MISSING_TOOL, ROOT, k8s_versions, schema_errors, tool
from redis import Redis
from servers import free_ports, stop, wait_for_port

COMPONENT = ROOT / "deploy" / "components" / "monitoring"
DASHBOARD = COMPONENT / "dashboard.json"
UNIT_TESTS = Path(__file__).with_name("alert_rules_test.yaml")
OPERATOR_SCHEMAS = {"PodMonitor": "prometheus-operator-podmonitor.schema.json",
                    "PrometheusRule": "prometheus-operator-prometheusrule.schema.json"}
PROMETHEUS_HOW = "apt-get install prometheus (Debian's package: promtool and prometheus)"


def binary(name: str) -> str:
    found = tool(name)
    if not found:
        pytest.fail(MISSING_TOOL.format(tool=name, how=PROMETHEUS_HOW))
    return found


def rendered(tmp_path: Path) -> list[dict]:
    """The cpu overlay with the monitoring component added, as a user's overlay would add it."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = os.path.relpath(ROOT / "deploy", overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "deepfake",
        "resources": [f"{rel}/overlays/cpu"], "components": [f"{rel}/components/monitoring"]}))
    kubectl = tool("kubectl")
    if not kubectl:
        pytest.fail(MISSING_TOOL.format(tool="kubectl", how="bash deploy/ci/install-kubectl.sh"))
    proc = subprocess.run([kubectl, "kustomize", str(overlay)], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def rule_spec() -> dict:
    return yaml.safe_load((COMPONENT / "prometheusrule.yaml").read_text())["spec"]


def alerts() -> list[dict]:
    return [r for g in rule_spec()["groups"] for r in g["rules"] if "alert" in r]


def write_rules(directory: Path) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump(rule_spec(), sort_keys=False))
    return path


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(**values: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target, with the dashboard's variables filled in."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in values.items():
                expr = expr.replace(f"${name}", value)
            out.append((panel["title"], expr))
    return out


def exported_series(redis_url: str) -> set[str]:
    """Every series name a worker's /metrics can carry (counters with _total, histograms' parts)."""
    from worker.metrics import Metrics

    metrics = Metrics()
    metrics.watch_queues(Redis.from_url(redis_url), ["deepfake"])
    exported = set()
    for family in metrics.registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
        exported |= {family.name + s for s in suffixes}
    return exported


def test_the_component_renders_and_scrapes_the_workers(tmp_path):
    docs = rendered(tmp_path)
    by_kind = {d["kind"]: d for d in docs}
    monitor, rule, deployment = by_kind["PodMonitor"], by_kind["PrometheusRule"], by_kind["Deployment"]
    assert monitor["metadata"]["namespace"] == rule["metadata"]["namespace"] == "deepfake"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert endpoint["port"] in ports and endpoint["path"] == annotations["prometheus.io/path"]
    # One scrape path: an annotation-based job scraping the workers too would double every counter.
    assert annotations["prometheus.io/scrape"] == "false", annotations
    # The kube-state-metrics alerts name the Deployment and container as the base does, the KEDA
    # alert the ScaledObject.
    container_names = {c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    [scaled_object] = [d["metadata"]["name"] for d in docs if d["kind"] == "ScaledObject"]
    for alert in alerts():
        for name in re.findall(r'deployment="([^"]+)"', alert["expr"]):
            assert name == deployment["metadata"]["name"], alert["alert"]
        for name in re.findall(r'container="([^"]+)"', alert["expr"]):
            assert name in container_names, alert["alert"]
        for name in re.findall(r'scaledObject="([^"]+)"', alert["expr"]):
            assert name == scaled_object, alert["alert"]
    assert any("scaledObject=" in a["expr"] for a in alerts()), "no alert watches KEDA"
    # The dashboard ships as the file, for Grafana's sidecar to find by its label.
    [board] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "deepfake-worker-dashboard"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["deepfake-worker.json"]) == dashboard()


def test_the_component_validates_strictly(tmp_path):
    """The operator's kinds against the hand-written subset schemas in deploy/schemas (unknown fields,
    bad durations, a rule both alert and record fail), the dashboard ConfigMap against Kubernetes'."""
    import kubernetes_validate

    docs = rendered(tmp_path)
    ours = [d for d in docs if d["kind"] in OPERATOR_SCHEMAS]
    assert sorted(d["kind"] for d in ours) == sorted(OPERATOR_SCHEMAS)
    errors = [e for d in ours for e in schema_errors(OPERATOR_SCHEMAS[d["kind"]], d)]
    assert not errors, "\n".join(errors)
    [board] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "deepfake-worker-dashboard"]
    for version in k8s_versions():
        kubernetes_validate.validate(board, version, strict=True)
    # the schemas catch what matters
    monitor, rule = (json.loads(json.dumps(next(d for d in ours if d["kind"] == k))) for k in sorted(OPERATOR_SCHEMAS))
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    rule["spec"]["groups"][0]["rules"][1]["record"] = "deepfake:failed"
    assert len(schema_errors(OPERATOR_SCHEMAS["PodMonitor"], monitor)) == 1
    assert len(schema_errors(OPERATOR_SCHEMAS["PrometheusRule"], rule)) == 2


def test_every_alert_has_severity_summary_and_a_runbook_section_in_the_docs():
    docs = (ROOT / "docs" / "deploy.md").read_text()
    headings = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", docs, re.M)}
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)) >= 8
    for alert in alerts():
        assert alert["labels"]["severity"] in {"warning", "critical"}, alert["alert"]
        assert {"summary", "description", "runbook"} <= alert["annotations"].keys(), alert["alert"]
        anchor = alert["annotations"]["runbook"].partition("#")[2]
        assert anchor == alert["alert"].lower() and anchor in headings, f"docs/deploy.md has no section {anchor}"


def test_promtool_checks_the_rules_and_their_unit_tests_pass(tmp_path):
    promtool = binary("promtool")
    rules = write_rules(tmp_path)
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    tested = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    assert {t["alertname"] for case in tested for t in case["alert_rule_test"]} == {a["alert"] for a in alerts()}
    unit = subprocess.run([promtool, "test", "rules", UNIT_TESTS.name], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_the_rules_and_the_dashboard_read_only_series_the_worker_exports(redis_server):
    exported = exported_series(redis_server.url)
    named = {m for a in alerts() for m in re.findall(r"\b(deepfake_[a-z_]+)\b", a["expr"])}
    assert named and named <= exported, named - exported
    assert {"deepfake_queue_jobs", "deepfake_queue_oldest_job_age_seconds", "deepfake_job_failures_total"} <= named
    board = dashboard()
    queries = [q for _, q in dashboard_queries()]
    on_board = {m for q in queries for m in re.findall(r"\b(deepfake_[a-z_]+)\b", q)}
    assert on_board <= exported, on_board - exported
    # every metric the worker exports has a panel (histograms through their buckets)
    assert {s for s in exported if not s.endswith(("_count", "_sum"))} <= on_board, exported - on_board
    defined = {v["name"] for v in board["templating"]["list"]} | {"__rate_interval"}
    used = {v for q in queries for v in re.findall(r"\$(\w+)", q)}
    used |= {re.sub(r"[${}]", "", p["datasource"]["uid"]) for p in board["panels"]}
    assert used <= defined, used - defined
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and board["uid"] == "deepfake-worker"


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def prometheus_api(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.mark.timeout(120)
def test_a_real_prometheus_scrapes_a_worker_evaluates_every_rule_and_answers_the_dashboard(tmp_path, redis_server):
    """Rules and panels against real series: Prometheus scrapes the worker's /metrics (the real exporter
    and its queue collector on a real Redis with a job waiting), evaluates every rule without error
    and answers every dashboard query."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    from worker.jobs import MODERATE_FUNC
    from worker.metrics import Metrics, serve

    queue_name = f"alerts-{tmp_path.name}"
    redis = Redis.from_url(redis_server.url)
    Queue(queue_name, connection=redis, serializer=JSONSerializer).enqueue(MODERATE_FUNC, args=("b", "k.mp4"))
    metrics = Metrics()
    metrics.watch_queues(redis, [queue_name])
    metrics.model_loaded.set(1)  # as DeepfakeWorker.load_runtime does
    metrics.job_failures.labels(reason="storage", retried="true").inc()
    metrics_port, prom_port = free_ports(2)
    http = serve(metrics, lambda: (True, "idle"), metrics_port, host="127.0.0.1")
    write_rules(tmp_path)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [{"job_name": "deepfake-worker", "static_configs": [
            {"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"namespace": "deepfake"}}]}]}))
    proc = subprocess.Popen(
        [binary("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "wb"))
    try:
        wait_for_port(prom_port, 30, proc)
        deadline = time.monotonic() + 60
        while not ready(prom_port):  # 503 until its storage is open
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.2)
        groups, ages = [], []
        while time.monotonic() < deadline:
            ages = prometheus_api(prom_port, "query", query=f'deepfake_queue_oldest_job_age_seconds{{queue="{queue_name}"}}')["result"]
            groups = prometheus_api(prom_port, "rules")["groups"]
            # a rule never evaluated reports the zero time
            evaluated = [r for g in groups for r in g["rules"] if not r.get("lastEvaluation", "0001").startswith("0001")]
            if ages and len(evaluated) == len(alerts()) and all(float(a["value"][1]) > 0 for a in ages):
                break
            time.sleep(0.5)
        log = (tmp_path / "prometheus.log").read_text()[-3000:]
        assert ages and float(ages[0]["value"][1]) > 0, log
        assert ages[0]["metric"]["namespace"] == "deepfake"
        queued = prometheus_api(prom_port, "query", query=f'deepfake_queue_jobs{{queue="{queue_name}",state="queued"}}')
        assert [float(r["value"][1]) for r in queued["result"]] == [1.0]
        rules = [r for g in groups for r in g["rules"]]
        assert sorted(r["name"] for r in rules) == sorted(a["alert"] for a in alerts())
        for r in rules:
            assert r["health"] == "ok" and not r.get("lastError"), (r["name"], r.get("lastError"), log)
        # every dashboard query parses and evaluates (a bad one is a 400), the queue panels have data
        answered = {}
        for title, query in dashboard_queries(namespace="deepfake", queue=queue_name, __rate_interval="1m"):
            answered.setdefault(title, []).extend(prometheus_api(prom_port, "query", query=query)["result"])
        assert answered["Queue"] and answered["Oldest waiting job"] and answered["Workers"], answered
    finally:
        stop(proc)
        http.shutdown()
