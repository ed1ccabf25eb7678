"""The package's layers: no import cycles, errors at the bottom, a quick ``mocolab --help``.

The import graph is read from the source (the AST of every module, imports inside functions
included, ``if TYPE_CHECKING:`` blocks excluded): an import cycle is a design error even when
a function-level import hides it from Python, so the graph must be acyclic. Importing
``a.b.c`` runs the packages ``a.b`` and ``a`` too, so those are edges as well (except a
module's own parent packages, which are already running when it is imported).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mocolab

PACKAGE = Path(mocolab.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines under ``if TYPE_CHECKING:`` (imports for annotations only, never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports(name: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every mocolab module ``name`` runs
    by importing, with the packages that run on the way."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    in_function = {id(sub) for node in ast.walk(tree)
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for sub in ast.walk(node)}
    own = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(own[:len(own) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        for target in targets:
            parts = target.split(".")
            for k in range(2, len(parts) + 1):  # a.b, a.b.c: each package runs on the way
                module = ".".join(parts[:k])
                if module in MODULES and not (name + ".").startswith(module + "."):
                    found.append((module, node.lineno, id(node) in in_function))
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle ``[a, b, …, a]`` of ``graph``, or ``None`` (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_import_graph_has_no_cycle():
    graph = {name: {m for m, _, _ in imports(name) if m != name} for name in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_errors_is_a_leaf_with_one_base():
    from mocolab import checkpoint, config, data, errors, train

    assert imports("mocolab.errors") == []
    for cls in (errors.ConfigError, errors.CheckpointError, errors.DatasetError,
                errors.NonFiniteLossError):
        assert issubclass(cls, errors.MocolabError)
    # still importable from their homes before errors.py
    assert config.ConfigError is errors.ConfigError
    assert checkpoint.CheckpointError is errors.CheckpointError
    assert data.DatasetError is errors.DatasetError
    assert train.NonFiniteLossError is errors.NonFiniteLossError


def _help_modules() -> tuple[set[str], bool]:
    """The mocolab modules ``mocolab --help`` loads, and whether it loads torch."""
    code = ("import sys\nfrom mocolab.cli import build_parser\n"
            "try:\n    build_parser(['--help']).parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(m for m in sys.modules if m.startswith('mocolab')))\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules, torch_loaded = out.stdout.strip().splitlines()[-2:]
    return set(modules.split()), torch_loaded == "True"


def test_imports_inside_functions_only_where_they_keep_help_fast():
    """``mocolab --help`` loads no torch; the modules it loads (the command line and the
    modules cli imports) defer their imports of the rest to the functions that need them.
    Elsewhere a module imports what it uses at its top."""
    help_modules, torch_loaded = _help_modules()
    assert not torch_loaded, "mocolab --help imports torch: it should print at once"
    deferred = sorted(f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {module}"
                      for name in MODULES if name not in help_modules
                      for module, line, inside in imports(name) if inside)
    assert deferred == [], "imports inside functions outside mocolab --help's modules:\n" + \
        "\n".join(deferred)


def test_every_module_imports_in_a_fresh_interpreter():
    """Each module, in sorted order, in one fresh interpreter (a hidden cycle or a missing
    name shows up as an ImportError)."""
    names = sorted(n for n in MODULES if not n.endswith("__main__"))
    code = f"import importlib\nfor name in {names!r}:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


#: The parts, below the methods (DESIGN.md): what a method composes.
PARTS = ("mocolab.augment", "mocolab.backbones", "mocolab.dictionaries", "mocolab.distributed",
         "mocolab.heads", "mocolab.losses", "mocolab.masking", "mocolab.momentum", "mocolab.optim",
         "mocolab.schedules", "mocolab.vit")


def test_parts_import_only_errors_and_other_parts():
    """errors → parts → methods → …: a part imports no method, config, loop or evaluation."""
    def is_part(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in PARTS)

    parts = [name for name in MODULES if is_part(name)]
    assert "mocolab.masking" in parts
    wrong = sorted(f"{name} imports {module}" for name in parts for module, _, _ in imports(name)
                   if not is_part(module) and module != "mocolab.errors")
    assert wrong == [], "parts importing above their layer:\n" + "\n".join(wrong)
