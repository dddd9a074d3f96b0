"""`ft eval TARGET [--against OTHER]`: score a run, an adapter export, a merged export or a model folder.

Everything is read and checked before a model loads: the recipe (the run's own, or `--recipe`), every eval file,
both tokenizers. Then each model is loaded once (`finetune.export.generate.load`: a run's stage exactly as trained),
scored by `finetune.eval.suite.evaluate`, and the result is printed as a table and written as JSON: for a run to
`<run>/eval/<stage>.json`, with the report (`<run>/report/`) redrawn to show it.

Forgetting compares like with like: a run or adapter with its own base, adapter disabled (4-bit for QLoRA); a merged
export with the base its weights came from (the 4-bit base, loaded as training loaded it, for the default merge into
the dequantized weights; the full-precision base for `--merge-into original`); a model folder with the recipe's base
loaded plainly. So a run and its merged export get the same figures; `--forgetting-base full` compares any target
with the full-precision base instead. The figures say which base they used (`forgetting.base`).

`--against` scores the other model side by side and measures the mean KL(other || target) per token on the general
text: refused (with the reason, the rest still compared) when the two tokenizers differ, on the common vocabulary
when one output layer is padded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune.errors import FinetuneError
from finetune.recipe.schema import Recipe, StageConfig, load_recipe


@dataclass
class Target:
    """What one side of `ft eval` is: its path, the run it belongs to (if any), and its stage."""

    path: Path
    run_dir: Path | None = None
    stage: str | None = None
    recipe: Recipe | None = None


@dataclass
class EvalResult:
    """The figures of the target (and of `--against`), their comparison, and where the JSON went."""

    target: dict[str, Any]
    against: dict[str, Any] | None = None
    comparison: dict[str, Any] = field(default_factory=dict)
    stage: str = ""
    written: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "target": self.target, "against": self.against, "comparison": self.comparison}


def _target(path: Path, stage: str | None) -> Target:
    from finetune.export.generate import _run_folder
    from finetune.export.runstage import open_run

    if not path.exists():
        raise FinetuneError(f"{path} does not exist; pass a run folder, an adapter or merged export, or a model folder")
    run = _run_folder(path)
    if run is None:
        if not ((path / "adapter_config.json").exists() or (path / "config.json").exists()):
            raise FinetuneError(f"{path} holds neither a run (recipe.yaml), an adapter nor a model (config.json)")
        return Target(path)
    opened = open_run(run[0], stage or run[1])
    return Target(path, opened.run_dir, opened.stage.name, opened.recipe)


def _recipe_stage(target: Target, other: Target | None, recipe_path: Path | None,
                  stage: str | None) -> tuple[Recipe, StageConfig]:
    if recipe_path is not None:
        recipe = load_recipe(recipe_path, [])
    else:
        recipe = next((t.recipe for t in (target, other) if t is not None and t.recipe is not None), None)
        if recipe is None:
            raise FinetuneError(f"{target.path} is not a run folder: give --recipe RECIPE, whose data.eval, "
                                "data.task_eval and eval section say what to evaluate on")
    name = stage or next((t.stage for t in (target, other) if t is not None and t.stage), None)
    stages = recipe.effective_stages()
    chosen = next((s for s in stages if s.name == name), stages[-1] if name is None else None)
    if chosen is None:
        raise FinetuneError(f"the recipe has no stage '{name}' (stages: {', '.join(s.name for s in stages)})")
    return recipe, chosen


def _tokenizer(target: Target):
    from finetune.export.runstage import open_run
    from finetune.model.loading import load_tokenizer

    source = open_run(target.run_dir, target.stage).tokenizer_dir if target.run_dir else target.path
    return load_tokenizer(None, str(source))


def tokenizer_difference(a, b) -> str | None:
    """Why two tokenizers cannot be compared token by token, or None when they share the vocabulary."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return None
    only = sorted(set(va) ^ set(vb))[:3]
    moved = [t for t in va if t in vb and va[t] != vb[t]][:3]
    detail = f"tokens in one only: {only}" if only else f"same tokens, other ids: {moved}"
    return f"the tokenizers differ ({len(va)} vs {len(vb)} tokens; {detail}); the KL comparison needs one vocabulary"


ForgettingBase = Literal["as-trained", "full"]


def merged_from(path: Path):
    """The 4-bit quantization a merged export's weights were dequantized from (its export.json: `merge_into:
    dequantized` of a QLoRA run), or None (an original-weights merge, or a model folder that is no export)."""
    from finetune.recipe.schema import QuantizationConfig
    from finetune.run.files import read_json

    meta = read_json(path / "export.json", {})
    quant = meta.get("quantization") if isinstance(meta, dict) else None
    if meta.get("merge_into") != "dequantized" or not isinstance(quant, dict) or quant.get("mode") in (None, "none"):
        return None
    try:
        return QuantizationConfig(**quant)
    except ValueError as e:  # pydantic's ValidationError: an export.json from another version of the toolkit
        raise FinetuneError(f"{path}/export.json: unreadable quantization section ({e})") from None


def _base_forward(loaded, recipe: Recipe, target: Target, which: ForgettingBase = "as-trained"):
    """The base model's logits function for forgetting and the words saying which base it is (None for the base
    itself). Like with like by default (`as-trained`): a run or adapter is compared with its own base, adapter
    disabled (4-bit when trained so); a merged export with the base its weights came from (the 4-bit base for a
    merge into the dequantized weights, loaded as training loaded it; the full-precision base for `original`); a
    model folder with the full-precision base. `full`: the full-precision base for every target."""
    from finetune.eval import scoring

    off = scoring.adapter_off(loaded.model)
    if off is not None and which == "as-trained":
        return off, scoring.adapter_off_words(loaded.model)
    from finetune.model.gguf_base import base_source

    base = base_source(recipe.model)
    if off is None and Path(base).resolve() == target.path.resolve():
        return None, "the target is the base model"
    from transformers import AutoModelForCausalLM

    from finetune.model.loading import load_model, load_tokenizer

    why = tokenizer_difference(loaded.tokenizer, load_tokenizer(recipe.model))
    if why is None and loaded.model.get_output_embeddings().weight.shape[0] != _vocab_rows(base):
        why = "the base model's vocabulary size differs"
    if why:
        return None, f"no forgetting figures against the base model {base}: {why}"
    quant = merged_from(target.path) if off is None and which == "as-trained" else None
    if quant is not None:
        model = load_model(recipe.model_copy(update={"quantization": quant}), tokenizer=loaded.tokenizer)
        return scoring.forward(model.eval()), (f"the {quant.mode} 4-bit base {base}, loaded as training loaded it "
                                               "(the export's weights are merged into its dequantized weights)")
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    return scoring.forward(model.eval()), f"the full-precision base {base} ({str(model.dtype).removeprefix('torch.')})"


def _vocab_rows(path: str) -> int | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path), "vocab_size", None)


def _score(target: Target, recipe: Recipe, stage: StageConfig, suite, say,
           which: ForgettingBase = "as-trained") -> tuple[Any, dict]:
    from finetune.data.templates import apply_template
    from finetune.eval.suite import evaluate
    from finetune.export.generate import load

    started = time.perf_counter()
    loaded = load(target.path, stage=target.stage if target.run_dir and target.path == target.run_dir else None)
    say(f"# {loaded.description} (loaded in {time.perf_counter() - started:.1f} s)")
    template = apply_template(loaded.tokenizer, recipe.stage_data(stage))
    base, base_note = _base_forward(loaded, recipe, target, which)
    if suite.general:
        say(f"  forgetting base: {base_note}")
    figures = evaluate(loaded.model, loaded.tokenizer, template, suite, base=base, say=say)
    figures["model"] = loaded.description
    figures["forgetting_base"] = base_note
    if "forgetting" in figures:
        figures["forgetting"]["base"] = base_note  # which base the figures compare with, beside them
    figures["seconds"]["total"] = round(time.perf_counter() - started, 2)
    return loaded, figures


def evaluate_target(path: str | Path, against: str | Path | None = None, recipe: str | Path | None = None,
                    stage: str | None = None, say=print, forgetting_base: ForgettingBase = "as-trained") -> EvalResult:
    """Score TARGET (and OTHER side by side); write `<run>/eval/<stage>.json` and the report for a run target.

    `forgetting_base`: `as-trained` compares each model with the base its weights came from (see `_base_forward`),
    `full` with the full-precision base. The run folders of both are locked for reading meanwhile: a run being trained
    is refused, and `ft train` of them waits for the evaluation (which would otherwise write a stale
    `eval/<stage>.json` into a retrained run)."""
    from contextlib import ExitStack

    from finetune.export.generate import enclosing_run
    from finetune.run.lock import reading

    with ExitStack() as locks:
        runs = (enclosing_run(Path(p)) for p in (path, against) if p is not None)
        for run in dict.fromkeys(r.resolve() for r in runs if r is not None):
            locks.enter_context(reading(run, "ft eval"))
        return _evaluate(path, against, recipe, stage, say, forgetting_base)


def _evaluate(path: str | Path, against: str | Path | None, recipe: str | Path | None, stage: str | None,
              say, forgetting_base: ForgettingBase) -> EvalResult:
    from finetune.eval import scoring
    from finetune.eval.suite import general_samples, load_suite

    target = _target(Path(path), stage)
    other = _target(Path(against), None) if against is not None else None
    recipe_obj, stage_cfg = _recipe_stage(target, other, Path(recipe) if recipe else None, stage)
    suite = load_suite(recipe_obj, stage_cfg)  # every file checked before any model loads
    why_not_kl = tokenizer_difference(_tokenizer(target), _tokenizer(other)) if other is not None else None
    if why_not_kl:
        say(f"note: --against: {why_not_kl}; the other figures are still compared")
    loaded, figures = _score(target, recipe_obj, stage_cfg, suite, say, forgetting_base)
    result = EvalResult(target={"path": str(target.path), **figures}, stage=stage_cfg.name)
    if other is not None:
        other_loaded, other_figures = _score(other, recipe_obj, stage_cfg, suite, say, forgetting_base)
        result.against = {"path": str(other.path), **other_figures}
        if why_not_kl:
            result.comparison = {"kl_refused": why_not_kl}
        elif suite.general:
            try:  # a padded output layer is compared on the common vocabulary (`common_vocab`)
                result.comparison = scoring.compare(scoring.forward(loaded.model), scoring.forward(other_loaded.model),
                                                    general_samples(loaded.tokenizer, suite),
                                                    loaded.tokenizer.pad_token_id)
                result.comparison["file"] = suite.general_path
            except FinetuneError as e:  # the other figures are kept
                result.comparison = {"kl_refused": str(e)}
    if target.run_dir is not None:
        from finetune.run.files import write_json_atomic
        from finetune.run.report import write_report

        result.written = target.run_dir / "eval" / f"{stage_cfg.name}.json"
        result.written.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(result.written, result.as_dict())
        write_report(target.run_dir)
    return result
