"""A GRPO stage's `kind: python` rewards are the user's code: checked without running it, run only when asked.

`ft validate` and `ft data preview` call `check_function`, which finds the module's file the way an import would (the
current directory first, then `sys.path`) without importing it or the packages above it, and reads its source for the
function's name. `ft train` imports it (`load_function`) only when the stage says `grpo.allow_reward_code: true` or
the command line `--allow-code`; `reward_code_problems` is the refusal otherwise, before anything loads. The current
directory is on `sys.path` for the import only. Imports nothing heavy (no torch): `ft validate` uses it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.recipe.schema import Recipe, RewardSpec
from finetune.run.records import redact_text


def module_file(module_name: str) -> Path | None:
    """The file `module_name` would be imported from (the current directory first, then `sys.path`), found without
    importing anything: not the module, not the packages above it. None when there is none."""
    search: list[str] | None = [str(Path.cwd()), *sys.path]
    spec = None
    parts = module_name.split(".")
    for k in range(len(parts)):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: k + 1]), search)
        if spec is None:
            return None
        search = list(spec.submodule_search_locations or [])
    return Path(spec.origin) if spec is not None and spec.origin else None


def check_function(target: str) -> Path:
    """The file of a `module.path:function` reward, checked without running it: the module's file exists and its
    source defines (or imports) `function` at the top level.

    Raises:
        FinetuneError: No such module, a module that does not parse, or no such name in it.
    """
    module_name, _, attr = target.partition(":")
    path = module_file(module_name)
    if path is None:
        raise FinetuneError(f"reward function {target}: no module '{module_name}' in {Path.cwd()} or on the Python "
                            "path; put its .py file in the folder you run `ft` from")
    if path.suffix != ".py":
        return path  # a compiled module: its names are known only once it runs
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as e:
        raise FinetuneError(f"reward function {target}: {path} cannot be read as Python ({e})") from None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    if attr not in names and "*" not in names and "__getattr__" not in names:
        raise FinetuneError(f"reward function {target}: {path} defines no function '{attr}' at its top level")
    return path


@contextmanager
def _current_directory_importable() -> Iterator[None]:
    """The current directory on `sys.path` for one import, and off it again afterwards."""
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def load_function(target: str) -> Callable[..., Any]:
    """The function named `module.path:function`, imported from the current directory (or the Python path); runs the
    module's code, so only with the recipe's opt-in (`build_rewards`)."""
    module_name, _, attr = target.partition(":")
    try:
        with _current_directory_importable():
            module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module's, reported as such
        raise FinetuneError(redact_text(f"reward function {target}: cannot import module '{module_name}' "
                                        f"({type(e).__name__}: {e}); it must be importable from {Path.cwd()}")) from e
    func = getattr(module, attr, None)
    if not callable(func):
        raise FinetuneError(f"reward function {target}: module '{module_name}' has no function '{attr}'")
    return func


def code_opt_in_problem(where: str, spec: RewardSpec, allowed: bool) -> str | None:
    """Why a python reward may not run (None when it may): the recipe did not opt in to running user code."""
    if spec.kind != "python" or allowed:
        return None
    return (f"{where}: '{spec.function}' is Python code that `ft train` would import and run; read it, then set "
            "grpo.allow_reward_code: true in the stage (or pass `ft train --allow-code`)")


def reward_code_problems(recipe: Recipe) -> list[str]:
    """The python rewards that `ft train` would run without the recipe's opt-in (`grpo.allow_reward_code`), one
    problem each; checked by `ft validate` and `ft train`, not by `ft data preview` (which runs no reward)."""
    problems = []
    for i, stage in enumerate(recipe.effective_stages()):
        if stage.kind == "grpo":
            for j, spec in enumerate(stage.grpo.rewards):
                problem = code_opt_in_problem(f"stages[{i}].grpo.rewards[{j}].function", spec,
                                              stage.grpo.allow_reward_code)
                problems += [problem] if problem else []
    return problems


def allow_reward_code(recipe: Recipe) -> None:
    """`--allow-code`: every grpo stage may run its python rewards."""
    for stage in recipe.stages:
        if stage.kind == "grpo":
            stage.grpo.allow_reward_code = True
