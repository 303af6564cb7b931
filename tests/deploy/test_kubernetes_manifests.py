"""The Kubernetes and KEDA manifests we document are valid and agree with the worker.

Built-in kinds (Deployment, PodDisruptionBudget) are checked against the Kubernetes OpenAPI
schemas with `kubernetes-validate` (strict: an unknown field is an error). KEDA's custom resources
have no schema in that package, so `KEDA_SCHEMAS` below states the fields of KEDA's v1alpha1
`ScaledObject` and `TriggerAuthentication` that a manifest may use, and the metadata each scaler
used here requires. Beyond validity, each manifest must agree with the worker it scales: the grace
period covers the shutdown timeout, the probes hit the health port's endpoints, the Prometheus
query names gauges the metrics plugin really exports, and every trigger names a queue the
Deployment consumes. Every YAML block of the docs that is a whole resource is checked the same way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from millpond_metrics import aggregate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "kubernetes").glob("*.yaml"))
DOCS = [ROOT / "docs" / "deploy.md"]
KUBERNETES = "1.33.0"

_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_TRIGGER = {
    "type": "object",
    "required": ["type", "metadata"],
    "additionalProperties": False,
    "properties": {
        "type": {"type": "string"},
        "name": {"type": "string"},
        "metadata": _STRINGS,
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": {"type": "boolean"},
        "authenticationRef": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
            },
        },
    },
}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
}
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string"},
                            "kind": {"type": "string"},
                            "apiVersion": {"type": "string"},
                            "envSourceContainerName": {"type": "string"},
                        },
                    },
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                    "idleReplicaCount": {"type": "integer", "minimum": 0},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "fallback": {"type": "object"},
                    "advanced": {"type": "object"},
                    "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
                },
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name", "key"],
                            "additionalProperties": False,
                            "properties": {
                                k: {"type": "string"} for k in ("parameter", "name", "key")
                            },
                        },
                    },
                    "env": {"type": "array"},
                    "podIdentity": {"type": "object"},
                },
            },
        },
    },
}
#: what each scaler used here needs in its metadata (one of each tuple), per KEDA's scaler docs
SCALER_METADATA = {
    "redis": [("listName",), ("address", "host", "addressFromEnv", "hostFromEnv")],
    "rabbitmq": [("queueName",), ("mode",), ("value",)],
    "prometheus": [("serverAddress",), ("query",), ("threshold",)],
}
#: what a trigger's authentication must provide, per scaler
SCALER_AUTH = {"redis": {"password"}, "rabbitmq": {"host"}}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    for path in DOCS:
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)):
            for doc in yaml.safe_load_all(block):
                if isinstance(doc, dict) and "apiVersion" in doc:
                    out.append((f"{path.name} block {i + 1}", doc))
    return out


DOCUMENTS = _documents()


def _id(item: tuple[str, dict[str, Any]]) -> str:
    return f"{item[0]}:{item[1]['kind']}/{item[1]['metadata']['name']}"


def test_there_are_manifests_to_check() -> None:
    kinds = {doc["kind"] for _, doc in DOCUMENTS}
    assert {"Deployment", "ScaledObject", "TriggerAuthentication"} <= kinds, kinds
    triggers = {
        t["type"]
        for _, d in DOCUMENTS
        if d["kind"] == "ScaledObject"
        for t in d["spec"]["triggers"]
    }
    assert triggers == {"redis", "rabbitmq", "prometheus"}


@pytest.mark.parametrize("item", DOCUMENTS, ids=_id)
def test_the_manifest_is_valid(item: tuple[str, dict[str, Any]]) -> None:
    where, doc = item
    kind = doc["kind"]
    if kind in KEDA_SCHEMAS:
        jsonschema.validate(doc, KEDA_SCHEMAS[kind])
        for trigger in doc["spec"].get("triggers", []):
            needs = SCALER_METADATA[trigger["type"]]
            for choices in needs:
                assert any(c in trigger["metadata"] for c in choices), (
                    f"{where}: a {trigger['type']} trigger needs one of {choices}"
                )
        return
    try:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where}: {kind} is not valid for Kubernetes {KUBERNETES}: {exc.message}")


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


DEPLOYMENTS = [item for item in DOCUMENTS if item[1]["kind"] == "Deployment"]


@pytest.mark.parametrize("item", DEPLOYMENTS, ids=_id)
def test_the_deployment_matches_the_worker(item: tuple[str, dict[str, Any]]) -> None:
    where, doc = item
    pod = doc["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    hook = container.get("lifecycle", {}).get("preStop")
    assert hook is None, f"{where}: a preStop hook's time would come out of the grace period"
    shutdown = float(env.get("MILLPOND_SHUTDOWN_TIMEOUT", "30"))
    assert grace >= shutdown + 10, (
        f"{where}: terminationGracePeriodSeconds {grace} leaves under 10 s after the warm "
        f"shutdown's {shutdown:g} s: the kubelet's SIGKILL would cut the last tasks short"
    )
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert str(ports["health"]) == env["MILLPOND_HEALTH__PORT"], where
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "health"}, where
    if "OTEL_EXPORTER_PROMETHEUS_PORT" in env:
        assert str(ports["metrics"]) == env["OTEL_EXPORTER_PROMETHEUS_PORT"], where
        assert env.get("OTEL_EXPORTER_PROMETHEUS_HOST") == "0.0.0.0", (
            f"{where}: the metrics endpoint must bind beyond loopback for Prometheus to scrape it"
        )


def test_scaled_objects_scale_the_worker_on_its_own_queues() -> None:
    workers = {d["metadata"]["name"]: d for _, d in DOCUMENTS if d["kind"] == "Deployment"}
    auths = {
        d["metadata"]["name"]: {r["parameter"] for r in d["spec"].get("secretTargetRef", [])}
        for _, d in DOCUMENTS
        if d["kind"] == "TriggerAuthentication"
    }
    gauges = {
        aggregate.prometheus_name(name, unit, counter=False)
        for name, unit, _, _ in aggregate._QUEUE_GAUGES
    }
    for where, doc in DOCUMENTS:
        if doc["kind"] != "ScaledObject":
            continue
        target = workers[doc["spec"]["scaleTargetRef"]["name"]]
        (container,) = target["spec"]["template"]["spec"]["containers"]
        env = _env(container)
        queues = set(env["MILLPOND_QUEUES"].split(","))
        for trigger in doc["spec"]["triggers"]:
            meta = trigger["metadata"]
            if trigger["type"] in SCALER_AUTH:
                ref = trigger["authenticationRef"]["name"]
                assert SCALER_AUTH[trigger["type"]] <= auths[ref], f"{where}: {ref} lacks a secret"
            if trigger["type"] == "redis":
                assert meta["listName"] in queues, where
            elif trigger["type"] == "rabbitmq":
                assert meta["queueName"] in queues, where
            else:
                query = meta["query"]
                used = set(re.findall(r"millpond_[a-z_]+", query))
                assert used and used <= gauges, f"{where}: {used - gauges} is not exported"
                named = set(re.findall(r'messaging_destination_name=~"([^"]+)"', query))
                assert named == {"|".join(sorted(queues, key=env["MILLPOND_QUEUES"].index))}
                assert query.rstrip().endswith(f"/ {env['MILLPOND_CONCURRENCY']}"), (
                    f"{where}: divide by one replica's slots (MILLPOND_CONCURRENCY)"
                )
