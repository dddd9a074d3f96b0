"""The GPU check's figures say what they measure: the speed ratio after warm-up (Triton compiles in the first steps
of both sides), the baseline named by what it really ran, and the memory estimate of the micro-batch measured."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
from gpuscripts import gpu_scripts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_gpu():
    with gpu_scripts("bench_gpu") as modules:
        yield modules[0]


def test_the_rate_leaves_the_warm_up_steps_out(bench_gpu):
    # [step, time at its end, real tokens so far]: 3 slow steps (compilation), then 1000 tokens/s
    steps = [[1, 20.0, 1000], [2, 30.0, 2000], [3, 31.0, 3000], [4, 32.0, 4000], [5, 33.0, 5000], [6, 34.5, 6500]]
    rate = bench_gpu.warm_rate(steps, 3)
    assert rate["tokens_per_second_after_warmup"] == pytest.approx(3500 / 3.5)
    assert rate["warmup_steps"] == 3 and rate["measured_steps"] == 3 and rate["rate_spread"] == pytest.approx(0.0)
    two = bench_gpu.warm_rate(steps[:2], 3)  # too few steps: the first one alone is left out
    assert two["warmup_steps"] == 1 and two["tokens_per_second_after_warmup"] == pytest.approx(100.0)
    assert bench_gpu.warm_rate(steps[:1], 3)["tokens_per_second_after_warmup"] is None


def test_the_baseline_is_named_by_what_trl_ran(bench_gpu):
    no_flash, notes = bench_gpu.trl_best_flags("sft", {"liger_kernel": False, "flash_attn_2": False})
    assert bench_gpu.baseline_label(no_flash) == "trl with sdpa, padded"
    flash, _ = bench_gpu.trl_best_flags("sft", {"liger_kernel": True, "flash_attn_2": True})
    assert bench_gpu.baseline_label(flash) == "trl with flash-attention 2, padding-free, liger kernels"


def test_the_ratio_compares_rates_after_warm_up(bench_gpu, tmp_path, monkeypatch):
    import bench_report

    (tmp_path / "results").mkdir()
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "assets.json").write_text(json.dumps({"sft": {"model": "m", "train": "t"}}))

    def side(whole: float, warm: float) -> dict:
        return {"tokens_per_second": whole, "tokens_per_second_after_warmup": warm, "pairs_per_second": 0.0,
                "peak_gpu_bytes": None, "peak_rss_mb": 1.0, "wall_seconds": 1.0, "time_to_first_step": 1.0,
                "train_seconds": 1.0, "probe": {"steps": [[1, 0, 0]] * 16, "tokens_real": 1, "tokens_labels": 5},
                "final_train_loss": 1.0, "work": {"trl_flags": {"trl-best": {"bf16": True}}, "trl_notes": []}}

    # ours compiles longer (whole run 1.0x), but runs 1.5x as fast once warm
    for name, run in (("ours", side(1000.0, 3000.0)), ("trl-best", side(1000.0, 2000.0))):
        (tmp_path / "results" / f"sft-{name}.json").write_text(json.dumps({"status": "passed",
                                                                           "figures": {"run": run}}))
    monkeypatch.setattr(bench_report, "summarize", lambda *a, **k: {
        "flops_per_token": {"total": 1e9}, "dataset": {}})
    monkeypatch.setattr(bench_gpu, "availability", lambda: {"liger_kernel": False, "flash_attn_2": False})
    out = bench_gpu.compare(tmp_path, "sft", False, {"bfloat16": {"flops": 1e15}})
    ratios = out["ours_over_trl_best"]
    assert ratios["tokens_per_second"] == pytest.approx(1.5) and ratios["rate"] == "after warm-up"
    assert ratios["tokens_per_second_whole_run"] == pytest.approx(1.0)
    assert out["baseline"] == "trl with sdpa, padded"
    assert "tokens/s >= 1.3x trl with sdpa, padded" in out["targets"]


def test_the_memory_estimate_is_the_measured_micro_batchs(tiny_model, tmp_path):
    """Fewer tokens and fewer labels than the worst case give a smaller estimate, and the estimate follows them."""
    sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
    try:
        steps = importlib.import_module("steps")
    finally:
        sys.path.remove(str(ROOT / "scripts" / "gpu"))
    from transformers import AutoConfig

    from finetune.recipe.schema import Recipe
    from finetune.stages.memory import recipe_estimate

    recipe = Recipe(model={"name_or_path": str(tiny_model), "dtype": "bfloat16"}, lora={"r": 4},
                    data={"train": [{"path": "x.jsonl"}], "max_length": 256}, training={"micro_batch_size": 4})
    stage = recipe.effective_stages()[0]
    worst = recipe_estimate(AutoConfig.from_pretrained(tiny_model), recipe, stage, trainable=1000)
    plan = {"stages": {stage.name: {"memory_parts": worst}}}
    small = {"rows": 4, "tokens_real": 300, "tokens_slots": 300, "tokens_labels": 100}
    one = steps.micro_batch_estimate(recipe, str(tiny_model), plan, small)
    more_labels = steps.micro_batch_estimate(recipe, str(tiny_model), plan, {**small, "tokens_labels": 300})
    longer = steps.micro_batch_estimate(recipe, str(tiny_model), plan, {**small, "tokens_slots": 900})
    assert one["micro_batch"] == small and one["sequences"] == 4 and one["seq_len"] == 75
    assert one["estimate_bytes"] < more_labels["estimate_bytes"] < worst.total
    assert one["estimate_bytes"] < longer["estimate_bytes"]
