"""`data.streaming: true` end to end through `ft train` on the tiny model: a Ctrl-C'd streaming run resumes at the
recorded row (its loss curve equals the uninterrupted run's), and continued pretraining on plain text with packing
trains in both modes (streamed and preprocessed) with falling loss."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from resume_helpers import TermAtStep, losses, train_here

from finetune.run.checkpoints import list_checkpoints

STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_recipe(folder: Path, model: Path, data: Path, data_keys: str, source_keys: str = "", **training) -> Path:
    settings = {"max_steps": STEPS, "micro_batch_size": 4, "learning_rate": 1.0e-2, "logging_steps": 1, "seed": 3,
                **training}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(
        "name: run\n"
        f"model: {{name_or_path: {model}, dtype: float32}}\n"
        "lora: {r: 4, alpha: 8}\n"
        f"data: {{train: [{{path: {data}{source_keys}}}], max_length: 64, cache_dir: null, {data_keys}}}\n"
        f"training: {json.dumps(settings)}\n"
        f"output: {{dir: {folder / 'runs' / 'run'}}}\n"
    )
    return path


STREAM = "streaming: true, shuffle_buffer: 12"


def test_streaming_run_resumes_at_the_recorded_row(tiny_model, addition_data, tmp_path, monkeypatch):
    import finetune.stages.common as common

    reference_run = tmp_path / "reference" / "runs" / "run"
    result = train_here(str(write_recipe(tmp_path / "reference", tiny_model, addition_data["train"], STREAM)))
    assert result.exit_code == 0, result.output
    reference = losses(reference_run)
    assert sorted(reference) == list(range(1, STEPS + 1))

    quiet = common.quiet_trainer  # Ctrl-C at the end of step 5: 5 x 4 = 20 samples consumed
    monkeypatch.setattr(common, "quiet_trainer", lambda t: (quiet(t), t.add_callback(TermAtStep(5, signal.SIGINT))))
    recipe = write_recipe(tmp_path / "cut", tiny_model, addition_data["train"], STREAM)
    run_dir = tmp_path / "cut" / "runs" / "run"
    result = train_here(str(recipe))
    assert result.exit_code == 130, result.output
    saved = list_checkpoints(run_dir / "sft" / "checkpoints")
    assert [p.name for p in saved] == ["checkpoint-5"]
    # blocks of 12 rows, one sample per row (no packing): samples 12-23 come from rows 12-23, so after 20 samples
    # the stream is in the block starting at row 12, 8 samples into it
    assert json.loads((saved[0] / "stream-rank0.json").read_text()) == {
        "position": {"epoch": 0, "rows": 12, "skip": 8}, "consumed": 20, "processes": 1}

    monkeypatch.setattr(common, "quiet_trainer", quiet)
    result = train_here(str(recipe), "--resume")
    assert result.exit_code == 0, result.output
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    worst = max(abs(resumed[s] - reference[s]) for s in reference)
    assert worst <= 1e-6, {s: (resumed[s], reference[s]) for s in reference}


def test_streaming_run_stopped_in_the_final_evaluation_trains_no_extra_step(tiny_model, addition_data, tmp_path,
                                                                           monkeypatch):
    """Ctrl-C during the evaluation after the last step, then --resume: only the evaluation runs (issue 33, item 2:
    a streamed run showed `step 13/12`)."""
    import transformers

    recipe = write_recipe(tmp_path, tiny_model, addition_data["train"], f"{STREAM}, eval: [{{path: "
                                                                        f"{addition_data['eval']}}}]")
    run_dir = tmp_path / "runs" / "run"
    evaluate = transformers.Trainer.evaluate

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.Trainer, "evaluate", interrupted)
    result = train_here(str(recipe))
    assert result.exit_code != 0
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, STEPS + 1))
    monkeypatch.setattr(transformers.Trainer, "evaluate", evaluate)
    result = train_here(str(recipe), "--resume")
    assert result.exit_code == 0, result.output
    assert f"step {STEPS + 1}/{STEPS}" not in result.output and losses(run_dir) == curve
    assert [p.name for p in list_checkpoints(run_dir / "sft" / "checkpoints")] == [f"checkpoint-{STEPS}"]
    assert "eval_loss" in json.loads((run_dir / "sft" / "summary.json").read_text())["metrics"]


@pytest.mark.parametrize("mode", ["streaming: true", "streaming: false"])
def test_continued_pretraining_on_plain_text_with_packing(tiny_model, tmp_path, mode):
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"{i % 10} plus {i % 7} is {i % 10 + i % 7}."}) + "\n")
    recipe = write_recipe(tmp_path, tiny_model, corpus, f"packing: true, {mode}", ", format: text", max_steps=12,
                          learning_rate=3.0e-2)
    result = train_here(str(recipe))
    assert result.exit_code == 0, result.output
    curve = losses(tmp_path / "runs" / "run")
    assert sorted(curve) == list(range(1, 13))
    early, late = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (10, 11, 12)) / 3
    assert late < 0.95 * early, curve  # 4.42 -> 4.09 streamed, 4.42 -> 4.14 preprocessed
