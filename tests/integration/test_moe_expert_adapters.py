"""finetune's own expert adapters end to end (issue 30): a tiny Qwen3-MoE trained with `lora.experts: shared` on 4-bit
experts and a tiny Mixtral with `per_expert` on 4-bit experts, through `ft train` (interrupted and resumed: the same
expert adapters as a run never stopped), the banner's count, the manifest, `ft eval`, the merged export (verified), the
adapter export (the file and its note) and `ft generate` on both; ranks by routing follow the measured load."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from build_fixture_models import build, task_rows
from resume_helpers import TermAtStep, train_here
from typer.testing import CliRunner

import finetune.stages.common as common
from finetune.cli import app
from finetune.model import expert_adapters
from finetune.stages.memory import ModelShape

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("family,experts", [("qwen3-moe", "shared"), ("mixtral", "per_expert")])
def test_expert_adapters_on_4bit_experts_train_resume_and_export(tmp_path, monkeypatch, family, experts):
    model = build(family, tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                      "content": a}]}) + "\n"
                            for q, a, _ in task_rows(32)))
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                          "content": a}]}) + "\n"
                                for q, a, _ in task_rows(8, offset=32)))
    recipe = tmp_path / "recipe.yaml"
    run = tmp_path / "run"
    recipe.write_text(f"""name: moe-expert-lora
model: {{name_or_path: {model}, dtype: float32}}
quantization: {{mode: nf4, compute_dtype: float32, experts: true}}
lora: {{r: 4, alpha: 8, experts: {experts}}}
data: {{train: [{{path: {data}}}], eval: [{{path: {held_out}}}], max_length: 64}}
training: {{max_steps: 12, micro_batch_size: 8, learning_rate: 2.0e-2, logging_steps: 1, seed: 0, save_steps: 4}}
output: {{dir: {run}}}
""")
    quiet = common.quiet_trainer
    with monkeypatch.context() as patch:  # stopped at step 6, as a Ctrl-C would
        patch.setattr(common, "quiet_trainer", lambda trainer: (quiet(trainer), trainer.add_callback(
            TermAtStep(6, signal.SIGTERM))))
        out = train_here(str(recipe))
    assert out.exit_code != 0 and "stopped by SIGTERM at step 6" in out.output, out.output
    checkpoint = run / "sft" / "checkpoints" / "checkpoint-6"
    assert (checkpoint / expert_adapters.EXPERT_FILE).exists()  # every checkpoint carries them
    loaded = []
    load = expert_adapters.load
    monkeypatch.setattr(expert_adapters, "load", lambda m, folder, **kw: loaded.append(str(folder)) or load(
        m, folder, **kw))
    out = train_here(str(recipe), "--resume")
    assert out.exit_code == 0, out.output
    assert str(checkpoint) in loaded  # --resume loaded them back through the Trainer's load_adapter
    monkeypatch.undo()
    whole = train_here(str(recipe), "--set", f"output.dir={tmp_path / 'whole'}")  # the same run, never stopped
    assert whole.exit_code == 0, whole.output
    from safetensors.torch import load_file

    resumed, straight = (load_file(str(d / "sft" / "adapter" / expert_adapters.EXPERT_FILE)) for d in (
        run, tmp_path / "whole"))
    assert resumed.keys() == straight.keys()
    for key in resumed:  # the resumed run continued from the saved expert adapters and their optimizer state
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-5)
    shape = ModelShape.of(_config(model))
    counted = shape.lora_params(4, "all-linear", experts) - shape.lora_params(4, "all-linear")
    assert f"experts {counted:,}, router 0" in out.output, out.output
    assert "experts: LoRA on 4 fused expert weights (one " in out.output  # the banner's patch record
    adapter = run / "sft" / "adapter"
    assert (adapter / expert_adapters.EXPERT_FILE).exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert expert_adapters.EXPERT_FILE in manifest["adapter_files"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    # ft eval loads the run's stage as trained: its held-out loss is the one the stage measured at its end (which
    # adds the router's load-balancing loss, 0.001 x about 2 here), far from the loss without the expert adapters
    trained = json.loads((run / "sft" / "summary.json").read_text())["metrics"]["eval_loss"]
    scored = {}
    for name, skip in (("as trained", False), ("without expert adapters", True)):
        with monkeypatch.context() as patch:
            if skip:
                patch.setattr(expert_adapters, "load", lambda *a, **k: 0)
            out = runner.invoke(app, ["eval", str(run), "--json"])
        assert out.exit_code == 0, out.output
        scored[name] = json.loads((run / "eval" / "sft.json").read_text())["target"]["heldout"]["loss"]
    assert abs(scored["as trained"] - trained) < 0.005 < 10 * 0.005 < abs(scored["without expert adapters"] - trained)
    # the merged export folds B A into every (dequantized) expert, verified against the trained model
    out = runner.invoke(app, ["export", str(run), "--format", "merged"])
    assert out.exit_code == 0, out.output
    meta = json.loads((run / "export" / "sft-merged" / "export.json").read_text())
    assert meta["verification"]["dequantized"]["mean_kl"] < 1e-4, meta["verification"]
    # the adapter export carries the file, and says peft alone does not load it
    out = runner.invoke(app, ["export", str(run), "--format", "adapter"])
    assert out.exit_code == 0, out.output
    assert (run / "export" / "sft-adapter" / expert_adapters.EXPERT_FILE).exists()
    assert "peft.PeftModel.from_pretrained loads adapter_model.safetensors alone" in " ".join(out.output.split())
    for target in (run, run / "export" / "sft-adapter"):
        out = runner.invoke(app, ["generate", str(target), "--prompt", "What is 3 in words?", "--max-new-tokens", "3"])
        assert out.exit_code == 0, out.output


def _config(folder):
    import transformers

    return transformers.AutoConfig.from_pretrained(str(folder))


def test_ranks_by_routing_follow_the_measured_load_at_the_uniform_count(tmp_path, monkeypatch):
    """`lora.expert_rank: by_routing`: the stage measures the routing of its training rows before training
    (`finetune.eval.routing.expert_load`, recorded here and its shares skewed, so the ranks cannot come out uniform
    by chance), gives each expert its share of the layer's experts x r, trains, and saves those ragged ranks; the
    banner's expert count is uniform rank r's."""
    import finetune.eval.routing as routing

    model = build("qwen3-moe", tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                      "content": a}]}) + "\n"
                            for q, a, _ in task_rows(24)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""name: moe-ranks
model: {{name_or_path: {model}, dtype: float32}}
quantization: {{mode: nf4, compute_dtype: float32, experts: true}}
lora: {{r: 4, alpha: 8, experts: per_expert, expert_rank: by_routing}}
data: {{train: [{{path: {data}}}], max_length: 64}}
training: {{max_steps: 4, micro_batch_size: 8, learning_rate: 2.0e-2, logging_steps: 1, seed: 0}}
output: {{dir: {tmp_path / 'run'}}}
""")
    measured = []
    load = routing.expert_load

    def skewed(m, batches):
        shares = load(m, list(batches))
        measured.append(shares)
        skew = shares * torch.tensor([8.0, 1.0, 1.0, 1.0])
        return skew / skew.sum(-1, keepdim=True)

    monkeypatch.setattr(routing, "expert_load", skewed)
    out = train_here(str(recipe))
    assert out.exit_code == 0, out.output
    assert len(measured) == 1 and measured[0].shape == (2, 4)
    skew = measured[0] * torch.tensor([8.0, 1.0, 1.0, 1.0])
    want = expert_adapters.ranks_by_routing(skew / skew.sum(-1, keepdim=True), 4)
    saved = expert_adapters.saved_ranks(tmp_path / "run" / "sft" / "adapter")
    assert saved == want and all(sum(r) == 16 for r in saved) and any(r != [4, 4, 4, 4] for r in saved), saved
    assert f"expert ranks by routing on 24 training rows (total 4 x experts per layer): layer 0 {want[0]}" in \
        out.output
    shape = ModelShape.of(_config(model))
    assert f"experts {shape.lora_params(4, 'all-linear', 'per_expert') - shape.lora_params(4, 'all-linear'):,}, " \
        "router 0" in out.output
