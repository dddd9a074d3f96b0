"""The notebooks run top to bottom on CPU (executed by nbclient, as a user's Jupyter would), are stored without
outputs, and show training progress as notebook widgets rather than terminal escape codes.

Each notebook runs in a temporary copy of the project layout (recipes, data and models linked), so its run folders
and data cache land there and not in the repository.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import finetune

ROOT = Path(__file__).resolve().parents[2]
WIDGET = "application/vnd.jupyter.widget-view+json"


def stored(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / name, as_version=4)


def execute(name: str, project: Path, monkeypatch) -> nbformat.NotebookNode:
    """Run the notebook with `project` as the project root; returns it with its outputs."""
    assert (ROOT / "models" / "tiny-chat" / "config.json").exists(), "models/tiny-chat is missing: make setup builds it"
    for folder in ("recipes", "data", "models"):
        (project / folder).symlink_to(ROOT / folder)
    (project / "notebooks").mkdir()
    shutil.copy(ROOT / "notebooks" / name, project / "notebooks" / name)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits the environment: share the CPU politely
    nb = stored(name)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(project / "notebooks")}}).execute()
    return nb


def code_cells(nb: nbformat.NotebookNode) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def check_progress_is_a_widget(nb: nbformat.NotebookNode, stage: str) -> None:
    train_cell = next(c for c in code_cells(nb) if "train(recipe)" in c.source)
    bars = [o for o in train_cell.outputs if WIDGET in o.get("data", {})]
    assert any(o["data"]["text/plain"].startswith(f"{stage}:") for o in bars), [o.get("data") for o in bars]
    text = "".join(o.get("text", "") for c in code_cells(nb) for o in c.outputs if o.output_type == "stream")
    assert "\r" not in text and "\x1b[" not in text  # no terminal bar redrawn in place, no colour codes


@pytest.mark.parametrize("name", ["quickstart.ipynb", "sft_then_dpo.ipynb"])
def test_notebook_is_stored_without_outputs(name):
    for cell in code_cells(stored(name)):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_quickstart_notebook_trains_plots_generates_and_exports(tmp_path, monkeypatch):
    nb = execute("quickstart.ipynb", tmp_path, monkeypatch)
    check_progress_is_a_widget(nb, "sft")
    run = finetune.RunResult.from_dir(tmp_path / "runs" / "notebook-quickstart")
    losses = [r["loss"] for r in run.metrics("sft") if "loss" in r]
    assert len(losses) == 16 and sum(losses[-3:]) / 3 < 0.8 * losses[0], losses  # steps 1, 2, 4, ..., 30
    plot = next(c for c in code_cells(nb) if "plt.plot" in c.source)
    assert any("image/png" in o.get("data", {}) for o in plot.outputs)
    answers = next(c for c in code_cells(nb) if "generate(model" in c.source)
    assert "".join(o.get("text", "") for o in answers.outputs).count("Q: ") == 3
    export = tmp_path / "runs" / "notebook-quickstart" / "export" / "sft-merged"
    assert (export / "config.json").exists() and (export / "model.safetensors").exists()


def test_sft_then_dpo_notebook_runs_both_stages(tmp_path, monkeypatch):
    nb = execute("sft_then_dpo.ipynb", tmp_path, monkeypatch)
    check_progress_is_a_widget(nb, "sft")
    check_progress_is_a_widget(nb, "dpo")
    run = finetune.RunResult.from_dir(tmp_path / "runs" / "notebook-sft-dpo")
    assert list(run.stages) == ["sft", "dpo"]
    dpo = run.stages["dpo"]["metrics"]
    assert dpo["steps"] == 20 and dpo["reference"] == "sft"
    # DPO starts at log 2 on held-out pairs (policy = reference) and must move the policy towards the chosen answers
    assert dpo["eval_before"]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert dpo["eval_after"]["loss"] < 0.6 and dpo["eval_after"]["rewards/margins"] > 0
    answers = next(c for c in code_cells(nb) if "generate(model" in c.source)
    printed = "".join(o.get("text", "") for o in answers.outputs)
    assert printed.count("   sft: ") == 3 and printed.count("   dpo: ") == 3
    assert (tmp_path / run.adapter("dpo") / "adapter_model.safetensors").exists()  # relative to the project
