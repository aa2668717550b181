"""The pixel cap of service.images, on its own and where the handout decodes the picture."""

from __future__ import annotations

import io
import struct
import time
import zlib
from datetime import date

import numpy as np
import pytest
from PIL import Image

from service import images
from service.generation.handout import render_handout_pdf
from service.images import ImageTooLargeError, UnreadableImageError, optimise_png, png_size

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_bilevel_png(width: int, height: int) -> bytes:
    """A real, valid 1-bit PNG of any size: white rows compress to almost nothing."""
    row = b"\x00" + b"\xff" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def noise_png(size: int) -> bytes:
    pixels = np.random.default_rng(7).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def handout(png: bytes) -> bytes:
    return render_handout_pdf(
        png=png,
        title="Asthma",
        caption="Your airways.",
        alt_text="A drawing of lungs.",
        language="en",
        created=date(2026, 12, 1),
    )


@pytest.mark.parametrize(("width", "height"), [(10_000, 10_000), (15_000, 15_000)])
def test_100_and_225_megapixel_pngs_are_refused_cleanly_by_the_handout(width: int, height: int) -> None:
    png = blank_bilevel_png(width, height)
    started = time.monotonic()
    # Pillow alone warned at 100 MP (rendering it anyway) and raised DecompressionBombError at 225 MP.
    with pytest.raises(ImageTooLargeError, match=r"at most 40\.0 million pixels") as caught:
        handout(png)
    assert isinstance(caught.value, ValueError)
    assert (caught.value.width, caught.value.height) == (width, height)
    assert time.monotonic() - started < 2, "refused from the header, nothing decoded"


def test_the_cap_is_a_setting() -> None:
    png = blank_bilevel_png(300, 200)
    assert png_size(png) == (300, 200)
    with pytest.raises(ImageTooLargeError):
        png_size(png, cap=50_000)
    images.set_max_pixels(50_000)
    try:
        with pytest.raises(ImageTooLargeError, match=r"0\.1 million"):
            handout(png)
    finally:
        images.set_max_pixels(images.DEFAULT_MAX_PIXELS)
    assert handout(png).startswith(b"%PDF")
    with pytest.raises(ValueError, match="max_image_pixels"):
        images.set_max_pixels(images.PILLOW_WARNING_PIXELS + 1)


@pytest.mark.parametrize("data", [b"", b"not an image", PNG_SIGNATURE + b"\x00" * 30])
def test_unreadable_bytes_are_a_clear_error(data: bytes) -> None:
    with pytest.raises(UnreadableImageError, match="png is not a readable PNG image"):
        png_size(data)


def test_optimise_png_lossless_then_palette_then_none() -> None:
    loose = noise_png(96)
    lossless = optimise_png(blank_bilevel_png(64, 64), max_bytes=10_000)
    assert lossless is not None
    assert lossless[1] is True
    palette = optimise_png(loose, max_bytes=len(loose) // 2)
    assert palette is not None
    smaller, exact = palette
    assert exact is False
    assert len(smaller) <= len(loose) // 2
    assert png_size(smaller) == (96, 96)
    assert optimise_png(loose, max_bytes=100) is None
