"""Embed a sweep's report (`lqtk sweep --report-dir DIR`: DIR/report.md and DIR/pareto.png) in the docs page that
holds the section `report` (README.md), with the plot linked from that page's folder. `make report` runs it after
the sweep."""

import argparse
import os
from pathlib import Path

from readme_section import REPO, section_page, update_readme_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("report_dir", type=Path, help="The sweep's --report-dir.")
    folder = parser.parse_args().report_dir.resolve()
    text = (folder / "report.md").read_text().strip()
    plot = Path(os.path.relpath(folder / "pareto.png", section_page("report").parent)).as_posix()
    page = update_readme_section("report", text.replace("(pareto.png)", f"({plot})"))
    print(f"{page.relative_to(REPO)} section report ← {folder / 'report.md'}")


if __name__ == "__main__":
    main()
