"""Export end to end on a tiny QLoRA run: both merge modes with their verification figures, plain loading of the
merged folder and of the adapter, the model card, the upload at the end of `ft train`, and `ft generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import FinetuneError
from finetune.export.exports import export_adapter, export_merged
from finetune.export.runstage import open_run

FAKE_TOKEN = "hf_" + "x" * 34  # shaped like a real token: must never appear in output or files


@pytest.fixture(scope="module")
def hub_calls() -> list[tuple[str, dict]]:
    return []


@pytest.fixture(scope="module")
def qlora_run(tiny_model, addition_data, tmp_path_factory, hub_calls) -> Path:
    """A finished NF4 QLoRA run whose recipe asks for an upload (recorded at the HfApi boundary), then an adapter
    made non-trivial (random lora_B) so that merge figures mean something.

    The adapter is stored in float32: trl trains QLoRA adapters in bfloat16, and the trained model then runs its
    LoRA branch in bfloat16, whose rounding would blur the figures of the merge itself (that dtype restoration is
    tested in tests/unit/test_export_merge.py)."""
    from huggingface_hub import HfApi

    from finetune import train

    out = tmp_path_factory.mktemp("qlora")
    (out / "recipe.yaml").write_text(f"""
name: export-test
model: {{name_or_path: {tiny_model}, dtype: float32}}
quantization: {{mode: nf4, double_quant: true, compute_dtype: float32}}
lora: {{r: 8, alpha: 16}}
data:
  train: [{{path: {addition_data['train']}}}]
  eval: [{{path: {addition_data['eval']}}}]
  max_length: 64
training: {{max_steps: 3, micro_batch_size: 8, learning_rate: 1.0e-2, logging_steps: 1, seed: 1}}
output: {{dir: {out / 'run'}}}
hub: {{repo_id: someone/export-test, format: adapter}}
""")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", FAKE_TOKEN)
        mp.setattr("finetune.export.hub.hub_offline_reason", lambda: None)
        mp.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: hub_calls.append(("create_repo", {
            "repo_id": repo_id, **kw})))
        mp.setattr(HfApi, "upload_folder", lambda self, **kw: hub_calls.append(("upload_folder", {
            **kw, "files": sorted(p.name for p in Path(kw["folder_path"]).iterdir())})))
        train(out / "recipe.yaml")
    adapter = out / "run" / "sft" / "adapter" / "adapter_model.safetensors"
    weights = load_file(adapter)
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v.shape, generator=g) * 0.2 if "lora_B" in k else v.float() for k, v in weights.items()}
    save_file(weights, adapter, metadata={"format": "pt"})
    return out / "run"


def test_upload_at_end_of_train_goes_through_hfapi(qlora_run, hub_calls, capsys):
    names = [name for name, _ in hub_calls]
    assert names == ["create_repo", "upload_folder"]
    create, upload = hub_calls[0][1], hub_calls[1][1]
    assert create["repo_id"] == "someone/export-test" and create["private"] is True and create["exist_ok"] is True
    assert Path(upload["folder_path"]) == qlora_run / "export" / "sft-adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json"} <= set(upload["files"])
    assert "token" not in create and "token" not in upload  # huggingface_hub finds the token itself


def test_upload_failure_after_training_keeps_the_export(qlora_run, monkeypatch):
    from finetune.export.hub import upload_run
    from finetune.recipe.schema import load_recipe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FinetuneError, match=r"training finished .* upload .* failed: .*HF_HUB_OFFLINE is set"):
        upload_run(load_recipe(qlora_run / "recipe.yaml"), qlora_run)
    assert (qlora_run / "export" / "sft-adapter" / "adapter_model.safetensors").exists()


def test_dequantized_merge_reproduces_trained_model(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    result = export_merged(open_run(qlora_run), tmp_path / "merged", dtype="fp32", compare=True)
    exact, original = result.figures["dequantized"], result.figures["original"]
    # fp32 end to end: the merge is the trained model up to float rounding.
    assert exact["max_abs_logit_diff"] < 1e-4 and exact["mean_kl"] < 1e-9 and exact["top1_agreement"] == 1.0
    # The original-weights merge misses the NF4 error the adapter trained against: clearly further away ...
    assert original["max_abs_logit_diff"] > 100 * exact["max_abs_logit_diff"] and original["mean_kl"] > 1e-6
    # ... and the adapter matters: without it the model is far from the trained one.
    assert result.adapter_effect["mean_kl"] > 1e3 * exact["mean_kl"]
    assert result.adapter_effect["top1_agreement"] < 0.9

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    kinds = {type(m).__module__.split(".")[0] for m in model.modules()}
    assert kinds == {"transformers", "torch"}, kinds  # no bitsandbytes, no peft
    generation = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    tokenizer = json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())
    eos = generation["eos_token_id"]
    assert tokenizer["eos_token"] == "<|im_end|>" and 3 in (eos if isinstance(eos, list) else [eos])
    assert (tmp_path / "merged" / "chat_template.jinja").exists()


def test_merged_weight_equals_independent_reference(qlora_run, tmp_path, tiny_model):
    """One projection recomputed from the files: NF4 round trip of the base weight + B @ A * alpha / r."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    export_merged(open_run(qlora_run), tmp_path / "m", dtype="fp32", verify=False)
    merged = load_file(tmp_path / "m" / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    base = load_file(Path(tiny_model) / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    packed, state = quantize_4bit(base, blocksize=64, compress_statistics=True, quant_type="nf4")
    adapter = load_file(qlora_run / "sft" / "adapter" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"] * (16 / 8)
    expected = dequantize_4bit(packed, state) + delta
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
    assert (merged - base).abs().max() > 0.01  # the adapter changed the weight


def test_bf16_export_passes_default_threshold(qlora_run, tmp_path):
    result = export_merged(open_run(qlora_run), tmp_path / "bf16", dtype="bf16")
    figures = result.figures["dequantized"]
    assert figures["mean_kl"] < 1e-4 and figures["top1_agreement"] > 0.95  # default --max-kl: 1e-2
    assert load_file(tmp_path / "bf16" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16


def test_original_merge_above_threshold_is_refused_and_nothing_written(qlora_run, tmp_path):
    with pytest.raises(FinetuneError, match=r"--max-kl.*original-weights merge"):
        export_merged(open_run(qlora_run), tmp_path / "orig", merge_into="original", max_kl=1e-9)
    assert not (tmp_path / "orig").exists() and not list(tmp_path.iterdir())
    result = export_merged(open_run(qlora_run), tmp_path / "orig", merge_into="original", max_kl=1.0)
    assert result.figures["original"]["mean_kl"] > 1e-9
    card = (tmp_path / "orig" / "README.md").read_text()
    assert "original full-precision base weights" in card and "never saw during training" in card


def test_adapter_export_loads_with_plain_peft(qlora_run, tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_adapter(open_run(qlora_run), tmp_path / "adapter").out
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(out))
    trained = load_file(qlora_run / "sft" / "adapter" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    loaded = dict(model.named_parameters())[key.replace("lora_B.weight", "lora_B.default.weight")]
    torch.testing.assert_close(loaded.detach(), trained[key], rtol=0, atol=0)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert "library_name: peft" in (out / "README.md").read_text()


def test_adapter_export_names_the_hub_base_of_a_local_copy(qlora_run, tmp_path, tiny_model):
    """A local base folder is no base for an uploaded adapter: with model.hub_id the export names the Hub model
    (adapter_config.json, model card, export.json) and no file names the local folder; without it, a note says so."""
    run = open_run(qlora_run)
    plain = export_adapter(run, tmp_path / "local")
    assert json.loads((plain.out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    assert any("model.hub_id" in note for note in plain.notes)

    run.recipe = run.recipe.model_copy(update={"model": run.recipe.model.model_copy(update={"hub_id": "someone/tiny"})})
    named = export_adapter(run, tmp_path / "named")
    assert named.notes == []
    assert json.loads((named.out / "adapter_config.json").read_text())["base_model_name_or_path"] == "someone/tiny"
    assert "base_model: someone/tiny" in (named.out / "README.md").read_text()
    assert json.loads((named.out / "export.json").read_text())["base_model"] == "someone/tiny"
    for path in named.out.iterdir():
        if path.is_file():
            assert str(tiny_model) not in path.read_text(errors="ignore"), path.name


def test_model_card_content_and_no_local_paths_or_secrets(qlora_run, tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    result = export_merged(open_run(qlora_run), tmp_path / "card", dtype="fp32")
    card = (tmp_path / "card" / "README.md").read_text()
    meta = json.loads((tmp_path / "card" / "export.json").read_text())
    train_loss = json.loads((qlora_run / "summary.json").read_text())["stages"]["sft"]["metrics"]["train_loss"]
    import transformers

    for needed in ("library_name: transformers", "<local>/model", "dequantized", "NF4", "## Recipe", "r: 8",
                   f"{train_loss:.4g}", "eval_loss", f"transformers {transformers.__version__}",
                   f"{result.figures['dequantized']['top1_agreement']:.2%}", "data.eval (eval.jsonl)",
                   "## Lineage", "- recipe sha256: `"):
        assert needed in card, needed
    assert meta["merge_into"] == "dequantized" and meta["verification"] == result.figures
    manifest = json.loads((tmp_path / "card" / "manifest.json").read_text())
    assert manifest["recipe"]["sha256"] == json.loads((qlora_run / "manifest.json").read_text())["recipe"]["sha256"]
    for path in tmp_path.joinpath("card").iterdir():
        text = path.read_text(errors="ignore")
        for secret_or_local in (FAKE_TOKEN, str(tiny_model), str(qlora_run), str(Path.home())):
            assert secret_or_local not in text, (path.name, secret_or_local)


def test_cli_export_errors_and_generate(qlora_run, tmp_path, capsys):
    runner = CliRunner()
    out = tmp_path / "cli"
    ok = runner.invoke(app, ["export", str(qlora_run), "--format", "merged", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "dequantized (this export): max |logit diff|" in ok.output and "verified on data.eval" in ok.output
    again = runner.invoke(app, ["export", str(qlora_run), "--format", "merged", "--out", str(out)])
    assert again.exit_code == 1 and "already exists; pass --overwrite" in again.output
    unknown = runner.invoke(app, ["export", str(qlora_run), "--stage", "dpo", "--out", str(tmp_path / "x")])
    assert unknown.exit_code == 1 and "has no stage 'dpo'" in unknown.output and "Traceback" not in unknown.output
    adapter = runner.invoke(app, ["export", str(qlora_run), "--out", str(tmp_path / "adapter")])
    assert adapter.exit_code == 0, adapter.output

    from finetune.export.generate import generate, load

    capsys.readouterr()
    from_export = generate(load(out), "add 1 2", max_new_tokens=6)
    assert from_export and from_export in capsys.readouterr().out  # streamed to stdout as it was generated
    # The run (its 4-bit base + adapter), the adapter export (export.json says: load the base in NF4) and the merged
    # export are the same model: the same greedy answer.
    loaded = load(tmp_path / "adapter")
    assert "nf4 base" in loaded.description
    assert generate(loaded, "add 1 2", max_new_tokens=6, stream=False) == from_export
    assert generate(load(qlora_run), "add 1 2", max_new_tokens=6, stream=False) == from_export
