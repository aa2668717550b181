"""Normalise free text from FHIR resources: no control, zero-width or bidi characters, bounded length."""

from __future__ import annotations

import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")
# Categories removed outright: Cc control, Cf format (zero-width, bidi embeddings/isolates, BOM, soft hyphen),
# Co private use, Cs lone surrogates, Cn unassigned. Whitespace controls become spaces first.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Cn"})
_WHITESPACE_CONTROLS = frozenset("\t\n\r\v\f\x1c\x1d\x1e\x1f\x85\u2028\u2029")


def clean_text(value: object, *, max_length: int = 200) -> str:
    """Return `value` as display-safe text: NFC, invisible characters removed, spaces collapsed, capped."""
    if not isinstance(value, str):
        return ""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    text = unicodedata.normalize("NFC", value)
    kept = []
    for char in text:
        if char in _WHITESPACE_CONTROLS:
            kept.append(" ")
        elif unicodedata.category(char) not in _DROPPED_CATEGORIES:
            kept.append(char)
    text = _WHITESPACE.sub(" ", "".join(kept)).strip()
    if len(text) > max_length:
        text = text[: max_length - 1].rstrip() + "…"
    return text
