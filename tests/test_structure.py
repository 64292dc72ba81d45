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
    """{local name: project module} of the modules a file binds by importing them (`import a.b`
    binds `a`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    aliases = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                full = f"bench.{a.name}" if name.startswith("bench.") and \
                    f"bench.{a.name}" in modules else a.name        # bench scripts import each other
                bound = full if a.asname else full.split(".")[0]
                if bound in modules:
                    aliases[a.asname or a.name.split(".")[0]] = bound
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                if f"{target}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{target}.{a.name}"
    return aliases


def _private_uses(name: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """`m._x` and `pkg.sub.m._x` where m is another project module."""
    aliases = _module_aliases(name, path, modules)
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            continue
        chain, value = [], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in aliases:
            owner = ".".join([aliases[value.id], *reversed(chain)])
            if owner in modules and owner != name:
                bad.append(f"{name}:{node.lineno} uses {owner}.{node.attr}")
    return bad


def test_no_private_names_cross_modules():
    """Neither `from m import _x` nor `m._x` on another project module."""
    modules, edges = _graph()
    bad = [f"{name} takes {target}.{n}" for name, targets in edges.items()
           for target, names in targets for n in names
           if n.startswith("_") and not n.startswith("__") and target in modules]
    for name, path in modules.items():
        bad += _private_uses(name, path, modules)
    assert not bad, bad


def test_no_package_imports_the_tests():
    modules = _modules()
    bad = [f"{name} imports {target}" for name, path in modules.items()
           for target, _ in _imports(name, path, modules) if target.split(".")[0] == "tests"]
    assert not bad, bad


def test_no_file_over_400_lines_outside_tests():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


# ---- the design document --------------------------------------------------------------------

DESIGN = ROOT / "docs" / "design.md"
# "design.md section 4", "docs/design.md sections 2 and 3", "design.md §5", across a line break
# and its comment marks too ("design.md\n# section 6", " * section 5"); a subsection ("5.2")
# must have its own "### 5.2" heading.
SEP = r"[\s#*/>]+"
NUMBERS = r"(\d+(?:\.\d+)?)((?:\s*(?:,|and|&)\s*\d+(?:\.\d+)?)*)"
CITE = re.compile(rf"design\.md,?{SEP}(?:sections?{SEP}|§\s*){NUMBERS}", re.I)
SELF_CITE = re.compile(rf"\b(?:sections?{SEP}|§\s*){NUMBERS}", re.I)   # inside design.md
TEXT_SUFFIXES = {".py", ".md", ".h", ".cuh", ".cu", ".cpp", ".c", ".yaml", ".txt", ".sh", ".map",
                 ".toml", ".cmake", ".cfg", ".ini", ".json"}
SKIP_DIRS = {".git", ".venv", "out", "build", "__pycache__", ".pytest_cache", "node_modules"}


def _text_files() -> list[Path]:
    """Every text file of the tree (CI scripts included), not what runs leave behind."""
    found = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or (part.startswith(".") and part != ".ci")
               for part in rel.parts[:-1]) or not path.is_file() or path == Path(__file__):
            continue
        if path.suffix in TEXT_SUFFIXES or rel.parts[0] == ".ci" or path.name == "CMakeLists.txt":
            if path.stat().st_size < 2**20:
                found.append(path)
    return found


def _cited_sections() -> dict[str, set[str]]:
    cited: dict[str, set[str]] = {}
    for path in _text_files():
        pattern = SELF_CITE if path == DESIGN else CITE
        for m in pattern.finditer(path.read_text(errors="replace")):
            numbers = {m.group(1)} | set(re.findall(r"\d+(?:\.\d+)?", m.group(2)))
            cited.setdefault(str(path.relative_to(ROOT)), set()).update(numbers)
    return cited


def test_every_cited_design_section_exists():
    headings = set(re.findall(r"^##+ (\d+(?:\.\d+)?)\.? ", DESIGN.read_text(), re.M))
    cited = _cited_sections()
    assert len(cited) >= 10, cited                   # the code cites it; a broken scan finds none
    missing = {path: sorted(n for n in numbers if n not in headings)
               for path, numbers in cited.items() if not numbers <= headings}
    assert not missing, f"cited sections that docs/design.md lacks: {missing}"


def test_the_citation_scan_finds_every_form():
    """The scan itself: each way the tree writes a citation is found (so a dangling one fails)."""
    forms = {"design.md section 7": {"7"}, "docs/design.md, sections 2 and 3": {"2", "3"},
             "design.md §5": {"5"}, "docs/design.md\n# section 6": {"6"},
             "design.md\n * section 4.2": {"4.2"}, "see DESIGN.md sections 8, 9": {"8", "9"}}
    for text, numbers in forms.items():
        m = CITE.search(text)
        assert m, text
        assert {m.group(1)} | set(re.findall(r"\d+(?:\.\d+)?", m.group(2))) == numbers, text


def test_nothing_cites_the_old_brief():
    stale = [str(path.relative_to(ROOT)) for path in _text_files()
             if re.search(r"\bDESIGN(\.md)?,?\s+(section|§)", path.read_text(errors="replace"))]
    assert not stale, f"cite docs/design.md sections instead of DESIGN: {stale}"
