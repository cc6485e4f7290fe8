"""The package's layering as docs/architecture.md states it: the floors hold (scripts/import_layers.py, from the
code's own imports), the package map lists exactly the modules there are, and the checker finds what it should."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import import_layers  # noqa: E402  (a script, imported from its folder)


def test_no_import_goes_up_a_floor_and_none_makes_a_circle():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "import_layers.py")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout
    assert " 0 violations" in result.stdout


def test_the_package_map_lists_every_module_and_only_those():
    page = (REPO / "docs" / "architecture.md").read_text()
    tree = re.search(r"<!-- map:begin -->\n```\n(.*?)```", page, re.S).group(1).splitlines()
    listed, folders = set(), []
    for line in tree[1:]:  # below "lqtk/"
        depth, name = (len(line) - len(line.lstrip())) // 2, line.split()[0]
        folders = folders[: depth - 1]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        else:
            listed.add("/".join(["lqtk", *folders, name]))
    actual = {str(file.relative_to(REPO)) for file in (REPO / "lqtk").rglob("*.py")}
    assert listed == actual, (sorted(actual - listed), sorted(listed - actual))


def test_the_checker_finds_an_import_from_above_and_a_circle(tmp_path):
    package = tmp_path / "pkg"
    (package / "low").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low" / "__init__.py").write_text("from pkg.low import a\n")
    (package / "low" / "a.py").write_text("def f():\n    from pkg.high import g  # hidden in a function\n")
    (package / "high.py").write_text("from pkg.side import h\ndef g(): pass\n")
    (package / "side.py").write_text("import pkg.high\nh = 1\n")
    page = tmp_path / "architecture.md"
    page.write_text("<!-- floors:begin -->\n| 1 | `low` | |\n| 2 | `high` `side` `pkg` | |\n<!-- floors:end -->\n")
    edges, problems = import_layers.check(package, page)
    assert edges["pkg.low.a"] == {"pkg.high"}
    assert "pkg.low.a (floor 1) imports pkg.high (floor 2)" in problems
    assert "circle: pkg.high <-> pkg.side" in problems
    assert len(problems) == 2  # the package's import of its own child is neither
