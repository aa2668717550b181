"""PNG encoding without metadata chunks (nothing like a prompt can ride along in tEXt/iTXt/eXIf)."""

from __future__ import annotations

import io
import struct

from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ENCODABLE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")
# Chosen by measurement (bench/bench_png.py, docs/benchmarks.md "PNG compress level"): see there for the
# level vs time vs size table at 512² and 1024².
DEFAULT_COMPRESS_LEVEL = 4  # the size of 6 (within 1 %), about 25 % less time; 1 is 3× faster but 17 % bigger
PREVIEW_COMPRESS_LEVEL = 1  # a thumbnail replaced a few steps later: speed over size


def encode_png(image: Image.Image, *, compress_level: int = DEFAULT_COMPRESS_LEVEL) -> bytes:
    """Encode as PNG with only IHDR, (PLTE,) IDAT and IEND chunks.

    The pixels are copied into a fresh image so nothing in `image.info` (text, ICC profile, EXIF, dpi,
    transparency) reaches the file.
    """
    if not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level must be 0..9, got {compress_level}")
    if image.mode not in _ENCODABLE_MODES:
        raise ValueError(
            f"image mode {image.mode!r} cannot be encoded; allowed: {', '.join(_ENCODABLE_MODES)}"
        )
    clean = Image.frombytes(image.mode, image.size, image.tobytes())
    if image.mode == "P":
        palette = image.getpalette()
        if palette is not None:
            clean.putpalette(palette)
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", compress_level=compress_level, optimize=False)
    return buffer.getvalue()


def png_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; ValueError when the bytes are not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG: the 8-byte PNG signature and IHDR chunk are missing")
    length, chunk_type = struct.unpack(">I4s", data[8:16])
    if chunk_type != b"IHDR" or length != 13:
        raise ValueError("not a valid PNG: the first chunk must be a 13-byte IHDR")
    width, height = struct.unpack(">II", data[16:24])
    if width == 0 or height == 0:
        raise ValueError("not a valid PNG: IHDR declares a zero width or height")
    return width, height
