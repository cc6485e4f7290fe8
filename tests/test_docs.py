"""The README and the pages under docs/: the README stays short, every relative link leads somewhere, and every
section a script writes (`update_readme_section("NAME", ...)`) has its markers in exactly one page."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def prose(page: Path) -> str:
    """The page without its code blocks and inline code, where brackets and parentheses are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", page.read_text()))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def relative_links() -> list[tuple[Path, str]]:
    links = set()
    for page in PAGES:
        for target in LINK.findall(prose(page)):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # not http:, mailto: ...
                links.add((page, target))
    return sorted(links)


def test_readme_is_short_and_names_the_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200, f"README.md has {len(text.splitlines())} lines: move detail to docs/"
    for command in ("make install", "make quickstart", "make test"):
        assert command in text, f"README.md no longer shows `{command}`"


@pytest.mark.parametrize("page,target", relative_links(),
                         ids=lambda value: str(value.relative_to(REPO)) if isinstance(value, Path) else value)
def test_relative_link_exists(page, target):
    path, _, fragment = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    assert resolved.exists(), f"{page.relative_to(REPO)}: link {target} leads to nothing ({resolved})"
    if fragment and resolved.suffix == ".md":
        anchors = {anchor(heading) for heading in HEADING.findall(prose(resolved))}
        assert fragment in anchors, f"{page.relative_to(REPO)}: link {target}: no heading #{fragment} in {path}"


def literal_strings(node: ast.AST, tree: ast.Module) -> list[str] | None:
    """Every value a script's section-name argument can take, when it is spelled out in the script: a string, an
    f-string over conditional string constants, or `args.X` whose `--X` option has its choices in a literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        body, orelse = literal_strings(node.body, tree), literal_strings(node.orelse, tree)
        return None if body is None or orelse is None else body + orelse
    if isinstance(node, ast.FormattedValue) and node.format_spec is None and node.conversion == -1:
        return literal_strings(node.value, tree)
    if isinstance(node, ast.JoinedStr):
        values = [""]
        for part in node.values:
            options = literal_strings(part, tree)
            if options is None:
                return None
            values = [value + option for value in values for option in options]
        return values
    if isinstance(node, ast.Attribute):
        return option_choices(node.attr, tree)
    return None


def option_choices(dest: str, tree: ast.Module) -> list[str] | None:
    """The choices of the argparse option `--dest`, when they are a literal or built from a module-level literal."""
    literals = {target.id: statement.value for statement in tree.body if isinstance(statement, ast.Assign)
                for target in statement.targets if isinstance(target, ast.Name)}
    for call in ast.walk(tree):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument"
                and any(isinstance(arg, ast.Constant) and arg.value == f"--{dest.replace('_', '-')}"
                        for arg in call.args)):
            for keyword in call.keywords:
                if keyword.arg == "choices":
                    value = keyword.value
                    if isinstance(value, ast.Call) and value.args:  # sorted(TABLES), list(TABLES)
                        value = value.args[0]
                    if isinstance(value, ast.Name):
                        value = literals.get(value.id)
                    if isinstance(value, ast.Dict):
                        return [key.value for key in value.keys if isinstance(key, ast.Constant)]
                    if isinstance(value, (ast.List, ast.Tuple, ast.Set)):
                        return [element.value for element in value.elts if isinstance(element, ast.Constant)]
    return None


def generated_sections() -> dict[str, list[str]]:
    """Section name → the scripts that write it, from every `update_readme_section(NAME, ...)` call in scripts/."""
    sections: dict[str, list[str]] = {}
    for script in sorted((REPO / "scripts").glob("*.py")):
        tree = ast.parse(script.read_text())
        for call in ast.walk(tree):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                    and call.func.id == "update_readme_section" and call.args):
                names = literal_strings(call.args[0], tree)
                assert names, f"{script.name}:{call.lineno}: cannot tell which section it writes; spell the name out"
                for name in names:
                    sections.setdefault(name, []).append(script.name)
    return sections


def test_scripts_write_sections():
    assert len(generated_sections()) >= 20


@pytest.mark.parametrize("name,scripts", sorted(generated_sections().items()))
def test_generated_section_in_exactly_one_page(name, scripts):
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    holders = {page.relative_to(REPO).as_posix(): page.read_text().count(begin) for page in PAGES}
    holders = {page: count for page, count in holders.items() if count}
    assert sum(holders.values()) == 1, f"section {name} (written by {', '.join(scripts)}) is in {holders or 'no page'}"
    text = next(page.read_text() for page in PAGES if begin in page.read_text())
    assert text.find(end) > text.find(begin), f"section {name}: {begin} has no {end} after it"
