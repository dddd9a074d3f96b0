"""Smoke run of the data benchmark (`scripts/bench_data.py`) at a tiny size, so that it cannot rot: both sides
preprocess the same rows into the same tokens, the first-step runs reach step 1, and the report is written."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_data_tiny(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        bench = importlib.import_module("bench_data")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out = tmp_path / "out"
    summary = bench.main(["--rows", "80", "--text-mb", "0.02", "--work", str(tmp_path / "work"), "--out", str(out)])
    chat, text = summary["results"]
    assert chat["rows"] == 80 and chat["ours"]["tokens"] == chat["trl"]["tokens"] > 80 * 26  # min 32 words a row
    assert text["kind"] == "text" and text["ours"]["tokens"] > 0 and text["trl"]["tokens"] > 0
    for key in ("first_step_cold_s", "first_step_warm_s", "first_step_stream_s"):
        assert 0 < chat[key] < 600
    assert chat["ours"]["anon_rss_mb"] > 0 and chat["trl"]["rss_mb"] > 0
    report = (out / "data.md").read_text()
    assert "| chat-80 | 80 |" in report and "python scripts/bench_data.py --rows 80" in report
    assert (out / "data.png").stat().st_size > 10_000
    assert json.loads((out / "data.json").read_text())["results"][0]["name"] == "chat-80"
