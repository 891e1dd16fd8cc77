"""deploy/components/egress-guard, on in every overlay, keeps the workers off the cloud metadata
endpoint and lets them reach everything else. deploy/components/network-policy: added to an overlay, it selects the workers, the maintenance
CronJob's and the backfill Job's pods, lets them reach DNS, Redis and HTTP(S) but not the cloud metadata endpoint, lets
only the monitoring namespace scrape them, and passes the strict Kubernetes schemas."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml
from deploy_tools import k8s_versions, render, render_with_component

OVERLAYS = ["cpu", "gpu", "trial"]
METADATA = ipaddress.ip_address("169.254.169.254")
ROOT = Path(__file__).resolve().parent.parent


def policy_of(docs: list[dict]) -> dict:
    [found] = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "deepfake-worker"]
    return found


def selects(policy: dict, labels: dict) -> bool:
    selector = policy["spec"]["podSelector"]
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", [])
               if e["operator"] == "In")


def egress_allows(policy: dict, address: str, port: int) -> bool:
    """Whether an egress rule lets a pod reach address:port (TCP), by NetworkPolicy's semantics:
    a rule without `to` reaches everywhere, without `ports` every port."""
    ip = ipaddress.ip_address(address)
    for rule in policy["spec"]["egress"]:
        ports = rule.get("ports")
        if ports is not None and not any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            continue
        peers = rule.get("to")
        if peers is None:
            return True
        for peer in peers:
            block = peer.get("ipBlock")
            if block is None:
                continue
            net = ipaddress.ip_network(block["cidr"])
            if ip.version == net.version and ip in net and not any(
                    ip.version == ipaddress.ip_network(e).version and ip in ipaddress.ip_network(e)
                    for e in block.get("except", [])):
                return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_policy_confines_workers_and_maintenance_pods(tmp_path, overlay):
    import kubernetes_validate

    docs = render_with_component(tmp_path, overlay, "network-policy")
    policy = policy_of(docs)
    assert policy["metadata"]["namespace"] == "deepfake"
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    workers = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "deepfake-worker")
    cron = next(d for d in docs if d["kind"] == "CronJob" and d["metadata"]["name"] == "deepfake-maintenance")
    assert selects(policy, workers["spec"]["template"]["metadata"]["labels"])
    assert selects(policy, cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"])
    assert not selects(policy, {"app.kubernetes.io/name": "deepfake-redis"})
    backfill = yaml.safe_load((ROOT / "deploy/components/backfill/job.yaml").read_text())
    assert selects(policy, backfill["spec"]["template"]["metadata"]["labels"])  # S3 credentials too
    # S3, Redis and webhook receivers are reachable; the metadata endpoint is not, on any port
    for address, port in (("52.216.8.1", 443), ("10.0.3.7", 6379), ("203.0.113.9", 80), ("2600:1f18::1", 443)):
        assert egress_allows(policy, address, port), (address, port)
    assert not any(egress_allows(policy, str(METADATA), port) for port in (80, 443, 6379))
    assert not egress_allows(policy, "fd00:ec2::254", 80)  # the metadata endpoint over IPv6 (Nitro)
    assert not egress_allows(policy, "100.100.100.200", 80)  # Alibaba Cloud's metadata endpoint
    assert not egress_allows(policy, "fd20:ce::254", 80)  # GCE's, over IPv6
    # the pod's own credentials: EKS Pod Identity's agent (IRSA's STS is plain HTTPS)
    assert egress_allows(policy, "169.254.170.23", 80) and egress_allows(policy, "fd00:ec2::23", 80)
    assert not egress_allows(policy, "10.0.3.7", 22)
    # pods (the trial overlay's Redis) named by a selector as well, on Redis' port only: Cilium never
    # matches pods by ipBlock, and HTTP(S) to any pod would outlive the ipBlocks' narrowing
    by_selector = [rule for rule in policy["spec"]["egress"] if any("namespaceSelector" in p for p in rule.get("to", []))]
    assert [[p["port"] for p in rule["ports"]] for rule in by_selector] == [[6379]]
    # only the metrics port takes connections, from the monitoring namespace
    [rule] = policy["spec"]["ingress"]
    [metrics] = [p["containerPort"] for p in workers["spec"]["template"]["spec"]["containers"][0]["ports"]
                 if p["name"] == "metrics"]
    assert [p["port"] for p in rule["ports"]] == [metrics]
    assert [peer["namespaceSelector"]["matchLabels"] for peer in rule["from"]] == [
        {"kubernetes.io/metadata.name": "monitoring"}]
    for version in k8s_versions():
        kubernetes_validate.validate(policy, version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_keeps_workers_off_the_metadata_endpoint(overlay):
    """Code that a hostile video ran inside FFmpeg must not take the node's cloud role; anything else
    (MinIO on 9000, a managed Redis on 6380, webhook receivers) stays reachable, and scraping too."""
    import kubernetes_validate

    docs = list(render(overlay))
    policy = policy_of(docs)
    assert policy["spec"]["policyTypes"] == ["Egress"]  # ingress (Prometheus) is not touched
    workers = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "deepfake-worker")
    cron = next(d for d in docs if d["kind"] == "CronJob" and d["metadata"]["name"] == "deepfake-maintenance")
    backfill = yaml.safe_load((ROOT / "deploy/components/backfill/job.yaml").read_text())
    for pod in (workers["spec"]["template"], cron["spec"]["jobTemplate"]["spec"]["template"], backfill["spec"]["template"]):
        assert selects(policy, pod["metadata"]["labels"])
    assert not selects(policy, {"app.kubernetes.io/name": "deepfake-redis"})
    for port in (80, 443, 6379, 8080):
        assert not egress_allows(policy, str(METADATA), port)
    assert not egress_allows(policy, "fd00:ec2::254", 80) and not egress_allows(policy, "100.100.100.200", 80)
    assert not egress_allows(policy, "fd20:ce::254", 80)  # GCE's metadata server over IPv6
    for address, port in (("52.216.8.1", 443), ("10.0.3.7", 9000), ("10.0.3.8", 6380), ("2600:1f18::1", 8443)):
        assert egress_allows(policy, address, port), (address, port)
    assert egress_allows(policy, "169.254.20.10", 53)  # NodeLocal DNSCache
    assert egress_allows(policy, "169.254.170.23", 80)  # EKS Pod Identity's agent
    assert [p["to"] for p in policy["spec"]["egress"] if {"namespaceSelector": {}} in p.get("to", [])] == [
        [{"namespaceSelector": {}}]]  # pods on any port (Cilium does not match them by ipBlock)
    for version in k8s_versions():
        kubernetes_validate.validate(policy, version, strict=True)
