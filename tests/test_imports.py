"""Import hygiene (issue 10): the model library stands alone, has no import cycles, imports at the top.

* At run time, in a fresh interpreter: importing every module of the model library
  (``sparse_dit`` minus the installed ``parallel``/``recipes``/``evals`` packages) loads neither
  deepspeed nor any of those three packages.
* Statically (``ast``), over sparse_dit/, parallel/, recipes/ and evals/: the import graph of the
  model library and ``parallel`` has no cycle; no library module imports parallel, recipes or
  evals; no library or parallel module imports one of our modules inside a function; no library
  module mentions deepspeed or torch.distributed.

The graph counts what Python executes: ``from sparse_dit.moe.layer import X`` in
``sparse_dit.flops`` runs ``sparse_dit/moe/__init__.py`` first, so it is an edge to
``sparse_dit.moe`` as well as to ``sparse_dit.moe.layer`` (a package's own modules do not get
that edge: the package is already being imported when they run). Imports under
``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Top-level folders that install under sparse_dit (setup.py's package_dir) and are not the library.
APP_FOLDERS = {"parallel": "sparse_dit.parallel", "recipes": "sparse_dit.recipes", "evals": "sparse_dit.evals"}
APPS = tuple(APP_FOLDERS.values())


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in APP_FOLDERS:
        parts = APP_FOLDERS[parts[0]].split(".") + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    out = {}
    for folder in ("sparse_dit", *APP_FOLDERS):
        for path in sorted((ROOT / folder).rglob("*.py")):
            out[_module_name(path)] = path
    return out


SOURCES = _sources()


def _is_package(name: str) -> bool:
    return SOURCES[name].name == "__init__.py"


def _is_library(name: str) -> bool:
    return name.startswith("sparse_dit") and not name.startswith(APPS)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, inside a function) for every import statement of ``name``."""
    path = SOURCES[name]
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:  # relative import
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        # `from pkg import submodule` imports the submodule; `from mod import name` the module
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in SOURCES]
        return subs + ([base] if len(subs) < len(node.names) else [])

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in targets(child):
                    if target.split(".")[0] == "sparse_dit":
                        found.append((target, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def _edges(name: str) -> list[tuple[str, int, bool]]:
    """Imports of ``name`` resolved to modules we have, plus the parent packages they run."""
    out = []
    own_ancestors = {name.rsplit(".", i)[0] for i in range(name.count(".") + 1)}
    for target, line, in_function in _imports(name):
        while target not in SOURCES and "." in target:  # `import sparse_dit.x.name`-style leftovers
            target = target.rpartition(".")[0]
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in SOURCES and mod not in own_ancestors:
                out.append((mod, line, in_function))
    return out


GRAPH = {name: _edges(name) for name in SOURCES}


def _find_cycle(nodes: set[str]) -> list[str] | None:
    """One import cycle among ``nodes`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m, _, _ in GRAPH[n]:
            if m not in nodes or m == n:
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = dfs(m)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(nodes):
        if n not in state:
            cycle = dfs(n)
            if cycle:
                return cycle
    return None


def test_graph_sees_the_modules_and_edges_it_should():
    # guards the test itself: a parser that finds nothing would pass everything below
    assert "sparse_dit.dit" in SOURCES and "sparse_dit.parallel.engine" in SOURCES and "sparse_dit.recipes.train" in SOURCES
    assert ("sparse_dit.config", False) in {(m, f) for m, _, f in GRAPH["sparse_dit.dit"]}
    assert "sparse_dit.moe" in {m for m, _, _ in GRAPH["sparse_dit.flops"]}  # the implicit parent-package edge


def test_no_import_cycle_anywhere():
    cycle = _find_cycle(set(SOURCES))  # the model library, parallel, recipes and evals
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_model_library_never_imports_parallel_recipes_or_evals():
    bad = [f"{SOURCES[n].relative_to(ROOT)}:{line}: {m}" for n in SOURCES if _is_library(n) for m, line, _ in GRAPH[n] if m.startswith(APPS)]
    assert not bad, bad


def test_no_function_level_imports_of_our_modules():
    # Heavy optional third-party imports may be deferred (with a comment saying why); our own
    # modules never are: a deferred import of ours hides a cycle or a layering mistake.
    bad = [
        f"{SOURCES[n].relative_to(ROOT)}:{line}: {m}"
        for n in SOURCES
        for m, line, in_function in GRAPH[n]
        if in_function
    ]
    assert not bad, bad


def test_model_code_never_mentions_deepspeed_or_torch_distributed():
    offenders = []
    for name, path in SOURCES.items():
        if not _is_library(name):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                names = [f"{node.value.id}.{node.attr}"]  # torch.distributed.* without an import
            for n in names:
                if n.split(".")[0] == "deepspeed" or n.startswith("torch.distributed"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {n}")
    assert not offenders, offenders


def test_importing_the_whole_model_library_loads_no_deepspeed_parallel_recipes_or_evals():
    library = sorted(n for n in SOURCES if _is_library(n))
    code = (
        "import importlib, json, sys\n"
        f"for name in {library!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "sparse_dit.moe" in loaded and "sparse_dit.data" in loaded and "sparse_dit.presets" in loaded
    bad = [m for m in loaded if m.split(".")[0] == "deepspeed" or m.startswith(APPS)]
    assert not bad, bad
