"""The GPU check's wheelhouse tools (scripts/gpu/wheels.py) and driver helpers (scripts/gpu/check.py), offline.

The real wheelhouse needs PyPI (scripts/gpu/wheelhouse.sh); these tests build small synthetic wheels instead.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import sys
import time
import zipfile
from pathlib import Path

import pytest
from gpuscripts import gpu_scripts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu():
    with gpu_scripts("wheels", "check") as modules:
        yield modules


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel(path: Path, name: str, version: str, files: dict[str, bytes], requires: tuple[str, ...] = ()) -> Path:
    dist = f"{name}-{version}.dist-info"
    meta = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                      *[f"Requires-Dist: {r}" for r in requires]]).encode() + b"\n"
    files = {**files, f"{dist}/METADATA": meta}
    record = [f"{n},{_hash(d)},{len(d)}" for n, d in files.items()] + [f"{dist}/RECORD,,"]
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


def _bnb(tmp_path: Path, libs: tuple[str, ...]) -> Path:
    files = {"bitsandbytes/__init__.py": b"x = 1\n"}
    files |= {f"bitsandbytes/libbitsandbytes_{lib}.so": lib.encode() * 1000 for lib in libs}
    return _wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", "bitsandbytes", "0.50.2", files)


def test_slim_bitsandbytes_keeps_cuda13_and_cpu_with_a_valid_record(gpu, tmp_path):
    wheels, _ = gpu
    wheel = _bnb(tmp_path, ("cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm72", "xpu2026"))
    before, after, dropped = wheels.slim_bitsandbytes(wheel)
    assert sorted(dropped) == [f"libbitsandbytes_{x}.so" for x in ("cuda118", "cuda128", "rocm72", "xpu2026")]
    assert after < before
    with zipfile.ZipFile(wheel) as z:
        libs = sorted(Path(n).name for n in z.namelist() if n.endswith(".so"))
    assert libs == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"]
    assert wheels.verify_record(wheel) == []  # pip checks the RECORD's hashes when it installs
    assert wheels.slim_bitsandbytes(wheel)[2] == []  # a second run leaves it alone


def test_slim_refuses_a_wheel_without_a_cuda13_library(gpu, tmp_path):
    wheels, _ = gpu
    with pytest.raises(SystemExit, match="no CUDA 13 library"):
        wheels.slim_bitsandbytes(_bnb(tmp_path, ("cpu", "cuda128")))


def test_verify_record_finds_a_changed_file(gpu, tmp_path):
    wheels, _ = gpu
    wheel = _wheel(tmp_path / "a-1.0-py3-none-any.whl", "a", "1.0", {"a/__init__.py": b"x = 1\n"})
    assert wheels.verify_record(wheel) == []
    with zipfile.ZipFile(wheel, "a") as z:
        z.writestr("a/extra.py", b"y = 2\n")
    assert wheels.verify_record(wheel) == ["a/extra.py: not in RECORD"]


def test_requirement_rows_flag_missing_and_conflicting_needs(gpu, tmp_path):
    wheels, _ = gpu
    a = _wheel(tmp_path / "a-1.0-py3-none-any.whl", "a", "1.0", {}, requires=(
        "b>=2", "c<1", "torch>=2.4", "nowhere", 'winonly; sys_platform == "win32"', 'extra-dep; extra == "x"',
        'old; python_version < "3.10"'))
    b = _wheel(tmp_path / "b-2.1-py3-none-any.whl", "b", "2.1", {})
    c = _wheel(tmp_path / "c-1.5-py3-none-any.whl", "c", "1.5", {})
    metas = {m["name"]: m for m in map(wheels.metadata, (a, b, c))}
    rows = {req: verdict for _, req, verdict in wheels.requirement_rows(metas, {"torch": "2.11.0", "numpy": None})}
    assert rows == {"b>=2": "carried 2.1", "c<1": "CONFLICT: carried 1.5", "torch>=2.4": "image 2.11.0",
                    "nowhere": "MISSING: neither carried nor in the image"}  # markers for Linux, 3.12, no extras


def test_wheelhouse_check_reports_every_missing_pin(gpu, tmp_path, capsys):
    wheels, _ = gpu
    _wheel(tmp_path / "stray-1.0-py3-none-any.whl", "stray", "1.0", {})
    problems = wheels.check(tmp_path)
    out = capsys.readouterr().out
    assert problems == len(wheels.pins()) + 1  # each pin has no wheel, and one wheel is not pinned
    assert "trl==1.16.0: no wheel" in out and "stray: not in wheels.txt" in out and "project tree" in out


def test_pins_follow_constraints_and_the_image_list_parses(gpu):
    wheels, _ = gpu
    constraints = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            constraints[wheels.canonicalize_name(name)] = version.strip()
    pins = wheels.pins()
    differ = {n: (v, constraints[n]) for n, v in pins.items() if n in constraints and constraints[n] != v}
    assert not differ, f"scripts/gpu/wheels.txt pins differ from constraints.txt: {differ}"
    assert {"bitsandbytes", "trl", "datasets", "pydantic", "transformers", "peft"} <= pins.keys()
    image = wheels.image_packages()
    assert image["torch"] == "2.11.0" and "pyarrow" in image and "bitsandbytes" not in image


def test_run_process_kills_a_hanging_step_at_its_budget(gpu):
    _, check = gpu
    t0 = time.time()
    code, seconds, tail = check.run_process([sys.executable, "-c", "import time; print('started', flush=True); "
                                             "time.sleep(60)"], {"PATH": "/usr/bin:/bin"}, 1.5, "t")
    assert code is None and time.time() - t0 < 15 and tail == ["started"]
    code, _, tail = check.run_process([sys.executable, "-c", "raise SystemExit(3)"], {}, 30, "t")
    assert code == 3


def test_steps_skip_when_an_input_step_did_not_pass(gpu):
    check = importlib.import_module("plan")  # the driver's plan (imported by check.py)
    steps = {s.name: s for s in check.STEPS}
    assert check.blocked(steps["sft-compare"], {"matmul-peak": {"status": "passed"}}) == \
        "needs one of sft-ours, sft-trl-best to have passed"
    assert check.blocked(steps["sft-compare"], {"matmul-peak": {"status": "passed"},
                                                "sft-trl-best": {"status": "passed"}}) is None
    assert check.blocked(steps["export"], {"sft-ours": {"status": "failed"}}) == "needs sft-ours, which failed"
    assert check.expand({"memory"}) >= {"install", "env", "assets", "dry-run", "sft-ours", "dpo-ours", "memory"}
    with pytest.raises(SystemExit, match="unknown step"):
        check.expand({"nope"})


def test_trl_best_is_tried_again_without_liger_when_liger_breaks_it(gpu, monkeypatch):
    sys.path[:0] = [str(ROOT / "scripts")]
    try:
        steps = importlib.import_module("steps")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    calls = []

    def run_side(work, mode, side, rehearse, label=None, drop_flags=()):
        calls.append(drop_flags)
        if not drop_flags:
            raise SystemExit("[bench] trl-best rep 0 failed (exit 1): liger error")
        return {"tokens_per_second": 10.0, "probe": {"steps": [[1, 0.0, 0]]}, "peak_gpu_bytes": None}

    monkeypatch.setattr(steps.bench_gpu, "run_side", run_side)
    monkeypatch.setattr(steps.bench_gpu, "availability", lambda: {"liger_kernel": True, "flash_attn_2": False})
    result = steps.step_bench(Path("unused"), False, "sft", "trl-best")
    assert calls == [(), ("use_liger_kernel",)] and result["status"] == "passed"
    assert "liger error" in result["figures"]["run"]["first_try_failed"]
    calls.clear()
    with pytest.raises(SystemExit):  # ours is never retried
        steps.step_bench(Path("unused"), False, "sft", "ours")
    assert calls == [()]


def test_memory_step_states_the_estimates_error_against_the_measured_peak(gpu, tmp_path):
    import json

    sys.path[:0] = [str(ROOT / "scripts")]
    try:
        steps = importlib.import_module("steps")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    (tmp_path / "results").mkdir()
    gib = 2**30

    def put(name, figures):
        (tmp_path / "results" / f"{name}.json").write_text(json.dumps({"status": "passed", "figures": figures}))

    # like with like: the estimate of the micro-batch that was measured, the worst case beside it
    batch = {"rows": 4, "tokens_real": 2000, "tokens_slots": 2000, "tokens_labels": 900}
    put("dry-run", {"sft": {"peak_memory": 30 * gib, "measured_micro_batch": {"micro_batch": batch,
                                                                               "estimate_bytes": 12 * gib}},
                    "dpo": {"peak_memory": 9 * gib}})
    put("sft-ours", {"run": {"peak_gpu_bytes": 10 * gib}})
    put("dpo-ours", {"run": {"peak_gpu_bytes": None}})  # a run without CUDA measures nothing
    result = steps.step_memory(tmp_path, False)
    assert result["status"] == "passed"
    assert result["figures"]["sft"]["error"] == pytest.approx(0.2) and result["figures"]["dpo"]["error"] is None
    assert result["figures"]["sft"]["micro_batch"] == batch
    assert result["reason"] == ("sft: estimate of the measured micro-batch 12.00 GiB vs measured 10.00 GiB (+20%; "
                                "worst case 30.00 GiB)")
    put("sft-ours", {"run": {"peak_gpu_bytes": None}})
    assert steps.step_memory(tmp_path, True)["status"] == "skipped"
