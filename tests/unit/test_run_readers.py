"""`ft export`, `ft eval` and `ft generate` hold a run's lock shared while they read it: a run being trained is
refused by them, and `ft train` of a run they read is refused (issue 33, item 3). flock locks belong to the open
file, so one process stands for two here."""

from __future__ import annotations

import pytest
from test_export_out import finished_run
from test_run_safety import recipe_for

from finetune.errors import FinetuneError
from finetune.export.command import export_run
from finetune.export.evaluate import evaluate_target
from finetune.export.generate import load
from finetune.run import opening
from finetune.run.lock import LOCK, RunLock, is_locked, reading


def test_readers_refuse_a_run_being_trained_before_loading_anything(tmp_path):
    run = finished_run(tmp_path)
    writer = RunLock(run).acquire()
    try:
        for command, call in (("ft export", lambda: export_run(run, out=tmp_path / "out")),
                              ("ft eval", lambda: evaluate_target(run)),
                              ("ft eval", lambda: evaluate_target(tmp_path / "x", against=run / "sft" / "adapter")),
                              ("ft generate", lambda: load(run / "export" / "sft-merged"))):
            (run / "export" / "sft-merged").mkdir(parents=True, exist_ok=True)
            with pytest.raises(FinetuneError, match=f"being trained by `ft train` .*`{command}` reads it once"):
                call()
        assert not (tmp_path / "out").exists()
    finally:
        writer.release()
    assert export_run(run, out=tmp_path / "out").out == tmp_path / "out"  # once training is over


def test_train_refuses_a_run_being_read_and_deletes_nothing(tmp_path):
    run = finished_run(tmp_path)
    recipe = recipe_for(tmp_path, tmp_path / "d.jsonl", **{"output": {"dir": str(run), "overwrite": True}})
    with reading(run, "ft export"), reading(run, "ft eval"):  # readers share the lock
        assert not is_locked(run)  # `ft runs`: no `ft train` holds it
        with pytest.raises(FinetuneError, match="is being read by `ft export`, `ft eval` or `ft generate`"):
            opening.open_run_dir(recipe, None, False)
        assert (run / "sft" / "adapter" / "adapter_model.safetensors").exists()
    assert (run / LOCK).exists()  # readers leave the (unlocked) file: removing it could let a writer in beside one
    out_dir, lock = opening.open_run_dir(recipe, None, False)  # nobody reads it now
    lock.release()
    assert out_dir == run and not (run / LOCK).exists()
