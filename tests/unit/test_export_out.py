"""Where `ft export` writes: `--overwrite` replaces only one of our exports, odd `--out` values get one line before any
work, and a killed export's leftovers are removed by the next export (issue 33, items 1, 9 and 12)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
from test_export_errors import make_run

from finetune.errors import FinetuneError
from finetune.export.destination import check_out, staged_out
from finetune.export.exports import export_adapter
from finetune.export.runstage import open_run


def finished_run(tmp_path: Path) -> Path:
    """A finished run folder (no model in it) that `export_adapter` can export."""
    run = make_run(tmp_path, finished=("sft",))
    (run / "sft" / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer_config.json").write_text("{}")
    (run / "summary.json").write_text(json.dumps({"status": "finished"}))
    return run


def test_overwrite_never_deletes_a_folder_of_runs_or_the_run_itself(tmp_path):
    run = finished_run(tmp_path)
    other = tmp_path / "runs" / "older"
    other.mkdir(parents=True)
    (other / "recipe.yaml").write_text("name: older\n")
    (other / "summary.json").write_text(json.dumps({"status": "finished"}))
    stage = open_run(run)
    with pytest.raises(FinetuneError, match=r"holds run folder\(s\) older\. Nothing was deleted"):
        export_adapter(stage, tmp_path / "runs", overwrite=True)
    for holding_the_run in (run, tmp_path):
        with pytest.raises(FinetuneError, match="holds the run being exported"):
            export_adapter(stage, holding_the_run, overwrite=True)
    assert (other / "recipe.yaml").exists() and (run / "sft" / "adapter" / "adapter_model.safetensors").exists()
    assert not list(tmp_path.glob(".*.partial"))  # refused before anything was written


def test_overwrite_refuses_a_folder_that_is_not_an_export_and_replaces_an_export(tmp_path):
    stage = open_run(finished_run(tmp_path))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(FinetuneError, match=r"holds 1 entries \(notes.txt\) and no export.json"):
        export_adapter(stage, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"
    out = tmp_path / "out"
    export_adapter(stage, out)
    (out / "stale.txt").write_text("from the old export")
    export_adapter(stage, out, overwrite=True)
    assert (out / "export.json").exists() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out", "run"]  # no .old or .partial left


def test_out_dot_and_out_a_file(tmp_path, monkeypatch):
    stage = open_run(finished_run(tmp_path))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = export_adapter(stage, Path("."))  # an empty folder: nothing to lose, no --overwrite needed
    assert result.out == here and (here / "adapter_model.safetensors").read_bytes() == b"weights"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FinetuneError, match="is a file, not a folder"):
        export_adapter(stage, tmp_path / "file", overwrite=True)
    with pytest.raises(FinetuneError, match="cannot create its folder"):
        export_adapter(stage, tmp_path / "file" / "sub")
    assert (tmp_path / "file").read_text() == "x"


def test_a_killed_exports_leftovers_go_at_the_next_export_and_a_live_one_is_not_touched(tmp_path):
    run = finished_run(tmp_path)
    out = tmp_path / "out"
    partial, merged = tmp_path / ".out.partial", tmp_path / ".out.merged"
    partial.mkdir()
    (partial / "r-sft-f16.gguf.unverified").write_bytes(b"GGUF")
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"fp32")
    export_adapter(open_run(run), out)
    assert not partial.exists() and not merged.exists() and (out / "export.json").exists()
    # a live export holds the flock on its temporary folder: a second export to the same place is refused
    partial.mkdir()
    fd = os.open(partial, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(FinetuneError, match="being written by another `ft export`"):
            with staged_out(out, True, run):
                pass
        assert partial.is_dir()
    finally:
        os.close(fd)


def test_a_failed_export_leaves_the_old_one_and_nothing_else(tmp_path):
    run = finished_run(tmp_path)
    out = tmp_path / "out"
    export_adapter(open_run(run), out)
    with pytest.raises(KeyboardInterrupt):
        with staged_out(out, True, run) as tmp:
            (tmp / "half").write_text("x")
            raise KeyboardInterrupt
    assert (out / "export.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]
    assert check_out(out, True, run) == out


def test_runs_tidy_removes_a_killed_exports_leftovers_in_runs_nobody_uses(tmp_path):
    from typer.testing import CliRunner

    from finetune.cli import app
    from finetune.run.lock import reading

    run = finished_run(tmp_path)
    partial, merged = run / "export" / ".sft-gguf-f16.partial", run / "export" / ".sft-gguf-f16.merged"
    partial.mkdir(parents=True)
    (partial / "r-sft-f16.gguf.unverified").write_bytes(b"GGUF")
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"fp32")
    with reading(run, "ft export"):  # an export still running: its files stay
        busy = CliRunner().invoke(app, ["runs", str(run), "--tidy"])
    assert busy.exit_code == 0 and "is in use" in busy.output and partial.exists() and merged.exists()
    tidied = CliRunner().invoke(app, ["runs", str(run), "--tidy"])
    assert tidied.exit_code == 0, tidied.output
    assert "removed 2 leftover(s) of killed commands (export/.sft-gguf-f16." in tidied.output
    assert "export/.sft-gguf-f16.merged" in tidied.output and "export/.sft-gguf-f16.partial" in tidied.output
    assert sorted(p.name for p in (run / "export").iterdir()) == [] and "finished" in tidied.output
