"""Memory flood on the real process: decompression-heavy PNGs within the limits and large
``meta``, embedded by a (tiny, random) CLIP model. The process's peak RSS must stay under a
budget and every message must get exactly one output (issue 13, "memory flood").

Each heavy PNG is ~100 KB on the wire and 6,000 x 6,000 RGB decoded (108 MB): a batch holding
its decoded images at full size would need gigabytes. Downscaling right after decoding and the
per-batch pixel and byte budgets keep the process small. Not part of ``infogrowth chaos``: the
model is built by the test fixtures, which the package does not ship.
"""

from __future__ import annotations

import io
import os
import random
import signal
import threading
import time
import uuid
from pathlib import Path

import msgpack
import pytest
from PIL import Image

from infogrowth.config import load_settings
from infogrowth.kafka.admin import admin_config, ensure_topics, topic_specs
from infogrowth.kafka.tools import audit
from infogrowth_dev.chaos import Proc, _produce_raw, write_config
from tests.fixtures.models import make_png, tiny_clip

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1200)]

RSS_BUDGET_BYTES = int(os.environ.get("INFOGROWTH_CHAOS_RSS_BUDGET_MB", "1536")) * 2**20
"""Peak resident memory allowed to the ``infogrowth run`` process (torch included)."""
HEAVY = 40
BIG_META = 40
OVER_META = 10
NORMAL = 110


def _heavy_png(i: int) -> bytes:
    """6,000 x 6,000 RGB (36 Mpx, under ``limits.max_image_pixels``) that compresses to
    ~100 KB: flat colour, a few lines so it is not a single run."""
    img = Image.new("RGB", (6000, 6000), (i * 37 % 256, i * 91 % 256, 120))
    for y in range(0, 6000, 500):
        img.paste((255 - i % 256, 10, 10), (0, y, 6000, y + 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _meta(size: int, i: int) -> dict[str, object]:
    """A ``meta`` of about ``size`` bytes of strings, nested a few levels."""
    chunk = max(1, size // 8)
    return {"a": {"b": {"c": ["x" * chunk] * 4}}, "d": ["y" * chunk] * 4, "i": i}


def _stream() -> tuple[list[bytes], int]:
    """(messages, how many are expected as rejected/malformed)."""
    msgs: list[bytes] = []
    for i in range(HEAVY):
        msgs.append(msgpack.packb({"id": f"heavy{i}", "image": _heavy_png(i), "text": f"h {i}"}))
    small = make_png(40, 30, seed=99)  # the dual encoder needs an image in every sample
    for i in range(BIG_META):  # just under limits.max_meta_bytes (64 KiB)
        meta = _meta(60_000, i)
        rec = {"id": f"meta{i}", "image": small, "text": f"meta {i}", "meta": meta}
        msgs.append(msgpack.packb(rec))
    for i in range(OVER_META):  # over it: rejected/malformed, not held
        meta = _meta(80_000, i)
        rec = {"id": f"over{i}", "image": small, "text": f"over {i}", "meta": meta}
        msgs.append(msgpack.packb(rec))
    for i in range(NORMAL):
        png = make_png(64 + i % 32, 48 + i % 16, seed=i)
        msgs.append(msgpack.packb({"id": f"n{i}", "image": png, "text": f"normal {i}"}))
    rng = random.Random(5)
    rng.shuffle(msgs)
    return msgs, OVER_META


def _peak_rss(pid: int, stop: threading.Event, out: list[int]) -> None:
    """Poll ``VmHWM`` (the kernel's own peak RSS) until the process is gone."""
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out.append(int(line.split()[1]) * 1024)
        except OSError:
            return
        time.sleep(0.05)


def test_memory_flood_stays_under_the_rss_budget(kafka_bootstrap: str, tmp_path: Path) -> None:
    model = tiny_clip(tmp_path / "clip")
    cfg = write_config(
        tmp_path / "c.yaml",
        kafka_bootstrap,
        tmp_path / "state",
        uuid.uuid4().hex[:6],
        "i0",
        **{
            "encoder.model": str(model),
            "encoder.device": "cpu",
            "clean.enabled": False,
            "select.keep_fraction": None,
            "limits.max_message_bytes": 16 * 2**20,
        },
    )
    settings = load_settings(cfg)
    report = ensure_topics(
        admin_config(settings), topic_specs(settings.kafka.topics, settings.limits)
    )
    assert report.ok_all, report.mismatches
    stream, malformed = _stream()
    assert max(len(m) for m in stream) < 1_000_000  # small on the wire
    _produce_raw(settings, stream, settings.kafka.topics.ingest)

    proc = Proc(cfg, tmp_path / "run.log")
    proc.start("--exit-when-idle", "5")
    assert proc.p is not None
    peaks: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_peak_rss, args=(proc.p.pid, stop, peaks))
    watcher.start()
    try:
        code = proc.wait(900)
    finally:
        stop.set()
        watcher.join()
        proc.signal(signal.SIGKILL)
    assert code == 0, proc.tail()
    peak = max(peaks)
    print(
        f"peak RSS {peak / 2**20:.0f} MiB for {len(stream)} messages (budget "
        f"{RSS_BUDGET_BYTES / 2**20:.0f} MiB)"
    )
    assert peak < RSS_BUDGET_BYTES, f"peak RSS {peak / 2**20:.0f} MiB"

    result = audit(settings)
    assert result.ingest == len(stream)
    assert not result.missing and not result.duplicated and not result.unexpected
    assert result.reasons["rejected/malformed"] == malformed, result.reasons
