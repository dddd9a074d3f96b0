"""The `ft` command line. Commands stay thin; torch and transformers are imported inside the commands that train,
so `ft --help`, `ft validate` and `ft explain` answer quickly."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from finetune.errors import FinetuneError

app = typer.Typer(
    name="ft",
    help="Fine-tune causal language models with LoRA / QLoRA (SFT, then DPO) from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RecipeArg = Annotated[Path, typer.Argument(help="Path of the recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe key: --set training.learning_rate=1e-4 (repeatable)."),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(message, fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _load(recipe_path: Path, overrides: list[str] | None, check_paths: bool = True):
    from finetune.checks import check_recipe_paths
    from finetune.recipe_io import RecipeError, load_recipe

    try:
        recipe = load_recipe(recipe_path, overrides or [])
    except RecipeError as e:
        raise _fail(str(e)) from None
    if check_paths:
        problems = check_recipe_paths(recipe)
        if problems:
            raise _fail(str(RecipeError(str(recipe_path), problems)))
    return recipe


@app.command()
def validate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing when the recipe is valid.")] = False,
) -> None:
    """Check a recipe without loading any model (types, ranges, cross-field rules, paths) and print it resolved.

    Exit code 0 when valid, 2 when not.
    """
    from finetune.recipe_io import dump_recipe

    resolved = _load(recipe, set_)
    if not quiet:
        typer.echo(f"# {recipe}: valid. Resolved recipe (every default written out):")
        typer.echo(dump_recipe(resolved))


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run folder that holds a finished run.")] = False,
    from_stage: Annotated[str | None, typer.Option(help="Rerun from this stage on, even if it finished.")] = None,
) -> None:
    """Run every stage of a recipe (SFT, then DPO if asked) into one run folder."""
    loaded = _load(recipe, set_)
    if overwrite:
        loaded.output.overwrite = True
    from finetune.stages.pipeline import run_pipeline

    try:
        run_pipeline(loaded, recipe_path=recipe, from_stage=from_stage)
    except FinetuneError as e:
        raise _fail(f"error: {e}", 1) from None


@app.command()
def explain(
    key: Annotated[str | None, typer.Argument(help="A section or key: `lora`, `training.learning_rate`...")] = None,
) -> None:
    """Show the documentation of recipe sections and keys (the same text as docs/recipe.md)."""
    from finetune.docs import describe

    try:
        typer.echo(describe(key))
    except KeyError as e:
        raise _fail(str(e.args[0])) from None


data_app = typer.Typer(help="See what a recipe's data becomes before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("preview")
def data_preview(
    recipe: RecipeArg,
    n: Annotated[int, typer.Option("-n", "--samples", min=0, help="How many samples to show.")] = 3,
    stage: Annotated[str | None, typer.Option(help="Stage whose data to show (default: the first).")] = None,
    split: Annotated[str, typer.Option(help="train or eval.")] = "train",
    color: Annotated[bool | None, typer.Option(
        "--color/--no-color", help="Colour trained tokens (default: on a terminal; else they are marked «...»).")] = None,
    set_: SetOpt = None,
) -> None:
    """Show rendered samples with trained tokens marked, token counts, a length histogram and data checks.

    Loads the tokenizer only, never the model. Exit code 1 when a check fails (end-of-turn token not trained, pad
    equal to eos, fully masked samples).
    """
    loaded = _load(recipe, set_)
    from finetune.data.preview import run_preview

    try:
        ok = run_preview(loaded, n=n, stage=stage, split=split, color=color)
    except FinetuneError as e:
        raise _fail(f"error: {e}", 1) from None
    if not ok:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
