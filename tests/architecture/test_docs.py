"""The docs stay true to the code: the module map is current, and docs link only inside the repository."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)")


def _module_map_script() -> Any:
    spec = importlib.util.spec_from_file_location("module_map", ROOT / "scripts" / "module_map.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_module_map_in_architecture_md_is_current() -> None:
    script = _module_map_script()
    assert script.current_doc_map() == script.module_map(), "run: python scripts/module_map.py --write"


def test_every_module_says_what_it_is() -> None:
    assert "(no docstring)" not in _module_map_script().module_map()


def test_docs_link_only_to_files_in_the_repository() -> None:
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (doc.parent / target).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{doc.relative_to(ROOT)} → {target}")
    assert broken == []


# The main screens the README shows (issue 13), each written by a test so it shows what the code does today.
MAIN_SCREENS = (
    "portrait-variants.png",
    "reviewer-queue.png",
    "portal-phone.png",
    "portal-desktop.png",
    "ehr-chart.png",
    "landing.png",
    "review.png",
    "confirmation.png",
)


def test_the_readme_shows_the_main_screens_and_tests_write_each_of_them() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = set(re.findall(r"\]\(docs/screenshots/([\w.-]+\.png)\)", readme))
    assert set(MAIN_SCREENS) <= shown, sorted(set(MAIN_SCREENS) - shown)
    browser_tests = "\n".join(
        path.read_text(encoding="utf-8") for path in sorted((ROOT / "tests" / "e2e").glob("test_*.py"))
    )
    unwritten = [name for name in MAIN_SCREENS if f'"{name}"' not in browser_tests]
    assert unwritten == [], f"no browser test writes {unwritten}"
