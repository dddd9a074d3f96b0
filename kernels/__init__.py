"""Fused training kernels for LoRA / QLoRA fine-tuning (import name `finetune.kernels`).

Every op comes in three flavours that compute the same thing:

* `*_reference`: the naive PyTorch formulation (the ground truth in tests);
* a fused/chunked PyTorch `torch.autograd.Function` (the path used on CPU, with the same memory
  savings as the GPU path: nothing large is saved for backward, cheap activations are recomputed);
* a Triton kernel, used when the tensors are on CUDA and `triton` is importable (or when a test forces
  it under `TRITON_INTERPRET=1`). See :mod:`finetune.kernels._dispatch`.

Modules: `nf4` (bitsandbytes NF4 dequantisation), `lora_linear`, `lora_mlp`, `lora_qkvo`,
`cross_entropy` (chunked fused linear cross-entropy and per-token log-probs), `rmsnorm`, `rope`.

This package never imports `triton` at import time: the `*_triton` modules are imported lazily, the
first time a Triton path actually runs.
"""

from finetune.kernels._dispatch import force_backend, triton_available

__all__ = ["force_backend", "triton_available"]
