"""The model: tokenizer and base model loading with quantization (`loading.py`), LoRA adapters (`adapters.py`), and
every change made to a loaded transformers/peft/trl object (loss heads, per-sample attention, fused kernels), applied
per instance by `patches.apply_patches`. May import `finetune.recipe`, `finetune.distributed`, `finetune.data`."""
