"""Embed a sweep's report (`lqtk sweep --report-dir DIR`: DIR/report.md and DIR/pareto.png) in README.md's section
`report`, with the plot linked from the README's folder. `make report` runs it after the sweep."""

import argparse
from pathlib import Path

from readme_section import README, update_readme_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("report_dir", type=Path, help="The sweep's --report-dir.")
    folder = parser.parse_args().report_dir.resolve()
    text = (folder / "report.md").read_text().strip()
    plot = (folder / "pareto.png").relative_to(README.parent)
    update_readme_section("report", text.replace("(pareto.png)", f"({plot})"))
    print(f"README.md section report ← {folder / 'report.md'}")


if __name__ == "__main__":
    main()
