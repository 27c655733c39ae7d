"""The Helm chart: `helm lint`, `helm template` over every ci/ values file, every manifest validated
against the Kubernetes schemas, the values schema rejecting bad values, and what each values file
must render."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from infogrowth.config import ServeConfig, load_settings
from tests.deploy.conftest import (
    CHART,
    CI_VALUES,
    DASHBOARD,
    KUBE_VERSIONS,
    ROOT,
    RULES,
    Helm,
    Rendered,
)
from tests.deploy.crds import validate_custom

pytestmark = pytest.mark.deploy

VALUES = {p.name.removesuffix("-values.yaml"): p for p in CI_VALUES}
WORKLOADS = ("StatefulSet", "Deployment")


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> dict[str, Rendered]:
    assert set(VALUES) >= {"default", "gpu", "split"}, VALUES
    return {name: helm.template(path) for name, path in VALUES.items()}


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = _pod(workload)["containers"]
    assert [c["name"] for c in containers] == ["infogrowth"]
    c: dict[str, Any] = containers[0]
    return c


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------------- helm lint


@pytest.mark.parametrize("values", sorted(VALUES))
def test_helm_lint_strict(helm: Helm, values: str) -> None:
    res = helm.run(
        "lint",
        "--strict",
        str(CHART),
        "-f",
        str(VALUES[values]),
        "--kube-version",
        KUBE_VERSIONS[0],
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 chart(s) failed" in res.stdout


# ---------------------------------------------------------------- Kubernetes schemas


def test_every_manifest_is_valid(rendered: dict[str, Rendered]) -> None:
    checked: dict[str, int] = {}
    for name, out in rendered.items():
        for doc in out.docs:
            where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
            if validate_custom(doc):
                checked[doc["kind"]] = checked.get(doc["kind"], 0) + 1
                continue
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    path = ".".join(str(p) for p in exc.path)
                    pytest.fail(f"{where} invalid for Kubernetes {version}: {path}: {exc.message}")
                except kubernetes_validate.SchemaNotFoundError as exc:
                    pytest.fail(f"{where}: {exc.message}")
            checked[doc["kind"]] = checked.get(doc["kind"], 0) + 1
    expected = {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Job",
        "KafkaTopic",
        "KafkaUser",
        "NetworkPolicy",
        "Pod",
        "PodDisruptionBudget",
        "PrometheusRule",
        "ScaledObject",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
        "StatefulSet",
        "TriggerAuthentication",
    }
    assert set(checked) == expected, checked


def test_validators_reject_broken_manifests(rendered: dict[str, Rendered]) -> None:
    """The validators have teeth: an unknown field, a wrong type, a string-typed KEDA field."""
    sts = rendered["default"].one("StatefulSet")
    broken = copy.deepcopy(sts)
    _container(broken)["gpu"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[0], strict=True)
    broken = copy.deepcopy(sts)
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)
    import jsonschema

    so = copy.deepcopy(rendered["gpu"].one("ScaledObject"))
    so["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 5000
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(so)
    sm = copy.deepcopy(rendered["gpu"].one("ServiceMonitor"))
    sm["spec"]["endpoints"][0]["interval"] = "fast"
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(sm)


def test_acceptance_command_renders_valid_manifests(helm: Helm) -> None:
    """The README's command, verbatim, with Helm's own default Kubernetes version."""
    res = helm.run("template", "helm/infogrowth", "-f", "helm/infogrowth/ci/gpu-values.yaml")
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert len(docs) > 10
    for doc in docs:
        if not validate_custom(doc):
            kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)


# ------------------------------------------------------------------------ values schema


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("mode=both",), "/mode"),
        (("all.gpus=-1",), "/all/gpus"),
        (("select.gpus=1",), "'gpus' not allowed"),
        (("kafka.bootstrapServers=",), "/kafka/bootstrapServers"),
        (("kafka.drainTimeoutSeconds=0",), "/kafka/drainTimeoutSeconds"),
        (("image.pullPolicy=Sometimes",), "/image/pullPolicy"),
        (("image.digest=latest",), "/image/digest"),
        (("all.resources.limits.memory=lots",), "/all/resources/limits/memory"),
        (("all.persistence.accessModes={ReadWriteSometimes}",), "/all/persistence/accessModes"),
        (("metrics.port=70000",), "/metrics/port"),
        (("metrics.serviceMonitor.interval=fast",), "/metrics/serviceMonitor/interval"),
        (("autoscaling.keda.trigger=cpu",), "/autoscaling/keda/trigger"),
        (("autoscaling.hpa.enabled=true", "autoscaling.minReplicas=0"), "/autoscaling/minReplicas"),
        (("typo=1",), "'typo' not allowed"),
        # `config` is checked with the service's own rules (generated from Settings).
        (("config.select.policy=greedy",), "/config/select/policy"),
        (("config.bogus=1",), "'bogus' not allowed"),
        (("config.index.m=1",), "/config/index/m"),
        (("config.encoder.dtype=int4",), "/config/encoder/dtype"),
        (
            ("config.kafka.topics.embedded_partitions=0",),
            "/config/kafka/topics/embedded_partitions",
        ),
        # Rules a schema cannot express fail in the templates, naming the value to use.
        (("config.kafka.bootstrap_servers=k:9092",), "use kafka.bootstrapServers"),
        (("config.serve.port=1",), "use metrics.port"),
        (("config.snapshot.directory=/x",), "config.snapshot.directory is set by the chart"),
        (("autoscaling.hpa.enabled=true", "autoscaling.keda.enabled=true"), "exclusive"),
        (("autoscaling.hpa.enabled=true",), "embed Deployment of mode: split only"),
        (("autoscaling.keda.enabled=true",), "embed Deployment of mode: split only"),
        (("config.kafka.static_membership=true",), "config.kafka.static_membership is set by"),
        (("kafka.secretKeys.sasl\\.password=pw",), "needs kafka.existingSecret"),
        (
            ("mode=split", "autoscaling.keda.enabled=true", "autoscaling.keda.trigger=prometheus"),
            "needs autoscaling.keda.prometheus.serverAddress",
        ),
        (("autoscaling.minReplicas=5", "autoscaling.maxReplicas=2"), "must not exceed"),
        (("model.offline=false",), "needs a writable model.volume"),
        (("topics.mode=operator",), "/topics/mode"),
        (("topics.mode=strimzi",), "topics.mode=strimzi needs topics.strimzi.cluster"),
        (
            ("topics.mode=strimzi", "topics.strimzi.cluster=c", "topics.strimzi.apiVersion=v2"),
            "/topics/strimzi/apiVersion",
        ),
        (("topics.strimzi.user.authentication=plain",), "/topics/strimzi/user/authentication"),
        (("topicsJob.enabled=true",), "'topicsJob' not allowed"),
    ],
)
def test_bad_values_fail_at_install(helm: Helm, sets: tuple[str, ...], message: str) -> None:
    res = helm.template_raw(sets=sets)
    assert res.returncode != 0, f"--set {sets} rendered"
    assert message in res.stderr, res.stderr


def test_values_schema_in_step_with_settings() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-chart-schema.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------- the renders


def test_defaults_one_hardened_statefulset(rendered: dict[str, Rendered]) -> None:
    out = rendered["default"]
    assert out.kinds() == [
        "ConfigMap",
        "Pod",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    ]
    sts = out.one("StatefulSet")
    assert sts["spec"]["replicas"] == 1
    pod = _pod(sts)
    c = _container(sts)
    assert c["args"] == ["run", "--role", "all", "--config", "/etc/infogrowth/config.yaml"]
    assert "command" not in c  # the image's exec-form ENTRYPOINT receives SIGTERM
    # One PVC per pod for snapshots.
    (vct,) = sts["spec"]["volumeClaimTemplates"]
    assert vct["metadata"]["name"] == "state"
    assert vct["spec"]["resources"]["requests"]["storage"] == "10Gi"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["state"]["mountPath"] == "/var/lib/infogrowth"
    assert mounts["tmp"]["mountPath"] == "/tmp"
    assert mounts["config"]["readOnly"] is True
    # Probes: startup for the model load, liveness /healthz, readiness /readyz.
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["ports"] == [{"name": "metrics", "containerPort": 9108, "protocol": "TCP"}]
    # The drain timeout (30 s) plus the margin, so the service's watchdog fires first.
    assert pod["terminationGracePeriodSeconds"] == 45
    # Hardened.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    env = _env(c)
    assert env["INFOGROWTH_KAFKA__INSTANCE_ID"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    # Static membership on: the StatefulSet's pod names are stable group.instance.ids.
    assert env["INFOGROWTH_KAFKA__STATIC_MEMBERSHIP"]["value"] == "true"
    # The pods roll when the config changes.
    cm = out.one("ConfigMap")
    digest = hashlib.sha256(cm["data"]["config.yaml"].rstrip("\n").encode()).hexdigest()
    assert sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"] == digest


def test_gpu_keda_servicemonitor(rendered: dict[str, Rendered]) -> None:
    out = rendered["gpu"]
    dep, sts = out.one("Deployment"), out.one("StatefulSet")
    pod, c = _pod(dep), _container(dep)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["limits"]["memory"] == "24Gi"
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeSelector" not in _pod(sts) and "runtimeClassName" not in _pod(sts)
    assert "podAntiAffinity" in pod["affinity"]
    assert pod["priorityClassName"] == "ml-streaming"
    assert pod["terminationGracePeriodSeconds"] == 60 + 15
    # KEDA owns the embed Deployment's replica count, never the select StatefulSet's.
    assert "replicas" not in dep["spec"] and sts["spec"]["replicas"] == 3
    assert out.of("HorizontalPodAutoscaler") == []
    so = out.one("ScaledObject")
    assert so["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["topic"] == "laion.ingest"
    assert trigger["metadata"]["consumerGroup"] == "infogrowth-embed"
    assert trigger["metadata"]["lagThreshold"] == "5000"
    assert trigger["metadata"]["bootstrapServers"].startswith("kafka-0.kafka:9093,")
    auth = out.one("TriggerAuthentication")
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert {r["parameter"]: r["key"] for r in auth["spec"]["secretTargetRef"]} == {
        "username": "username",
        "password": "password",
        "ca": "ca.crt",
    }
    # Kafka credentials come from the existing Secret, never from values.
    env = _env(c)
    assert env["INFOGROWTH_KAFKA__CLIENT__sasl.password"]["valueFrom"] == {
        "secretKeyRef": {"name": "infogrowth-kafka", "key": "password"}
    }
    assert out.of("Secret") == []
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["kafka-tls"] == {
        "name": "kafka-tls",
        "mountPath": "/etc/infogrowth/kafka-tls",
        "readOnly": True,
    }
    assert mounts["models"]["mountPath"] == "/opt/infogrowth/models"
    assert mounts["models"]["readOnly"] is True
    # Monitoring.
    sm = out.one("ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["interval"] == "15s"
    assert sm["spec"]["targetLabels"] == ["app.kubernetes.io/instance"]
    services = out.of("Service")
    assert services and all(
        _matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"]) for s in services
    )
    rule = out.one("PrometheusRule")
    plain = yaml.safe_load(RULES.read_text())
    for group in plain["groups"]:
        for r in group["rules"]:
            r["labels"] = {**r.get("labels", {}), "team": "ml-data"}
    assert rule["spec"]["groups"] == plain["groups"]
    dash = out.one("ConfigMap", "ig-infogrowth-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["infogrowth.json"]) == json.loads(DASHBOARD.read_text())
    # Topics are created before install/upgrade, from a hook ConfigMap created first.
    job = out.one("Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    jc = job["spec"]["template"]["spec"]["containers"][0]
    assert jc["args"][:2] == ["topics", "create"]
    hook_cm = out.one("ConfigMap", "ig-infogrowth-topics")
    assert int(hook_cm["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    assert hook_cm["data"] == out.one("ConfigMap", "ig-infogrowth")["data"]
    np = out.one("NetworkPolicy")
    assert np["spec"]["ingress"][0]["ports"] == [{"port": "metrics", "protocol": "TCP"}]


def test_split_embed_deployment_and_select_statefulset(rendered: dict[str, Rendered]) -> None:
    out = rendered["split"]
    embed = out.one("Deployment")
    select = out.one("StatefulSet")
    assert embed["metadata"]["name"] == "ig-infogrowth-embed"
    assert select["metadata"]["name"] == "ig-infogrowth-select"
    ec, sc = _container(embed), _container(select)
    assert ec["args"][:3] == ["run", "--role", "embed"]
    assert sc["args"][:3] == ["run", "--role", "select"]
    # GPUs go to the embed stage only; snapshots to the select stage only.
    assert ec["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in sc["resources"].get("limits", {})
    assert _pod(embed)["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in _pod(select)
    assert "state" not in {m["name"] for m in ec["volumeMounts"]}
    assert select["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"] == {
        "storage": "20Gi"
    }
    assert select["spec"]["serviceName"] == "ig-infogrowth-select"
    # The HPA scales the embed Deployment, which therefore carries no replica count.
    hpa = out.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "ig-infogrowth-embed"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert "replicas" not in embed["spec"]
    assert select["spec"]["replicas"] == 4
    # Static membership for the select pods (stable names), never for the embed Deployment's.
    assert _env(sc)["INFOGROWTH_KAFKA__STATIC_MEMBERSHIP"]["value"] == "true"
    assert _env(ec)["INFOGROWTH_KAFKA__STATIC_MEMBERSHIP"]["value"] == "false"
    pdbs = {p["metadata"]["name"]: p["spec"] for p in out.of("PodDisruptionBudget")}
    assert pdbs["ig-infogrowth-select"]["minAvailable"] == 3
    assert pdbs["ig-infogrowth-embed"]["maxUnavailable"] == 1
    assert len(out.of("Service")) == 2


def test_split_keda_prometheus(rendered: dict[str, Rendered]) -> None:
    out = rendered["split-keda-prometheus"]
    so = out.one("ScaledObject")
    assert so["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert so["spec"]["minReplicaCount"] == 0
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "infogrowth_consumer_lag" in trigger["metadata"]["query"]
    assert 'namespace="ml"' in trigger["metadata"]["query"]
    assert out.of("TriggerAuthentication") == [] and out.of("HorizontalPodAutoscaler") == []
    select = out.one("StatefulSet")
    assert "volumeClaimTemplates" not in select["spec"]
    assert {"name": "state", "emptyDir": {}} in _pod(select)["volumes"]
    for workload in (select, out.one("Deployment")):
        assert _container(workload)["image"] == (
            "registry.example.com/ml/infogrowth@sha256:"
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        )
    assert _container(out.one("Deployment"))["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_selectors_and_references_hold(rendered: dict[str, Rendered]) -> None:
    """Every selector selects exactly its own workload's pods; every reference resolves."""
    for name, out in rendered.items():
        workloads = [w for kind in WORKLOADS for w in out.of(kind)]
        pods = {
            w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads
        }
        for w in workloads:
            assert _matches(w["spec"]["selector"]["matchLabels"], pods[w["metadata"]["name"]])
            others = [p for n, p in pods.items() if n != w["metadata"]["name"]]
            assert not any(_matches(w["spec"]["selector"]["matchLabels"], p) for p in others)
        for kind in ("Service", "PodDisruptionBudget"):
            for obj in out.of(kind):
                sel = obj["spec"]["selector"]
                sel = sel.get("matchLabels", sel)
                hits = [n for n, labels in pods.items() if _matches(sel, labels)]
                assert len(hits) == 1, f"{name}: {kind} {obj['metadata']['name']} selects {hits}"
        for sts in out.of("StatefulSet"):
            svc = out.one("Service", sts["spec"]["serviceName"])
            assert svc["spec"]["clusterIP"] == "None"
        for scaler in out.of("HorizontalPodAutoscaler") + out.of("ScaledObject"):
            ref = scaler["spec"]["scaleTargetRef"]
            out.one(ref["kind"], ref["name"])
        for w in workloads:
            pod = _pod(w)
            volumes = {v["name"] for v in pod["volumes"]}
            volumes |= {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
            for m in _container(w)["volumeMounts"]:
                assert m["name"] in volumes, f"{name}: mount {m['name']} has no volume"
            assert pod["serviceAccountName"] == out.one("ServiceAccount")["metadata"]["name"]
            cm = pod["volumes"][0]["configMap"]["name"]
            out.one("ConfigMap", cm)


@pytest.mark.parametrize("values", sorted(VALUES))
def test_rendered_config_is_accepted_by_the_service(
    rendered: dict[str, Rendered], values: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap plus the container's environment load with the service's own Settings."""
    out = rendered[values]
    for workload in (w for kind in WORKLOADS for w in out.of(kind)):
        cfg = tmp_path / "config.yaml"
        configmap = out.one("ConfigMap", _pod(workload)["volumes"][0]["configMap"]["name"])
        cfg.write_text(configmap["data"]["config.yaml"])
        c = _container(workload)
        pod_name = f"{workload['metadata']['name']}-0"
        for name, var in _env(c).items():
            if not name.startswith("INFOGROWTH_"):
                continue
            if "value" in var:
                monkeypatch.setenv(name, var["value"])
            elif "fieldRef" in var["valueFrom"]:
                monkeypatch.setenv(name, pod_name)
            else:
                monkeypatch.setenv(name, f"from-secret:{var['valueFrom']['secretKeyRef']['key']}")
        settings = load_settings(cfg)
        helm_values = yaml.safe_load(VALUES[values].read_text()) or {}
        kafka = helm_values.get("kafka", {})
        assert settings.kafka.bootstrap_servers == kafka.get("bootstrapServers", "kafka:9092")
        assert settings.kafka.instance_id == pod_name
        assert settings.serve.port == c["ports"][0]["containerPort"]
        grace = _pod(workload)["terminationGracePeriodSeconds"]
        assert settings.kafka.drain_timeout_s < grace
        state = "/var/lib/infogrowth"
        assert str(settings.snapshot.directory).startswith(state + "/")
        for option, key in kafka.get("secretKeys", {}).items():
            assert settings.kafka.client[option] == f"from-secret:{key}"


def test_chart_defaults_agree_with_the_service() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["metrics"]["port"] == ServeConfig().port
    from infogrowth.config import KafkaConfig

    assert values["kafka"]["drainTimeoutSeconds"] == KafkaConfig().drain_timeout_s


def test_packaged_files_match_the_plain_copies() -> None:
    """The chart packages the alerts and the dashboard; deploy/ has them for plain installs."""
    pairs = [
        (CHART / "files" / "prometheus-rules.yaml", RULES),
        (CHART / "files" / "grafana-dashboard.json", DASHBOARD),
    ]
    for packaged, plain in pairs:
        assert packaged.read_bytes() == plain.read_bytes(), (
            f"{packaged.relative_to(ROOT)} and {plain.relative_to(ROOT)} differ: copy one over"
        )


@pytest.mark.parametrize("values", sorted(VALUES))
def test_notes_render(helm: Helm, values: str, tmp_path: Path) -> None:
    """NOTES.txt renders (helm template skips it): a copy of the chart renders it into a
    ConfigMap, with the same values and release."""
    chart = tmp_path / "infogrowth"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "NOTES.txt").rename(chart / "NOTES.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ tpl (.Files.Get "NOTES.txt") . | quote }}\n'
    )
    res = helm.run(
        "template", "ig", str(chart), "-n", "ml", "-f", str(VALUES[values]),
        "--show-only", "templates/zz-notes.yaml",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    notes = yaml.safe_load(res.stdout)["data"]["notes"]
    out = helm.template(VALUES[values])
    for kind in WORKLOADS:
        for workload in out.of(kind):
            assert f"{kind:<11} {workload['metadata']['name']}" in notes, notes
    assert "infogrowth audit --config /etc/infogrowth/config.yaml" in notes
    assert "{{" not in notes and "<no value>" not in notes
