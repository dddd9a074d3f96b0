"""Triton kernels for 4-bit (NF4/FP4) weights: standalone dequantisation and a fused dequant-matmul.

Imported lazily (only when a Triton path runs). The dequantisation kernel reproduces bitsandbytes bit for bit:
float32 multiply, then float32 add of the double-quantisation offset, then float32 multiply, then one rounding
to the output dtype; it is launched with `enable_fp_fusion=False` so the compiler cannot contract the
multiply-add into an FMA (which would round once and differ in the last bit).

The fused kernel computes `C = A @ op(W) [+ s * U @ V] [+ bias]` where `W` is the 4-bit `[N, K]` weight,
`op(W)` is `W.T` (forward, `trans=True`) or `W` (input gradient, `trans=False`): each `[BQ, BP]`
tile of `op(W)` is dequantised in registers from the packed nibbles, so no dense weight is ever written. Its tiles
are 64 x 64 x 64 (4 warps) under the interpreter and for few rows; with many rows on a large GPU they are 128 wide
and pipelined (`launch.nf4_matmul`).

The Triton interpreter (CPU, tests) has no bfloat16 arithmetic and truncates float32 -> bfloat16 casts: bf16
dots are done in float32 there (`DOT_FP32`), and bf16 values are rounded explicitly (`round_bf16`), so the
bf16 dequantisation is bit-exact on the interpreter as well as on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from finetune.kernels import launch
from finetune.kernels._dispatch import kernel_interpreted
from finetune.kernels.nf4 import NF4Weight
from finetune.kernels.triton_utils import is_bf16, round_bf16


@triton.jit
def _nf4_tile(
    flat,
    mask,
    packed_ptr,
    code_ptr,
    absmax_ptr,
    code2_ptr,
    absmax2_ptr,
    offset_ptr,
    BLOCKSIZE: tl.constexpr,
    BS2: tl.constexpr,
    NESTED: tl.constexpr,
):
    """float32 values of the elements at flat indices `flat` (0 where `mask` is false)."""
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 15)
    block = flat // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(absmax2_ptr + block // BS2, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0).to(tl.float32)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0) * scale
    return tl.where(mask, value, 0.0)


@triton.jit
def _dequant_kernel(
    packed_ptr,
    code_ptr,
    absmax_ptr,
    code2_ptr,
    absmax2_ptr,
    offset_ptr,
    out_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    BS2: tl.constexpr,
    NESTED: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < n
    value = _nf4_tile(
        flat, mask, packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, BLOCKSIZE, BS2, NESTED
    )
    if BF16:
        value = round_bf16(value)
    tl.store(out_ptr + flat, value.to(out_ptr.dtype.element_ty), mask=mask)


def _scale_args(w: NF4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pointers for the scale lookup (dummies when not nested)."""
    if w.nested:
        return w.absmax, w.nested_code, w.nested_absmax, w.offset
    return w.absmax, w.code, w.code, w.code


def dequantize(w: NF4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantises `w` into a new (or given) `[out, in]` tensor of dtype `w.dtype`.

    Args:
        w: The 4-bit weight.
        out: Optional destination (contiguous, `w.shape`).

    Returns:
        The dense weight.
    """
    n = w.shape[0] * w.shape[1]
    if out is None:
        out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    absmax, code2, absmax2, offset = _scale_args(w)
    chosen = launch.elementwise(n, launch.large_gpu(out, kernel_interpreted(_dequant_kernel)))
    launch.run(("dequant", chosen), chosen, launch.elementwise(n, False), lambda c: _dequant_kernel[
        (triton.cdiv(n, c.block),)](
        w.packed, w.code, absmax, code2, absmax2, offset, out, n, BLOCKSIZE=w.blocksize,
        BS2=max(w.nested_blocksize, 1), NESTED=w.nested, BF16=is_bf16(out), BLOCK=c.block, enable_fp_fusion=False,
        **c.options()))
    return out


@triton.jit
def _nf4_matmul_kernel(
    a_ptr,
    packed_ptr,
    code_ptr,
    absmax_ptr,
    code2_ptr,
    absmax2_ptr,
    offset_ptr,
    u_ptr,
    v_ptr,
    bias_ptr,
    c_ptr,
    M,
    P,
    Q,
    R,
    lowrank_scale,
    stride_am,
    stride_aq,
    stride_wq,
    stride_wp,
    stride_um,
    stride_ur,
    stride_vr,
    stride_vp,
    stride_cm,
    stride_cp,
    BLOCKSIZE: tl.constexpr,
    BS2: tl.constexpr,
    NESTED: tl.constexpr,
    HAS_LOWRANK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BM: tl.constexpr,
    BP: tl.constexpr,
    BQ: tl.constexpr,
    BR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rp = pid_p * BP + tl.arange(0, BP)
    m_mask = rm < M
    p_mask = rp < P
    acc = tl.full((BM, BP), 0.0, dtype=tl.float32)
    for q0 in range(0, Q, BQ):
        rq = q0 + tl.arange(0, BQ)
        q_mask = rq < Q
        a = tl.load(
            a_ptr + rm[:, None] * stride_am + rq[None, :] * stride_aq, mask=m_mask[:, None] & q_mask[None, :], other=0.0
        )
        flat = rq[:, None].to(tl.int64) * stride_wq + rp[None, :].to(tl.int64) * stride_wp
        w = _nf4_tile(
            flat,
            q_mask[:, None] & p_mask[None, :],
            packed_ptr,
            code_ptr,
            absmax_ptr,
            code2_ptr,
            absmax2_ptr,
            offset_ptr,
            BLOCKSIZE,
            BS2,
            NESTED,
        )
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), round_bf16(w), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(a, w.to(a.dtype), input_precision="ieee")
        else:
            acc += tl.dot(a, w.to(a.dtype))
    if HAS_LOWRANK:
        low = tl.full((BM, BP), 0.0, dtype=tl.float32)
        for r0 in range(0, R, BR):
            rr = r0 + tl.arange(0, BR)
            r_mask = rr < R
            u = tl.load(
                u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur,
                mask=m_mask[:, None] & r_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            v = tl.load(
                v_ptr + rr[:, None] * stride_vr + rp[None, :] * stride_vp,
                mask=r_mask[:, None] & p_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            low += tl.dot(u, v, input_precision="ieee")
        acc += low * lowrank_scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rp, mask=p_mask, other=0.0).to(tl.float32)[None, :]
    if DOT_FP32:
        acc = round_bf16(acc)
    tl.store(
        c_ptr + rm[:, None] * stride_cm + rp[None, :] * stride_cp,
        acc.to(c_ptr.dtype.element_ty),
        mask=m_mask[:, None] & p_mask[None, :],
    )


def nf4_matmul(
    a: torch.Tensor,
    w: NF4Weight,
    trans: bool,
    bias: torch.Tensor | None = None,
    lowrank: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Fused `a @ op(W) + s * U @ V + bias` with `W` dequantised tile by tile.

    Args:
        a: `[M, Q]` activations (the compute dtype; `W` tiles are rounded to it before the dot).
        w: The 4-bit `[N, K]` weight.
        trans: True for `a @ W.T` (Q = K, P = N), False for `a @ W` (Q = N, P = K).
        bias: Optional `[P]` bias.
        lowrank: Optional `(U [M, R], V [R, P], s)` low-rank term, accumulated in float32.

    Returns:
        `[M, P]` in `a.dtype`.
    """
    n_out, n_in = w.shape
    m, q = a.shape
    p = n_out if trans else n_in
    if q != (n_in if trans else n_out):
        raise ValueError(f"nf4_matmul: a is {tuple(a.shape)}, weight is {w.shape}, trans={trans}")
    c = torch.empty((m, p), dtype=a.dtype, device=a.device)
    stride_wq, stride_wp = (1, n_in) if trans else (n_in, 1)
    absmax, code2, absmax2, offset = _scale_args(w)
    if lowrank is not None:
        u, v, s = lowrank
        r = u.shape[1]
    else:
        u, v, s, r = a, a, 0.0, 0
    interpreted = kernel_interpreted(_nf4_matmul_kernel)
    chosen = launch.nf4_matmul(m, p, launch.large_gpu(a, interpreted))
    default = launch.nf4_matmul(m, p, False)

    def run(cfg: launch.Launch) -> None:
        bm, bp, bq = cfg.tiles
        _nf4_matmul_kernel[(triton.cdiv(m, bm), triton.cdiv(p, bp))](
            a, w.packed, w.code, absmax, code2, absmax2, offset, u, v, bias if bias is not None else a, c,
            m, p, q, r, float(s),
            a.stride(0), a.stride(1), stride_wq, stride_wp, u.stride(0), u.stride(1), v.stride(0), v.stride(1),
            c.stride(0), c.stride(1),
            BLOCKSIZE=w.blocksize,
            BS2=max(w.nested_blocksize, 1),
            NESTED=w.nested,
            HAS_LOWRANK=lowrank is not None,
            HAS_BIAS=bias is not None,
            IEEE=a.dtype == torch.float32,
            DOT_FP32=a.dtype == torch.bfloat16 and interpreted,
            BM=bm,
            BP=bp,
            BQ=bq,
            BR=max(16, min(64, triton.next_power_of_2(max(r, 1)))),
            **cfg.options(),
        )

    launch.run(("nf4", chosen, p, q, a.dtype), chosen, default, run)
    return c
