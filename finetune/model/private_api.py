"""Every private (or internal, undocumented) name of trl, transformers, peft and bitsandbytes that finetune touches.

One list, with where each is used and why, for the versions in :data:`TESTED`. `tests/unit/test_private_api.py` checks
that each still exists (a test per name, so an upgrade that removes one fails by that name). Where we keep a copy of
library code, the entry names the test that compares our copy with the library's current function. A new use of a
private name anywhere in `finetune/` or `kernels/` belongs here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TESTED = {"trl": "1.16.0", "transformers": "5.23.0", "peft": "0.21.2", "bitsandbytes": "0.50.2"}
#: the oldest versions pyproject.toml allows, which `make test-floor` runs these tests with too
FLOOR = {"trl": "1.16.0", "transformers": "5.17.0", "peft": "0.21.0", "bitsandbytes": "0.50.2"}


@dataclass(frozen=True)
class Private:
    """One private name: `module:attribute.path`, and what it is (an importable name, or an attribute every instance
    of that class has)."""

    name: str
    kind: Literal["import", "instance"]
    where: str
    why: str
    guarded_by: str = ""  # the test comparing our copy of library code with the library's current function


PRIVATE: tuple[Private, ...] = (
    # trl
    Private("trl.trainer.utils:add_fused_lm_head", "import", "tests; model/patches.py (order)",
            "the forward patch trl's trainers add; our loss heads stack above it"),
    Private("trl.trainer.utils:FusedCausalLMOutput", "import", "model/loss_heads.py", "the compact head's output"),
    Private("trl.kernels:ChunkedLogProbFunction", "import", "model/loss_heads.py",
            "trl's chunked log-prob kernel, called on the labelled positions only (a copy of add_fused_lm_head's "
            "compact path)", "tests/unit/test_fast_paths.py::test_compact_fused_head_matches_trl_dpo"),
    Private("trl:SFTTrainer._metrics", "instance", "model/loss_heads.py", "the num_tokens metric (tokens/s)",
            "tests/unit/test_private_api.py::test_label_loss_trainer_bookkeeping_matches_trl"),
    Private("trl:SFTTrainer._total_train_tokens", "instance", "model/loss_heads.py", "the num_tokens count",
            "tests/unit/test_private_api.py::test_label_loss_trainer_bookkeeping_matches_trl"),
    Private("trl:SFTTrainer.get_tp_size", "import", "model/loss_heads.py", "DDP loss scale and token count"),
    Private("trl:DPOTrainer.compute_ref_log_probs", "import", "stages/dpo.py", "precomputing reference log-probs"),
    Private("trl:DPOTrainer.precompute_ref_logps", "instance", "stages/dpo.py",
            "tells the trainer the reference log-probs are dataset columns"),
    # transformers
    Private("transformers.integrations.sdpa_attention:sdpa_attention_forward", "import", "model/attention.py",
            "per-sample attention falls back to it without sample boundaries"),
    Private("transformers.masking_utils:sdpa_mask", "import", "model/attention.py", "sdpa's masks for our attention"),
    Private("transformers:PretrainedConfig._attn_implementation", "instance", "model/attention.py, loss_heads.py, "
            "stages/dryrun.py, kernels/hf_forwards.py", "which attention a loaded model runs"),
    Private("transformers:Trainer._save_checkpoint", "import", "run/checkpoints.py", "atomic checkpoints"),
    Private("transformers:Trainer._get_output_dir", "import", "run/checkpoints.py", "atomic checkpoints"),
    Private("transformers.models.llama.modeling_llama:apply_rotary_pos_emb", "import", "kernels/hf_forwards.py",
            "copy of the Llama/Qwen2/Mistral attention forward with fused Q/K/V and RoPE",
            "tests/unit/kernels/test_patching.py::test_patched_model_matches_unpatched"),
    Private("transformers.models.llama.modeling_llama:eager_attention_forward", "import", "kernels/hf_forwards.py",
            "the same copy", "tests/unit/kernels/test_patching.py::test_patched_model_matches_unpatched"),
    Private("transformers.models.llama.modeling_llama:ALL_ATTENTION_FUNCTIONS", "import", "kernels/hf_forwards.py",
            "the same copy", "tests/unit/kernels/test_patching.py::test_patched_model_matches_unpatched"),
    Private("transformers.models.llama.modeling_llama:LlamaRMSNorm.variance_epsilon", "instance",
            "model/kernels.py, kernels/hf_forwards.py", "the fused RMSNorm's epsilon"),
    # peft
    Private("peft.tuners.tuners_utils:_maybe_include_all_linear_layers", "import", "model/adapters.py",
            "resolves `all-linear` to compare the recipe's lora keys with a saved adapter"),
    Private("peft.utils.transformers_weight_conversion:_MODEL_TO_CONVERSION_PATTERN", "import",
            "tests/unit/test_moe.py", "the families whose MLP-named targets peft rewrites onto the experts "
            "(model/families.py Traits.peft_moves_mlp_names)",
            "tests/unit/test_moe.py::test_families_peft_rewrites_are_peft_own"),
    Private("transformers.integrations.moe:ALL_EXPERTS_FUNCTIONS", "import", "model/moe_experts.py",
            "registers the 4-bit experts forward under its own name (transformers' experts interface)"),
    Private("peft.tuners.lora:Linear.lora_variant", "instance", "kernels/hf_forwards.py",
            "the fused LoRA ops step aside for LoRA variants (DoRA, ...)"),
    Private("peft.tuners.lora:Linear.lora_bias", "instance", "kernels/hf_forwards.py", "no fused path with lora_bias"),
    # bitsandbytes
    Private("bitsandbytes.backends.default.ops:_dequantize_4bit_compute", "import", "model/bnb_cpu.py",
            "the CPU fix falls back to it where bitsandbytes does"),
    Private("bitsandbytes.backends.utils:_get_4bit_code", "import", "model/bnb_cpu.py", "the same fallback"),
    Private("bitsandbytes.cextension:lib", "import", "model/bnb_cpu.py", "the native CPU dequantization"),
    Private("bitsandbytes.nn:Linear4bit.support_avx512bf16_for_cpu", "instance", "model/bnb_cpu.py",
            "turned off per instance (AVX-512 bf16 repacking)"),
)
