"""Decoding (formats, EXIF, RGB, bomb guard, truncation) and the crop/flip transform."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
from data_fixtures import image_bytes
from PIL import Image

from kubetune.dataset.images import decode_image, image_size_hw
from kubetune.errors import DataError
from runner.data.transforms import ImageTransform


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".bmp"])
def test_formats_decode_to_rgb(ext: str) -> None:
    img = decode_image(image_bytes(20, 10, ext), f"x{ext}")
    assert img.mode == "RGB" and img.size == (20, 10)


def test_exif_orientation_is_applied() -> None:
    data = image_bytes(30, 10, ".jpg", exif_orientation=6)  # rotate 90°: 30x10 → 10x30
    assert decode_image(data, "r.jpg").size == (10, 30)
    assert image_size_hw(data, "r.jpg") == (30, 10)


def test_transparency_becomes_rgb() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(out, "PNG")
    img = decode_image(out.getvalue(), "t.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims huge dimensions (a decompression bomb's shape)."""
    data = bytearray(image_bytes(2, 2, ".png"))
    ihdr = data[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = _png_claiming(100_000, 100_000)
    with pytest.raises(DataError, match=r"bomb\.png: .*(pixels|too large)"):
        decode_image(bomb, "bomb.png")
    with pytest.raises(DataError, match="big.png: image is 50x50 = 2500 pixels"):
        decode_image(image_bytes(50, 50), "big.png", max_pixels=1000)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_files_name_the_file(ext: str) -> None:
    data = image_bytes(64, 64, ext)
    with pytest.raises(DataError, match=f"cut{ext}: cannot decode image: truncated"):
        decode_image(data[: len(data) // 2], f"cut{ext}")


def test_not_an_image_and_unsupported_format() -> None:
    with pytest.raises(DataError, match="notes.png: not a readable image"):
        decode_image(b"hello world", "notes.png")
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, "GIF")
    with pytest.raises(DataError, match="anim.gif: unsupported image format GIF"):
        decode_image(out.getvalue(), "anim.gif")


def _gradient(w: int, h: int) -> Image.Image:
    x = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    return Image.fromarray(np.stack([x, x, x], axis=-1), "RGB")


def test_resize_to_cover_and_center_crop_record_sdxl_inputs() -> None:
    pixels, original, crop = ImageTransform()(_gradient(200, 100), (32, 32), random.Random(0))
    assert pixels.shape == (3, 32, 32) and original == (100, 200)
    assert crop == (0, 16)  # resized to 32x64, centre crop starts at x=16
    assert pixels.min() >= -1 and pixels.max() <= 1
    pixels, _, crop = ImageTransform()(_gradient(50, 100), (16, 32), random.Random(0))
    assert pixels.shape == (3, 16, 32) and crop == (24, 0)  # resized to 64x32


def test_random_crop_and_flip() -> None:
    transform = ImageTransform(center_crop=False, random_flip=True)
    seen_crops, flipped = set(), 0
    for seed in range(40):
        pixels, _, (top, left) = transform(_gradient(160, 40), (16, 16), random.Random(seed))
        assert top == 0 and 0 <= left <= 64 - 16
        seen_crops.add(left)
        flipped += int(pixels[0, 0, 0] > pixels[0, 0, -1])  # gradient reversed
    assert len(seen_crops) > 10 and 5 < flipped < 35
    a = transform(_gradient(160, 40), (16, 16), random.Random(3))
    b = transform(_gradient(160, 40), (16, 16), random.Random(3))
    assert a[2] == b[2] and bool((a[0] == b[0]).all())


def test_jpeg_header_length_walks_the_segments_to_the_scan() -> None:
    """The header length of a JPEG comes from its segment lengths: the whole header when the
    prefix reaches the start of scan, else how far to read to learn more; None for anything
    that is not a well-formed JPEG."""
    import io

    from PIL import Image

    from kubetune.dataset.headers import HEADER_SLACK
    from kubetune.dataset.images import jpeg_header_length

    exif = Image.Exif()
    exif[0x010E] = "x" * 30_000  # a camera's EXIF block (thumbnail, maker notes)
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (9, 99, 199)).save(
        out,
        "JPEG",
        exif=exif.tobytes(),
        icc_profile=b"\0" * 70_000,  # two APP2 segments
    )
    data = out.getvalue()
    full = jpeg_header_length(data)
    assert full is not None and full > 100_000
    assert data[full - 12 : full].count(b"\xff\xda") == 0 and b"\xff\xda" in data[:full]
    assert Image.open(io.BytesIO(data[:full])).size == (64, 48)  # enough for Pillow
    steps, prefix = 0, data[: 16 * 1024]  # as header_size_hw reads: + HEADER_SLACK each time
    while (need := jpeg_header_length(prefix)) is not None and need > len(prefix):
        assert need <= full + 4  # never asks past the header
        prefix, steps = data[: need + HEADER_SLACK], steps + 1
    assert need == full and steps == 3  # past the EXIF block, then each of the two ICC chunks
    assert jpeg_header_length(b"\xff\xd8\xff" + data[2:]) == full + 1  # a fill byte
    assert jpeg_header_length(b"\x89PNG\r\n\x1a\n" + data[8:]) is None
    assert jpeg_header_length(b"\xff\xd8\x00\x00\x00\x00") is None  # no marker where one must be
