"""Upload an export to the Hugging Face Hub: create the repo if needed, upload the folder in one commit.

The token is whatever huggingface_hub finds (HF_TOKEN, then the `hf auth login` file). This module never reads it
into a variable of its own beyond checking that one exists, and never prints, logs or writes it. When the Hub cannot
be reached or refuses the token, the error says so and the files stay where they are.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import FinetuneError
from finetune.recipe.checks import HUB_ID, hub_offline_reason
from finetune.recipe.schema import Recipe
from finetune.run.records import redact_text


def _later(folder: Path, repo_id: str) -> str:
    return f"The files stay in {folder}; upload them later with `ft push {folder} --repo-id {repo_id}`."


def check_pushable(folder: Path, repo_id: str) -> None:
    """Refuse a bad repo id, a missing or empty folder, or a whole run folder (export it first)."""
    if not HUB_ID.match(repo_id):
        raise FinetuneError(f"--repo-id '{repo_id}' is not OWNER/NAME (letters, digits, '-', '_', '.')")
    if not folder.is_dir() or not any(folder.iterdir()):
        raise FinetuneError(f"{folder} does not exist or is empty; pass an export folder (`ft export`)")
    if (folder / "recipe.yaml").exists() and (folder / "summary.json").exists():
        raise FinetuneError(
            f"{folder} is a run folder (checkpoints, metrics, local paths); export it first and push the export: "
            f"`ft export {folder} --format adapter` then `ft push {folder}/export/<stage>-adapter --repo-id {repo_id}`"
        )


def push(folder: str | Path, repo_id: str, private: bool = True, revision: str | None = None,
         commit_message: str | None = None) -> str:
    """Upload `folder` to the model repo `repo_id` in one commit and return the URL of what was uploaded.

    Args:
        folder: an export folder.
        repo_id: OWNER/NAME; the repo is created (private by default) when it does not exist.
        private: visibility of a repo created here (an existing repo keeps its visibility).
        revision: branch to commit to (created from main when missing); None commits to main.
        commit_message: message of the upload commit.
    """
    folder = Path(folder)
    check_pushable(folder, repo_id)
    reason = hub_offline_reason()
    if reason is not None:
        raise FinetuneError(f"cannot upload to the Hugging Face Hub: {reason}. {_later(folder, repo_id)}")
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if get_token() is None:
        raise FinetuneError(
            "no Hugging Face token: set HF_TOKEN (a token with write access) or run `hf auth login`. "
            + _later(folder, repo_id)
        )
    api = HfApi()  # picks the token up itself: it never passes through our code or output
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name} with finetune",
            ignore_patterns=[".*", "**/.*"],  # temporary and hidden files of interrupted exports
        )
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise FinetuneError(
                f"the Hub refused the upload to {repo_id} (HTTP {status}): the token is missing, expired, read-only, "
                f"or has no access to {repo_id.split('/')[0]}. Use a token with write access (HF_TOKEN or "
                f"`hf auth login`). {_later(folder, repo_id)}"
            ) from None
        raise FinetuneError(f"upload to {repo_id} failed: {redact_text(str(e))}. {_later(folder, repo_id)}") from None
    except (OfflineModeIsEnabled, OSError) as e:
        raise FinetuneError(f"cannot reach the Hugging Face Hub ({redact_text(str(e)) or type(e).__name__}). "
                            f"{_later(folder, repo_id)}") from None
    except Exception as e:  # httpx transport errors do not derive from OSError
        if type(e).__module__.startswith(("httpx", "httpcore")):
            raise FinetuneError(f"cannot reach the Hugging Face Hub ({type(e).__name__}). "
                                f"{_later(folder, repo_id)}") from None
        raise
    url = f"{api.endpoint}/{repo_id}"
    return f"{url}/tree/{revision}" if revision else url


def upload_run(recipe: Recipe, run_dir: Path) -> str:
    """The end of `ft train` when the recipe has hub.repo_id: export the last stage as hub.format, then push it."""
    from finetune.export.exports import default_out, export_adapter, export_merged
    from finetune.export.runstage import open_run

    hub = recipe.hub
    assert hub.repo_id is not None
    run = open_run(run_dir)
    out = default_out(run, hub.format)
    if hub.format == "adapter":
        export_adapter(run, out, overwrite=True, repo_id=hub.repo_id)
    else:
        result = export_merged(run, out, overwrite=True, repo_id=hub.repo_id)
        figures = result.figures.get(result.merge_into or "", {})
        if figures:
            print(f"[hub] merged export verified: mean KL {figures['mean_kl']:.3g}, "
                  f"top-1 agreement {figures['top1_agreement']:.2%}", flush=True)
    print(f"[hub] uploading {out} to {hub.repo_id}", flush=True)
    try:
        return push(out, hub.repo_id, private=hub.private, revision=hub.revision,
                    commit_message=f"{recipe.name}: {run.stage.name} ({hub.format})")
    except FinetuneError as e:
        raise FinetuneError(f"training finished ({run_dir}), but the upload asked by hub.repo_id failed: {e}") from None
