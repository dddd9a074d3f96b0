"""SFT then DPO in one recipe, end to end through `ft train` on a tiny 4-bit model (CPU): one run folder, the SFT
adapter as the DPO reference, finished stages skipped on rerun, `--from-stage` to redo a stage."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app


def write_pairs(path: Path, n: int, offset: int = 0) -> Path:
    """Preference rows for the addition task: chosen = the sum, rejected = a wrong sum or a hedged one."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(offset, offset + n):
            a, b = i % 8, (i * 3) % 8
            rejected = str(a + b + 1) if i % 2 else f"I think it might be {a + b}"
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"add {a} {b}"}],
                                "chosen": [{"role": "assistant", "content": str(a + b)}],
                                "rejected": [{"role": "assistant", "content": rejected}]}) + "\n")
    return path


def train(*args: str):
    return CliRunner().invoke(app, ["train", *args])


@pytest.fixture(scope="module")
def run(tiny_model, addition_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sftdpo")
    pairs_train, pairs_eval = write_pairs(out / "pairs.jsonl", 48), write_pairs(out / "pairs_eval.jsonl", 16, 200)
    recipe = out / "recipe.yaml"
    recipe.write_text(f"""
name: sftdpo
model: {{name_or_path: {tiny_model}, dtype: float32}}
quantization: {{mode: nf4, compute_dtype: float32}}
lora: {{r: 8, alpha: 16}}
data:
  train: [{{path: {addition_data['train']}}}]
  max_length: 64
training: {{max_steps: 12, micro_batch_size: 8, learning_rate: 1.0e-2, logging_steps: 2, seed: 1}}
stages:
  - {{name: sft, kind: sft}}
  - name: dpo
    kind: dpo
    data:
      train: [{{path: {pairs_train}}}]
      eval: [{{path: {pairs_eval}}}]
      max_length: 64
      task_eval: {addition_data['eval']}
      task_eval_max_new_tokens: 4
    training: {{max_steps: 8, learning_rate: 5.0e-3}}
    dpo: {{beta: 0.1}}
output: {{dir: {out / 'run'}}}
""")
    result = train(str(recipe))
    assert result.exit_code == 0, result.output
    return {"recipe": recipe, "dir": out / "run", "output": result.output}


def summary(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "summary.json").read_text())


def test_dpo_starts_from_the_sft_adapter_and_uses_it_as_reference(run):
    d = run["dir"]
    assert "reference policy: sft (a frozen copy of the adapter this stage starts from" in run["output"]
    m = summary(d, "dpo")["metrics"]
    assert m["reference"] == "sft" and Path(m["reference_adapter"]) == d / "sft" / "adapter"
    # step 0 on held-out pairs: policy == reference
    assert m["eval_before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(m["eval_before"]["rewards/margins"]) < 1e-5
    # and training moved it the preferred way
    assert m["eval_after"]["rewards/margins"] > 0.05 and m["eval_after"]["rewards/accuracies"] >= 0.75
    assert m["eval_after"]["loss"] < math.log(2)
    assert set(m["task_before"]) >= {"exact_match", "concise_rate"} and m["task_after"]["n"] == 16
    assert json.loads((d / "summary.json").read_text())["status"] == "finished"


def test_each_stage_prints_and_keeps_its_model_patches(run):
    """finetune.model.patches' record: the banner prints it, <stage>/summary.json keeps it; DPO after SFT with the
    same lora keys warns about none."""
    d = run["dir"]
    sft, dpo = summary(d, "sft")["patches"], summary(d, "dpo")["patches"]
    assert sft[-2:] == ["attention: sdpa per sample (no CUDA) within padding-free rows (finetune.model.attention)",
                        "loss head: chunked cross-entropy (fused_ce) on labelled positions only "
                        "(finetune.model.loss_heads)"], sft
    assert dpo[-1].startswith("loss head: trl's fused LM head kernel on labelled positions only, padded batches run "
                              "as padding-free rows"), dpo
    for line in sft:
        assert f"[sft] {line}" in run["output"]
    assert "lora keys are ignored" not in run["output"]


def test_dpo_metrics_every_logging_step_and_on_held_out_pairs(run):
    rows = [json.loads(x) for x in (run["dir"] / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["stage"] == "dpo" and "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 4, 6, 8]
    for r in train_rows:
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(r)
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    evals = [r for r in rows if r["stage"] == "dpo" and "eval_rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [0, 8]


def test_dpo_adapter_is_saved_alone_and_differs_from_sft(run):
    from safetensors.torch import load_file

    d = run["dir"]
    assert not (d / "dpo" / "adapter" / "ref").exists()  # the reference adapter is not saved with the policy
    sft = load_file(str(d / "sft" / "adapter" / "adapter_model.safetensors"))
    dpo = load_file(str(d / "dpo" / "adapter" / "adapter_model.safetensors"))
    assert sft.keys() == dpo.keys()
    assert any((sft[k].float() - dpo[k].float()).abs().max() > 1e-4 for k in sft)


def test_finished_run_is_refused_and_unknown_stage_is_named(run):
    again = train(str(run["recipe"]))
    assert again.exit_code != 0 and "--from-stage" in again.output
    bad = train(str(run["recipe"]), "--from-stage", "rl")
    assert bad.exit_code != 0 and "no such stage" in bad.output and "sft, dpo" in bad.output


def test_from_stage_reruns_only_that_stage_and_notes_changed_settings(run):
    d = run["dir"]
    sft_file = d / "sft" / "adapter" / "adapter_model.safetensors"
    sft_mtime, dpo_mtime = sft_file.stat().st_mtime_ns, (d / "dpo" / "summary.json").stat().st_mtime_ns
    result = train(str(run["recipe"]), "--from-stage", "dpo", "--set", "stages.dpo.dpo.beta=0.2",
                   "--set", "training.seed=3")
    assert result.exit_code == 0, result.output
    assert "[sft] already finished" in result.output
    assert "training.seed: 1 -> 3" in result.output  # the kept sft stage ran with other settings: said, not hidden
    assert sft_file.stat().st_mtime_ns == sft_mtime
    assert (d / "dpo" / "summary.json").stat().st_mtime_ns != dpo_mtime
    assert summary(d, "dpo")["metrics"]["beta"] == 0.2


def test_rerun_after_a_crash_skips_the_finished_stage(run):
    d = run["dir"]
    (d / "dpo" / "summary.json").unlink()  # as if the process died during dpo, before its first checkpoint
    shutil.rmtree(d / "dpo" / "checkpoints", ignore_errors=True)  # (with one, the rerun asks for --resume)
    top = json.loads((d / "summary.json").read_text())
    (d / "summary.json").write_text(json.dumps({**top, "status": "failed"}))
    sft_mtime = (d / "sft" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    result = train(str(run["recipe"]), "--set", "stages.dpo.dpo.beta=0.2", "--set", "training.seed=3")
    assert result.exit_code == 0, result.output
    assert "[sft] already finished" in result.output and "reference policy: sft" in result.output
    assert (d / "sft" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == sft_mtime
    assert (d / "dpo" / "summary.json").exists()


def test_bad_preference_rows_are_counted_and_named(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = {"prompt": [{"role": "user", "content": "add 1 2"}], "chosen": [{"role": "assistant", "content": "3"}],
            "rejected": [{"role": "assistant", "content": "4"}]}
    rows = [good, {**good, "rejected": good["chosen"]}, {k: v for k, v in good.items() if k != "rejected"}, good,
            {**good, "rejected": good["chosen"]}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {{name_or_path: {tiny_model}, dtype: float32}}
data: {{train: [{{path: {bad}, format: preference}}]}}
stages: [{{name: dpo, kind: dpo, dpo: {{reference: base}}}}]
output: {{dir: {tmp_path / 'run'}}}
""")
    result = train(str(recipe))
    assert result.exit_code != 0 and "Traceback" not in result.output
    msg = " ".join(result.output.split())
    assert str(bad) in msg and "2 rows" in msg and "1 row" in msg, msg
    assert "identical" in msg and "rejected" in msg


def test_a_copied_run_folder_uses_its_own_sft_adapter(run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run["dir"], copy)
    result = train(str(run["recipe"]), "--from-stage", "dpo", "--set", f"output.dir={copy}")
    assert result.exit_code == 0, result.output
    assert Path(summary(copy, "dpo")["metrics"]["reference_adapter"]) == copy / "sft" / "adapter"
