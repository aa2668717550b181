"""Free-text normalisation and fitting prompt text to a text encoder's token budget."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import Any, Protocol

# Zero-width characters, bidirectional embeddings/overrides/isolates and the BOM: invisible in a review
# screen, yet they change what the text encoder sees (or hide text from the reviewer).
_INVISIBLE_CONTROLS = frozenset(
    [chr(c) for c in range(0x200B, 0x2010)]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
    + ["\ufeff"]
)
_WHITESPACE_RUN = re.compile(r"\s+")
_TRAILING_SEPARATORS = " \t,;:-–—"


class TextTokenizer(Protocol):
    """The part of a transformers tokenizer this module uses."""

    model_max_length: int

    def __call__(self, text: str) -> Any: ...


def _is_removed(char: str) -> bool:
    if char in _INVISIBLE_CONTROLS:
        return True
    category = unicodedata.category(char)
    # Cc = control characters, Cf = other format characters (soft hyphen, word joiner, tags, ...),
    # Cs/Co/Cn = surrogates, private use and unassigned code points: none belongs in a prompt.
    # Whitespace controls (\t, \n, ...) survive here and are collapsed to one space below.
    return category in {"Cc", "Cf", "Cs", "Co", "Cn"} and not char.isspace()


def normalise_free_text(text: str, *, max_chars: int = 500) -> str:
    """NFKC-normalise, drop control/format/bidi/zero-width characters, collapse whitespace, cap length.

    The cap cuts at the last whitespace before ``max_chars`` when there is one, so words stay whole.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    # NFKC can itself produce format characters (and grow the text), so clean after normalising;
    # cleaning can expose new NFKC compositions, so repeat until stable (converges in a pass or two).
    cleaned = text
    while True:
        normalised = unicodedata.normalize("NFKC", cleaned)
        stripped = "".join(char for char in normalised if not _is_removed(char))
        stripped = _WHITESPACE_RUN.sub(" ", stripped).strip()
        if stripped == cleaned:
            break
        cleaned = stripped
    if len(cleaned) <= max_chars:
        return cleaned
    cut = cleaned[:max_chars]
    boundary = cut.rfind(" ")
    if boundary > 0:
        cut = cut[:boundary]
    cut = cut.rstrip()
    # The cut may end in a character that NFKC treats differently on its own; renormalise once more
    # so the function stays idempotent.
    return normalise_free_text(cut, max_chars=max_chars)


def token_count(text: str, *, tokenizer: TextTokenizer) -> int:
    """Number of token ids the tokenizer produces for ``text``, including begin/end tokens."""
    return len(tokenizer(text)["input_ids"])


def token_budget(*, tokenizer: TextTokenizer, max_tokens: int | None = None) -> int:
    """The usable budget: ``max_tokens`` if given, never above the tokenizer's ``model_max_length``."""
    model_max = int(tokenizer.model_max_length)
    budget = model_max if max_tokens is None else min(max_tokens, model_max)
    minimum = token_count("", tokenizer=tokenizer)
    if budget < minimum:
        raise ValueError(
            f"token budget {budget} is smaller than the {minimum} tokens an empty prompt needs "
            f"(begin/end markers); use max_tokens >= {minimum}"
        )
    return budget


def longest_fitting_prefix(text: str, *, fits: Callable[[str], bool]) -> str:
    """Longest prefix of ``text`` ending at a word boundary for which ``fits`` holds ('' if none).

    Token counts of word prefixes grow with the prefix for CLIP-style tokenizers (they split on words
    first), so a binary search over word boundaries finds the cut with a handful of tokenizer calls.
    A single word too long for the budget is cut by characters instead.
    """
    if fits(text):
        return text
    ends = [match.start() for match in re.finditer(r"\s+", text)]
    candidates = [text[:end].rstrip(_TRAILING_SEPARATORS) for end in ends]
    candidates = [candidate for candidate in candidates if candidate]
    low, high, best = 0, len(candidates) - 1, ""
    while low <= high:
        middle = (low + high) // 2
        if fits(candidates[middle]):
            best, low = candidates[middle], middle + 1
        else:
            high = middle - 1
    if best:
        return best
    first_word = candidates[0] if candidates else text
    low, high = 1, len(first_word) - 1
    while low <= high:
        middle = (low + high) // 2
        if fits(first_word[:middle]):
            best, low = first_word[:middle], middle + 1
        else:
            high = middle - 1
    return best


def fit_to_token_budget(text: str, *, tokenizer: TextTokenizer, max_tokens: int | None = None) -> str:
    """Trim ``text`` at a word boundary so the tokenizer's ids (with begin/end) fit the budget.

    Measured with the pipeline's own tokenizer, so the pipeline never has to truncate silently.
    Text that already fits is returned unchanged; a trimmed result loses trailing separators.
    """
    budget = token_budget(tokenizer=tokenizer, max_tokens=max_tokens)
    return longest_fitting_prefix(
        text, fits=lambda candidate: token_count(candidate, tokenizer=tokenizer) <= budget
    )
