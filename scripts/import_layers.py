"""The import graph of lqtk/, read from the code's own imports (module-level and function-level alike), checked
against the floors that docs/architecture.md states: no module imports from a floor above its own, and no modules
import each other in a circle.

    python scripts/import_layers.py [--graph]

Prints the floors, the number of modules and imports, and every violation; exits 1 if there is one.
"""

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lqtk"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def floors(page: Path = ARCHITECTURE) -> dict[str, int]:
    """room -> floor, from the table between the page's `floors` markers (rows `| n | `room` `room` | ... |`)."""
    table = re.search(r"<!-- floors:begin -->(.*?)<!-- floors:end -->", page.read_text(), re.S)
    if table is None:
        raise SystemExit(f"{page} has no floors table between <!-- floors:begin --> and <!-- floors:end -->")
    rooms = {}
    for row in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", table.group(1), re.M):
        rooms.update(dict.fromkeys(re.findall(r"`([\w.]+)`", row[1]), int(row[0])))
    return rooms


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package's own name for its __init__)."""
    found = {}
    for file in sorted(package.rglob("*.py")):
        parts = list(file.relative_to(package.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def imports(name: str, file: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its code (`from a.b import c` names a.b.c if that is a
    module, else a.b)."""
    base = name if file.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                prefix = base
                for _ in range(node.level - 1):
                    prefix = prefix.rpartition(".")[0]
                module = f"{prefix}.{module}" if node.module else prefix
            candidates = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
                break
    return targets


def room(module: str) -> str:
    """The top-level module or package of lqtk a module belongs to ("lqtk" for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), an edge from a package to its own
    children left out (a package re-exporting its modules is not a circle of design)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w.startswith(v + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def check(package: Path = PACKAGE, page: Path = ARCHITECTURE) -> tuple[dict[str, set[str]], list[str]]:
    """The import graph of `package` and its violations of `page`'s floors (modules without a floor, imports from
    above, circles)."""
    found, rooms = modules(package), floors(page)
    edges = {name: imports(name, file, set(found)) for name, file in found.items()}
    problems = [f"{name}: room {room(name)!r} has no floor in {page.name}"
                for name in found if room(name) not in rooms]
    for name, targets in sorted(edges.items()):
        for target in sorted(targets):
            if room(name) in rooms and room(target) in rooms and rooms[room(target)] > rooms[room(name)]:
                problems.append(f"{name} (floor {rooms[room(name)]}) imports {target} (floor {rooms[room(target)]})")
    problems += [f"circle: {' <-> '.join(component)}" for component in circles(edges)]
    return edges, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graph", action="store_true", help="also print every module's imports")
    opts = parser.parse_args()
    edges, problems = check()
    for floor in sorted(set(floors().values())):
        print(f"floor {floor}: {' '.join(sorted(r for r, f in floors().items() if f == floor))}")
    if opts.graph:
        for name, targets in sorted(edges.items()):
            print(f"{name} -> {', '.join(sorted(targets)) or '-'}")
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(problems)} violations")
    for problem in problems:
        print(problem)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
