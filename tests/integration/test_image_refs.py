"""Image references on a real broker: ``image_uri`` records produced from an img2dataset-style
Parquet file, fetched by the embed stage from a local HTTP server, with
``outputs_include_image: reference``. Records stay small whatever the image size; a URI outside
``limits.image_uri_allow`` is rejected/malformed and never requested."""

from __future__ import annotations

import io
from pathlib import Path

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from infogrowth.kafka.admin import admin_config, ensure_topics, topic_specs
from infogrowth.kafka.reader import read_topic
from infogrowth.kafka.tools import produce
from tests.fixtures.models import make_jpeg, tiny_clip
from tests.fixtures.servers import http_files
from tests.integration.conftest import settings_from, write_config
from tests.integration.test_pipeline import _drain_and_audit

pytestmark = pytest.mark.integration

RECORD_LIMIT = 4096
N = 24


def noisy_jpeg(seed: int, w: int = 640, h: int = 480) -> bytes:
    """A JPEG of random pixels: hundreds of KB, far above any record limit here."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_image_uri_end_to_end_in_reference_mode(kafka_bootstrap: str, tmp_path: Path) -> None:
    images = {f"/img/{i}.jpg": noisy_jpeg(i) for i in range(N)}
    assert min(len(b) for b in images.values()) > 16 * RECORD_LIMIT
    clip = tiny_clip(tmp_path / "clip")
    with http_files({**images, "/private/secret.jpg": make_jpeg(64, 64)}) as srv:
        rows = [
            {"key": f"k{i}", "caption": f"photo number {i}", "url": f"{srv.url}/img/{i}.jpg"}
            for i in range(N)
        ]
        rows.append({"key": "refused", "caption": "x", "url": f"{srv.url}/private/secret.jpg"})
        rows.append({"key": "gone", "caption": "y", "url": f"{srv.url}/img/missing.jpg"})
        table = tmp_path / "refs.parquet"
        pq.write_table(pa.Table.from_pylist(rows), table)
        cfg = write_config(
            tmp_path / "c.yaml",
            kafka_bootstrap,
            tmp_path / "state",
            **{
                "encoder.kind": "dual",
                "encoder.model": str(clip),
                "outputs_include_image": "reference",
                "limits.image_uri_allow": [f"{srv.url}/img/"],
                "limits.image_fetch_concurrency": 4,
            },
        )
        settings = settings_from(cfg)
        report = ensure_topics(
            admin_config(settings), topic_specs(settings.kafka.topics, settings.limits)
        )
        assert report.ok_all, report.mismatches
        n = produce(settings, [table])
        assert n == len(rows)
        _rt, result = _drain_and_audit(settings, n)
        assert "/private/secret.jpg" not in srv.paths_requested()
        assert ("GET", "/img/3.jpg") in srv.requests

    t = settings.kafka.topics
    records = {}
    for topic in (t.ingest, t.embedded, t.accepted, t.relabeled, t.rejected):
        for m in read_topic(settings, topic):
            assert len(m.value()) < RECORD_LIMIT, (topic, len(m.value()))
            rec = msgpack.unpackb(m.value(), raw=False)
            assert rec.get("image") is None, topic
            if topic not in (t.ingest, t.embedded):
                records[rec["id"]] = rec
    assert set(records) == {r["key"] for r in rows}
    for sid in ("refused", "gone"):
        assert (records[sid]["decision"], records[sid]["reason"]) == ("rejected", "malformed")
    assert "image_uri_allow" in records["refused"]["detail"]
    for i in range(N):
        rec = records[f"k{i}"]
        assert rec["reason"] != "malformed", rec
        assert rec["image_uri"] == f"{srv.url}/img/{i}.jpg"
        assert rec["alignment"] is not None
    assert result.reasons["rejected/malformed"] == 2
