"""The package's shape: imports only go down the layers, no import circles, small modules.

Layers, bottom to top (each may import the ones below it, never above):
errors, hashing -> recipe -> distributed -> data -> model -> eval -> run -> stages -> export -> the API and CLI.
Function-level (lazy) imports count too: a lazy import that goes up is still a circle waiting to happen.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "finetune"
LAYERS = ["errors", "recipe", "distributed", "data", "model", "eval", "run", "stages", "export", "api"]
MAX_LINES = 300


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] == "hashing":
        return "errors"  # the bottom layer: modules that import nothing of finetune
    if len(parts) == 1 or parts[1] in ("cli", "__main__"):
        return "api"  # finetune/__init__.py (train()), finetune/cli.py
    return parts[1]


def _imports(path: Path) -> set[str]:
    """Every finetune module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
            if node.module == "finetune":
                found |= {f"finetune.{a.name}" for a in node.names}
            else:
                # `from finetune.run import checkpoints` imports a submodule; other names come from the module itself
                subs = {f"{node.module}.{a.name}" for a in node.names
                        if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists()}
                found |= subs or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("finetune")}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules} - {name} for name, path in modules.items()}


def test_imports_only_go_down_the_layers():
    wrong = []
    for module, deps in _graph().items():
        mine = LAYERS.index(_layer(module))
        for dep in deps:
            if dep.startswith("finetune.kernels"):
                continue  # pure ops, installed under finetune.kernels, import nothing of finetune
            if LAYERS.index(_layer(dep)) > mine:
                wrong.append(f"{module} ({_layer(module)}) imports {dep} ({_layer(dep)})")
    assert not wrong, "imports that go up the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    graph = _graph()
    # package __init__ modules are entered whenever a submodule is imported: count the edge package -> submodule
    # only when written, as done above; look for any cycle among modules
    circles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                circles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_kernels_import_nothing_of_finetune_and_patch_nothing():
    for path in (ROOT / "kernels").glob("*.py"):
        deps = {m for m in _imports(path) if not m.startswith("finetune.kernels")}
        assert not deps, f"kernels/{path.name} imports {deps}: kernels are pure ops"


def test_modules_are_small_or_say_why():
    big = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text(encoding="utf-8").count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if lines > MAX_LINES and "300 lines" not in doc:
            big.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not big, "modules over 300 lines without a reason in their docstring:\n" + "\n".join(big)


def test_every_subpackage_says_what_it_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert "import" in doc.lower(), f"{init.relative_to(ROOT)}: say what lives here and what it may import"


def test_one_docstring_dialect():
    """Google-style sections and Markdown code spans in finetune/ and kernels/: no reST roles or double backticks."""
    import re

    rest = re.compile(r"(?<!`)``(?!`)|:param |:returns?:|:rtype:|:raises ")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in [*PACKAGE.rglob("*.py"), *(ROOT / "kernels").glob("*.py")]
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if rest.search(line)]
    assert not found, "reST markup (write `code` and Args:/Returns: sections):\n" + "\n".join(found)
