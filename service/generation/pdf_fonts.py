"""Handout fonts parsed once per process, not once per PDF.

fpdf2's ``FPDF.add_font`` parses the whole font file for every document: for the Noto Sans CJK faces
(65,535 glyphs each, two faces per Chinese or Korean handout) that is most of the time a handout takes,
and the subsetting at ``output()`` parses the same tables again. Here each face is parsed once per process
(a prototype: character map, widths, glyph ids, the HarfBuzz font for shaping), and each document gets a
light copy holding its own per-document state (which glyphs it used, its font number, a HarfBuzz font over
the shared face), so documents may be built in several threads at once. At ``output()``
every copy gets a fresh, lazily opened font to subset (fontTools subsets in place, so the shared one is
never handed over); for a CID-keyed CFF face only the ``CFF `` table is embedded, so the tables the PDF
never carries (character map, metrics, layout) are left unread instead of being parsed and subset.

The result is the same bytes as fpdf2's own ``add_font`` (tests/generation/test_handout.py checks it per
language). This relies on fpdf2's ``TTFFont`` attributes, so fpdf2 is pinned (pyproject.toml).
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

from fontTools import ttLib
from fpdf import FPDF
from fpdf.fonts import HarfBuzzFont, SubsetMap, TTFFont

# Attributes that depend only on the font file, shared by every document's copy (read-only after parsing).
_SHARED = (
    "type",
    "ttffile",
    "scale",
    "name",
    "up",
    "ut",
    "sp",
    "ss",
    "is_compressed",
    "is_cff",
    "is_cid_keyed",
    "is_symbol",
    "cff_ros",
    "collection_font_number",
    "ttfont",
    "cmap",
    "glyph_ids",
    "color_font",
    "palette_index",
)
_UNUSED_AFTER_PARSING = ("CFF ", "cmap", "glyf", "loca", "GSUB", "GPOS", "GDEF")
# Tables a CID-keyed CFF face needs to be subset and saved; fpdf2 embeds its ``CFF `` table only.
_CFF_CID_TABLES = frozenset({"CFF ", "head", "maxp"})


class FontCache:
    """Faces parsed once (per file, face number and style) and copied into each document."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prototypes: dict[tuple[str, int, str], TTFFont] = {}

    def _prototype(self, path: Path, index: int, style: str) -> TTFFont:
        key = (str(path), index, style)
        with self._lock:
            found = self._prototypes.get(key)
            if found is None:
                scratch = FPDF()
                scratch.add_font("prototype", style, str(path), collection_font_number=index)
                loaded = scratch.fonts[f"prototype{style}"]
                if not isinstance(loaded, TTFFont):  # add_font makes one for every font file
                    raise TypeError(f"{path} did not load as a TrueType/OpenType font")
                found = loaded
                # Read now what shaping reads later (glyph names, widths, the HarfBuzz font), so documents
                # rendered in different threads never load a lazy table of the shared font at once.
                found.ttfont.getGlyphOrder()
                found.ttfont["hmtx"]
                found.hbfont  # noqa: B018 - a property that loads the HarfBuzz font
                # What shaping never reads again is let go (the CFF table alone holds ~15 MB of a CJK face;
                # its glyph order is kept, and the character map is the prototype's own ``cmap``).
                for tag in _UNUSED_AFTER_PARSING:
                    found.ttfont.tables.pop(tag, None)
                found.ttfont.close()  # the file: everything shaping reads is loaded
                self._prototypes[key] = found
            return found

    def add_font(self, pdf: FPDF, family: str, style: str, path: Path, *, index: int = 0) -> None:
        """What ``pdf.add_font(family, style, path, collection_font_number=index)`` does, from the cache."""
        prototype = self._prototype(path, index, style)
        font = TTFFont.__new__(TTFFont)
        for name in _SHARED:
            setattr(font, name, getattr(prototype, name))
        font.i = len(pdf.fonts) + 1
        font.fontkey = f"{family.lower()}{style}"
        font.emphasis = prototype.emphasis
        font.desc = copy.copy(prototype.desc)  # output() names and numbers it per document
        font.cw = prototype.cw.copy()  # a defaultdict: reading a missing character adds it
        font.missing_glyphs = []
        font.biggest_size_pt = 0
        font.subset = SubsetMap(font)
        # A HarfBuzz font of its own over the shared face: shaping sets its point size (ptem), so documents
        # built in different threads never share one.
        font._hbfont = HarfBuzzFont(prototype.hbfont.face)
        pdf.fonts[font.fontkey] = font
        if font.is_cff and font.is_cid_keyed:
            pdf._set_min_pdf_version("1.6")  # as FPDF.add_font does for these faces

    @staticmethod
    def before_output(pdf: FPDF) -> None:
        """Give each cached font a font of its own to subset (``output()`` changes it in place)."""
        for font in pdf.fonts.values():
            if not isinstance(font, TTFFont):
                continue
            fresh = ttLib.TTFont(
                font.ttffile, recalcTimestamp=False, fontNumber=font.collection_font_number, lazy=True
            )
            if font.is_cff and font.is_cid_keyed:
                for tag in list(fresh.keys()):
                    if tag not in _CFF_CID_TABLES and tag != "GlyphOrder":
                        del fresh[tag]
            font.ttfont = fresh
