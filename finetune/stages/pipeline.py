"""Run the stages of a recipe in order, into one run folder that this module owns.

Run folder layout:
    recipe.yaml          the resolved recipe (every default written out)
    metrics.jsonl        one JSON line per logged step, every stage (`stage` key)
    tokenizer/           the tokenizer used (pad token set)
    <stage>/adapter/     the stage's LoRA adapter (safetensors + adapter_config.json), loadable by plain peft
    <stage>/summary.json the stage's result and settings; its presence marks the stage finished
    <stage>/checkpoints/ resumable checkpoint-N folders, each complete or absent (finetune.run.checkpoints)
    summary.json         status (running, finished, interrupted, failed) and every stage's metrics
    manifest.json        lineage: recipe hash, data hashes, base model, versions, commit, seeds, hardware
    .lock                held by the `ft train` writing the folder, removed when it ends (finetune.run.lock)
    wandb/, tensorboard/ tracker files when the recipe asks for them; report/ after `ft report`
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.distributed.process import is_main_process, wait_for_everyone
from finetune.errors import FinetuneError
from finetune.model.attention import attention_calls
from finetune.model.loading import free_stage_memory
from finetune.model.tiled_mlp import tiled_calls
from finetune.recipe.schema import Recipe, StageConfig
from finetune.run.files import read_json, write_json_atomic
from finetune.run.manifest import write_manifest, write_recipe
from finetune.run.opening import check_inputs, open_run_dir
from finetune.run.resume import record_stop, resume_point, stop_message
from finetune.run.tracking import Tracker, open_tracker
from finetune.stages.common import StageContext, StageResult, quiet_library_noise


@dataclass
class RunResult:
    """What `train()` returns: where things are and what each stage measured."""

    run_dir: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def adapter(self, stage: str | None = None) -> Path:
        """Adapter folder of a stage (the last one by default)."""
        name = stage or list(self.stages)[-1]
        return Path(self.stages[name]["adapter"])

    def metrics(self, stage: str | None = None) -> list[dict[str, Any]]:
        """The logged rows of metrics.jsonl (of one stage when given): step, loss, learning rate, eval loss..."""
        from finetune.run.records import read_metrics

        return [r for r in read_metrics(self.run_dir / "metrics.jsonl") if stage is None or r.get("stage") == stage]

    @classmethod
    def from_dir(cls, run_dir: str | Path) -> RunResult:
        """The run recorded in a run folder (its summary.json), e.g. one trained by other processes."""
        summary = read_json(Path(run_dir) / "summary.json", None)
        if summary is None:
            raise FinetuneError(f"{run_dir} holds no run (summary.json is missing)")
        return cls(run_dir=Path(run_dir), stages=summary.get("stages", {}))


def _stage_runner(kind: str):
    if kind == "sft":
        from finetune.stages.sft import run_sft

        return run_sft
    if kind == "dpo":
        from finetune.stages.dpo import run_dpo

        return run_dpo
    if kind == "kto":
        from finetune.stages.kto import run_kto

        return run_kto
    if kind in ("orpo", "simpo", "cpo"):  # reference-free pair methods, one module
        from finetune.stages.orpo import run_orpo

        return run_orpo
    if kind == "grpo":
        from finetune.stages.grpo import run_grpo

        return run_grpo
    raise FinetuneError(f"unknown stage kind {kind}")


def stage_settings(recipe: Recipe, stage: StageConfig) -> dict[str, Any]:
    """What a stage's result depends on, recorded in its summary so that a rerun can tell when it changed."""
    return {
        "model": recipe.model.model_dump(),
        "quantization": recipe.quantization.model_dump(),
        "lora": recipe.lora.model_dump(),
        "stage": stage.model_dump(exclude={"training", "data"}),
        "training": recipe.stage_training(stage).model_dump(),
        "data": recipe.stage_data(stage).model_dump(),
    }


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs (empty when `old` is empty: summaries of older versions)."""
    if not old:
        return []
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def run_pipeline(recipe: Recipe, recipe_path: str | Path | None = None, from_stage: str | None = None,
                 resume: bool = False, allow_changed_data: bool = False, resume_from: str | None = None) -> RunResult:
    """Run every unfinished stage of the recipe; finished stages in the same run folder are skipped.

    With `resume`, the unfinished stage continues from its last intact checkpoint (or `resume_from`, which implies
    `resume`); a resume on changed data or base model is refused unless `allow_changed_data` (finetune.run.resume).
    """
    resume = resume or resume_from is not None
    quiet_library_noise()
    stages = recipe.effective_stages()
    names = [s.name for s in stages]
    if from_stage is not None and from_stage not in names:
        raise FinetuneError(f"--from-stage {from_stage}: the recipe has no such stage (stages: {', '.join(names)})")
    main = is_main_process()  # with several processes only the main one writes the run folder
    run_dir, lock = open_run_dir(recipe, from_stage, resume) if main else (recipe.output_dir(), None)
    import torch

    from finetune.stages import host_memory

    if (line := host_memory.apply(recipe, torch.cuda.is_available())) and main:
        print(f"[run] {line}", flush=True)
    try:
        return _run_stages(recipe, stages, run_dir, recipe_path, from_stage, resume, allow_changed_data,
                           resume_from)
    finally:
        if lock is not None:
            lock.release()


def _run_stages(recipe: Recipe, stages: list[StageConfig], run_dir: Path, recipe_path, from_stage, resume: bool,
                allow_changed_data: bool, resume_from: str | None) -> RunResult:
    main = is_main_process()
    if main:
        manifest = check_inputs(recipe, run_dir, recipe_path, resume, allow_changed_data)
    wait_for_everyone()  # the others look into the folder only once the main process has (re)made it
    if main:
        write_recipe(recipe, run_dir)  # redacted as manifest.json is
        write_manifest(recipe, run_dir, recipe_path, manifest)
    tracker = open_tracker(recipe, run_dir) if main else Tracker()
    run = RunResult(run_dir=run_dir)
    summary: dict[str, Any] = {"name": recipe.name, "status": "running", "source": str(recipe_path or ""),
                               "stages": {}}
    if main:
        write_json_atomic(run_dir / "summary.json", summary)
    if recipe.hub.repo_id and main:  # say now, not after hours of training, that the upload asked for will fail
        from finetune.stages.preflight import hub_warning

        if (warning := hub_warning(recipe)) is not None:
            print(f"[hub] warning: {warning}", flush=True)

    current = "preflight"  # where a failure is recorded: every failure of a run leaves its reason for `ft runs`
    try:
        tokenizer, to_run = _preflight(recipe, run_dir, stages, from_stage)
        previous: Path | None = None
        for stage in stages:
            if stage not in to_run:
                previous = _reuse_finished(recipe, stage, run_dir, run, summary)
                continue
            current = stage.name
            previous = _run_stage(recipe, stage, run_dir, previous, resume, resume_from, tracker, tokenizer, run,
                                  summary)
            free_stage_memory()  # (model/loading.py) before the next stage loads its model: one on the GPU at a time
    except BaseException as error:  # Ctrl-C, NaN guard, bad data, crash: say so in summary.json, close the tracker
        message = stop_message(error, run_dir, current) if main else None  # a full disk: one line, no leftovers
        if main:
            record_stop(run_dir, summary, current, FinetuneError(message) if message else error)
            tracker.finish(exit_code=1)
        if message:
            raise FinetuneError(message) from None
        raise
    if not main:
        return run
    summary["status"] = "finished"
    write_json_atomic(run_dir / "summary.json", summary)
    tracker.finish()
    _print_summary(run)
    return run


def _preflight(recipe: Recipe, run_dir: Path, stages: list[StageConfig], from_stage: str | None):
    """The tokenizer (saved into the run folder) and the stages to train, after every one of them had its data
    tokenized and checked: bad data in a later stage is refused now, not after the earlier stages trained."""
    import copy

    from finetune.data.templates import apply_template
    from finetune.data.textonly import invented_template, trains_on_text_only
    from finetune.model.loading import load_tokenizer
    from finetune.stages.preflight import check_stage_data

    to_run: list[StageConfig] = []
    rerun = False
    for stage in stages:
        rerun = rerun or stage.name == from_stage
        if rerun or not (run_dir / stage.name / "summary.json").exists():
            to_run.append(stage)
    tokenizer = load_tokenizer(recipe.model)
    if problems := check_stage_data(recipe, copy.deepcopy(tokenizer), to_run):
        raise FinetuneError("the data was checked before training and nothing was trained:\n"
                            + "\n".join(f"  - {p}" for p in problems))
    first = recipe.stage_data(stages[0])
    if not (invented_template(tokenizer, first) and trains_on_text_only(first)):
        apply_template(tokenizer, first)  # the saved tokenizer carries the template trained with (text runs: none)
    if is_main_process():
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    return tokenizer, to_run


def _reuse_finished(recipe: Recipe, stage: StageConfig, run_dir: Path, run: RunResult,
                    summary: dict[str, Any]) -> Path:
    """A stage that finished in this run folder before: its adapter, reused as it is."""
    done = read_json(run_dir / stage.name / "summary.json")
    print(f"[{stage.name}] already finished in {run_dir}; skipping (use --from-stage {stage.name} to rerun)")
    changed = _changed_keys(done.get("config", {}), stage_settings(recipe, stage))
    if changed:
        print(f"[{stage.name}] note: it finished with different settings ({'; '.join(changed[:5])}); its "
              f"adapter is reused as it is. Use --from-stage {stage.name} to retrain it.", flush=True)
    # The adapter where it is now, not the path recorded in the summary: the run folder may have been moved.
    adapter = run_dir / stage.name / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise FinetuneError(f"stage '{stage.name}' is marked finished in {run_dir} but {adapter} holds no "
                            f"adapter; rerun it with --from-stage {stage.name}")
    done["adapter"] = str(adapter)
    run.stages[stage.name] = done
    summary["stages"][stage.name] = done
    return adapter


def _run_stage(recipe: Recipe, stage: StageConfig, run_dir: Path, previous: Path | None, resume: bool,
               resume_from: str | None, tracker: Tracker, tokenizer: Any, run: RunResult,
               summary: dict[str, Any]) -> Path:
    """Train one stage, record its summary, and return its adapter folder."""
    from transformers import set_seed

    main = is_main_process()
    init = {"previous": previous, "new": None}.get(stage.init_from, Path(stage.init_from))
    ctx = StageContext(recipe=recipe, stage=stage, run_dir=run_dir, init_adapter=init,
                       resume_from=resume_point(run_dir / stage.name, resume, resume_from), tracker=tracker)
    ctx.dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Seed before the stage builds anything: the fresh adapter's random init is made before the trainer seeds.
    set_seed(ctx.training.seed)
    attention_calls(reset=True)
    tiled_calls(reset=True)
    result: StageResult = _stage_runner(stage.kind)(ctx, tokenizer=tokenizer)
    result.metrics["stage_seconds"] = round(time.perf_counter() - started, 1)
    # which attention path really ran (a banner that says varlen while rows fell back to masked sdpa shows here)
    result.attention_calls = attention_calls(reset=True)
    result.tiled_mlp_calls = tiled_calls(reset=True)
    if main and result.attention_calls:
        print(f"[{stage.name}] attention calls: " + ", ".join(f"{k} {v}" for k, v in result.attention_calls.items()),
              flush=True)
    if main and result.tiled_mlp_calls:
        print(f"[{stage.name}] tiled MLP: {result.tiled_mlp_calls['tiled']} forwards in "
              f"{result.tiled_mlp_calls['tiles']} tiles", flush=True)
    done = {**asdict(result), "config": stage_settings(recipe, stage)}
    run.stages[stage.name] = done
    summary["stages"][stage.name] = done
    if main:
        write_json_atomic(run_dir / stage.name / "summary.json", done)
        write_json_atomic(run_dir / "summary.json", summary)
    wait_for_everyone()  # the next stage may load this stage's adapter, saved by the main process
    return Path(result.adapter)


def _print_summary(run: RunResult) -> None:
    print(f"\nrun folder: {run.run_dir}")
    for name, done in run.stages.items():
        m = done.get("metrics", {})
        line = f"  {name}: adapter {done['adapter']}"
        if "train_loss" in m:
            line += f", train loss {m['train_loss']:.4f}"
        before, after = m.get("task_before"), m.get("task_after")
        if before and after:
            line += f", held-out exact match {before['exact_match']:.1%} -> {after['exact_match']:.1%}"
        pairs = m.get("eval_after")
        if pairs and "rewards/accuracies" in pairs:
            line += f", held-out reward accuracy {pairs['rewards/accuracies']:.1%} (reference: {m.get('reference')})"
        if before and after and "preference_accuracy" in after:
            line += (f", held-out preference accuracy {before['preference_accuracy']:.1%} -> "
                     f"{after['preference_accuracy']:.1%}")
        if before and after and "mean_reward" in after:
            line += f", held-out mean reward {before['mean_reward']:.3f} -> {after['mean_reward']:.3f}"
        print(line)
