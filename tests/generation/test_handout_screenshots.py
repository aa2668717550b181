"""The README's handout screenshots (Spanish, Vietnamese, Arabic right to left) are written by this test,
from the real handout PDF (scripts/handout_screenshots.py rasterises it with pdfium), and checked: each is
a whole page with text; the Arabic one's lines end at the right margin, the others' start at the left."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"


def screenshot_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "handout_screenshots", ROOT / "scripts" / "handout_screenshots.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def text_edges(path: Path) -> tuple[float, float]:
    """Median left and right edge (as a share of the width) of the dark pixel rows: where text lines start
    and end. The picture (light blue, green) is not dark; text is black or grey."""
    pixels = np.asarray(Image.open(path).convert("L"))
    dark = pixels < 110
    rows = [np.flatnonzero(row) for row in dark if row.sum() > 3]
    assert len(rows) > 100, f"{path.name}: hardly any text"
    width = pixels.shape[1]
    return float(np.median([row[0] for row in rows])) / width, float(
        np.median([row[-1] for row in rows])
    ) / width


def test_the_readme_handout_screenshots_are_written_from_the_real_pdf() -> None:
    written = screenshot_script().render_pngs(SCREENSHOTS)
    assert sorted(path.name for path in written) == ["handout-ar.png", "handout-es.png", "handout-vi.png"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in written:
        assert f"docs/screenshots/{path.name}" in readme
        with Image.open(path) as image:
            width, height = image.size
        assert (width, height) == (918, 1188)  # a US Letter page at 1.5x
    margin = 18 / 215.9  # 18 mm of 8.5 in
    for name in ("handout-es.png", "handout-vi.png"):
        left, right = text_edges(SCREENSHOTS / name)
        assert abs(left - margin) < 0.02, (name, left)  # left to right: lines start at the left margin
        assert right < 1 - margin - 0.05, (name, right)
    left, right = text_edges(SCREENSHOTS / "handout-ar.png")
    assert abs(right - (1 - margin)) < 0.02, right  # right to left: lines end at the right margin
    assert left > margin + 0.05, left
