"""``CuratedSet``: a materialised curated set (from the stream or an export) for the samplers."""

from __future__ import annotations

import copy
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import numpy as np
from torch.utils.data import Dataset

from infogrowth.sampling.records import (
    DEFAULT_G_PERCENTILE,
    EXPORT_INFO,
    CuratedSample,
    GainWeights,
    check_percentile,
    gain_array,
    gain_weights,
    read_curated_records,
    recorded_g_scale,
)

if TYPE_CHECKING:
    from infogrowth.sampling.stream import CuratedStream

log = logging.getLogger(__name__)
T = TypeVar("T")
U = TypeVar("U")


class CuratedSet(Dataset[T]):
    """Curated samples in a fixed order, with their gains; a map-style torch ``Dataset``.

    ``set[i]`` is ``transform(samples[i])`` (the sample itself without a transform); the
    samplers in :mod:`infogrowth.sampling` draw indices into it. The samplers weight item ``i``
    by ``q_i = clip(g_i / g_scale, 0, 1)`` (:meth:`weights`): ``g_scale`` given, else the
    ``g_percentile``-th (default 99th) percentile of the set's own gains, as the authors
    normalise. Samples the stream already sampled online (``thresholds.policy == "sample"``,
    see :attr:`stream_sampled`) keep ``q = 1`` whatever the scale: one sampling step, never two
    (``resample_online=True`` weights them by gain a second time). The stream's own recorded
    scale is :attr:`recorded_g_scale` (information only).
    """

    @overload
    def __init__(
        self: CuratedSet[CuratedSample],
        samples: Iterable[CuratedSample],
        *,
        g_scale: float | None = ...,
        g_percentile: float = ...,
        resample_online: bool = ...,
        transform: None = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: CuratedSet[T],
        samples: Iterable[CuratedSample],
        *,
        g_scale: float | None = ...,
        g_percentile: float = ...,
        resample_online: bool = ...,
        transform: Callable[[CuratedSample], T],
    ) -> None: ...

    def __init__(
        self,
        samples: Iterable[CuratedSample],
        *,
        g_scale: float | None = None,
        g_percentile: float = DEFAULT_G_PERCENTILE,
        resample_online: bool = False,
        transform: Callable[[CuratedSample], T] | None = None,
    ) -> None:
        self.samples: list[CuratedSample] = list(samples)
        self._warn_mixed()
        self.gains: np.ndarray = gain_array(s.gain for s in self.samples)
        self.sampled_online: np.ndarray = np.array(
            [s.sampled_online for s in self.samples], dtype=bool
        )
        """Per sample: the stream already kept it by a gain coin (policy ``sample``)."""
        self.g_percentile = check_percentile(g_percentile)
        self.g_scale_given = g_scale
        """The ``g_scale`` given by the user (it wins over every default), or None."""
        self.resample_online = resample_online
        """Weight the samples the stream already sampled online by gain too (a second
        sampling step: off unless asked for)."""
        w = self.weights()
        self.g_scale: float = w.g_scale
        """The scale the samplers use by default: given, else the set's own percentile."""
        self.transform = transform

    def weights(
        self,
        g_scale: float | None = None,
        g_percentile: float | None = None,
        resample_online: bool | None = None,
    ) -> GainWeights:
        """The samplers' weights: :func:`gain_weights` over this set's gains and online-sampled
        mask; the arguments given override the set's own."""
        return gain_weights(
            self.gains,
            g_scale=g_scale if g_scale is not None else self.g_scale_given,
            percentile=self.g_percentile if g_percentile is None else g_percentile,
            sampled_online=self.sampled_online,
            resample_online=self.resample_online if resample_online is None else resample_online,
        )

    @property
    def normalised_gains(self) -> np.ndarray:
        """The default sampling weight ``q`` per sample (:meth:`weights`; a missing gain counts
        as 1, a sample the stream already sampled online as 1 unless ``resample_online``)."""
        return self.weights().q

    @property
    def epochs(self) -> list[int]:
        """The calibration epochs the samples were decided under (ascending; records without
        one are left out)."""
        return sorted({s.epoch for s in self.samples if s.epoch is not None})

    def _warn_mixed(self) -> None:
        epochs = self.epochs
        if len(epochs) > 1:
            log.warning(
                "curated samples of calibration epochs %s: each seed --reset started a new "
                "index, so inputs produced again after it were kept again and gains are measured "
                "against different sets; select one with epoch= (CuratedStream, from_export)",
                epochs,
            )
        ids = Counter(s.id for s in self.samples)
        twice = sum(1 for c in ids.values() if c > 1)
        if twice:
            log.warning("%d ids occur more than once among %d curated samples", twice, len(ids))

    @property
    def stream_sampled(self) -> bool:
        """True when any sample was already sampled online by the stream (policy ``sample``,
        e.g. with ``select.keep_fraction``): the samplers then leave those samples at ``q = 1``
        by default instead of sampling them twice."""
        return bool(self.sampled_online.any())

    @property
    def recorded_g_scale(self) -> float | None:
        """The stream's recorded ``thresholds.g_scale`` (most frequent), for information."""
        return recorded_g_scale(s.g_scale for s in self.samples)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def with_transform(self, transform: Callable[[CuratedSample], U]) -> CuratedSet[U]:
        """The same samples and gains, mapped by ``transform`` on access."""
        out = cast("CuratedSet[U]", copy.copy(self))
        out.transform = transform
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> T:
        s = self.samples[index]
        return self.transform(s) if self.transform is not None else cast(T, s)

    def __iter__(self) -> Iterator[T]:
        for i in range(len(self.samples)):
            yield self[i]

    @classmethod
    def from_stream(
        cls,
        stream: CuratedStream[Any],
        *,
        g_scale: float | None = None,
        g_percentile: float = DEFAULT_G_PERCENTILE,
        resample_online: bool = False,
    ) -> CuratedSet[CuratedSample]:
        """Read one epoch of ``stream`` in this process (all partitions, every rank reads the
        whole set; shard with :class:`DistributedGainSampler`), ordered by
        ``(topic, partition, offset)`` so the order does not depend on arrival."""
        order = {t: i for i, t in enumerate(stream.topics)}
        samples = sorted(
            stream.samples(),
            key=lambda s: (
                (order[s.position[0]], s.position[1], s.position[2]) if s.position else (0, 0, 0)
            ),
        )
        return CuratedSet(
            samples, g_scale=g_scale, g_percentile=g_percentile, resample_online=resample_online
        )

    @classmethod
    def from_export(
        cls,
        path: Path | str,
        *,
        g_scale: float | None = None,
        g_percentile: float = DEFAULT_G_PERCENTILE,
        resample_online: bool = False,
        images: bool = True,
        epoch: int | None = None,
    ) -> CuratedSet[CuratedSample]:
        """Load an ``infogrowth export`` directory (either format), a ``curate`` output
        directory (accepted then relabeled) or one JSONL file of output records.

        For a WebDataset export, ``images=True`` reads the images back from the shards.
        ``epoch``: only the records decided under that calibration epoch.
        """
        p = Path(path)
        records = [r for r in read_curated_records(p) if epoch is None or r.get("epoch") == epoch]
        info = _export_info(p)
        if images and info is not None and info.get("format") == "webdataset":
            shard_images = _read_shard_images(p, info)
            for rec in records:
                loc = rec.get("export") or {}
                img = shard_images.get((str(loc.get("shard")), str(loc.get("key"))))
                if img is not None:
                    rec["image"] = img
        return CuratedSet(
            (CuratedSample.from_record(r) for r in records),
            g_scale=g_scale,
            g_percentile=g_percentile,
            resample_online=resample_online,
        )


def _export_info(p: Path) -> dict[str, Any] | None:
    f = p / EXPORT_INFO
    if not (p.is_dir() and f.is_file()):
        return None
    info = json.loads(f.read_text(encoding="utf-8"))
    return info if isinstance(info, dict) else None


def _read_shard_images(p: Path, info: dict[str, Any]) -> dict[tuple[str, str], bytes]:
    images: dict[tuple[str, str], bytes] = {}
    for shard in info.get("shards", []):
        with tarfile.open(p / shard, mode="r") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext in ("json", "txt") or not member.isfile():
                    continue
                fh = tar.extractfile(member)
                if fh is not None:
                    images[(shard, key)] = fh.read()
    return images
