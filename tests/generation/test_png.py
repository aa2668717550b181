"""PNG encoding: no metadata chunks, pixels intact, dimensions read from the header."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service.generation.png import encode_png, png_dimensions

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk_types(data: bytes) -> list[str]:
    """Walk the chunks independently of the code under test, checking each CRC."""
    assert data.startswith(SIGNATURE)
    position, types = len(SIGNATURE), []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        types.append(kind.decode("ascii"))
        position += 12 + length
    assert position == len(data)
    return types


def noisy_image(mode: str = "RGB", size: tuple[int, int] = (40, 24)) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB").convert(mode)


def image_with_metadata() -> Image.Image:
    """An image whose info would put text, a colour profile and a resolution into a naive PNG."""
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", "portrait of Jane Example")
    info.add_itxt("comment", "MRN 12345")
    buffer = io.BytesIO()
    noisy_image().save(buffer, format="PNG", pnginfo=info, dpi=(300, 300), icc_profile=b"\x00" * 128)
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    loaded.load()
    assert "prompt" in loaded.info  # the fixture really carries metadata
    return loaded


def test_png_has_no_metadata_chunks_and_keeps_the_pixels() -> None:
    source = image_with_metadata()
    data = encode_png(source)
    types = chunk_types(data)
    assert set(types) <= {"IHDR", "IDAT", "IEND"}
    assert types[0] == "IHDR"
    assert types[-1] == "IEND"
    assert b"Jane" not in data
    assert b"MRN" not in data
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(source))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "1"])
def test_every_allowed_mode_round_trips_without_metadata(mode: str) -> None:
    source = noisy_image(mode)
    data = encode_png(source)
    assert set(chunk_types(data)) <= {"IHDR", "IDAT", "IEND"}
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == mode
    assert np.array_equal(np.asarray(decoded), np.asarray(source))


def test_palette_images_keep_their_palette() -> None:
    source = noisy_image().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    source.info["transparency"] = 0
    data = encode_png(source)
    assert set(chunk_types(data)) <= {"IHDR", "PLTE", "IDAT", "IEND"}
    assert "PLTE" in chunk_types(data)
    decoded = Image.open(io.BytesIO(data))
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(source.convert("RGB")))


def test_compress_level_changes_size_not_pixels() -> None:
    source = Image.new("RGB", (128, 128), (200, 30, 30))
    fast, small = encode_png(source, compress_level=0), encode_png(source, compress_level=9)
    assert len(small) < len(fast)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(fast))), np.asarray(Image.open(io.BytesIO(small))))


@pytest.mark.parametrize("level", [-1, 10])
def test_compress_level_out_of_range_is_refused(level: int) -> None:
    with pytest.raises(ValueError, match=r"compress_level must be 0\.\.9"):
        encode_png(noisy_image(), compress_level=level)


def test_unencodable_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode 'CMYK' cannot be encoded; allowed: 1, L, LA, P, RGB, RGBA"):
        encode_png(noisy_image("CMYK"))


def test_png_dimensions_reads_width_and_height() -> None:
    assert png_dimensions(encode_png(noisy_image(size=(40, 24)))) == (40, 24)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "signature"),
        (b"GIF89a" + b"\x00" * 30, "signature"),
        (SIGNATURE + struct.pack(">I4s", 13, b"IDAT") + b"\x00" * 13, "13-byte IHDR"),
        (SIGNATURE + struct.pack(">I4sII", 13, b"IHDR", 0, 5) + b"\x00" * 9, "zero width or height"),
    ],
)
def test_png_dimensions_refuses_non_png_bytes(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        png_dimensions(data)
