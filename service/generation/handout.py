"""Printable one-page handout PDF: image, title, caption, alt text, AI disclosure, date and language."""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Literal, cast

from fpdf import FPDF

from service.images import png_size

PageSize = Literal["letter", "a4"]
PAGE_SIZES: dict[str, str] = {"letter": "Letter", "a4": "A4"}
PRODUCER = "CareCanvas"

# Unicode TrueType fonts found at run time rather than committed: DejaVu comes with Debian's
# fonts-dejavu-core (free licence), Liberation with fonts-liberation. The container image installs one.
FONT_CANDIDATES: tuple[tuple[Path, Path], ...] = (
    (
        Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
        Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"),
    ),
    (
        Path("/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf"),
        Path("/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf"),
    ),
)


@dataclass(frozen=True)
class HandoutWords:
    """Fixed words of the handout in one language."""

    disclosure: str
    date_label: str
    language_label: str
    language_name: str
    description_label: str


WORDS: dict[str, HandoutWords] = {
    "en": HandoutWords(
        disclosure="Made with AI and reviewed by your care team",
        date_label="Date",
        language_label="Language",
        language_name="English",
        description_label="Picture description",
    ),
    "es": HandoutWords(
        disclosure="Hecho con IA y revisado por su equipo de atención médica",
        date_label="Fecha",
        language_label="Idioma",
        language_name="español",
        description_label="Descripción de la imagen",
    ),
}

_MARGIN_MM = 18.0
_MIN_IMAGE_MM = 40.0
_FONT_FAMILY = "HandoutSans"


def find_unicode_fonts() -> tuple[Path, Path]:
    """Paths of a regular and a bold Unicode TTF font available on this machine."""
    for regular, bold in FONT_CANDIDATES:
        if regular.is_file() and bold.is_file():
            return regular, bold
    raise RuntimeError(
        "no Unicode TrueType font found for handouts; install the Debian package fonts-dejavu-core "
        "(or fonts-liberation)"
    )


def _image_size(png: bytes) -> tuple[int, int]:
    return png_size(png)  # service.images: the pixel cap (a clear ValueError) before anything is decoded


def _required(name: str, value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value


def render_handout_pdf(
    *,
    png: bytes,
    title: str,
    caption: str,
    alt_text: str,
    language: str,
    created: date,
    page_size: PageSize = "letter",
    test_model_notice: str | None = None,
) -> bytes:
    """A one-page PDF handout (Letter or A4) with Unicode text and the image's alt text attached to it.

    Document metadata holds only the title, the language, the producer and the date: no author,
    subject or keywords, so nothing about the patient is hidden in the file.
    """
    if page_size not in PAGE_SIZES:
        raise ValueError(f"unknown page_size {page_size!r}; allowed: {', '.join(PAGE_SIZES)}")
    if language not in WORDS:
        raise ValueError(f"unsupported language {language!r}; allowed: {', '.join(WORDS)}")
    title, caption, alt_text = (
        _required("title", title),
        _required("caption", caption),
        _required("alt_text", alt_text),
    )
    pixel_width, pixel_height = _image_size(png)
    words = WORDS[language]
    regular_font, bold_font = find_unicode_fonts()

    pdf = FPDF(orientation="portrait", unit="mm", format=PAGE_SIZES[page_size])
    pdf.set_margins(_MARGIN_MM, _MARGIN_MM, _MARGIN_MM)
    pdf.set_auto_page_break(auto=True, margin=_MARGIN_MM)
    pdf.add_font(_FONT_FAMILY, "", str(regular_font))
    pdf.add_font(_FONT_FAMILY, "B", str(bold_font))
    pdf.set_creator(PRODUCER)
    pdf.set_producer(PRODUCER)
    pdf.set_title(title)
    pdf.set_lang(language)
    # The handout's own date, not the wall clock, so the same approval renders the same document.
    pdf.set_creation_date(datetime.combine(created, time(12, 0), tzinfo=UTC))
    pdf.set_display_mode(zoom="fullpage")
    pdf.add_page()
    content_width = pdf.w - 2 * _MARGIN_MM

    def text_height(text: str, size: float, style: str = "") -> float:
        pdf.set_font(_FONT_FAMILY, style, size)
        # output="LINES" makes multi_cell return the wrapped lines without drawing them.
        lines = cast(list[str], pdf.multi_cell(content_width, size * 0.5, text, dry_run=True, output="LINES"))
        return len(lines) * size * 0.5

    notice = test_model_notice.strip() if test_model_notice else ""
    date_and_language = (
        f"{words.date_label}: {created.isoformat()}   {words.language_label}: {words.language_name}"
    )
    footer = f"{words.disclosure}\n{date_and_language}"
    text_block = (
        text_height(title, 20, "B")
        + 4
        + text_height(caption, 15)
        + 4
        + text_height(f"{words.description_label}: {alt_text}", 11)
        + 4
        + text_height(footer, 11)
        + (text_height(notice, 10, "B") + 6 if notice else 0)
        + 8
    )
    # The image takes whatever height the text leaves, up to the full width, keeping its aspect ratio.
    available_height = max(_MIN_IMAGE_MM, pdf.h - 2 * _MARGIN_MM - text_block)
    scale = min(content_width / pixel_width, available_height / pixel_height)
    image_width, image_height = pixel_width * scale, pixel_height * scale

    pdf.set_font(_FONT_FAMILY, "B", 20)
    pdf.multi_cell(content_width, 10, title, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    pdf.image(
        io.BytesIO(png),
        x=_MARGIN_MM + (content_width - image_width) / 2,
        w=image_width,
        h=image_height,
        alt_text=alt_text,
    )
    pdf.ln(4)
    pdf.set_font(_FONT_FAMILY, "", 15)
    pdf.multi_cell(content_width, 7.5, caption, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    pdf.set_font(_FONT_FAMILY, "", 11)
    pdf.set_text_color(60, 60, 60)
    pdf.multi_cell(
        content_width, 5.5, f"{words.description_label}: {alt_text}", new_x="LMARGIN", new_y="NEXT"
    )
    pdf.ln(4)
    pdf.set_text_color(0, 0, 0)
    pdf.set_font(_FONT_FAMILY, "B", 11)
    pdf.multi_cell(content_width, 5.5, words.disclosure, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(_FONT_FAMILY, "", 11)
    pdf.multi_cell(content_width, 5.5, date_and_language, new_x="LMARGIN", new_y="NEXT")
    if notice:
        pdf.ln(4)
        pdf.set_font(_FONT_FAMILY, "B", 10)
        pdf.set_draw_color(180, 0, 0)
        pdf.multi_cell(content_width, 5, notice, border=1, padding=1, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
