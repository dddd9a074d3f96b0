"""Trainer callbacks that keep and stop a run well: checkpoints by default, on Ctrl-C / SIGTERM, on a NaN loss.

- `SaveSchedule`: a checkpoint every `training.save_minutes` of training, at the end of each epoch and at the last
  step (so finished training is on disk before any evaluation), besides `training.save_steps`.

- `StopOnSignal`: the first SIGINT or SIGTERM lets the current optimizer step finish, then asks the trainer to save
  a checkpoint and stop. A second one stops at once (KeyboardInterrupt for Ctrl-C, the default action for SIGTERM).
- `NoStepPastTheEnd`: a stage resumed from its last step's checkpoint (stopped in the final evaluation) trains no
  further step; the trainer checks the end only after a step, so inside an epoch it would train one more.
- `NanGuard`: checks the gradients of the trainable weights before every optimizer step and the logged loss. A
  non-finite value stops the run *before* the optimizer applies it, so the adapter and the last checkpoint stay clean.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import TrainOutput

from finetune.distributed.process import any_process
from finetune.errors import FinetuneError


class TrainingDiverged(FinetuneError):
    """The loss or the gradients became NaN or infinite."""


class SaveSchedule(TrainerCallback):
    """Asks the trainer for a checkpoint by the clock, at each epoch end and at the last step; says when the next
    one comes as training starts."""

    def __init__(self, stage: str, training):
        self.stage = stage
        self.training = training
        self.seconds = training.save_minutes * 60
        self.last = time.monotonic()
        self.saved_step = -1

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        from finetune.run.checkpoints import next_checkpoint_step, schedule_text

        self.last = time.monotonic()
        per_epoch = None
        try:  # a stream (data.streaming) has no length: no epochs, only max_steps
            per_epoch = max(1, len(train_dataloader) // max(1, args.gradient_accumulation_steps))
        except TypeError:
            pass
        if not state.is_world_process_zero:
            return
        step = next_checkpoint_step(self.training, state.global_step, per_epoch, state.max_steps)
        by = ""
        if self.seconds:
            at = (datetime.now().astimezone() + timedelta(seconds=self.seconds)).strftime("%H:%M")
            by = f" or at {at}, whichever comes first"
        print(f"[{self.stage}] checkpoints {schedule_text(self.training, per_epoch, state.max_steps)}; the next at "
              f"step {step}{by}", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        due = bool(self.seconds) and time.monotonic() - self.last >= self.seconds
        if any_process(due) or state.global_step >= state.max_steps:  # every process must agree to save
            control.should_save = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.global_step != self.saved_step:
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()
        self.saved_step = state.global_step


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


class TrainingComplete(Exception):
    """Raised by `NoStepPastTheEnd` instead of a step past `max_steps`; `guarded_train` closes the books."""


class NoStepPastTheEnd(TrainerCallback):
    """Refuses a step past the stage's last one (see the module docstring)."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise TrainingComplete


def finished_at_resume(trainer, loss: float | None) -> TrainOutput:
    """What `trainer.train()` ends with when no step was left: its end-of-training log row and callbacks (the
    checkpoint it resumed from holds the trained weights, optimizer and state). `loss`: the stage's mean loss, when
    the checkpoint recorded it."""
    metrics = {"train_runtime": 0.0, "total_flos": trainer.state.total_flos}
    if loss is not None:
        metrics["train_loss"] = loss
    trainer.log(metrics)
    trainer.control = trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
    trainer.is_in_train = False
    return TrainOutput(trainer.state.global_step, loss or 0.0, metrics)


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
        from finetune.run.checkpoints import schedule_text

        where = f"No checkpoint had been written before it (checkpoints come {schedule_text(training)})."
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
