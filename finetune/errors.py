"""Errors the CLI turns into a one-paragraph message instead of a traceback. Imports nothing of finetune."""


class FinetuneError(Exception):
    """A problem the user can act on (bad data, missing files, a run folder in the way...)."""


class RecipeError(Exception):
    """A recipe that cannot be used. `problems` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the recipe:\n{lines}")


class RunInterrupted(FinetuneError):
    """The run stopped on a signal after saving a checkpoint. `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# `ft train` flags in messages, and what the Python `train()` takes instead.
_PYTHON_TERMS = (
    (r"`ft train (\S+) --resume( --nproc (\d+))?`", r'`train("\1/recipe.yaml", resume=True, nproc=\3)`'),
    (r"--from-stage (NAME|[\w.-]+)", r'from_stage="\1"'),
    (r"--overwrite( \(or output\.overwrite: true\))?", "overwrite=True"),
    (r"--resume", "resume=True"),
    (r"--set ", "overrides="),
)


def in_python_terms(message: str) -> str:
    """A message written for `ft train` with its flags named as the keyword arguments of `finetune.train()`."""
    import re

    for pattern, replacement in _PYTHON_TERMS:
        message = re.sub(pattern, replacement, message)
    return message.replace(", nproc=)", ")")
