"""``CuratedStream``: the curated topics as a torch ``IterableDataset``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast, overload

from torch.utils.data import IterableDataset, get_worker_info

from infogrowth.config import Settings
from infogrowth.errors import ConfigError, DataError
from infogrowth.kafka.reader import (
    PartitionRange,
    StartPosition,
    TopicPartitionKey,
    end_offsets,
    list_partitions,
    open_consumer,
    plan_ranges,
    read_ranges,
)
from infogrowth.sampling.kafka import commit_ends, decode_record, id_bucket, reader_share
from infogrowth.sampling.records import CuratedSample, check_output_record
from infogrowth.sampling.samplers import distributed_rank

T = TypeVar("T")

DEFAULT_GROUP = "infogrowth-trainer"


class CuratedStream(IterableDataset[T]):
    """The ``accepted`` and ``relabeled`` topics as an iterable of :class:`CuratedSample`.

    Each iteration is one epoch: every assigned partition is read (read_committed: records of
    aborted transactions are never seen) from its start position to the end offset captured when
    the epoch starts (or pinned by :meth:`pin`), so an epoch is finite and, on unchanged topics,
    repeatable. Start positions: ``"earliest"`` (default), ``"committed"`` (the offsets ``group``
    committed, the log start where it has none) or ``{(topic, partition): offset}``. With
    ``commit=True`` a reader commits its end offsets to ``group`` when it finishes its share of
    the epoch, so the next ``"committed"`` epoch reads only newer records; it needs at least
    one partition per reader (a partition shared by readers cannot be committed by one of
    them: :class:`ConfigError`). ``group`` should be
    used by nobody else (the stream assigns partitions itself; it never joins the group).

    Readers: DataLoader worker ``w`` of ``W`` on rank ``r`` of ``R`` is reader ``r * W + w`` of
    ``R * W``. Readers take the sorted ``(topic, partition)`` list round robin; when there are
    fewer partitions than readers, every reader reads every partition and keeps the samples whose
    stable id hash (blake2b) modulo the reader count is its own. Either way each record reaches
    exactly one reader per epoch. ``rank`` / ``world_size`` default to torch.distributed, else
    ``RANK`` / ``WORLD_SIZE``, else 0 / 1; they are read when the stream is built.

    ``epoch`` keeps only the records decided under that calibration epoch (each ``seed
    --reset`` starts a new one with a new index; records carry it as ``epoch``).

    Records are in offset order within a partition; partitions interleave. ``transform`` maps
    each sample (for example to tensors); it must be picklable for spawned workers.
    """

    @overload
    def __init__(
        self: CuratedStream[CuratedSample],
        settings: Settings,
        *,
        topics: Sequence[str] | None = ...,
        start: StartPosition = ...,
        group: str = ...,
        commit: bool = ...,
        transform: None = ...,
        rank: int | None = ...,
        world_size: int | None = ...,
        timeout_s: float = ...,
        epoch: int | None = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: CuratedStream[T],
        settings: Settings,
        *,
        topics: Sequence[str] | None = ...,
        start: StartPosition = ...,
        group: str = ...,
        commit: bool = ...,
        transform: Callable[[CuratedSample], T],
        rank: int | None = ...,
        world_size: int | None = ...,
        timeout_s: float = ...,
        epoch: int | None = ...,
    ) -> None: ...

    def __init__(
        self,
        settings: Settings,
        *,
        topics: Sequence[str] | None = None,
        start: StartPosition = "earliest",
        group: str = DEFAULT_GROUP,
        commit: bool = False,
        transform: Callable[[CuratedSample], T] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        timeout_s: float = 60.0,
        epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.epoch = epoch
        """Only records decided under this calibration epoch (None: every record)."""
        if commit and start == "earliest":
            raise ConfigError('commit=True needs start="committed" or explicit offsets')
        t = settings.kafka.topics
        self.settings = settings
        self.topics: tuple[str, ...] = tuple(topics) if topics else (t.accepted, t.relabeled)
        self.start: StartPosition = start if isinstance(start, str) else dict(start)
        self.group = group
        self.commit = commit
        self.transform = transform
        auto_rank, auto_world = distributed_rank()
        self.rank = auto_rank if rank is None else rank
        self.world_size = auto_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        self.timeout_s = timeout_s
        self.pinned_ends: dict[TopicPartitionKey, int] | None = None

    def pin(self) -> dict[TopicPartitionKey, int]:
        """Capture the end offsets now: every later epoch of this stream (and of the copies
        DataLoader workers get) ends there, even if the topics grow. Returns them."""
        consumer = open_consumer(self.settings, self.group)
        try:
            parts = list_partitions(consumer, self.topics, self.timeout_s)
            self.pinned_ends = end_offsets(consumer, parts, self.timeout_s)
        finally:
            consumer.close()
        return dict(self.pinned_ends)

    def unpin(self) -> None:
        """Let each epoch capture its own end offsets again."""
        self.pinned_ends = None

    def reader(self) -> tuple[int, int]:
        """``(reader, readers)`` for the calling process / DataLoader worker."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[T]:
        index, count = self.reader()
        fn = self.transform
        for sample in self.samples(index, count):
            yield fn(sample) if fn is not None else cast(T, sample)

    def samples(self, reader: int = 0, readers: int = 1) -> Iterator[CuratedSample]:
        """One epoch of untransformed samples for reader ``reader`` of ``readers``
        (the defaults read everything in the calling process)."""
        consumer = open_consumer(self.settings, self.group)
        try:
            parts = list_partitions(consumer, self.topics, self.timeout_s)
            own, by_id = reader_share(parts, reader, readers)
            if by_id and self.commit:
                raise ConfigError(
                    f"commit=True needs a partition per reader: {readers} readers (ranks x "
                    f"DataLoader workers) share {len(parts)} partitions, and each would commit "
                    "the whole partition's end after reading only its own share; use at most "
                    f"{len(parts)} readers, more partitions, or commit=False"
                )
            ranges = plan_ranges(consumer, own, self.start, self.timeout_s, self.pinned_ends)
            max_bytes = self.settings.limits.max_message_bytes
            for r, m in read_ranges(consumer, ranges, self.timeout_s):
                rec = _decode(r, m.offset(), m.value(), max_bytes)
                if by_id and id_bucket(rec["id"], readers) != reader:
                    continue
                _check(r, m.offset(), rec)
                if self.epoch is not None and rec.get("epoch") != self.epoch:
                    continue
                yield CuratedSample.from_record(rec, (r.topic, r.partition, m.offset()))
            if self.commit:
                commit_ends(consumer, ranges)
        finally:
            consumer.close()


def _where(r: PartitionRange, offset: int) -> str:
    return f"{r.topic}[{r.partition}]@{offset}"


def _decode(r: PartitionRange, offset: int, value: bytes | None, max_bytes: int) -> Any:
    try:
        return decode_record(value, max_bytes)
    except Exception as exc:  # msgpack raises many types on garbage
        raise DataError(f"{_where(r, offset)}: undecodable output record: {exc}") from None


def _check(r: PartitionRange, offset: int, rec: Any) -> None:
    check_output_record(rec, _where(r, offset))
