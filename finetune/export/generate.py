"""`ft generate`: load a run, an adapter or a merged export, apply the chat template and stream answers.

What PATH can be:
- a run folder (or a stage's `adapter/` inside one): the base is loaded as the recipe says (4-bit for QLoRA) and the
  stage's adapter put on top, which is the trained model exactly;
- an adapter export or any PEFT folder: the base named in adapter_config.json (or `base`), in 4-bit when
  export.json says the adapter was trained on a 4-bit base;
- a merged export or any transformers model folder: loaded as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.errors import FinetuneError
from finetune.recipe.checks import looks_like_hub_id
from finetune.run.files import read_json


@dataclass
class Loaded:
    """A model ready to generate, its tokenizer, and a one-line description of what was loaded."""

    model: Any
    tokenizer: Any
    description: str
    raw: bool = False  # complete plain text by default: trained on text only, or no chat template to answer through

    def __post_init__(self) -> None:
        self.raw = self.raw or not self.tokenizer.chat_template


def _run_folder(path: Path) -> tuple[Path, str | None] | None:
    """(run folder, stage) when `path` is a run folder or a stage's `adapter/` inside one.

    Told apart by their own files, not by where they sit: an export (`export.json`) stays an export even in
    `RUN/export/`, where `ft export` puts it by default.
    """
    if (path / "recipe.yaml").exists():
        return path, None
    if (path / "export.json").exists():
        return None
    if path.name == "adapter" and (path / "adapter_config.json").exists() and (path.parent / "summary.json").exists() \
            and (path.parent.parent / "recipe.yaml").exists():
        return path.parent.parent, path.parent.name
    return None


def enclosing_run(path: Path) -> Path | None:
    """The run folder whose `ft train` could change `path`: the run itself, a stage's adapter in it, or an export in
    its `export/` folder (None for anything else)."""
    run = _run_folder(path)
    if run is not None:
        return run[0]
    if path.parent.name == "export" and (path.parent.parent / "recipe.yaml").exists():
        return path.parent.parent
    return None


def load(path: str | Path, stage: str | None = None, base: str | None = None) -> Loaded:
    """Load whatever `path` holds for generation (see the module docstring), holding its run's lock shared meanwhile
    (`ft train` of that run refuses to start; a run being trained is refused)."""
    from finetune.run.lock import reading

    path = Path(path)
    if not path.exists():
        raise FinetuneError(f"{path} does not exist; pass a run folder, an adapter folder or a merged export")
    with reading(enclosing_run(path), "ft generate"):
        return _load(path, stage, base)


def _load(path: Path, stage: str | None, base: str | None) -> Loaded:
    run = _run_folder(path)
    if run is not None:
        return _load_run(run[0], stage or run[1])
    if stage is not None:
        raise FinetuneError(f"--stage applies to run folders; {path} is not one (no recipe.yaml)")
    if (path / "adapter_config.json").exists():
        return _load_adapter(path, base)
    if (path / "config.json").exists():
        from transformers import AutoModelForCausalLM

        from finetune.model.loading import load_tokenizer

        tokenizer = load_tokenizer(None, str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto")
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        return Loaded(model.eval(), tokenizer, f"model folder {path}", _text_only(path))
    raise FinetuneError(
        f"{path} holds neither a run (recipe.yaml), an adapter (adapter_config.json) nor a model (config.json)"
    )


def _load_run(run_dir: Path, stage: str | None) -> Loaded:
    from finetune.export.merge import build_reference
    from finetune.export.runstage import open_run
    from finetune.model.loading import load_tokenizer

    run = open_run(run_dir, stage)
    tokenizer = load_tokenizer(run.recipe.model, str(run.tokenizer_dir))
    model = build_reference(run.recipe, run.adapter, tokenizer)
    quant = run.recipe.quantization.mode
    how = f"{quant} base" if quant != "none" else "base"
    text_only = bool(read_json(run_dir / run.stage.name / "summary.json", {}).get("metrics", {}).get("text_only"))
    return Loaded(model, tokenizer, f"run {run_dir}, stage {run.stage.name} ({how} + adapter, as trained)", text_only)


def _load_adapter(path: Path, base: str | None) -> Loaded:
    from transformers import AutoModelForCausalLM

    from finetune.export.merge import restore_adapter_dtype
    from finetune.model import bnb_cpu
    from finetune.model.adapters import load_trained
    from finetune.model.loading import bnb_config, load_tokenizer, resolve_dtype
    from finetune.recipe.schema import QuantizationConfig

    base = base or read_json(path / "adapter_config.json", {}).get("base_model_name_or_path")
    if not base or not (Path(base).exists() or looks_like_hub_id(base)):
        raise FinetuneError(
            f"{path}: the base model '{base}' named in adapter_config.json is not here; pass its folder with --base"
        )
    meta = read_json(path / "export.json", {})
    try:
        quant = QuantizationConfig(**meta["quantization"]) if isinstance(meta.get("quantization"), dict) else None
    except ValueError as e:  # pydantic's ValidationError: an export.json from another version of the toolkit
        raise FinetuneError(f"{path}/export.json: unreadable quantization section ({e})") from None
    dtype = resolve_dtype("auto")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None and quant.mode != "none":
        # Trained on a 4-bit base: load it the same way so the adapter meets the weights it learned against.
        kwargs["quantization_config"] = bnb_config(quant, dtype)
        if not torch.cuda.is_available():
            kwargs["device_map"] = {"": "cpu"}
    tokenizer = load_tokenizer(None, str(path))
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    bnb_cpu.fix_model(model)
    if quant is not None and quant.mode != "none" and quant.experts:  # the experts in NF4 too, as trained
        from finetune.model.families import traits
        from finetune.model.moe_experts import quantize_experts

        compute = dtype if quant.compute_dtype == "auto" else resolve_dtype(quant.compute_dtype)
        quantize_experts(model, traits(model.config.model_type).expert_parameters, compute, quant.double_quant)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model = restore_adapter_dtype(load_trained(model, path).eval(), path)  # with finetune's expert adapters
    how = f"{quant.mode} base" if quant is not None and quant.mode != "none" else "base"
    return Loaded(model, tokenizer, f"adapter {path} on {how} {base}", _text_only(path))


def _text_only(path: Path) -> bool:
    """An export of a stage trained on text only (its export.json says so)."""
    return bool(read_json(path / "export.json", {}).get("text_only"))


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"--prompts-file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise FinetuneError(f"--prompts-file {path} has no prompt (one per line)")
    return prompts


@torch.no_grad()
def generate(loaded: Loaded, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
             system: str | None = None, stream: bool = True, raw: bool | None = None) -> str:
    """The model's answer to one user prompt, rendered with the chat template, or its continuation of the prompt as
    plain text (`raw`; None: `loaded.raw`); printed as it comes when `stream`."""
    from transformers import TextStreamer

    from finetune.data.templates import stop_ids

    tokenizer, model = loaded.tokenizer, loaded.model
    raw = loaded.raw if raw is None else raw
    if raw:
        if system:
            raise FinetuneError("--system needs a chat template; a raw completion has no system message")
        inputs = tokenizer(prompt, return_tensors="pt")  # with the bos the tokenizer adds, as text training had
    elif not tokenizer.chat_template:
        raise FinetuneError("the tokenizer has no chat template to answer through; use --raw to complete the prompt "
                            "as plain text")
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    sampling: dict[str, Any] = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
        "do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                         eos_token_id=stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
