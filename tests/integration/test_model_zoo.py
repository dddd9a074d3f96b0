"""The conformance matrix (issue 29): every model family walks every step a user takes, or is refused up front.

Each family is a tiny random model with its own tokenizer and the family's template quirks
(`scripts/build_fixture_models.py`). Chat families train on the digit-word task in chat rows; base families (no chat
template: GPT-NeoX, GPT-2) train on the same facts as plain text. Steps: `ft validate`, `ft data preview` (the trained
span is exactly the answer and its end-of-turn token; every token for text), SFT (the loss falls), merged export
(verified against the trained model), the adapter export loaded with plain peft (equal to the merged model),
`ft eval --against` the base, `ft generate` (chat, or raw for text runs). The README's family table shows these.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from build_fixture_models import FAMILIES, WORDS, build, build_generic, task_rows, text_rows
from typer.testing import CliRunner

from finetune.cli import app

runner = CliRunner()
# family -> (quantization of its recipe, the end-of-turn token that ends the trained span; None: text, all trained)
MATRIX = {
    "llama3": ("none", "<|eot_id|>"),
    "qwen2.5": ("none", "<|im_end|>"),
    "mistral": ("none", "</s>"),
    "gemma2": ("none", "<end_of_turn>"),
    "gpt-neox": ("none", None),
    "gpt2": ("nf4", None),  # QLoRA: the 4-bit model holds GPT-2's Conv1D weights transposed (the merge's defect)
    "qwen3": ("none", "<|im_end|>"),  # the trained span starts with the template's empty <think></think> block
    "phi3": ("none", "<|end|>"),
    "olmo2": ("none", "<|endoftext|>"),
    "gemma3": ("none", "<end_of_turn>"),
    "qwen3-moe": ("none", "<|im_end|>"),
    "mixtral": ("none", "</s>"),
}
TIMES: dict[str, float] = {}
SFT_STEPS = 40  # about 0.1 s each on these models


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(chat: bool, n: int, offset: int = 0) -> list[dict]:
    if not chat:
        return [{"text": t} for t in text_rows(n, offset)]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a, _ in task_rows(n, offset)]


@pytest.fixture(scope="module", params=list(MATRIX))
def zoo(request, tmp_path_factory) -> dict:
    """A family's model, data and recipe, and its run trained by `ft train` (timed)."""
    family = request.param
    started = time.perf_counter()
    folder = tmp_path_factory.mktemp(family.replace(".", "_"))
    model = build(family, folder / "model")
    chat = FAMILIES[family].chat
    train = _write(folder / "train.jsonl", _rows(chat, 64))
    held = _write(folder / "eval.jsonl", _rows(chat, 8, 3))
    task = _write(folder / "task.jsonl", [{"messages": [{"role": "user", "content": q}], "answer": a}
                                          for q, a, _ in task_rows(8, 5)])
    quant = MATRIX[family][0]
    recipe = folder / "recipe.yaml"
    experts = ", experts: per_expert" if "moe" in family or family == "mixtral" else ""  # LoRA on every expert too
    recipe.write_text(f"""name: zoo-{family}
model: {{name_or_path: {model}, dtype: float32}}
quantization: {{mode: {quant}{', compute_dtype: float32' if quant != 'none' else ''}}}
lora: {{r: 8, alpha: 16{experts}}}
data: {{train: [{{path: {train}}}], eval: [{{path: {held}}}], max_length: 64, task_eval: {task},
        task_eval_max_new_tokens: 4}}
training: {{max_steps: {SFT_STEPS}, micro_batch_size: 8, learning_rate: 2.0e-2, logging_steps: 1, seed: 0}}
output: {{dir: {folder / 'run'}}}
""")
    out = runner.invoke(app, ["train", str(recipe)])
    assert out.exit_code == 0, out.output
    TIMES[family] = time.perf_counter() - started
    return {"family": family, "model": model, "recipe": recipe, "run": folder / "run", "chat": chat,
            "train_output": out.output, "folder": folder, "experts": experts}


def test_validate(zoo):
    out = runner.invoke(app, ["validate", str(zoo["recipe"])])
    assert out.exit_code == 0, out.output
    assert f"# model family: {json.loads((zoo['model'] / 'config.json').read_text())['model_type']}" in out.output


def test_data_preview_trains_exactly_the_answer(zoo):
    out = runner.invoke(app, ["data", "preview", str(zoo["recipe"]), "-n", "1", "--no-color"])
    assert out.exit_code == 0, out.output
    eot = MATRIX[zoo["family"]][1]
    if eot is None:  # text: every token trained, the first sample is one marked span
        sample = next(line for line in out.output.splitlines() if "«" in line)
        assert sample.count("«") == 1 and "The word for" in sample.split("«", 1)[1]
    else:
        spans = re.findall(r"«(.*?)»", out.output, re.S)
        think = re.escape("<think>\n\n</think>\n\n") if zoo["family"] == "qwen3" else ""
        assert len(spans) == 2 and re.fullmatch(f"{think}({'|'.join(WORDS)}){re.escape(eot)}", spans[0]), spans


def test_sft_loss_falls(zoo):
    rows = [json.loads(line) for line in (zoo["run"] / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("stage") == "sft" and "loss" in r]
    assert len(losses) == SFT_STEPS
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses  # from about ln(vocab) at the start, by half a nat


def test_pad_token_is_the_tokenizers_own(zoo):
    """NeoX's <|padding|> and Llama 3's reserved tokens pad; nothing is added, so the adapter holds LoRA only."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    run_tok, base_tok = (AutoTokenizer.from_pretrained(str(p)) for p in (zoo["run"] / "tokenizer", zoo["model"]))
    assert run_tok.pad_token_id is not None and run_tok.pad_token_id != run_tok.eos_token_id
    if zoo["family"] != "gpt2":  # GPT-2 has no token to spare: one is added
        assert len(run_tok) == len(base_tok), run_tok.pad_token
    with safe_open(str(zoo["run"] / "sft" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        full = [k for k in f.keys() if "lora_" not in k]
    assert full == [] or zoo["family"] == "gpt2", full


def test_merged_export_is_verified(zoo):
    out = runner.invoke(app, ["export", str(zoo["run"]), "--format", "merged"])
    assert out.exit_code == 0, out.output
    export = zoo["run"] / "export" / "sft-merged"
    meta = json.loads((export / "export.json").read_text())
    figures = meta["verification"][meta["merge_into"]]
    assert figures["mean_kl"] < 1e-4 and figures["top1_agreement"] == 1.0, figures
    assert meta["text_only"] is not zoo["chat"]  # `ft generate` completes raw text with it by default
    if not zoo["chat"]:  # a text run on a base model ships no chat template the base never had
        assert not (export / "chat_template.jinja").exists()
        assert "chat_template" not in json.loads((export / "tokenizer_config.json").read_text())


def test_adapter_export_loads_with_plain_peft(zoo):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = runner.invoke(app, ["export", str(zoo["run"]), "--format", "adapter"])
    assert out.exit_code == 0, out.output
    export = zoo["run"] / "export" / "sft-adapter"
    tok = AutoTokenizer.from_pretrained(str(export))
    base = AutoModelForCausalLM.from_pretrained(str(zoo["model"]), dtype=torch.float32)
    if len(tok) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, str(export)).eval()
    ids = tok("The word for 5 is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        tuned, plain = model(ids).logits, model.get_base_model()(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert (tuned - plain).abs().max() > 1e-3  # the adapter is on, and it changes the model


def test_eval_against_the_base(zoo):
    out = runner.invoke(app, ["eval", str(zoo["run"]), "--against", str(zoo["model"])])
    assert out.exit_code == 0, out.output
    result = json.loads((zoo["run"] / "eval" / "sft.json").read_text())
    tuned, base = result["target"]["heldout"], result["against"]["heldout"]
    kind = "chat" if zoo["chat"] else "text"
    assert tuned["rows"][kind] == 8 and base["rows"][kind] == 8  # text rows are scored too, not dropped
    assert tuned["loss"] < base["loss"]
    for side in ("target", "against"):  # greedy answers of both, in batches padded with each one's pad token
        assert result[side]["tasks"][str(zoo["folder"] / "task.jsonl")]["rows"] == 8


def test_generate_chat_and_raw(zoo):
    """Chat runs answer through the template by default and complete raw text with --raw; text runs complete raw
    text by default (they never saw a template) and, without one, refuse --chat saying what to do."""
    prompt = "What is 5 in words?" if zoo["chat"] else "The word for 5 is"
    out = runner.invoke(app, ["generate", str(zoo["run"]), "--prompt", prompt, "--max-new-tokens", "4"])
    assert out.exit_code == 0, out.output
    assert ("through the chat template" if zoo["chat"] else "raw completion") in out.output
    other = runner.invoke(app, ["generate", str(zoo["run"]), "--prompt", prompt, "--max-new-tokens", "4",
                                "--chat" if not zoo["chat"] else "--raw"])
    if zoo["chat"]:
        assert other.exit_code == 0 and "raw completion" in other.output, other.output
    else:
        assert other.exit_code == 1 and "no chat template to answer through; use --raw" in other.output


def test_dpo_moves_the_rewards_the_preferred_way(zoo):
    """DPO from the SFT adapter (chat families; a text run has no pairs): held-out margins start at 0 and grow; the
    same `lora` section as the adapter's (MoE: LoRA on every expert) is not reported as ignored."""
    if not zoo["chat"]:
        pytest.skip("a base family trains on text; DPO needs chat pairs")
    folder = zoo["folder"]
    # preferred: the word; rejected: a refusal (learnable without reading the digit, which these models barely do)
    pairs = [{"prompt": q, "chosen": a, "rejected": "I cannot say."} for q, a, _ in task_rows(40)]
    train, held = _write(folder / "pairs.jsonl", pairs[:32]), _write(folder / "pairs_eval.jsonl", pairs[32:])
    recipe = folder / "dpo.yaml"
    recipe.write_text(f"""name: zoo-dpo
model: {{name_or_path: {zoo['model']}, dtype: float32}}
quantization: {{mode: none}}
lora: {{r: 8, alpha: 16{zoo['experts']}}}
data: {{train: [{{path: {train}}}], eval: [{{path: {held}}}], max_length: 64}}
training: {{max_steps: 30, micro_batch_size: 8, learning_rate: 1.0e-2, logging_steps: 1, seed: 0}}
stages: [{{name: dpo, kind: dpo, init_from: {zoo['run'] / 'sft' / 'adapter'}}}]
output: {{dir: {folder / 'dpo-run'}}}
""")
    out = runner.invoke(app, ["train", str(recipe)])
    assert out.exit_code == 0, out.output
    assert "lora keys are ignored" not in out.output, out.output  # the recipe's lora is the adapter's own
    m = json.loads((folder / "dpo-run" / "dpo" / "summary.json").read_text())["metrics"]
    assert abs(m["eval_before"]["rewards/margins"]) < 1e-5
    assert m["eval_after"]["rewards/margins"] > 0.05 and m["eval_after"]["rewards/accuracies"] >= 0.75, m


# GGUF verified by llama.cpp; the rest is refused by `ft validate`, then by `ft export`
GGUF = {"llama3", "qwen2.5", "mistral", "gemma2", "gemma3", "qwen3", "phi3", "olmo2", "qwen3-moe", "mixtral"}


def test_gguf_export_verified_by_llama_cpp_or_refused_up_front(zoo):
    validated = runner.invoke(app, ["validate", str(zoo["recipe"])]).output
    refused = [line for line in validated.splitlines() if "ft export --format gguf: refused" in line]
    if zoo["family"] not in GGUF:
        why = "this toolkit does not write the"
        assert len(refused) == 1 and why in refused[0] and "instead: " in refused[0], validated
        out = runner.invoke(app, ["export", str(zoo["run"]), "--format", "gguf"])
        assert out.exit_code == 1 and out.output.count("\n") == 1 and "Traceback" not in out.output, out.output
        return
    pytest.importorskip("llama_cpp", reason="GGUF verification needs llama-cpp-python (the gguf extra)")
    assert refused == []
    out = runner.invoke(app, ["export", str(zoo["run"]), "--format", "gguf"])
    assert out.exit_code == 0, out.output
    meta = json.loads((zoo["run"] / "export" / "sft-gguf-f16" / "export.json").read_text())
    figures = meta["verification"]["llama.cpp"]
    assert figures["mean_kl"] < 1e-5 and figures["top1_agreement"] == 1.0, figures
    # an Ollama Modelfile where the template wraps each message on its own (a default system prompt, Qwen2.5's,
    # becomes its SYSTEM); none where it refuses a system message (Mistral, Gemma) or renders the last answer
    # otherwise (Qwen3's <think> block)
    untranslated = ("mistral", "gemma2", "gemma3", "qwen3", "mixtral")
    assert (meta["gguf"]["modelfile"] is None) == (zoo["family"] in untranslated), meta["gguf"]
    if zoo["family"] == "qwen2.5":
        assert 'SYSTEM """You are Qwen' in (zoo["run"] / "export" / "sft-gguf-f16" / "Modelfile").read_text()


def test_matrix_time_is_reported(zoo):
    print(f"\n[zoo] {zoo['family']}: model, data and training {TIMES[zoo['family']]:.1f} s")


@pytest.mark.parametrize("model_type", ["starcoder2", "granite"])
def test_a_family_built_generically_from_its_config_class(model_type, tmp_path):
    """A family this matrix does not list, made by `AutoConfig.for_model`: named by `ft validate`, trained, merged
    and verified like the listed ones (or refused up front: GGUF does not know it)."""
    model = build_generic(model_type, tmp_path / "model")
    data = _write(tmp_path / "train.jsonl", _rows(True, 32))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""name: zoo-{model_type}
model: {{name_or_path: {model}, dtype: float32}}
quantization: {{mode: none}}
lora: {{r: 8, alpha: 16}}
data: {{train: [{{path: {data}}}], max_length: 64}}
training: {{max_steps: 20, micro_batch_size: 8, learning_rate: 2.0e-2, logging_steps: 1, seed: 0}}
output: {{dir: {tmp_path / 'run'}}}
""")
    validated = runner.invoke(app, ["validate", str(recipe)])
    assert validated.exit_code == 0 and f"# model family: {model_type}" in validated.output
    assert f"ft export --format gguf: refused, this toolkit does not write the '{model_type}'" in validated.output
    out = runner.invoke(app, ["train", str(recipe)])
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    out = runner.invoke(app, ["export", str(tmp_path / "run"), "--format", "merged"])
    assert out.exit_code == 0, out.output
    meta = json.loads((tmp_path / "run" / "export" / "sft-merged" / "export.json").read_text())
    assert meta["verification"]["original"]["mean_kl"] < 1e-4


def test_qlora_moe_with_expert_adapters_merges_either_way(tmp_path):
    """QLoRA on Qwen3-MoE with LoRA on every expert and the router (`lora.experts: per_expert`, `lora.router`): it
    trains; the default merge (into the weights training ran: dequantized attention, the experts as loaded) is verified
    like a dense one, and `--merge-into original` too (its KL is the 4-bit error of the attention layers)."""
    model = build("qwen3-moe", tmp_path / "model")
    data = _write(tmp_path / "train.jsonl", _rows(True, 32))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""name: zoo-moe-qlora
model: {{name_or_path: {model}, dtype: float32}}
quantization: {{mode: nf4, compute_dtype: float32}}
lora: {{r: 8, alpha: 16, experts: per_expert, router: true}}
data: {{train: [{{path: {data}}}], max_length: 64}}
training: {{max_steps: 4, micro_batch_size: 8, learning_rate: 2.0e-2, logging_steps: 1, seed: 0}}
output: {{dir: {tmp_path / 'run'}}}
""")
    validated = runner.invoke(app, ["validate", str(recipe)]).output
    assert ": refused," not in validated, validated  # the merge is made, and GGUF written (test_moe_gguf.py)
    out = runner.invoke(app, ["train", str(recipe)])
    assert out.exit_code == 0, out.output
    assert re.search(r"attention [1-9][\d,]*, dense MLP 0, experts [1-9][\d,]*, router [1-9]", out.output), out.output
    out = runner.invoke(app, ["export", str(tmp_path / "run"), "--format", "merged"])
    assert out.exit_code == 0, out.output
    meta = json.loads((tmp_path / "run" / "export" / "sft-merged" / "export.json").read_text())
    assert meta["verification"]["dequantized"]["mean_kl"] < 1e-4, meta["verification"]
    card = (tmp_path / "run" / "export" / "sft-merged" / "README.md").read_text()
    assert "4-bit base (QLoRA, the experts unquantized: bitsandbytes quantizes linear layers only)" in card
    out = runner.invoke(app, ["export", str(tmp_path / "run"), "--format", "merged", "--merge-into", "original",
                              "--overwrite"])
    assert out.exit_code == 0, out.output
    meta = json.loads((tmp_path / "run" / "export" / "sft-merged" / "export.json").read_text())
    assert meta["verification"]["original"]["mean_kl"] < 0.01
