"""The recipe: one typed, validated description of a whole fine-tuning run.

Every field is documented once, here, by the docstring under it. `ft explain` and `docs/recipe.md` show that text.
Reading YAML (`extends:`, `--set` overrides, friendly errors) lives in `finetune.recipe.loading`, which knows no
schema; `load_recipe` here joins the two. Importing this module is cheap (no torch).

Over 300 lines for a reason: the schema is one document, section by section, and its field docstrings are the
reference (`ft explain`, docs/recipe.md); splitting it would scatter the docs.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, model_validator

from finetune.recipe import loading

DType = Literal["float32", "bfloat16", "float16", "auto"]



def _yaml_on_off(value: Any) -> Any:
    """YAML reads a bare `on`/`off` (in a recipe or a `--set`) as true/false: the words meant, for on/off keys."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, docstrings under fields are their docs."""

    # The docstrings under fields become their descriptions in `__pydantic_init_subclass__`, from one parse of the
    # defining file. pydantic's `use_attribute_docstrings` re-reads the source for every class: ~0.2 s of CPU on every
    # `ft` command that loads a recipe (most of `ft validate`).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        module = sys.modules.get(cls.__module__)
        docs = _attribute_docstrings(getattr(module, "__file__", None) or "").get(cls.__qualname__, {})
        for name, doc in docs.items():
            field = cls.model_fields.get(name)
            if field is not None and field.description is None:
                field.description = doc


@functools.cache
def _attribute_docstrings(path: str) -> dict[str, dict[str, str]]:
    """{class name: {field: the string literal right under its annotated assignment}} for a file's top-level classes."""
    if not path.endswith(".py") or not Path(path).is_file():
        return {}
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(Path(path).read_text(encoding="utf-8")).body:
        if not isinstance(node, ast.ClassDef):
            continue
        attrs, target = {}, None
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                target = stmt.target.id
                continue
            if (target and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)):
                attrs[target] = inspect.cleandoc(stmt.value.value)
            target = None
        out[node.name] = attrs
    return out


class ModelConfig(Section):
    name_or_path: str = "models/tiny-chat"
    """Base model: a local folder (resolved against the current directory), a Hugging Face Hub id such as
    `Qwen/Qwen2.5-0.5B-Instruct`, or a `.gguf` file (Ollama, LM Studio, llama.cpp): dequantized once by transformers'
    GGUF reader and cached as safetensors under `gguf_cache`, keyed by the file's sha256."""
    gguf_file: str | None = None
    """When `name_or_path` is a folder holding GGUF files: the one to fine-tune from (its file name)."""
    gguf_cache: str = ".cache/finetune/gguf"
    """Where a GGUF base is kept dequantized (one folder per file hash, safetensors); the second run starts from it."""
    revision: str | None = None
    """Hub branch, tag or commit of the base model. Pin a commit for reproducible runs. Ignored for local folders."""
    hub_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")] | None = None
    """When `name_or_path` is a local copy of a Hub model: its Hub id (OWNER/NAME). Exports then name it as their base
    (adapter_config.json, model card) instead of the local folder, so that an uploaded adapter loads anywhere."""
    dtype: DType = "auto"
    """Dtype of the weights that are not quantized. `auto`: bfloat16 on a GPU that supports it, else float32."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model repository. Off unless you have read that code."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    """Attention backend passed to transformers. None lets transformers choose (sdpa where available)."""


class QuantizationConfig(Section):
    mode: Literal["none", "nf4", "fp4"] = "none"
    """`nf4`: load the base in 4-bit NormalFloat through bitsandbytes (QLoRA). `none`: plain LoRA on the dtype above."""
    double_quant: bool = True
    """Quantize the 4-bit block scales a second time (saves about 0.4 bits per parameter)."""
    compute_dtype: DType = "auto"
    """Dtype the 4-bit weights are dequantized to for each matmul. `auto`: the model dtype."""
    quant_storage: DType = "auto"
    """Storage dtype of the packed 4-bit weights. FSDP needs it equal to the compute dtype; `auto` keeps uint8."""
    experts: bool = False
    """Mixture-of-Experts models: quantize the experts too (bitsandbytes converts `nn.Linear` layers only, and
    transformers 5 keeps the experts as fused 3D weights, most of such a model: 54 of Qwen3-30B-A3B's 57 GB in bf16).
    Each expert's weight becomes NF4 on its own (bitsandbytes' `quantize_4bit`, blocks of 64, `double_quant` as set),
    and the forward runs only the experts each token is routed to, dequantizing them inside the matmul
    (`finetune/model/moe_experts.py`). Needs `mode: nf4`. The 4-bit experts stay frozen; `lora.experts: shared` or
    `per_expert` trains low-rank updates beside them in finetune's own experts forward. No effect on dense models."""


class LoraConfig(Section):
    r: Annotated[int, Field(ge=1, le=4096)] = 16
    """LoRA rank: the width of the low-rank update. 8-64 is usual; more rank, more capacity and memory. Like every
    `lora` key, ignored by a stage that starts from a saved adapter (`init_from`; DPO after SFT): that adapter keeps
    its own settings, and the stage warns once, naming the keys that differ from its adapter_config.json."""
    alpha: Annotated[float, Field(gt=0)] = 32
    """LoRA scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA). Ignored when the
    stage starts from a saved adapter (see `r`)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout on the LoRA branch input. 0 is the fast path and is what the fused kernels assume by default. Ignored
    when the stage starts from a saved adapter (see `r`)."""
    target_modules: str | list[str] = "all-linear"
    """Which linear layers get adapters: `all-linear` (every linear layer but the LM head) or a list of module names
    such as [q_proj, v_proj]. Ignored when the stage starts from a saved adapter (see `r`)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r), which keeps high ranks trainable. Ignored when the stage
    starts from a saved adapter (see `r`)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA). Slower; merged export of DoRA adapters is refused. Ignored when the stage
    starts from a saved adapter (see `r`)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved with the adapter, e.g. [embed_tokens, lm_head] when adding tokens. Ignored
    when the stage starts from a saved adapter (see `r`)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained. Ignored when the stage starts from a saved adapter (see `r`)."""
    init_weights: Literal["default", "gaussian", "pissa", "olora"] | bool = True
    """Adapter initialisation passed to peft (`true` is peft's default: B = 0, so training starts at the base).
    Ignored when the stage starts from a saved adapter (see `r`)."""
    experts: Literal["none", "shared", "per_expert"] = "none"
    """Mixture-of-Experts models (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE): LoRA on the experts. `none`: the experts stay
    frozen and the other linear layers get adapters (attention, Qwen2-MoE's shared expert; not the dense MLP layers of
    a Qwen3-MoE with `mlp_only_layers`, whose names peft 0.21 would move onto the experts), the smallest adapter: 13M
    trainable parameters for Qwen3-30B-A3B at r=16.
    `per_expert`: every expert of every layer gets its own rank-`r` update of its fused gate/up and down weights
    (peft's `target_parameters`): r x (2 x hidden + 3 x expert size) weights per expert, 629M more for Qwen3-30B-A3B
    at r=16 (9.4 GB more of weights, gradients and AdamW state), and peft builds each layer's whole expert stack with
    the update added, which the backward keeps (one layer's with gradient checkpointing, else every layer's); LoRA
    dropout cannot apply to it (set `dropout: 0`). With `quantization.experts: true` the update is finetune's own
    (A [experts, r, in], B [experts, out, r] per fused weight, added inside each expert's 4-bit computation), as with
    `expert_rank: by_routing`.
    `shared`: one rank-`r` update per fused weight and layer, added to every expert of that layer inside its
    computation (before the activation): r x (2 x hidden + 3 x expert size) weights per layer, on 4-bit or plain
    experts. finetune's own adapters (`finetune/model/expert_adapters.py`), saved beside peft's as
    `expert_adapter.safetensors`, which finetune loads again (later stages, --resume, ft eval, ft generate, merged
    export) and peft alone does not; sft stages only.
    No effect on dense models. Ignored when the stage starts from a saved adapter (see `r`)."""
    expert_rank: Literal["uniform", "by_routing"] = "uniform"
    """`lora.experts: per_expert` only: `uniform` gives every expert rank `r`; `by_routing` measures how often each
    expert is routed to on the first training batches (a short forward before training) and gives each expert of a
    layer a rank proportional to its share (at least 1), the layer's ranks summing to experts x `r`: the same
    trainable parameters as `uniform`, held as one A and B per expert of its own rank (finetune's own adapters, as
    with `shared`; sft stages only)."""
    router: bool = False
    """Mixture-of-Experts models: LoRA on the router (the gate that picks each token's experts) too. Off: the routing
    the model was trained with is kept. Needs `dropout: 0`, like `experts: per_expert`. No effect on dense models."""


DataFormat = Literal["auto", "messages", "alpaca", "sharegpt", "prompt_completion", "text", "preference", "unpaired",
                     "prompts"]


class DatasetSource(Section):
    path: str
    """A local file (.jsonl, .json, .parquet, .csv), a folder of them, a `save_to_disk` folder, or a Hub dataset id."""
    format: DataFormat = "auto"
    """Row format. `auto` detects it from the columns and reports what it found. `messages` and `sharegpt` rows may
    hold assistant tool calls (`tool_calls`; sharegpt `function_call` turns), tool results (`tool` / `observation`
    turns), reasoning (`reasoning_content`, `thinking`, or `<think>...</think>`) and a `tools` column of JSON schemas
    (README "Tool calls and reasoning"). `unpaired` (kto stages): prompt, completion and a true/false `label`.
    `prompts` (grpo stages): a `prompt` and, for answer-checking rewards, an `answer`."""
    split: str = "train"
    """Split to read (Hub datasets and `save_to_disk` dataset dicts)."""
    subset: str | None = None
    """Hub dataset configuration (subset) name, e.g. `main` for gsm8k."""
    revision: str | None = None
    """Hub dataset revision."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Column mapping from the format's field names to yours, e.g. {instruction: question, output: answer}."""
    weight: Annotated[float, Field(gt=0)] | None = None
    """Share of this source in the training mix, relative to the other sources' weights (set it on all train
    sources or none). The mix keeps the total row count; a source is subsampled or repeated to reach its share.
    None: every row once."""
    max_samples: Annotated[int, Field(ge=1)] | None = None
    """Keep at most this many rows of this source (after shuffling with the seed): quick runs, or mixing by sample
    count."""


class DataConfig(Section):
    train: list[DatasetSource] = Field(default_factory=list)
    """Training datasets; several are concatenated (or mixed by their `weight`)."""
    eval: list[DatasetSource] = Field(default_factory=list)
    """Evaluation datasets for the eval loss. Empty: take `eval_fraction` of train, or no eval."""
    eval_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Share of each training source's rows held out for the eval loss when `eval` is empty (drawn with the seed;
    the last rows when `shuffle` is off)."""
    template: str = "tokenizer"
    """Chat template: `tokenizer` (the tokenizer's own; a base model without one gets `chatml` or `plain`, with a
    notice), a registry name (chatml, llama-3, mistral, gemma, phi-3, plain), or a path to a Jinja file."""
    train_on: Literal["assistant", "all"] = "assistant"
    """Which tokens carry labels: every assistant turn (and its end-of-turn token), or the whole text."""
    train_on_reasoning: bool = True
    """Train on the reasoning of assistant turns (`reasoning_content` / `thinking` fields, or `<think>...</think>` in
    the content) as the chat template renders it. False: the reasoning and its closing marker carry no label, so the
    model learns the answer and tool calls given the reasoning. Needs `train_on: assistant`."""
    special_tokens_in_content: Literal["refuse", "escape", "allow"] = "refuse"
    """Text of the tokenizer's special tokens (`<|im_end|>`, `</s>`...) inside a message's content, reasoning or tool
    call, which the tokenizer would read as the control token itself (a forged turn). `refuse`: such rows are refused,
    naming file and line (by `ft validate`, `ft data preview` and `ft train`). `escape` (sft stages): tokenized as
    plain text; rows without it keep the very same ids. `allow`: tokenized as control tokens (counted in the
    preview). Plain `text` rows are not checked."""
    max_length: Annotated[int, Field(ge=8)] = 1024
    """Longest sample in tokens (and the length of a packed row with `packing`)."""
    length_policy: Literal["truncate", "drop"] = "truncate"
    """What to do with samples over `max_length`: cut the end, or leave them out. The count affected is reported."""
    packing: bool = False
    """Padding-free packing for SFT: whole samples share rows of up to `max_length` tokens, positions restart per
    sample and no token attends across samples. `training.micro_batch_size` then counts packed rows."""
    padding_free: bool = True
    """Micro-batches without padding: the batch's samples (for DPO: the chosen and rejected sequences) run back to
    back in one row, positions restarting per sample, attention never crossing samples (per-sample attention, or
    varlen flash attention). Same samples per step and same loss as padded batches, but no compute or memory spent on
    padding (a third to a half of the slots of padded batches of log-normal lengths in our benchmark). Off for models
    loaded with `trust_remote_code`, whose attention code may ignore the restarting positions. `packing` (SFT)
    implies it."""
    shuffle: bool = True
    """Shuffle the training rows with the recipe seed."""
    num_proc: Annotated[int, Field(ge=1)] | None = None
    """Processes that tokenize the data (on Arrow, with `datasets.map`). None: one per CPU core (small sources use
    fewer: starting a process costs more than tokenizing a few thousand rows)."""
    streaming: bool = False
    """Read the training sources lazily instead of preprocessing them first (local files through the `datasets`
    streaming builders, Hub datasets with `streaming=True`): rows are shuffled in blocks of `shuffle_buffer`,
    tokenized and packed on the fly, pass after pass; each process reads its own share (whole files when their count
    divides by the process count, else every n-th row). Needs `training.max_steps` (a stream has no length to count
    epochs in) and `data.eval` sources instead of `eval_fraction`; `max_samples` keeps a source's first rows. Every
    checkpoint records each process's position (`stream-rank<r>.json`), and resuming continues at that row without
    replaying the batches before it. The dry run and the checks before training look at the first 2,000 rows."""
    shuffle_buffer: Annotated[int, Field(ge=1)] = 10_000
    """With `streaming`: rows shuffled together (one block, each with its own seeded permutation; more: better mixed,
    more memory, a later first step, as the first block is tokenized before it). Packing fills its rows from groups
    of at most 2,000 samples of a block."""
    cache_dir: str | None = ".cache/finetune/data"
    """Folder (relative to the current directory) where preprocessed datasets are cached, keyed by the data files'
    content, the tokenizer, the template and this section. None: no cache."""
    task_eval: str | None = None
    """A held-out file with `messages` (+ `answer`) rows: greedy answers are scored (exact match) before and after
    training and written to the summary."""
    task_eval_max_new_tokens: Annotated[int, Field(ge=1)] = 24
    """Generation budget for each `task_eval` answer."""
    task_eval_max_rows: Annotated[int, Field(ge=1)] | None = 200
    """The held-out measure before and after a stage uses the first this many `task_eval` rows (generation is the
    slow part on a real model: about a second per answer on a CPU). None: every row. `ft eval` has its own
    `eval.max_rows`."""

    @model_validator(mode="after")
    def _data_rules(self) -> DataConfig:
        problems = []
        weighted = [src.weight is not None for src in self.train]
        if any(weighted) and not all(weighted):
            problems.append("data.train: set `weight` on every source or on none (weights are shares of the mix)")
        if any(src.weight is not None for src in self.eval):
            problems.append("data.eval: `weight` applies to training sources only")
        if not self.train_on_reasoning and self.train_on == "all":
            problems.append("data.train_on_reasoning: false masks the reasoning inside assistant turns; it needs "
                            "train_on: assistant (train_on: all trains every token)")
        if self.eval and self.eval_fraction:
            problems.append("data: both `eval` sources and `eval_fraction` are set; keep one")
        if self.streaming and self.eval_fraction:
            problems.append("data.eval_fraction: a stream cannot hold out a share of rows it has not read; with "
                            "data.streaming: true give eval sources under data.eval")
        if problems:
            raise ValueError("\n".join(problems))
        return self


Precision = Literal["auto", "fp32", "bf16", "fp16"]


def metric_is_lower_better(metric: str) -> bool:
    """Losses and perplexities improve downwards; rates and accuracies upwards."""
    return "loss" in metric or "perplexity" in metric


class EarlyStoppingConfig(Section):
    metric: str = "eval_loss"
    """Metric watched at every evaluation: `eval_loss` (lower is better) or a task metric of a sample of
    `data.task_eval`, `task_<metric>` such as `task_exact_match` (higher is better)."""
    patience: Annotated[int, Field(ge=1)] = 3
    """Evaluations in a row without improvement before the stage stops."""
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    """Smallest change that counts as an improvement."""


class TrainingConfig(Section):
    epochs: Annotated[float, Field(gt=0)] = 1
    """Passes over the training data. Ignored when `max_steps` is set."""
    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many optimizer steps (overrides `epochs`)."""
    micro_batch_size: Annotated[int, Field(ge=1)] = 4
    """Samples per forward pass per device."""
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    """Micro-batches per optimizer step. Global batch = micro_batch_size x this, whatever the process count (the
    split over processes is set by `distributed.keep_global_batch`)."""
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 2e-4
    """Peak learning rate of the adapter weights."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Share of the steps spent warming up linearly from 0. Ignored when `warmup_steps` > 0."""
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    """Warmup in optimizer steps."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """AdamW decoupled weight decay on the trainable weights."""
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    """Gradient clipping by global norm (0 disables)."""
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"] = "adamw_torch"
    """Optimizer. The 8-bit ones come from bitsandbytes and need a GPU."""
    seed: int = 42
    """Seed for data order, adapter init and dropout."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (about 30% slower)."""
    lean_saves: bool = True
    """In training, do not keep for backward what cheap elementwise work recreates (each RMSNorm's output, a gated
    MLP's activation and product, the per-sample attention's output): backward recreates them from tensors kept
    anyway, with the same values, so loss and gradients do not change. About 40% less activation memory without
    gradient checkpointing (SmolLM2-135M), a few percent more elementwise work. Llama, Qwen, Mistral and Gemma
    families; not with `offload_activations`."""
    tiled_mlp: Literal["auto", "off"] | Annotated[int, Field(ge=2)] = "auto"
    """Run each layer's MLP over tiles of the sequence in training, so that the MLP's intermediate activations (3 x
    intermediate size per token) of one tile only are alive; each tile's forward is recomputed in backward (one more
    MLP forward per step), loss and gradients stay the same. `auto`: rows longer than 4096 tokens, in tiles of about
    2048 tokens (long context; shorter rows are left whole); `off`; or a number of tiles for every row. Dense MLPs
    only (Mixture-of-Experts blocks are left whole)."""
    offload_activations: bool = False
    """On a GPU, move the tensors the forward keeps for backward to pinned host memory as they are saved, and back
    when backward needs them (with gradient checkpointing: each layer's input, the bulk of what remains at long
    context). Costs the copies over PCIe; loss and gradients stay the same. No effect on the CPU (nothing to move)."""
    release_host_memory: Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_on_off)] = "auto"
    """CPU training: have glibc map every block of 1 MB or more on its own and return it to the system when freed,
    so that the process's resident memory follows the tensors alive instead of climbing with the heap's fragments
    (3.5x less peak memory on an 8k-token row, about 15% slower; on short rows the zero-filled fresh pages cost more,
    31% on SmolLM2-135M). `auto`: 1 MB for rows over 4096 tokens (`data.max_length`), 4 MB for shorter rows (30%
    less peak memory on SmolLM2-135M at about the same speed); `on`: 1 MB; `off`: glibc's default. No effect on a
    GPU run."""
    precision: Precision = "auto"
    """Autocast precision. `auto`: bf16 on a GPU that supports it, fp16 on other GPUs, fp32 on CPU."""
    logging_steps: Annotated[int, Field(ge=1)] = 5
    """Log metrics every this many optimizer steps."""
    eval_steps: Annotated[int, Field(ge=1)] | None = None
    """Compute the eval loss every this many steps (None: at the end of the stage only)."""
    save_steps: Annotated[int, Field(ge=1)] | None = None
    """Also write a resumable checkpoint every this many steps (None: by time and epoch only, see `save_minutes`)."""
    save_minutes: Annotated[float, Field(ge=0)] = 30
    """Write a resumable checkpoint every this many minutes of training (0: none by time). Whatever this says, a
    checkpoint is also written at the end of each epoch and at the last step, so a killed run loses at most this
    much training."""
    save_total_limit: Annotated[int, Field(ge=1)] = 2
    """How many of the newest checkpoints to keep."""
    early_stopping: EarlyStoppingConfig | None = None
    """Stop the stage when an evaluated metric (every `eval_steps`) stops improving. None: train to the end."""
    keep_best: str | None = None
    """Make the stage's final adapter the one of the evaluation step with the best value of this metric
    (`eval_loss`, or `task_<metric>` such as `task_exact_match` with `data.task_eval`), instead of the last one. The
    summary names the step it came from. Needs `eval_steps`. None: the last adapter."""


def _all_optional(model: type[Section], name: str) -> type[Section]:
    """A copy of a section whose fields all default to None: for per-stage overrides of that section."""
    fields = {
        key: (
            (Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation) | None,
            Field(default=None, description=field.description),
        )
        for key, field in model.model_fields.items()
    }
    return create_model(name, __base__=Section, __doc__=f"Per-stage overrides of `{model.__name__}`.", **fields)


TrainingOverrides = _all_optional(TrainingConfig, "TrainingOverrides")


class DistributedConfig(Section):
    """How several processes share a run (`ft train --nproc N` or `accelerate launch`); one process ignores it."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    """`ddp`: every process holds the whole (4-bit) model and gradients are averaged; the fast choice whenever the
    model fits on one GPU, which QLoRA makes true for 7-8B models on 24 GB. `fsdp`: PyTorch FSDP2 shards weights,
    gradients and optimizer state over the GPUs. `deepspeed`: DeepSpeed ZeRO (needs the deepspeed package)."""
    keep_global_batch: bool = True
    """Keep the global batch (micro_batch_size x gradient_accumulation_steps) the same whatever the process count:
    with N processes the accumulation steps are divided by N, then the micro batch if needed; a batch that N does not
    divide is refused before training. False: each process runs the recipe's batch, so the global batch is N times
    larger."""
    find_unused_parameters: bool = False
    """ddp: search each step for weights that got no gradient. Only for models with conditional branches; slower."""
    fsdp_reshard_after_forward: bool = True
    """fsdp: free the gathered weights after each layer's forward (least memory, ZeRO-3-like). False keeps them until
    the backward (faster, more memory, ZeRO-2-like)."""
    fsdp_cpu_offload: bool = False
    """fsdp: keep the sharded weights and gradients in CPU memory between uses. Saves GPU memory, costs speed."""
    deepspeed_stage: Literal[1, 2, 3] = 2
    """deepspeed: ZeRO stage. 1 shards optimizer state, 2 also gradients, 3 also weights."""
    deepspeed_config: str | None = None
    """deepspeed: path of a complete DeepSpeed JSON config to use instead of the one built from `deepspeed_stage`.
    Write `auto` for batch sizes, precision and clipping: the trainer fills them in from the recipe."""

    def problems(self, recipe: Recipe) -> list[str]:
        """Combinations that cannot work, each with the reason (cross-field rules of this section)."""
        out: list[str] = []
        owner = {"find_unused_parameters": "ddp", "fsdp_reshard_after_forward": "fsdp", "fsdp_cpu_offload": "fsdp",
                 "deepspeed_stage": "deepspeed", "deepspeed_config": "deepspeed"}
        # A resolved recipe (run folder's recipe.yaml) writes every key out: only values that differ from the
        # default say the user meant another strategy.
        changed = {k for k, field in type(self).model_fields.items() if getattr(self, k) != field.default}
        for key in sorted(changed & owner.keys()):
            if owner[key] != self.strategy:
                out.append(f"distributed.{key} applies to strategy '{owner[key]}' only, and the recipe uses "
                           f"'{self.strategy}'; remove the key or change distributed.strategy")
        if self.deepspeed_config is not None and "deepspeed_stage" in changed:
            out.append("distributed.deepspeed_stage is not used when distributed.deepspeed_config names a full "
                       "DeepSpeed config; set the stage in that file and remove deepspeed_stage")
        sharded = self.strategy == "fsdp" or (self.strategy == "deepspeed" and self.deepspeed_stage == 3)
        q = recipe.quantization
        if sharded and q.mode != "none":
            how = "FSDP" if self.strategy == "fsdp" else "DeepSpeed ZeRO-3"
            compute = q.compute_dtype if q.compute_dtype != "auto" else recipe.model.dtype
            why = (f"QLoRA with {how} shards the 4-bit weights together with the other weights, so they must be stored "
                   "in the compute dtype")
            if compute == "auto":
                out.append(f"quantization.compute_dtype: {why}; set quantization.compute_dtype (bfloat16 on recent "
                           "GPUs) and quantization.quant_storage to the same dtype")
            elif q.quant_storage != compute:
                out.append(f"quantization.quant_storage is '{q.quant_storage}': {why}; set quantization.quant_storage: "
                           f"{compute} (the compute dtype)")
        if self.strategy == "fsdp" and recipe.kernels.enabled():
            out.append("kernels: the fused kernels read LoRA weights that FSDP keeps sharded outside the kernel's "
                       "module; turn kernels off with distributed.strategy fsdp, or use ddp")
        return out


class DPOConfig(Section):
    beta: Annotated[float, Field(gt=0)] = 0.1
    """Strength of the KL tie to the reference policy. Lower lets the policy move further. The logged rewards are
    beta x (policy - reference) log-probs of a whole answer."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """`sigmoid` is the DPO paper's loss; `ipo` and `hinge` are the IPO and SLiC variants."""
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    """Assumed share of flipped preference labels: conservative DPO, -(1-e) log s(z) - e log s(-z). Sigmoid loss
    only."""
    reference: str = "sft"
    """Reference policy: `sft` (a frozen copy of the adapter this stage starts from, loaded as a second adapter on
    the same base), `base` (the adapter disabled), or a path to an adapter folder (loaded frozen). Printed at the
    start of the stage and recorded in its summary.json."""
    precompute_ref_log_probs: bool = False
    """Compute the reference log-probs of every pair once before training, then free the reference adapter (one
    forward less per step)."""
    nll_weight: Annotated[float, Field(ge=0)] = 0.0
    """Weight of an added loss: the mean negative log-likelihood of the chosen answers' tokens (RPO; trl's
    `rpo_alpha`). It keeps the chosen answers likely while DPO pushes the rejected ones down, which matters when a
    rejected answer contains the right one (e.g. wrapped in hedging). 0: plain preference loss."""


def _refuse_reference(method: str):
    """A `mode="before"` validator for the reference-free methods: a `reference` key gets its own explanation."""

    def check(cls, data: Any) -> Any:
        if isinstance(data, dict) and "reference" in data:
            raise ValueError(f"{method} is reference-free (the policy is compared with itself, no second model): "
                             "remove `reference`, or use a dpo or kto stage to align against a reference policy")
        return data

    return model_validator(mode="before")(check)


class KTOConfig(Section):
    """KTO: align on unpaired answers marked desirable or undesirable (thumbs up/down), against a reference policy."""

    beta: Annotated[float, Field(gt=0)] = 0.1
    """Strength of the tie to the reference policy; lower lets the policy move further."""
    desirable_weight: Annotated[float, Field(gt=0)] = 1.0
    """Weight of the loss on desirable answers. With unequal counts, keep desirable_weight x desirable count about
    equal to (up to 4/3 of) undesirable_weight x undesirable count (the KTO paper's rule)."""
    undesirable_weight: Annotated[float, Field(gt=0)] = 1.0
    """Weight of the loss on undesirable answers."""
    reference: str = "sft"
    """Reference policy, as for DPO: `sft` (a frozen copy of the adapter this stage starts from), `base` (adapter
    disabled), or a path to an adapter folder."""


class ORPOConfig(Section):
    """ORPO: the NLL of the chosen answer plus an odds-ratio term preferring it over the rejected one; no reference."""

    beta: Annotated[float, Field(gt=0)] = 0.1
    """Weight of the odds-ratio term beside the NLL of the chosen answer (the ORPO paper's lambda)."""

    _no_reference = _refuse_reference("orpo")


class SimPOConfig(Section):
    """SimPO: a length-normalised log-prob margin with a target margin; no reference model."""

    beta: Annotated[float, Field(gt=0)] = 2.0
    """Scale of the length-normalised (mean per-token) log-prob reward. The SimPO paper uses 2.0-2.5."""
    gamma: Annotated[float, Field(ge=0)] = 0.5
    """Target reward margin: the chosen answer's reward must beat the rejected one's by at least this (trl's
    `simpo_gamma`)."""
    nll_weight: Annotated[float, Field(ge=0)] = 0.0
    """Weight of an added NLL loss on the chosen answers (trl's `cpo_alpha`; CPO-SimPO when > 0). 0: plain SimPO."""

    _no_reference = _refuse_reference("simpo")


class CPOConfig(Section):
    """CPO: a DPO-style loss on the policy's own log-probs (no reference) plus the NLL of the chosen answers."""

    beta: Annotated[float, Field(gt=0)] = 0.1
    """Scale of the log-prob margin inside the loss."""
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    """`sigmoid` (the CPO paper's), `hinge` (SLiC) or `ipo`."""
    nll_weight: Annotated[float, Field(ge=0)] = 1.0
    """Weight of the NLL loss on the chosen answers (the behaviour-cloning term; trl's `cpo_alpha`)."""

    _no_reference = _refuse_reference("cpo")


class RewardSpec(Section):
    """One reward function of a GRPO stage (see `finetune.stages.rewards` for each kind and the user signature)."""

    kind: Literal["exact_match", "regex", "format", "length", "python"]
    """`exact_match`: 1 when the completion equals the row's `answer` once normalised, else 0. `regex`: 1 when
    `pattern` matches the completion. `format`: 1 when the whole completion matches `pattern` (full match). `length`:
    minus the words beyond `max_words` (a penalty, 0 when short enough). `python`: your function named in
    `function`."""
    weight: float = 1.0
    """Weight of this reward in the sum that GRPO normalises per group."""
    pattern: str | None = None
    """Regular expression (regex and format kinds)."""
    max_words: Annotated[int, Field(ge=1)] | None = None
    """Allowed words (length kind); each word beyond costs 1 (times `weight`)."""
    function: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")] | None = None
    """`module.path:function` (python kind), importable from the current directory; runs only with
    grpo.allow_reward_code. Called as
    `function(prompts, completions, answers, **columns) -> list[float]` with one float per completion."""

    @model_validator(mode="after")
    def _fields_of_kind(self) -> RewardSpec:
        needs = {"regex": "pattern", "format": "pattern", "length": "max_words", "python": "function"}
        problems = []
        if self.kind in needs and getattr(self, needs[self.kind]) is None:
            problems.append(f"a {self.kind} reward needs `{needs[self.kind]}`")
        for key in ("pattern", "max_words", "function"):
            if getattr(self, key) is not None and needs.get(self.kind) != key:
                problems.append(f"`{key}` does not apply to a {self.kind} reward; remove it")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                problems.append(f"`pattern` is not a valid regular expression: {e}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class GRPOConfig(Section):
    """GRPO: online RL on prompts. Each step samples completions per prompt from the policy, scores them with the
    rewards, and raises the ones above their group's mean, with a KL tie to the reference policy."""

    rewards: list[RewardSpec] = Field(default_factory=list)
    """Reward functions, summed with their weights. A grpo stage needs at least one."""
    allow_reward_code: bool = False
    """Let `ft train` import and run the `python` rewards' modules (your code, or code that came with someone else's
    recipe), like model.trust_remote_code. Off: such a recipe is refused before anything loads (`ft train
    --allow-code` turns it on for one run). `ft validate` and `ft data preview` never import them either way."""
    num_generations: Annotated[int, Field(ge=2)] = 4
    """Completions sampled per prompt (the group). The micro batch (completions per forward) must be a multiple of it:
    micro_batch_size x gradient_accumulation_steps counts completions, not prompts."""
    max_completion_length: Annotated[int, Field(ge=1)] = 32
    """Longest sampled completion in tokens."""
    temperature: Annotated[float, Field(gt=0)] = 1.0
    """Sampling temperature of the completions."""
    beta: Annotated[float, Field(ge=0)] = 0.04
    """Weight of the KL penalty to the reference policy (0: no reference forward at all)."""
    reference: str = "sft"
    """Reference policy of the KL term: `sft` (a frozen copy of the adapter this stage starts from), `base` (adapter
    disabled), or a path to an adapter folder."""
    use_vllm: bool = False
    """Generate with vLLM (colocated, needs the vllm package and a GPU). Off: transformers' generate, CPU or GPU."""
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo"] = "dapo"
    """How trl's GRPO loss sums its token terms. `dapo` (trl's default): over the active tokens of the whole
    accumulated batch, no length bias. `grpo`: per sequence, then over sequences (the original paper; favours short
    right answers and long wrong ones). `dr_grpo`: by a constant (max_completion_length), no length bias. `bnpo`: over
    the active tokens of the local micro-batch. `cispo`, `sapo`: clipped / soft-gated importance weights. `luspo`:
    GSPO scaled by length (needs `importance_sampling: sequence`)."""
    importance_sampling: Literal["token", "sequence"] = "token"
    """`token`: one importance ratio per token (GRPO). `sequence`: one ratio per completion, the mean of its token
    log-ratios (GSPO), often steadier with sequence-level rewards such as exact match."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage scaling: by the reward std within each group (GRPO), across the batch, or `none` (Dr. GRPO's
    advice: std scaling favours too-easy and too-hard prompts)."""

    @model_validator(mode="after")
    def _luspo_needs_sequence(self) -> GRPOConfig:
        if self.loss_type == "luspo" and self.importance_sampling != "sequence":
            raise ValueError("grpo.loss_type luspo is sequence-level: set grpo.importance_sampling: sequence")
        return self


_STAGE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class StageConfig(Section):
    name: str
    """Unique stage name; also the stage's folder in the run directory."""
    kind: Literal["sft", "dpo", "kto", "orpo", "simpo", "cpo", "grpo"]
    """What the stage trains: supervised fine-tuning, preference alignment on pairs with a reference (dpo) or without
    one (orpo, simpo, cpo), on unpaired thumbs-up/down answers (kto), or online RL against rewards (grpo)."""
    data: DataConfig | None = None
    """Data of this stage. None: the top-level `data` section."""
    training: TrainingOverrides = Field(default_factory=TrainingOverrides)  # type: ignore[valid-type]
    """Training keys that differ from the top-level `training` section for this stage."""
    init_from: str = "previous"
    """Adapter to start from: `previous` (the stage before, or a fresh adapter for the first stage), `new`, or a
    path to an adapter folder."""
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    """DPO settings (dpo stages only)."""
    kto: KTOConfig = Field(default_factory=KTOConfig)
    """KTO settings (kto stages only)."""
    orpo: ORPOConfig = Field(default_factory=ORPOConfig)
    """ORPO settings (orpo stages only)."""
    simpo: SimPOConfig = Field(default_factory=SimPOConfig)
    """SimPO settings (simpo stages only)."""
    cpo: CPOConfig = Field(default_factory=CPOConfig)
    """CPO settings (cpo stages only)."""
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    """GRPO settings and rewards (grpo stages only)."""


_METHOD_SECTIONS = ("kto", "orpo", "simpo", "cpo", "grpo")


def _alignment_problems(i: int, stage: StageConfig, where: str, data: DataConfig) -> list[str]:
    """Cross-field rules of the kto/orpo/simpo/cpo/grpo stages (issue 16)."""
    out = []
    for method in _METHOD_SECTIONS:
        section = getattr(stage, method)
        if stage.kind != method and section != type(section)():
            out.append(f"stages[{i}] ({stage.name}): the {method} settings apply to {method} stages only; remove them")
    if stage.kind not in _METHOD_SECTIONS:
        return out
    if data.packing:
        out.append(f"{where}: packing applies to SFT only; set data.packing: false for {stage.kind} stages")
    reference = getattr(getattr(stage, stage.kind), "reference", None)
    fresh = stage.init_from == "new" or (i == 0 and stage.init_from == "previous")
    if reference == "sft" and fresh and not (stage.kind == "grpo" and stage.grpo.beta == 0):
        out.append(f"stages[{i}] ({stage.name}): {stage.kind}.reference is 'sft' but there is no SFT adapter to start "
                   "from; put an sft stage before it, set init_from to an adapter path, or use reference: base")
    if stage.kind == "grpo" and not stage.grpo.rewards:
        out.append(f"stages[{i}] ({stage.name}): a grpo stage needs at least one reward under grpo.rewards, e.g. "
                   "[{kind: exact_match}] (see `ft explain stages.grpo.rewards`)")
    return out


def _batch_problems(i: int, stage: StageConfig, recipe: Recipe) -> list[str]:
    """Batch rules of trl's trainers: KTO estimates its KL term inside a micro batch (2 rows at least); GRPO samples
    whole groups (the completions of a step are a whole number of groups)."""
    try:
        t = recipe.stage_training(stage)
    except ValidationError:
        return []  # reported with its own message by validate_data
    if stage.kind == "kto":
        return [] if t.micro_batch_size > 1 else [
            f"stages[{i}] ({stage.name}): kto needs training.micro_batch_size of 2 or more (its KL estimate pairs each "
            "prompt with another row's answer inside the micro batch)"]
    n, batch = stage.grpo.num_generations, t.micro_batch_size * t.gradient_accumulation_steps
    if batch % n:
        return [f"stages[{i}] ({stage.name}): micro_batch_size x gradient_accumulation_steps ({batch}) counts "
                f"completions and must be a multiple of grpo.num_generations ({n}); e.g. micro_batch_size: {n}"]
    return []


def _output_dir_problems(template: str) -> list[str]:
    """`output.dir` may hold `{name}` and nothing else in braces (`runs/{}` would crash formatting)."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        return [f"output.dir: '{template}' is not a valid folder template ({e}); use `{{name}}` for the run name"]
    bad = [f for f in fields if f != "name"]
    if bad:
        return [f"output.dir: '{template}' holds {{{bad[0]}}}; only {{name}} (the run name) can be filled in. "
                "Write `{{` and `}}` for literal braces"]
    return []


class OutputConfig(Section):
    dir: str = "runs/{name}"
    """Run folder. `{name}` is replaced by the recipe name; no other `{...}` field is allowed."""
    overwrite: bool = False
    """Replace a run folder that already holds a run, finished or not (an unfinished one is otherwise continued with
    `ft train --resume`)."""


class WandbConfig(Section):
    project: str = "finetune"
    """Weights & Biases project."""
    entity: str | None = None
    """W&B team or user."""
    name: str | None = None
    """Run name (default: the recipe name)."""
    tags: list[str] = Field(default_factory=list)
    """Tags on the W&B run."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """`offline` writes the run locally for a later `wandb sync`."""


class TrackingConfig(Section):
    wandb: WandbConfig | None = None
    """Log to Weights & Biases as well as metrics.jsonl. The API key comes from WANDB_API_KEY or `wandb login`."""
    tensorboard: bool = False
    """Also write TensorBoard event files in the run folder."""


class KernelsConfig(Section):
    lora_linear: bool = False
    """Fused (QLoRA) linear: dequantize + base matmul + LoRA term in one op, no dequantized weight kept for backward."""
    lora_mlp: bool = False
    """Fused LoRA SwiGLU MLP that recomputes activations in backward."""
    lora_qkvo: bool = False
    """Fused LoRA attention projections."""
    fused_ce: bool = False
    """Chunked LM-head + cross-entropy (full logits never exist) for DPO's log-probs too, instead of trl's kernel.
    SFT's default loss head always uses it; stages on trl's own loss (kto, orpo, simpo, grpo) do not."""
    rmsnorm: bool = False
    """Fused RMSNorm."""
    rope: bool = False
    """Fused rotary embedding."""

    def enabled(self) -> list[str]:
        """Names of the kernel groups switched on."""
        return [k for k, v in self.model_dump().items() if v]


class HubConfig(Section):
    repo_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")] | None = None
    """Upload the final export to this Hub repo (OWNER/NAME) at the end of `ft train`. None: no upload.
    The token comes from HF_TOKEN or `hf auth login`; it is never printed or written."""
    private: bool = True
    """Create the repo as private (an existing repo keeps its visibility)."""
    format: Literal["adapter", "merged"] = "adapter"
    """What to upload: the adapter alone, or a merged model (verified against the trained model first). The export
    is written to `<run>/export/<stage>-<format>` and stays there if the upload fails."""
    revision: str | None = None
    """Branch to upload to (created when missing). None: main."""


TaskMetric = Literal["exact_match", "contains_answer", "token_f1", "regex", "choice_accuracy", "concise_rate"]


class TaskFile(Section):
    path: str
    """A `.jsonl` file of held-out rows: `messages` (a final assistant turn is dropped) or `prompt`, and `answer`;
    `choices` (a list of answers) for `choice_accuracy`, and optionally `pattern` (a regular expression) per row for
    `regex`."""
    metrics: list[TaskMetric] = Field(default_factory=lambda: ["exact_match", "contains_answer"])
    """What to score: `exact_match`, `contains_answer`, `token_f1` (SQuAD-style F1 over words), `regex` (the row's
    `pattern`, or `pattern` below, found in the answer), `choice_accuracy` (the choice the model finds likeliest is
    the answer), `concise_rate`."""
    pattern: str | None = None
    """Regular expression for `regex` rows without their own; `{answer}` stands for the row's answer (escaped)."""
    max_rows: Annotated[int, Field(ge=1)] | None = None
    """Score the first this many rows only."""


class EvalConfig(Section):
    """What `ft eval` measures besides the held-out loss of the stage's `data.eval`, and what training watches."""

    tasks: list[TaskFile] = Field(default_factory=list)
    """Task files scored by `ft eval`, each with its metrics (besides the stage's `data.task_eval`)."""
    preference: list[str] = Field(default_factory=list)
    """Preference files (`prompt`, `chosen`, `rejected`) for preference accuracy and margins (besides the eval data
    of a dpo stage)."""
    general_text: str | None = None
    """A general-text held-out file (`.txt`: one document per line, or `.jsonl` with `text`): the loss change against
    the base model and the mean per-token KL(base || tuned) measure forgetting. The project ships
    `data/general/heldout.txt` for the tiny model."""
    max_forgetting: Annotated[float, Field(gt=0)] | None = None
    """Largest acceptable increase of the general-text loss over the base model (nats per token). Above it the run
    is marked as forgetting in `ft eval`, `ft runs` and the report. None: no mark."""
    max_rows: Annotated[int, Field(ge=1)] | None = 200
    """At most this many rows (documents, pairs) per file in `ft eval`, to keep it quick. None: all."""
    sample_prompts: Annotated[int, Field(ge=0)] = 0
    """During training, at every `eval_steps`: greedy answers to the first this many `data.task_eval` prompts (the
    same ones every time), written to `<stage>/samples.jsonl`, the report and W&B (as a table). 0: none (3 is a
    good start)."""
    sample_task_rows: Annotated[int, Field(ge=0)] = 0
    """During training, at every `eval_steps`: the task metrics of this many `data.task_eval` rows, logged as
    `task_<metric>` (what `training.early_stopping` and `keep_best` can watch). 0: none."""


class Recipe(Section):
    name: str = "run"
    """Name of the run; used in the default output folder and trackers. A plain name (letters, digits, `-`, `_`,
    `.`); choose a folder elsewhere with `output.dir`."""
    extends: str | None = None
    """Path of a recipe this one starts from (resolved against this file's folder); keys here replace its keys."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Base model."""
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    """Base-weight quantization (QLoRA)."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """LoRA adapter."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Shared data section (stages may bring their own)."""
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    """Shared training settings (stages may override keys)."""
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """Several processes or GPUs: DDP, FSDP or DeepSpeed, and how the batch is split."""
    stages: list[StageConfig] = Field(default_factory=list)
    """Stages run in order into one run folder. Empty: one `sft` stage on the top-level data."""
    output: OutputConfig = Field(default_factory=OutputConfig)
    """Where results go."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Experiment tracking."""
    kernels: KernelsConfig = Field(default_factory=KernelsConfig)
    """Opt-in fused kernels (all off by default)."""
    hub: HubConfig = Field(default_factory=HubConfig)
    """Hugging Face Hub upload."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation (`ft eval`, forgetting, samples during training)."""

    def __init__(self, **data: Any) -> None:
        """`Recipe(model={...}, data={...})` in Python: a wrong key or value raises RecipeError as YAML does."""
        try:
            super().__init__(**data)
        except ValidationError as e:
            if loading.VALIDATING.get():  # a recipe file: `loading.validate` words the errors, with their lines
                raise
            problems = [line for err in e.errors() for line in loading.explain(Recipe, err, {}).split("\n")]
            raise loading.RecipeError("Recipe(...)", list(dict.fromkeys(problems))) from None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Recipe:
        problems: list[str] = []
        if not _STAGE_NAME.match(self.name):
            problems.append(f"name: '{self.name}' must be a plain name (letters, digits, '-', '_', '.'); it names "
                            "the run folder under runs/. To write the run elsewhere, set output.dir to that path")
        problems += _output_dir_problems(self.output.dir)
        names = [s.name for s in self.stages]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"stages: the stage name '{dup}' is used more than once; stage names must be unique")
        for i, stage in enumerate(self.effective_stages()):
            data = stage.data or self.data
            where = f"stages[{i}] ({stage.name})" if self.stages else "data"
            if not data.train:
                problems.append(f"{where}: no training data; add at least one entry under data.train")
            if not _STAGE_NAME.match(stage.name) or stage.name == "tokenizer":
                problems.append(
                    f"stages[{i}].name: '{stage.name}' must be a plain folder name (letters, digits, '-', '_') other "
                    "than 'tokenizer'; it is the stage's folder in the run directory"
                )
            # compared with the defaults, not "was the key written": a run folder's recipe.yaml writes every key
            if stage.kind == "sft" and stage.dpo != DPOConfig():
                problems.append(f"stages[{i}] ({stage.name}): the dpo settings apply to dpo stages only; remove them")
            if stage.kind == "dpo":
                fresh = stage.init_from == "new" or (i == 0 and stage.init_from == "previous")
                if fresh and stage.dpo.reference == "sft":
                    problems.append(
                        f"stages[{i}] ({stage.name}): dpo.reference is 'sft' but there is no SFT adapter to start "
                        "from; put an sft stage before it, set init_from to an adapter path, or use reference: base"
                    )
                if data.packing:
                    problems.append(f"{where}: packing applies to SFT only; set data.packing: false for dpo stages")
            problems += _alignment_problems(i, stage, where, data)
            if stage.kind != "sft" and data.special_tokens_in_content == "escape":
                problems.append(f"{where}: special_tokens_in_content: escape applies to sft stages (trl tokenizes "
                                f"{stage.kind} rows itself); use refuse (the default) or allow")
            if stage.kind in ("grpo", "kto"):
                problems += _batch_problems(i, stage, self)
            try:
                training = self.stage_training(stage)
            except ValidationError:  # reported with its YAML path by validate_data
                training = self.training
            if data.streaming and training.max_steps is None:
                at = f"stages[{i}] ({stage.name}).training" if self.stages else "training"
                problems.append(f"{at}.max_steps: data.streaming reads the data as it trains, so the number of steps "
                                "cannot be counted from it; set training.max_steps (e.g. 1000)")
            if data.streaming and stage.kind != "sft":
                problems.append(f"{where}: data.streaming is for sft stages; the {stage.kind} trainer needs its "
                                "rows up front (set data.streaming: false)")
            problems += _watch_problems(training, data, f"stages[{i}] ({stage.name})" if self.stages else "training")
            if stage.kind == "dpo" and stage.dpo.label_smoothing and stage.dpo.loss_type != "sigmoid":
                problems.append(f"stages[{i}].dpo.label_smoothing works with loss_type 'sigmoid' only")
        if self.quantization.experts and self.quantization.mode != "nf4":
            problems.append("quantization.experts: true quantizes the experts to NF4; set quantization.mode: nf4")
        if self.lora.expert_rank == "by_routing" and self.lora.experts != "per_expert":
            problems.append(f"lora.expert_rank: by_routing sets a rank per expert; it needs lora.experts: per_expert "
                            f"(here {self.lora.experts})")
        if self.lora.expert_rank == "by_routing" and any(
                self.stage_data(s).streaming for s in self.effective_stages()):
            problems.append("lora.expert_rank: by_routing measures the routing on the first training rows before "
                            "training; set data.streaming: false (or lora.expert_rank: uniform)")
        own = self.own_expert_adapters()
        others = sorted({s.kind for s in self.effective_stages() if s.kind != "sft"})
        if own and others:
            what = ("lora.experts: shared" if self.lora.experts == "shared" else "lora.expert_rank: by_routing"
                    if self.lora.expert_rank == "by_routing" else "lora.experts: per_expert with quantization.experts")
            problems.append(f"{what} trains finetune's own expert adapters, supported in sft stages only (not "
                            f"{', '.join(others)}: their reference model switches peft adapters); use sft stages, or "
                            "lora.experts: none")
        if self.lora.dropout and (self.lora.experts != "none" or self.lora.router):
            on = f"lora.experts: {self.lora.experts}" if self.lora.experts != "none" else "lora.router: true"
            problems.append(f"lora.dropout: {self.lora.dropout:g} with {on}: the expert and router adapters take "
                            "no LoRA dropout (peft adapts them as raw parameters, finetune's own expert adapters "
                            "have none); set lora.dropout: 0 (or leave the experts and the router without adapters)")
        if self.quantization.mode != "none" and self.lora.use_dora and self.kernels.enabled():
            problems.append(
                "kernels: the fused kernels do not support DoRA; set lora.use_dora: false or turn kernels off"
            )
        problems += self.distributed.problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def own_expert_adapters(self) -> bool:
        """Whether a MoE base gets finetune's own expert adapters (`finetune/model/expert_adapters.py`), not peft's:
        `lora.experts: shared`, or `per_expert` on 4-bit experts or with ranks by routing."""
        return self.lora.experts == "shared" or (self.lora.experts == "per_expert" and (
            (self.quantization.experts and self.quantization.mode == "nf4") or self.lora.expert_rank == "by_routing"))

    def effective_stages(self) -> list[StageConfig]:
        """The stages to run: the recipe's list, or a single `sft` stage when it has none."""
        return self.stages or [StageConfig(name="sft", kind="sft")]

    def stage_training(self, stage: StageConfig) -> TrainingConfig:
        """The shared training section with the stage's overrides applied."""
        return TrainingConfig(**{**self.training.model_dump(), **stage.training.model_dump(exclude_unset=True)})

    def stage_data(self, stage: StageConfig) -> DataConfig:
        """The data section a stage trains on."""
        return stage.data or self.data

    def output_dir(self) -> Path:
        """The run folder with `{name}` filled in."""
        return Path(self.output.dir.format(name=self.name))

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        """Load, merge `extends`, apply `key=value` overrides and validate. Raises RecipeError with every problem."""
        return load_recipe(path, overrides)


def _watch_problems(t: TrainingConfig, data: DataConfig, where: str) -> list[str]:
    """early_stopping / keep_best need evaluations and a metric that the stage computes."""
    out = []
    for key, metric in (("early_stopping", t.early_stopping and t.early_stopping.metric), ("keep_best", t.keep_best)):
        if not metric:
            continue
        if t.eval_steps is None:
            out.append(f"{where}: training.{key} needs training.eval_steps (evaluations to compare)")
        if metric.startswith("task_") and not data.task_eval:
            out.append(f"{where}: training.{key} watches '{metric}', which needs data.task_eval")
        elif not metric.startswith(("task_", "eval_")):
            out.append(f"{where}: training.{key} metric '{metric}' is not one a stage computes; use eval_loss, "
                       "another eval_* metric of the trainer, or task_<metric> (e.g. task_exact_match)")
        if not (data.eval or data.eval_fraction):
            out.append(f"{where}: training.{key} needs eval data (data.eval or data.eval_fraction): evaluations "
                       "run with the eval loss")
    return out


def validate_data(data: dict[str, Any], source: str, lines: dict[tuple, int] | None = None) -> Recipe:
    """Validate a raw mapping into a Recipe (stage training overrides included); RecipeError lists every problem."""
    recipe = loading.validate(Recipe, data, source, lines)
    problems = []
    for i, stage in enumerate(recipe.stages):
        try:
            recipe.stage_training(stage)
        except ValidationError as e:
            for err in e.errors():
                problems.append(loading.explain(Recipe, {**err, "loc": ("stages", i, "training", *err["loc"])},
                                                lines or {}))
    if problems:
        raise loading.RecipeError(source, problems)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, resolve `extends`, apply `key=value` overrides and validate the result."""
    data, lines = loading.read(path, overrides)
    return validate_data(data, str(path), lines)
