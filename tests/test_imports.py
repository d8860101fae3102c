"""The layers point one way: runtime <- toolchain <- tools <- CLI, with no import cycles.

Read from the source with `ast` (nothing is imported), so a lazy import inside a function counts as much as one at
the top of a module: a device install must be able to run every runtime path without the toolchain's modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# Package folders as pyproject.toml maps them.
FOLDERS = {"edge_vl2": REPO / "edge_vl2", "edge_vl2.quantize": REPO / "quantize", "edge_vl2.export": REPO / "export",
           "edge_vl2.devices": REPO / "devices"}
# Layer of a module: the longest matching prefix. Lower numbers may not import higher ones.
LAYERS = {"edge_vl2": 0, "edge_vl2.devices": 0, "edge_vl2.quantize": 1, "edge_vl2.export": 1, "edge_vl2.tools": 2,
          "edge_vl2.cli": 3}
# Size limits of the runtime (layer 0): a module or function past them must be split or carry a reason here.
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
SIZE_EXCEPTIONS: dict[str, str] = {}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _import_nodes(tree: ast.Module, typing_too: bool):
    """Every import statement of a file, at any depth; `typing_too=False` skips `if TYPE_CHECKING:` blocks, which
    never run."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" \
                and not typing_too:
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def imports(module: str, path: Path, known: set[str], typing_too: bool = True) -> set[str]:
    """The project modules `module` imports, relative imports resolved. Importing a name from a package counts as
    importing the module of that name when one exists."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path)), typing_too):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        else:
            candidates = [a.name for a in node.names]
        for c in candidates:
            while c and c not in known:
                c = c.rpartition(".")[0]
            if c and c != module and not module.startswith(c + "."):  # a module's own packages load first anyway
                out.add(c)
    return out


def graph(typing_too: bool = True) -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods), typing_too) for m, p in mods.items()}


def test_layers_point_one_way():
    wrong = sorted(f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
                   for m, targets in graph().items() for t in targets if layer(t) > layer(m))
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """At any depth (a lazy import inside a function still ties two modules together), type-only imports aside."""
    edges = graph(typing_too=False)
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_runtime_modules_and_functions_stay_small():
    """A newcomer reads a runtime module in one sitting: <= 400 lines, functions <= 60 lines."""
    too_big = []
    for m, path in modules().items():
        if layer(m) != 0 or m in SIZE_EXCEPTIONS:
            continue
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{m}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{m}.{node.name}" not in SIZE_EXCEPTIONS:
                    too_big.append(f"{m}.{node.name}: {n} lines")
    assert not too_big, "\n".join(too_big)
