"""Replace a generated section of README.md, between `<!-- NAME:begin -->` and `<!-- NAME:end -->`."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def update_readme_section(name: str, text: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    README.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", README.read_text()))
