"""Lean saves (`training.lean_saves`): RMSNorm outputs and gated-MLP activations are recreated in backward instead of
kept; loss and gradients are bit for bit those of the plain model, and the bytes not kept are what the shapes say."""

from __future__ import annotations

import torch
from tinylora import adapted, loss_and_grads

from finetune.model import lean_saves


def _saved_storage_bytes(model, ids) -> int:
    """Bytes of the distinct storages the forward keeps for backward (saved-tensor hooks around the plain model)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def test_same_loss_and_gradients_bit_for_bit(tiny_model):
    ids = torch.randint(3, 100, (2, 48))
    model = adapted(tiny_model)
    plain = loss_and_grads(model, ids)
    line = lean_saves.install(model.get_base_model())
    assert line and "recreated in backward" in line
    lean_saves.lean_counts(reset=True)
    loss, grads = loss_and_grads(model, ids)
    assert lean_saves.lean_counts()["dropped"] > 0
    assert torch.equal(loss, plain[0])
    assert grads.keys() == plain[1].keys() and any("mlp" in n for n in grads) and any("q_proj" in n for n in grads)
    for name, grad in grads.items():
        assert torch.equal(grad, plain[1][name]), name


def test_bytes_not_kept_are_the_norm_outputs_and_mlp_activations(tiny_model):
    """Per token and layer: two norm outputs (hidden) and the MLP's activation and product (intermediate)."""
    ids = torch.randint(3, 100, (1, 64))
    model = adapted(tiny_model)
    cfg = model.config
    plain = _saved_storage_bytes(model, ids)
    lean_saves.install(model.get_base_model())
    lean_saves.lean_counts(reset=True)
    loss_and_grads(model, ids)
    counts = lean_saves.lean_counts()
    per_layer = (2 * cfg.hidden_size + 2 * cfg.intermediate_size) * ids.numel() * 4
    final_norm = cfg.hidden_size * ids.numel() * 4  # the last norm, if the LM head keeps its input
    assert counts["dropped_bytes"] in (cfg.num_hidden_layers * per_layer, cfg.num_hidden_layers * per_layer
                                       + final_norm)
    assert counts["dropped_bytes"] > 0.2 * plain, (counts, plain)  # of everything, the full-vocabulary logits too


def test_in_place_change_after_registration_keeps_the_tensor():
    registry = lean_saves.Registry()
    registry.depth = 1
    x = torch.randn(4, 3, requires_grad=True)
    y = x * 2
    registry.add(y, lambda a: a * 2, x)
    assert isinstance(registry.pack(y), lean_saves._Recreate)
    with torch.no_grad():
        y.add_(1)
    assert registry.pack(y) is y  # changed since registration: kept as autograd keeps it
    z = torch.randn(4, 3)
    assert registry.pack(z) is z  # not registered


def test_recreated_view_has_the_saved_layout():
    registry = lean_saves.Registry()
    registry.depth = 1
    x = torch.randn(2, 6, requires_grad=True)
    y = torch.nn.functional.silu(x)
    registry.add(y, torch.nn.functional.silu, x)
    view = y.view(3, 4).t()
    packed = registry.pack(view)
    assert torch.equal(registry.unpack(packed), view)


def test_lora_dropout_is_not_recreated_and_training_still_matches(tiny_model):
    """With LoRA dropout each branch's input is a fresh tensor (kept as usual); the rest still matches bit for bit."""
    ids = torch.randint(3, 100, (1, 40))
    model = adapted(tiny_model, dropout=0.2)
    plain = loss_and_grads(model, ids)
    lean_saves.install(model.get_base_model())
    loss, grads = loss_and_grads(model, ids)
    assert torch.equal(loss, plain[0])
    for name, grad in grads.items():
        assert torch.equal(grad, plain[1][name]), name


def test_packed_rows_attention_output_is_recreated_too(tiny_model):
    """Padding-free rows through the per-sample attention: o_proj's input is recreated from the kernel's own outputs
    as well; loss and gradients stay bit for bit."""
    from finetune.model.attention import use_padding_free_attention

    lengths = (20, 13, 31)
    ids = torch.randint(3, 100, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    model = adapted(tiny_model)
    assert use_padding_free_attention(model)

    def run():
        out = model(input_ids=ids, labels=ids, position_ids=positions)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out.loss.detach(), grads

    plain_loss, plain_grads = run()
    lean_saves.install(model.get_base_model())
    lean_saves.lean_counts(reset=True)
    loss, grads = run()
    cfg = model.config
    per_layer = (3 * cfg.hidden_size + 2 * cfg.intermediate_size) * ids.numel() * 4  # o_proj's input: one more hidden
    assert lean_saves.lean_counts()["dropped_bytes"] == cfg.num_hidden_layers * per_layer
    assert torch.equal(loss, plain_loss)
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name
