"""docs/architecture.md's module map names every module of the four packages, and only those.

The map is the "## Module map" section: one table row per module, its path in backticks in the
first cell. A module added, moved or deleted without its row fails here, so the map cannot
drift from the code again.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
PACKAGES = ("protocol", "crypto", "peer", "sim")
MAP_HEADING = "## Module map"
ROW = re.compile(r"^\|\s*`([^`]+\.py)`\s*\|\s*(.*?)\s*\|\s*$")


def map_rows(text: str) -> list[tuple[str, str]]:
    """(path, description) of every row of the module map section of ``text``."""
    lines = text.splitlines()
    start = lines.index(MAP_HEADING)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        match = ROW.match(line)
        if match:
            rows.append((match.group(1), match.group(2)))
    return rows


def package_modules() -> set[str]:
    """Every .py file of the four packages, as a path relative to the repository root."""
    return {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES for path in (ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }


def test_module_map_lists_every_module_once_and_nothing_else() -> None:
    rows = map_rows(ARCHITECTURE.read_text(encoding="utf-8"))
    mapped = [path for path, _ in rows]
    modules = package_modules()
    assert sorted(modules - set(mapped)) == [], "modules missing from the module map"
    assert sorted(set(mapped) - modules) == [], "the module map names modules that do not exist"
    duplicates = sorted({path for path in mapped if mapped.count(path) > 1})
    assert duplicates == [], "modules listed twice in the module map"
    assert [path for path, what in rows if not what] == [], "rows without a description"


def test_map_parser_reads_rows_only_inside_the_section() -> None:
    """A row outside the section does not count, a missing description is caught."""
    text = "\n".join([
        "| `peer/outside.py` | before the section |",
        MAP_HEADING,
        "| module | what it is |",
        "|---|---|",
        "| `peer/a.py` | one line |",
        "| `peer/b.py` |  |",
        "## Next section",
        "| `peer/after.py` | after the section |",
    ])
    assert map_rows(text) == [("peer/a.py", "one line"), ("peer/b.py", "")]
