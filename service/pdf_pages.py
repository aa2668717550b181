"""A PDF's pages as PNG images (pypdfium2), so a reviewer sees the handout exactly as it will print."""

from __future__ import annotations

import io
import threading

import pypdfium2

# PDFium is not thread-safe: one rasterisation at a time in this process.
_PDFIUM_LOCK = threading.Lock()
# 72 pt per inch in the PDF; 1.25 gives about 90 dpi: readable on screen, a few hundred KB per page.
DEFAULT_SCALE = 1.25
MAX_PAGES = 8


class PdfPageError(ValueError):
    """The PDF could not be read, or has no such page."""


def page_count(pdf: bytes) -> int:
    with _PDFIUM_LOCK:
        try:
            document = pypdfium2.PdfDocument(pdf)
        except pypdfium2.PdfiumError as error:
            raise PdfPageError("the handout PDF could not be read") from error
        try:
            return min(len(document), MAX_PAGES)
        finally:
            document.close()


def page_png(pdf: bytes, page_number: int, *, scale: float = DEFAULT_SCALE) -> bytes:
    """Page `page_number` (1-based) as a PNG."""
    with _PDFIUM_LOCK:
        try:
            document = pypdfium2.PdfDocument(pdf)
        except pypdfium2.PdfiumError as error:
            raise PdfPageError("the handout PDF could not be read") from error
        try:
            if not 1 <= page_number <= min(len(document), MAX_PAGES):
                raise PdfPageError(f"the handout has no page {page_number}")
            page = document[page_number - 1]
            try:
                image = page.render(scale=scale).to_pil()
            finally:
                page.close()
        finally:
            document.close()
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
