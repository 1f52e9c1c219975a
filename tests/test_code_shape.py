"""Shape of the code under ``fbalign/``, read from the AST (nothing is imported or run).

* no module uses a private (``_``-prefixed) name of another fbalign module;
* no function imports from fbalign (a function-level import is how an import cycle hides);
* the module-level import graph of the package has no cycle.

Imports of heavy optional third-party packages (flax, matplotlib, tqdm, equinox, nbformat) may
stay inside functions: only imports *from fbalign* are checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fbalign"

# Private names still imported across modules, as (importing file, module, name). PENDING: owned
# by another engineer, who will make the helper public and empty this set; do not add to it.
PENDING: set = set()

# Files whose functions may import from fbalign for good, and why. (There is no lazy public shim:
# fbalign/flax.py imports the adapters at top level, and only `import fbalign.flax` loads flax.)
LAZY_ALLOWED = {
    "fbalign/_src/cli.py": "lazy command dispatch: `fbalign --help` and each subcommand load only "
                           "the modules that command needs",
}

# Function-level fbalign imports, as (importing file, imported module), in files another engineer
# owns right now; none of them is needed to break a cycle. PENDING: to be moved to top level and
# this set emptied; do not add to it.
PENDING_LAZY: set = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = _modules()


def _rel(name: str) -> str:
    return MODULES[name].relative_to(ROOT).as_posix()


def _is_private(name: str) -> bool:
    """``_x``, but not a dunder nor ``_src`` (the package's private tree, open to fbalign)."""
    return (name.startswith("_") and name != "_src"
            and not (name.startswith("__") and name.endswith("__")))


def _absolute(node: ast.ImportFrom, importer: str) -> str:
    """The absolute module of a ``from ... import`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[importer].name == "__init__.py"
    base = importer.split(".")
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


class _Imports(ast.NodeVisitor):
    """Every fbalign import of one module: ``(node, targets, in_function)``; ``targets`` are the
    fbalign modules the statement loads. Imports under ``if TYPE_CHECKING:`` never run and are
    skipped."""

    def __init__(self, importer: str):
        self.importer = importer
        self.depth = 0
        self.found: list[tuple[ast.stmt, list[str], bool]] = []
        self.aliases: dict[str, str] = {}  # local name -> fbalign module it is bound to

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If):
        test = node.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
        if name == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import):
        targets = [a.name for a in node.names if a.name.split(".")[0] == "fbalign"]
        for a in node.names:
            if a.name in MODULES:  # ``import a.b`` binds ``a``; ``import a.b as c`` binds a.b
                self.aliases[a.asname or "fbalign"] = a.name if a.asname else "fbalign"
        if targets:
            self.found.append((node, targets, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom):
        module = _absolute(node, self.importer)
        if module.split(".")[0] != "fbalign":
            return
        targets = []  # the submodules named, and ``module`` itself if a name comes from it
        for a in node.names:
            sub = f"{module}.{a.name}"
            if sub in MODULES:
                targets.append(sub)
                self.aliases[a.asname or a.name] = sub
            elif module not in targets:
                targets.append(module)
        self.found.append((node, targets, self.depth > 0))


def _scan(name: str) -> tuple[ast.Module, _Imports]:
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))
    imports = _Imports(name)
    imports.visit(tree)
    return tree, imports


SCANS = {name: _scan(name) for name in MODULES}


def private_imports() -> set[tuple[str, str, str, int]]:
    """``(file, module, name, line)`` for every private name taken from another fbalign module,
    by ``from m import _x`` or by attribute, ``m._x`` with ``m`` an imported fbalign module."""
    found = set()
    for name, (tree, imports) in SCANS.items():
        for node, _, _ in imports.found:
            if isinstance(node, ast.ImportFrom):
                module = _absolute(node, name)
                for a in node.names:
                    if module != name and (_is_private(a.name)
                                           or any(map(_is_private, module.split(".")))):
                        found.add((_rel(name), module, a.name, node.lineno))
            else:
                for a in node.names:
                    if any(map(_is_private, a.name.split("."))):
                        found.add((_rel(name), a.name, "", node.lineno))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _is_private(node.attr)
                    and isinstance(node.value, ast.Name) and node.value.id in imports.aliases):
                module = imports.aliases[node.value.id]
                if module != name:
                    found.add((_rel(name), module, node.attr, node.lineno))
    return found


def test_no_private_name_is_imported_across_modules():
    found = private_imports()
    bad = sorted(f"{f}:{line}: {name} from {module}" for f, module, name, line in found
                 if (f, module, name) not in PENDING)
    assert not bad, ("private names used across modules; make the helper public where it lives "
                     "(or in a leaf module) and import it by that name:\n  " + "\n  ".join(bad))
    stale = PENDING - {(f, m, n) for f, m, n, _ in found}
    assert not stale, f"PENDING lists imports that are gone; remove them: {sorted(stale)}"


def function_level_imports() -> set[tuple[str, str, int]]:
    """``(file, imported module, line)`` for every fbalign import inside a function body."""
    return {(_rel(name), target, node.lineno)
            for name, (_, imports) in SCANS.items()
            for node, targets, in_function in imports.found if in_function
            for target in targets or ["fbalign"]}


def test_no_function_level_fbalign_imports():
    found = function_level_imports()
    bad = sorted(f"{f}:{line}: imports {module}" for f, module, line in found
                 if f not in LAZY_ALLOWED and (f, module) not in PENDING_LAZY)
    assert not bad, ("fbalign imports inside functions (import at top level; if that makes a "
                     "cycle, move what both sides need into a leaf module):\n  " + "\n  ".join(bad))
    stale = PENDING_LAZY - {(f, m) for f, m, _ in found}
    assert not stale, f"PENDING_LAZY lists imports that are gone; remove them: {sorted(stale)}"
    assert all((ROOT / f).exists() for f in LAZY_ALLOWED)


def import_graph() -> dict[str, set[str]]:
    """Module -> the fbalign modules it imports at module level (when it is first imported).

    A parent package is initialised before its submodules whatever they import, so the implicit
    ``fbalign._src.x -> fbalign`` edge is not in the graph; an explicit ``from fbalign import y``
    in a submodule is.
    """
    return {name: {t for _, targets, in_function in imports.found if not in_function
                   for t in targets if t != name}
            for name, (_, imports) in SCANS.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A shortest cycle (``[a, b, ..., a]``) in each strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    return [min((_shortest_cycle(graph, component, v) for v in sorted(component)), key=len)
            for component in components]


def _shortest_cycle(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """The shortest ``[start, ..., start]`` inside ``component`` (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle in {sorted(component)}")


def test_find_cycles_finds_them():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    long_way = {"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"a", "c"}}
    assert find_cycles(long_way) == [["c", "d", "c"]]


def test_module_level_import_graph_is_acyclic():
    graph = import_graph()
    assert graph["fbalign._src.train"] >= {"fbalign._src.base", "fbalign._src.lift"}  # sees imports
    cycles = find_cycles(graph)
    assert not cycles, "module-level import cycles:\n  " + "\n  ".join(
        " -> ".join(c) for c in cycles)


MAX_FUNCTION_LINES = 80


def _own_code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of ``fn`` itself: without its docstring and without functions or classes defined
    inside it (a closure counts as a function of its own)."""
    lines = fn.end_lineno - fn.lineno + 1
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                            ast.Constant):
        lines -= body[0].end_lineno - body[0].lineno + 1

    def nested(node: ast.AST) -> int:
        total = 0
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                total += child.end_lineno - child.lineno + 1
            else:
                total += nested(child)
        return total

    return lines - nested(fn)


def test_no_function_in_src_is_longer_than_about_80_lines():
    long = []
    for path in sorted((ROOT / "fbalign" / "_src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _own_code_lines(node)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "split these functions into named pieces:\n  " + "\n  ".join(long)
