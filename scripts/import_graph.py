"""Report import cycles among bloomlm's modules; exit 1 if there is one.

Every module under src/bloomlm is parsed with `ast` (nothing is imported or run). Each import of a
bloomlm module counts, wherever it is written: at module level, inside a function (the lazy imports
that dodge a cycle at import time still tie the two modules together), or under `if TYPE_CHECKING:`.
`from bloomlm.flax import checks` is an edge to `bloomlm.flax.checks` (a module); `from
bloomlm.config import BloomConfig` is an edge to `bloomlm.config`. Relative imports are resolved.
A module that imports `importlib` (the package's lazy `__getattr__`) also gets an edge to every
module whose dotted name it spells as a string constant: that is how it imports them.
The implicit import of a parent package (`bloomlm.flax` before `bloomlm.flax.model`) is not an edge:
it would make every package __init__ that re-exports a child look cyclic.

    python scripts/import_graph.py            # cycles, or "no import cycle among N modules"
    python scripts/import_graph.py --edges    # also print every edge, with the line it comes from
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "bloomlm"
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "src"


def module_files(src_root: Path) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package under `src_root`."""
    modules = {}
    for path in sorted((src_root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src_root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, target] if target else base)


def _submodule_or(base: str, name: str, known: set[str]) -> str:
    return f"{base}.{name}" if f"{base}.{name}" in known else base


def imported_modules(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(bloomlm module, line) for each import of one in `path`'s source, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    uses_importlib = any(
        isinstance(node, ast.Import) and any(a.name == "importlib" for a in node.names)
        for node in ast.walk(tree)
    )
    for node in ast.walk(tree):
        if uses_importlib and isinstance(node, ast.Constant) and node.value in known:
            if node.value != module:
                found.append((node.value, node.lineno))
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            # `from pkg import name`: a submodule when one is so named, else an attribute of pkg.
            targets = [_submodule_or(base, alias.name, known) for alias in node.names]
        else:
            continue
        for target in targets:
            # `import bloomlm.flax.model as m` names a module; else keep the longest known prefix.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.append((target, node.lineno))
    return found


def build_graph(src_root: Path) -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    """(module -> modules it imports, (module, imported) -> first line of that import)."""
    files = module_files(src_root)
    graph: dict[str, set[str]] = {name: set() for name in files}
    lines: dict[tuple[str, str], int] = {}
    for name, path in files.items():
        for target, line in imported_modules(name, path, set(files)):
            graph[name].add(target)
            lines.setdefault((name, target), line)
    return graph, lines


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach each other (Tarjan), each sorted; lone modules left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", type=Path, default=DEFAULT_ROOT, help="folder holding the bloomlm package"
    )
    parser.add_argument("--edges", action="store_true", help="print every edge too")
    args = parser.parse_args(argv)
    graph, lines = build_graph(args.src)
    if args.edges:
        for (source, target), line in sorted(lines.items()):
            print(f"{source}:{line} -> {target}")
    groups = strongly_connected(graph)
    if not groups:
        print(f"no import cycle among {len(graph)} modules")
        return 0
    for group in groups:
        members = set(group)
        print(f"import cycle among {len(group)} modules: {', '.join(group)}")
        for (source, target), line in sorted(lines.items()):
            if source in members and target in members:
                print(f"    {source}:{line} -> {target}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
