"""Handout PDF build time per language: fonts parsed for every PDF (fpdf2's own add_font, before) vs parsed
once per process (service/generation/pdf_fonts.py, now), side by side.

Run: `python -m bench.bench_handout_fonts [--rounds 7] [--languages en,ar,zh-Hans,ko] [--quick]`. Prints a
markdown table. Each round builds the same full handout (anaemia: title, caption, every section, clinic,
patient, approver, the test-model notice) once each way, the order alternating per round, with a caption that
changes per round so nothing is served from a cache of whole PDFs; the ratio column is the median of the
per-round ratios, so load on the machine hits both alike. Both ways must give the same bytes (checked).
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import fpdf
from PIL import Image

from service.generation import handout
from service.generation.handout import ClinicDetails
from service.generation.languages import LANGUAGE_CODES
from service.generation.pdf_fonts import FontCache
from service.generation.prompts import load_prompt_library

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


def picture() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (512, 512), (30, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def measure(language: str, *, rounds: int) -> tuple[float, float, float, int]:
    """(median ms before, median ms now, median per-round ratio before/now, PDF bytes)."""
    words = load_prompt_library(TEMPLATES).topic("anaemia").text[language]
    png = picture()
    fonts = FontCache()

    def build(round_index: int, cached: bool) -> bytes:
        return handout._build(
            png,
            (512, 512),
            words.title,
            f"{words.caption} {round_index}",
            words.alt_text,
            language,
            date(2025, 3, 4),
            "letter",
            True,
            words.sections,
            "Layla Haddad",
            "Dr. Ana López",
            ClinicDetails(name="Riverside Family Clinic", phone="+1 (555) 010-2000"),
            fonts=fonts if cached else None,
        )

    size = len(build(-1, True))  # warm-up: the cache's one parse per face, imports
    assert build(-1, False) == build(-1, True), f"{language}: the cached fonts changed the PDF"
    before: list[float] = []
    now: list[float] = []
    for round_index in range(rounds):
        for cached in (False, True) if round_index % 2 == 0 else (True, False):
            started = time.perf_counter()
            build(round_index, cached)
            (now if cached else before).append(time.perf_counter() - started)
    ratio = statistics.median(b / n for b, n in zip(before, now, strict=True))
    return statistics.median(before) * 1000, statistics.median(now) * 1000, ratio, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--languages", default=",".join(LANGUAGE_CODES))
    parser.add_argument("--quick", action="store_true", help="one round, English and Korean (a smoke test)")
    args = parser.parse_args()
    languages = ["en", "ko"] if args.quick else args.languages.split(",")
    rounds = 1 if args.quick else args.rounds
    print(
        f"Python {platform.python_version()}, {platform.machine()}, fpdf2 {fpdf.__version__}, {rounds} rounds"
    )
    print()
    print("| language | before ms (median) | now ms (median) | before / now (median of rounds) | PDF KiB |")
    print("|---|---:|---:|---:|---:|")
    for language in languages:
        before, now, ratio, size = measure(language, rounds=rounds)
        print(f"| {language} | {before:.0f} | {now:.0f} | {ratio:.2f}× | {size / 1024:.0f} |")


if __name__ == "__main__":
    main()
