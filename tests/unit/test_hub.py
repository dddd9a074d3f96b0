"""`ft push` at the huggingface_hub API boundary: the calls HfApi would make, and the errors users hit."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import FinetuneError
from finetune.export.hub import push

TOKEN = "hf_" + "S" * 34


@pytest.fixture
def export_dir(tmp_path) -> Path:
    out = tmp_path / "export"
    out.mkdir()
    (out / "README.md").write_text("# card\n")
    (out / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return out


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, dict]]:
    """Record what HfApi is asked to do; the Hub is reachable and a token is configured."""
    recorded: list[tuple[str, dict]] = []
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("finetune.export.hub.hub_offline_reason", lambda: None)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: recorded.append(("create_repo", {
        "repo_id": repo_id, **kw})))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: recorded.append(("create_branch", {
        "repo_id": repo_id, **kw})))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: recorded.append(("upload_folder", kw)))
    return recorded


def test_push_creates_repo_and_uploads_in_one_commit(export_dir, calls):
    url = push(export_dir, "alice/tiny-chat-sft", revision="v1")
    assert [name for name, _ in calls] == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (kw for _, kw in calls)
    assert create == {"repo_id": "alice/tiny-chat-sft", "private": True, "repo_type": "model", "exist_ok": True}
    assert branch["branch"] == "v1" and branch["exist_ok"] is True
    assert upload["repo_id"] == "alice/tiny-chat-sft" and upload["folder_path"] == str(export_dir)
    assert upload["revision"] == "v1" and upload["repo_type"] == "model"
    assert url.endswith("/alice/tiny-chat-sft/tree/v1")
    assert all("token" not in kw for _, kw in calls)  # huggingface_hub finds the token itself


def test_cli_push_prints_url_never_the_token(export_dir, calls):
    result = CliRunner().invoke(app, ["push", str(export_dir), "--repo-id", "alice/m", "--public"])
    assert result.exit_code == 0, result.output
    assert "huggingface.co/alice/m" in result.output and TOKEN not in result.output
    assert calls[0][1]["private"] is False and [n for n, _ in calls] == ["create_repo", "upload_folder"]


def test_offline_mode_is_a_clear_error_and_files_stay(export_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = sorted(p.name for p in export_dir.iterdir())
    result = CliRunner().invoke(app, ["push", str(export_dir), "--repo-id", "alice/m"])
    assert result.exit_code == 1
    assert "HF_HUB_OFFLINE is set" in result.output and f"files stay in {export_dir}" in result.output
    assert "ft push" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in export_dir.iterdir()) == before


def test_unreachable_endpoint(export_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")  # nothing listens on 443 here
    with pytest.raises(FinetuneError, match=r"cannot connect to 127\.0\.0\.1.*files stay in"):
        push(export_dir, "alice/m")
    assert (export_dir / "README.md").exists()


def test_connection_lost_during_upload(export_dir, calls, monkeypatch):
    def refuse(self, **kw):
        raise httpx.ConnectError("connection refused")

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    with pytest.raises(FinetuneError, match="cannot reach the Hugging Face Hub.*files stay in"):
        push(export_dir, "alice/m")


def test_unauthorized(export_dir, calls, monkeypatch):
    def deny(self, repo_id, **kw):
        request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
        raise HfHubHTTPError("401 Unauthorized", response=httpx.Response(401, request=request))

    monkeypatch.setattr(HfApi, "create_repo", deny)
    with pytest.raises(FinetuneError, match=r"refused the upload to alice/m \(HTTP 401\).*write access") as info:
        push(export_dir, "alice/m")
    assert TOKEN not in str(info.value)


def test_no_token(export_dir, calls, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(FinetuneError, match="no Hugging Face token: set HF_TOKEN"):
        push(export_dir, "alice/m")
    assert calls == []


def test_bad_repo_id_empty_folder_and_run_folder(tmp_path, export_dir, calls):
    with pytest.raises(FinetuneError, match="is not OWNER/NAME"):
        push(export_dir, "just-a-name")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match="does not exist or is empty"):
        push(tmp_path / "empty", "alice/m")
    (export_dir / "recipe.yaml").write_text("name: x\n")
    (export_dir / "summary.json").write_text("{}")
    with pytest.raises(FinetuneError, match="is a run folder.*ft export"):
        push(export_dir, "alice/m")
    assert calls == []


def test_recipe_hub_section_validates_repo_id():
    from pydantic import ValidationError

    from finetune.recipe.schema import HubConfig

    assert HubConfig(repo_id="alice/m", revision="exp").revision == "exp"
    with pytest.raises(ValidationError):
        HubConfig(repo_id="not a repo")
