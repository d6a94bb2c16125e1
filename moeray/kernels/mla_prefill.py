"""MLA prefill attention (the expanded path): causal, variable-length sequences packed end to end.

Legend: T packed tokens (all sequences), B sequences, H heads, N qk_nope_head_dim (128),
R qk_rope_head_dim (64), V v_head_dim (128), BM query rows per program, BN keys per step.

In prefill MLA up-projects the latent to per-head keys and values, so attention is ordinary causal
attention with a 192-wide query/key head (N + R) and a 128-wide value head. Two things differ from
a textbook kernel and both are handled here without copies:
  * the rope key is shared by all heads ([T, R]); the kernel reads it through a head stride of 0
    instead of the [T, H, N + R] concatenation that `F.scaled_dot_product_attention` needs
    (which at H = 128, T = 8192 writes and re-reads 400 MB);
  * the value head (128) is narrower than the query/key head (192), which rules out torch's
    FlashAttention backend unless v is zero-padded to 192 (the benchmark measures that option).

Sequences are packed: sequence b owns rows cu_seqlens[b] .. cu_seqlens[b+1] - 1 of every input,
and its query i sees its keys 0 .. i. One program computes BM query rows of one (sequence, head)
with an online softmax over BN-key blocks: the blocks strictly below the diagonal run unmasked,
the diagonal blocks with the causal mask. Programs are numbered so the longest rows start first.

Measured on an H100 (benchmarks/notes-kernels.md, `moeray bench kernels --only mla_prefill`):
packed variable lengths (6 sequences, 8192 tokens) 366-370 TFLOP/s, 1.55-1.7x flex-attention and
1.6-1.9x torch's FlashAttention varlen (v padded to 192); equal lengths 190-478 TFLOP/s (16 x 512
to 1 x 8192), where cuDNN through SDPA is 1.14-1.42x faster on inputs already concatenated to
192-wide keys, but the cat + SDPA that `MLA.expanded_attention` runs today is 1.02-1.74x slower
than this kernel on the split views.
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from moeray.kernels.common import cdiv, check_tensor, interpreting, is_pow2, use_triton

LOG2E = 1.4426950408889634
FLOAT_IN = (torch.bfloat16, torch.float16, torch.float32)


def mla_prefill_ref(
    q_nope_THN: torch.Tensor,
    q_pe_THR: torch.Tensor,
    k_nope_THN: torch.Tensor,
    k_pe_TR: torch.Tensor,
    v_THV: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 loop over sequences -> (out [T, H, V] fp32, lse [T, H] natural log).

    k_pe is [T, R] (shared by the heads) or [T, H, R]."""
    t, h, _ = q_nope_THN.shape
    out = torch.empty(t, h, v_THV.shape[-1], dtype=torch.float32, device=q_nope_THN.device)
    lse = torch.empty(t, h, dtype=torch.float32, device=q_nope_THN.device)
    k_pe = k_pe_TR if k_pe_TR.dim() == 3 else k_pe_TR[:, None, :].expand(t, h, k_pe_TR.shape[-1])
    cu = [int(c) for c in cu_seqlens]
    for s, e in itertools.pairwise(cu):
        if e == s:
            continue
        q = torch.cat([q_nope_THN[s:e], q_pe_THR[s:e]], -1).float().transpose(0, 1)  # [H, L, N+R]
        k = torch.cat([k_nope_THN[s:e], k_pe[s:e]], -1).float().transpose(0, 1)
        v = v_THV[s:e].float().transpose(0, 1)
        scores = q @ k.transpose(1, 2) * softmax_scale  # [H, L, L]
        n = e - s
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        lse[s:e] = torch.logsumexp(scores, -1).transpose(0, 1)
        out[s:e] = (scores.softmax(-1) @ v).transpose(0, 1)
    return out, lse


@triton.jit
def _mla_prefill_kernel(
    qn_ptr,
    qp_ptr,
    kn_ptr,
    kp_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    cu_ptr,
    sm_scale_log2,
    stride_qnt,
    stride_qnh,
    stride_qpt,
    stride_qph,
    stride_knt,
    stride_knh,
    stride_kpt,
    stride_kph,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    N: tl.constexpr,
    R: tl.constexpr,
    V: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Longest rows first: the last query block of a sequence has the most key blocks.
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    start = tl.load(cu_ptr + b)
    seq_len = tl.load(cu_ptr + b + 1) - start
    q0 = m_block * BLOCK_M
    if q0 >= seq_len:
        return
    start = start.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = q0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seq_len
    offs_n = tl.arange(0, BLOCK_N)
    offs_dn = tl.arange(0, N)
    offs_dr = tl.arange(0, R)
    offs_dv = tl.arange(0, V)

    rows = (start + offs_m)[:, None]
    q_nope = tl.load(
        qn_ptr + rows * stride_qnt + h64 * stride_qnh + offs_dn[None, :],
        mask=m_ok[:, None],
        other=0.0,
    )
    q_pe = tl.load(
        qp_ptr + rows * stride_qpt + h64 * stride_qph + offs_dr[None, :],
        mask=m_ok[:, None],
        other=0.0,
    )
    if UPCAST:
        q_nope = q_nope.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    # Keys are loaded transposed ([dim, BN]) so both score products are plain [BM, d] x [d, BN].
    kn_ptrs = (
        kn_ptr
        + start * stride_knt
        + h64 * stride_knh
        + offs_n[None, :] * stride_knt
        + offs_dn[:, None]
    )
    kp_ptrs = (
        kp_ptr
        + start * stride_kpt
        + h64 * stride_kph
        + offs_n[None, :] * stride_kpt
        + offs_dr[:, None]
    )
    v_ptrs = (
        v_ptr + start * stride_vt + h64 * stride_vh + offs_n[:, None] * stride_vt + offs_dv[None, :]
    )

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, V), dtype=tl.float32)

    # Blocks wholly below the diagonal: every key precedes every query row, no mask. BLOCK_M is a
    # multiple of BLOCK_N, so these end exactly at q0 (< seq_len: all keys exist).
    for n0 in range(0, q0, BLOCK_N):
        k_nope = tl.load(kn_ptrs + n0 * stride_knt)
        k_pe = tl.load(kp_ptrs + n0 * stride_kpt)
        v = tl.load(v_ptrs + n0 * stride_vt)
        if UPCAST:
            k_nope = k_nope.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q_nope, k_nope)
        s = tl.dot(q_pe, k_pe, s)
        s = s * sm_scale_log2
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    # Diagonal blocks: causal mask and the end of the sequence.
    hi = tl.minimum(seq_len, q0 + BLOCK_M)
    for n0 in range(q0, hi, BLOCK_N):
        pos = n0 + offs_n
        n_ok = pos < seq_len
        k_nope = tl.load(kn_ptrs + n0 * stride_knt, mask=n_ok[None, :], other=0.0)
        k_pe = tl.load(kp_ptrs + n0 * stride_kpt, mask=n_ok[None, :], other=0.0)
        v = tl.load(v_ptrs + n0 * stride_vt, mask=n_ok[:, None], other=0.0)
        if UPCAST:
            k_nope = k_nope.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q_nope, k_nope)
        s = tl.dot(q_pe, k_pe, s)
        s = s * sm_scale_log2
        s = tl.where((pos[None, :] <= offs_m[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Padding rows past the sequence still see key q0 (pos <= offs_m), so m_new is finite for
        # every row once the first diagonal block ran; rows of earlier blocks never hit -inf here.
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = o_ptr + rows * stride_ot + h64 * stride_oh + offs_dv[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None])
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634  # natural log, for merging with cached chunks
    tl.store(lse_ptr + (start + offs_m) * stride_lt + h64 * stride_lh, lse, mask=m_ok)


def default_config(total_tokens: int, num_heads: int, elem_bytes: int = 2) -> dict:
    """Block shapes. Interpreter: small blocks. GPU, 2-byte inputs: 128 query rows x 64 keys, 8
    warps, 3 stages (q 48 KB + 3 x (k 24 KB + v 16 KB) = 168 KB of the H100's 227 KB shared
    memory): the fastest of 5 candidates at all 8 benchmarked shapes (128x128/8w/2s 2-14% slower,
    64x64/4w 18-31%). fp32 inputs would need 336 KB at those tiles: 64 x 32, 2 stages (q 48 KB +
    2 x (k 24 KB + v 16 KB) = 128 KB)."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if elem_bytes > 2:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def mla_prefill(
    q_nope_THN: torch.Tensor,
    q_pe_THR: torch.Tensor,
    k_nope_THN: torch.Tensor,
    k_pe_TR: torch.Tensor,
    v_THV: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float,
    *,
    max_seqlen: int | None = None,
    return_lse: bool = False,
    config: dict | None = None,
):
    """Causal attention over packed sequences: -> out [T, H, V] in q's dtype (and lse [T, H]).

    q_nope [T, H, N], q_pe [T, H, R], k_nope [T, H, N], v [T, H, V]; k_pe [T, R] shared by the
    heads (MLA) or [T, H, R]. Any strides with the last dim contiguous (views of the projections
    work as they are). cu_seqlens [B + 1] int32/int64, non-decreasing from 0 to T. max_seqlen
    (longest sequence) sizes the grid; None reads it from cu_seqlens (one host sync).
    Inference only (no autograd).
    """
    check_tensor(q_nope_THN, "q_nope", dtypes=FLOAT_IN, ndim=3)
    dev = q_nope_THN.device
    dt = q_nope_THN.dtype
    check_tensor(q_pe_THR, "q_pe", dtypes=(dt,), ndim=3, device=dev)
    check_tensor(k_nope_THN, "k_nope", dtypes=(dt,), ndim=3, device=dev)
    check_tensor(k_pe_TR, "k_pe", dtypes=(dt,), device=dev)
    check_tensor(v_THV, "v", dtypes=(dt,), ndim=3, device=dev)
    check_tensor(cu_seqlens, "cu_seqlens", dtypes=(torch.int32, torch.int64), ndim=1, device=dev)
    t, h, n = q_nope_THN.shape
    r = q_pe_THR.shape[-1]
    vd = v_THV.shape[-1]
    if k_pe_TR.dim() == 2:
        k_pe = k_pe_TR[:, None, :].expand(t, h, r)  # head stride 0: one rope key for all heads
    elif k_pe_TR.dim() == 3:
        k_pe = k_pe_TR
    else:
        raise ValueError(
            f"k_pe must be [T, R] (shared) or [T, H, R], got shape {tuple(k_pe_TR.shape)}"
        )
    for name, x, d in (
        ("q_pe", q_pe_THR, r),
        ("k_nope", k_nope_THN, n),
        ("k_pe", k_pe, r),
        ("v", v_THV, vd),
    ):
        if tuple(x.shape) != (t, h, d):
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}, expected {(t, h, d)} (q_nope is {(t, h, n)})"
            )
    for name, x in (
        ("q_nope", q_nope_THN),
        ("q_pe", q_pe_THR),
        ("k_nope", k_nope_THN),
        ("k_pe", k_pe),
        ("v", v_THV),
    ):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {x.stride()}")
    for name, d in (("qk_nope_head_dim", n), ("qk_rope_head_dim", r), ("v_head_dim", vd)):
        if not is_pow2(d) or d < 16:
            raise ValueError(f"{name}={d} must be a power of 2 >= 16 (DeepSeek-V3: 128 / 64 / 128)")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens needs at least 2 entries (B + 1), got {cu_seqlens.numel()}")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale={softmax_scale} must be a positive finite number")
    if not use_triton(q_nope_THN):
        out, lse = mla_prefill_ref(
            q_nope_THN, q_pe_THR, k_nope_THN, k_pe_TR, v_THV, cu_seqlens, softmax_scale
        )
        out = out.to(dt)
        return (out, lse) if return_lse else out
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    cfg = dict(config or default_config(t, h, q_nope_THN.element_size()))
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    if bm % bn:
        raise ValueError(f"BLOCK_M={bm} must be a multiple of BLOCK_N={bn}")
    out = torch.empty(t, h, vd, dtype=dt, device=dev)
    lse = torch.empty(t, h, dtype=torch.float32, device=dev)
    b = cu_seqlens.numel() - 1
    grid = (max(cdiv(max_seqlen, bm), 1), h, b)
    _mla_prefill_kernel[grid](
        q_nope_THN,
        q_pe_THR,
        k_nope_THN,
        k_pe,
        v_THV,
        out,
        lse,
        cu_seqlens,
        softmax_scale * LOG2E,
        q_nope_THN.stride(0),
        q_nope_THN.stride(1),
        q_pe_THR.stride(0),
        q_pe_THR.stride(1),
        k_nope_THN.stride(0),
        k_nope_THN.stride(1),
        k_pe.stride(0),
        k_pe.stride(1),
        v_THV.stride(0),
        v_THV.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        lse.stride(1),
        N=n,
        R=r,
        V=vd,
        BLOCK_M=bm,
        BLOCK_N=bn,
        UPCAST=interpreting(),
        **cfg,
    )
    return (out, lse) if return_lse else out


def mla_prefill_supported(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    k_nope: torch.Tensor,
    k_pe: torch.Tensor,
    v: torch.Tensor,
) -> bool:
    """Whether `mla_prefill` / `mla_prefill_bshd` runs the Triton kernel on these inputs: all on one
    CUDA device, one float dtype, head dims powers of 2 >= 16 (V3: 128 / 64 / 128; `tiny()`'s rope
    dim 8 is not), no autograd needed (the kernel has no backward)."""
    ts = (q_nope, q_pe, k_nope, k_pe, v)
    if not all(t.is_cuda and t.device == q_nope.device and t.dtype == q_nope.dtype for t in ts):
        return False
    if q_nope.dtype not in FLOAT_IN or (
        torch.is_grad_enabled() and any(t.requires_grad for t in ts)
    ):
        return False
    return all(is_pow2(d) and d >= 16 for d in (q_nope.shape[-1], q_pe.shape[-1], v.shape[-1]))


def mla_prefill_bshd(
    q_nope_BSHN: torch.Tensor,
    q_pe_BSHR: torch.Tensor,
    k_nope_BSHN: torch.Tensor,
    pe_BSR: torch.Tensor,
    v_BSHV: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """B equal-length sequences of S tokens (what `MLA.expanded_attention` holds) -> o [B, S, H, V].

    The inputs may be the views that split the projections ([B, S, H, N + V] split into k_nope and
    v, say); nothing is concatenated or expanded."""
    b, s, h, _ = q_nope_BSHN.shape
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q_nope_BSHN.device)

    def flat(x):  # [B, S, ...] -> [B*S, ...], a view whenever B and S are adjacent in memory
        return x.reshape(b * s, *x.shape[2:])

    out = mla_prefill(
        flat(q_nope_BSHN),
        flat(q_pe_BSHR),
        flat(k_nope_BSHN),
        flat(pe_BSR),
        flat(v_BSHV),
        cu,
        softmax_scale,
        max_seqlen=s,
    )
    return out.view(b, s, h, -1)
