"""What an export reads from a run folder (`open_run`: a finished stage, its recipe and adapter) and what it reports
back (`ExportResult`). Shared by the adapter and merged exports, the model card, `ft generate` and the Hub upload."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.recipe.loading import RecipeError
from finetune.recipe.schema import Recipe, StageConfig, load_recipe
from finetune.run.files import read_json


@dataclass
class RunStage:
    """A finished stage of a run folder: what `ft export` and `ft generate` start from."""

    run_dir: Path
    recipe: Recipe
    stage: StageConfig
    adapter: Path
    summary: dict[str, Any]  # the run's summary.json

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer the stage trained with: saved next to its adapter after the recipe's chat template was
        applied (which may add tokens and change eos); older runs only have `<run>/tokenizer`."""
        if (self.adapter / "tokenizer_config.json").exists():
            return self.adapter
        return self.run_dir / "tokenizer"


@dataclass
class ExportResult:
    """Where an export went and what its verification measured (`figures[mode]`, one or both merge modes)."""

    out: Path
    format: str
    stage: str
    merge_into: str | None = None
    dtype: str | None = None
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    adapter_effect: dict[str, Any] | None = None  # trained vs base without adapter: the scale of the figures
    verification_source: str | None = None
    notes: list[str] = field(default_factory=list)  # what the user should know about choices made for them
    gguf: dict[str, Any] | None = None  # GGUF exports: file, quantisation, llama.cpp checks and version

    def report_lines(self) -> list[str]:
        """What `ft export` prints: the merge and its verification figures, the notes, where the export went."""
        from finetune.export.verify import Figures

        lines = []
        if self.format in ("merged", "gguf"):
            lines.append(f"merged stage {self.stage} into the {self.merge_into} base weights, saved as {self.dtype}"
                         + (f" GGUF ({self.gguf['file']})" if self.gguf else ""))
        lines += [f"  note: {note}" for note in self.notes]
        for mode, figures in self.figures.items():
            mark = " (this export)" if mode in (self.merge_into, "llama.cpp") else " (not written)"
            lines.append(f"  {mode}{mark}: {Figures(**figures).line()}")
        if self.adapter_effect:
            lines.append(f"  for scale, adapter vs base: mean KL {self.adapter_effect['mean_kl']:.3g}")
        if self.gguf and self.gguf.get("tokenization"):
            tok, gen = self.gguf["tokenization"], self.gguf["generation"]
            lines.append(f"  {self.gguf['llama_cpp']}: identical token ids on {tok['identical']}/{tok['conversations']}"
                         f" texts; greedy answers ending at a stop token {sum(g['llama_cpp_stopped'] for g in gen)}"
                         f"/{len(gen)}")
        if self.format in ("merged", "gguf"):
            lines.append(f"  verified on {self.verification_source}" if self.figures
                         else "  not verified (--no-verify)")
        lines.append(f"{self.format} export of stage {self.stage}: {self.out}")
        return lines


def open_run(run_dir: str | Path, stage: str | None = None) -> RunStage:
    """The finished stage `stage` (default: the last finished one) of a run folder, with clear errors otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FinetuneError(f"{run_dir} does not exist or is not a folder; pass the run folder `ft train` wrote")
    if not (run_dir / "recipe.yaml").exists():
        raise FinetuneError(
            f"{run_dir} is not a run folder (no recipe.yaml); pass the folder `ft train` wrote "
            "(the recipe's output.dir)"
        )
    try:
        recipe = load_recipe(run_dir / "recipe.yaml", [])
    except RecipeError as e:
        raise FinetuneError(f"{run_dir}/recipe.yaml no longer validates:\n{e}") from None
    stages = recipe.effective_stages()
    names = [s.name for s in stages]
    finished = [s for s in stages if (run_dir / s.name / "summary.json").exists()]
    if stage is not None and stage not in names:
        raise FinetuneError(f"{run_dir} has no stage '{stage}' (stages of its recipe: {', '.join(names)})")
    if not finished:
        raise FinetuneError(
            f"{run_dir} has no finished stage yet (no <stage>/summary.json). Finish it with `ft train` on the same "
            "recipe: finished stages are kept and the rest run."
        )
    if stage is None:
        chosen = finished[-1]
    else:
        chosen = next(s for s in stages if s.name == stage)
        if chosen not in finished:
            raise FinetuneError(
                f"stage '{stage}' of {run_dir} has not finished (finished: {', '.join(s.name for s in finished)})"
            )
    adapter = run_dir / chosen.name / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise FinetuneError(f"{adapter} holds no adapter (adapter_config.json missing); rerun that stage")
    return RunStage(run_dir, recipe, chosen, adapter, read_json(run_dir / "summary.json", {}))
