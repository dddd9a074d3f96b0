"""DPO recipe rules and loss arguments: bad stage lists fail with the message a user needs, before any model load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from finetune.recipe.loading import RecipeError
from finetune.recipe.schema import DPOConfig, load_recipe

DATA = "data: {train: [{path: x}]}\n"


def problems(tmp_path: Path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(DATA + text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    return str(e.value)


def load(tmp_path: Path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(DATA + text)
    return load_recipe(path)


def test_sft_then_dpo_is_valid_and_defaults_to_the_sft_reference(tmp_path):
    r = load(tmp_path, "stages:\n  - {name: sft, kind: sft}\n  - {name: dpo, kind: dpo}\n")
    dpo = r.stages[1]
    assert (dpo.init_from, dpo.dpo.reference, dpo.dpo.loss_type) == ("previous", "sft", "sigmoid")


def test_duplicate_stage_name_is_named(tmp_path):
    msg = problems(tmp_path, "stages:\n  - {name: a, kind: sft}\n  - {name: a, kind: dpo}\n")
    assert "the stage name 'a' is used more than once" in msg


@pytest.mark.parametrize(
    "stages",
    [
        "  - {name: dpo, kind: dpo}\n",  # first stage: nothing before it
        "  - {name: sft, kind: sft}\n  - {name: dpo, kind: dpo, init_from: new}\n",  # fresh adapter
    ],
    ids=["first-stage", "init-new"],
)
def test_sft_reference_without_an_sft_adapter_is_refused(tmp_path, stages):
    msg = problems(tmp_path, "stages:\n" + stages)
    assert "dpo.reference is 'sft' but there is no SFT adapter to start from" in msg
    assert "reference: base" in msg  # says what to do


@pytest.mark.parametrize("extra", ["dpo: {reference: base}", "init_from: some/adapter"])
def test_first_dpo_stage_is_fine_with_base_reference_or_an_adapter_path(tmp_path, extra):
    r = load(tmp_path, f"stages:\n  - {{name: dpo, kind: dpo, {extra}}}\n")
    assert r.stages[0].kind == "dpo"


def test_label_smoothing_needs_the_sigmoid_loss(tmp_path):
    msg = problems(
        tmp_path,
        "stages:\n  - {name: sft, kind: sft}\n"
        "  - {name: dpo, kind: dpo, dpo: {loss_type: ipo, label_smoothing: 0.1}}\n",
    )
    assert "stages[1].dpo.label_smoothing works with loss_type 'sigmoid' only" in msg


def test_dpo_settings_on_an_sft_stage_are_refused(tmp_path):
    msg = problems(tmp_path, "stages:\n  - {name: sft, kind: sft, dpo: {beta: 0.5}}\n")
    assert "stages[0] (sft): the dpo settings apply to dpo stages only" in msg


@pytest.mark.parametrize("name", ["../x", "a/b", "tokenizer", ".hidden"])
def test_stage_name_must_be_a_plain_folder_name(tmp_path, name):
    msg = problems(tmp_path, f"stages:\n  - {{name: '{name}', kind: sft}}\n")
    assert f"stages[0].name: '{name}' must be a plain folder name" in msg


def test_unknown_loss_type_lists_the_choices(tmp_path):
    msg = problems(tmp_path, "stages:\n  - {name: s, kind: sft}\n  - {name: d, kind: dpo, dpo: {loss_type: kto}}\n")
    assert "stages[1].dpo.loss_type" in msg and "sigmoid" in msg and "ipo" in msg and "hinge" in msg


def test_loss_terms_pass_the_loss_type_through():
    from finetune.stages.dpo import loss_terms

    for kind in ("sigmoid", "ipo", "hinge"):
        assert loss_terms(DPOConfig(loss_type=kind)) == {"loss_type": [kind], "loss_weights": [1.0],
                                                          "label_smoothing": 0.0}


def test_nll_weight_adds_the_chosen_nll_term():
    from finetune.stages.dpo import loss_terms

    assert loss_terms(DPOConfig(loss_type="ipo", nll_weight=0.5)) == {
        "loss_type": ["ipo", "sft"], "loss_weights": [1.0, 0.5], "label_smoothing": 0.0}
    terms = loss_terms(DPOConfig(label_smoothing=0.1, nll_weight=1.0))
    assert terms["loss_type"] == ["sigmoid", "robust", "sft"] and terms["loss_weights"][2] == 1.0


def trl_dpo_loss(terms: dict, beta: float, margins):
    """The loss trl's own `DPOTrainer._compute_loss` gives for these loss terms, one pair per margin.

    The trainer object holds only what that method reads: the loss settings, stored reference log-probs
    (`precompute_ref_logps`) and an identity accelerator. Each pair has one completion token; the policy's
    log-probs put the pair's margin on its chosen answer, and the reference's are zero.
    """
    from collections import defaultdict
    from types import SimpleNamespace

    import torch
    from trl import DPOTrainer

    margins = torch.as_tensor(margins, dtype=torch.float64)
    n = len(margins)
    per_token = torch.zeros(2 * n, 1, dtype=torch.float64)
    per_token[:n, 0] = margins  # chosen log-prob = margin, rejected = 0
    trainer = object.__new__(DPOTrainer)
    trainer.__dict__.update(
        beta=beta, loss_types=terms["loss_type"], loss_weights=terms["loss_weights"],
        label_smoothing=terms["label_smoothing"], f_divergence_type="reverse_kl", ld_alpha=None,
        precompute_ref_logps=True, use_weighting=False, aux_loss_enabled=False, _metrics=defaultdict(
            lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t),
        model=SimpleNamespace(training=False))
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token).bool())
    inputs = {"input_ids": torch.zeros(2 * n, 2, dtype=torch.long), "attention_mask": torch.ones(2 * n, 2),
              "completion_mask": torch.tensor([[0, 1]] * (2 * n)),
              "ref_chosen_logps": torch.zeros(n, dtype=torch.float64),
              "ref_rejected_logps": torch.zeros(n, dtype=torch.float64)}
    return DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)


@pytest.mark.parametrize("e", [0.05, 0.2, 0.45])
def test_conservative_dpo_is_rebuilt_exactly_from_trl_losses(e):
    """trl ignores label_smoothing for sigmoid; its loss with our weighted sigmoid + robust pair must be cDPO."""
    import torch
    import torch.nn.functional as F

    from finetune.stages.dpo import loss_terms

    beta = 0.1
    terms = loss_terms(DPOConfig(label_smoothing=e))
    assert terms["loss_type"] == ["sigmoid", "robust"] and terms["label_smoothing"] == e
    for margin in (-60.0, -7.5, 0.0, 3.0, 42.0):
        z = torch.tensor(beta * margin, dtype=torch.float64)
        cdpo = -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)  # the definition of conservative DPO
        assert trl_dpo_loss(terms, beta, [margin]).item() == pytest.approx(cdpo.item(), abs=1e-12), margin
    assert trl_dpo_loss(terms, beta, [0.0]).item() == pytest.approx(math.log(2))  # z = 0: still ln 2
    plain = loss_terms(DPOConfig(label_smoothing=0.0))  # and without smoothing, trl's plain DPO loss
    assert trl_dpo_loss(plain, beta, [5.0]).item() == pytest.approx(-F.logsigmoid(torch.tensor(0.5)).item())
