"""The alignment quickstarts (kto, orpo, simpo, grpo), short: each shipped recipe runs end to end (a few
steps) through `ft train` on the bundled tiny model, its method's loss is the one trained (trl's own logged terms),
the adapter moves, and the held-out measure is taken before and after; a failing user reward is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["training.max_steps=1", "data.train.0.max_samples=64", "data.eval=[]", "data.task_eval=null"]


def quickstart(name: str, out: Path, *extra: str):
    """`ft train recipes/quickstart-<name>.yaml` with a 1-step SFT and a 2-step alignment stage, into `out`, measured
    on the first 16 held-out pairs of the quickstart (written beside `out`)."""
    stage = f"stages.{name}"
    held_out = out.parent / "dpo_eval16.jsonl"
    held_out.write_text("".join((ROOT / "data/quickstart/dpo_eval.jsonl").read_text().splitlines(True)[:16]))
    sets = [*SHORT, f"output.dir={out}", f"{stage}.training.max_steps=2", f"{stage}.data.train.0.max_samples=48",
            f"{stage}.data.task_eval={held_out}", f"{stage}.data.task_eval_max_new_tokens=8", *extra]
    args = ["train", str(ROOT / "recipes" / f"quickstart-{name}.yaml")]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(app, args)


def logged(run_dir: Path, stage: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("stage") == stage]


def adapter_delta(run_dir: Path, stage: str) -> float:
    from safetensors.torch import load_file

    before = load_file(str(run_dir / "sft" / "adapter" / "adapter_model.safetensors"))
    after = load_file(str(run_dir / stage / "adapter" / "adapter_model.safetensors"))
    return max((after[k].float() - before[k].float()).abs().max().item() for k in before)


@pytest.mark.parametrize("name, loss_terms", [
    ("kto", {"kl", "rewards/chosen"}),          # KTO's KL estimate from mismatched pairs
    ("orpo", {"nll_loss", "log_odds_ratio"}),    # ORPO: NLL + odds ratio
    ("simpo", {"nll_loss", "rewards/margins"}),  # CPOTrainer with loss_type simpo
])
def test_pair_and_unpaired_quickstarts_train_their_method(name, loss_terms, tmp_path, in_root):
    out = tmp_path / "run"
    result = quickstart(name, out, f"stages.{name}.data.eval.0.max_samples=16")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / name / "summary.json").read_text())
    m = summary["metrics"]
    assert summary["kind"] == name and m["steps"] == 2
    keys = set().union(*(r.keys() for r in logged(out, name)))
    assert all(any(k.endswith(term) for k in keys) for term in loss_terms), keys
    assert adapter_delta(out, name) > 0
    before, after = m["task_before"], m["task_after"]
    for figures in (before, after):
        assert figures["pairs"] == 16 and 0 <= figures["preference_accuracy"] <= 1 and figures["n"] == 16
    assert "held-out before -> after" in result.output and "preference accuracy" in result.output
    if name == "kto":
        assert "reference policy: adapter" in result.output and m["reference"] == "sft"


def test_grpo_quickstart_samples_scores_and_measures(tmp_path, in_root):
    out = tmp_path / "run"
    # After a 1-step SFT no sampled answer is exactly right, so exact match alone scores every group flat (zero
    # advantages, no update); the length penalty varies within groups and moves the policy.
    result = quickstart("grpo", out, "stages.grpo.training.micro_batch_size=8",
                        "stages.grpo.grpo.max_completion_length=8",
                        "stages.grpo.grpo.rewards=[{kind: exact_match}, {kind: length, max_words: 2, weight: 0.1}]")
    assert result.exit_code == 0, result.output
    m = json.loads((out / "grpo" / "summary.json").read_text())["metrics"]
    assert m["rewards"] == ["exact_match", "length"] and m["steps"] == 2 and m["completions"] == 16
    rows = [r for r in logged(out, "grpo") if "reward" in r]
    assert rows and all("kl" in r and "rewards/length/mean" in r for r in rows)  # per-reward logs, KL to reference
    assert any(r["reward_std"] > 0 for r in rows)
    assert m["task_before"]["n"] == 16 and m["task_before"]["mean_reward"] <= 0  # penalty only, no exact answers yet
    assert adapter_delta(out, "grpo") > 0
    assert "held-out before -> after GRPO: exact match" in result.output


def test_grpo_with_flat_rewards_does_not_move_the_policy(tmp_path, in_root):
    """Group-normalised advantages: when every completion of every group scores the same, GRPO has nothing to learn."""
    out = tmp_path / "run"
    result = quickstart("grpo", out, "stages.grpo.training.micro_batch_size=8",
                        "stages.grpo.grpo.max_completion_length=4",
                        "stages.grpo.grpo.rewards=[{kind: regex, pattern: '$'}]")  # matches everything: always 1
    assert result.exit_code == 0, result.output
    assert all(r["frac_reward_zero_std"] == 1.0 for r in logged(out, "grpo") if "reward" in r)
    assert adapter_delta(out, "grpo") == 0


def test_grpo_reward_that_fails_is_named_at_the_first_step(tmp_path, in_root, monkeypatch):
    (tmp_path / "badreward.py").write_text(
        "def score(prompts, completions, answers, **columns):\n    return [float('nan')] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = quickstart("grpo", tmp_path / "run", "stages.grpo.training.micro_batch_size=8",
                        "stages.grpo.grpo.max_completion_length=4",
                        "stages.grpo.grpo.rewards=[{kind: python, function: 'badreward:score'}]",
                        "stages.grpo.grpo.allow_reward_code=true")
    assert result.exit_code != 0
    text = result.output + repr(result.exception)
    assert "reward function badreward.score returned nan for completion 0" in text
    assert "prompt '" in text and "completion '" in text


def test_grpo_dry_run_counts_completions_not_prompts(tmp_path, in_root):
    args = ["train", str(ROOT / "recipes" / "quickstart-grpo.yaml"), "--dry-run", "--set", f"output.dir={tmp_path}",
            "--set", "data.train.0.max_samples=32", "--set", "data.eval=[]"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # 160 prompts x 4 completions each, 16 completions per step: 40 steps (not 160 / 16 = 10)
    assert "steps: 160 rows x 4 completions / global batch 16" in result.output and "-> 40 steps" in result.output
    assert "[reference answer (the policy samples its own)]" in result.output
