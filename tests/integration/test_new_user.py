"""A new user's first hour on a model and data this project was not built around (issue 19): a tiny Qwen2 with its
own ChatML BPE tokenizer (`tests/tinyqwen.py`), sharegpt, alpaca, parquet and preference files; SFT then DPO, export,
generate. Bad data in a later stage is refused before the first step of the first stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tinyqwen import build_qwen2_model, write_format_data, write_jsonl
from typer.testing import CliRunner

from finetune.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return build_qwen2_model(tmp_path_factory.mktemp("qwen") / "model")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_format_data(tmp_path_factory.mktemp("formats"))


def recipe(folder: Path, model: Path, sft_sources: list[Path], pairs: Path, extra: str = "") -> Path:
    sources = ", ".join(f"{{path: {p}}}" for p in sft_sources)
    path = folder / "recipe.yaml"
    path.write_text(f"""name: newuser
model: {{name_or_path: {model}, dtype: float32}}
quantization: {{mode: none}}
lora: {{r: 4, alpha: 8}}
data: {{train: [{sources}], eval: [{{path: {sft_sources[0]}, max_samples: 8}}], max_length: 48}}
training: {{max_steps: 4, eval_steps: 2, micro_batch_size: 8, learning_rate: 1.0e-2, logging_steps: 1}}
stages:
  - {{name: sft, kind: sft}}
  - name: dpo
    kind: dpo
    data: {{train: [{{path: {pairs}}}], max_length: 48}}
    training: {{max_steps: 2, eval_steps: null}}
output: {{dir: {folder / 'run'}}}
{extra}""")
    return path


@pytest.fixture(scope="module")
def trained(qwen, files, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("run")
    path = recipe(folder, qwen, [files["sharegpt"], files["alpaca"], files["parquet"]], files["preference"])
    out = runner.invoke(app, ["train", str(path)])
    assert out.exit_code == 0, out.output
    return {"dir": folder / "run", "output": out.output}


def test_every_format_trains_on_a_qwen2_model(trained):
    run_dir = trained["dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and list(summary["stages"]) == ["sft", "dpo"]
    assert "[preflight] stage dpo, train data: 32 pairs, checks passed" in trained["output"]
    assert "[preflight] stage sft, train data: 96 samples, checks passed" in trained["output"]


def test_the_final_evaluation_runs_once_when_eval_steps_divides_max_steps(trained):
    rows = [json.loads(line) for line in (trained["dir"] / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if r.get("stage") == "sft" and "eval_loss" in r]
    assert evals == [2, 4]


def test_adapter_export_is_loaded_by_generate_from_where_export_puts_it(trained):
    out = runner.invoke(app, ["export", str(trained["dir"])])
    assert out.exit_code == 0, out.output
    export = trained["dir"] / "export" / "dpo-adapter"
    assert "a local folder: the adapter finds it from here only" in out.output  # the note, printed (19.4)
    card = (export / "README.md").read_text()
    assert "Note: adapter_config.json names the base" in card and "set model.hub_id" in card  # and in the card
    out = runner.invoke(app, ["generate", str(export), "--prompt", "What is 3 in words?", "--max-new-tokens", "3"])
    assert out.exit_code == 0, out.output
    assert f"adapter {export}" in out.output or "adapter" in out.output.splitlines()[0]


def test_bad_data_in_a_later_stage_is_refused_before_the_first_stage_trains(qwen, files, tmp_path):
    """Rows with no assistant turn pass the checks without a tokenizer; the tokenizer-only preflight refuses them
    (naming the line) before the SFT stage trains, and the run records why it failed for `ft runs`."""
    later = write_jsonl(tmp_path / "later.jsonl", [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "one"}]},
        {"conversations": [{"from": "human", "value": "no answer here"}]},
    ])
    path = recipe(tmp_path, qwen, [files["sharegpt"]], files["preference"])
    text = path.read_text().replace("kind: dpo\n", "kind: sft\n").replace(str(files["preference"]), str(later))
    path.write_text(text)
    assert runner.invoke(app, ["validate", str(path), "-q"]).exit_code == 0  # needs the tokenizer to see it
    out = runner.invoke(app, ["train", str(path)])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "stage dpo (train data)" in out.output and "no assistant turn" in out.output and "line 2" in out.output
    run_dir = tmp_path / "run"
    assert not (run_dir / "sft" / "adapter").exists() and not (run_dir / "metrics.jsonl").exists()
    listing = runner.invoke(app, ["runs", str(tmp_path), "--json"])
    [info] = json.loads(listing.output)
    assert info["status"] == "failed" and "nothing was trained" in info["error"]


def test_dry_run_names_the_line_of_a_row_without_an_answer(qwen, files, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "only a question"}]}])
    path = recipe(tmp_path, qwen, [files["sharegpt"], bad], files["preference"])
    out = runner.invoke(app, ["train", str(path), "--dry-run"])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "data.train[1]" in out.output and "no assistant turn" in out.output and "line 1" in out.output


def test_end_of_turn_check_counts_turns_cut_by_truncation(qwen, files):
    from finetune.data.build import prepare
    from finetune.data.preview import checks
    from finetune.data.templates import apply_template
    from finetune.model.loading import load_tokenizer
    from finetune.recipe.schema import DataConfig, ModelConfig

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(qwen)))
    template = apply_template(tokenizer, "tokenizer")
    full = prepare(DataConfig(train=[{"path": str(files["sharegpt"])}], max_length=64), tokenizer, "sft", 0)
    labels = full.dataset[0]["labels"]
    eot = labels.index(template.end_of_turn_id)  # cut right before it: the answer stays, its end-of-turn goes
    assert labels[eot - 1] != -100
    cut = DataConfig(train=[{"path": str(files["sharegpt"])}], max_length=eot)
    report = prepare(cut, tokenizer, "sft", 0).report
    assert report.truncated > 0 and report.turns_cut == report.truncated  # one assistant turn per sample, cut
    [(ok, text)] = [c for c in checks(report, tokenizer, template) if c[1].startswith("end-of-turn")]
    kept = report.assistant_turns - report.turns_cut
    assert ok and f"({kept}/{report.assistant_turns} kept it; {report.turns_cut} more lost it" in text


def test_a_pad_token_equal_to_eos_is_replaced_with_a_notice(tmp_path, capsys):
    from finetune.model.loading import load_tokenizer
    from finetune.recipe.schema import ModelConfig

    base = build_qwen2_model(tmp_path / "base", pad_is_eos=True)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(base)))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert "the pad token was <|endoftext|>, the same as eos; padding with" in capsys.readouterr().out
