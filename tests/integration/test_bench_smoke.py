"""Smoke run of the training benchmark (`scripts/bench_train.py`) on the tiny preset, so that it cannot rot.

The `ours` side runs end to end (`ft train` in its own process, probe, held-out loss, report files). The trl sides
are not launched here (two more interpreter start-ups, a minute on a loaded CI machine): their generated configs are
parsed by trl's own CLI parser, which is what fails first when trl renames or drops a flag.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        yield importlib.import_module("bench_train")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_ours_side_end_to_end(bench, tmp_path):
    out = tmp_path / "out"
    summary = bench.main(["--preset", "tiny", "--reps", "1", "--sides", "ours", "--micro-batch", "2",
                          "--peak-budget", "1", "--noise-seeds", "1", "--work", str(tmp_path / "work"),
                          "--out", str(out)])
    ours, data = summary["sides"]["ours"], summary["dataset"]
    # every real token of the dataset went through the model once, none of them padding (padding-free batches),
    # and exactly the assistant tokens carried labels: the objective trl's assistant_only_loss trains
    assert ours["tokens_real"] == ours["tokens_slots"] == data["tokens"]
    assert ours["tokens_labels"] == data["label_tokens"]
    assert ours["steps"] == data["samples"] // 4 and ours["tokens_per_second"] > 0
    assert 0 < ours["time_to_first_step"] < ours["wall_seconds"] and ours["peak_rss_mb"] > 100
    # a random model of a 512-word vocabulary: about ln(512) = 6.24 nats per token, before and after 2 steps
    assert abs(ours["heldout_loss"] - math.log(512)) < 0.5 and abs(ours["final_train_loss"] - math.log(512)) < 0.5
    # the noise estimate: ours again with another data order, and the untrained model's held-out loss
    noise, before = summary["meta"]["heldout_noise"], summary["meta"]["heldout_before"]
    assert [n["seed"] for n in noise] == [42, 43] and noise[0]["heldout_loss"] == ours["heldout_loss"]
    assert abs(before["heldout_loss"] - math.log(512)) < 0.5
    assert 0 < ours["mfu"]["float32"] < 1
    assert json.loads((out / "sft.json").read_text())["sides"]["ours"]["steps"] == ours["steps"]
    assert "| ours |" in (out / "sft.md").read_text() and (out / "sft.png").stat().st_size > 1000


def test_ours_side_dpo_mode(bench, tmp_path):
    out = tmp_path / "out"
    summary = bench.main(["--mode", "dpo", "--preset", "tiny", "--reps", "1", "--sides", "ours", "--micro-batch", "2",
                          "--peak-budget", "1", "--noise-seeds", "0", "--work", str(tmp_path / "work"),
                          "--out", str(out)])
    ours, data = summary["sides"]["ours"], summary["dataset"]
    # chosen and rejected of every pair went through the model once, padding-free, labels on the answers only
    assert ours["rows"] == data["samples"] and ours["tokens_real"] == ours["tokens_slots"] == data["tokens"]
    assert ours["tokens_labels"] == data["label_tokens"] and ours["pairs_per_second"] > 0
    assert summary["meta"]["heldout_before"]["heldout_loss"] == pytest.approx(math.log(2))
    assert 0 < ours["heldout_loss"] < 1 and 0 <= ours["heldout_reward_accuracy"] <= 1
    assert "| ours |" in (out / "dpo.md").read_text() and (out / "dpo.png").stat().st_size > 1000


@pytest.mark.parametrize("mode", ["sft", "dpo"])
@pytest.mark.parametrize("side", ["trl-default", "trl-best"])
def test_trl_configs_parse(bench, tmp_path, mode, side):
    import trl.scripts.dpo
    import trl.scripts.sft

    args = bench.parse_args(["--mode", mode, "--preset", "tiny", "--sides", side])
    run = tmp_path / "run"
    run.mkdir()
    assets = {"model": "m", "train_dir": "d"}
    work = bench.work_settings(args)
    cmd = bench.trl_command(side, run, assets, work, max_steps=None)
    assert cmd[1:3] == [mode, "--config"]
    parser = (trl.scripts.sft if mode == "sft" else trl.scripts.dpo).make_parser()
    _, training, model, _ = parser.parse_args_and_config(cmd[2:])
    assert model.load_in_4bit and model.bnb_4bit_quant_type == "nf4" and model.use_peft and model.lora_r == 16
    assert training.learning_rate == work["lr"] and training.per_device_train_batch_size == work["micro_batch"]
    assert training.bf16 is (side == "trl-default") and training.use_cpu
    if mode == "sft":
        assert training.assistant_only_loss and training.padding_free is (side == "trl-best")
    else:
        assert training.beta == 0.1 and training.loss_type == ["sigmoid"]


@pytest.mark.parametrize("mode", ["grpo", "kto"])
def test_ours_side_alignment_modes(bench, tmp_path, mode):
    """`--mode grpo|kto` (bench_align.py): the ours side end to end on the tiny preset, with GRPO's phases."""
    out = tmp_path / "out"
    summary = bench.main(["--mode", mode, "--preset", "tiny", "--samples", "4", "--reps", "1", "--sides", "ours",
                          "--work", str(tmp_path / "work"), "--out", str(out)])
    (run,) = summary["runs"]
    assert run["steps"] == 1 and run["exit_code"] == 0 and 0 < run["time_to_first_step"] < run["wall_seconds"]
    if mode == "grpo":  # 4 prompts x 4 completions; a random model never stops early: every one full length
        assert run["completions"] == 16 and run["mean_completion_length"] == 32 and run["completions_per_second"] > 0
        phases = run["phases"]
        assert phases["generation"] > 0 and phases["train_step"] > 0 and phases["scoring"] >= 0
        assert sum(phases.values()) == pytest.approx(run["train_seconds"], rel=0.05)
        assert "Where GRPO's time goes" in (out / "grpo.md").read_text()
    else:  # 4 pairs split into 8 rows: one step of micro batch 4 x 2 accumulation steps
        assert run["rows"] == 8 and run["rows_per_second"] > 0
    assert "| ours |" in (out / f"{mode}.md").read_text()


@pytest.mark.parametrize("mode", ["grpo", "kto"])
@pytest.mark.parametrize("side", ["trl-default", "trl-best"])
def test_trl_alignment_configs_parse(bench, tmp_path, mode, side):
    import bench_align
    import trl.scripts.grpo
    import trl.scripts.kto

    args = bench.parse_args(["--mode", mode, "--preset", "tiny", "--sides", side])
    run = tmp_path / "run"
    run.mkdir()
    work = bench_align.settings(args)
    cmd = bench_align.command(side, run, {"model": "m", "train_dir": "d"}, work, [], Path("bin"))
    assert cmd[1:3] == [mode, "--config"]
    parser = (trl.scripts.grpo if mode == "grpo" else trl.scripts.kto).make_parser()
    script, training, model, *_ = parser.parse_args_and_config(cmd[2:])
    assert model.load_in_4bit and model.use_peft and model.lora_r == 16 and training.use_cpu
    assert training.bf16 is (side == "trl-default") and training.beta == work["beta"]
    assert training.per_device_train_batch_size == work["micro_batch"]
    if mode == "grpo":
        assert training.num_generations == 4 and training.max_completion_length == 32
        assert script.reward_funcs == ["bench_align.trl_exact_match"]
        assert bench_align.trl_exact_match([[{"role": "assistant", "content": "cat"}], "dog"], ["cat", "cat"]) == [
            1.0, 0.0]


def test_context_benchmark_ours_side_and_its_cap(tmp_path):
    """`scripts/bench_context.py` on the tiny preset: the ours side trains one sample of each length, the report
    holds every row, and a side past the memory cap is stopped and reported as such, longer lengths not tried."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        context = importlib.import_module("bench_context")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    common = ["--preset", "tiny", "--sides", "ours", "--steps", "1", "--threads", "1", "--work", str(tmp_path / "w")]
    summary = context.main([*common, "--lengths", "64,128", "--cap", "8GB", "--out", str(tmp_path / "a")])
    runs = {r["length"]: r for r in summary["runs"]}
    assert all(r["ok"] and r["peak_rss_mb"] > 0 and r["seconds_per_step"] > 0 for r in runs.values()), runs
    assert summary["longest"] == {"ours": 128}
    table = (tmp_path / "a" / "context.md").read_text()
    assert "| 64 |" in table and "| 128 |" in table
    capped = context.main([*common, "--lengths", "64,128", "--cap", "50MB", "--out", str(tmp_path / "b")])
    assert [(r["length"], r["ok"], r["over_cap"]) for r in capped["runs"]] == [(64, False, True)]
    assert capped["longest"] == {"ours": None}


def test_moe_preset_ours_side_and_trl_config(bench, tmp_path):
    """`--preset moe-tiny` (the moe preset's shape, small): ours trains a Qwen3-MoE with its experts in NF4 and LoRA
    on the attention layers only; trl's config parses with the same explicit targets (not peft's all-linear, which
    would adapt every expert too); the report (moe.md) checks the MoE goal against trl's fastest flags."""
    import trl.scripts.sft
    from bench_report import compare

    out = tmp_path / "out"
    summary = bench.main(["--preset", "moe-tiny", "--reps", "1", "--sides", "ours", "--micro-batch", "2",
                          "--peak-budget", "1", "--noise-seeds", "0", "--no-heldout", "--note", "shared CPU",
                          "--work", str(tmp_path / "work"), "--out", str(out)])
    ours, data = summary["sides"]["ours"], summary["dataset"]
    assert ours["tokens_real"] == data["tokens"] and ours["tokens_labels"] == data["label_tokens"]
    log = Path(summary["runs"][0]["run_dir"], "log.txt").read_text()
    assert "experts: 4 fused expert weights in NF4" in log and "experts 0, router 0" in log, log
    report = (out / "moe.md").read_text()
    assert "| ours |" in report and "Note: shared CPU" in report and '"experts": "NF4 on ours' in report
    # the routed experts are counted in the FLOPs: top-2 of 4 experts of 64 = one MLP of 128, and the router
    assert summary["flops_per_token"]["base_linear"] == 4 * 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 64 * 4)

    args = bench.parse_args(["--preset", "moe-tiny", "--sides", "trl-best"])
    run = tmp_path / "trl"
    run.mkdir()
    cmd = bench.trl_command("trl-best", run, {"model": "m", "train_dir": "d"}, bench.work_settings(args), None)
    _, training, model, _ = trl.scripts.sft.make_parser().parse_args_and_config(cmd[2:])
    assert model.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"] and model.load_in_4bit
    sides = {"ours": {"tokens_per_second": 2.0, "peak_rss_mb": 50, "capped_steps": None},
             "trl-best": {"tokens_per_second": 1.0, "peak_rss_mb": 100, "capped_steps": None}}
    for side in sides.values():
        side.update(wall_seconds=1, time_to_first_step=1, tree_peak_rss_mb=1, final_train_loss=None,
                    heldout_loss=None, tokens_labels=1)
    targets = compare(sides, "tokens_per_second", dpo=False, moe=True)["targets"]
    assert targets == {"tokens/s >= 2x trl best flags (MoE)": True, "peak RSS <= 0.5x trl best flags (MoE)": True}
    sides["ours"]["peak_rss_mb"] = 51
    assert not compare(sides, "tokens_per_second", dpo=False, moe=True)["targets"]["peak RSS <= 0.5x trl best "
                                                                                   "flags (MoE)"]
