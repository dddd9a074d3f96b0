"""What a run tells the person watching it: live progress, `metrics.jsonl`, and optionally W&B and TensorBoard.

`RunLogger`, a trainer callback, writes every logged number (plus tokens/s and the stage name) as a JSON line and
shows a progress bar with step, loss, tokens/s and ETA: a widget in notebooks, a bar on a terminal, plain lines in logs.
The same rows go to the run's `Tracker` (one Weights & Biases run per run folder, every stage's metrics under
`<stage>/`) and to TensorBoard event files under `<run>/tensorboard/<stage>/`.

Only numbers are logged. The recipe sent to W&B as its config, and the run's name, tags and entity, go through
`redact` first (finetune.run.records), so a value that looks like a credential never leaves.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune.distributed.process import is_main_process
from finetune.errors import FinetuneError
from finetune.run.files import read_json, write_json_atomic
from finetune.run.records import read_metrics, redact, redact_text, trim_metrics  # noqa: F401  (re-exported)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Tracker:
    """Run-level sinks besides metrics.jsonl: one Weights & Biases run for the whole run folder (all stages).

    The W&B run id is kept in `<run>/tracking.json`, so a resumed run continues the same W&B run.
    """

    def __init__(self, run: Any = None):
        self.run = run
        self._stages: set[str] = set()

    def log(self, stage: str, row: dict[str, Any]) -> None:
        """Send one metrics row (numbers only) of a stage."""
        if self.run is None:
            return
        if stage not in self._stages:
            # each stage counts its own steps from 0; give its metrics their own x axis
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._stages.add(stage)
        data = {f"{stage}/{k}": v for k, v in row.items() if k not in ("stage", "time") and _is_number(v)}
        self.run.log(data)

    def log_table(self, stage: str, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Send a table (e.g. generated answers at one step) as `<stage>/<name>`; text, not credentials."""
        if self.run is None:
            return
        import wandb

        self.run.log({f"{stage}/{name}": wandb.Table(columns=columns, data=redact(rows))})

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run (it is synced or, offline, left in `<run>/wandb/` for `wandb sync`)."""
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def open_tracker(recipe, run_dir: Path) -> Tracker:
    """Start the recipe's W&B run, if it asks for one. TensorBoard needs nothing at run level (see RunLogger)."""
    cfg = recipe.tracking.wandb
    if recipe.tracking.tensorboard:
        tensorboard_writer_class()  # fail now, not after the model has loaded
    if cfg is None or cfg.mode == "disabled" or not is_main_process():
        return Tracker()
    try:
        import wandb
    except ImportError:
        raise FinetuneError("tracking.wandb is set but wandb is not installed: pip install wandb") from None
    state_path = Path(run_dir) / "tracking.json"
    state = read_json(state_path, {})
    argv, sys.argv = sys.argv, [sys.argv[0], *redact(sys.argv[1:])]  # W&B records the command line as run metadata
    try:
        run = _wandb_init(wandb, recipe, cfg, run_dir, state)
    finally:
        sys.argv = argv
    write_json_atomic(state_path, {**state, "wandb_id": run.id})
    return Tracker(run)


def _wandb_init(wandb, recipe, cfg, run_dir: Path, state: dict[str, Any]):
    return wandb.init(
        project=redact_text(cfg.project),
        entity=redact_text(cfg.entity) if cfg.entity else None,
        name=redact_text(cfg.name or recipe.name),
        tags=[redact_text(t) for t in cfg.tags],
        mode=cfg.mode,
        dir=str(run_dir),
        id=state.get("wandb_id"),
        resume="allow",
        config=redact(recipe.model_dump(mode="json")),
    )


def tensorboard_writer_class():
    """torch's SummaryWriter, or a clear error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise FinetuneError(
            "tracking.tensorboard is true but tensorboard is not installed: pip install tensorboard"
        ) from None
    return SummaryWriter


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


class RunLogger(TrainerCallback):
    """Writes `metrics.jsonl` rows, forwards them to the trackers and draws progress for one stage.

    Args:
        metrics_path: the run's metrics.jsonl (appended to).
        stage: stage name written in every row.
        token_counter: optional callable(state) -> tokens seen so far, when the trainer does not log `num_tokens`.
    """

    def __init__(self, metrics_path: Path, stage: str, token_counter=None):
        self.path = Path(metrics_path)
        self.stage = stage
        self.bar = None
        self.start = 0.0
        self.last_time = 0.0
        self.last_tokens: float | None = 0.0
        self.token_counter = token_counter
        self.plain = not sys.stderr.isatty() and not _in_notebook()
        self.tracker: Tracker | None = None  # set by finetune.run.resume.guarded_train
        self.tensorboard_dir: Path | None = None  # idem, when tracking.tensorboard is on
        self.writer = None
        # After a resume the trainer's `num_tokens` counts from 0 again: add the count at the checkpoint when the
        # metrics have it, else leave `num_tokens` out rather than log a wrong total.
        self.resumed = False
        self.token_base: float | None = None

    def _write(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_time = time.perf_counter()
        self.last_tokens = 0.0
        if self.tensorboard_dir is not None and state.is_world_process_zero:
            # purge_step drops events a crashed attempt wrote after the checkpoint we resume from
            self.writer = tensorboard_writer_class()(
                log_dir=str(self.tensorboard_dir), purge_step=state.global_step or None, flush_secs=10
            )
        if not self.plain and state.is_world_process_zero:  # one bar, not one per process
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.stage, unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        now = time.perf_counter()
        row: dict[str, Any] = {"stage": self.stage, "step": state.global_step, "time": round(now - self.start, 3)}
        # NaN/inf are not valid JSON; the NaN guard (finetune.run.guards) reports them instead
        row.update({k: v for k, v in logs.items() if _is_number(v)})
        tokens = logs.get("num_tokens")
        if tokens is None and self.token_counter is not None:
            tokens = self.token_counter(state)
        if tokens is not None and "loss" in logs:
            if now > self.last_time:
                row["tokens_per_second"] = round((float(tokens) - self.last_tokens) / (now - self.last_time), 1)
            self.last_tokens, self.last_time = float(tokens), now
        if self.resumed and "num_tokens" in row:
            if self.token_base is None:
                del row["num_tokens"]
            else:
                row["num_tokens"] = row["num_tokens"] + self.token_base
        self._write(row)
        if self.tracker is not None:
            self.tracker.log(self.stage, row)
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("stage", "step", "time"):
                    self.writer.add_scalar(key, value, state.global_step)
        self._show(row, state, now)

    def _show(self, row: dict[str, Any], state, now: float) -> None:
        keys = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second")
        shown = {k: row[k] for k in keys if k in row}
        if self.bar is not None:
            self.bar.set_postfix({k.replace("tokens_per_second", "tok/s"): _fmt(v) for k, v in shown.items()})
            return
        eta = ""
        if state.global_step and state.max_steps:
            left = (now - self.start) / state.global_step * (state.max_steps - state.global_step)
            eta = f" eta {left:.0f}s"
        items = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
        print(f"[{self.stage}] step {state.global_step}/{state.max_steps} {items}{eta}", flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Close the progress bar and the TensorBoard writer (also called when training stops on an error)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"
    except Exception:
        return False
