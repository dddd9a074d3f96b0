"""What a run tells the person watching it: live progress and `metrics.jsonl`.

One trainer callback writes every logged value (plus tokens/s and the stage name) as a JSON line and shows a
progress bar with step, loss, tokens/s and ETA: a widget in notebooks, a bar on a terminal, plain lines in logs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class RunLogger(TrainerCallback):
    """Writes `metrics.jsonl` rows and draws progress for one stage."""

    def __init__(self, metrics_path: Path, stage: str, token_counter=None):
        self.path = Path(metrics_path)
        self.stage = stage
        self.bar = None
        self.start = 0.0
        self.last_time = 0.0
        self.last_tokens = 0
        self.token_counter = token_counter  # optional callable(state) -> tokens seen so far
        self.plain = not sys.stderr.isatty() and not _in_notebook()

    def _write(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_time = time.perf_counter()
        self.last_tokens = 0
        if not self.plain and state.is_world_process_zero:  # one bar, not one per process
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, desc=self.stage, unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        now = time.perf_counter()
        row: dict[str, Any] = {"stage": self.stage, "step": state.global_step, "time": round(now - self.start, 3)}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and not math.isnan(float(v))})
        tokens = logs.get("num_tokens")
        if tokens is None and self.token_counter is not None:
            tokens = self.token_counter(state)
        if tokens is not None and now > self.last_time and "loss" in logs:
            row["tokens_per_second"] = round((float(tokens) - self.last_tokens) / (now - self.last_time), 1)
            self.last_tokens, self.last_time = float(tokens), now
        self._write(row)
        keys = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second")
        shown = {k: row[k] for k in keys if k in row}
        if self.bar is not None:
            self.bar.set_postfix({k.replace("tokens_per_second", "tok/s"): _fmt(v) for k, v in shown.items()})
        else:
            eta = ""
            if state.global_step and state.max_steps:
                left = (now - self.start) / state.global_step * (state.max_steps - state.global_step)
                eta = f" eta {left:.0f}s"
            items = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
            print(f"[{self.stage}] step {state.global_step}/{state.max_steps} {items}{eta}", flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"
    except Exception:
        return False


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file (an unfinished last line is skipped)."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
