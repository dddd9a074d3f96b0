"""Evaluation that catches regressions, end to end on a tiny model: an intentionally overfitted recipe stops early,
keeps its best adapter and is marked for forgetting; `ft eval` scores the run (and another model side by side)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli import app

MAX_STEPS = 60


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def overfit_run(tiny_model, tmp_path_factory) -> Path:
    """Train on 'add a b' -> a+b and evaluate on the same prompts with other answers: the better the model learns
    the training answers, the worse the eval loss gets after the first steps (overfitting by construction)."""
    out = tmp_path_factory.mktemp("overfit")
    train, held = [], []
    for i in range(16):
        a, b = i % 4, (i * 3) % 5
        prompt = [{"role": "user", "content": f"add {a} {b}"}]
        train.append({"messages": prompt + [{"role": "assistant", "content": str(a + b)}], "answer": str(a + b)})
        wrong = str((a + b + 3) % 10)
        held.append({"messages": prompt + [{"role": "assistant", "content": wrong}], "answer": wrong})
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "eval.jsonl", held)
    _write_jsonl(out / "pairs.jsonl", [{"prompt": r["messages"][:1], "chosen": r["messages"][1:],
                                        "rejected": [{"role": "assistant", "content": "no idea"}]} for r in train[:8]])
    (out / "general.txt").write_text("\n".join(f"The cat number {i} sat on the mat and looked at the moon."
                                               for i in range(12)) + "\n", encoding="utf-8")
    recipe = out / "recipe.yaml"
    recipe.write_text(f"""
name: overfit
model: {{name_or_path: {tiny_model}, dtype: float32}}
quantization: {{mode: nf4, compute_dtype: float32}}
lora: {{r: 8, alpha: 16}}
data:
  train: [{{path: {out / 'train.jsonl'}}}]
  eval: [{{path: {out / 'eval.jsonl'}}}]
  task_eval: {out / 'train.jsonl'}
  task_eval_max_new_tokens: 4
  max_length: 64
training:
  max_steps: {MAX_STEPS}
  micro_batch_size: 8
  learning_rate: 3.0e-2
  lr_scheduler: constant
  logging_steps: 2
  eval_steps: 2
  early_stopping: {{metric: eval_loss, patience: 2}}
  keep_best: eval_loss
  seed: 1
eval:
  general_text: {out / 'general.txt'}
  max_forgetting: 0.001
  sample_prompts: 2
  sample_task_rows: 4
  preference: [{out / 'pairs.jsonl'}]
  tasks: [{{path: {out / 'train.jsonl'}, metrics: [token_f1, regex], pattern: '^{{answer}}$'}}]
output: {{dir: {out / 'run'}}}
""")
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    return out / "run"


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_overfitted_run_stops_early_and_keeps_the_best_adapter(overfit_run):
    metrics = json.loads((overfit_run / "sft" / "summary.json").read_text())["metrics"]
    evals: dict[int, float] = {}
    for r in _rows(overfit_run):  # the first eval of each step (the stage evaluates its kept adapter once more)
        if "eval_loss" in r:
            evals.setdefault(r["step"], r["eval_loss"])
    assert metrics["early_stopped_at"] < MAX_STEPS and metrics["steps"] == metrics["early_stopped_at"]
    during = {s: v for s, v in evals.items() if s <= metrics["early_stopped_at"]}
    best_step = min(during, key=during.get)
    assert metrics["best"]["step"] == best_step < metrics["early_stopped_at"]
    assert metrics["best"]["value"] == pytest.approx(during[best_step])
    # the stage's adapter is the best one, not the last one, and its eval loss is the best eval loss
    kept = load_file(overfit_run / "sft" / "adapter" / "adapter_model.safetensors")
    best = load_file(overfit_run / "sft" / "best" / "adapter_model.safetensors")
    assert kept.keys() == best.keys() and all((kept[k] == best[k]).all() for k in kept)
    assert metrics["eval_loss"] == pytest.approx(during[best_step], rel=1e-4)


def test_task_metric_and_fixed_prompt_answers_at_every_evaluation(overfit_run):
    eval_steps = sorted({r["step"] for r in _rows(overfit_run) if "eval_loss" in r})
    task_steps = sorted({r["step"] for r in _rows(overfit_run) if "task_exact_match" in r})
    assert task_steps == eval_steps
    samples = [json.loads(line) for line in (overfit_run / "sft" / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == eval_steps
    assert {s["prompt"] for s in samples} == {"add 0 0", "add 1 3"}  # the same two prompts every time


def test_forgetting_is_marked_in_runs_and_report(overfit_run):
    forgetting = json.loads((overfit_run / "sft" / "summary.json").read_text())["metrics"]["forgetting"]
    assert forgetting["over_limit"] and forgetting["loss_change"] > 0.001 and forgetting["mean_kl"] > 0
    listed = CliRunner().invoke(app, ["runs", str(overfit_run)])
    assert listed.exit_code == 0 and "FORGETTING" in listed.output and "forgetting: general-text loss" in listed.output
    assert CliRunner().invoke(app, ["report", str(overfit_run)]).exit_code == 0
    page = (overfit_run / "report" / "index.html").read_text()
    assert "FORGETTING" in page and "Answers during training" in page
    assert (overfit_run / "report" / "sft-task.png").exists()


def test_ft_eval_scores_the_run_and_writes_json_and_report(overfit_run):
    result = CliRunner().invoke(app, ["eval", str(overfit_run), "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads((overfit_run / "eval" / "sft.json").read_text())["target"]
    trained = json.loads((overfit_run / "sft" / "summary.json").read_text())["metrics"]
    # held-out loss of the kept adapter: the trainer's eval loss over the same rows and tokens
    assert figures["heldout"]["loss"] == pytest.approx(trained["eval_loss"], rel=1e-3)
    # forgetting, measured again from the saved run, matches what the stage measured at its end
    assert figures["forgetting"]["loss_change"] == pytest.approx(trained["forgetting"]["loss_change"], rel=1e-3)
    assert figures["forgetting"]["over_limit"] is True
    tasks = figures["tasks"]
    assert set(tasks[str(overfit_run.parent / "train.jsonl")]) >= {"exact_match", "contains_answer", "token_f1",
                                                                    "regex"}
    pref = figures["preference"][str(overfit_run.parent / "pairs.jsonl")]
    assert pref["pairs"] == 8 and 0 <= pref["accuracy"] <= 1 and "reward_margin" in pref
    assert "ft eval: stage sft" in (overfit_run / "report" / "index.html").read_text()


def test_ft_eval_against_a_model_with_another_tokenizer_refuses_only_the_kl(overfit_run, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    result = CliRunner().invoke(app, ["eval", str(overfit_run), "--against", str(other)])
    assert result.exit_code == 0, result.output
    assert "KL comparison refused: the tokenizers differ" in result.output
    assert "target - against" in result.output and "heldout loss" in result.output


def test_ft_eval_refuses_a_task_file_without_answers_before_loading(overfit_run, tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "add 1 1"}]}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((overfit_run / "recipe.yaml").read_text().replace(
        str(overfit_run.parent / "train.jsonl"), str(bad)))
    result = CliRunner().invoke(app, ["eval", str(overfit_run), "--recipe", str(recipe)])
    assert result.exit_code == 1
    assert f"{bad}: rows that cannot be scored" in result.output and "no `answer`: row(s) 1" in result.output
    assert "loaded in" not in result.output  # refused before any model loaded


def test_a_run_and_its_merged_export_get_the_same_forgetting_and_say_which_base(overfit_run, tmp_path):
    """Issue 33, item 4: the same weights gave different forgetting figures (the run against its 4-bit base, its
    merged export against the full-precision base). Like with like by default, and each figure names its base."""
    from finetune.export.evaluate import evaluate_target

    out = tmp_path / "merged"
    exported = CliRunner().invoke(app, ["export", str(overfit_run), "--format", "merged", "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    recipe, quiet = overfit_run / "recipe.yaml", (lambda message: None)
    run = evaluate_target(overfit_run, say=quiet).target["forgetting"]
    merged = evaluate_target(out, recipe=recipe, say=quiet).target["forgetting"]
    assert run["base"] == "the nf4 4-bit base the adapter was trained on, adapter disabled"
    assert merged["base"].startswith("the nf4 4-bit base ") and "loaded as training loaded it" in merged["base"]
    assert merged["mean_kl"] == pytest.approx(run["mean_kl"], rel=1e-3, abs=1e-5)
    assert merged["loss_change"] == pytest.approx(run["loss_change"], abs=1e-4)
    # against the full-precision base, asked for: both again alike, and not the 4-bit base's figures
    run_full = evaluate_target(overfit_run, say=quiet, forgetting_base="full").target["forgetting"]
    merged_full = evaluate_target(out, recipe=recipe, say=quiet, forgetting_base="full").target["forgetting"]
    assert run_full["base"].startswith("the full-precision base ") and merged_full["base"] == run_full["base"]
    assert merged_full["mean_kl"] == pytest.approx(run_full["mean_kl"], rel=1e-3, abs=1e-5)
    assert abs(run_full["base_loss"] - run["base_loss"]) > 1e-4  # the two bases differ: the choice matters
    table = CliRunner().invoke(app, ["eval", str(out), "--recipe", str(recipe)])
    assert table.exit_code == 0 and "target: forgetting measured against the nf4 4-bit base" in table.output


def test_ft_eval_against_a_model_with_a_padded_vocabulary_compares_the_common_rows(overfit_run, tiny_model, tmp_path):
    """Issue 33, item 8: an --against model whose output layer is padded (same tokenizer) crashed with a tensor size
    RuntimeError after both models were scored; the KL is now taken on the vocabulary both have."""
    from transformers import AutoModelForCausalLM

    padded = tmp_path / "padded"
    shutil.copytree(tiny_model, padded)
    model = AutoModelForCausalLM.from_pretrained(padded)
    rows = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(rows + 64, mean_resizing=False)
    model.save_pretrained(padded)
    result = CliRunner().invoke(app, ["eval", str(overfit_run), "--against", str(padded)])
    assert result.exit_code == 0, result.output
    assert f"(on the {rows} vocabulary rows both models have)" in result.output
