"""A hostile and clumsy week, without training: --overwrite deletes only a run, names and folders stay inside
runs/, alias bombs and non-YAML `extends:` are refused, secrets are redacted everywhere by one rule, a resume on
changed data is refused, damaged checkpoints are passed over, leftovers are tidied, lock files do not linger, and
checkpoints come by the clock, at epoch ends and at the last step."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState

from finetune.errors import FinetuneError
from finetune.recipe.loading import RecipeError
from finetune.recipe.schema import load_recipe, validate_data
from finetune.run import checkpoints, opening
from finetune.run.guards import SaveSchedule, divergence_message
from finetune.run.lock import LOCK, RunLock, is_locked
from finetune.run.records import redact, stage_eval_at_start, trim_metrics
from finetune.run.resume import resume_point

# Token shapes of the services a run may talk to (made up, never real).
TOKENS = {"hf": "hf_" + "aB3" * 12, "openai": "sk-proj-" + "Zx9_" * 8, "wandb_v1": "wandb_v1_" + "Qw7" * 12,
          "hex40": "0123abcd" * 5}


def recipe_for(tmp_path: Path, data: Path, **extra) -> object:
    return validate_data({"name": "r", "model": {"name_or_path": str(tmp_path / "no-model")},
                          "data": {"train": [{"path": str(data)}]},
                          "output": {"dir": str(tmp_path / "runs" / "r")}, **extra}, "recipe")


def finished_run(run_dir: Path) -> Path:
    (run_dir / "sft" / "adapter").mkdir(parents=True)
    (run_dir / "sft" / "adapter" / "adapter_model.safetensors").write_bytes(b"w")
    (run_dir / "sft" / "summary.json").write_text("{}")
    (run_dir / "recipe.yaml").write_text("name: r\n")
    (run_dir / "metrics.jsonl").write_text("")
    (run_dir / "summary.json").write_text(json.dumps({"name": "r", "status": "finished", "stages": {}}))
    return run_dir


# --- 1. --overwrite


def test_overwrite_deletes_only_what_ft_train_wrote_and_never_follows_links(tmp_path):
    data = tmp_path / "runs" / "r" / "train.jsonl"  # the user keeps the run's data in the run folder
    run_dir = finished_run(data.parent)
    data.write_text('{"messages": []}\n')
    (run_dir / "notes.md").write_text("my notes")
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    (run_dir / "export").symlink_to(outside, target_is_directory=True)  # a link named like a run entry
    recipe = recipe_for(tmp_path, data, **{"output": {"dir": str(run_dir), "overwrite": True}})
    out_dir, lock = opening.open_run_dir(recipe, None, False)
    lock.release()
    assert out_dir == run_dir
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.md", "train.jsonl"]
    assert (outside / "keep.txt").read_text() == "x"  # the link went, not what it pointed to


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"status": "finished"}))  # ours? no recipe.yaml: not a run
    (folder / "thesis.tex").write_text("years of work")
    recipe = recipe_for(tmp_path, tmp_path / "d.jsonl", **{"output": {"dir": str(folder), "overwrite": True}})
    with pytest.raises(FinetuneError, match="is not a run folder of `ft train`.*nothing in it is deleted"):
        opening.open_run_dir(recipe, None, False)
    assert (folder / "thesis.tex").exists() and not (folder / LOCK).exists()


def test_overwrite_waits_for_the_lock_before_deleting(tmp_path):
    run_dir = finished_run(tmp_path / "runs" / "r")
    hold = (f"import sys; from finetune.run.lock import RunLock; lock = RunLock({str(run_dir)!r}).acquire(); "
            "print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        recipe = recipe_for(tmp_path, tmp_path / "d.jsonl", **{"output": {"dir": str(run_dir), "overwrite": True}})
        with pytest.raises(FinetuneError, match=f"in use by another `ft train` \\(pid {holder.pid}\\)"):
            opening.open_run_dir(recipe, None, False)
        assert (run_dir / "sft" / "adapter" / "adapter_model.safetensors").exists()  # nothing deleted
    finally:
        holder.stdin.close()
        holder.wait()


# --- 19.6: lock files


def test_lock_file_is_removed_when_released_and_never_made_by_asking(tmp_path):
    assert not is_locked(tmp_path) and not (tmp_path / LOCK).exists()
    lock = RunLock(tmp_path).acquire()
    assert is_locked(tmp_path) and (tmp_path / LOCK).exists()
    stale = (tmp_path / LOCK).open("a+")  # a process that opened the file just before the holder removed it
    lock.release()
    assert not (tmp_path / LOCK).exists()
    again = RunLock(tmp_path).acquire()  # a new file, locked
    import fcntl

    fcntl.flock(stale.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # the old file is free, but it is not the lock
    assert is_locked(tmp_path)
    stale.close()
    again.release()
    assert not (tmp_path / LOCK).exists()


# --- 5. names and folders


def test_run_name_is_a_plain_name_and_output_dir_fields_are_checked(tmp_path):
    with pytest.raises(RecipeError, match=r"name: '\.\./\.\./\.\./tmp/elsewhere' must be a plain name"):
        validate_data({"name": "../../../tmp/elsewhere"}, "recipe")
    with pytest.raises(RecipeError, match=r"output.dir: 'runs/\{\}' holds \{\}; only \{name\}"):
        validate_data({"output": {"dir": "runs/{}"}}, "recipe")
    with pytest.raises(RecipeError, match=r"output.dir: 'runs/\{' is not a valid folder template"):
        validate_data({"output": {"dir": "runs/{"}}, "recipe")
    ok = validate_data({"name": "qwen-0.5b_v2", "data": {"train": [{"path": "d.jsonl"}]},
                        "output": {"dir": str(tmp_path / "x" / "{name}")}}, "recipe")
    assert ok.output_dir() == tmp_path / "x" / "qwen-0.5b_v2"


# --- 6. hostile YAML


def test_alias_bomb_is_refused_with_a_clear_error(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]  # 10^7 values expanded
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecipeError, match="expands to over 100,000 values through aliases"):
        load_recipe(path)


def test_extends_refuses_a_non_yaml_file_without_echoing_it(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secrethash:19000:0:99999:7:::\nadmin: hunter2\n")
    path = tmp_path / "r.yaml"
    path.write_text(f"extends: {secret}\nname: r\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert "is not a recipe (.yaml or .yml file); it was not read" in str(caught.value)
    assert "hunter2" not in str(caught.value) and "secrethash" not in str(caught.value) and "admin" not in str(
        caught.value)


# --- 4. secrets


def test_token_shapes_are_redacted_but_commits_under_commit_keys_stay():
    for kind, token in TOKENS.items():
        assert redact(f"tag-{token}") == "tag-<redacted>", kind
        assert redact({"tags": [token]}) == {"tags": ["<redacted>"]}, kind
    commit = TOKENS["hex40"]
    assert redact({"code": {"commit": commit}, "model": {"revision": commit}}) == {
        "code": {"commit": commit}, "model": {"revision": commit}}
    assert redact(["--set", f"model.revision={commit}", "--set", f"tracking.wandb.name={commit}"]) == [
        "--set", f"model.revision={commit}", "--set", "tracking.wandb.name=<redacted>"]


def test_wandb_fields_manifest_command_and_model_card_are_redacted(tmp_path, monkeypatch):
    from finetune.export.modelcard import public_manifest
    from finetune.run.manifest import write_manifest
    from finetune.run.tracking import open_tracker

    seen: dict = {}

    def init(**kwargs):
        seen.update(kwargs)
        return types.SimpleNamespace(id="abc")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    t = TOKENS
    recipe = recipe_for(tmp_path, data, tracking={"wandb": {
        "name": f"run-{t['hf']}", "tags": [t["openai"], t["wandb_v1"], "plain"], "entity": t["hex40"],
        "project": "p", "mode": "offline"}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    open_tracker(recipe, run_dir)
    assert seen["name"] == "run-<redacted>" and seen["tags"] == ["<redacted>", "<redacted>", "plain"]
    assert seen["entity"] == "<redacted>"
    monkeypatch.setattr(sys, "argv", ["ft", "train", "r.yaml", "--set", f"tracking.wandb.tags=[{t['hex40']}]"])
    write_manifest(recipe, run_dir)
    text = (run_dir / "manifest.json").read_text()
    card = json.dumps(public_manifest(run_dir))
    for token in t.values():
        assert token not in text and token not in card and token not in json.dumps(seen, default=str)


# --- 3. changed data on resume


def test_resume_on_changed_data_is_refused_unless_allowed_and_the_manifest_keeps_history(tmp_path, capsys):
    from finetune.run.manifest import read_manifest, write_manifest

    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"i": {i}}}\n' for i in range(1000)))
    recipe = recipe_for(tmp_path, data)
    run_dir = tmp_path / "run"
    first = write_manifest(recipe, run_dir)
    assert opening.check_inputs(recipe, run_dir, None, True, False)  # unchanged: fine
    data.write_text("".join(f'{{"i": {i}}}\n' for i in reversed(range(600))))
    with pytest.raises(FinetuneError, match=rf"--resume: .*data {data} \(data.train\[0\]\) changed.*"
                                            "--allow-changed-data"):
        opening.check_inputs(recipe, run_dir, None, True, False)
    manifest = opening.check_inputs(recipe, run_dir, None, True, True)
    assert "continuing as --allow-changed-data asks" in capsys.readouterr().out
    write_manifest(recipe, run_dir, manifest=manifest)
    kept = read_manifest(run_dir)
    assert kept["history"][0]["data"][0]["sha256"] == first["data"][0]["sha256"] != kept["data"][0]["sha256"]


# --- 8. damaged checkpoints


def fake_checkpoint(root: Path, step: int, loss_sum: float = 1.0) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "optimizer.pt").write_bytes(bytes(range(200)))
    state = {"files": checkpoints._checksums(folder), "loss_sum": loss_sum}
    (folder / checkpoints.STATE).write_text(json.dumps(state))
    return folder


def test_a_damaged_newest_checkpoint_is_passed_over_and_resume_from_chooses(tmp_path, capsys):
    root = tmp_path / "sft" / "checkpoints"
    four, eight = fake_checkpoint(root, 4), fake_checkpoint(root, 8)
    assert resume_point(tmp_path / "sft", True) == eight
    (eight / "optimizer.pt").write_bytes(b"PK\x03\x04 truncated")
    assert resume_point(tmp_path / "sft", True) == four
    out = capsys.readouterr().out
    assert "checkpoint-8 is damaged (optimizer.pt does not match the checksum" in out and "--resume-from" in out
    assert resume_point(tmp_path / "sft", True, "checkpoint-4") == four
    with pytest.raises(FinetuneError, match="cannot be used: optimizer.pt does not match"):
        resume_point(tmp_path / "sft", True, "checkpoint-8")
    with pytest.raises(FinetuneError, match=r"--resume-from checkpoint-5: not a checkpoint .*checkpoint-4, "
                                            "checkpoint-8"):
        resume_point(tmp_path / "sft", True, "checkpoint-5")


# --- 10. bookkeeping


def test_leftovers_of_a_kill_during_rotation_are_tidied(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 8)
    (root / ".trash-checkpoint-4").mkdir()
    (root / ".staging" / "checkpoint-12").mkdir(parents=True)
    checkpoints.tidy(root)
    assert [p.name for p in root.iterdir()] == ["checkpoint-8"]


def test_resume_drops_earlier_end_of_training_rows_and_finds_the_step_0_eval(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"stage": "dpo", "step": 0, "eval_loss": 0.69, "eval_rewards/accuracies": 0.5},
            {"stage": "dpo", "step": 4, "loss": 0.6}, {"stage": "dpo", "step": 4, "train_runtime": 9.0},
            {"stage": "dpo", "step": 5, "loss": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert trim_metrics(path, "dpo", 4, ends=True) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]
    assert stage_eval_at_start(path, "dpo") == {"loss": 0.69, "rewards/accuracies": 0.5}


def test_nan_message_does_not_advise_setting_save_steps_when_it_is_set(tmp_path):
    from finetune.run.guards import NonFinite

    training = recipe_for(tmp_path, tmp_path / "d", training={"save_steps": 50}).training
    text = divergence_message("sft", NonFinite(3, "the logged loss is nan", True), None, "ft train x --resume",
                              training)
    assert "set training.save_steps" not in text and "every 50 steps" in text


# --- 19.7 checkpoints by default


def test_checkpoints_come_by_the_clock_at_epoch_ends_and_at_the_last_step(tmp_path, monkeypatch):
    training = recipe_for(tmp_path, tmp_path / "d").training
    assert training.save_minutes == 30 and training.save_steps is None
    clock = [1000.0]
    monkeypatch.setattr("finetune.run.guards.time.monotonic", lambda: clock[0])
    schedule = SaveSchedule("sft", training)
    state, args = TrainerState(global_step=0, max_steps=100), types.SimpleNamespace(gradient_accumulation_steps=1)
    schedule.on_train_begin(args, state, TrainerControl())

    def asks(step: int, minutes: float) -> bool:
        clock[0] += minutes * 60
        state.global_step = step
        control = schedule.on_step_end(args, state, TrainerControl())
        if control.should_save:
            schedule.on_save(args, state, control)
        return control.should_save

    assert [asks(1, 10), asks(2, 10), asks(3, 10.5), asks(4, 29), asks(5, 1)] == [False, False, True, False, True]
    assert schedule.on_epoch_end(args, state, TrainerControl()).should_save is False  # saved at this step already
    state.global_step = 6
    assert schedule.on_epoch_end(args, state, TrainerControl()).should_save is True
    assert asks(100, 0)  # the last step
    assert checkpoints.next_checkpoint_step(training, 0, 40, 100) == 40
    assert "every 30 min of training, at the end of each epoch (every 40 steps) and at the last step (100)" in (
        checkpoints.schedule_text(training, 40, 100))


# Issue 33 item 6: more token shapes, in every failure text we persist or print, and the run folder's recipe.yaml
MORE_TOKENS = {"github": "ghp_" + "k2" * 18, "github_pat": "github_pat_11ABCDEF0" + "x_Y9" * 10,
               "slack": "xoxb-1234567890-abcdefghijKL", "aws": "AKIA" + "IOSFODNN7EXAMPLE"}


def test_more_token_shapes_and_key_values_are_redacted():
    from finetune.run.records import redact_text

    for kind, token in MORE_TOKENS.items():
        assert redact_text(f"failed with {token}.") == "failed with <redacted>.", kind
    url = "GET https://x.example/v1?q=cats&api_key=Zk29dkd02kdk&token=abcdef123456#top failed; sig=0a9b8c7d6e5f"
    assert redact_text(url) == ("GET https://x.example/v1?q=cats&api_key=<redacted>&token=<redacted>#top failed; "
                                "sig=<redacted>")
    assert redact_text("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY") == (
        "aws_secret_access_key=<redacted>")
    assert redact_text("Authorization: Bearer abcdefghijklmnop1234") == "Authorization: Bearer <redacted>"
    kept = "pad_token=<|endoftext|>, max_new_tokens=128, eos_token=</s>, revision=main, learning_rate=0.0002"
    assert redact_text(kept) == kept  # tokenizer fields and counters are not secrets


def test_failure_texts_in_summary_runs_and_cli_are_redacted(tmp_path, capsys):
    from typer.testing import CliRunner

    from finetune.cli import app
    from finetune.run.listing import list_runs
    from finetune.run.resume import record_stop

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("name: r\n")
    leak = f"HTTPError: 401 for https://api.x.com/score?key=s3cr3tVALUE99 ({MORE_TOKENS['github']})"
    summary = {"name": "r", "status": "running", "stages": {}}
    record_stop(run_dir, summary, "grpo", FinetuneError(leak))
    written = (run_dir / "summary.json").read_text()
    assert "s3cr3tVALUE99" not in written and MORE_TOKENS["github"] not in written and "key=<redacted>" in written
    # a run recorded before the rule knew these shapes is shown redacted by `ft runs`
    (run_dir / "summary.json").write_text(json.dumps({**summary, "error": leak}))
    listed = list_runs(tmp_path / "runs")
    assert "s3cr3tVALUE99" not in listed and MORE_TOKENS["github"] not in listed and "HTTPError: 401" in listed
    # the CLI's error line: a data path that quotes a token
    out = CliRunner().invoke(app, ["validate", str(tmp_path / f"r-{MORE_TOKENS['slack']}.yaml")])
    assert out.exit_code == 2 and MORE_TOKENS["slack"] not in out.output and "<redacted>" in out.output


def test_the_run_folders_recipe_is_redacted(tmp_path):
    from finetune.run.manifest import write_recipe

    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    recipe = recipe_for(tmp_path, data, tracking={"wandb": {
        "name": f"run-{TOKENS['hf']}", "tags": [MORE_TOKENS["github"], "plain"], "project": "p", "mode": "offline"}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    text = write_recipe(recipe, run_dir).read_text()
    assert TOKENS["hf"] not in text and MORE_TOKENS["github"] not in text and "plain" in text
    assert load_recipe(run_dir / "recipe.yaml").tracking.wandb.tags == ["<redacted>", "plain"]  # still a recipe
