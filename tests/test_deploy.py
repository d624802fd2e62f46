"""The Kubernetes manifests in deploy/ (issue 13), checked against the official Kubernetes
Python client's API models. They were never applied to a cluster (none can run here).

Each built-in object is deserialised into its model (V1Deployment, V1Service, ...), which
checks required fields and enums, then serialised back: a misspelt or misplaced field would
be dropped on the way in, so the round trip must give back the very document. KubeRay's
RayCluster is a custom resource: its structure is checked here, and every pod template in it
goes through V1PodTemplateSpec the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from moat.cluster.raycfg import HEALTH
from moat.cluster.resources import NODE

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MODELS = {
    ("apps/v1", "Deployment"): "V1Deployment",
    ("v1", "Service"): "V1Service",
    ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
}


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def round_trip(data: dict[str, Any], model: str) -> Any:
    """Deserialise ``data`` into the client's ``model`` and check nothing was lost."""
    client = ApiClient()
    obj = client._ApiClient__deserialize(data, model)  # type: ignore[attr-defined]
    back = client.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
    assert back == data, f"{model}: fields lost or changed:\n{json.dumps(back, indent=1)}"
    return obj


def test_every_manifest_is_a_known_kind() -> None:
    kinds = [(d["apiVersion"], d["kind"]) for d in documents()]
    assert ("ray.io/v1", "RayCluster") in kinds
    assert ("apps/v1", "Deployment") in kinds
    for kind in kinds:
        assert kind in MODELS or kind == ("ray.io/v1", "RayCluster"), kind


@pytest.mark.parametrize("doc", [d for d in documents() if d["kind"] != "RayCluster"],
                         ids=lambda d: d["kind"])  # fmt: skip
def test_builtin_objects_match_the_api_models(doc: dict[str, Any]) -> None:
    round_trip(doc, MODELS[(doc["apiVersion"], doc["kind"])])


def test_the_server_deployment_serves_a_cluster_over_tls() -> None:
    dep = next(d for d in documents() if d["kind"] == "Deployment")
    obj = round_trip(dep, "V1Deployment")
    args = obj.spec.template.spec.containers[0].args
    assert args[:2] == ["moat", "serve"] and "--cluster" in args
    assert "--tls-cert" in args and "--tls-key" in args  # listens beyond loopback: TLS
    env = {e.name: e.value for e in obj.spec.template.spec.containers[0].env}
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"


def test_the_raycluster_runs_moat_nodes() -> None:
    rc = next(d for d in documents() if d["kind"] == "RayCluster")
    spec = rc["spec"]
    known = {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling",
             "autoscalerOptions", "suspend"}  # fmt: skip
    assert set(spec) <= known
    assert spec["rayVersion"] == "2.60.0"  # the version moat[cluster] pins
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay: strings
    assert head["rayStartParams"]["num-cpus"] == "0"  # no sandboxes on the head
    assert json.loads(head["rayStartParams"]["system-config"]) == dict(HEALTH)
    round_trip(head["template"], "V1PodTemplateSpec")
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        tpl = round_trip(group["template"], "V1PodTemplateSpec")
        # the container's own command starts Ray: `moat node` probes and sweeps first
        assert tpl.metadata.annotations["ray.io/overwrite-container-cmd"] == "true"
        (box,) = tpl.spec.containers
        assert "moat node --address" in " ".join(box.args)
        assert box.security_context.privileged  # the tiers need namespaces and cgroups
        env = {e.name: e.value for e in box.env}
        assert env["RAY_USAGE_STATS_ENABLED"] == "0"
        assert NODE == "moat_node"  # advertised by `moat node`, never by rayStartParams
        assert "resources" not in group.get("rayStartParams", {})


def test_ray_ports_are_kept_to_the_cluster() -> None:
    pol = next(d for d in documents() if d["kind"] == "NetworkPolicy")
    obj = round_trip(pol, "V1NetworkPolicy")
    assert obj.spec.pod_selector.match_labels == {"ray.io/cluster": "moat"}
    allowed = [p.pod_selector.match_labels for r in obj.spec.ingress for p in r._from]
    assert {"ray.io/cluster": "moat"} in allowed and len(allowed) == 2
