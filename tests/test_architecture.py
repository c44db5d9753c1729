"""The layout rules of docs/architecture.md (issue 10), read from the source: no import cycles at module level, no
submodule importing its own package's `__init__` for a name, no private name taken from another module, one home for
temp-folder-then-rename (files.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fp8cookbook"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package `__init__`)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    """Statements that run on import: the module body and the bodies of its top-level if/try blocks."""
    out, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, (ast.If, ast.Try)):
            stack += [*node.body, *node.orelse, *getattr(node, "finalbody", [])]
            for h in getattr(node, "handlers", []):
                stack += h.body
    return out


def _is_type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:`: imports for annotations only, never run."""
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node that can run, function bodies included: all of the tree but the bodies of `if TYPE_CHECKING:`
    blocks (their `else:` still runs)."""
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        if _is_type_checking(node):
            stack += node.orelse
            continue
        stack += ast.iter_child_nodes(node)
    return out


def _imports(name: str, *, module_level: bool) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for each project import of module `name`: those run on
    import (`module_level`) or all that can run, function-level (lazy) imports included."""
    path, is_pkg = MODULES[name]
    tree = ast.parse(path.read_text())
    nodes = _module_level(tree) if module_level else _runtime_nodes(tree)
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            parts = base[:len(base) - node.level + 1] if node.level else []
            target = ".".join(parts + ([node.module] if node.module else [])) if node.level else (node.module or "")
            if target.split(".")[0] != "fp8cookbook":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "fp8cookbook"]
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative enough for this size)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def import_graph(*, module_level: bool) -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from . import x` with x a submodule counts as importing x);
    with `module_level=False` the imports inside functions count too, since they run on the first call."""
    return {m: {t for t, _, _ in _imports(m, module_level=module_level) if t in MODULES and t != m}
            for m in MODULES}


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_at_module_level():
    assert _cycles(import_graph(module_level=True)) == [], "modules that import each other when loaded"


def test_runtime_imports_include_functions_but_not_type_checking():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import X\nelse:\n"
                     "    from .b import Y\ndef f():\n    from .c import Z\n    from . import d\n")
    assert {(n.module, n.level) for n in _runtime_nodes(tree) if isinstance(n, ast.ImportFrom)} == {
        ("typing", 0), ("b", 1), ("c", 1), (None, 1)}
    lazy = import_graph(module_level=False)
    eager = import_graph(module_level=True)
    assert any(lazy[m] - eager[m] for m in MODULES), "the package's lazy imports are in the full graph"


def test_no_import_cycle_including_function_level_imports():
    """An import inside a function runs on the first call, so a cycle through one is still a cycle: the modules
    cannot be understood, tested or moved apart, and the first caller's import order decides what works. Such
    cycles were broken by moving code to its owner (docs/architecture.md) or passing a value in."""
    graph = import_graph(module_level=False)
    found = _cycles(graph)
    detail = [f"{m} -> {', '.join(sorted(graph[m] & set(comp)))}" for comp in found for m in comp]
    assert found == [], "modules that import each other, counting imports inside functions: " + "; ".join(detail)


def test_no_submodule_takes_a_name_from_the_package_root():
    """`from . import __version__` in a submodule made fp8cookbook/__init__ (which loads submodules lazily) and the
    submodule import each other; the version has its own module."""
    bad = [f"{m}:{line} takes {name} from fp8cookbook/__init__.py"
           for m in MODULES if m != "fp8cookbook"
           for target, name, line in _imports(m, module_level=False) if target == "fp8cookbook" and name]
    assert bad == []


def test_no_private_name_taken_from_another_module():
    """`from .x import _y` across modules (and importing another package's private module) couples a caller to
    what the owner may change freely: the owner exports a public name instead."""
    bad = []
    for m in MODULES:
        pkg = m if MODULES[m][1] else m.rsplit(".", 1)[0]
        for target, name, line in _imports(m, module_level=False):
            if name and name.startswith("_") and not name.startswith("__") and target != m:
                bad.append(f"{m}:{line} imports {name} from {target}")
            private = [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
            if private and not m.startswith(target.rsplit(".", 1)[0] + ".") and target != m and pkg != target:
                bad.append(f"{m}:{line} imports the private module {target}")
        bad += _private_attributes(m)
    assert bad == []


def _private_attributes(name: str) -> list[str]:
    """`mod._y` where `mod` is a project module bound by an import (as cli once used `bench._log_stderr`)."""
    path, is_pkg = MODULES[name]
    tree = ast.parse(path.read_text())
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            bound.update({a.asname or a.name: f"{target}.{a.name}" for a in node.names
                          if f"{target}.{a.name}" in MODULES})
        elif isinstance(node, ast.Import):
            bound.update({a.asname: a.name for a in node.names if a.asname and a.name in MODULES})
    return [f"{name}:{node.lineno} uses {bound[node.value.id]}.{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
            and bound[node.value.id] != name and node.attr.startswith("_") and not node.attr.startswith("__")]


def test_temp_folder_then_rename_lives_in_files_py():
    """One home for staging a folder or file beside its target and renaming it in (`files.staged_dir`,
    `files.atomic_file`): no other module builds its own temporary and renames it."""
    bad = []
    for m, (path, _) in MODULES.items():
        if m == "fp8cookbook.files":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("mkdtemp", "mkstemp", "NamedTemporaryFile"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} tempfile.{node.attr}")
    assert bad == []


def test_quantise_by_scale_lives_in_numerics():
    """"Quantise x by its scale" once (fp8/numerics.py: IEEE quotient, saturate at 448, round to e4m3): no other
    module writes the e4m3 limit as a number or its own division rounding; they call `quantize_fp8` /
    `tl_quantize_fp8` and use `FP8_MAX`."""
    bad = []
    for m, (path, _) in MODULES.items():
        if m == "fp8cookbook.fp8.numerics":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and type(node.value) in (int, float) and abs(node.value) == 448:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} the literal {node.value}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "div.rn" in node.value:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} its own division rounding")
    assert bad == []


def test_one_json_cleaner():
    """JSON cleaning (dataclasses, paths, tensors -> JSON; non-finite floats -> null) is `files.to_jsonable`:
    no other module has its own recursive cleaner or a json.loads(json.dumps(...)) round trip."""
    bad = []
    for m, (path, _) in MODULES.items():
        if m == "fp8cookbook.files":
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            calls = {ast.unparse(c.func) for c in ast.walk(fn) if isinstance(c, ast.Call)}
            if fn.name in calls and "math.isfinite" in calls:
                bad.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} cleans values for JSON")
        for c in ast.walk(ast.parse(path.read_text())):
            if (isinstance(c, ast.Call) and ast.unparse(c.func) == "json.loads" and c.args
                    and isinstance(c.args[0], ast.Call) and ast.unparse(c.args[0].func) == "json.dumps"):
                bad.append(f"{path.relative_to(ROOT)}:{c.lineno} json.loads(json.dumps(...))")
    assert bad == []


if __name__ == "__main__":
    for comp in _cycles(import_graph(module_level=False)):
        print(" ".join(comp))
