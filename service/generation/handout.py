"""Printable handout PDF in the patient's language: clinic, title, picture, sections, who gave it, when."""

from __future__ import annotations

import functools
import io
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Literal, Protocol, cast

from fpdf import FPDF

from service.generation.languages import HandoutChrome, LanguagePack, TopicSections, default_language_packs
from service.generation.pdf_fonts import FontCache
from service.images import png_size

PageSize = Literal["letter", "a4"]
PAGE_SIZES: dict[str, str] = {"letter": "Letter", "a4": "A4"}
PRODUCER = "CareCanvas"
log = logging.getLogger(__name__)

_NOTO = Path("/usr/share/fonts/truetype/noto")
_NOTO_CJK = Path("/usr/share/fonts/opentype/noto")


@dataclass(frozen=True)
class FontFace:
    """One TrueType/OpenType face: a file and, for a collection (.ttc), the face's index in it."""

    regular: Path
    bold: Path
    index: int = 0
    package: str = ""  # the Debian package that installs it, named in the error when it is missing

    def available(self) -> bool:
        return self.regular.is_file() and self.bold.is_file()


# Fonts come from Debian packages (free licences), found at run time rather than committed; scripts/bootstrap
# installs them. Latin, Vietnamese and Cyrillic: Noto Sans (DejaVu or Liberation as a fallback for
# English and Spanish only); Arabic: Noto Naskh Arabic; Chinese (Simplified) and Korean: the Noto Sans CJK
# collection, whose faces are JP, KR, SC, TC, HK in that order.
NOTO_SANS = FontFace(_NOTO / "NotoSans-Regular.ttf", _NOTO / "NotoSans-Bold.ttf", package="fonts-noto-core")
DEJAVU = FontFace(
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"),
    package="fonts-dejavu-core",
)
LIBERATION = FontFace(
    Path("/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf"),
    Path("/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf"),
    package="fonts-liberation",
)
NOTO_ARABIC = FontFace(
    _NOTO / "NotoNaskhArabic-Regular.ttf", _NOTO / "NotoNaskhArabic-Bold.ttf", package="fonts-noto-core"
)
NOTO_CJK_SC = FontFace(
    _NOTO_CJK / "NotoSansCJK-Regular.ttc", _NOTO_CJK / "NotoSansCJK-Bold.ttc", 2, "fonts-noto-cjk"
)
NOTO_CJK_KR = FontFace(
    _NOTO_CJK / "NotoSansCJK-Regular.ttc", _NOTO_CJK / "NotoSansCJK-Bold.ttc", 1, "fonts-noto-cjk"
)
# Kept for callers of the first version: the Latin fonts tried in order.
FONT_CANDIDATES: tuple[tuple[Path, Path], ...] = tuple(
    (face.regular, face.bold) for face in (NOTO_SANS, DEJAVU, LIBERATION)
)
_FACES_BY_SCRIPT: dict[str, tuple[FontFace, ...]] = {
    "Latn": (NOTO_SANS, DEJAVU, LIBERATION),
    "Cyrl": (NOTO_SANS, DEJAVU),
    "Arab": (NOTO_ARABIC,),
    "Hans": (NOTO_CJK_SC,),
    "Hang": (NOTO_CJK_KR,),
}
# Vietnamese needs stacked diacritics (ệ, ở) that Liberation lacks; Noto and DejaVu have them.
_FACES_BY_LANGUAGE: dict[str, tuple[FontFace, ...]] = {"vi": (NOTO_SANS, DEJAVU)}

_MARGIN_MM = 18.0
_MIN_IMAGE_MM = 40.0
_MAX_LOGO_BYTES = 1_000_000
_LOGO_HEIGHT_MM = 12.0
_PHONE = re.compile(r"^\+?[0-9][0-9 ().\-/]{5,28}[0-9](\s*(ext\.?|x)\s*[0-9]{1,6})?$", re.IGNORECASE)
_FAMILY = "HandoutMain"
# Every handout's fonts, parsed once per process (a Chinese or Korean handout took 1-4 s, mostly parsing).
FONTS = FontCache()
_RLM = "\u200f"


def _primary_script(char: str) -> str | None:
    code = ord(char)
    if 0x0600 <= code <= 0x06FF or 0x0750 <= code <= 0x077F or 0xFB50 <= code <= 0xFEFF:
        return "Arab"
    if 0x3400 <= code <= 0x9FFF or 0x3000 <= code <= 0x303F or 0xFF00 <= code <= 0xFFEF:
        return "Hans"
    if 0xAC00 <= code <= 0xD7A3 or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
        return "Hang"
    if 0x0400 <= code <= 0x04FF:
        return "Cyrl"
    return None


@dataclass(frozen=True)
class ClinicDetails:
    """The clinic's name, phone and logo from the EHR registration; each one is optional."""

    name: str | None = None
    phone: str | None = None
    logo_png: bytes | None = None


def _clean_line(value: object, *, max_chars: int) -> str | None:
    if not isinstance(value, str):
        return None
    cleaned = "".join(ch for ch in value if unicodedata.category(ch)[0] != "C" or ch == " ")
    cleaned = " ".join(cleaned.split())
    return cleaned[:max_chars].strip() or None


def clinic_details(name: object, phone: object, logo_file: object) -> ClinicDetails:
    """Clinic details from registration values, each dropped (with a warning, never an error) when it is
    missing or unusable: a phone that is not a phone number, a logo that is not a readable small PNG."""
    clean_phone = _clean_line(phone, max_chars=40)
    if clean_phone and not _PHONE.match(clean_phone):
        log.warning("handout: the registration's clinic_phone is not a phone number; left off the handout")
        clean_phone = None
    logo: bytes | None = None
    if isinstance(logo_file, str | Path) and str(logo_file):
        try:
            data = Path(logo_file).read_bytes()
            if len(data) > _MAX_LOGO_BYTES:
                raise ValueError(f"the logo is over {_MAX_LOGO_BYTES} bytes")
            png_size(data)
            logo = data
        except (OSError, ValueError) as error:
            log.warning("handout: the clinic logo is left off (%s)", type(error).__name__)
    return ClinicDetails(name=_clean_line(name, max_chars=80), phone=clean_phone, logo_png=logo)


class ClinicFields(Protocol):
    """The registration fields a handout uses (service.settings.EhrSettings has them)."""

    @property
    def clinic_name(self) -> str | None: ...
    @property
    def clinic_phone(self) -> str | None: ...
    @property
    def clinic_logo_file(self) -> Path | None: ...


def clinic_details_of(registration: ClinicFields) -> ClinicDetails:
    """The clinic details of an EHR registration (see :func:`clinic_details` for what is left off)."""
    return clinic_details(registration.clinic_name, registration.clinic_phone, registration.clinic_logo_file)


def find_unicode_fonts() -> tuple[Path, Path]:
    """Paths of a regular and a bold Unicode TTF font for Latin text available on this machine."""
    face = _face_for("Latn", "en")
    return face.regular, face.bold


def _face_for(script: str, language: str) -> FontFace:
    candidates = _FACES_BY_LANGUAGE.get(language, _FACES_BY_SCRIPT[script])
    for face in candidates:
        if face.available():
            return face
    packages = " or ".join(dict.fromkeys(face.package for face in candidates))
    raise RuntimeError(
        f"no font for {language} handouts on this machine; install the Debian package {packages} "
        "(scripts/bootstrap does)"
    )


def _image_size(png: bytes) -> tuple[int, int]:
    return png_size(png)  # service.images: the pixel cap (a clear ValueError) before anything is decoded


def _required(name: str, value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value


class _Writer:
    """Lays text out in the handout's direction: left-aligned (never justified) for left-to-right
    languages, right-aligned with right-to-left runs for Arabic."""

    def __init__(self, pdf: FPDF, pack: LanguagePack) -> None:
        self.pdf = pdf
        self.rtl = pack.direction == "rtl"
        self.width = pdf.w - 2 * _MARGIN_MM

    def text(
        self, text: str, size: float, style: str = "", *, dry_run: bool = False, **extra: object
    ) -> float:
        self.pdf.set_font(_FAMILY, style, size)
        line_height = size * 0.5
        if self.rtl:
            text = _RLM + text  # the paragraph is right to left even when it starts with a Latin name
        if dry_run:
            # output="LINES" makes multi_cell return the wrapped lines without drawing them.
            lines = cast(
                list[str],
                self.pdf.multi_cell(self.width, line_height, text, dry_run=True, output="LINES", **extra),  # type: ignore[arg-type]
            )
            return len(lines) * line_height
        self.pdf.multi_cell(
            self.width,
            line_height,
            text,
            align="R" if self.rtl else "L",
            new_x="LMARGIN",
            new_y="NEXT",
            **extra,  # type: ignore[arg-type]
        )
        return 0.0


def _fallback_faces(texts: Sequence[str], main_script: str, language: str) -> list[FontFace]:
    """Faces for characters the main font lacks: a Latin name in an Arabic handout, an Arabic or
    Chinese name in a Latin one. Only the scripts actually present are loaded (the CJK collection is big)."""
    scripts = {_primary_script(char) for text in texts for char in text} - {None, main_script}
    faces: list[FontFace] = []
    if main_script in ("Arab", "Hans", "Hang"):
        scripts.add("Latn")
    if main_script in ("Latn", "Cyrl") and "Cyrl" in scripts:
        scripts.discard("Cyrl")  # Noto Sans and DejaVu cover Cyrillic
    for script in sorted(s for s in scripts if s is not None):
        try:
            faces.append(_face_for(script, "ko" if script == "Hang" else language))
        except RuntimeError:
            log.warning("handout: no fallback font for %s text on this machine", script)
    return faces


def render_handout_pdf(
    *,
    png: bytes,
    title: str,
    caption: str,
    alt_text: str,
    language: str,
    created: date,
    page_size: PageSize = "letter",
    test_model_notice: str | bool | None = None,
    sections: TopicSections | None = None,
    patient_name: str | None = None,
    approved_by: str | None = None,
    clinic: ClinicDetails | None = None,
) -> bytes:
    """A handout PDF (Letter or A4) in ``language``: clinic name, phone and logo; title; for whom, the
    date and who gave it; the picture (its alt text attached); caption; the topic's sections; the AI
    disclosure; the test-model notice in the handout's language when ``test_model_notice`` is set (the
    caller's English wording is replaced by the language template's). Fonts are embedded (subsets).

    Document metadata holds only the title, the language, the producer and the date: no author,
    subject or keywords, so nothing about the patient is hidden in the file.
    """
    if page_size not in PAGE_SIZES:
        raise ValueError(f"unknown page_size {page_size!r}; allowed: {', '.join(PAGE_SIZES)}")
    packs = default_language_packs()
    if language not in packs:
        raise ValueError(f"unsupported language {language!r}; allowed: {', '.join(packs)}")
    title, caption, alt_text = (
        _required("title", title),
        _required("caption", caption),
        _required("alt_text", alt_text),
    )
    pixel_width, pixel_height = _image_size(png)
    return _render(
        png,
        (pixel_width, pixel_height),
        title,
        caption,
        alt_text,
        language,
        created,
        page_size,
        bool(test_model_notice),
        sections,
        _clean_line(patient_name, max_chars=120),
        _clean_line(approved_by, max_chars=120),
        clinic or ClinicDetails(),
    )


def _build(
    png: bytes,
    pixels: tuple[int, int],
    title: str,
    caption: str,
    alt_text: str,
    language: str,
    created: date,
    page_size: PageSize,
    test_model: bool,
    sections: TopicSections | None,
    patient: str | None,
    approver: str | None,
    clinic: ClinicDetails,
    *,
    fonts: FontCache | None,
) -> bytes:
    """The handout's bytes; ``fonts`` None parses every font for this document alone (fpdf2's own
    ``add_font``, as before the cache: bench/bench_handout_fonts.py compares the two)."""
    pixel_width, pixel_height = pixels
    pack = default_language_packs()[language]
    words = pack.chrome
    texts = _texts(title, caption, alt_text, sections, words, pack, clinic, patient, approver, created)

    pdf = FPDF(orientation="portrait", unit="mm", format=PAGE_SIZES[page_size])
    pdf.set_margins(_MARGIN_MM, _MARGIN_MM, _MARGIN_MM)
    pdf.set_auto_page_break(auto=True, margin=_MARGIN_MM)

    def add_face(family: str, face: FontFace) -> None:
        for style, path in (("", face.regular), ("B", face.bold)):
            if fonts is None:
                pdf.add_font(family, style, str(path), collection_font_number=face.index)
            else:
                fonts.add_font(pdf, family, style, path, index=face.index)

    add_face(_FAMILY, _face_for(pack.script, language))
    fallbacks = []
    for number, face in enumerate(_fallback_faces(list(texts.values()), pack.script, language)):
        family = f"HandoutFallback{number}"
        add_face(family, face)
        fallbacks.append(family)
    if fallbacks:
        pdf.set_fallback_fonts(fallbacks)
    # HarfBuzz shaping: Arabic letters join and runs go right to left; Latin gets its kerning.
    # The direction is left to the bidi algorithm per run (a phone number inside Arabic stays left to
    # right); right-to-left paragraphs start with a right-to-left mark (see _Writer.text).
    pdf.set_text_shaping(use_shaping_engine=True)
    pdf.set_creator(PRODUCER)
    pdf.set_producer(PRODUCER)
    pdf.set_title(title)
    pdf.set_lang(language)
    # The handout's own date, not the wall clock, so the same approval renders the same document.
    pdf.set_creation_date(datetime.combine(created, time(12, 0), tzinfo=UTC))
    pdf.set_display_mode(zoom="fullpage")
    pdf.add_page()
    writer = _Writer(pdf, pack)
    notice = words.test_model_notice if test_model else ""

    blocks = _blocks(texts, sections, words, notice)
    text_height = sum(
        (writer.text(text, size, style, dry_run=True) if text != _IMAGE else 0.0) + gap
        for text, size, style, gap in blocks
    )
    header_height = _LOGO_HEIGHT_MM + 3 if clinic.logo_png else 0.0
    # The image takes whatever height the text leaves, up to the full width, keeping its aspect ratio.
    available_height = max(_MIN_IMAGE_MM, pdf.h - 2 * _MARGIN_MM - text_height - header_height - 8)
    scale = min(writer.width / pixel_width, available_height / pixel_height)
    image_width, image_height = pixel_width * scale, pixel_height * scale

    if clinic.logo_png:
        logo_w, logo_h = _image_size(clinic.logo_png)
        width = _LOGO_HEIGHT_MM * logo_w / logo_h
        x = pdf.w - _MARGIN_MM - width if writer.rtl else _MARGIN_MM
        pdf.image(io.BytesIO(clinic.logo_png), x=x, y=pdf.get_y(), h=_LOGO_HEIGHT_MM, w=width)
        pdf.set_y(pdf.get_y() + _LOGO_HEIGHT_MM + 3)
    for text, size, style, gap in blocks:
        if text == _IMAGE:
            pdf.image(
                io.BytesIO(png),
                x=_MARGIN_MM + (writer.width - image_width) / 2,
                w=image_width,
                h=image_height,
                alt_text=alt_text,
            )
        elif text == notice and notice:
            pdf.set_draw_color(180, 0, 0)
            writer.text(text, size, style, border=1, padding=1)
        else:
            pdf.set_text_color(*((60, 60, 60) if text == texts["description"] else (0, 0, 0)))
            writer.text(text, size, style)
        pdf.ln(gap)
    if fonts is not None:
        fonts.before_output(pdf)
    return bytes(pdf.output())


_IMAGE = "\x00image"  # marks where the picture goes in the block list; never drawn as text


_LRI, _PDI = "\u2066", "\u2069"


# The same handout is often asked for several times in a row (the review page's page count, then each
# page image): identical inputs give identical bytes, so a few recent ones are kept in memory. It is
# ``_build`` with the shared font cache; the bench and tests call ``_build`` itself for ``fonts=None``.
_render = functools.lru_cache(maxsize=8)(functools.partial(_build, fonts=FONTS))


def _isolated(value: str, pack: LanguagePack) -> str:
    """A left-to-right value (phone, date, a Latin name) kept in its own order inside right-to-left text
    (Unicode bidi isolates), so "+1 (555) 010-2000" is not printed as "2000-010 (555) 1+"."""
    return f"{_LRI}{value}{_PDI}" if pack.direction == "rtl" else value


def _texts(
    title: str,
    caption: str,
    alt_text: str,
    sections: TopicSections | None,
    words: HandoutChrome,
    pack: LanguagePack,
    clinic: ClinicDetails,
    patient: str | None,
    approver: str | None,
    created: date,
) -> dict[str, str]:
    clinic_line = "   ".join(
        part
        for part in (
            clinic.name,
            f"{words.phone_label}: {_isolated(clinic.phone, pack)}" if clinic.phone else None,
        )
        if part
    )
    who = "   ".join(
        part
        for part in (
            f"{words.patient_label}: {_isolated(patient, pack)}" if patient else None,
            f"{words.date_label}: {_isolated(created.isoformat(), pack)}",
            f"{words.given_by_label}: {_isolated(approver, pack)}" if approver else None,
        )
        if part
    )
    texts = {
        "clinic": clinic_line,
        "title": title,
        "who": who,
        "caption": caption,
        "description": f"{words.description_label}: {alt_text}",
        "disclosure": words.disclosure,
        "language": f"{words.language_label}: {pack.name}",
    }
    if sections:
        texts.update(
            what=sections.what_it_is,
            do="\n".join(f"• {item}" for item in sections.can_do),
            call=sections.when_to_call,
            now=sections.get_help_now,
        )
    return texts


def _blocks(
    texts: dict[str, str], sections: TopicSections | None, words: HandoutChrome, notice: str
) -> list[tuple[str, float, str, float]]:
    """(text, size, style, gap after) in reading order; the image's place is marked by _IMAGE."""
    blocks: list[tuple[str, float, str, float]] = []
    if texts["clinic"]:
        blocks.append((texts["clinic"], 12, "B", 2))
    blocks += [(texts["title"], 20, "B", 1), (texts["who"], 11, "", 3), (_IMAGE, 0, "", 3)]
    blocks.append((texts["caption"], 14, "", 3))
    if sections:
        for heading, key in (
            (words.what_heading, "what"),
            (words.do_heading, "do"),
            (words.call_heading, "call"),
            (words.now_heading, "now"),
        ):
            blocks += [(heading, 13, "B", 0.5), (texts[key], 12, "", 2.5)]
    blocks += [
        (texts["description"], 10, "", 2),
        (texts["disclosure"], 10, "B", 0),
        (texts["language"], 10, "", 0),
    ]
    if notice:
        blocks[-1] = (*blocks[-1][:3], 3.0)
        blocks.append((notice, 10, "B", 0))
    return blocks
