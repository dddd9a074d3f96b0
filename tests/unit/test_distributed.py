"""The `distributed` section and the launcher, without starting any process: rules, batch split, trainer settings,
the exact `accelerate launch` command, and the checks `ft train --nproc` makes before launching."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.distributed import launch, process
from finetune.distributed import plan as batching
from finetune.errors import FinetuneError
from finetune.recipe.loading import RecipeError
from finetune.recipe.schema import DistributedConfig, TrainingConfig, load_recipe

QLORA = "quantization: {mode: nf4, compute_dtype: bfloat16}\n"


def recipe_file(tmp_path: Path, body: str) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")  # checked for, never loaded here
    p = tmp_path / "r.yaml"
    p.write_text(f"model: {{name_or_path: {tmp_path / 'model'}}}\ndata: {{train: [{{path: {data}}}]}}\n" + body)
    return p


def problems(tmp_path: Path, body: str) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe_file(tmp_path, body))
    return str(e.value)


def test_default_is_ddp_keeping_the_global_batch(tmp_path):
    r = load_recipe(recipe_file(tmp_path, ""))
    assert r.distributed.strategy == "ddp" and r.distributed.keep_global_batch
    assert batching.trainer_distributed_kwargs(r) == {"ddp_find_unused_parameters": False}


def test_qlora_fsdp_needs_storage_equal_to_compute_dtype(tmp_path):
    msg = problems(tmp_path, QLORA + "distributed: {strategy: fsdp}\n")
    assert "quantization.quant_storage" in msg and "bfloat16" in msg and "FSDP" in msg
    r = load_recipe(recipe_file(tmp_path, QLORA.replace("}", ", quant_storage: bfloat16}") +
                                "distributed: {strategy: fsdp}\n"))
    assert batching.trainer_distributed_kwargs(r) == {
        "fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True, "cpu_offload": False}}


def test_qlora_fsdp_with_auto_dtypes_asks_for_an_explicit_one(tmp_path):
    msg = problems(tmp_path, "quantization: {mode: nf4}\ndistributed: {strategy: fsdp}\n")
    assert "set quantization.compute_dtype" in msg


def test_qlora_zero3_has_the_same_rule_and_zero2_does_not(tmp_path):
    msg = problems(tmp_path, QLORA + "distributed: {strategy: deepspeed, deepspeed_stage: 3}\n")
    assert "DeepSpeed ZeRO-3" in msg and "quant_storage" in msg
    r = load_recipe(recipe_file(tmp_path, QLORA + "distributed: {strategy: deepspeed, deepspeed_stage: 2}\n"))
    assert batching.trainer_distributed_kwargs(r)["deepspeed"]["zero_optimization"]["stage"] == 2


def test_keys_of_another_strategy_are_refused(tmp_path):
    msg = problems(tmp_path, "distributed: {strategy: ddp, fsdp_cpu_offload: true, deepspeed_stage: 3}\n")
    assert "distributed.fsdp_cpu_offload applies to strategy 'fsdp' only" in msg
    assert "distributed.deepspeed_stage applies to strategy 'deepspeed' only" in msg


def test_deepspeed_stage_and_config_file_together_are_refused(tmp_path):
    msg = problems(tmp_path, "distributed: {strategy: deepspeed, deepspeed_stage: 3, deepspeed_config: ds.json}\n")
    assert "deepspeed_stage is not used when distributed.deepspeed_config" in msg


def test_fsdp_with_fused_kernels_is_refused(tmp_path):
    assert "turn kernels off" in problems(tmp_path, "distributed: {strategy: fsdp}\nkernels: {rmsnorm: true}\n")


def test_missing_deepspeed_says_how_to_install(tmp_path, monkeypatch):
    from finetune.stages.preflight import check_recipe_paths

    r = load_recipe(recipe_file(tmp_path, "distributed: {strategy: deepspeed}\n"))
    monkeypatch.setattr(batching.importlib.util, "find_spec", lambda name: None)
    found = check_recipe_paths(r)
    assert any("pip install deepspeed" in p for p in found), found
    monkeypatch.setattr(batching.importlib.util, "find_spec", lambda name: object())
    assert check_recipe_paths(r) == []


def test_deepspeed_config_file_is_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(batching.importlib.util, "find_spec", lambda name: object())
    bad = tmp_path / "ds.json"
    bad.write_text("{stage: 3")
    r = load_recipe(recipe_file(tmp_path, f"distributed: {{strategy: deepspeed, deepspeed_config: {bad}}}\n"))
    assert "is not valid JSON" in " ".join(batching.environment_problems(r))
    assert batching.trainer_distributed_kwargs(r) == {"deepspeed": str(bad)}
    r.distributed.deepspeed_config = str(tmp_path / "none.json")
    assert "does not exist" in " ".join(batching.environment_problems(r))


def test_accelerate_config_contradicting_the_recipe_is_refused(tmp_path, monkeypatch):
    r = load_recipe(recipe_file(tmp_path, "distributed: {strategy: fsdp}\n"))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert "uses deepspeed but distributed.strategy is 'fsdp'" in " ".join(batching.environment_problems(r))


@pytest.mark.parametrize(
    ("micro", "accum", "n", "expected"),
    [
        (4, 1, 1, (4, 1)),  # one process: the recipe as written
        (4, 4, 2, (4, 2)),  # accumulation divided first: same memory per step
        (4, 4, 4, (4, 1)),
        (8, 1, 2, (4, 1)),  # then the micro batch
        (6, 2, 4, (3, 1)),
        (4, 3, 2, (3, 2)),  # 12 / 2 = 6 per process: largest micro batch <= 4 dividing 6 is 3
    ],
)
def test_batch_plan_keeps_the_global_batch(micro, accum, n, expected):
    plan = batching.batch_plan(TrainingConfig(micro_batch_size=micro, gradient_accumulation_steps=accum),
                             DistributedConfig(), n)
    assert (plan.micro_batch_size, plan.accumulation) == expected
    assert plan.global_batch == micro * accum
    assert plan.micro_batch_size <= micro  # never more memory per process than the recipe asked for


def test_batch_plan_refuses_an_uneven_split_and_says_what_to_do():
    with pytest.raises(FinetuneError, match=r"4 x 1 = 4 cannot be split evenly over 3 processes.*3 or 6"):
        batching.batch_plan(TrainingConfig(micro_batch_size=4), DistributedConfig(), 3)
    plan = batching.batch_plan(TrainingConfig(micro_batch_size=4), DistributedConfig(keep_global_batch=False), 3)
    assert (plan.micro_batch_size, plan.accumulation, plan.global_batch) == (4, 1, 12)


def test_process_identity_comes_from_the_launcher_environment(monkeypatch):
    assert process.world_size() == 1 and process.is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert process.world_size() == 2 and not process.is_main_process()


def test_accelerate_args_parse_as_a_local_multi_process_launch():
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(launch.accelerate_args(2, ["train", "r.yaml", "--set", "a=1"], 1234))
    assert (args.num_processes, args.num_machines, args.main_process_port) == (2, 1, 1234)
    assert args.multi_gpu and not args.cpu  # torchrun launcher; --cpu would start one process only
    assert args.module and args.training_script == "finetune"
    assert args.training_script_args == ["train", "r.yaml", "--set", "a=1"]


def test_nproc_forwards_every_option_to_the_processes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "relaunch", lambda n, args: calls.append((n, args)))
    p = recipe_file(tmp_path, "")
    out = CliRunner().invoke(app, ["train", str(p), "--set", "lora.r=4", "--set", "lora.alpha=8", "--overwrite",
                                   "--from-stage", "sft", "--nproc", "2"])
    assert out.exit_code == 0, out.output
    assert calls == [(2, ["train", str(p), "--set", "lora.r=4", "--set", "lora.alpha=8", "--overwrite",
                          "--from-stage", "sft"])]


def test_nproc_refuses_an_uneven_batch_before_launching(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "relaunch", lambda n, args: pytest.fail("launched"))
    out = CliRunner().invoke(app, ["train", str(recipe_file(tmp_path, "")), "--nproc", "3"])
    assert out.exit_code == 2
    assert "cannot be split evenly over 3 processes" in out.output and "Traceback" not in out.output


def test_nproc_inside_a_launched_process_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FinetuneError, match="already started by a launcher"):
        launch.check_nproc(2)


def test_a_resolved_recipe_with_every_key_written_loads_again(tmp_path):
    """Each process of `ft train --nproc` and `ft train RUN --resume` read the resolved recipe back."""
    from finetune.recipe.loading import dump_recipe

    stages = ("stages:\n  - {name: sft, kind: sft, training: {learning_rate: 1.0e-3}}\n"
              "  - {name: dpo, kind: dpo, training: {save_steps: null, max_steps: 3}}\n")
    r = load_recipe(recipe_file(tmp_path, "distributed: {strategy: fsdp, fsdp_cpu_offload: true}\n"
                                          "training: {save_steps: 5}\n" + stages))
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_recipe(r))  # every key of every section, at its default unless set
    again = load_recipe(resolved)
    assert again == r
    assert [again.stage_training(s).save_steps for s in again.stages] == [5, None]  # None overrides too


def test_sharding_strategies_without_gpus_are_refused_for_several_processes(tmp_path, monkeypatch):
    """Accelerate runs CPU processes as DDP whatever the FSDP settings: say so instead of pretending to shard."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(batching.importlib.util, "find_spec", lambda name: object())
    for strategy in ("fsdp", "deepspeed"):
        r = load_recipe(recipe_file(tmp_path, f"distributed: {{strategy: {strategy}}}\n"))
        assert batching.environment_problems(r) == []  # one process: nothing is sharded anyway
        found = " ".join(batching.environment_problems(r, processes=2))
        assert f"strategy '{strategy}' needs GPUs" in found
    assert batching.environment_problems(load_recipe(recipe_file(tmp_path, "")), processes=2) == []


def test_sharded_models_are_gathered_by_every_process_before_saving():
    """Under FSDP and ZeRO-3 each process holds a shard: the save gathers them (a collective); otherwise nothing."""
    from types import SimpleNamespace

    calls = []
    accelerator = SimpleNamespace(get_state_dict=lambda m: calls.append(m) or {"w": m},
                                  state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))

    def trainer(fsdp: bool, deepspeed: bool):
        return SimpleNamespace(is_fsdp_enabled=fsdp, is_deepspeed_enabled=deepspeed, accelerator=accelerator,
                               model="fsdp-model", model_wrapped="deepspeed-engine")

    assert process.gathered_state_dict(trainer(False, False)) is None and calls == []  # DDP / one process
    assert process.gathered_state_dict(trainer(True, False)) == {"w": "fsdp-model"}
    assert process.gathered_state_dict(trainer(False, True)) == {"w": "deepspeed-engine"}
    accelerator.state.deepspeed_plugin.zero_stage = 2  # ZeRO-2 keeps whole weights on every process
    assert process.gathered_state_dict(trainer(False, True)) is None
    zero3 = batching.deepspeed_settings(DistributedConfig(strategy="deepspeed", deepspeed_stage=3))
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
