"""Topic layout: what the pipeline needs, and making a cluster match it.

:func:`topic_specs` turns :class:`~infogrowth.config.TopicsConfig` into :class:`TopicSpec` rows;
:func:`ensure_topics` creates the missing topics and checks the existing ones (partitions,
replication factor, ``cleanup.policy``, ``max.message.bytes``), reporting every difference in a
:class:`TopicReport`.
Nothing is changed behind the caller's back: partitions are only added on request
(``grow=True``) and never for the keyed topics (embedded, changelog), whose partition count
decides which cell owns each key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, not __all__
    AdminClient,
    ConfigResource,
    ResourceType,
)
from confluent_kafka.cimpl import NewPartitions, NewTopic

from infogrowth.config import LimitsConfig, Settings, TopicsConfig
from infogrowth.errors import ConfigError
from infogrowth.kafka.clients import record_limit

__all__ = [
    "TopicError",
    "TopicReport",
    "TopicSpec",
    "admin_config",
    "ensure_topics",
    "topic_specs",
]

log = logging.getLogger(__name__)

COMPACT = {"cleanup.policy": "compact"}
DELETE = {"cleanup.policy": "delete"}
_LIST_CONFIGS = frozenset({"cleanup.policy"})
"""Configs whose value is a comma-separated set (order does not matter)."""


class TopicError(RuntimeError):
    """The cluster could not be read or a topic could not be created or grown."""


@dataclass(frozen=True)
class TopicSpec:
    """One topic as the pipeline needs it.

    ``keyed`` topics (embedded, changelog) map keys to cells by partition, so their partition
    count is never changed by :func:`ensure_topics`.
    """

    name: str
    partitions: int
    replication: int
    config: dict[str, str] = field(default_factory=dict, hash=False)
    keyed: bool = False


@dataclass
class TopicReport:
    """What :func:`ensure_topics` found and did; ``mismatches`` are human-readable lines."""

    created: list[str] = field(default_factory=list)
    ok: list[str] = field(default_factory=list)
    grown: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok_all(self) -> bool:
        """True when every topic exists (or was created) with the expected layout."""
        return not self.mismatches and not self.missing


def topic_specs(topics: TopicsConfig, limits: LimitsConfig | None = None) -> list[TopicSpec]:
    """The pipeline's topics: ingest, embedded, changelog, control, the three outputs and the
    dead-letter topic when one is configured.

    Every topic's ``max.message.bytes`` is :func:`~infogrowth.kafka.clients.record_limit` of
    ``limits`` (default limits when None): the broker default (~1 MiB) would refuse records
    the limits allow, and a refused record aborts its transaction every time it is retried.

    A name shared by several roles yields one spec if their layouts agree (e.g. one output
    topic for accepted, relabeled and rejected) and raises :class:`ValueError` if they differ.
    """
    rf = topics.replication_factor
    size = {"max.message.bytes": str(record_limit(limits or LimitsConfig()))}
    delete, compact = {**DELETE, **size}, {**COMPACT, **size}
    rows = [
        TopicSpec(topics.ingest, topics.ingest_partitions, rf, dict(delete)),
        TopicSpec(topics.embedded, topics.embedded_partitions, rf, dict(delete), keyed=True),
        TopicSpec(topics.changelog, topics.embedded_partitions, rf, dict(compact), keyed=True),
        TopicSpec(topics.control, 1, rf, dict(compact)),
        TopicSpec(topics.accepted, topics.output_partitions, rf, dict(delete)),
        TopicSpec(topics.relabeled, topics.output_partitions, rf, dict(delete)),
        TopicSpec(topics.rejected, topics.output_partitions, rf, dict(delete)),
    ]
    if topics.dead_letter is not None:
        rows.append(TopicSpec(topics.dead_letter, topics.output_partitions, rf, dict(delete)))
    out: dict[str, TopicSpec] = {}
    for spec in rows:
        seen = out.setdefault(spec.name, spec)
        if seen != spec:
            raise ConfigError(
                f"topic {spec.name!r} is configured for two roles with different layouts "
                f"({seen.partitions} vs {spec.partitions} partitions, "
                f"{seen.config} vs {spec.config})"
            )
    return list(out.values())


def admin_config(settings: Settings) -> dict[str, str | int | float | bool]:
    """AdminClient configuration: ``kafka.client`` passthrough plus ``bootstrap.servers``.

    ``kafka.bootstrap_servers`` wins over a ``bootstrap.servers`` key in ``kafka.client``.
    The result may hold credentials: pass it to the client, never log it.
    """
    conf: dict[str, str | int | float | bool] = dict(settings.kafka.client)
    conf["bootstrap.servers"] = settings.kafka.bootstrap_servers
    return conf


# ---------------------------------------------------------------------- ensure_topics


@dataclass(frozen=True)
class _Found:
    partitions: int
    replication: frozenset[int]
    """Distinct replica counts over the partitions (one value on a healthy topic)."""


def _error_code(exc: BaseException) -> int | None:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return int(exc.args[0].code())
    return None


def _describe(admin: AdminClient, names: Iterable[str], timeout_s: float) -> dict[str, _Found]:
    """Partition and replica counts of the named topics that exist.

    Retries while one of them reports a retriable error (e.g. no leader yet, right after a
    create); raises :class:`TopicError` on any other error or when ``timeout_s`` runs out.
    """
    wanted = set(names)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            md = admin.list_topics(timeout=max(0.5, deadline - time.monotonic()))
        except KafkaException as exc:
            raise TopicError(f"cannot list topics: {exc}") from exc
        found: dict[str, _Found] = {}
        transient: list[str] = []
        for name in wanted & md.topics.keys():
            tm = md.topics[name]
            err = tm.error
            if err is None:
                reps = frozenset(len(p.replicas) for p in tm.partitions.values())
                found[name] = _Found(len(tm.partitions), reps)
            elif err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue
            elif err.retriable():
                transient.append(f"{name}: {err}")
            else:
                raise TopicError(f"cannot describe topic {name!r}: {err}")
        if not transient:
            return found
        if time.monotonic() >= deadline:
            raise TopicError(f"topics still unavailable after {timeout_s:.0f} s: {transient}")
        time.sleep(0.1)


def _wait(futures: dict[Any, Future[Any]], timeout_s: float) -> dict[Any, BaseException | None]:
    """Each future's exception (None on success), waiting at most ``timeout_s`` overall."""
    deadline = time.monotonic() + timeout_s
    out: dict[Any, BaseException | None] = {}
    for key, fut in futures.items():
        try:
            fut.result(timeout=max(0.1, deadline - time.monotonic()))
            out[key] = None
        except Exception as exc:
            out[key] = exc
    return out


def _norm(key: str, value: str | None) -> str | frozenset[str] | None:
    if value is not None and key in _LIST_CONFIGS:
        return frozenset(v.strip() for v in value.split(",") if v.strip())
    return value


def _check_configs(
    admin: AdminClient, specs: Sequence[TopicSpec], timeout_s: float
) -> dict[str, list[str]]:
    """Config mismatches per topic name (only the keys each spec sets)."""
    wanted = [s for s in specs if s.config]
    if not wanted:
        return {}
    resources = {s.name: ConfigResource(ResourceType.TOPIC, s.name) for s in wanted}
    futures = admin.describe_configs(list(resources.values()), request_timeout=timeout_s)
    by_name = {res.name: fut for res, fut in futures.items()}
    results: dict[str, list[str]] = {}
    deadline = time.monotonic() + timeout_s
    for spec in wanted:
        try:
            entries = by_name[spec.name].result(timeout=max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            raise TopicError(f"cannot describe configs of topic {spec.name!r}: {exc}") from exc
        problems = []
        for key, expected in sorted(spec.config.items()):
            entry = entries.get(key)
            actual = None if entry is None else entry.value
            if _norm(key, actual) != _norm(key, expected):
                problems.append(f"{spec.name}: {key}={actual!r}, expected {expected!r}")
        results[spec.name] = problems
    return results


def _partition_problem(spec: TopicSpec, have: int, grow: bool) -> str | None:
    """Why the partition count cannot be fixed, or None when growing is allowed and asked."""
    msg = f"{spec.name}: {have} partitions, expected {spec.partitions}"
    if have > spec.partitions:
        return f"{msg} (Kafka cannot remove partitions; recreate the topic or change the config)"
    if spec.keyed:
        return (
            f"{msg} (not changed: the partition count of a keyed topic decides which cell owns "
            "each key; recreate the topic or change the config)"
        )
    if not grow:
        return f"{msg} (pass grow=True to add partitions)"
    return None


def _wait_visible(admin: AdminClient, need: dict[str, int], timeout_s: float) -> dict[str, _Found]:
    """Poll metadata until each topic in ``need`` shows at least that many partitions."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = _describe(admin, need, max(0.5, deadline - time.monotonic()))
        late = sorted(n for n, p in need.items() if n not in found or found[n].partitions < p)
        if not late:
            return found
        if time.monotonic() >= deadline:
            raise TopicError(f"topics not visible in metadata after {timeout_s:.0f} s: {late}")
        time.sleep(0.1)


def ensure_topics(
    admin_conf: dict[str, Any],
    specs: Sequence[TopicSpec],
    create: bool = True,
    *,
    grow: bool = False,
    timeout_s: float = 30.0,
) -> TopicReport:
    """Create missing topics (when ``create``) and check the layout of existing ones.

    Existing topics are compared on partition count, replication factor and every config key
    of their spec; each difference is one line in ``mismatches``. With ``grow``, non-keyed
    topics with too few partitions get partitions added (listed in ``grown``); nothing else
    is ever altered. A topic created concurrently by someone else is checked like any
    existing one. Raises :class:`TopicError` when the cluster cannot be read or a create or
    grow request fails, :class:`ValueError` when two specs share a name. ``timeout_s`` bounds
    each request.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate topic names in specs: {sorted(names)}")
    conf: dict[str, Any] = {**admin_conf, "logger": log}
    admin = AdminClient(conf)
    report = TopicReport()
    found = _describe(admin, names, timeout_s)
    existing = [s for s in specs if s.name in found]
    absent = [s for s in specs if s.name not in found]

    if absent and not create:
        report.missing.extend(s.name for s in absent)
    elif absent:
        new = [NewTopic(s.name, s.partitions, s.replication, config=dict(s.config)) for s in absent]
        futures = admin.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s)
        errors = _wait(futures, timeout_s)
        need: dict[str, int] = {}
        failed = []
        for spec in absent:
            exc = errors.get(spec.name)
            if exc is None:
                report.created.append(spec.name)
                need[spec.name] = spec.partitions
            elif _error_code(exc) == KafkaError.TOPIC_ALREADY_EXISTS:
                log.info("topic %s was created concurrently; checking it", spec.name)
                existing.append(spec)
                need[spec.name] = 1
            else:
                failed.append(f"{spec.name}: {exc}")
        if failed:
            raise TopicError("cannot create topics: " + "; ".join(failed))
        found.update(_wait_visible(admin, need, timeout_s))
        for name in report.created:
            log.info("created topic %s", name)

    to_grow: list[tuple[TopicSpec, int]] = []
    problems: dict[str, list[str]] = {s.name: [] for s in existing}
    for spec in existing:
        have = found[spec.name]
        if have.partitions != spec.partitions:
            why = _partition_problem(spec, have.partitions, grow)
            if why is None:
                to_grow.append((spec, have.partitions))
            else:
                problems[spec.name].append(why)
        if have.replication != {spec.replication}:
            reps = ", ".join(str(r) for r in sorted(have.replication))
            problems[spec.name].append(
                f"{spec.name}: replication factor {reps}, expected {spec.replication} "
                "(not changed: reassign partitions or recreate the topic)"
            )
    for name, lines in _check_configs(admin, existing, timeout_s).items():
        problems[name].extend(lines)

    if to_grow:
        parts = [NewPartitions(s.name, s.partitions) for s, _ in to_grow]
        futures = admin.create_partitions(
            parts, operation_timeout=timeout_s, request_timeout=timeout_s
        )
        errors = _wait(futures, timeout_s)
        failed = [f"{s.name}: {errors[s.name]}" for s, _ in to_grow if errors.get(s.name)]
        if failed:
            raise TopicError("cannot add partitions: " + "; ".join(failed))
        for spec, had in to_grow:
            log.warning("topic %s grown from %d to %d partitions", spec.name, had, spec.partitions)
            report.grown.append(spec.name)
        _wait_visible(admin, {s.name: s.partitions for s, _ in to_grow}, timeout_s)

    for spec in existing:
        if problems[spec.name]:
            report.mismatches.extend(problems[spec.name])
        else:
            report.ok.append(spec.name)
    for line in report.mismatches:
        log.error("topic layout mismatch: %s", line)
    return report


def topic_id(settings: Settings, topic: str, timeout_s: float = 30.0) -> str | None:
    """The broker's id of ``topic`` (a new id each time the topic is created), or None when the
    broker does not say (an old broker, no Describe permission)."""
    admin = AdminClient(admin_config(settings))
    try:
        fut = admin.describe_topics(TopicCollection([topic]), request_timeout=timeout_s)[topic]
        desc = fut.result(timeout_s)
    except Exception as exc:
        log.warning("cannot describe %s for its topic id: %s", topic, exc)
        return None
    tid = getattr(desc, "topic_id", None)
    return str(tid) if tid is not None else None
