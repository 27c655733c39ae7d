"""Pure stage logic shared by the file runner and the Kafka runner: batch in, results out.

``EmbedStage`` turns parsed samples into unit vectors and applies the cleaner; ``Curator`` chains
it with one partition's :class:`~infogrowth.select.Selector`. Nothing here touches Kafka or files.

The CPU work around the model runs beside it: images are decoded on a small thread pool (Pillow
releases the GIL), and while the model embeds one image batch the pool already resizes the next
ones (a bounded prefetch queue), split across its threads. The model sees the same batches as a
plain ``encode_images`` call, so the vectors are the same. When the encoder decodes on its device
(``encoder.decode``), images go to it as bytes instead (:mod:`infogrowth.imagefeed`).
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from infogrowth.calibrate import Calibration, SeedStats, resolve_thresholds, seed_stats
from infogrowth.config import Settings
from infogrowth.errors import ConfigError, DataError
from infogrowth.imagefeed import DecodeFailure
from infogrowth.index import PartitionState
from infogrowth.messages import Outcome, thresholds_record
from infogrowth.models import CaptionerLike, EncoderLike, StagedImageEncoder, StagedTextEncoder
from infogrowth.prefetch import prefetch
from infogrowth.schema import SPACES, Embedded, Malformed, Sample
from infogrowth.select import Selector, Thresholds

if TYPE_CHECKING:
    from infogrowth.fetch import ImageFetcher

log = logging.getLogger(__name__)

DRIFT_SAMPLE = 500
IMAGE_FIT_MIN = 448
"""Decoded images keep a shorter side of at least this (a captioner reads up to 384)."""
IMAGE_FIT_DEFAULT = 1024
"""Shorter side decoded images are reduced to when the encoder does not say its input size."""
"""Stream alignments compared with the seed's before the drift warning."""


@dataclass
class StageTimes:
    """Cumulative seconds and item counts per stage, for reports and benchmarks."""

    seconds: dict[str, float] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, seconds: float, items: int) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.items[stage] = self.items.get(stage, 0) + items

    def rates(self) -> dict[str, float]:
        return {s: round(self.items[s] / t, 1) if t > 0 else 0.0 for s, t in self.seconds.items()}


def cpu_threads() -> int:
    """Threads for decoding and preprocessing: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _unit(v: np.ndarray) -> np.ndarray:
    """``v / |v|`` computed in float64 (a float32 norm can overflow or underflow); a vector
    that cannot be normalised raises ValueError, so it is rejected under its sample's id."""
    x = v.astype(np.float64)
    n = math.sqrt(float(x.dot(x)))  # what np.linalg.norm computes for a real vector
    if not (n > 0.0 and math.isfinite(n)):
        raise DataError(f"embedding cannot be normalised (norm {n})")
    # Finite and non-zero by construction: every |x_i| <= n, and the largest is >= n / sqrt(d),
    # far above float32's smallest subnormal for any dimension.
    return (x / n).astype(np.float32)


def _original(sample: Sample) -> bytes:
    """What a rejection of ``sample`` carries: its message, else its image bytes."""
    return sample.payload or sample.image or b""


def configured_dims(settings: Settings) -> dict[str, int] | None:
    """``encoder.dims`` per space, in space order; None when not configured (an encoder's own
    dims, else the first valid sample's, then apply). Precomputed vectors only."""
    configured = settings.encoder.dims
    if not configured:
        return None
    return {s: configured[s] for s in SPACES if s in configured}  # type: ignore[index]


class EmbedStage:
    """Decode, validate, embed and clean. Stateless apart from its thresholds."""

    def __init__(
        self,
        settings: Settings,
        encoder: EncoderLike | None,
        captioner: CaptionerLike | None = None,
        *,
        spaces: Sequence[str] | None = None,
        dims: dict[str, int] | None = None,
        thresholds: Thresholds | None = None,
    ) -> None:
        self.settings = settings
        self.encoder = encoder
        self.captioner = captioner
        self.delta: float | None = settings.clean.delta if settings.clean.enabled else None
        """Alignment threshold: ``clean.delta`` until thresholds are given (:meth:`use`)."""
        self.alignment_reference: tuple[float, float, float] | None = None
        """Seed alignment quartiles; the stream's early median is checked against them."""
        self._early_alignments: list[float] = []
        self.alignment_drift: bool | None = None
        self.times = StageTimes()
        self.threads = cpu_threads()
        self._pool: ThreadPoolExecutor | None = None
        self._text_pool: ThreadPoolExecutor | None = None
        self._fetcher: ImageFetcher | None = None
        self._fetch_deadline = 0.0
        if encoder is not None:
            self.spaces: tuple[str, ...] | None = tuple(encoder.spaces)
            self.dims: dict[str, int] | None = dict(encoder.dims)
        else:
            self.spaces = tuple(spaces) if spaces else None
            self.dims = dict(dims) if dims else None
        fixer = settings.clean.fixer  # its other needs are checked by the settings model
        self.recaption = captioner is not None and fixer in ("auto", "recaption")
        self.zero_shot = fixer == "zero-shot"
        self._prompts: tuple[list[str], np.ndarray] | None = None
        if self.zero_shot and (encoder is None or "text" not in encoder.spaces):
            raise ConfigError("clean.fixer=zero-shot needs an encoder with a text tower")
        if thresholds is not None:
            self.use(thresholds)

    def use(self, thresholds: Thresholds) -> None:
        """Clean with ``thresholds`` (δ and the seed's alignment quartiles) from now on."""
        self.delta = thresholds.delta
        self.alignment_reference = thresholds.alignment_quartiles

    def calibrate(self, cal: Calibration) -> None:
        """Take up a published calibration: its thresholds, and its layout when this stage
        runs without an encoder (precomputed vectors)."""
        self.use(cal.thresholds)
        if self.encoder is None:
            self.spaces, self.dims = cal.spaces, dict(cal.dims)

    @property
    def fingerprint(self) -> str:
        if self.encoder is not None:
            return self.encoder.fingerprint
        return "precomputed:" + ",".join(f"{s}={d}" for s, d in (self.dims or {}).items())

    def _fix_spaces(self, sample: Sample) -> None:
        """Precomputed mode: the first valid sample fixes the spaces and dimensions."""
        if self.spaces is not None or not sample.embedding:
            return
        self.spaces = tuple(s for s in SPACES if s in sample.embedding)
        self.dims = {s: int(sample.embedding[s].shape[0]) for s in self.spaces}
        log.info("embedding spaces fixed by first sample: %s", self.dims)

    def process(
        self, items: Sequence[Sample | Malformed], *, clean: bool = True
    ) -> list[Embedded | Outcome]:
        """One result per item, in order: an :class:`Embedded` or a rejected :class:`Outcome`.

        Items are embedded in consecutive parts that each stay within ``limits``'
        ``max_batch_pixels`` (decoded, at the model's scale) and ``max_batch_bytes``, so the
        decoded images of a whole Kafka batch are never held at once. When the encoder decodes
        on its device, decoded images exist only for the batches in its prefetch queue, so
        only the bytes bound applies.
        """
        fetches = self._start_fetches(items)
        if not fetches:
            out: list[Embedded | Outcome] = []
            for part in self._parts(items):
                out += self._process(part, clean=clean)
            return out
        # Referenced images: every fetch is in flight already; each window waits only for its
        # own, so later windows keep downloading while the model embeds earlier ones.
        window = max(1, int(getattr(self.encoder, "batch_size", 0) or 64))
        out = []
        for lo in range(0, len(items), window):
            hi = min(lo + window, len(items))
            chunk = [self._fetched(i, items[i], fetches) for i in range(lo, hi)]
            for part in self._parts(chunk):
                out += self._process(part, clean=clean)
        return out

    def _wants_image(self, sample: Sample) -> bool:
        """Whether the model needs this sample's image (recaptioning, or an image tower
        without a precomputed image vector)."""
        if self.encoder is None:
            return False
        has_vector = sample.embedding is not None and "image" in sample.embedding
        return self.recaption or ("image" in self.encoder.spaces and not has_vector)

    def _start_fetches(self, items: Sequence[Sample | Malformed]) -> dict[int, Future[bytes]]:
        """Start fetching the ``image_uri`` of samples that need an image and carry no bytes."""
        todo = [
            (pos, it.image_uri)
            for pos, it in enumerate(items)
            if isinstance(it, Sample)
            and it.image is None
            and it.image_uri is not None
            and self._wants_image(it)
        ]
        if not todo:
            return {}
        if self._fetcher is None:
            from infogrowth.fetch import ImageFetcher

            self._fetcher = ImageFetcher(self.settings.limits, self.settings.storage)
        futures = self._fetcher.submit([uri for _, uri in todo])
        self._fetch_deadline = time.monotonic() + self._fetcher.batch_timeout(len(todo))
        return {pos: f for (pos, _), f in zip(todo, futures, strict=True)}

    def _fetched(
        self, pos: int, item: Sample | Malformed, fetches: dict[int, Future[bytes]]
    ) -> Sample | Malformed:
        """``item`` with its referenced image filled in, or malformed with the fetch error."""
        future = fetches.get(pos)
        if future is None or not isinstance(item, Sample):
            return item
        from infogrowth.fetch import FetchError

        assert self._fetcher is not None
        try:
            data = self._fetcher.result(future, self._fetch_deadline - time.monotonic())
        except FetchError as exc:
            return Malformed(item.id, str(exc), item.payload, item.source)
        return replace(item, image=data)

    def _parts(self, items: Sequence[Sample | Malformed]) -> list[Sequence[Sample | Malformed]]:
        lim = self.settings.limits
        parts: list[Sequence[Sample | Malformed]] = []
        start, pixels, size = 0, 0, 0
        held = not self._decodes_on_device()
        for i, it in enumerate(items):
            p, b = self._cost(it, count_pixels=held)
            if i > start and (pixels + p > lim.max_batch_pixels or size + b > lim.max_batch_bytes):
                parts.append(items[start:i])
                start, pixels, size = i, 0, 0
            pixels += p
            size += b
        parts.append(items[start:])
        return parts

    def _cost(self, it: Sample | Malformed, *, count_pixels: bool = True) -> tuple[int, int]:
        """(decoded pixels at the model's scale, image + text bytes) of one item, from the
        image header only (unreadable headers cost nothing: decoding rejects them); pixels
        are not counted (0) with ``count_pixels=False``."""
        if isinstance(it, Malformed):
            return 0, 0
        size = len(it.image or b"") + len(it.text or "")
        if it.image is None or not count_pixels:
            return 0, size
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(it.image)) as img:
                    w, h = img.size
        except Exception:
            return 0, size
        fit = self._image_fit()
        pixels = min(w * h, self.settings.limits.max_image_pixels)
        if min(w, h) > fit:
            pixels = int(pixels * (fit / min(w, h)) ** 2)
        return pixels, size

    def _process(
        self, items: Sequence[Sample | Malformed], *, clean: bool = True
    ) -> list[Embedded | Outcome]:
        t0 = time.perf_counter()
        out: list[Embedded | Outcome | None] = [None] * len(items)
        todo: list[tuple[int, Sample, dict[str, np.ndarray]]] = []
        for pos, it in enumerate(items):
            if isinstance(it, Malformed):
                out[pos] = Outcome.malformed(it)
                continue
            self._fix_spaces(it)
            try:
                todo.append((pos, it, self._precomputed(it)))
            except ValueError as exc:
                out[pos] = Outcome.malformed(Malformed(it.id, str(exc), it.payload, it.source))
        assert self.spaces is not None or not todo

        # Decode images that a tower must embed (and that recaptioning may need); on the device
        # path the image tower decodes them itself, and recaptioning decodes the few it needs.
        images: dict[int, Image.Image] = {}
        jobs = [
            (pos, sample)
            for pos, sample, vecs in todo
            if sample.image is not None
            and not self._decodes_on_device()
            and (
                self.recaption
                or ("image" not in vecs and self.spaces is not None and "image" in self.spaces)
            )
        ]
        for (pos, sample), res in zip(jobs, self._map(self._decode, jobs), strict=True):
            if isinstance(res, Image.Image):
                images[pos] = res
            else:
                out[pos] = Outcome.malformed(
                    Malformed(sample.id, f"image: {res}", _original(sample), sample.source)
                )
        todo = [t for t in todo if out[t[0]] is None]

        staged = self._stage_texts(todo)
        for space in self.spaces or ():
            self._encode_missing(space, todo, images, out, staged if space == "text" else None)
        todo = [t for t in todo if out[t[0]] is None]
        t1 = time.perf_counter()
        self.times.add("embed", t1 - t0, len(items))

        for pos, sample, vecs in todo:
            emb = Embedded(
                id=sample.id,
                vectors=vecs,
                text=sample.text,
                label=sample.label,
                image=sample.image,
                meta=sample.meta,
                source=sample.source,
                image_uri=sample.image_uri,
            )
            if "image" in vecs and "text" in vecs and vecs["image"].shape == vecs["text"].shape:
                emb.alignment = round(float(np.dot(vecs["image"], vecs["text"])), 9)
            out[pos] = emb
        if clean:
            self._check_drift(out)
            self._clean(out, images)
        self.times.add("clean", time.perf_counter() - t1, len(todo))
        result = [r for r in out if r is not None]
        assert len(result) == len(items)
        return result

    def _precomputed(self, sample: Sample) -> dict[str, np.ndarray]:
        vecs: dict[str, np.ndarray] = {}
        emb = sample.embedding or {}
        spaces = self.spaces or ()
        if not spaces:
            raise DataError("sample has no embedding and no encoder is configured (encoder.model)")
        for s, v in emb.items():
            if s not in spaces:
                raise DataError(f"embedding.{s}: this pipeline indexes only {list(spaces)}")
            want = (self.dims or {})[s]
            if v.shape[0] != want:
                raise DataError(f"embedding.{s}: dimension {v.shape[0]}, expected {want}")
            vecs[s] = _unit(v)
        for s in spaces:
            if s in vecs:
                continue
            enc = self.encoder
            if enc is None or s not in enc.spaces:
                raise DataError(f"no {s} embedding in the sample and no {s} encoder configured")
            if s == "text" and sample.text is None:
                raise DataError("sample has no text to embed")
            if s == "image" and sample.image is None:
                raise DataError("sample has no image to embed")
        return vecs

    def _encode_missing(
        self,
        space: str,
        todo: list[tuple[int, Sample, dict[str, np.ndarray]]],
        images: dict[int, Image.Image],
        out: list[Embedded | Outcome | None],
        staged: _StagedTexts | None = None,
    ) -> None:
        need = [(pos, s, v) for pos, s, v in todo if space not in v and out[pos] is None]
        if not need or self.encoder is None:
            return
        ready = staged.result([pos for pos, _, _ in need]) if staged is not None else None
        rows = self._encode_split(space, need, images, ready)
        for v, (pos, sample, vecs) in zip(rows, need, strict=True):
            if isinstance(v, DecodeFailure):
                out[pos] = Outcome.malformed(
                    Malformed(sample.id, f"image: {v}", _original(sample), sample.source)
                )
            elif isinstance(v, str):
                out[pos] = Outcome.malformed(Malformed(sample.id, v, sample.payload, sample.source))
            elif not np.all(np.isfinite(v)):
                out[pos] = Outcome.malformed(
                    Malformed(
                        sample.id,
                        f"{space} encoder produced NaN/Inf",
                        sample.payload,
                        sample.source,
                    )
                )
            else:
                vecs[space] = np.ascontiguousarray(v, dtype=np.float32)

    def _encode_split(
        self,
        space: str,
        need: list[tuple[int, Sample, dict[str, np.ndarray]]],
        images: dict[int, Image.Image],
        staged: Any = None,
    ) -> list[np.ndarray | str]:
        """One row per item, or why the encoder failed on that item alone.

        A batch that raises (CUDA out of memory, a model error on one odd input) is split in
        halves until the culprit stands alone; it is then rejected instead of failing the whole
        batch, which would come back after the restart and fail again. On CUDA OOM the
        encoder's batch size is halved for good. When every item of a larger batch fails on its
        own with anything but OOM, the fault is not in the input: the error propagates.
        """
        assert self.encoder is not None
        try:
            if space == "text" and staged is not None:
                assert isinstance(self.encoder, StagedTextEncoder)
                mat = self.encoder.encode_staged_texts(staged)
            elif space == "text":
                mat = self.encoder.encode_texts([s.text or "" for _, s, _ in need])
            elif self._decodes_on_device():
                return list(self._encode_image_bytes([s.image or b"" for _, s, _ in need]))
            else:
                mat = self._encode_images([images[pos] for pos, _, _ in need])
            return [mat[i] for i in range(len(need))]
        except Exception as exc:
            why = f"{space} encoder failed: {type(exc).__name__}: {exc}"[:500]
            if _is_cuda_oom(exc):
                self._halve_batch()
            if len(need) == 1:
                log.warning("%s (sample %s rejected)", why, need[0][1].id)
                return [why]
            mid = len(need) // 2
            log.warning("%s; retrying the batch of %d in halves", why, len(need))
            rows = self._encode_split(space, need[:mid], images)
            rows += self._encode_split(space, need[mid:], images)
            # Undecodable images never reached the model: they say nothing about the fault.
            tried = [r for r in rows if not isinstance(r, DecodeFailure)]
            failed = len(tried) > 1 and all(isinstance(r, str) for r in tried)
            if failed and not _is_cuda_oom(exc):
                raise
            return rows

    def _halve_batch(self) -> None:
        enc: Any = self.encoder
        bs = getattr(enc, "batch_size", None)
        if isinstance(bs, int) and bs > 1:
            enc.batch_size = bs // 2
            log.warning("CUDA out of memory: encoder batch size %d -> %d", bs, bs // 2)
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:  # no torch or no CUDA: nothing cached to free
            pass

    # -- CPU work beside the model ---------------------------------------------------------

    def _stage_texts(
        self, todo: list[tuple[int, Sample, dict[str, np.ndarray]]]
    ) -> _StagedTexts | None:
        """Tokenise the call's texts on a thread of their own while an earlier space (the image
        tower) runs. The staged batches are used only if the texts to embed are still exactly
        these and the batch size has not changed; otherwise the text space runs as usual."""
        enc = self.encoder
        spaces = self.spaces or ()
        if not isinstance(enc, StagedTextEncoder) or "text" not in spaces or self.threads <= 1:
            return None
        before = spaces[: spaces.index("text")]
        need = [(pos, s) for pos, s, v in todo if "text" not in v]
        if not need or not any(sp not in v for _, _, v in todo for sp in before):
            return None
        if self._text_pool is None:
            self._text_pool = ThreadPoolExecutor(1, thread_name_prefix="embed-text")
        texts = [s.text or "" for _, s in need]
        future = self._text_pool.submit(enc.stage_texts, texts)
        return _StagedTexts([pos for pos, _ in need], enc.batch_size, future, enc)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="embed-cpu")
        return self._pool

    def _map(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> list[Any]:
        if self.threads <= 1 or len(jobs) <= 1:
            return [fn(j) for j in jobs]
        return list(self._executor().map(fn, jobs))

    def _decode(self, job: tuple[int, Sample]) -> Image.Image | str:
        data = job[1].image
        assert data is not None
        return self._decode_bytes(data)

    def _decode_bytes(self, data: bytes) -> Image.Image | str:
        """The reference decoder: an RGB image at most :meth:`_image_fit`, or the error."""
        from infogrowth.imaging import ImageError, decode_image

        lim = self.settings.limits
        try:
            return decode_image(
                data,
                max_bytes=lim.max_image_bytes,
                max_pixels=lim.max_image_pixels,
                fit=self._image_fit(),
            )
        except ImageError as exc:
            return str(exc)

    def _image_fit(self) -> int:
        """Shorter side decoded images are reduced to: twice the encoder's input size (the
        processor does the last resize, so vectors barely move), at least what a captioner
        reads; :data:`IMAGE_FIT_DEFAULT` when the encoder does not say."""
        size = getattr(self.encoder, "image_input_size", None)
        if not isinstance(size, int) or size <= 0:
            return IMAGE_FIT_DEFAULT
        return max(2 * size, IMAGE_FIT_MIN)

    def _decodes_on_device(self) -> bool:
        return getattr(self.encoder, "image_decode", "cpu") == "device"

    def _encode_image_bytes(self, blobs: list[bytes]) -> list[np.ndarray | DecodeFailure]:
        """The device path: encoded bytes to vectors on the encoder's device."""
        from infogrowth.imagefeed import embed_image_bytes

        lim = self.settings.limits
        enc: Any = self.encoder
        return embed_image_bytes(
            enc,
            blobs,
            decode_cpu=self._decode_bytes,
            map_fn=self._map,
            max_bytes=lim.max_image_bytes,
            max_pixels=lim.max_image_pixels,
        )

    def _encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """``encode_images`` with the next batch's preprocessing overlapping this batch's forward.

        Each batch is preprocessed in slices on the pool and joined (into pinned memory on CUDA),
        then the model runs on exactly the batches ``encode_images`` would give it.
        """
        enc = self.encoder
        assert enc is not None
        staged = isinstance(enc, StagedImageEncoder) and isinstance(enc.batch_size, int)
        if not isinstance(enc, StagedImageEncoder) or not staged or self.threads <= 1:
            return np.asarray(enc.encode_images(images), dtype=np.float32)
        pre, fwd, bs = enc.preprocess_images, enc.forward_images, enc.batch_size
        chunks = [images[i : i + bs] for i in range(0, len(images), bs)]
        pool = self._executor()
        pinned = str(enc.device).startswith("cuda")

        def prepare(chunk: list[Image.Image]) -> Any:
            step = -(-len(chunk) // self.threads)
            futures = [pool.submit(pre, chunk[i : i + step]) for i in range(0, len(chunk), step)]
            batch = _join([f.result() for f in futures], pinned)
            # Slices that do not stack: preprocess the batch whole.
            return batch if batch is not None else pre(chunk)

        depth = enc.prefetch_depth if len(chunks) > 1 else 0
        parts = [
            np.asarray(fwd(batch), dtype=np.float32)
            for batch in prefetch(chunks, prepare, depth, name="embed-images")
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        if self._text_pool is not None:
            self._text_pool.shutdown(wait=False)
            self._text_pool = None
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None

    # -- cleaning -------------------------------------------------------------------------

    def _check_drift(self, out: Sequence[Embedded | Outcome | None]) -> None:
        """Once ``DRIFT_SAMPLE`` alignments have arrived: warn when their median falls outside
        the seed's interquartile range (δ was fitted on a different distribution)."""
        ref = self.alignment_reference
        if ref is None or self.alignment_drift is not None:
            return
        self._early_alignments.extend(
            r.alignment for r in out if isinstance(r, Embedded) and r.alignment is not None
        )
        if len(self._early_alignments) < DRIFT_SAMPLE:
            return
        median = float(np.median(self._early_alignments))
        self.alignment_drift = not ref[0] <= median <= ref[2]
        self._early_alignments = []
        if self.alignment_drift:
            log.warning(
                "stream alignments depart from the seed's: median of the first %d is %.4f, "
                "outside the seed's interquartile range [%.4f, %.4f]; δ = %s was fitted on the "
                "seed and may flag too many or too few pairs",
                DRIFT_SAMPLE,
                median,
                ref[0],
                ref[2],
                self.delta,
            )

    def _clean(self, out: list[Embedded | Outcome | None], images: dict[int, Image.Image]) -> None:
        delta = self.delta
        if delta is not None:
            bad = [
                i
                for i, r in enumerate(out)
                if isinstance(r, Embedded) and r.alignment is not None and r.alignment < delta
            ]
            if self.recaption:
                self._decode_for_recaption(bad, out, images)
            fixable = [i for i in bad if self.recaption and i in images]
            if fixable and self.captioner is not None and self.encoder is not None:
                captions = self.captioner.caption([images[i] for i in fixable])
                txt = self.encoder.encode_texts(captions)
                for row, i in enumerate(fixable):
                    e = out[i]
                    assert isinstance(e, Embedded)
                    a2 = round(float(np.dot(e.vectors["image"], txt[row])), 9)
                    if a2 >= delta:
                        e.original_text, e.text = e.text, captions[row]
                        e.original_alignment, e.alignment = e.alignment, a2
                        e.vectors["text"] = np.ascontiguousarray(txt[row], dtype=np.float32)
                        e.fix = "recaptioned"
                    else:
                        e.extra["recaption"] = (captions[row], a2)
            for i in bad:
                e = out[i]
                assert isinstance(e, Embedded)
                if e.fix is None:
                    tried = e.extra.get("recaption")
                    detail = f"alignment {e.alignment:.4f} < delta {delta:.4f}"
                    if tried:
                        detail += f"; recaption {tried[0]!r} aligned {tried[1]:.4f}"
                    out[i] = Outcome.rejected(e, "misaligned", detail)
        if self.zero_shot:
            self._zero_shot(out)

    def _decode_for_recaption(
        self, bad: list[int], out: list[Embedded | Outcome | None], images: dict[int, Image.Image]
    ) -> None:
        """On the device path nothing was decoded on the CPU: decode the flagged few here."""
        for i in bad:
            e = out[i]
            if i not in images and isinstance(e, Embedded) and e.image is not None:
                res = self._decode_bytes(e.image)
                if isinstance(res, Image.Image):
                    images[i] = res

    def _zero_shot(self, out: list[Embedded | Outcome | None]) -> None:
        classes = self.settings.clean.classes or []
        if self._prompts is None:
            assert self.encoder is not None
            prompts = [self.settings.clean.prompt.format(label=c) for c in classes]
            self._prompts = (list(classes), self.encoder.encode_texts(prompts))
        names, mat = self._prompts
        space = "image" if self.spaces and "image" in self.spaces else "text"
        margin = self.settings.clean.zero_shot_margin
        for i, r in enumerate(out):
            if not isinstance(r, Embedded) or r.label is None:
                continue
            if r.label not in names:
                out[i] = Outcome.rejected(
                    r, "label_noise", f"label {r.label!r} is not one of clean.classes"
                )
                continue
            scores = mat @ r.vectors[space]
            own = names.index(r.label)
            best = int(np.argmax(scores))
            if best != own and float(scores[best] - scores[own]) > margin:
                r.original_label, r.label = r.label, names[best]
                r.fix = r.fix or "zero_shot_relabel"


class Curator:
    """Embed → clean → select for one partition: the whole algorithm on a stream of samples."""

    def __init__(
        self,
        settings: Settings,
        encoder: EncoderLike | None,
        captioner: CaptionerLike | None = None,
    ) -> None:
        self.settings = settings
        dims = configured_dims(settings)  # precomputed vectors: as the Kafka embed stage
        self.embed = EmbedStage(
            settings, encoder, captioner, spaces=tuple(dims) if dims else None, dims=dims
        )
        self.stats: SeedStats | None = None
        self.thresholds: Thresholds | None = None
        self.state: PartitionState | None = None
        self.selector: Selector | None = None
        self.times = self.embed.times
        self.seed_rejected: list[Outcome] = []
        self.seed_items: list[Embedded] = []

    def seed(self, samples: Sequence[Sample | Malformed]) -> SeedStats:
        """Embed the seed set, calibrate thresholds and bootstrap the index with it."""
        results = []
        bs = self.settings.select.batch_size
        for lo in range(0, len(samples), bs):
            results.extend(self.embed.process(samples[lo : lo + bs], clean=False))
        good = [r for r in results if isinstance(r, Embedded)]
        self.seed_rejected = [r for r in results if isinstance(r, Outcome)]
        if not good:
            raise DataError("the seed set has no valid sample")
        spaces = self.embed.spaces or ()
        self.stats = seed_stats(
            good, spaces, self.settings.select.k, self.settings.clean.neighbour_k
        )
        self.stats.copy_distances = self._augmented_distances(samples, good)
        self._setup(self.stats)
        assert self.state is not None
        seen: set[str] = set()
        uniq = []
        for g in good:
            if g.id not in seen:
                seen.add(g.id)
                uniq.append(g)
        self.seed_items = uniq
        for lo in range(0, len(uniq), 4096):
            chunk = uniq[lo : lo + 4096]
            self.state.add(
                [g.id for g in chunk],
                {s: np.stack([g.vectors[s] for g in chunk]) for s in spaces},
                [g.label for g in chunk],
            )
        return self.stats

    def _augmented_distances(
        self, samples: Sequence[Sample | Malformed], good: Sequence[Embedded]
    ) -> list[float]:
        """Image-space distances from seed images to their augmented copies (re-encoded,
        resized, cropped, colour-shifted): what ε must catch. Empty without an image tower."""
        from infogrowth.augment import AUGMENT_ITEMS, augmented_copies

        spaces = self.embed.spaces or ()
        if self.embed.encoder is None or "image" not in spaces:
            return []
        vec = {e.id: e.vectors["image"] for e in good}
        jobs = [(i, s) for i, s in enumerate(samples) if isinstance(s, Sample) and s.image]
        jobs = [(i, s) for i, s in jobs if s.id in vec][:AUGMENT_ITEMS]
        images, origin = [], []
        for (_, s), img in zip(jobs, self.embed._map(self.embed._decode, jobs), strict=True):
            if isinstance(img, Image.Image):
                copies = augmented_copies(img)
                images.extend(copies)
                origin.extend([s.id] * len(copies))
        if not images:
            return []
        emb = self.embed._encode_images(images)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        ref = np.stack([vec[sid] for sid in origin]).astype(np.float64)
        d = 1.0 - np.einsum("ij,ij->i", ref, emb.astype(np.float64))
        return [round(float(x), 9) for x in d]

    def _setup(self, stats: SeedStats | None) -> None:
        spaces = self.embed.spaces
        dims = self.embed.dims
        assert spaces is not None and dims is not None
        self.thresholds = resolve_thresholds(self.settings, spaces, stats)
        self.embed.use(self.thresholds)
        self.state = PartitionState.empty(spaces, dims, self.settings.index)
        fixer = self.settings.clean.fixer
        self.selector = Selector(
            self.state,
            self.thresholds,
            self.settings.select,
            self.settings.clean,
            neighbour_fixer=fixer in ("auto", "neighbours"),
        )

    def process(self, items: Sequence[Sample | Malformed]) -> list[Outcome]:
        """Decide a batch; one outcome per item, in input order."""
        embedded = self.embed.process(items)
        if self.selector is None:
            if self.embed.spaces is None:  # nothing valid seen yet
                return [r for r in embedded if isinstance(r, Outcome)]
            self._setup(None)
        assert self.selector is not None
        t0 = time.perf_counter()
        batch = [r for r in embedded if isinstance(r, Embedded)]
        verdicts = iter(self.selector.decide(batch))
        out = [
            Outcome.from_verdict(next(verdicts)) if isinstance(r, Embedded) else r for r in embedded
        ]
        self.times.add("select", time.perf_counter() - t0, len(batch))
        return out

    def report_thresholds(self) -> dict[str, Any]:
        return thresholds_record(self.thresholds) if self.thresholds else {}

    def report_online(self) -> dict[str, Any]:
        """Realised keep rate, keep scale and online ε of the run so far."""
        if self.state is None:
            return {}
        o = self.state.online
        return {
            "seen": o.seen,
            "kept": o.kept,
            "keep_rate": round(o.keep_rate, 4) if o.keep_rate is not None else None,
            "keep_scale": o.scale,
            "epsilon": {s: e.epsilon for s, e in sorted(o.eps.items())} or None,
        }

    def report_calibration(self) -> dict[str, Any]:
        """What the seed calibration measured, and what it switched off."""
        stats = self.stats
        if stats is None:
            return {"seed": False, "notes": ["no seed: ε follows the stream; no label vote"]}
        vote = stats.vote.as_record() if stats.vote else None
        notes = [n for n in (vote or {}).get("note", "").split("; ") if n]
        return {
            "seed": True,
            "items": stats.count,
            "duplicates_left_out": stats.duplicates,
            "mismatched_pairs": len(stats.mismatched),
            "vote": vote,
            "notes": notes,
        }


@dataclass
class _StagedTexts:
    """A call's texts being tokenised ahead (:meth:`EmbedStage._stage_texts`)."""

    positions: list[int]
    batch_size: int
    """The encoder's batch size at submission; batch sizes only shrink (CUDA OOM), so an
    unchanged one means the staged chunks are the ones ``encode_texts`` would make now."""
    future: Future[Any]
    encoder: StagedTextEncoder

    def result(self, positions: list[int]) -> Any:
        """The staged batches if they still fit what is to be embedded, else None."""
        try:
            staged = self.future.result()
        except Exception:  # the plain path tokenises again and reports the error per item
            return None
        if positions != self.positions or self.encoder.batch_size != self.batch_size:
            return None
        return staged


def _is_cuda_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or a RuntimeError saying the same (older torch, cuDNN)."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _join(slices: list[Any], pinned: bool) -> dict[str, Any] | None:
    """Concatenate preprocessed slices along the batch; ``None`` if their shapes differ."""
    if len(slices) == 1 and not pinned:
        return dict(slices[0])
    import torch

    keys = list(slices[0])
    if any(list(sl) != keys for sl in slices):
        return None
    out: dict[str, Any] = {}
    for key in keys:
        parts = [sl[key] for sl in slices]
        if not all(isinstance(p, torch.Tensor) for p in parts):
            return None
        if any(p.shape[1:] != parts[0].shape[1:] or p.dtype != parts[0].dtype for p in parts):
            return None
        shape = (sum(int(p.shape[0]) for p in parts), *parts[0].shape[1:])
        buf = torch.empty(shape, dtype=parts[0].dtype, pin_memory=pinned)
        torch.cat(parts, dim=0, out=buf)
        out[key] = buf
    return out
