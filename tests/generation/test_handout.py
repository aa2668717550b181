"""Handout PDF: page sizes, every language (words, sections, script, fonts, direction), alt text, metadata."""

from __future__ import annotations

import functools
import io
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import fpdf
import pypdfium2 as pdfium
import pytest
from PIL import Image
from pypdf import PdfReader

from service.generation import handout
from service.generation.handout import ClinicDetails, clinic_details, clinic_details_of, render_handout_pdf
from service.generation.languages import LANGUAGE_CODES
from service.generation.pdf_fonts import FontCache
from service.generation.prompts import PromptLibrary, load_prompt_library
from service.generation.readability import caption_grade
from service.settings import EhrSettings


def png_bytes(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def render(**overrides: object) -> bytes:
    arguments: dict[str, object] = {
        "png": png_bytes(),
        "title": "High blood pressure",
        "caption": "Your heart pushes blood through tubes in your body.",
        "alt_text": "A heart pushing blood through tubes, like water in a hose.",
        "language": "en",
        "created": date(2025, 3, 4),
    }
    arguments.update(overrides)
    return render_handout_pdf(**arguments)  # type: ignore[arg-type]


def page_text(pdf: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)


def test_english_handout_has_all_texts_on_one_letter_page() -> None:
    pdf = render()
    assert pdf.startswith(b"%PDF-")
    reader = PdfReader(io.BytesIO(pdf))
    assert len(reader.pages) == 1
    box = reader.pages[0].mediabox
    assert (float(box.width), float(box.height)) == pytest.approx((612, 792))
    text = page_text(pdf)
    for expected in (
        "High blood pressure",
        "Your heart pushes blood through tubes in your body.",
        "Picture description: A heart pushing blood through tubes, like water in a hose.",
        "Made with AI and reviewed by your care team",
        "Date: 2025-03-04",
        "Language: English",
    ):
        assert expected in text


def test_a4_page_size() -> None:
    box = PdfReader(io.BytesIO(render(page_size="a4"))).pages[0].mediabox
    assert (float(box.width), float(box.height)) == pytest.approx((595.28, 841.89), abs=0.01)


def test_spanish_handout_keeps_accents_and_uses_spanish_labels() -> None:
    pdf = render(
        title="Presión arterial alta",
        caption="Su corazón empuja la sangre. ¿Qué más? Años, niños, pingüino.",
        alt_text="Un corazón que empuja la sangre por tubos.",
        language="es",
        page_size="a4",
    )
    text = page_text(pdf)
    for expected in (
        "Presión arterial alta",
        "Su corazón empuja la sangre. ¿Qué más? Años, niños, pingüino.",
        "Descripción de la imagen: Un corazón que empuja la sangre por tubos.",
        "Hecho con IA y revisado por su equipo de atención médica",
        "Fecha: 2025-03-04",
        "Idioma: Español",
    ):
        assert expected in text
    assert PdfReader(io.BytesIO(pdf)).trailer["/Root"]["/Lang"] == "es"


def figure_alt_texts(node: object) -> list[str]:
    node = node.get_object() if hasattr(node, "get_object") else node
    found: list[str] = []
    if isinstance(node, dict):
        if node.get("/S") == "/Figure" and "/Alt" in node:
            found.append(str(node["/Alt"]))
        children = node.get("/K")
        for child in children if isinstance(children, list) else [children] if children is not None else []:
            found += figure_alt_texts(child)
    return found


def test_image_is_embedded_with_its_alt_text() -> None:
    pdf = render(png=png_bytes(80, 40))
    page = PdfReader(io.BytesIO(pdf)).pages[0]
    images = page.images
    assert len(images) == 1
    assert images[0].image.size == (80, 40)
    # Tagged PDF: the image is a /Figure in the structure tree carrying the alt text for screen readers.
    structure = PdfReader(io.BytesIO(pdf)).trailer["/Root"]["/StructTreeRoot"]
    assert figure_alt_texts(structure) == ["A heart pushing blood through tubes, like water in a hose."]


def test_metadata_holds_no_author_subject_or_keywords() -> None:
    metadata = PdfReader(io.BytesIO(render())).metadata
    assert metadata is not None
    assert set(metadata) == {"/Title", "/Creator", "/Producer", "/CreationDate"}
    assert metadata["/Creator"] == metadata["/Producer"] == "CareCanvas"
    assert metadata["/CreationDate"].startswith("D:20250304")


def test_same_input_renders_the_same_bytes() -> None:
    assert render() == render()


def test_test_model_notice_is_printed_only_when_given_and_in_the_handouts_language() -> None:
    assert "Test picture" not in page_text(render())
    english = "Test model: this picture is random noise, not a medical illustration."
    assert "Test picture: a test model made this." in page_text(render(test_model_notice=english))
    # The caller's English wording never reaches a Spanish handout: the language template's does.
    spanish = page_text(render(test_model_notice=english, language="es"))
    assert "Imagen de prueba: la hizo un modelo de prueba." in spanish
    assert "Test" not in spanish


def test_long_caption_shrinks_the_image_and_stays_on_one_page() -> None:
    caption = " ".join(["Take your medicine each day and walk when you can."] * 12)
    pdf = render(caption=caption, png=png_bytes(512, 512))
    reader = PdfReader(io.BytesIO(pdf))
    assert len(reader.pages) == 1
    assert caption.split(".")[0] in page_text(pdf)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"png": b"not an image"}, "png is not a readable PNG image"),
        ({"png": b""}, "png is not a readable PNG image"),
        ({"caption": "   "}, "caption must not be empty"),
        ({"title": ""}, "title must not be empty"),
        ({"alt_text": "\n"}, "alt_text must not be empty"),
        ({"language": "fr"}, "unsupported language 'fr'; allowed: en, es, zh-Hans, vi, tl, ar, ko, ru"),
        ({"page_size": "legal"}, "unknown page_size 'legal'; allowed: letter, a4"),
    ],
)
def test_bad_input_is_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render(**overrides)


def test_non_png_image_is_refused() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    with pytest.raises(ValueError, match="png must be a PNG image, got JPEG"):
        render(png=buffer.getvalue())


# --- every language: sections, script, fonts, direction, alignment ------------------------------------------

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
# Bidi controls the renderer adds around left-to-right values and at the start of right-to-left lines.
_BIDI_CONTROLS = dict.fromkeys(map(ord, "\u2066\u2067\u2068\u2069\u200e\u200f"), None)
_SCRIPT_RANGES = {
    "Latn": [(0x41, 0x24F), (0x1E00, 0x1EFF)],
    "Cyrl": [(0x400, 0x4FF)],
    "Arab": [(0x600, 0x6FF)],
    "Hans": [(0x4E00, 0x9FFF)],
    "Hang": [(0xAC00, 0xD7A3)],
}


@functools.cache
def library() -> PromptLibrary:
    return load_prompt_library(TEMPLATES)


@functools.cache
def full_handout(language: str, topic_id: str = "anaemia") -> bytes:
    """One handout per language with every part filled in (rendered once per test session)."""
    words = library().topic(topic_id).text[language]
    return render_handout_pdf(
        png=png_bytes(64, 48),
        title=words.title,
        caption=words.caption,
        alt_text=words.alt_text,
        language=language,
        created=date(2025, 3, 4),
        sections=words.sections,
        patient_name="Layla Haddad",
        approved_by="Dr. Ana López",
        clinic=ClinicDetails(name="Riverside Family Clinic", phone="+1 (555) 010-2000"),
        test_model_notice=True,
    )


def extracted(pdf: bytes) -> str:
    """pypdf's text with bidi controls dropped. pypdf puts a NUL before each character of the CJK
    collection fonts (pdfium reads the same file cleanly); the NULs are dropped too."""
    return page_text(pdf).replace("\x00", "").translate(_BIDI_CONTROLS)


def squeezed(text: str) -> str:
    return "".join(text.split())


def in_script(text: str, script: str) -> float:
    """Share of the letters in ``text`` that belong to ``script``."""
    letters = [char for char in text if char.isalpha()]
    inside = [c for c in letters if any(low <= ord(c) <= high for low, high in _SCRIPT_RANGES[script])]
    return len(inside) / len(letters)


@pytest.mark.parametrize("language", LANGUAGE_CODES)
def test_every_language_prints_its_words_and_sections_in_its_script(language: str) -> None:
    pack = library().languages[language]
    words = library().topic("anaemia").text[language]
    assert words.sections is not None
    text = squeezed(extracted(full_handout(language)))
    expected = [
        words.title,
        words.caption,
        words.sections.what_it_is,
        *words.sections.can_do,
        words.sections.when_to_call,
        words.sections.get_help_now,
        pack.chrome.what_heading,
        pack.chrome.do_heading,
        pack.chrome.call_heading,
        pack.chrome.now_heading,
        pack.chrome.disclosure,
        pack.chrome.test_model_notice,
        f"{pack.chrome.description_label}: {words.alt_text}",
        "Riverside Family Clinic",
        "+1 (555) 010-2000",
        "Layla Haddad",
        "2025-03-04",
        "Dr. Ana López",
    ]
    # Compared without whitespace: lines wrap, and pypdf puts spaces between CJK characters.
    for part in expected:
        assert squeezed(part) in text, f"{language}: {part!r} is not in the handout"
    assert in_script(words.sections.what_it_is, pack.script) > 0.9
    assert PdfReader(io.BytesIO(full_handout(language))).trailer["/Root"]["/Lang"] == language


def embedded_font_files(pdf: bytes) -> dict[str, bool]:
    fonts: dict[str, bool] = {}
    for page in PdfReader(io.BytesIO(pdf)).pages:
        for font in page["/Resources"]["/Font"].values():
            font = font.get_object()
            described = font["/DescendantFonts"][0].get_object() if "/DescendantFonts" in font else font
            descriptor = described["/FontDescriptor"].get_object()
            fonts[str(font["/BaseFont"])] = any(
                key in descriptor for key in ("/FontFile", "/FontFile2", "/FontFile3")
            )
    return fonts


@pytest.mark.parametrize(
    ("language", "family"),
    [("vi", "NotoSans"), ("ar", "NotoNaskhArabic"), ("zh-Hans", "NotoSansCJKSC"), ("ko", "NotoSansCJKKR")],
)
def test_fonts_cover_the_language_and_are_embedded(language: str, family: str) -> None:
    fonts = embedded_font_files(full_handout(language))
    assert any(family in name for name in fonts), fonts
    assert all(fonts.values()), f"not embedded: {[name for name, ok in fonts.items() if not ok]}"


def test_arabic_text_is_stored_in_logical_order() -> None:
    text = extracted(full_handout("ar"))
    # The words of the first section, in reading order: a visual-order (reversed) file fails this.
    words = library().topic("anaemia").text["ar"].sections.what_it_is.split()  # type: ignore[union-attr]
    position = 0
    for word in words:
        found = text.find(word.strip(".،"), position)
        assert found >= 0, f"{word!r} missing or out of order"
        position = found + 1


def visual_lines(pdf: bytes) -> list[list[tuple[float, float, str]]]:
    """Page 1's characters as (left x, right x, char), grouped into lines top to bottom (pdfium boxes;
    characters whose vertical centres are within 5 pt share a line, whatever font they come from)."""
    text_page = pdfium.PdfDocument(pdf)[0].get_textpage()
    chars = []
    for index in range(text_page.count_chars()):
        char = text_page.get_text_range(index, 1)
        if char.isspace() or not char:
            continue
        left, bottom, right, top = text_page.get_charbox(index)
        chars.append(((bottom + top) / 2, left, right, char))
    lines: list[list[tuple[float, float, str]]] = []
    previous: float | None = None
    for centre, left, right, char in sorted(chars, key=lambda c: -c[0]):
        if previous is None or previous - centre > 5:
            lines.append([])
        lines[-1].append((left, right, char))
        previous = centre
    return [sorted(line) for line in lines]


def line_edges(pdf: bytes) -> list[tuple[float, float]]:
    """(left x, right x) of every text line on page 1."""
    return [(min(c[0] for c in line), max(c[1] for c in line)) for line in visual_lines(pdf)]


def test_text_is_left_aligned_not_justified() -> None:
    caption = " ".join(["Take your medicine each day and walk when you can, most days."] * 6)
    pdf = render(caption=caption, alt_text="A short description.")
    margin = 18 / 25.4 * 72
    # The caption wraps to several long lines starting at the left margin. Justified text (the first
    # version) ends every one of them at the same x; left-aligned text ends where its last word ends.
    rights = [round(right) for left, right in line_edges(pdf) if abs(left - margin) < 4 and right > 400]
    assert len(rights) >= 4
    assert max(rights.count(right) for right in rights) <= 2, rights


def test_arabic_lines_are_right_aligned() -> None:
    pdf = full_handout("ar")
    width = float(PdfReader(io.BytesIO(pdf)).pages[0].mediabox.width)
    margin = 18 / 25.4 * 72
    edges = line_edges(pdf)
    assert len(edges) > 15
    # Every line ends at the right margin (a glyph's side bearing apart); short ones start far from the left.
    assert all(abs(right - (width - margin)) < 4 for _left, right in edges), edges
    assert sum(left - margin > 100 for left, _right in edges) >= 5


def test_phone_and_date_keep_their_order_inside_arabic() -> None:
    visual = ["".join(char for _l, _r, char in line) for line in visual_lines(full_handout("ar"))]
    # Read left to right as printed: "+1 (555) 010-2000", not "2000-010 (555) 1+" (digits runs reordered).
    assert any("+1(555)010-2000" in line for line in visual), visual[:3]
    assert any("2025-03-04" in line for line in visual), visual[:3]


def test_clinic_patient_date_and_approver_are_printed() -> None:
    text = page_text(
        render(
            patient_name="Maria Rivera",
            approved_by="Dr. Sam Okafor",
            clinic=ClinicDetails(name="Lakeside Clinic", phone="555-0100 ext 12"),
        )
    )
    for expected in (
        "Lakeside Clinic",
        "Phone: 555-0100 ext 12",
        "For: Maria Rivera",
        "Given by: Dr. Sam Okafor",
    ):
        assert expected in text
    # The patient's name is on the page for the patient, never in the file's metadata.
    metadata = PdfReader(io.BytesIO(render(patient_name="Maria Rivera"))).metadata
    assert metadata is not None
    assert "Maria" not in str(dict(metadata))


def test_logo_from_the_registration_is_printed(tmp_path: Path) -> None:
    logo = tmp_path / "logo.png"
    logo.write_bytes(png_bytes(40, 20))
    clinic = clinic_details("Lakeside Clinic", "+1 555 010 0100", logo)
    assert clinic.logo_png == logo.read_bytes()
    images = PdfReader(io.BytesIO(render(clinic=clinic))).pages[0].images
    assert sorted(image.image.size for image in images) == [(40, 20), (64, 48)]


@pytest.mark.parametrize(
    ("name", "phone", "logo"),
    [
        (None, None, None),
        ("", "call us!", "missing.png"),
        ("Clinic\x00\u202e", "12", "not-a-png.png"),
        ("  ", "+1 555 010 0100; DROP", "huge.png"),
    ],
)
def test_missing_or_bad_registration_fields_are_left_off(
    tmp_path: Path, name: str | None, phone: str | None, logo: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "not-a-png.png").write_bytes(b"GIF89a not really")
    (tmp_path / "huge.png").write_bytes(png_bytes(4000, 4000) + b"\x00" * 1_000_000)
    clinic = clinic_details(name, phone, tmp_path / logo if logo else None)
    assert clinic.phone is None
    assert clinic.logo_png is None
    assert clinic.name in (None, "Clinic")
    pdf = render(clinic=clinic)
    assert len(PdfReader(io.BytesIO(pdf)).pages[0].images) == 1
    assert "Phone" not in page_text(pdf)


def test_a_language_without_its_font_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = handout.FontFace(Path("/nowhere/a.ttc"), Path("/nowhere/b.ttc"), 2, "fonts-noto-cjk")
    monkeypatch.setitem(handout._FACES_BY_SCRIPT, "Hans", (missing,))
    with pytest.raises(RuntimeError, match="install the Debian package fonts-noto-cjk"):
        render(language="zh-Hans", title="贫血", caption="红细胞太少。", alt_text="红细胞。")


def test_a_long_handout_with_sections_stays_on_one_page() -> None:
    for language in ("en", "ru"):
        assert len(PdfReader(io.BytesIO(full_handout(language, "heart-failure"))).pages) == 1


def test_clinic_details_come_from_the_ehr_registration(tmp_path: Path) -> None:
    logo = tmp_path / "logo.png"
    logo.write_bytes(png_bytes(30, 10))
    ehr = EhrSettings(
        name="lakeside",
        iss="https://ehr.example/fhir",
        client_id="carecanvas",
        clinic_name="Lakeside Clinic",
        clinic_phone="+1 555 010 0100",
        clinic_logo_file=logo,
    )
    assert clinic_details_of(ehr) == ClinicDetails("Lakeside Clinic", "+1 555 010 0100", logo.read_bytes())
    bare = EhrSettings(name="bare", iss="https://ehr.example/fhir", client_id="carecanvas")
    assert clinic_details_of(bare) == ClinicDetails()


def test_the_same_handout_asked_for_again_is_not_laid_out_again() -> None:
    first = render(language="es", caption="Su corazón empuja la sangre.")
    assert render(language="es", caption="Su corazón empuja la sangre.") is first  # kept in memory
    assert render(language="es", caption="Otra frase.") != first


# --- fonts parsed once per process (service/generation/pdf_fonts.py) ----------------------------------------


def build_both_ways(language: str, caption_suffix: str = "") -> tuple[bytes, bytes, FontCache]:
    words = library().topic("anaemia").text[language]
    fonts = FontCache()
    arguments = (
        png_bytes(64, 48),
        (64, 48),
        words.title,
        words.caption + caption_suffix,
        words.alt_text,
        language,
        date(2025, 3, 4),
        "letter",
        True,
        words.sections,
        "Layla Haddad",
        "Dr. Ana López",
        ClinicDetails(name="Riverside Family Clinic", phone="+1 (555) 010-2000"),
    )
    fresh = handout._build(*arguments, fonts=None)  # type: ignore[arg-type]
    handout._build(*arguments, fonts=fonts)  # type: ignore[arg-type]  # the first document fills the cache
    cached = handout._build(*arguments, fonts=fonts)  # type: ignore[arg-type]
    return fresh, cached, fonts


@pytest.mark.parametrize("language", LANGUAGE_CODES)
def test_fonts_parsed_once_give_the_same_bytes_as_fonts_parsed_per_document(language: str) -> None:
    fresh, cached, _fonts = build_both_ways(language)
    # The same file: fonts, subsets, glyph codes and all (the second cached document reuses the faces).
    assert cached == fresh


def test_a_face_is_parsed_once_and_the_shared_copy_is_never_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    _fresh, _cached, fonts = build_both_ways("zh-Hans")
    prototypes = dict(fonts._prototypes)
    glyphs = {key: len(font.ttfont.getGlyphOrder()) for key, font in prototypes.items()}
    assert all(count > 60_000 for key, count in glyphs.items() if "CJK" in key[0]), glyphs  # not a subset

    parsed: list[str] = []
    real_add_font = fpdf.FPDF.add_font

    def counting_add_font(self: fpdf.FPDF, *args: object, **kwargs: object) -> None:
        parsed.append(str(args))
        real_add_font(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fpdf.FPDF, "add_font", counting_add_font)
    words = library().topic("asthma").text["zh-Hans"]
    pdf = handout._build(
        png_bytes(64, 48), (64, 48), words.title, words.caption, words.alt_text, "zh-Hans", date(2025, 3, 4),
        "a4", False, words.sections, None, None, ClinicDetails(), fonts=fonts,
    )  # fmt: skip
    assert parsed == []  # every face came from the cache
    assert fonts._prototypes == prototypes
    assert squeezed(words.sections.what_it_is) in squeezed(extracted(pdf))  # type: ignore[union-attr]


# --- each section read back from the PDF, and graded there --------------------------------------------------


def pdf_sections(pdf: bytes, language: str) -> dict[str, str]:
    """The text under each section heading as pypdf reads it back from the PDF (wrapped lines joined)."""
    chrome = library().languages[language].chrome
    lines = [line.strip() for line in extracted(pdf).splitlines() if line.strip()]
    headings = {
        chrome.what_heading: "what",
        chrome.do_heading: "do",
        chrome.call_heading: "call",
        chrome.now_heading: "now",
    }
    found: dict[str, list[str]] = {}
    current: str | None = None
    for line in lines:
        if line in headings:
            current = headings[line]
            found[current] = []
        elif line.startswith(f"{chrome.description_label}:"):
            current = None
        elif current is not None:
            found[current].append(line)
    return {key: " ".join(value) for key, value in found.items()}


@pytest.mark.parametrize("language", ["en", "es"])
def test_every_topics_sections_read_back_from_the_pdf_at_grade_6(language: str) -> None:
    """Per topic, each section as pypdf reads it from the printed handout (not the template): its words are
    the template's, and its reading grade (Flesch-Kincaid; Fernández-Huerta for Spanish) is at most 6."""
    for topic in library().topics:
        words = topic.text[language]
        assert words.sections is not None, topic.id
        pdf = render(
            title=words.title, caption=words.caption, alt_text=words.alt_text, language=language,
            sections=words.sections,
        )  # fmt: skip
        read = pdf_sections(pdf, language)
        assert sorted(read) == ["call", "do", "now", "what"], (topic.id, read)
        expected = {
            "what": words.sections.what_it_is,
            "do": " ".join(f"• {item}" for item in words.sections.can_do),
            "call": words.sections.when_to_call,
            "now": words.sections.get_help_now,
        }
        for key, text in read.items():
            assert squeezed(text) == squeezed(expected[key]), (topic.id, key, text)
            graded = text.replace("•", " ") if key == "do" else text
            grade = caption_grade(graded, language)
            assert grade <= 6.0, f"{topic.id}/{language}/{key}: grade {grade} in the PDF: {text!r}"


def test_handouts_built_in_several_threads_at_once_are_each_right() -> None:
    """The web process lays handouts out in worker threads: documents sharing the parsed faces (and their
    HarfBuzz faces) at the same time come out as they do one at a time."""
    fonts = FontCache()
    jobs = [
        (language, topic) for language in ("zh-Hans", "ko", "ar", "en") for topic in ("asthma", "anaemia")
    ]

    def build(job: tuple[str, str]) -> bytes:
        language, topic = job
        words = library().topic(topic).text[language]
        return handout._build(
            png_bytes(64, 48), (64, 48), words.title, words.caption, words.alt_text, language,
            date(2025, 3, 4), "letter", False, words.sections, "Layla Haddad", "Dr. Ana López",
            ClinicDetails(), fonts=fonts,
        )  # fmt: skip

    alone = [build(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(build, jobs * 2))
    assert together == alone * 2
