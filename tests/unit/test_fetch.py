"""Image references: the allow-list, fetching over HTTP, S3 (moto) and local files, and the
embed stage's fetch step (a refused or failed fetch is malformed and fetches nothing)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from infogrowth.errors import ConfigError
from infogrowth.fetch import FetchError, ImageFetcher, parse_allow_entry, parse_reference
from infogrowth.messages import Outcome
from infogrowth.pipeline import EmbedStage
from infogrowth.schema import Embedded, Sample
from tests.fixtures.helpers import make_settings
from tests.fixtures.models import make_jpeg, tiny_clip
from tests.fixtures.servers import http_files, moto_s3, s3_options


def fetcher(allow: list[str], **extra: Any) -> ImageFetcher:
    s = make_settings(**{"limits.image_uri_allow": allow, **extra})
    return ImageFetcher(s.limits, s.storage)


# -- the allow-list ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "uri", "allowed"),
    [
        ("https://", "https://any.example/x.jpg", True),
        ("https://", "http://any.example/x.jpg", False),
        ("https://img.example/cdn/", "https://img.example/cdn/a/b.jpg", True),
        ("https://img.example/cdn", "https://img.example/cdn/a.jpg", True),
        ("https://img.example/cdn", "https://img.example/cdnx/a.jpg", False),
        ("https://img.example/cdn/", "https://IMG.example/cdn/a.jpg", True),
        ("https://img.example/", "https://img.example.evil/a.jpg", False),
        ("https://img.example/", "https://img.example:8443/a.jpg", False),
        ("s3://bucket/images/", "s3://bucket/images/1.jpg", True),
        ("s3://bucket/images/", "s3://bucket2/images/1.jpg", False),
        ("s3://bucket/images/", "s3://bucket/other/1.jpg", False),
        ("s3://", "s3://whatever/k.jpg", True),
    ],
)
def test_allow_list_covers_scheme_host_and_path_prefix(entry: str, uri: str, allowed: bool) -> None:
    assert parse_allow_entry(entry).covers(parse_reference(uri)) is allowed


@pytest.mark.parametrize(
    "uri",
    [
        "https://img.example/cdn/../admin",  # dot segments would leave the prefix after normalising
        "https://img.example/cdn/%2e%2e/admin",
        "https://img.example@evil.example/cdn/a.jpg",  # userinfo
        "https://img.example/cdn/a.jpg?x=1",
        "relative/path.jpg",
        "ftp://img.example/cdn/a.jpg",
        "https://img.example/cdn\\a.jpg",
    ],
)
def test_references_that_could_escape_a_prefix_are_refused(uri: str) -> None:
    f = fetcher(["https://img.example/cdn/"])
    with pytest.raises(FetchError):
        f.check(uri)


@pytest.mark.parametrize("entry", ["gopher://x/", "https://u:p@host/", "/data/../etc/", "s3:///x/"])
def test_bad_allow_list_entry_fails_at_start_naming_the_key(entry: str) -> None:
    with pytest.raises(ConfigError, match=r"limits\.image_uri_allow"):
        make_settings(**{"limits.image_uri_allow": [entry]})


def test_empty_allow_list_refuses_everything() -> None:
    with pytest.raises(FetchError, match="image_uri_allow is empty"):
        fetcher([]).check("https://img.example/a.jpg")


# -- local files ------------------------------------------------------------------------------


def test_local_files_stay_under_an_allowed_prefix(tmp_path: Path) -> None:
    allowed = tmp_path / "imgs"
    allowed.mkdir()
    (allowed / "a.jpg").write_bytes(b"jpeg-a")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"password")
    os.symlink(secret, allowed / "link.jpg")  # a symlink inside that points outside
    os.mkfifo(allowed / "fifo.jpg")
    f = fetcher([f"file://{allowed}/"])
    assert f.fetch(f"file://{allowed}/a.jpg") == b"jpeg-a"
    assert f.fetch(str(allowed / "a.jpg")) == b"jpeg-a"  # an absolute path is a file:// one
    for bad in (str(secret), str(allowed / "link.jpg"), f"{allowed}/../secret.txt"):
        with pytest.raises(FetchError):
            f.fetch(bad)
    with pytest.raises(FetchError, match="regular file"):
        f.fetch(str(allowed / "fifo.jpg"))
    with pytest.raises(FetchError, match="over the limit"):
        fetcher([str(allowed)], **{"limits.max_image_bytes": 3}).fetch(str(allowed / "a.jpg"))


# -- HTTP ---------------------------------------------------------------------------------------


def test_http_fetch_with_size_limit_redirects_and_timeout() -> None:
    files = {"/img/a.jpg": b"a" * 100, "/img/big.jpg": b"b" * 5000, "/private/x": b"secret"}
    with http_files(files) as srv:
        srv.redirects["/img/moved.jpg"] = f"{srv.url}/private/x"
        srv.slow["/img/slow.jpg"] = 6.0
        srv.files["/img/slow.jpg"] = b"s"
        f = fetcher(
            [f"{srv.url}/img/"],
            **{"limits.max_image_bytes": 1000, "limits.image_fetch_timeout_s": 2.0},
        )
        assert f.fetch(f"{srv.url}/img/a.jpg") == b"a" * 100

        with pytest.raises(FetchError, match="over the limit"):
            f.fetch(f"{srv.url}/img/big.jpg")
        assert ("GET", "/img/big.jpg") not in srv.requests  # refused from the header

        with pytest.raises(FetchError, match=r"(?i)not found"):
            f.fetch(f"{srv.url}/img/missing.jpg")

        with pytest.raises(FetchError, match="redirect"):
            f.fetch(f"{srv.url}/img/moved.jpg")
        with pytest.raises(FetchError, match="not fetched"):
            f.fetch(f"{srv.url}/private/x")
        assert "/private/x" not in srv.paths_requested()

        with pytest.raises(FetchError, match=r"Timeout|timed out"):
            f.fetch(f"{srv.url}/img/slow.jpg")


def test_submit_refuses_disallowed_references_without_a_request() -> None:
    with http_files({"/ok/a.jpg": b"a", "/no/b.jpg": b"b"}) as srv:
        f = fetcher([f"{srv.url}/ok/"])
        futures = f.submit([f"{srv.url}/no/b.jpg", f"{srv.url}/ok/a.jpg"])
        with pytest.raises(FetchError, match="not fetched"):
            f.result(futures[0], 5)
        assert f.result(futures[1], 5) == b"a"
        f.close()
        assert srv.paths_requested() == {"/ok/a.jpg"}


# -- S3 (moto's server) ---------------------------------------------------------------------------


def test_s3_fetch_through_moto() -> None:
    with moto_s3({"bkt": {"img/a.jpg": b"s3-bytes", "private/k": b"no"}}) as endpoint:
        f = fetcher(["s3://bkt/img/"], **{"storage.options": {"s3": s3_options(endpoint)}})
        assert f.fetch("s3://bkt/img/a.jpg") == b"s3-bytes"
        with pytest.raises(FetchError, match=r"(?i)not found"):
            f.fetch("s3://bkt/img/none.jpg")
        with pytest.raises(FetchError, match="not fetched"):
            f.fetch("s3://bkt/private/k")


def test_storage_secrets_are_masked_when_settings_are_printed() -> None:
    from infogrowth.config import redacted_settings

    s = make_settings(**{"storage.options": {"s3": {"key": "AKIAXYZ", "secret": "s3cr3t!"}}})
    shown = repr(s) + str(redacted_settings(s))
    assert "AKIAXYZ" not in shown and "s3cr3t!" not in shown


# -- the embed stage's fetch step --------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from infogrowth.encode import build_encoder

    path = tiny_clip(tmp_path_factory.mktemp("models") / "clip")
    settings = make_settings(**{"encoder.kind": "dual", "encoder.model": str(path)})
    return build_encoder(settings.encoder, settings.limits)


def test_embed_stage_fetches_references_and_rejects_refused_ones(clip: Any) -> None:
    images = {f"/img/{i}.jpg": make_jpeg(40, 40, seed=i) for i in range(6)}
    with http_files({**images, "/other/x.jpg": make_jpeg(40, 40, seed=9)}) as srv:
        settings = make_settings(
            **{
                "limits.image_uri_allow": [f"{srv.url}/img/"],
                "encoder.kind": "dual",
                "clean.enabled": False,
            }
        )
        stage = EmbedStage(settings, clip)
        inline = Sample(id="inline", text="a cat", image=images["/img/0.jpg"])
        refs = [
            Sample(id=f"r{i}", text="a cat", image_uri=f"{srv.url}/img/{i}.jpg") for i in range(6)
        ]
        bad = Sample(id="bad", text="a dog", image_uri=f"{srv.url}/other/x.jpg")
        gone = Sample(id="gone", text="a dog", image_uri=f"{srv.url}/img/none.jpg")
        out = stage.process([inline, *refs, bad, gone])
        stage.close()

        assert [r.id for r in out] == ["inline", *[s.id for s in refs], "bad", "gone"]
        for r in out[:7]:
            assert isinstance(r, Embedded), r
        assert out[1].image_uri == refs[0].image_uri and out[1].image == images["/img/0.jpg"]
        # the inline image and its fetched twin embed to the same vector
        assert float(out[0].vectors["image"] @ out[1].vectors["image"]) == pytest.approx(1.0)
        for r, why in ((out[7], "not fetched"), (out[8], "Not Found")):
            assert isinstance(r, Outcome)
            assert (r.decision, r.reason) == ("rejected", "malformed")
            assert why in (r.detail or "")
        assert "/other/x.jpg" not in srv.paths_requested()


def test_embed_stage_fetches_nothing_it_does_not_need(clip: Any) -> None:
    """Text-only model, or a precomputed image vector: the reference is only carried."""
    from infogrowth.encode import build_encoder, minilm_path

    with http_files({"/img/a.jpg": make_jpeg(40, 40)}) as srv:
        settings = make_settings(**{"limits.image_uri_allow": [f"{srv.url}/"]})
        uri = f"{srv.url}/img/a.jpg"
        stage = EmbedStage(settings, None)
        vec = [1.0, 0.0, 0.5]
        out = stage.process([Sample(id="p", image_uri=uri, embedding={"image": _arr(vec)})])
        assert isinstance(out[0], Embedded) and out[0].image is None and out[0].image_uri == uri
        mini = minilm_path()
        if mini is not None:
            enc_settings = make_settings(**{"encoder.kind": "text", "encoder.model": str(mini)})
            text = build_encoder(enc_settings.encoder, enc_settings.limits)
            stage = EmbedStage(settings, text)
            out = stage.process([Sample(id="t", text="hello", image_uri=uri)])
            assert isinstance(out[0], Embedded)
        assert srv.requests == []


def _arr(values: list[float]) -> Any:
    import numpy as np

    return np.asarray(values, dtype=np.float32)


class RecordingImageEncoder:
    """An image-only encoder that notes when each batch reaches it (batch size 2)."""

    spaces = ("image",)
    dims = {"image": 4}  # noqa: RUF012
    fingerprint = "recording"
    batch_size = 2

    def __init__(self) -> None:
        self.calls: list[float] = []

    def encode_images(self, images: Any) -> Any:
        import time

        import numpy as np

        self.calls.append(time.monotonic())
        return np.ones((len(images), 4), dtype=np.float32)

    def encode_texts(self, texts: Any) -> Any:  # pragma: no cover - no text tower
        raise AssertionError("no text tower")


def test_fetches_run_concurrently() -> None:
    """Four HEAD requests must be in flight together, or the server's barrier breaks."""
    import threading

    with http_files({f"/img/{i}.jpg": make_jpeg(20, 20, seed=i) for i in range(4)}) as srv:
        srv.barrier = threading.Barrier(4, timeout=10)
        settings = make_settings(
            **{"limits.image_uri_allow": [srv.url], "limits.image_fetch_concurrency": 4}
        )
        stage = EmbedStage(settings, RecordingImageEncoder())
        out = stage.process(
            [Sample(id=f"r{i}", image_uri=f"{srv.url}/img/{i}.jpg") for i in range(4)]
        )
        stage.close()
    assert all(isinstance(r, Embedded) for r in out), out


def test_fetching_overlaps_the_forward_pass() -> None:
    """The model embeds the first window while later images are still downloading."""
    images = {f"/img/{i}.jpg": make_jpeg(20, 20, seed=i) for i in range(6)}
    with http_files(images) as srv:
        for i in (4, 5):
            srv.slow[f"/img/{i}.jpg"] = 1.5
        settings = make_settings(**{"limits.image_uri_allow": [srv.url]})
        encoder = RecordingImageEncoder()
        stage = EmbedStage(settings, encoder)
        out = stage.process(
            [Sample(id=f"r{i}", image_uri=f"{srv.url}/img/{i}.jpg") for i in range(6)]
        )
        stage.close()
        slow_done = min(srv.answered["/img/4.jpg"], srv.answered["/img/5.jpg"])
    assert all(isinstance(r, Embedded) for r in out), out
    assert len(encoder.calls) == 3
    assert encoder.calls[0] < slow_done


def test_outputs_include_image_takes_reference_and_rejects_other_text() -> None:
    from infogrowth.messages import Outcome, output_record
    from infogrowth.select import Thresholds

    assert make_settings(outputs_include_image="reference").outputs_include_image == "reference"
    assert make_settings(outputs_include_image="false").outputs_include_image is False
    with pytest.raises(ConfigError, match="outputs_include_image"):
        make_settings(outputs_include_image="bytes")
    item = Embedded(id="a", vectors={}, image=b"img", image_uri="s3://b/a")
    o = Outcome(id="a", decision="accepted", reason=None, item=item)
    t = Thresholds(policy="all", k=4, epsilon={})
    carried = {
        mode: (rec["image"], rec["image_uri"])
        for mode in (True, "reference", False)
        for rec in [output_record(o, t, include_image=mode)]
    }
    assert carried == {
        True: (b"img", "s3://b/a"),
        "reference": (None, "s3://b/a"),
        False: (None, None),
    }
