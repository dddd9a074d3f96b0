"""The GPU check's `env` step: package versions and where each is imported from, CUDA, the bitsandbytes library.

`finetune` must come from the check's overlay of the tree (not an installed or stale copy), and the `kernels` that
bitsandbytes and transformers import must not be the tree's top-level `kernels/` folder (check.py's `step_env`).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

REQUIRED = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "pydantic", "finetune",
            "finetune.kernels")
OPTIONAL = ("tokenizers", "huggingface_hub", "typer", "safetensors", "triton", "liger_kernel", "flash_attn", "pyarrow",
            "numpy")



def step_env(work: Path, rehearse: bool) -> dict:
    import importlib
    import importlib.metadata as md
    import os

    site = os.environ.get("FT_GPU_SITE") or None
    modules, broken = {}, []
    for name in REQUIRED + OPTIONAL:
        try:
            m = importlib.import_module(name)
            origin = str(Path(m.__file__).resolve()) if getattr(m, "__file__", None) else "?"
            where = ("wheels" if site and origin.startswith(str(Path(site).resolve())) else
                     "project" if origin.startswith(str(ROOT)) else str(Path(origin).parents[1]))
            modules[name] = {"version": getattr(m, "__version__", None), "from": where}
        except Exception as e:  # noqa: BLE001 - any failure to import is what this step reports
            modules[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            if name in REQUIRED:
                broken.append(name)
    problems = []
    if "finetune" not in broken:  # the tree's files through check.py's overlay, not an installed or stale copy
        import finetune

        pkg_dir = Path(finetune.__path__[0])
        src = os.environ.get("FT_GPU_SRC")
        if src and pkg_dir.parent != Path(src):
            problems.append(f"finetune imported from {pkg_dir}, not the check's copy of the tree in {src}")
    import importlib.util

    # bitsandbytes and transformers import the `kernels` package (Hugging Face's kernel hub) where installed: the
    # tree's top-level kernels/ folder must never be what they find
    spec = importlib.util.find_spec("kernels")
    kernels_from = spec.origin if spec is not None else None
    if kernels_from and Path(kernels_from).resolve().is_relative_to(ROOT / "kernels"):
        problems.append(f"`import kernels` finds the tree's {ROOT / 'kernels'}, which hides the kernels package")
    import torch

    figures: dict = {"kernels_package": kernels_from, "modules": modules, "python": sys.version.split()[0],
                     "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        figures.update(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                       memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1))
    if "bitsandbytes" not in broken:
        from bitsandbytes import cextension

        lib = getattr(cextension.lib, "_lib", None)
        figures["bitsandbytes_library"] = Path(getattr(lib, "_name", "none")).name
        figures["bitsandbytes_cuda"] = bool(getattr(cextension.lib, "compiled_with_cuda", False))
    from packaging.requirements import Requirement
    from packaging.version import Version
    from wheels import TARGET_ENV, pins

    wrong, unmet = [], []
    env = {**TARGET_ENV, "python_version": ".".join(map(str, sys.version_info[:2]))}
    for name, pinned in pins().items():
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            wrong.append(f"{name}: not installed")
            continue
        if site and have != pinned:
            wrong.append(f"{name}: {have} found first on the path, {pinned} carried")
        for text in md.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue
            try:
                dep = md.version(req.name)
            except md.PackageNotFoundError:
                unmet.append(f"{name} needs {req}: not installed")
                continue
            if not req.specifier.contains(Version(dep), prereleases=True):
                unmet.append(f"{name} needs {req}: {dep} installed")
    figures.update(pins_not_first=wrong, unmet_requirements=unmet)
    problems += [f"cannot import {', '.join(broken)}"] if broken else []
    problems += wrong if site else []
    if not rehearse and not torch.cuda.is_available():
        problems.append("torch sees no CUDA device")
    if not rehearse and not figures.get("bitsandbytes_cuda"):
        problems.append(f"bitsandbytes loaded {figures.get('bitsandbytes_library')}, not a CUDA library")
    if problems:
        return {"status": "failed", "reason": "; ".join(problems), "figures": figures}
    where = figures.get("device", "CPU")
    note = f"; {len(unmet)} requirement(s) of the image not met (see figures)" if unmet else ""
    return {"status": "passed", "reason": f"{where}, torch {torch.__version__}, bitsandbytes library "
            f"{figures.get('bitsandbytes_library')}{note}", "figures": figures}
