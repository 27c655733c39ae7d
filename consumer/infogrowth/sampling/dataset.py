"""``CuratedSet``: a materialised curated set (from the stream or an export) for the samplers."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import numpy as np
from torch.utils.data import Dataset

from infogrowth.sampling.records import (
    EXPORT_INFO,
    CuratedSample,
    gain_array,
    normalise_gains,
    read_curated_records,
    resolve_g_scale,
)

if TYPE_CHECKING:
    from infogrowth.sampling.stream import CuratedStream

T = TypeVar("T")
U = TypeVar("U")


class CuratedSet(Dataset[T]):
    """Curated samples in a fixed order, with their gains; a map-style torch ``Dataset``.

    ``set[i]`` is ``transform(samples[i])`` (the sample itself without a transform); the
    samplers in :mod:`infogrowth.sampling` draw indices into it. ``g_scale`` maps gains to
    ``[0, 1]`` (``clip(g / g_scale, 0, 1)``): given, else the curator's recorded
    ``thresholds.g_scale``, else the largest gain (see :func:`resolve_g_scale`).
    """

    @overload
    def __init__(
        self: CuratedSet[CuratedSample],
        samples: Iterable[CuratedSample],
        *,
        g_scale: float | None = ...,
        transform: None = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: CuratedSet[T],
        samples: Iterable[CuratedSample],
        *,
        g_scale: float | None = ...,
        transform: Callable[[CuratedSample], T],
    ) -> None: ...

    def __init__(
        self,
        samples: Iterable[CuratedSample],
        *,
        g_scale: float | None = None,
        transform: Callable[[CuratedSample], T] | None = None,
    ) -> None:
        self.samples: list[CuratedSample] = list(samples)
        self.gains: np.ndarray = gain_array(s.gain for s in self.samples)
        self.g_scale: float = resolve_g_scale(
            g_scale, (s.g_scale for s in self.samples), self.gains
        )
        self.transform = transform

    @property
    def normalised_gains(self) -> np.ndarray:
        """``clip(gain / g_scale, 0, 1)`` per sample (a missing gain counts as 1)."""
        return normalise_gains(self.gains, self.g_scale)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def with_transform(self, transform: Callable[[CuratedSample], U]) -> CuratedSet[U]:
        """The same samples and gains, mapped by ``transform`` on access."""
        out: CuratedSet[U] = CuratedSet.__new__(CuratedSet)
        out.samples, out.gains, out.g_scale = self.samples, self.gains, self.g_scale
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
        cls, stream: CuratedStream[Any], *, g_scale: float | None = None
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
        return CuratedSet(samples, g_scale=g_scale)

    @classmethod
    def from_export(
        cls, path: Path | str, *, g_scale: float | None = None, images: bool = True
    ) -> CuratedSet[CuratedSample]:
        """Load an ``infogrowth export`` directory (either format), a ``curate`` output
        directory (accepted then relabeled) or one JSONL file of output records.

        For a WebDataset export, ``images=True`` reads the images back from the shards.
        """
        p = Path(path)
        records = list(read_curated_records(p))
        info = _export_info(p)
        if images and info is not None and info.get("format") == "webdataset":
            shard_images = _read_shard_images(p, info)
            for rec in records:
                loc = rec.get("export") or {}
                img = shard_images.get((str(loc.get("shard")), str(loc.get("key"))))
                if img is not None:
                    rec["image"] = img
        return CuratedSet((CuratedSample.from_record(r) for r in records), g_scale=g_scale)


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
