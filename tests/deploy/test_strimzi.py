"""topics.mode=strimzi: KafkaTopic resources with the layout `infogrowth topics create` makes, and
a KafkaUser with the ACLs the service needs, validated against Strimzi's own CRDs (crds.py)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from infogrowth.config import Settings, load_settings
from infogrowth.kafka.admin import topic_specs
from tests.deploy.conftest import CHART, ROOT, Helm, Rendered
from tests.deploy.crds import strimzi_schemas, validate_custom

pytestmark = pytest.mark.deploy

STRIMZI = CHART / "ci" / "strimzi-values.yaml"


@pytest.fixture(scope="module")
def strimzi(helm: Helm) -> Rendered:
    return helm.template(STRIMZI)


def _settings(out: Rendered, tmp: Path) -> Settings:
    cfg = tmp / "config.yaml"
    cfg.write_text(out.one("ConfigMap", "ig-infogrowth")["data"]["config.yaml"])
    return load_settings(cfg)


def _topics(out: Rendered) -> dict[str, dict[str, Any]]:
    return {t["spec"]["topicName"]: t for t in out.of("KafkaTopic")}


def _expected_layout(settings: Settings) -> dict[str, tuple[int, int, str, int]]:
    return {
        s.name: (
            s.partitions,
            s.replication,
            s.config["cleanup.policy"],
            int(s.config["max.message.bytes"]),
        )
        for s in topic_specs(settings.kafka.topics, settings.limits)
    }


def _layout(out: Rendered) -> dict[str, tuple[int, int, str, int]]:
    return {
        name: (
            t["spec"]["partitions"],
            t["spec"]["replicas"],
            t["spec"]["config"]["cleanup.policy"],
            t["spec"]["config"]["max.message.bytes"],
        )
        for name, t in _topics(out).items()
    }


def test_topics_have_the_layout_the_admin_code_creates(strimzi: Rendered, tmp_path: Path) -> None:
    settings = _settings(strimzi, tmp_path)
    assert settings.kafka.topics.dead_letter == "laion.dead-letter"
    assert _layout(strimzi) == _expected_layout(settings)
    for t in strimzi.of("KafkaTopic"):
        assert t["metadata"]["namespace"] == "kafka"  # where the Topic Operator watches
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == "data"
        assert t["metadata"]["labels"]["team"] == "ml-data"
        assert validate_custom(t)
    assert strimzi.of("Job") == []  # the Topic Operator creates them, not a hook Job


def test_defaults_and_shared_names_follow_the_service(helm: Helm, tmp_path: Path) -> None:
    out = helm.template(
        sets=(
            "topics.mode=strimzi",
            "topics.strimzi.cluster=c",
            "topics.strimzi.apiVersion=kafka.strimzi.io/v1beta2",
            "config.kafka.topics.relabeled=infogrowth.accepted",
        )
    )
    settings = _settings(out, tmp_path)
    layout = _layout(out)
    assert layout == _expected_layout(settings)
    assert len(layout) == 6 and "infogrowth.relabeled" not in layout  # one resource per name
    assert layout["infogrowth.ingest"] == (1, 1, "delete", 16842752)
    assert layout["infogrowth.changelog"][2] == "compact"
    for doc in out.of("KafkaTopic") + out.of("KafkaUser"):
        assert doc["apiVersion"] == "kafka.strimzi.io/v1beta2"
        assert validate_custom(doc)
    assert out.one("KafkaUser")["metadata"]["namespace"] == "ml"


def _acls(user: dict[str, Any]) -> set[tuple[str, str, str, frozenset[str]]]:
    return {
        (
            a["resource"]["type"],
            a["resource"]["name"],
            a["resource"]["patternType"],
            frozenset(a["operations"]),
        )
        for a in user["spec"]["authorization"]["acls"]
    }


def _service_acls(settings: Settings) -> set[tuple[str, str, str, frozenset[str]]]:
    """What the service does with each resource (read the code's clients to check)."""
    k, t = settings.kafka, settings.kafka.topics
    rw = frozenset({"Read", "Write", "Describe"})
    read, write = frozenset({"Read", "Describe"}), frozenset({"Write", "Describe"})
    out = {
        ("topic", t.ingest, "literal", read),  # the embed stage consumes
        ("topic", t.embedded, "literal", rw),  # embed writes, select reads (and replicas)
        ("topic", t.changelog, "literal", rw),  # select writes, restores read
        ("topic", t.control, "literal", read),  # the calibration, written by `seed`
        ("topic", t.accepted, "literal", write),
        ("topic", t.relabeled, "literal", write),
        ("topic", t.rejected, "literal", write),
        ("group", k.embed_group, "literal", frozenset({"Read"})),
        ("group", k.select_group, "literal", frozenset({"Read"})),
        ("group", "infogrowth-reader-", "prefix", frozenset({"Read"})),  # state readers
        ("transactionalId", f"{k.transactional_id_prefix}-embed-", "prefix", write),
        ("transactionalId", f"{k.transactional_id_prefix}-select-", "prefix", write),
    }
    if t.dead_letter:
        out.add(("topic", t.dead_letter, "literal", write))
    return out


def test_the_user_holds_exactly_the_service_acls(strimzi: Rendered, tmp_path: Path) -> None:
    settings = _settings(strimzi, tmp_path)
    user = strimzi.one("KafkaUser")
    assert user["metadata"]["name"] == "ig-infogrowth"
    env = strimzi.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    (password,) = [e for e in env if e["name"] == "INFOGROWTH_KAFKA__CLIENT__sasl.password"]
    assert password["valueFrom"]["secretKeyRef"]["name"] == user["metadata"]["name"]
    assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
    assert _acls(user) == _service_acls(settings)
    assert all(a["host"] == "*" for a in user["spec"]["authorization"]["acls"])
    assert validate_custom(user)


def test_the_user_can_be_left_out(helm: Helm) -> None:
    out = helm.template(STRIMZI, sets=("topics.strimzi.user.enabled=false",))
    assert out.of("KafkaUser") == [] and len(out.of("KafkaTopic")) == 8


def test_strimzi_validation_has_teeth(strimzi: Rendered) -> None:
    assert {("kafka.strimzi.io/v1", "KafkaTopic"), ("kafka.strimzi.io/v1beta2", "KafkaUser")} <= (
        set(strimzi_schemas())
    )
    topic = strimzi.of("KafkaTopic")[0]
    for path, value in (
        (("spec", "partitions"), "12"),  # a string where Strimzi wants an integer
        (("spec", "partitions"), 0),  # below its minimum
        (("spec", "replica"), 3),  # a typo Kubernetes would silently prune
        (("metadata", "name"), "Laion_Ingest"),  # not a DNS subdomain
    ):
        broken = copy.deepcopy(topic)
        broken[path[0]][path[1]] = value
        with pytest.raises(jsonschema.ValidationError):
            validate_custom(broken)
    user = strimzi.one("KafkaUser")
    for mutate in (
        lambda u: u["spec"]["authorization"]["acls"][0].update(operations=["Fly"]),
        lambda u: u["spec"]["authorization"]["acls"][0]["resource"].update(type="queue"),
        lambda u: u["spec"]["authentication"].update(type="plain"),
        lambda u: u["spec"]["authorization"].pop("acls"),
    ):
        broken = copy.deepcopy(user)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate_custom(broken)
    # v1 dropped the single `operation` field v1beta2 still accepts.
    old = copy.deepcopy(user)
    old["spec"]["authorization"]["acls"][0]["operation"] = "Read"
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(old)
    old["apiVersion"] = "kafka.strimzi.io/v1beta2"
    assert validate_custom(old)


def test_docs_list_the_acls_for_clusters_without_strimzi(helm: Helm, tmp_path: Path) -> None:
    """docs/deploy.md's table for plain clusters names every ACL the KafkaUser holds."""
    out = helm.template(sets=("topics.mode=strimzi", "topics.strimzi.cluster=c"))
    doc = (ROOT / "docs" / "deploy.md").read_text()
    section = doc[doc.index("### Kafka ACLs") :]
    section = section[: section.index("\n## ")]
    rows = [r for r in section.splitlines() if r.startswith("| ") and "---" not in r]
    for rtype, name, pattern, ops in _acls(out.one("KafkaUser")):
        row = [r for r in rows if f"`{name}`" in r and rtype in r]
        assert row, f"docs/deploy.md has no ACL row for {rtype} {name}"
        assert (pattern == "prefix") == ("prefix" in row[0]), row[0]
        listed = set(re.findall(r"\b(Read|Write|Describe)\b", row[0]))
        assert listed == set(ops), (row[0], ops)
