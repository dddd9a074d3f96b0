"""finetune's own expert adapters (issue 30, `finetune/model/expert_adapters.py`): `lora.experts: shared` and
`per_expert` on 4-bit or plain experts, ranks by routing. Each forward and backward against a reference: transformers'
own experts forward on the (dequantized) weights with the update B A added to every expert explicitly. Tiny Qwen3-MoE
and Mixtral from `scripts/build_fixture_models.py`."""

from __future__ import annotations

import copy

import pytest
import torch
from tinylora import frozen

from finetune.model import expert_adapters
from finetune.model.adapters import attach, trainable_groups
from finetune.model.families import traits
from finetune.model.moe_experts import NF4Experts, quantize_experts
from finetune.recipe.schema import LoraConfig
from finetune.stages.memory import ModelShape


def _adapted(folder, experts: str, nf4: bool, ranks=None):
    """(the model with our expert adapters, a plain reference copy of its base weights, 4-bit ones dequantized)."""
    base = frozen(folder)
    reference = copy.deepcopy(base)
    if nf4:
        quantize_experts(base, traits(base.config.model_type).expert_parameters, torch.float32)
        with torch.no_grad():
            for name, module in base.named_modules():
                if isinstance(module, NF4Experts):
                    reference.get_parameter(name).copy_(module.dequantize())
    lora = LoraConfig(r=4, alpha=8, experts=experts, expert_rank="by_routing" if ranks else "uniform")
    model = attach(base, lora, expert_ranks=ranks)  # peft's attention adapters start at zero: the reference's
    with torch.no_grad():  # an update that is not zero, so that the checks can fail
        for name, p in model.named_parameters():
            if ".expert_lora." in name and ".B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    return model, reference


def _with_deltas(model, reference, ids):
    """The reference's logits with every expert weight replaced by weight + B A (the adapters' own tensors, so the
    gradient reaches them), through transformers' own experts forward."""
    params = {key: reference.get_parameter(key) + lora.delta() for key, lora in expert_adapters.held(model).items()}
    assert params
    return torch.func.functional_call(reference, params, (ids,)).logits


@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
@pytest.mark.parametrize("experts,nf4", [("shared", True), ("shared", False), ("per_expert", True)])
def test_expert_adapters_equal_the_weights_with_the_update_added(moe, family, experts, nf4):
    """Logits and the gradients of every adapter weight equal the reference's, where B A is added to each
    (dequantized) expert weight; the update is not zero (B random here), so the check can fail. With peft's
    `disable_adapter` the model is the base again."""
    model, reference = _adapted(moe[family], experts, nf4)
    held = expert_adapters.held(model)
    assert len(held) == 4 and all(lora.shared == (experts == "shared") for lora in held.values())
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = model(input_ids=ids).logits
    ours.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if ".expert_lora." in n}
    model.zero_grad()
    ref = _with_deltas(model, reference, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    ref.square().mean().backward()
    assert len(grads) == 8
    for name, p in model.named_parameters():
        if name in grads:
            assert grads[name].abs().sum() > 0, name
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the update changes the model; peft's disable_adapter switches ours off too
        plain = reference(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, ours)
    assert (ours - plain).abs().max() > 1e-3
    torch.testing.assert_close(off, plain, rtol=1e-5, atol=1e-5)


def test_per_expert_ranks_by_routing_are_ragged_and_exact(moe):
    """Ragged ranks (one A [r_e, in], B [out, r_e] per expert): the forward and gradients equal the reference, and
    the trainable parameters are exactly the ranks' (the same as uniform rank 4 when the ranks sum to 4 x experts)."""
    ranks = [[7, 5, 3, 1], [1, 2, 6, 7]]
    model, reference = _adapted(moe["qwen3-moe"], "per_expert", True, ranks=ranks)
    lora = expert_adapters.held(model)["model.layers.1.mlp.experts.down_proj"]
    assert [a.shape[0] for a in lora.A] == ranks[1] and [b.shape[1] for b in lora.B] == ranks[1]
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, _with_deltas(model, reference, ids), rtol=1e-5, atol=1e-5)
    shape = ModelShape.of(model.config)
    uniform = attach(frozen(moe["qwen3-moe"]), LoraConfig(r=4, experts="per_expert"))
    assert trainable_groups(model)["experts"] == trainable_groups(uniform)["experts"] == (
        shape.lora_params(4, "all-linear", "per_expert") - shape.lora_params(4, "all-linear"))


@pytest.mark.parametrize("experts", ["shared", "per_expert"])
def test_trainable_groups_count_the_expert_adapters_as_the_estimate_does(moe, experts):
    model, _ = _adapted(moe["mixtral"], experts, True)
    shape = ModelShape.of(model.config)
    groups = trainable_groups(model)
    assert groups["experts"] == shape.lora_params(4, "all-linear", experts) - shape.lora_params(4, "all-linear") > 0
    h, ei = shape.hidden, shape.expert_intermediate
    assert groups["experts"] == shape.moe_layers * 4 * (2 * h + 3 * ei) * (1 if experts == "shared" else 4)
    assert groups["router"] == 0 and groups["attention"] > 0


def test_saved_and_loaded_again(moe, tmp_path):
    """save_pretrained writes expert_adapter.safetensors beside peft's files; `load_trained` on a fresh base gives
    the same logits, the adapters frozen unless asked trainable; a base without them gets 0 from `load`."""
    from finetune.model.adapters import load_trained

    model, _ = _adapted(moe["qwen3-moe"], "shared", True)
    model.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / expert_adapters.EXPERT_FILE).exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    base = frozen(moe["qwen3-moe"])
    quantize_experts(base, traits("qwen3_moe").expert_parameters, torch.float32)
    again = load_trained(base, tmp_path / "adapter")
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not any(p.requires_grad for n, p in again.named_parameters() if ".expert_lora." in n)
    trainable = load_trained(_quantized(moe["qwen3-moe"]), tmp_path / "adapter", trainable=True)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if ".expert_lora." in n)
    assert expert_adapters.load(frozen(moe["qwen3-moe"]), tmp_path / "none") == 0


def _quantized(folder):
    base = frozen(folder)
    quantize_experts(base, traits(base.config.model_type).expert_parameters, torch.float32)
    return base


def test_ranks_by_routing_keep_the_uniform_budget():
    shares = torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    ranks = expert_adapters.ranks_by_routing(shares, 8)
    assert [sum(r) for r in ranks] == [32, 32, 32]
    assert ranks[1] == [8, 8, 8, 8] and min(min(r) for r in ranks) >= 1
    assert ranks[0][0] > ranks[0][1] > ranks[0][2] and ranks[2] == [29, 1, 1, 1]


@pytest.mark.parametrize("experts", ["shared", "per_expert"])
def test_only_the_expert_adapters_train_and_the_loss_falls(moe, experts):
    """A tiny training run on 4-bit experts where the expert adapters are the only trainable weights (peft's
    attention adapters frozen): AdamW on a fixed batch lowers the loss; the gradients reach the 4-bit model's
    adapters, which peft's raw-parameter LoRA cannot give a 4-bit weight."""
    model = attach(_quantized(moe["mixtral"]), LoraConfig(r=4, alpha=8, experts=experts))
    for name, p in model.named_parameters():
        p.requires_grad_(".expert_lora." in name)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and sum(p.numel() for p in params) == trainable_groups(model)["experts"]
    ids = torch.randint(5, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(params, lr=2e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_the_export_names_the_same_file():
    from finetune.export import exports

    assert exports.EXPERT_FILE == expert_adapters.EXPERT_FILE


def test_a_later_stage_starts_from_the_saved_expert_adapters(moe, tmp_path, capsys):
    """`attach(init_from=...)` (the next stage of a run) loads peft's adapter and ours, trainable, with the same
    logits; a recipe asking for another expert policy is told that the saved adapter's is kept."""
    model, _ = _adapted(moe["mixtral"], "shared", True)
    model.save_pretrained(str(tmp_path / "adapter"))
    lora = LoraConfig(r=4, alpha=8, experts="shared")
    later = attach(_quantized(moe["mixtral"]), lora, init_from=tmp_path / "adapter", stage="sft2")
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(later(input_ids=ids).logits, model(input_ids=ids).logits)
    assert trainable_groups(later)["experts"] == trainable_groups(model)["experts"] > 0
    assert "lora keys are ignored" not in capsys.readouterr().out
    attach(_quantized(moe["mixtral"]), LoraConfig(r=4, alpha=8, experts="per_expert"), init_from=tmp_path /
           "adapter", stage="sft2")
    assert "lora.experts: 'per_expert' -> finetune's expert adapters: shared" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["dequantized", "original"])
def test_both_merges_fold_the_update_into_every_expert(moe, tmp_path, mode):
    """A plain transformers model loaded with the merged weights gives the adapted model's logits: the merge into the
    weights training ran (4-bit experts dequantized) against the model with 4-bit experts, the merge into the original
    weights (`--merge-into original`: the base loaded again in float32) against plain experts."""
    from transformers import AutoModelForCausalLM

    from finetune.export.merge import _dequantized_merge, _original_merge, plain_config, plain_keys
    from finetune.recipe.schema import Recipe

    model, reference = _adapted(moe["qwen3-moe"], "shared", nf4=mode == "dequantized")
    model.save_pretrained(str(tmp_path / "adapter"))
    keys, _ = plain_keys(plain_config(model))
    if mode == "dequantized":
        state = _dequantized_merge(model, keys, torch.float32)
    else:
        recipe = Recipe(model={"name_or_path": str(moe["qwen3-moe"]), "dtype": "float32"},
                        data={"train": [{"path": "x.jsonl"}]}, lora={"r": 4, "alpha": 8, "experts": "shared"})
        state = _original_merge(recipe, tmp_path / "adapter", None, keys, torch.float32)
    key = "model.layers.1.mlp.experts.down_proj"
    assert not torch.allclose(state[key], reference.get_parameter(key))  # the update is in
    plain = AutoModelForCausalLM.from_config(plain_config(model))
    plain.load_state_dict(state)
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
