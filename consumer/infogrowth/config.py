"""One typed settings object for every command.

Sources, lowest to highest precedence: defaults, an optional YAML file, ``INFOGROWTH_*``
environment variables (nested keys joined by ``__``, e.g. ``INFOGROWTH_SELECT__K=8``). Unknown keys
and bad values fail at start with :class:`ConfigError`, whose message names the offending key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from infogrowth.errors import ConfigError

ENV_PREFIX = "INFOGROWTH_"
NON_SETTINGS_ENV = frozenset(
    {"INFOGROWTH_CACHE_DIR", "INFOGROWTH_CHAOS_SAMPLES", "INFOGROWTH_TESTING_EMBED_DELAY_S"}
)
"""Variables with the prefix that are read elsewhere (tool caches, testing aids), not
settings."""


ImageMode = bool | Literal["reference"]
"""What output records carry of an image: bytes (True), only its ``image_uri``, or nothing."""


# ---------------------------------------------------------------------- redaction

REDACTED = "***"
SECRET_KEY_HINTS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "key",  # ssl.key.pem, ssl.key.location, ssl_key, *.private.key.*, keystore, keytab
    "token",
    "credential",
    "jaas",
    "private",
    "oauthbearer.config",  # "principal=... clientSecret=..." for the unsecured JWT builder
    "oauthbearer.extensions",  # SASL extensions carry tenant tokens
    "oauth.cb",
)
"""Substrings of librdkafka property names (lower case, ``_``/``-`` read as ``.``) whose values
never leave the process: not in logs, report.json, error messages nor ``repr(settings)``."""
_MIN_SCRUB_CHARS = 4


def is_secret_key(key: str) -> bool:
    """True for librdkafka properties whose value is (or holds) a credential."""
    norm = key.lower().replace("_", ".").replace("-", ".")
    return any(h in norm for h in SECRET_KEY_HINTS)


def redact_client(conf: dict[str, Any]) -> dict[str, Any]:
    """A copy of a librdkafka configuration safe to print: secret-bearing values masked."""
    return {key: (REDACTED if is_secret_key(key) else value) for key, value in conf.items()}


def secret_values(settings: Settings) -> list[str]:
    """The secret strings of ``settings`` (and their ``name=value`` parts), longest first, for
    :func:`scrub` and the log filter."""
    out: set[str] = set()
    pairs = list(settings.kafka.client.items())
    for opts in settings.storage.options.values():
        pairs += list(opts.items())
    for key, value in pairs:
        if not is_secret_key(key) or isinstance(value, bool):
            continue
        text = str(value)
        out.add(text)
        for part in re.split(r"[\s,;]+", text):
            _, eq, rhs = part.partition("=")
            out.add(rhs.strip("\"'") if eq else part)
    return sorted((v for v in out if len(v) >= _MIN_SCRUB_CHARS), key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every secret value replaced by ``***``."""
    for value in secrets:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def redacted_settings(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-ready data, librdkafka secrets masked (report.json, startup log)."""
    cfg = settings.model_dump(mode="json")
    cfg["kafka"]["client"] = redact_client(cfg["kafka"]["client"])
    opts = cfg["storage"]["options"]
    cfg["storage"]["options"] = {proto: redact_client(o) for proto, o in opts.items()}
    return cfg


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitsConfig(_Section):
    """Bounds on untrusted input; anything beyond them is rejected as malformed."""

    max_message_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_image_bytes: int = Field(8 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    max_text_chars: int = Field(20_000, gt=0)
    max_id_chars: int = Field(512, gt=0)
    max_label_chars: int = Field(1024, gt=0)
    """A class label (it is carried in every embedded and changelog record and held in the
    partition state)."""
    max_embedding_dim: int = Field(8192, gt=0)
    max_meta_bytes: int = Field(65536, gt=0)
    """``meta``: its strings, bytes and numbers together (a small message can unpack into a
    large object tree, and meta is carried through every stage)."""
    max_meta_depth: int = Field(8, gt=0)
    """``meta``: how deeply maps and lists may nest."""
    max_batch_pixels: int = Field(50_000_000, gt=0)
    """Decoded pixels (after the downscale to the model's scale) the embed stage holds at
    once; a larger batch is embedded in parts (memory, not decisions, changes)."""
    max_batch_bytes: int = Field(256 * 1024 * 1024, gt=0)
    """Image and text bytes the embed stage embeds at once; a larger batch goes in parts."""
    memory_budget_bytes: int = Field(0, ge=0)
    """Resident memory above which the process reports not ready (0: derive it from
    ``memory_budget_fraction``)."""
    memory_budget_fraction: float = Field(0.9, ge=0.0, le=1.0)
    """Without ``memory_budget_bytes``: this share of the container's cgroup memory limit
    (no limit, or 0 here: no budget)."""
    image_uri_allow: list[str] = Field(default_factory=list)
    """Where ``image_uri`` may be fetched from: schemes (``https://``, ``s3://``) or prefixes
    (``https://img.example.com/cdn/``, ``s3://bucket/images/``, ``file:///data/images/``).
    Empty: nothing is fetched, and a sample that needs its referenced image is malformed."""
    image_fetch_timeout_s: float = Field(10.0, gt=0)
    """Seconds one ``image_uri`` fetch may take (connect and read); slower is malformed."""
    image_fetch_concurrency: int = Field(16, gt=0, le=1024)
    """Fetches in flight at once; they overlap the model's forward pass on earlier images."""

    @field_validator("image_uri_allow")
    @classmethod
    def _allow_entries(cls, value: list[str]) -> list[str]:
        from infogrowth.fetch import parse_allow_entry

        for entry in value:
            parse_allow_entry(entry)  # ValueError names the entry; pydantic adds the key
        return value


SPACE_NAMES = ("image", "text")


class ColumnsConfig(_Section):
    """Which columns of a Parquet / Arrow table hold what (``--id-col`` ... override them).

    Unset: the first present of the usual names (img2dataset writes ``key``, ``caption``,
    ``url`` and ``jpg``; Hugging Face datasets ``image`` as ``{bytes, path}``). A column named
    here must exist in every table read, or the run fails naming this key.
    """

    id: str | None = None
    """Default: ``id``, ``key`` or ``image_path`` (clip-retrieval metadata)."""
    text: str | None = None
    """Default: ``text`` or ``caption``."""
    image: str | None = None
    """Image bytes, a ``{bytes, path}`` struct, or text: a URI (read as ``image_uri``) or a
    path confined like JSONL image paths. Default: ``image``, ``jpg``, ``png`` or ``webp``."""
    image_uri: str | None = None
    """Default: ``image_uri`` or ``url``."""
    label: str | None = None
    """Default: ``label``; a Hugging Face ``ClassLabel`` is read as its class name."""
    embedding: dict[str, str] = Field(default_factory=dict)
    """Precomputed vectors per space, e.g. ``{image: img_emb}`` (list-of-float columns)."""

    @field_validator("embedding")
    @classmethod
    def _spaces(cls, value: dict[str, str]) -> dict[str, str]:
        bad = sorted(set(value) - set(SPACE_NAMES))
        if bad:
            raise ConfigError(f"unknown space {bad[0]!r}: spaces are {list(SPACE_NAMES)}")
        return value


class InputsConfig(_Section):
    """How ``curate``, ``produce`` and ``seed`` read tables."""

    columns: ColumnsConfig = ColumnsConfig()


class StorageConfig(_Section):
    """fsspec options per protocol for remote inputs, outputs and image references, e.g.
    ``{s3: {endpoint_url: http://minio:9000}}``; values whose name looks secret (``key``,
    ``secret``, ``token``...) are masked wherever settings are printed."""

    options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name == "options":
                value = {proto: redact_client(opts) for proto, opts in value.items()}
            yield name, value


class EncoderConfig(_Section):
    """How samples become vectors.

    ``kind=auto`` picks ``precomputed`` when ``model`` is unset, else asks the model what towers it
    has. ``model`` is a hub name or a local directory.
    """

    kind: Literal["auto", "dual", "text", "image", "precomputed"] = "auto"
    model: str | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    batch_size: int = Field(64, gt=0)
    max_text_tokens: int | None = Field(None, gt=0)
    image_size: int | None = Field(None, gt=0)
    trust_remote_code: bool = False
    decode: Literal["auto", "cpu", "device"] = "auto"
    """Where images are decoded and prepared: ``cpu`` (Pillow + the model's image processor),
    ``device`` (JPEGs decoded by torchvision on the encoder's device, nvJPEG on CUDA, and
    resized there; other formats fall back to Pillow per image), ``auto`` (device on CUDA
    when torchvision is installed and reproduces the processor, else cpu)."""
    tune_batch_size: bool = True
    """On CUDA, a short warm-up at start raises ``batch_size`` by doubling while throughput
    grows and memory allows, up to ``max_batch_size`` (no effect on a CPU)."""
    max_batch_size: int = Field(1024, gt=0)
    prefetch: int = Field(2, ge=0)
    """Batches prepared ahead of the model (decoded, resized, tokenised); 0 = none."""

    @model_validator(mode="after")
    def _batch_bounds(self) -> EncoderConfig:
        if self.max_batch_size < self.batch_size:
            raise ConfigError(
                f"encoder.max_batch_size ({self.max_batch_size}) must be >= "
                f"encoder.batch_size ({self.batch_size})"
            )
        return self

    dims: dict[Literal["image", "text"], Annotated[int, Field(gt=0)]] | None = None
    """Dimensions of precomputed vectors per space, e.g. ``{image: 512, text: 512}``. Required
    by ``run`` on precomputed embeddings without a seeded calibration, so that no sample fixes
    them for the process; a sample with other spaces or dimensions is malformed."""


class CleanConfig(_Section):
    """Alignment check and fixers.

    Thresholds left unset are calibrated on the seed set for a stated error rate: ``delta`` so
    that at most ``delta_false_flags`` of the seed's matched pairs fall below it; the neighbour
    vote on synthetic label flips injected into the seed: the own-label share below which a
    label counts as wrong, so that flags are right ``target_precision`` of the time while at
    most ``max_clean_flagged`` of clean seed items are flagged, then the confidence a relabel
    needs for the same precision. Where no setting meets the target, that rule is switched off.
    """

    enabled: bool = True
    delta: float | None = Field(None, ge=-1.0, le=1.0)
    delta_false_flags: float = Field(0.01, ge=0.0, lt=1.0)
    """Share of matched seed pairs that the calibrated δ may flag."""
    delta_percentile: float | None = Field(None, ge=0.0, le=100.0)
    """Legacy: δ = this percentile of the seed's alignments (overrides the pair calibration)."""
    fixer: Literal["auto", "none", "recaption", "zero-shot", "neighbours"] = "auto"
    recaption_model: str | None = None
    recaption_max_new_tokens: int = Field(30, gt=0)
    classes: list[str] | None = None
    prompt: str = "a photo of a {label}"
    zero_shot_margin: float = Field(0.05, ge=0.0)
    neighbour_k: int = Field(20, gt=0, le=256)
    """Neighbours that vote on a label (separate from ``select.k``, the gain's). Twenty lets
    "almost no neighbour carries this label" be told apart in steps of 5%."""
    neighbour_confidence: float | None = Field(None, gt=0.5, le=1.0)
    """Weighted vote share a new label needs; calibrated on the seed when unset."""
    neighbour_min: int = Field(3, gt=0)
    reject_unfixable_labels: bool = True
    flag_share: float | None = Field(None, ge=0.0, le=1.0)
    """A label counts as wrong only when its own vote share is at most this (then relabelled
    where another label reaches the confidence, else ``label_noise``). Calibrated on the seed
    when unset; 1.0, or unset without a seed: being outvoted is enough."""
    reject_share: float | None = Field(None, ge=0.0, lt=1.0)
    """``label_noise`` when a wrong label's own vote share is at most this and no label reaches
    the confidence (at most ``flag_share``). Unset: the calibrated flag share; under an explicit
    flag share the largest share up to it that meets the targets on the seed; without a seed an
    explicit flag share below 1, else 0 with an explicit confidence."""
    neighbour_radius: float | None = Field(None, gt=0.0, le=2.0)
    """Only neighbours closer than this vote; calibrated from the seed when unset."""
    neighbour_radius_percentile: float = Field(95.0, gt=0.0, le=100.0)
    """Radius = this percentile of the seed's ``neighbour_k``-th neighbour distances."""
    neighbour_warmup: int = Field(200, ge=0)
    """Without a radius, no vote until the partition holds this many items."""
    relabeled_vote: bool = False
    """Whether relabelled items vote on later ones (off: a wrong relabel cannot spread)."""
    target_precision: float = Field(0.9, gt=0.5, le=1.0)
    max_clean_flagged: float = Field(0.02, ge=0.0, le=1.0)
    calibration_noise: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of seed labels flipped for the vote calibration."""


class IndexConfig(_Section):
    """hnswlib parameters (the authors' reference values by default)."""

    m: int = Field(48, ge=2, le=256)
    ef_construction: int = Field(100, gt=0)
    ef: int = Field(32, gt=0)
    initial_capacity: int = Field(10_000, gt=0)
    growth: float = Field(2.0, gt=1.0)
    threads: int = Field(0, ge=0)
    random_seed: int = Field(100, ge=0, lt=2**64)
    """Seed of hnswlib's level generator (a C++ size_t)."""
    exact_below: int = Field(20_000, ge=0)
    """Partitions with at most this many items are searched exactly (brute force); HNSW beyond."""


class SelectConfig(_Section):
    """Gain, duplicate floor and keep policy."""

    k: int = Field(4, gt=0, le=256)
    policy: Literal["auto", "threshold", "sample", "all"] = "auto"
    tau: float | None = Field(None, ge=0.0)
    tau_percentile: float = Field(50.0, ge=0.0, le=100.0)
    keep_fraction: float | None = Field(None, gt=0.0, le=1.0)
    """Budget: the ``sample`` policy keeps about this share of what passes cleaning and the
    duplicate floor; its scale follows the stream (partition state)."""
    g_scale: float | None = Field(None, gt=0.0)
    """A fixed sampling scale (static ``sample`` policy); ``keep_fraction`` is usually better."""
    epsilon: float | None = Field(None, ge=0.0, le=2.0)
    epsilon_fraction: float = Field(0.5, gt=0.0, le=1.0)
    epsilon_percentile: float = Field(1.0, ge=0.0, le=100.0)
    epsilon_default: float = Field(0.02, ge=0.0, le=2.0)
    """ε (a distance) where it is neither set, calibrated on a seed nor estimated online."""
    epsilon_warmup_ratio: float = Field(0.05, gt=0.0, le=0.5)
    """The online ε before its estimate has ``epsilon_warmup`` items where no seed measured a
    distance floor: only an arrival whose nearest accepted item is at most this share of its
    reference neighbour's distance away is a copy (a raw distance default would depend on the
    embedding's scale)."""
    epsilon_warmup: int = Field(200, gt=0, le=1000)
    epsilon_ref_k: int = Field(4, ge=2, le=256)
    """The online ε compares each arrival's nearest distance with its distance to this-th nearest
    accepted item (the local density); a duplicate is closer than ε times that distance."""
    epsilon_false_flags: float = Field(0.02, gt=0.0, lt=0.5)
    """Share of originals the online ε may flag as duplicates (the same 2% budget as
    ``clean.max_clean_flagged``); ε stops there or at the copies mode's 99th percentile."""
    epsilon_mode: Literal["auto", "seed", "online"] = "auto"
    """Where ε comes from when ``epsilon`` is unset: ``seed`` (calibrated once on the seed),
    ``online`` (the stream's own nearest-neighbour distances, partition state); ``auto`` = seed
    when a seed is given, else online."""
    duplicate_mode: Literal["all", "any"] = "all"
    entropy_weight: float = Field(0.0, ge=0.0)
    label_space: Literal["auto", "image", "text"] = "auto"
    seed: int = 0
    batch_size: int = Field(256, gt=0)


class SnapshotConfig(_Section):
    directory: Path = Path("state")
    interval_s: float = Field(60.0, gt=0)
    interval_items: int = Field(50_000, gt=0)
    keep: int = Field(2, ge=1)
    fork: bool = True
    """Write snapshots from a forked child while the partition goes on processing (its stall is
    the fork); false, or where fork is unavailable: write them on the processing thread."""
    write_timeout_s: float = Field(600.0, gt=0)
    """A forked snapshot writer still running after this long (a hung disk) is killed and the
    snapshot counted as failed: until then the partition takes no other snapshot and the
    writer holds its copy-on-write image."""
    remote: str | None = Field(None, min_length=1)
    """A URL (``s3://bucket/prefix``, ``gs://…``, ``file:///shared/…``) that also keeps every
    partition's snapshots, written and read through fsspec with ``storage.options``: a pod that
    takes a partition with no snapshot on its own volume (scale-out, a new pod, a lost volume)
    starts from the newest one there and replays only the changelog after it. Unset: snapshots
    stay on the pod's volume."""
    remote_timeout_s: float = Field(600.0, gt=0)
    """Longest a restore waits for ``remote`` to list a partition's snapshots or to fetch one;
    then it goes on without it (the next snapshot, the local one, or the changelog)."""
    upload_interval_s: float = Field(300.0, gt=0)
    """Least time between two uploads of one partition's snapshot to ``remote`` (each uploads
    the whole snapshot); the last snapshot before a partition is revoked or the stage stops is
    uploaded regardless."""

    @field_validator("remote")
    @classmethod
    def _remote_is_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
            raise ValueError(  # pydantic names the key
                f"{value!r} is not a URL: give one such as s3://bucket/prefix or "
                "file:///shared/path"
            )
        return value


class RestoreConfig(_Section):
    """How a select partition's state is rebuilt from the changelog."""

    batch_items: int = Field(16_384, gt=0)
    """Changelog items handed to hnswlib per insert call while replaying; every value builds the
    same state (items go in changelog order, one insert thread per index)."""
    fast_rebuild: bool = False
    """With no usable snapshot (a new pod, a lost volume, a corrupt snapshot), rebuild with
    multi-threaded inserts: the same items and vectors, but a graph that depends on thread
    timing, so later decisions agree with a replay only up to HNSW recall. Off: a replay
    rebuilds exactly the graph the live stage built."""
    threads: int = Field(0, ge=0)
    """Insert threads of a fast rebuild, shared by the spaces (each index gets at least one);
    0: every core."""


class TopicsConfig(_Section):
    """Topic names and layout. ``changelog`` always gets as many partitions as ``embedded``."""

    ingest: str = "infogrowth.ingest"
    embedded: str = "infogrowth.embedded"
    changelog: str = "infogrowth.changelog"
    control: str = "infogrowth.control"
    accepted: str = "infogrowth.accepted"
    relabeled: str = "infogrowth.relabeled"
    rejected: str = "infogrowth.rejected"
    dead_letter: str | None = Field(None, min_length=1)
    """Dead-letter topic for malformed input (its original bytes and error headers); unset:
    malformed input goes to ``rejected`` like every other rejection."""
    ingest_partitions: int = Field(1, gt=0)
    embedded_partitions: int = Field(1, gt=0)
    output_partitions: int = Field(1, gt=0)
    replication_factor: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _own_dead_letter_topic(self) -> TopicsConfig:
        others = (
            self.ingest,
            self.embedded,
            self.changelog,
            self.control,
            self.accepted,
            self.relabeled,
            self.rejected,
        )
        if self.dead_letter is not None and self.dead_letter in others:
            raise ConfigError(
                f"kafka.topics.dead_letter ({self.dead_letter!r}) must name a topic of its own: "
                "its records are raw input, not output records"
            )
        return self


class KafkaConfig(_Section):
    """Kafka runtime settings. ``client`` passes through to librdkafka unchanged (security,
    SASL, SSL, timeouts...), for consumers and producers alike."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """librdkafka properties; secret-bearing ones (see :func:`is_secret_key`) are masked in
    ``repr``/``str`` and everywhere settings are printed."""
    topics: TopicsConfig = TopicsConfig()
    embed_group: str = "infogrowth-embed"
    select_group: str = "infogrowth-select"
    transactional_id_prefix: str = "infogrowth"
    instance_id: str | None = None
    """Stable per-replica id: names the transactional ids and, if ``static_membership``, the
    ``group.instance.id``. Defaults to the host name."""
    static_membership: bool = False
    commit_interval_ms: int = Field(500, gt=0)
    commit_max_messages: int = Field(500, gt=0)
    commit_idle_ms: int = Field(50, gt=0)
    """Once every partition a stage reads is at its end, a partial batch commits after this
    long without new messages instead of waiting out ``commit_interval_ms`` (the end of a
    burst reaches the outputs at once; a steady trickle still gathers into batches)."""
    transaction_timeout_ms: int = Field(60_000, gt=0)
    session_timeout_ms: int = Field(45_000, gt=0)
    max_poll_interval_ms: int = Field(300_000, gt=0)
    drain_timeout_s: float = Field(30.0, gt=0)
    """SIGTERM: finish, commit and snapshot within this many seconds, then exit."""
    cells: int | None = Field(None, gt=0)
    """Number of cells (default: embedded partitions)."""
    cells_replication_margin: float = Field(0.05, ge=0)
    """Boundary replication: a kept item is also indexed in every other cell whose centroid
    distance is within this relative margin of its nearest (0: off)."""

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, (redact_client(value) if name == "client" else value)


class ServeConfig(_Section):
    """The HTTP endpoint for /metrics, /healthz and /readyz."""

    host: str = "0.0.0.0"
    port: int = Field(9108, ge=0, le=65535)


class Settings(BaseSettings):
    """All settings. Sections mirror the modules that use them."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    limits: LimitsConfig = LimitsConfig()
    encoder: EncoderConfig = EncoderConfig()
    clean: CleanConfig = CleanConfig()
    index: IndexConfig = IndexConfig()
    select: SelectConfig = SelectConfig()
    snapshot: SnapshotConfig = SnapshotConfig()
    restore: RestoreConfig = RestoreConfig()
    kafka: KafkaConfig = KafkaConfig()
    serve: ServeConfig = ServeConfig()
    inputs: InputsConfig = InputsConfig()
    storage: StorageConfig = StorageConfig()
    outputs_include_image: ImageMode = True
    """Image in accepted / relabeled / rejected records on Kafka: ``true`` the bytes (and the
    ``image_uri``), ``reference`` only the ``image_uri`` (records stay small whatever the image
    size), ``false`` neither."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # env overrides the YAML file, which arrives as init kwargs.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.index.ef < self.select.k:
            raise ConfigError(f"index.ef ({self.index.ef}) must be >= select.k ({self.select.k})")
        if self.clean.neighbour_min > self.clean.neighbour_k:
            raise ConfigError(
                f"clean.neighbour_min ({self.clean.neighbour_min}) must be <= "
                f"clean.neighbour_k ({self.clean.neighbour_k})"
            )
        if self.index.ef < self.clean.neighbour_k:
            raise ConfigError(
                f"index.ef ({self.index.ef}) must be >= clean.neighbour_k "
                f"({self.clean.neighbour_k})"
            )
        fs, rs = self.clean.flag_share, self.clean.reject_share
        if fs is not None and rs is not None and rs > fs:
            raise ConfigError(
                f"clean.reject_share ({rs}) must be <= clean.flag_share ({fs}): only a label at "
                "or below the flag share counts as wrong"
            )
        sel = self.select
        if sel.policy == "sample" and sel.keep_fraction is None and sel.g_scale is None:
            raise ConfigError("select.policy=sample needs select.keep_fraction or select.g_scale")
        clean = self.clean
        if clean.fixer == "recaption" and not clean.recaption_model:
            raise ConfigError("clean.fixer=recaption needs clean.recaption_model")
        if clean.fixer == "zero-shot" and not clean.classes:
            raise ConfigError("clean.fixer=zero-shot needs clean.classes")
        return self


def _unknown_env_keys() -> list[str]:
    known = set(Settings.model_fields)
    bad = []
    for name in os.environ:
        if not name.startswith(ENV_PREFIX) or name in NON_SETTINGS_ENV:
            continue
        top = name[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if top not in known:
            bad.append(name)
    return bad


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"{key}: {e['msg']}")
    return f"invalid configuration ({source}):\n  " + "\n  ".join(lines)


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional YAML file, the environment and explicit overrides."""
    data: dict[str, Any] = {}
    source = "defaults + environment"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            # Position only: PyYAML's message quotes the offending line, which may hold a secret.
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(exc, "problem", None) or "syntax error"
            raise ConfigError(f"config file {p} is not valid YAML{where}: {problem}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        data = loaded
        source = f"{p} + environment"
    for key, value in overrides.items():
        section, _, leaf = key.partition(".")
        if leaf:
            data.setdefault(section, {})
            data[section][leaf] = value
        else:
            data[key] = value
    bad_env = _unknown_env_keys()
    if bad_env:
        raise ConfigError(f"unknown setting in environment: {', '.join(sorted(bad_env))}")
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from exc
