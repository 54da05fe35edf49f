"""Image decoding: allowed formats, EXIF orientation, RGB, pixel limit, clear errors."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from kubetune.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "MPO"})
MAX_IMAGE_PIXELS = 8192 * 8192
"""Images above this many pixels are refused (decompression-bomb guard)."""
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112


def is_image_name(name: str) -> bool:
    """True for the file names the dir datasets treat as images."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(
            f"{name}: image is too large (decompression-bomb guard)",
            hint="resize it below the pixel limit",
        ) from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not a readable image", hint="use png, jpg, webp or bmp") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{name}: unreadable image: {err}") from None
    if img.format not in ALLOWED_FORMATS:
        raise DataError(
            f"{name}: unsupported image format {img.format}", hint="use png, jpg, webp or bmp"
        )
    width, height = img.size
    if width * height > max_pixels:
        raise DataError(
            f"{name}: image is {width}x{height} = {width * height} pixels, above the "
            f"limit of {max_pixels} (decompression-bomb guard)",
            hint="downscale it before training",
        )
    return img


def image_size_hw(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(height, width) after EXIF orientation, read from the header only."""
    img = _open(data, name, max_pixels)
    width, height = img.size
    return (width, height) if _orientation(img) in _TRANSPOSED else (height, width)


def jpeg_header_length(prefix: bytes) -> int | None:
    """How many bytes from its start a JPEG's header takes, through the start-of-scan
    segment (where Pillow stops reading), read from the segment lengths in ``prefix``; when
    ``prefix`` ends before that, the offset of the first segment it does not reach plus its
    length field (read that far, then ask again). None if not a JPEG or the markers are
    broken. Camera JPEGs carry 20-60 KB of EXIF (thumbnail, maker notes) before the frame."""
    if prefix[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(prefix):
        if prefix[i] != 0xFF:
            return None
        marker = prefix[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a segment
            i += 2
            continue
        length = int.from_bytes(prefix[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if marker == 0xDA:
            return i + 2 + length
        i += 2 + length
    return i + 4


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation found in the header (never decodes pixels: PNG's `getexif`
    would load the whole image when the EXIF chunk is not in the header)."""
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(_EXIF_ORIENTATION, 1))
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block just means no rotation
        return 1


def decode_image(
    data: bytes,
    name: str,
    max_pixels: int = MAX_IMAGE_PIXELS,
    draft_size: tuple[int, int] | None = None,
    mode: str = "RGB",
) -> Image.Image:
    """Fully decode `data` to an RGB (or `mode`) image with EXIF orientation applied.

    Raises DataError naming `name` for unreadable, truncated, oversized or unsupported files.
    `draft_size` lets JPEG decode at reduced scale (fast validity checks).
    """
    img = _open(data, name, max_pixels)
    try:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
        img = ImageOps.exif_transpose(img) or img
        if img.mode != mode:
            img = _to_rgb(img) if mode == "RGB" else img.convert(mode)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        detail = "truncated or corrupt file" if "truncat" in str(err).lower() else str(err)
        raise DataError(
            f"{name}: cannot decode image: {detail}", hint="re-export or remove the file"
        ) from None
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert to RGB, compositing transparency onto white rather than black."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def decode_mask(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A loss mask as a greyscale (`L`) image, oriented like its image (invoke-training loads
    masks with `convert("L")`)."""
    return decode_image(data, name, max_pixels, mode="L")
