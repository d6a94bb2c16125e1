"""What the two fused MoE paths share: their input checks, the per-expert reference loop, the
storage dtype of their intermediates, and the last launch that sums each token's K outputs.

Legend: T tokens, H hidden, I expert width, E local experts, K top-k, TK = T * K assignments
(token t's k-th choice is assignment t * K + k).

Both paths (`moe.py`'s aligned kernels, `moe_gemv.py`'s per-assignment GEMVs) write one output
row y_tk [TK, H] per assignment whose expert is local; `moe_sum` then adds a token's K rows in fp32
in k order, skipping the ids outside [0, E) (never written), rounds to x's dtype and adds the
shared experts' output `add_TH` if given. Below both in the import graph: moe.py imports
moe_gemv.py for its dispatch, and both import this. Also here: what moe_gemv's two kernels
(moe_gemv.py's gate/up, moe_gemv_down.py's down) share, a program's assignment and one K step's
product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    FP8_DTYPE,
    cdiv,
    check_tensor,
    interpreting,
    load_k_step,
    pdl_launch,
    pdl_wait,
    to_dtype_rn,
)
from moeray.kernels.fp8.quant import act_quant, dequant_rows_ref, weight_dequant_ref

BF16_IN = (torch.bfloat16, torch.float16, torch.float32)
MoEScales = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (w1_scale, w3_scale, w2_scale)


def moe_act_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of h [TK, I] and y_tk [TK, H] in both paths: x's, but bf16 for fp32 x on
    the GPU (the aligned kernels' bf16 MMAs); fp32 x keeps fp32 under the interpreter, where
    tests compare fp32 paths tightly."""
    return torch.bfloat16 if x_dtype == torch.float32 and not interpreting() else x_dtype


def check_moe_inputs(
    x_TH: torch.Tensor,
    w1_EIH: torch.Tensor,
    w3_EIH: torch.Tensor,
    w2_EHI: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    *,
    w1_scale: torch.Tensor | None,
    w3_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    add_TH: torch.Tensor | None,
) -> MoEScales | None:
    """ValueError naming the bad input of `fused_moe_gate_up` / `moe_gemv`; returns the three FP8
    scales (None for bf16/fp16/fp32 weights)."""
    check_tensor(x_TH, "x", dtypes=BF16_IN, ndim=2)
    check_tensor(w1_EIH, "w1", dtypes=(*BF16_IN, FP8_DTYPE), ndim=3, device=x_TH.device)
    check_tensor(w3_EIH, "w3", dtypes=(w1_EIH.dtype,), ndim=3, device=x_TH.device)
    check_tensor(w2_EHI, "w2", dtypes=(w1_EIH.dtype,), ndim=3, device=x_TH.device)
    check_tensor(
        expert_ids_TK, "expert_ids", dtypes=(torch.int32, torch.int64), ndim=2, device=x_TH.device
    )
    check_tensor(weights_TK, "weights", dtypes=BF16_IN, ndim=2, device=x_TH.device)
    t, h = x_TH.shape
    e_count, i, h_w = w1_EIH.shape
    if h_w != h:
        raise ValueError(
            f"w1 has shape {tuple(w1_EIH.shape)}; expected [E, I, {h}] (x has width {h})"
        )
    if tuple(w3_EIH.shape) != (e_count, i, h):
        raise ValueError(f"w3 has shape {tuple(w3_EIH.shape)}; expected {(e_count, i, h)} like w1")
    if tuple(w2_EHI.shape) != (e_count, h, i):
        raise ValueError(f"w2 has shape {tuple(w2_EHI.shape)}; expected [{e_count}, {h}, {i}]")
    if expert_ids_TK.shape[0] != t or tuple(weights_TK.shape) != tuple(expert_ids_TK.shape):
        raise ValueError(
            f"expert_ids {tuple(expert_ids_TK.shape)} and weights {tuple(weights_TK.shape)} "
            f"must both be [T={t}, K]"
        )
    if add_TH is not None:
        check_tensor(add_TH, "add", dtypes=(x_TH.dtype,), ndim=2, device=x_TH.device)
        if tuple(add_TH.shape) != (t, h):
            raise ValueError(f"add has shape {tuple(add_TH.shape)}; expected [T, H] = {(t, h)}")
    if w1_EIH.dtype != FP8_DTYPE:
        return None
    if w1_scale is None or w3_scale is None or w2_scale is None:
        raise ValueError(
            "FP8 weights need w1_scale, w3_scale [E, I/128, H/128] and w2_scale [E, H/128, I/128]"
        )
    if i % 128 or h % 128:
        raise ValueError(
            f"FP8 MoE needs H={h} and I={i} to be multiples of 128 (128x128 weight blocks)"
        )
    for name, sc, shape in (
        ("w1_scale", w1_scale, (e_count, i // 128, h // 128)),
        ("w3_scale", w3_scale, (e_count, i // 128, h // 128)),
        ("w2_scale", w2_scale, (e_count, h // 128, i // 128)),
    ):
        check_tensor(sc, name, dtypes=(torch.float32,), ndim=3, device=x_TH.device)
        if tuple(sc.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(sc.shape)}; expected {shape}")
    return w1_scale, w3_scale, w2_scale


def fused_moe_gate_up_ref(
    x_TH: torch.Tensor,
    w1_EIH: torch.Tensor,
    w3_EIH: torch.Tensor,
    w2_EHI: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    *,
    scales: MoEScales | None = None,
    compute_dtype: torch.dtype = torch.float32,
    quantize_activations: bool = True,
    act_dtype: torch.dtype | None = None,
    add_TH: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loop over experts: y_t = sum_k w_tk * W2_e (silu(W1_e x_t) * W3_e x_t), + add_TH.

    FP8 weights (`scales` = their (w1, w3, w2) scale_inv) are dequantized (e4m3 times block scale
    in fp32, as the kernels form them). `quantize_activations` (the aligned kernels' FP8 path):
    x and h are fake-quantized per token (1x128), the numbers the fp8 MMAs multiply; False
    (moe_gemv, weight-only): they are not. `act_dtype` (the kernels' storage dtype of h and y_tk,
    `moe_act_dtype`): h and each assignment's output are rounded to it; None keeps them in
    compute_dtype. A token's K outputs are summed in fp32 in k order (as `moe_sum`), rounded to
    x's dtype, then add_TH is added (PyTorch's rounding of the sum of two rounded tensors).
    Ids outside [0, E) add nothing."""
    t, h = x_TH.shape
    e_count = w1_EIH.shape[0]
    k = expert_ids_TK.shape[1]
    fp8 = w1_EIH.dtype == FP8_DTYPE
    if fp8 and scales is None:
        raise ValueError(
            "FP8 weights need their scales (w1 and w3 [E, I/128, H/128], w2 [E, H/128, I/128])"
        )
    fake_quant = fp8 and quantize_activations
    x = x_TH
    if fake_quant:
        xq, xs = act_quant(x_TH.float())
        x = dequant_rows_ref(xq, xs)
    x = x.to(compute_dtype)
    y_TKH = torch.zeros(t, k, h, dtype=torch.float32, device=x_TH.device)
    for e in range(e_count):
        tok, slot = torch.where(expert_ids_TK == e)
        if tok.numel() == 0:
            continue
        if scales is not None:  # FP8
            w1, w3, w2 = (
                weight_dequant_ref(w[e], s[e], out_dtype=compute_dtype)
                for w, s in zip((w1_EIH, w3_EIH, w2_EHI), scales, strict=True)
            )
        else:
            w1, w3, w2 = (w[e].to(compute_dtype) for w in (w1_EIH, w3_EIH, w2_EHI))
        xe = x[tok]
        act = torch.nn.functional.silu(xe @ w1.t()) * (xe @ w3.t())
        if act_dtype is not None:
            act = act.to(act_dtype).to(compute_dtype)
        if fake_quant:
            aq, as_ = act_quant(act.float())
            act = dequant_rows_ref(aq, as_).to(compute_dtype)
        out = (act @ w2.t()).float() * weights_TK[tok, slot].float()[:, None]
        y_TKH[tok, slot] = out if act_dtype is None else out.to(act_dtype).float()
    y = torch.zeros(t, h, dtype=torch.float32, device=x_TH.device)
    for kk in range(k):
        y = y + y_TKH[:, kk]
    out_TH = y.to(x_TH.dtype)
    return out_TH if add_TH is None else out_TH + add_TH


@triton.jit
def _moe_sum_kernel(
    y_tk_ptr,
    ids_ptr,
    y_ptr,
    add_ptr,
    H,
    num_experts,
    stride_add,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_ADD: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)  # every read here is an activation or routing id
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    store_token_sum(
        y_tk_ptr, ids_ptr, y_ptr, add_ptr, t, offs, H, num_experts, H, stride_add, K, HAS_ADD,
        False,
    )  # fmt: skip


@triton.jit
def store_token_sum(
    y_tk_ptr, ids_ptr, out_ptr, add_ptr, t, offs, H, num_experts, stride_yt, stride_add,
    K: tl.constexpr, HAS_ADD: tl.constexpr, FROM_L2: tl.constexpr,
):  # fmt: skip
    """out[t, offs] = the sum of token t's K rows of y_tk whose expert id is local (others were
    never written, so they are skipped, not read), in fp32 in k order, rounded to out's dtype;
    plus add[t], rounded after the sum is (as PyTorch's add of the two rounded tensors).
    to_dtype_rn: the GPU's round-to-nearest, also under the interpreter (whose plain cast
    truncates to bf16). FROM_L2: y_tk read past L1 (.cg), for rows that other programs of the
    same kernel stored."""
    ok = offs < H
    acc = tl.zeros(offs.shape, dtype=tl.float32)
    for kk in tl.static_range(K):
        e = tl.load(ids_ptr + t * K + kk)
        local = ((e >= 0) & (e < num_experts)).to(tl.int32)
        ptrs = y_tk_ptr + (t * K + kk) * stride_yt + offs
        mask = ok & (offs * 0 + local > 0)
        if FROM_L2:
            v = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        else:
            v = tl.load(ptrs, mask=mask, other=0.0)
        acc += v.to(tl.float32)
    y = to_dtype_rn(acc, out_ptr.dtype.element_ty)
    if HAS_ADD:
        a = tl.load(add_ptr + t * stride_add + offs, mask=ok, other=0.0)
        y = to_dtype_rn(y.to(tl.float32) + a.to(tl.float32), out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * H + offs, y, mask=ok)


def moe_sum(
    y_tk: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    num_experts: int,
    out_dtype: torch.dtype,
    add_TH: torch.Tensor | None,
) -> torch.Tensor:
    """y [T, H] (out_dtype) = each token's rows of y_tk [TK, H] (contiguous) whose expert id is in
    [0, num_experts), summed in fp32 in k order, rounded, plus add_TH [T, H]; one launch."""
    t, k = expert_ids_TK.shape
    h = y_tk.shape[1]
    y = torch.empty(t, h, dtype=out_dtype, device=y_tk.device)
    ids = expert_ids_TK if expert_ids_TK.is_contiguous() else expert_ids_TK.contiguous()
    block_h = 128 if interpreting() else 1024
    add = y if add_TH is None else add_TH if add_TH.stride(-1) == 1 else add_TH.contiguous()
    pdl = pdl_launch(y_tk.device)
    _moe_sum_kernel[(t, cdiv(h, block_h))](
        y_tk,
        ids,
        y,
        add,
        h,
        num_experts,
        add.stride(0),
        K=k,
        BLOCK=block_h,
        HAS_ADD=add_TH is not None,
        PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )
    return y


@triton.jit
def gemv_assignment(T, K, EARLY_SHARED: tl.constexpr):
    """(assignment a = t * K + k, token t, slot k) of this moe_gemv program's grid row, taken
    slot-major (moe_gemv.py's docstring: a shared expert's programs run side by side); with
    EARLY_SHARED = S the rows start at slot K - S, so that the S shared slots' programs are
    dispatched first."""
    p = tl.program_id(1)
    t = p % T
    k = p // T
    if EARLY_SHARED > 0:
        k = (k + K - EARLY_SHARED) % K
    return t * K + k, t, k


@triton.jit
def gemv_step_product(
    v, w_ptrs, s_ptr, kb, stride_k, stride_sk, offs_k, K, EVEN_K: tl.constexpr, FP8: tl.constexpr
):
    """v [1, 128] (fp32) times K step kb of a weight tile [BN, 128], in fp32. With FP8 the e4m3
    tile's block scale (s_ptr: the block row's scales; one per step, the tile lying in one block
    row) multiplies v's 128 values, not the tile's BN x 128: per weight one convert and one FMA
    instead of a convert and two ops (the scale's multiply was a quarter of the loop's ALU work)."""
    w = load_k_step(w_ptrs, kb * 128, stride_k, offs_k, K, EVEN_K).to(tl.float32)
    if FP8:
        v = v * tl.load(s_ptr + kb * stride_sk)
    return v * w
