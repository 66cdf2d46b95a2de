"""The docs folder (issue 4, item 8): generated pages match the code; links and nav resolve."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from fedfm.docgen import generated_pages

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_generated_pages_are_up_to_date() -> None:
    for relative, text in generated_pages().items():
        committed = (DOCS / relative).read_text(encoding="utf-8")
        assert committed == text, f"docs/{relative} is stale: run python -m fedfm.docgen docs"


def test_config_reference_covers_every_field() -> None:
    from fedfm.config import RunConfig

    page = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    assert "| `prefix_cache_memory_mb` |" in page and "| `mlflow_tracking_uri` |" in page
    for section in RunConfig.model_fields:
        assert f"| `{section}` |" in page


def _nav_files(items: list) -> list[str]:
    found = []
    for item in items:
        for value in item.values():
            found.extend(_nav_files(value) if isinstance(value, list) else [value])
    return found


def test_nav_and_links_resolve() -> None:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    for name in _nav_files(nav):
        assert (DOCS / name).is_file(), name
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"\]\(([^)#]+\.md)\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).is_file(), f"{page}: broken link {target}"
