"""The recipe's `kernels:` switches make a real SFT (and DPO) stage run the fused ops, as often as the model's shape
says.

Each op is counted where it runs: the `apply` (forward) and `backward` of its autograd.Function in
`finetune.kernels`, wrapped for the test. The model's own passes are counted beside them with module-level forward
hooks on the decoder layers and the backbone, split by whether autograd was recording (training micro-steps) or not.
On CPU the ops take their PyTorch path; which backend runs inside an op is `tests/unit/kernels`' business, except for
the loss: the `fused_ce` tests run the chunked cross-entropy's Triton row kernels through the Triton interpreter
(`TRITON_INTERPRET=1`, as in `tests/unit/kernels/conftest.py`) and count their launches too.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app

# before anything builds the kernels (as tests/unit/kernels/conftest.py does)
if importlib.util.find_spec("triton") is not None:
    os.environ["TRITON_INTERPRET"] = "1"
    importlib.import_module("finetune.kernels.cross_entropy_triton")
from finetune.kernels.cross_entropy import ChunkedNLLFunction
from finetune.kernels.lora_linear import LoRALinearFunction
from finetune.kernels.lora_mlp import LoRAMLPFunction
from finetune.kernels.lora_qkvo import LoRASharedInputFunction
from finetune.kernels.rmsnorm import RMSNormFunction
from finetune.kernels.rope import RopeFunction

LAYERS = 2  # the tiny fixture model (tests/tinymodels.py)
STEPS = 3
ACCUMULATION = 2
MICRO_STEPS = STEPS * ACCUMULATION
OPS = {
    "lora_mlp": LoRAMLPFunction,
    "lora_qkvo": LoRASharedInputFunction,
    "lora_linear": LoRALinearFunction,
    "rmsnorm": RMSNormFunction,
    "rope": RopeFunction,
}


@contextmanager
def counting(monkeypatch):
    """Counts forward/backward calls of every fused op and the model's passes while the block runs."""
    calls: Counter = Counter()

    def count_forward(name, original):
        def apply(cls, *args, **kwargs):
            calls[name, "forward"] += 1
            return original(*args, **kwargs)
        return classmethod(apply)

    def count_backward(name, original):
        def backward(ctx, *grads):
            calls[name, "backward"] += 1
            return original(ctx, *grads)
        return staticmethod(backward)

    from trl.kernels import ChunkedLogProbFunction

    from finetune.kernels import cross_entropy_triton

    ops = {**OPS, "fused_ce": ChunkedNLLFunction, "trl_logprob": ChunkedLogProbFunction}
    for name, fn in ops.items():
        monkeypatch.setattr(fn, "apply", count_forward(name, fn.apply))
        monkeypatch.setattr(fn, "backward", count_backward(name, fn.backward))
    # the Triton row kernels of the chunked cross-entropy (imported by its autograd.Function at call time)
    for name in ("lse_and_nll", "nll_grad_"):
        launch = getattr(cross_entropy_triton, name)
        monkeypatch.setattr(cross_entropy_triton, name,
                            lambda *a, _n=name, _f=launch, **k: (calls.update([(_n, "launch")]), _f(*a, **k))[1])

    def count_pass(module, args):
        kind = type(module).__name__
        if kind in ("LlamaDecoderLayer", "LlamaModel"):
            calls[kind, "grad" if torch.is_grad_enabled() else "no_grad"] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count_pass)
    try:
        yield calls
    finally:
        handle.remove()


def train_with_kernels(tiny_model, addition_data, tmp_path, monkeypatch, kernels: dict[str, bool]) -> Counter:
    recipe = tmp_path / "recipe.yaml"
    switches = ", ".join(f"{k}: {str(v).lower()}" for k, v in kernels.items())
    recipe.write_text(
        f"""
name: kernels
model: {{name_or_path: {tiny_model}, dtype: float32}}
quantization: {{mode: nf4, compute_dtype: float32}}
lora: {{r: 8, alpha: 16}}
data: {{train: [{{path: {addition_data['train']}}}], max_length: 64}}
training: {{max_steps: {STEPS}, gradient_accumulation_steps: {ACCUMULATION}, micro_batch_size: 4,
           learning_rate: 1.0e-2, logging_steps: 1}}
kernels: {{{switches}}}
output: {{dir: {tmp_path / 'run'}}}
"""
    )
    with counting(monkeypatch) as calls:
        out = CliRunner().invoke(app, ["train", str(recipe)])
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    return calls


ALL_ON = dict.fromkeys(("lora_linear", "lora_mlp", "lora_qkvo", "fused_ce", "rmsnorm", "rope"), True)


def test_every_switched_on_kernel_runs_once_per_layer_per_micro_step(tiny_model, addition_data, tmp_path,
                                                                      monkeypatch):
    calls = train_with_kernels(tiny_model, addition_data, tmp_path, monkeypatch, ALL_ON)
    # the model itself: one pass of the backbone and each decoder layer per micro-step, with autograd recording
    assert calls["LlamaModel", "grad"] == MICRO_STEPS
    assert calls["LlamaDecoderLayer", "grad"] == LAYERS * MICRO_STEPS
    passes = calls["LlamaModel", "grad"] + calls["LlamaModel", "no_grad"]  # no_grad: e.g. the held-out metrics
    assert calls["LlamaDecoderLayer", "grad"] + calls["LlamaDecoderLayer", "no_grad"] == LAYERS * passes
    # Per backbone pass: each decoder layer runs one fused MLP, one fused Q/K/V, one RoPE, its o_proj through the
    # fused LoRA linear and two norms; then the final norm. Q/K/V/gate/up/down never reach the per-projection op.
    per_pass = {"lora_mlp": LAYERS, "lora_qkvo": LAYERS, "rope": LAYERS, "lora_linear": LAYERS,
                "rmsnorm": 2 * LAYERS + 1}
    expected = {op: n * passes for op, n in per_pass.items()}
    # lean saves (`training.lean_saves`, on by default) do not keep a layer's two norm outputs: backward recreates
    # each once per micro-step through the same kernel
    expected["rmsnorm"] += 2 * LAYERS * MICRO_STEPS
    assert {op: calls[op, "forward"] for op in OPS} == expected
    # and each is differentiated once per training pass (nothing fell back to autograd through plain torch ops),
    # except the first norm: its input is the frozen embeddings' output, so autograd has nothing to send back there
    differentiated = {**per_pass, "rmsnorm": 2 * LAYERS}
    assert {op: calls[op, "backward"] for op in OPS} == {op: n * MICRO_STEPS for op, n in differentiated.items()}


@pytest.fixture
def interpreted_triton(monkeypatch):
    """The chunked cross-entropy's Triton kernels, built for the interpreter, forced for the ops of this test."""
    pytest.importorskip("triton")
    from finetune.kernels._dispatch import kernel_interpreted

    module = importlib.import_module("finetune.kernels.cross_entropy_triton")
    if not kernel_interpreted(module._lse_nll_kernel):
        pytest.skip("the Triton kernels were built for a GPU in this process; run this test in its own process")
    monkeypatch.setenv("FINETUNE_KERNELS_BACKEND", "triton")


def test_fused_ce_computes_the_sft_loss(tiny_model, addition_data, tmp_path, monkeypatch, interpreted_triton):
    calls = train_with_kernels(tiny_model, addition_data, tmp_path, monkeypatch, {"fused_ce": True})
    # one chunked loss per training micro-step (plus one per no-grad pass), differentiated once per micro-step, each
    # running its Triton row kernels: the logsumexp pass, and the frozen head's gradient formed in that same pass
    passes = calls["LlamaModel", "grad"] + calls["LlamaModel", "no_grad"]
    assert calls["LlamaModel", "grad"] == MICRO_STEPS
    assert calls["fused_ce", "forward"] == passes and calls["fused_ce", "backward"] == MICRO_STEPS
    assert calls["lse_and_nll", "launch"] >= passes and calls["nll_grad_", "launch"] >= MICRO_STEPS
    assert calls["trl_logprob", "forward"] == 0  # trl's fused head never computed the loss instead


def train_dpo(tiny_model, tmp_path, monkeypatch, kernels: dict[str, bool]) -> tuple[Counter, str]:
    from test_dpo_pipeline import write_pairs

    recipe = tmp_path / "dpo.yaml"
    switches = ", ".join(f"{k}: {str(v).lower()}" for k, v in kernels.items())
    recipe.write_text(f"""
name: kernels-dpo
model: {{name_or_path: {tiny_model}, dtype: float32}}
quantization: {{mode: nf4, compute_dtype: float32}}
lora: {{r: 8, alpha: 16}}
data: {{train: [{{path: {write_pairs(tmp_path / 'pairs.jsonl', 16)}}}], max_length: 64}}
training: {{max_steps: {STEPS}, gradient_accumulation_steps: {ACCUMULATION}, micro_batch_size: 2,
           learning_rate: 5.0e-3, logging_steps: 1}}
stages: [{{name: dpo, kind: dpo, dpo: {{beta: 0.1, reference: base}}}}]
kernels: {{{switches}}}
output: {{dir: {tmp_path / 'run'}}}
""")
    with counting(monkeypatch) as calls:
        out = CliRunner().invoke(app, ["train", str(recipe)])
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r and "rewards/margins" in r]
    assert len(train_rows) == STEPS and all(torch.isfinite(torch.tensor([r["loss"] for r in train_rows])))
    # trl's logged metrics come from the head's per-token outputs (entropy, mean logits, top-1)
    assert all(k in train_rows[-1] for k in ("entropy", "logits/chosen", "mean_token_accuracy")), train_rows[-1]
    return calls, out.output


def test_fused_ce_computes_the_dpo_log_probs(tiny_model, tmp_path, monkeypatch, interpreted_triton):
    calls, output = train_dpo(tiny_model, tmp_path, monkeypatch, {"fused_ce": True})
    # the policy's chosen+rejected log-probs: one chunked pass per training micro-step, differentiated once each; the
    # reference's log-probs (adapter off, no grad) go through the same head
    assert calls["LlamaModel", "grad"] == MICRO_STEPS
    assert calls["fused_ce", "backward"] == MICRO_STEPS
    assert calls["fused_ce", "forward"] == calls["LlamaModel", "grad"] + calls["LlamaModel", "no_grad"]
    assert calls["lse_and_nll", "launch"] >= calls["fused_ce", "forward"]
    assert calls["trl_logprob", "forward"] == 0
    assert "fused_ce" in output


def test_dpo_without_fused_ce_keeps_trls_kernel(tiny_model, tmp_path, monkeypatch):
    calls, _ = train_dpo(tiny_model, tmp_path, monkeypatch, {"fused_ce": False})
    assert calls["fused_ce", "forward"] == 0
    assert calls["trl_logprob", "forward"] == calls["LlamaModel", "grad"] + calls["LlamaModel", "no_grad"] > 0


def test_switched_off_kernels_do_not_run(tiny_model, addition_data, tmp_path, monkeypatch):
    on = {"lora_mlp": True, "rope": True}
    calls = train_with_kernels(tiny_model, addition_data, tmp_path, monkeypatch,
                               {k: k in on for k in ALL_ON})
    layer_passes = calls["LlamaDecoderLayer", "grad"] + calls["LlamaDecoderLayer", "no_grad"]
    assert calls["LlamaDecoderLayer", "grad"] == LAYERS * MICRO_STEPS
    assert {op: calls[op, "forward"] for op in OPS} == {
        "lora_mlp": layer_passes, "rope": layer_passes, "lora_qkvo": 0, "lora_linear": 0, "rmsnorm": 0}
    # the SFT stage's loss head always computes its loss with the chunked CE (the `fused_ce` switch moves DPO's head
    # onto it as well): once per pass, whatever the switch
    assert calls["fused_ce", "forward"] == layer_passes // LAYERS
