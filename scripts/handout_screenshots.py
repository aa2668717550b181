"""Write PNG renders of the handout in three languages (Spanish, Vietnamese, Arabic right to left) to
docs/screenshots/, as the sandbox's Maria Rivera, Linh Nguyen and Layla Haddad would get them.

The picture is a plain placeholder drawn here (the offline test model only makes noise); everything else
is the real handout: the language template's words and sections, fonts, shaping and direction.
Run: .venv/bin/python scripts/handout_screenshots.py [output folder]
"""

from __future__ import annotations

import io
import sys
from datetime import date
from pathlib import Path

import pypdfium2 as pdfium
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.generation.handout import ClinicDetails, render_handout_pdf  # noqa: E402
from service.generation.prompts import load_prompt_library  # noqa: E402

# (file name, language, topic, patient) — the sandbox patients whose records prefer these languages.
HANDOUTS = (
    ("handout-es.png", "es", "hypertension", "Maria Rivera"),
    ("handout-vi.png", "vi", "type-2-diabetes", "Linh Nguyen"),
    ("handout-ar.png", "ar", "asthma", "Layla Haddad"),
)


def placeholder_picture() -> bytes:
    """A calm flat drawing standing in for the generated illustration."""
    image = Image.new("RGB", (768, 512), (236, 244, 250))
    draw = ImageDraw.Draw(image)
    draw.ellipse((250, 120, 520, 390), fill=(120, 180, 220))
    draw.ellipse((310, 180, 460, 330), fill=(250, 250, 245))
    draw.rectangle((0, 430, 768, 512), fill=(170, 210, 170))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def render_pngs(folder: Path, *, scale: float = 1.5) -> list[Path]:
    """Render each handout to PDF and rasterise its first page with pdfium; returns the files written."""
    library = load_prompt_library(ROOT / "templates")
    folder.mkdir(parents=True, exist_ok=True)
    picture = placeholder_picture()
    written = []
    for name, language, topic_id, patient in HANDOUTS:
        words = library.topic(topic_id).text[language]
        pdf = render_handout_pdf(
            png=picture,
            title=words.title,
            caption=words.caption,
            alt_text=words.alt_text,
            language=language,
            created=date(2026, 12, 1),
            sections=words.sections,
            patient_name=patient,
            approved_by="Dr. Sam Okafor",
            clinic=ClinicDetails(name="Riverside Family Clinic", phone="+1 (555) 010-2000"),
        )
        page = pdfium.PdfDocument(pdf)[0]
        path = folder / name
        page.render(scale=scale).to_pil().convert("RGB").save(path, "PNG", optimize=True)
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "screenshots"
    for path in render_pngs(target):
        print(path)
