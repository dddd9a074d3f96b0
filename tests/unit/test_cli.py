"""The `ft` command line through typer's test runner, and its start-up promise (no torch for help/validate)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from finetune.cli import app

runner = CliRunner()


def recipe(tmp_path: Path, body: str) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}\n')
    p = tmp_path / "r.yaml"
    p.write_text(body.replace("DATA", str(data)).replace("MODEL", str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")  # checked for, never loaded here
    return p


def test_help_lists_commands():
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0
    for cmd in ("train", "validate", "explain"):
        assert cmd in out.output


def test_validate_valid_recipe_prints_resolved(tmp_path):
    p = recipe(tmp_path, "model: {name_or_path: MODEL}\ndata: {train: [{path: DATA}]}\nlora: {r: 4}\n")
    out = runner.invoke(app, ["validate", str(p), "--set", "lora.alpha=8"])
    assert out.exit_code == 0, out.output
    assert "valid" in out.output and "alpha: 8" in out.output and "r: 4" in out.output


def test_validate_invalid_exits_nonzero_without_traceback(tmp_path):
    p = recipe(tmp_path, "model: {name_or_path: MODEL}\ndata: {train: [{path: DATA}]}\nlora: {rr: 4}\n")
    out = runner.invoke(app, ["validate", str(p)])
    assert out.exit_code == 2
    assert "lora.rr" in out.output and "Traceback" not in out.output


def test_validate_missing_model_path(tmp_path):
    p = recipe(tmp_path, "model: {name_or_path: ./no/such/model}\ndata: {train: [{path: DATA}]}\n")
    out = runner.invoke(app, ["validate", str(p)])
    assert out.exit_code == 2 and "model.name_or_path" in out.output and "does not exist" in out.output


def test_validate_missing_data_file(tmp_path):
    p = recipe(tmp_path, "model: {name_or_path: MODEL}\ndata: {train: [{path: ./missing.jsonl}]}\n")
    out = runner.invoke(app, ["validate", str(p)])
    assert out.exit_code == 2 and "data.train[0].path" in out.output


def test_validate_refuses_kernels_the_model_cannot_run(tmp_path):
    """Kernel support is checked from the model's config.json before anything loads (no torch)."""
    body = "model: {name_or_path: MODEL}\ndata: {train: [{path: DATA}]}\nkernels: {lora_mlp: true}\n"
    p = recipe(tmp_path, body)
    (tmp_path / "config.json").write_text('{"model_type": "gemma2"}')
    out = runner.invoke(app, ["validate", str(p)])
    assert out.exit_code == 2 and "kernels" in out.output and "'gemma2' is not supported" in out.output
    assert "Turn the kernels off" in out.output
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert runner.invoke(app, ["validate", str(p)]).exit_code == 0
    out = runner.invoke(app, ["validate", str(p), "--set", "lora.use_dora=true"])
    assert out.exit_code == 2 and "DoRA" in out.output and "use_dora: false" in out.output


def test_hub_id_offline_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    p = recipe(tmp_path, "model: {name_or_path: someorg/some-model}\ndata: {train: [{path: DATA}]}\n")
    out = runner.invoke(app, ["validate", str(p)])
    assert out.exit_code == 2
    assert "Hub cannot be reached" in out.output and "local" in out.output and "someorg/some-model" in out.output


def test_train_bad_recipe_fails_before_loading_anything(tmp_path):
    out = runner.invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert out.exit_code == 2 and "recipe file not found" in out.output


def test_explain_shows_field_docs():
    out = runner.invoke(app, ["explain", "lora.r"])
    assert out.exit_code == 0 and "LoRA rank" in out.output
    bad = runner.invoke(app, ["explain", "lora.rnk"])
    assert bad.exit_code == 2 and "did you mean" in bad.output


def test_help_and_validate_do_not_import_torch(tmp_path):
    p = recipe(tmp_path, "model: {name_or_path: MODEL}\ndata: {train: [{path: DATA}]}\nkernels: {rope: true}\n")
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom finetune.cli import app\n"
        f"r = CliRunner()\nassert r.invoke(app, ['--help']).exit_code == 0\n"
        f"assert r.invoke(app, ['validate', {str(p)!r}]).exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_recipe_docs_are_up_to_date():
    from finetune.recipe.docs import markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "recipe.md"
    assert doc.read_text() == markdown(), "run `python scripts/gen_recipe_docs.py` to regenerate docs/recipe.md"


def test_train_error_in_a_worker_process_names_its_rank(tmp_path, monkeypatch):
    """In a multi-process run every process reports its own failure, prefixed by its rank."""
    from finetune.errors import FinetuneError
    from finetune.stages import pipeline

    def fail(*args, **kwargs):
        raise FinetuneError("data.train[0]: row 3 has no assistant turn")

    monkeypatch.setattr(pipeline, "run_pipeline", fail)
    monkeypatch.setattr("finetune.distributed.process.silence_other_processes", lambda: None)
    p = recipe(tmp_path, "model: {name_or_path: MODEL}\ndata: {train: [{path: DATA}]}\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = runner.invoke(app, ["train", str(p)])
    assert out.exit_code == 1 and "[rank 1] error: data.train[0]: row 3" in out.output
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    out = runner.invoke(app, ["train", str(p)])
    errors = [line for line in out.output.splitlines() if "error:" in line]  # after the checks' own lines
    assert out.exit_code == 1 and errors == ["error: data.train[0]: row 3 has no assistant turn"], out.output
    assert "rank" not in out.output
