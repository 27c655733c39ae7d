"""Samples from tables: Parquet files (img2dataset's layout), folders of them, Hugging Face
``save_to_disk`` folders (Arrow), and clip-retrieval embedding folders (``img_emb/*.npy``,
``text_emb/*.npy`` beside ``metadata/*.parquet``) whose vectors become precomputed embeddings.

Columns are found by name (:class:`~infogrowth.config.ColumnsConfig`); other scalar columns go
into ``meta``. A table that cannot be read yields one malformed record naming it, like a corrupt
tar shard; a configured column that is missing is a configuration error naming the key.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from infogrowth.config import ColumnsConfig, LimitsConfig, StorageConfig
from infogrowth.errors import ConfigError, DataError
from infogrowth.locations import (
    Location,
    base_name,
    exists,
    find,
    join,
    open_seekable,
    open_stream,
)
from infogrowth.schema import Malformed, Sample, sample_from_obj

log = logging.getLogger(__name__)

CANDIDATES: dict[str, tuple[str, ...]] = {
    "id": ("id", "key", "image_path"),
    "text": ("text", "caption"),
    "image": ("image", "jpg", "jpeg", "png", "webp"),
    "image_uri": ("image_uri", "url"),
    "label": ("label",),
}
ROLES = tuple(CANDIDATES)
ROWS_PER_BATCH = 256
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
ImageLoader = Callable[[str], bytes]


@dataclass(frozen=True)
class ColumnMap:
    """Which column plays which role in one table (``None``: absent)."""

    id: str | None
    text: str | None
    image: str | None
    image_uri: str | None
    label: str | None
    embedding: dict[str, str]
    label_names: list[str] | None = None

    def used(self) -> set[str]:
        roles = (self.id, self.text, self.image, self.image_uri, self.label)
        return {c for c in roles if c} | set(self.embedding.values())


def resolve_columns(
    names: list[str],
    cfg: ColumnsConfig,
    where: str,
    *,
    vectors: tuple[str, ...] = (),
    label_names: list[str] | None = None,
) -> ColumnMap:
    """Map roles to the columns of a table; ConfigError names the key of a missing column.

    ``vectors``: spaces whose embeddings come from elsewhere (clip-retrieval ``.npy`` files)."""
    present = set(names)
    found: dict[str, str | None] = {}
    for role in ROLES:
        configured = getattr(cfg, role)
        if configured is not None:
            if configured not in present:
                raise ConfigError(
                    f"inputs.columns.{role} (--{role.replace('_', '-')}-col): no column "
                    f"{configured!r} in {where} (columns: {', '.join(names)})"
                )
            found[role] = configured
        else:
            found[role] = next((c for c in CANDIDATES[role] if c in present), None)
    for space, col in cfg.embedding.items():
        if col not in present:
            raise ConfigError(
                f"inputs.columns.embedding.{space} (--embedding-col {space}={col}): no column "
                f"{col!r} in {where} (columns: {', '.join(names)})"
            )
    if not (found["text"] or found["image"] or found["image_uri"] or cfg.embedding or vectors):
        raise ConfigError(
            f"inputs.columns: {where} has no text, image, image_uri or embedding column "
            f"(columns: {', '.join(names)}); name them with --text-col, --image-col ..."
        )
    return ColumnMap(
        id=found["id"],
        text=found["text"],
        image=found["image"],
        image_uri=found["image_uri"],
        label=found["label"],
        embedding=dict(cfg.embedding),
        label_names=label_names,
    )


def row_object(
    row: dict[str, Any], cols: ColumnMap, fallback_id: str, vectors: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ingest object of one table row (``vectors``: precomputed rows from elsewhere)."""
    obj: dict[str, Any] = {"id": fallback_id}
    if cols.id is not None and row.get(cols.id) is not None:
        obj["id"] = str(row[cols.id])
    if cols.text is not None and row.get(cols.text) is not None:
        obj["text"] = row[cols.text]
    if cols.image_uri is not None and row.get(cols.image_uri) is not None:
        obj["image_uri"] = row[cols.image_uri]
    image = row.get(cols.image) if cols.image is not None else None
    if isinstance(image, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, str) and _SCHEME.match(image):
        obj.setdefault("image_uri", image)
    elif image is not None:
        obj["image"] = image
    label = row.get(cols.label) if cols.label is not None else None
    if label is not None:
        names = cols.label_names
        if names is not None and isinstance(label, int) and 0 <= label < len(names):
            label = names[label]
        obj["label"] = label
    emb = {s: row[c] for s, c in cols.embedding.items() if row.get(c) is not None}
    emb.update(vectors or {})
    if emb:
        obj["embedding"] = {s: [float(x) for x in v] for s, v in emb.items()}
    meta = {k: v for k, v in row.items() if k not in cols.used() and _scalar(v)}
    if meta:
        obj["meta"] = meta
    return obj


def _scalar(v: Any) -> bool:
    return isinstance(v, str | int | float | bool)


def _rows(
    batches: Iterator[Any],
    cols: ColumnMap,
    name: str,
    start: int,
    limits: LimitsConfig,
    loader: ImageLoader | None,
    vectors: dict[str, np.ndarray] | None = None,
    id_prefix: str | None = None,
) -> Iterator[Sample | Malformed]:
    """Samples of record batches; rows are numbered from ``start``. Without an id column a
    row's id is ``PREFIX:ROW`` (default prefix: the file name without its extension)."""
    stem = id_prefix or name.rsplit(".", 1)[0]
    index = start
    for batch in batches:
        for row in batch.to_pylist():
            source: dict[str, str | int] = {"file": name, "row": index}
            try:
                vecs = {s: v[index - start] for s, v in (vectors or {}).items()}
                obj = row_object(row, cols, f"{stem}:{index}", vecs)
                payload = msgpack.packb(obj, use_bin_type=True, default=str)
            except (IndexError, TypeError, ValueError) as exc:
                sid = row.get(cols.id) if cols.id else None
                yield Malformed(None if sid is None else str(sid), f"row: {exc}", b"", source)
            else:
                yield sample_from_obj(obj, payload, limits, image_loader=loader, source=source)
            index += 1


def _corrupt(name: str, exc: BaseException) -> Malformed:
    return Malformed(
        None, f"unreadable table {name}: {type(exc).__name__}: {exc}", b"", {"file": name}
    )


def read_parquet(
    loc: Location,
    limits: LimitsConfig,
    columns: ColumnsConfig,
    storage: StorageConfig | None,
    loader: ImageLoader | None,
    name: str | None = None,
) -> Iterator[Sample | Malformed]:
    """One Parquet file, row groups streamed (img2dataset: ``key``, ``caption``, ``url``,
    ``jpg``...). ``name`` is the file's name in sources and ids without an id column (default:
    its base name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = name or base_name(loc)
    try:
        with open_seekable(loc, storage) as fh:
            pf = pq.ParquetFile(fh)
            cols = resolve_columns(pf.schema_arrow.names, columns, name)
            yield from _rows(pf.iter_batches(ROWS_PER_BATCH), cols, name, 0, limits, loader)
    except (pa.ArrowException, OSError) as exc:
        yield _corrupt(name, exc)


def _hf_label_names(info: dict[str, Any], column: str | None) -> list[str] | None:
    feature = (info.get("features") or {}).get(column or "label") or {}
    names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    return list(names) if isinstance(names, list) else None


def _read_json(loc: Location, storage: StorageConfig | None) -> Any:
    with open_stream(loc, storage) as fh:
        return json.loads(fh.read())


def read_hf_dataset(
    folder: Location,
    limits: LimitsConfig,
    columns: ColumnsConfig,
    storage: StorageConfig | None,
    loader: ImageLoader | None,
) -> Iterator[Sample | Malformed]:
    """A ``Dataset.save_to_disk`` folder (``state.json``, ``dataset_info.json``, Arrow files),
    or a ``DatasetDict`` one (``dataset_dict.json`` and a folder per split, in its order)."""
    if exists(join(folder, "dataset_dict.json"), storage):
        splits = _read_json(join(folder, "dataset_dict.json"), storage).get("splits", [])
        for split in splits:
            yield from read_hf_dataset(join(folder, split), limits, columns, storage, loader)
        return
    import pyarrow as pa

    state = _read_json(join(folder, "state.json"), storage)
    info = _read_json(join(folder, "dataset_info.json"), storage)
    label_names = _hf_label_names(info, columns.label)
    start = 0
    for entry in state.get("_data_files", []):
        arrow = join(folder, str(entry["filename"]))
        name = f"{base_name(folder)}/{base_name(arrow)}"
        try:
            with open_seekable(arrow, storage) as fh:
                reader = _open_arrow(fh)
                cols = resolve_columns(reader.schema.names, columns, name, label_names=label_names)
                prefix = base_name(folder)
                rows = _rows(iter(reader), cols, name, start, limits, loader, id_prefix=prefix)
                for item in rows:
                    start += 1
                    yield item
        except (pa.ArrowException, OSError) as exc:
            yield _corrupt(name, exc)
            return


def _open_arrow(fh: Any) -> Any:
    """Hugging Face writes the Arrow streaming format; the file format is read too."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(fh)
    except pa.ArrowInvalid:
        fh.seek(0)
        return pa.ipc.open_file(fh)


def _npy(loc: Location, storage: StorageConfig | None) -> np.ndarray:
    with open_seekable(loc, storage) as fh:
        arr: np.ndarray = np.asarray(np.load(fh, allow_pickle=False))
    if arr.ndim != 2:
        raise DataError(f"{base_name(loc)}: expected a 2-d array, got shape {arr.shape}")
    return arr


def read_clip_retrieval(
    folder: Location,
    limits: LimitsConfig,
    columns: ColumnsConfig,
    storage: StorageConfig | None,
    loader: ImageLoader | None,
) -> Iterator[Sample | Malformed]:
    """``metadata/metadata_N.parquet`` rows paired with row i of ``img_emb/img_emb_N.npy``
    and ``text_emb/text_emb_N.npy`` (as clip-retrieval's inference writes them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for meta in find(join(folder, "metadata"), ".parquet", storage):
        name = base_name(meta)
        shard = name[len("metadata") :].rsplit(".", 1)[0]  # "_0"
        try:
            vectors: dict[str, np.ndarray] = {}
            for space, sub in (("image", "img_emb"), ("text", "text_emb")):
                npy = join(join(folder, sub), f"{sub}{shard}.npy")
                if exists(npy, storage):
                    vectors[space] = _npy(npy, storage)
            if not vectors:
                raise DataError(f"no img_emb{shard}.npy or text_emb{shard}.npy beside {name}")
            with open_seekable(meta, storage) as fh:
                pf = pq.ParquetFile(fh)
                rows = pf.metadata.num_rows
                for space, arr in vectors.items():
                    if arr.shape[0] != rows:
                        raise DataError(
                            f"{space} vectors: {arr.shape[0]} rows for {rows} metadata rows"
                        )
                cols = resolve_columns(pf.schema_arrow.names, columns, name, vectors=tuple(vectors))
                batches = pf.iter_batches(ROWS_PER_BATCH)
                yield from _rows(batches, cols, name, 0, limits, loader, vectors)
        except (pa.ArrowException, OSError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            yield _corrupt(name, exc)


def table_kind(folder: Location, storage: StorageConfig | None) -> str:
    """``hf`` (save_to_disk), ``clip-retrieval`` or ``parquet`` (a folder of Parquet files)."""
    if exists(join(folder, "dataset_dict.json"), storage) or exists(
        join(folder, "state.json"), storage
    ):
        return "hf"
    if exists(join(folder, "metadata"), storage) and (
        exists(join(folder, "img_emb"), storage) or exists(join(folder, "text_emb"), storage)
    ):
        return "clip-retrieval"
    return "parquet"


def read_folder(
    folder: Location,
    limits: LimitsConfig,
    columns: ColumnsConfig,
    storage: StorageConfig | None,
    loader: ImageLoader | None,
) -> Iterator[Sample | Malformed]:
    """Samples of a folder input, by what it holds."""
    kind = table_kind(folder, storage)
    if kind == "hf":
        yield from read_hf_dataset(folder, limits, columns, storage, loader)
        return
    if kind == "clip-retrieval":
        yield from read_clip_retrieval(folder, limits, columns, storage, loader)
        return
    files = find(folder, ".parquet", storage)
    if not files:
        raise FileNotFoundError(f"no Parquet files, Hugging Face dataset or embeddings in {folder}")
    root = str(folder).rstrip("/") + "/"
    for f in files:  # named from the folder: train/part-0 and val/part-0 are different files
        rel = str(f)[len(root) :] if str(f).startswith(root) else base_name(f)
        yield from read_parquet(f, limits, columns, storage, loader, name=rel)


def count_rows(loc: Location, storage: StorageConfig | None) -> int | None:
    """Rows of a Parquet file from its footer (for the progress bar); None if unreadable."""
    import pyarrow.parquet as pq

    try:
        with open_seekable(loc, storage) as fh:
            return int(pq.ParquetFile(fh).metadata.num_rows)
    except Exception:
        return None
