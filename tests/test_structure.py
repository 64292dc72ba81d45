"""The shape of the code (docs/design.md section 1): packages import only downwards
(terdit_common <- terdit <- exporter / runtime <- bench), no module imports itself back through a
circle, no module takes another's private names, no file outside tests/ is over 400 lines, and
every "design.md section N" a file cites exists."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("terdit_common", "terdit", "exporter", "runtime", "bench")
# package -> the packages it may import (bench scripts import everything; nothing imports them)
ALLOWED = {"terdit_common": set(), "terdit": {"terdit_common"},
           "exporter": {"terdit_common", "terdit"}, "runtime": {"terdit_common", "terdit"},
           "bench": {"terdit_common", "terdit", "exporter", "runtime"}}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if package == "bench":                      # scripts, run from bench/
                parts = ["bench", *parts[1:]]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) of every import statement in the file, at any
    depth (a lazy import inside a function counts too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if name.startswith("bench.") and target.split(".")[0] + ".py" in {
                    p.name for p in (ROOT / "bench").glob("*.py")}:
                target = "bench." + target                  # bench scripts import each other
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            out += [(s, []) for s in subs]
            rest = [n for n in names if f"{target}.{n}" not in modules]
            if rest or not subs:
                out.append((target, rest))
    return out


def _graph():
    modules = _modules()
    edges = {}
    for name, path in modules.items():
        edges[name] = [(t, names) for t, names in _imports(name, path, modules)
                       if t.split(".")[0] in PACKAGES]
    return modules, edges


def test_packages_import_only_downwards():
    _, edges = _graph()
    bad = [f"{name} imports {target}" for name, targets in edges.items()
           for target, _ in targets
           if target.split(".")[0] != name.split(".")[0]
           and target.split(".")[0] not in ALLOWED[name.split(".")[0]]]
    assert not bad, bad


def test_no_import_circle():
    modules, edges = _graph()
    graph = {name: sorted({t for t, _ in targets if t in modules and t != name})
             for name, targets in edges.items()}
    # a package's __init__ re-exporting its submodules is not a circle back into them
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, circles


def _module_aliases(name: str, path: Path, modules: dict[str, Path]) -> dict[str, str]:
    """{local name: project module} of the modules a file binds by importing them."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    aliases = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                full = f"bench.{a.name}" if name.startswith("bench.") and \
                    f"bench.{a.name}" in modules else a.name        # bench scripts import each other
                if full in modules:
                    aliases[a.asname or a.name] = full
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                if f"{target}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{target}.{a.name}"
    return aliases


def test_no_private_names_cross_modules():
    """Neither `from m import _x` nor `m._x` on another project module."""
    modules, edges = _graph()
    bad = [f"{name} takes {target}.{n}" for name, targets in edges.items()
           for target, names in targets for n in names
           if n.startswith("_") and not n.startswith("__") and target in modules]
    for name, path in modules.items():
        aliases = _module_aliases(name, path, modules)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and aliases[node.value.id] != name:
                bad.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, bad


def test_no_file_over_400_lines_outside_tests():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


# ---- the design document --------------------------------------------------------------------

DESIGN = ROOT / "docs" / "design.md"
CITE = re.compile(r"design\.md,? sections? (\d+)((?:\s*(?:,|and|&)\s*\d+)*)", re.I)
SOURCES = ("terdit", "terdit_common", "exporter", "runtime", "plugins", "bench", "tests",
           "scripts", "README.md", "CMakeLists.txt")


def _cited_sections() -> dict[str, set[int]]:
    cited: dict[str, set[int]] = {}
    for top in SOURCES:
        root = ROOT / top
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            if path.suffix not in (".py", ".md", ".h", ".cuh", ".cu", ".cpp", ".yaml", ".txt",
                                   ".sh", ".map") or path == Path(__file__):
                continue
            for m in CITE.finditer(path.read_text(errors="replace")):
                numbers = {int(m.group(1))} | {int(n) for n in re.findall(r"\d+", m.group(2))}
                cited.setdefault(str(path.relative_to(ROOT)), set()).update(numbers)
    return cited


def test_every_cited_design_section_exists():
    headings = {int(n) for n in re.findall(r"^## (\d+)\. ", DESIGN.read_text(), re.M)}
    cited = _cited_sections()
    assert len(cited) >= 10, cited                   # the code cites it; a broken scan finds none
    missing = {path: sorted(n for n in numbers if n not in headings)
               for path, numbers in cited.items() if not numbers <= headings}
    assert not missing, f"cited sections that docs/design.md lacks: {missing}"


def test_nothing_cites_the_old_brief():
    stale = [f"{path}" for top in SOURCES for path in
             ([ROOT / top] if (ROOT / top).is_file() else (ROOT / top).rglob("*"))
             if path.is_file() and path.suffix in (".py", ".md", ".h", ".cuh", ".cu", ".yaml")
             and re.search(r"\bDESIGN(\.md)? section", path.read_text(errors="replace"))
             and path != Path(__file__)]
    assert not stale, f"cite docs/design.md sections instead of DESIGN: {stale}"
