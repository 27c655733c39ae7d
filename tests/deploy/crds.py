"""Strict JSON schemas for the custom resources the chart renders.

kubernetes-validate knows the built-in kinds only. These schemas cover the spec fields of the
prometheus-operator (monitoring.coreos.com/v1) and KEDA (keda.sh/v1alpha1) CRDs with their
types, required fields and enums, and reject unknown fields, so a typo or a wrong type (an
integer where KEDA wants a string) fails here rather than at `kubectl apply`. The rules inside a
PrometheusRule are additionally checked by promtool (test_alerts.py).

Strimzi's KafkaTopic and KafkaUser are checked against Strimzi's own CRDs (every version they
serve), cached by `make tools` (scripts/install-tools.sh strimzi-crds), read strictly as
`kubectl apply --validate=strict` reads them: unknown fields fail instead of being pruned.
"""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

_DURATION = {
    "type": "string",
    "pattern": "^(0|"
    + "".join(rf"(([0-9]+){unit})?" for unit in ("y", "w", "d", "h", "m", "s", "ms"))
    + ")$",
}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJ = {"type": "object"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_STR = {"type": "string"}


def _strict(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        "required": list(required),
    }


_METADATA = _strict(
    {"name": _STR, "namespace": _STR, "labels": _STRMAP, "annotations": _STRMAP}, ("name",)
)

_RELABEL = _strict(
    {
        "action": {
            "enum": [
                "replace",
                "Replace",
                "keep",
                "Keep",
                "drop",
                "Drop",
                "hashmod",
                "HashMod",
                "labelmap",
                "LabelMap",
                "labeldrop",
                "LabelDrop",
                "labelkeep",
                "LabelKeep",
                "lowercase",
                "Lowercase",
                "uppercase",
                "Uppercase",
                "keepequal",
                "KeepEqual",
                "dropequal",
                "DropEqual",
            ]
        },
        "modulus": _INT,
        "regex": _STR,
        "replacement": _STR,
        "separator": _STR,
        "sourceLabels": {
            "type": "array",
            "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
        },
        "targetLabel": _STR,
    }
)

_ENDPOINT = _strict(
    {
        "port": _STR,
        "targetPort": {"type": ["string", "integer"]},
        "path": _STR,
        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
        "params": _OBJ,
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": _BOOL,
        "honorTimestamps": _BOOL,
        "trackTimestampsStaleness": _BOOL,
        "relabelings": {"type": "array", "items": _RELABEL},
        "metricRelabelings": {"type": "array", "items": _RELABEL},
        "tlsConfig": _OBJ,
        "authorization": _OBJ,
        "basicAuth": _OBJ,
        "oauth2": _OBJ,
        "bearerTokenSecret": _OBJ,
        "followRedirects": _BOOL,
        "enableHttp2": _BOOL,
        "filterRunning": _BOOL,
        "proxyUrl": _STR,
    }
)

_SELECTOR = _strict({"matchLabels": _STRMAP, "matchExpressions": {"type": "array", "items": _OBJ}})

SERVICE_MONITOR = _strict(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": _strict(
            {
                "jobLabel": _STR,
                "targetLabels": {"type": "array", "items": _STR},
                "podTargetLabels": {"type": "array", "items": _STR},
                "endpoints": {"type": "array", "items": _ENDPOINT, "minItems": 1},
                "selector": _SELECTOR,
                "namespaceSelector": _strict(
                    {"any": _BOOL, "matchNames": {"type": "array", "items": _STR}}
                ),
                "sampleLimit": _INT,
                "targetLimit": _INT,
                "labelLimit": _INT,
                "attachMetadata": _OBJ,
                "scrapeClass": _STR,
            },
            ("selector", "endpoints"),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)

_RULE = _strict(
    {
        "alert": _STR,
        "record": _STR,
        "expr": {"type": ["string", "integer"]},
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": _STRMAP,
        "annotations": _STRMAP,
    },
    ("expr",),
)

PROMETHEUS_RULE = _strict(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": _strict(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "query_offset": _DURATION,
                            "limit": _INT,
                            "labels": _STRMAP,
                            "partial_response_strategy": _STR,
                            "rules": {"type": "array", "items": _RULE},
                        },
                        ("name",),
                    ),
                }
            }
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)

_TRIGGER = _strict(
    {
        "type": {"type": "string", "minLength": 1},
        "name": _STR,
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "authenticationRef": _strict(
            {
                "name": _STR,
                "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
            },
            ("name",),
        ),
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": _BOOL,
    },
    ("type", "metadata"),
)

SCALED_OBJECT = _strict(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": _strict(
            {
                "scaleTargetRef": _strict(
                    {
                        "apiVersion": _STR,
                        "kind": _STR,
                        "name": _STR,
                        "envSourceContainerName": _STR,
                    },
                    ("name",),
                ),
                "pollingInterval": _INT,
                "initialCooldownPeriod": _INT,
                "cooldownPeriod": _INT,
                "idleReplicaCount": _INT,
                "minReplicaCount": _INT,
                "maxReplicaCount": _INT,
                "advanced": _strict(
                    {
                        "horizontalPodAutoscalerConfig": _strict({"name": _STR, "behavior": _OBJ}),
                        "restoreToOriginalReplicaCount": _BOOL,
                        "scalingModifiers": _OBJ,
                    }
                ),
                "fallback": _strict(
                    {"failureThreshold": _INT, "replicas": _INT, "behavior": _STR},
                    ("failureThreshold", "replicas"),
                ),
                "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
            },
            ("scaleTargetRef", "triggers"),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)

TRIGGER_AUTHENTICATION = _strict(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _METADATA,
        "spec": _strict(
            {
                "secretTargetRef": {
                    "type": "array",
                    "items": _strict(
                        {"parameter": _STR, "name": _STR, "key": _STR},
                        ("parameter", "name", "key"),
                    ),
                },
                "env": {"type": "array", "items": _OBJ},
                "podIdentity": _OBJ,
                "configMapTargetRef": {"type": "array", "items": _OBJ},
            }
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TRIGGER_AUTHENTICATION,
}


_ROOT = Path(__file__).resolve().parents[2]
STRIMZI_GROUP = "kafka.strimzi.io"
STRIMZI_CRDS = ("043-Crd-kafkatopic.yaml", "044-Crd-kafkauser.yaml")
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def strimzi_crd_dir() -> Path:
    """Where `make tools` caches Strimzi's CRDs; fails (never skips) when they are missing."""
    out = subprocess.run(
        ["bash", str(_ROOT / "scripts" / "install-tools.sh"), "--print-strimzi-crds"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    path = Path(out)
    if not all((path / f).is_file() for f in STRIMZI_CRDS):
        pytest.fail("Strimzi CRDs are not installed: run `make tools` (install-tools.sh)")
    return path


def _strict_openapi(node: Any) -> Any:
    """An OpenAPI v3 CRD schema as a JSON Schema that refuses unknown fields."""
    if isinstance(node, list):
        return [_strict_openapi(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: _strict_openapi(v)
        for k, v in node.items()
        if not k.startswith("x-kubernetes-") and k != "description"
    }
    if node.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if node.get("type") == "object" and "properties" in node and not preserve:
        out.setdefault("additionalProperties", False)
    return out


@cache
def strimzi_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict schema, for every version the cached CRDs serve."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for name in STRIMZI_CRDS:
        crd = yaml.safe_load((strimzi_crd_dir() / name).read_text())
        assert crd["spec"]["group"] == STRIMZI_GROUP, name
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = _strict_openapi(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = _strict(
                {
                    "name": {"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN},
                    "namespace": _STR,
                    "labels": _STRMAP,
                    "annotations": _STRMAP,
                },
                ("name",),
            )
            schema["required"] = sorted({*schema.get("required", ()), "metadata", "spec"})
            out[(f"{STRIMZI_GROUP}/{version['name']}", kind)] = schema
    return out


def validate_custom(doc: dict[str, Any]) -> bool:
    """Validate ``doc`` if it is one of the custom kinds above; False for any other kind."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    schema = SCHEMAS.get(key)
    if schema is None and key[0].startswith(STRIMZI_GROUP + "/"):
        schema = strimzi_schemas().get(key)
        if schema is None:
            pytest.fail(f"{key}: no such version of the kind in Strimzi's CRDs")
    if schema is None:
        return False
    jsonschema.Draft202012Validator(schema).validate(doc)
    return True
