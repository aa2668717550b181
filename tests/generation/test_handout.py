"""Handout PDF: page sizes, texts (incl. Spanish), alt text on the image, metadata without patient data."""

from __future__ import annotations

import io
from datetime import date

import pytest
from PIL import Image
from pypdf import PdfReader

from service.generation.handout import render_handout_pdf


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
        "Idioma: español",
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


def test_test_model_notice_is_printed_only_when_given() -> None:
    assert "Test model" not in page_text(render())
    notice = "Test model: this picture is random noise, not a medical illustration."
    assert notice in page_text(render(test_model_notice=notice))


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
        ({"language": "fr"}, "unsupported language 'fr'; allowed: en, es"),
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
