from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infogrowth.imaging import ImageError, decode_image, load_image_field
from tests.fixtures.models import make_jpeg, make_png, make_png_header

MB = 1024 * 1024
LIMITS = {"max_bytes": 8 * MB, "max_pixels": 40_000_000}


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# ---- decode_image -------------------------------------------------------------------------------


def test_image_error_is_value_error() -> None:
    assert issubclass(ImageError, ValueError)


@pytest.mark.parametrize("data", [make_jpeg(40, 30, 1), make_png(40, 30, 1)])
def test_decodes_to_rgb_with_header_size(data: bytes) -> None:
    img = decode_image(data, **LIMITS)
    assert img.mode == "RGB"
    assert img.size == (40, 30)


def test_png_pixels_survive_round_trip() -> None:
    src = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), "RGB")
    img = decode_image(_encode(src, "PNG"), **LIMITS)
    assert np.array_equal(np.asarray(img), np.asarray(src))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16"])
def test_other_modes_become_rgb(mode: str) -> None:
    src = Image.open(io.BytesIO(make_png(16, 8, 2)))
    converted = src.convert(mode) if mode != "I;16" else _sixteen_bit(16, 8)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    img = decode_image(_encode(converted, fmt), **LIMITS)
    assert img.mode == "RGB"
    assert img.size == (16, 8)


def _sixteen_bit(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.full((h, w), 32768, dtype=np.uint16))


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    img = decode_image(_encode(_sixteen_bit(8, 8), "PNG"), **LIMITS)
    assert np.asarray(img)[0, 0].tolist() == [127, 127, 127]


def test_transparency_is_composited_onto_white() -> None:
    src = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    src.putpixel((0, 0), (0, 0, 255, 255))
    arr = np.asarray(decode_image(_encode(src, "PNG"), **LIMITS))
    assert arr[1, 1].tolist() == [255, 255, 255]
    assert arr[0, 0].tolist() == [0, 0, 255]


def test_exif_orientation_is_applied() -> None:
    src = Image.open(io.BytesIO(make_jpeg(40, 20, 3)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img = decode_image(_encode(src, "JPEG", exif=exif.tobytes()), **LIMITS)
    assert img.size == (20, 40)


def test_rejects_empty() -> None:
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", **LIMITS)


def test_rejects_too_many_bytes_before_decoding() -> None:
    data = make_jpeg(64, 64, 4)
    with pytest.raises(ImageError, match=rf"{len(data)} bytes, over the limit of 100 bytes"):
        decode_image(data, max_bytes=100, max_pixels=10**9)
    assert decode_image(data, max_bytes=len(data), max_pixels=10**9).size == (64, 64)


@pytest.mark.parametrize(
    "data", [b"not an image at all", b"\x00" * 1000, b"GIF89a", b"<svg></svg>"]
)
def test_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ImageError, match=r"not an image|corrupt"):
        decode_image(data, **LIMITS)


@pytest.mark.parametrize("maker", [make_jpeg, make_png])
def test_rejects_truncated(maker: object) -> None:
    data = maker(64, 64, 5)  # type: ignore[operator]
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], **LIMITS)


def test_pixel_limit_checked_from_header_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = make_png_header(8000, 8000)  # 64 Mpx declared, ~100 bytes of data
    assert len(bomb) < 200

    def no_decode(self: Image.Image) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    with pytest.raises(ImageError, match="8000x8000 = 64000000 pixels, over the limit of"):
        decode_image(bomb, max_bytes=MB, max_pixels=40_000_000)


def test_pixel_limit_applies_to_small_real_images() -> None:
    with pytest.raises(ImageError, match="pixels, over the limit of 100 pixels"):
        decode_image(make_png(20, 20, 6), max_bytes=MB, max_pixels=100)
    assert decode_image(make_png(10, 10, 6), max_bytes=MB, max_pixels=100).size == (10, 10)


def test_pillow_bomb_error_becomes_image_error() -> None:
    # 400 Mpx is over twice Image.MAX_IMAGE_PIXELS: Pillow raises DecompressionBombError itself.
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(make_png_header(20000, 20000), max_bytes=MB, max_pixels=10**12)


def test_pillow_bomb_warning_becomes_image_error() -> None:
    pixels = Image.MAX_IMAGE_PIXELS
    assert pixels is not None
    side = int((pixels * 1.2) ** 0.5)  # between MAX_IMAGE_PIXELS and twice it: Pillow only warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any leaked warning fails the test
        with pytest.raises(ImageError, match="decompression bomb"):
            decode_image(make_png_header(side, side), max_bytes=MB, max_pixels=10**12)


def test_warning_filters_are_restored() -> None:
    before = list(warnings.filters)
    with pytest.raises(ImageError):
        decode_image(make_png_header(8000, 8000), max_bytes=MB, max_pixels=1000)
    decode_image(make_png(8, 8, 0), **LIMITS)
    assert warnings.filters == before


# ---- load_image_field ---------------------------------------------------------------------------


def test_data_uri_base64() -> None:
    data = make_png(8, 8, 7)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    assert load_image_field(uri, None) == data
    assert load_image_field(" " + uri.replace("data:", "DATA:") + "\n", None) == data


def test_data_uri_without_media_type_and_percent_encoded() -> None:
    data = b"\x89PNG raw bytes %"
    uri = "data:," + "".join(f"%{b:02x}" for b in data)
    assert load_image_field(uri, None) == data
    assert load_image_field("data:;base64," + base64.b64encode(data).decode(), None) == data


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("data:image/png;base64", "no ','"),
        ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain'"),
        ("data:image/png;base64,@@@@", "outside the base64 alphabet"),
        ("data:image/png;base64,", "empty"),
    ],
)
def test_bad_data_uris(uri: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image_field(uri, None)


def test_raw_base64_variants() -> None:
    data = make_jpeg(16, 16, 8)
    std = base64.b64encode(data).decode()
    assert load_image_field(std, None) == data
    assert load_image_field(std.rstrip("="), None) == data  # padding optional
    wrapped = "\n".join(std[i : i + 76] for i in range(0, len(std), 76))
    assert load_image_field(wrapped, None) == data  # MIME line breaks
    assert load_image_field(base64.urlsafe_b64encode(data).decode(), None) == data


def test_relative_path_resolves_against_base_dir(tmp_path: Path) -> None:
    data = make_jpeg(8, 8, 9)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(data)
    assert load_image_field("imgs/a.jpg", tmp_path) == data
    assert load_image_field(str(tmp_path / "imgs" / "a.jpg"), None) == data


def test_relative_path_without_base_dir_uses_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "b.png").write_bytes(make_png(4, 4, 0))
    monkeypatch.chdir(tmp_path)
    assert load_image_field("b.png", None) == make_png(4, 4, 0)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"neither a data: URI, an existing file under .*, nor"):
        load_image_field("imgs/missing.jpg", tmp_path)


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageError, match="neither"):
        load_image_field("dir.jpg", tmp_path)


def test_empty_field() -> None:
    with pytest.raises(ImageError, match="empty"):
        load_image_field("   ", None)


def test_impossible_base64_length() -> None:
    with pytest.raises(ImageError, match="impossible length"):
        load_image_field("abcde", None)


def test_max_bytes_for_every_source(tmp_path: Path) -> None:
    data = make_jpeg(32, 32, 10)
    (tmp_path / "c.jpg").write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for value in ("c.jpg", b64, "data:image/jpeg;base64," + b64):
        with pytest.raises(ImageError, match="over the limit of 100 bytes"):
            load_image_field(value, tmp_path, max_bytes=100)
        assert load_image_field(value, tmp_path, max_bytes=len(data)) == data


def test_loaded_field_decodes() -> None:
    data = make_png(12, 10, 11)
    raw = load_image_field("data:image/png;base64," + base64.b64encode(data).decode(), None)
    assert decode_image(raw, **LIMITS).size == (12, 10)
