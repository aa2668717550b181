"""Test modules have unique basenames: pytest imports them by basename, so a duplicate stops the run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_modules_share_a_basename() -> None:
    names = Counter(
        path.name
        for path in TESTS.rglob("*.py")
        if "node_modules" not in path.parts and path.name != "conftest.py"
    )
    assert [name for name, count in names.items() if count > 1] == []
