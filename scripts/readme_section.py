"""Replace a generated section of the documentation, between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.

A section lives in whichever page holds its markers: README.md or a page under docs/ (docs/**/*.md). Exactly one
page may hold them; a section found in none or in several is an error, so a moved or copied section never goes
stale silently."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def pages() -> list[Path]:
    """Every page a generated section may live in: README.md, then docs/**/*.md."""
    return [README, *sorted((REPO / "docs").rglob("*.md"))]


def section_page(name: str) -> Path:
    """The one page that holds the markers of section `name`; ValueError if none or several do."""
    begin = f"<!-- {name}:begin -->"
    counts = {page: page.read_text().count(begin) for page in pages()}
    holders = [page for page, count in counts.items() if count]
    if sum(counts.values()) != 1:
        where = ", ".join(f"{page.relative_to(REPO)} ({counts[page]}x)" for page in holders)
        raise ValueError(f"generated section {name!r}: {begin} must occur once in README.md and docs/**/*.md, "
                         f"found {'in ' + where if holders else 'nowhere'}")
    return holders[0]


def update_readme_section(name: str, text: str) -> Path:
    """Write `text` between the markers of section `name` in the page that holds them; return that page."""
    page = section_page(name)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    content = page.read_text()
    if not pattern.search(content):
        raise ValueError(f"generated section {name!r}: {page.relative_to(REPO)} has {begin} but no {end} after it")
    page.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", content))
    return page
