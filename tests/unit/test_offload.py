"""Activation offload (`training.offload_activations`): the tensors a training forward saves go through our
hooks (moved off the device and back), loss and gradients stay the same, nothing moves in no-grad forwards; on a
machine without CUDA the patch records that it did nothing."""

from __future__ import annotations

import torch
from tinylora import adapted, loss_and_grads

from finetune.model import offload


def test_offloaded_training_step_equals_the_plain_one(tiny_model):
    ids = torch.randint(3, 100, (2, 48))
    for checkpointing in (False, True):
        model = adapted(tiny_model, checkpointing=checkpointing)
        loss, grads = loss_and_grads(model, ids)
        offload.install(model.get_base_model(), devices=("cpu",))  # copy CPU tensors too: the wiring, proven here
        offload.offloaded_bytes(reset=True)
        loss_o, grads_o = loss_and_grads(model, ids)  # the same up to float rounding (a copy may be laid out otherwise)
        moved = offload.offloaded_bytes(reset=True)
        assert moved.get("tensors", 0) > 0 and moved["bytes"] > 0
        torch.testing.assert_close(loss_o, loss, rtol=0, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(grads_o[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
        with torch.no_grad():
            model(input_ids=ids)
        assert offload.offloaded_bytes() == {}


def test_with_checkpointing_only_the_layer_inputs_are_moved(tiny_model):
    """Checkpointed: the saved tensors that reach our hooks are each layer's input (hidden x tokens), not the layers'
    internals, so far less moves than without checkpointing."""
    ids = torch.randint(3, 100, (1, 64))
    moved = {}
    for checkpointing in (False, True):
        model = adapted(tiny_model, checkpointing=checkpointing)
        offload.install(model.get_base_model(), devices=("cpu",))
        offload.offloaded_bytes(reset=True)
        loss_and_grads(model, ids)
        moved[checkpointing] = offload.offloaded_bytes(reset=True)["bytes"]
    assert moved[True] < moved[False] / 3, moved


def test_patch_records_no_effect_without_cuda(tiny_model, monkeypatch):
    from finetune.model.patches import applied, apply_patches
    from finetune.recipe.schema import Recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = adapted(tiny_model)
    recipe = Recipe.model_validate({"model": {"name_or_path": str(tiny_model)}, "data": {"train": [{"path": "x"}]},
                                    "training": {"offload_activations": True}})
    apply_patches(model, recipe, "sft", "trl", padding_free=False)
    assert any(line.startswith("offload: not applied: no CUDA device") for line in applied(model))
