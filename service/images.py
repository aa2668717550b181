"""Every image CareCanvas decodes goes through here: a pixel cap of its own, checked before decoding.

Pillow's own guard only warns from 89 MP and raises (DecompressionBombError, not a ValueError) from 179 MP;
ours refuses anything over `max_image_pixels` (default 40 MP) with one clear error, from the PNG header alone.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from service.generation.png import encode_png, png_dimensions

DEFAULT_MAX_PIXELS = 40_000_000
# Above this Pillow warns on open; a higher cap of ours would let that warning through.
PILLOW_WARNING_PIXELS = 1024 * 1024 * 1024 // 4 // 3

_configured = {"max_pixels": DEFAULT_MAX_PIXELS}
# Named from their magic bytes, so a wrong format is reported without handing it to a decoder.
_OTHER_FORMATS = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "WEBP"),
)


class ImageTooLargeError(ValueError):
    """The image has more pixels than CareCanvas decodes; nothing was decoded."""

    def __init__(self, width: int, height: int, max_pixels: int) -> None:
        super().__init__(
            f"the image is {width}x{height} pixels ({width * height / 1e6:.1f} million); "
            f"CareCanvas decodes at most {max_pixels / 1e6:.1f} million pixels (setting max_image_pixels)"
        )
        self.width, self.height, self.max_pixels = width, height, max_pixels


class UnreadableImageError(ValueError):
    """The bytes are not a readable image of the expected format."""


def set_max_pixels(value: int) -> None:
    """The process's cap (from Settings.max_image_pixels, set once at start-up)."""
    if not 1 <= value <= PILLOW_WARNING_PIXELS:
        raise ValueError(f"max_image_pixels must be 1..{PILLOW_WARNING_PIXELS}")
    _configured["max_pixels"] = value


def max_pixels() -> int:
    return _configured["max_pixels"]


def check_pixels(width: int, height: int, *, cap: int | None = None) -> None:
    limit = max_pixels() if cap is None else cap
    if width * height > limit:
        raise ImageTooLargeError(width, height, limit)


def png_size(data: bytes, *, cap: int | None = None) -> tuple[int, int]:
    """(width, height) of a PNG within the cap, checked from its header and then verified by Pillow."""
    other = next((name for magic, name in _OTHER_FORMATS if data.startswith(magic)), None)
    if other is not None:
        raise UnreadableImageError(f"png must be a PNG image, got {other}")
    try:
        width, height = png_dimensions(data)
    except ValueError as error:
        raise UnreadableImageError(f"png is not a readable PNG image ({error})") from None
    check_pixels(width, height, cap=cap)
    with _opened(data) as image:
        if image.format != "PNG":
            raise UnreadableImageError(f"png must be a PNG image, got {image.format}")
        try:
            image.verify()
        except (OSError, SyntaxError) as error:
            raise UnreadableImageError("png is not a readable PNG image") from error
        return image.size


def decode_png(data: bytes, *, cap: int | None = None) -> Image.Image:
    """The PNG's pixels, loaded, once its header is within the cap."""
    png_size(data, cap=cap)
    with _opened(data) as image:
        try:
            image.load()
        except (OSError, SyntaxError) as error:
            raise UnreadableImageError("png is not a readable PNG image") from error
        return image.copy()


def optimise_png(data: bytes, *, max_bytes: int) -> tuple[bytes, bool] | None:
    """A smaller encoding of the PNG that fits `max_bytes`: (bytes, lossless), or None when none does.

    First the same pixels at the highest compression; then a 256-colour palette version (lossy, but a
    picture the clinician would still recognise).
    """
    image = decode_png(data)
    if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "1"):
        image = image.convert("RGB")
    lossless = encode_png(image, compress_level=9)
    if len(lossless) <= max_bytes:
        return lossless, True
    palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    lossy = encode_png(palette, compress_level=9)
    if len(lossy) <= max_bytes:
        return lossy, False
    return None


class _opened:
    """Image.open whose bomb guard cannot leak Pillow's own exception or warning types."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._image: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        # The header check came first and the cap stays below Pillow's warning threshold, so Pillow's own
        # guard never fires here; should it, its error still leaves as ours.
        try:
            self._image = Image.open(io.BytesIO(self._data))
        except Image.DecompressionBombError:
            raise UnreadableImageError("the image is too large to decode") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise UnreadableImageError("png is not a readable PNG image") from error
        return self._image

    def __exit__(self, *exc: object) -> None:
        if self._image is not None:
            self._image.close()
