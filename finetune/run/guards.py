"""Trainer callbacks that stop a run well: on Ctrl-C / SIGTERM, and on a NaN or infinite loss.

- `StopOnSignal`: the first SIGINT or SIGTERM lets the current optimizer step finish, then asks the trainer to save
  a checkpoint and stop. A second one stops at once (KeyboardInterrupt for Ctrl-C, the default action for SIGTERM).
- `NanGuard`: checks the gradients of the trainable weights before every optimizer step and the logged loss. A
  non-finite value stops the run *before* the optimizer applies it, so the adapter and the last checkpoint stay clean.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import TrainerCallback

from finetune.distributed.process import any_process
from finetune.errors import FinetuneError


class TrainingDiverged(FinetuneError):
    """The loss or the gradients became NaN or infinite."""


class StopOnSignal(TrainerCallback):
    """Turns SIGINT/SIGTERM into "finish this step, save a checkpoint, stop"; see `catch_signals`."""

    def __init__(self, stage: str):
        self.stage = stage
        self.signum: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        # Several processes: the signal may reach them in different steps; all stop at the first one that saw it.
        if any_process(self.signum is not None):
            self.signum = self.signum or signal.SIGTERM  # a process the signal did not reach stops the same way
            control.should_save = True
            control.should_training_stop = True
        return control


@contextmanager
def catch_signals(stopper: StopOnSignal) -> Iterator[None]:
    """Route SIGINT and SIGTERM to `stopper` while the block runs (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in caught}

    def handle(signum, frame):
        stopper.signum = signum
        signal.signal(signum, previous[signum])  # a second signal gets the usual behaviour: stop now
        name = signal.Signals(signum).name
        again = "press Ctrl-C again" if signum == signal.SIGINT else "send SIGTERM again"
        print(f"\n[{stopper.stage}] {name} received: finishing the current step and saving a checkpoint "
              f"({again} to stop at once without saving)", flush=True)

    for s in caught:
        signal.signal(s, handle)
    try:
        yield
    finally:
        for s in caught:
            signal.signal(s, previous[s])


class NonFinite(Exception):
    """Raised inside the training loop by NanGuard; turned into TrainingDiverged by `guarded_train`."""

    def __init__(self, step: int, what: str, applied: bool):
        super().__init__(what)
        self.step = step
        self.what = what
        self.applied = applied  # whether the optimizer already applied the bad step to the weights


class NanGuard(TrainerCallback):
    """Stops training on the first non-finite gradient (before the optimizer step) or logged loss.

    With fp16 mixed precision, inf gradients are the loss scaler's normal overflow signal (it skips that step and
    lowers the scale), so only the logged loss is checked there.
    """

    def __init__(self) -> None:
        self.params: list[torch.nn.Parameter] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params = [p for p in model.parameters() if p.requires_grad] if model is not None else []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if args.fp16 or not self.params:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        # one reduction and one host sync per step; the adapter's gradients are small
        total = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
        if not torch.isfinite(total):
            raise NonFinite(state.global_step + 1, "the gradients are NaN or infinite", applied=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise NonFinite(state.global_step, f"the logged {key} is {value}", applied=True)


def divergence_message(stage: str, error: NonFinite, checkpoint: str | None, resume_command: str, training) -> str:
    """What the user reads when NanGuard stops a run: where, the last good checkpoint, and the usual causes."""
    if checkpoint:
        where = f"Last good checkpoint: {checkpoint} (continue from it with `{resume_command}` once fixed)."
    else:
        where = "No checkpoint was written before it (set training.save_steps to keep some)."
    causes = [
        f"learning rate too high (training.learning_rate is {training.learning_rate:g}; try 2-10x lower, or warmup)",
        "fp16 overflow (use precision: bf16 on a GPU that has it)" if training.precision == "fp16" else None,
        "no gradient clipping (training.max_grad_norm is 0)" if training.max_grad_norm == 0 else None,
        "a batch in which every label is masked (answers cut off by data.max_length, or a template problem)",
        "a broken row in the data (empty or very long texts)",
    ]
    lines = "\n".join(f"  - {c}" for c in causes if c)
    weights = "The optimizer step was not applied." if not error.applied else "The adapter in memory may hold it."
    return f"[{stage}] training stopped at step {error.step}: {error.what}. {weights} {where}\nLikely causes:\n{lines}"
