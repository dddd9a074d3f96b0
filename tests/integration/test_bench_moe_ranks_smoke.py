"""Smoke run of `scripts/bench_moe_ranks.py` (per-expert ranks by routing vs uniform), so that it cannot rot: one seed,
a few steps; both runs train through `ft train`, at the same trainable parameters, and the report lists them."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_moe_ranks_runs_both_policies_at_equal_parameters(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        bench = importlib.import_module("bench_moe_ranks")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    summary = bench.main(["--seeds", "1", "--steps", "3", "--out", str(tmp_path)])
    uniform, by_routing = summary["runs"]
    assert (uniform["rank"], by_routing["rank"]) == ("uniform", "by_routing")
    assert uniform["trainable"] == by_routing["trainable"] and uniform["experts"] == by_routing["experts"] > 0
    assert uniform["ranks"] == [[4] * 8] * 2 and [sum(r) for r in by_routing["ranks"]] == [32, 32]
    text = (tmp_path / "moe-ranks.md").read_text()
    assert "| uniform | 0 |" in text and "| by_routing | 0 |" in text and "Mean held-out loss" in text
