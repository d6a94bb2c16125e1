"""The split-KV MLA decode's second stage: merge each query row's split partials (weighed by
their log-sum-exp), and optionally apply the per-head value up-projection W_UV to the merged
latent in the same launch. `mla_decode.py` launches it after its split kernel.

Legend: B sequences, RW query rows a sequence (S tokens x H heads, row = s * H + h), NS splits,
C = kv_lora_rank latent dims (512), V value dims per head (128), BV value dims a program.

    o_lat[b, r]  = sum_s exp(lse_s - lse) o_s[b, r]        [C]   lse = log sum_s exp(lse_s)
    o_v[b, r]    = W_UV[h] o_lat[b, r]                     [V]   (with W: `w_HCV` [H, C, V])

With W (`mla_merge_out`), the grid is (RW x V/BV, B): each program merges its row's splits
(NS x 2 KB of fp32 partials at C = 512, from L2, again in each of the row's V/BV programs) and
multiplies by its [BV, C] slice of W_UV[h]. The merged latent is rounded to the output dtype
before the product with the conversion `_mla_merge_kernel` stores it with (the unfused path's
GEMM input: the same bits, on the GPU and under the interpreter); the product sums in fp32 and
rounds once, to nearest.

Why the fold: at decode the product is a separate GEMM per layer (cuBLAS, 3.2 us exclusive a call
for ~0.4 us of Moonlight's 2 MB of W_UV at batch 1: engine-nvidia-h200-moonlight-fp8-ab2.json's
profile), and a cuBLAS kernel between two PDL launches ends their overlap. Each program re-reads
its W slice for every query token (B x S), so the fold is for few of them (`MERGE_OUT_MAX_ROWS`);
past them the GEMM reads W once. With PDL (`common.pdl_launch`) the W slice is read before the
wait unless the caller says W was just made (`fresh_w`: a dequantized copy, the kernel right
before).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import check_tensor, pdl_launch, pdl_wait, to_dtype_rn

# Query rows (B x S) up to which `mla_decode_multi` folds W_UV into the merge (the default;
# MOERAY_FUSED_MLA_WUV=0 keeps the separate GEMM): at batch 1-4 decode and MTP verification. At
# Moonlight batch 1 on an H200 the decode graph runs 3.6-5.9% faster in bf16 and FP8, even at V3's
# 128 heads (results/engine-nvidia-h200-*-wuv.json, -b1ab3.json). Each query token's programs read
# all of W_UV (Moonlight 2 MB, V3 16 MB in bf16), mostly from L2 after the first.
MERGE_OUT_MAX_ROWS = 4
_BV = 16  # value dims a program: [16, 512] bf16 is 16 KB of W, 32 registers a thread at 4 warps


@triton.jit
def _merge_row(o_ptr, lse_ptr, b, r, num_splits, stride_ob, stride_or, stride_os, stride_lb,
               stride_lr, NS: tl.constexpr, R: tl.constexpr):  # fmt: skip
    """Row r of sequence b merged over its splits: (o_lat [R] fp32, natural-log lse)."""
    offs_s = tl.arange(0, NS)
    s_ok = offs_s < num_splits
    lse = tl.load(lse_ptr + b * stride_lb + r * stride_lr + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)  # empty splits (lse = -inf) weigh 0
    w_sum = tl.sum(w, axis=0)
    offs_r = tl.arange(0, R)
    o = tl.load(
        o_ptr + b * stride_ob + r * stride_or + offs_s[:, None] * stride_os + offs_r[None, :],
        mask=s_ok[:, None],
        other=0.0,
    )
    out = tl.sum(o * w[:, None], axis=0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    return out, (m_safe + tl.log2(w_sum)) / 1.4426950408889634


@triton.jit
def _mla_merge_kernel(
    o_ptr,
    lse_ptr,
    out_ptr,
    lse_out_ptr,
    num_splits,
    stride_ob,
    stride_or,
    stride_os,
    stride_lb,
    stride_lr,
    stride_outb,
    stride_outr,
    stride_lob,
    NS: tl.constexpr,
    R: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)  # every read here is the split kernel's output
    r = tl.program_id(0)  # rows (S x H: 524,288 for a 4K chunk at 128 heads) exceed grid y's 65,535
    b = tl.program_id(1)
    out, lse = _merge_row(o_ptr, lse_ptr, b, r, num_splits, stride_ob, stride_or, stride_os,
                          stride_lb, stride_lr, NS, R)  # fmt: skip
    offs_r = tl.arange(0, R)
    tl.store(out_ptr + b * stride_outb + r * stride_outr + offs_r, out.to(out_ptr.dtype.element_ty))
    # natural-log LSE, for merging with other attention pieces (chunked prefill)
    tl.store(lse_out_ptr + b * stride_lob + r, lse)


@triton.jit
def _mla_merge_out_kernel(
    o_ptr,
    lse_ptr,
    w_ptr,
    out_ptr,
    lse_out_ptr,
    num_splits,
    num_heads,
    stride_ob,
    stride_or,
    stride_os,
    stride_lb,
    stride_lr,
    stride_wh,
    stride_wc,
    stride_wv,
    stride_outb,
    stride_outr,
    stride_lob,
    NS: tl.constexpr,
    R: tl.constexpr,
    V: tl.constexpr,
    BV: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH_W: tl.constexpr,  # W not written by the kernel before: read before the wait
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    r = pid // (V // BV)
    offs_v = (pid % (V // BV)) * BV + tl.arange(0, BV)
    offs_c = tl.arange(0, R)
    w_ptrs = w_ptr + (r % num_heads).to(tl.int64) * stride_wh
    w_ptrs += offs_v[:, None] * stride_wv + offs_c[None, :] * stride_wc
    if PREFETCH_W:
        w = tl.load(w_ptrs)
        pdl_wait(PDL)
    else:
        pdl_wait(PDL)
        w = tl.load(w_ptrs)
    lat, lse = _merge_row(o_ptr, lse_ptr, b, r, num_splits, stride_ob, stride_or, stride_os,
                          stride_lb, stride_lr, NS, R)  # fmt: skip
    # _mla_merge_kernel's own conversion: the bits the unfused path stores for its GEMM (cvt.rn on
    # the GPU; the interpreter truncates, there in both kernels alike)
    lat = lat.to(out_ptr.dtype.element_ty).to(tl.float32)
    ov = tl.sum(w.to(tl.float32) * lat[None, :], axis=1)
    out_ptrs = out_ptr + b * stride_outb + r * stride_outr + offs_v
    tl.store(out_ptrs, to_dtype_rn(ov, out_ptr.dtype.element_ty))
    if pid % (V // BV) == 0:
        tl.store(lse_out_ptr + b * stride_lob + r, lse)


def mla_merge(o, lse, out, lse_out, num_splits: int, ns_pow2: int) -> None:
    """Merge o [B, RW, NS, C] fp32 partials and lse [B, RW, NS] into out [B, RW, C] and lse_out
    [B, RW] (natural log)."""
    b, rows = out.shape[:2]
    pdl = pdl_launch(o.device)
    _mla_merge_kernel[(rows, b)](
        o,
        lse,
        out,
        lse_out,
        num_splits,
        *o.stride()[:3],
        *lse.stride()[:2],
        *out.stride()[:2],
        lse_out.stride(0),
        NS=ns_pow2,
        R=out.shape[-1],
        PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )


def mla_merge_out_ref(o_lat_BRC: torch.Tensor, w_HCV: torch.Tensor) -> torch.Tensor:
    """o_lat [B, RW, C] (row r's head r % H) times W_UV [H, C, V] per head, fp32 sums, in o_lat's
    dtype: [B, RW, V]."""
    rows, h = o_lat_BRC.shape[1], w_HCV.shape[0]
    heads = torch.arange(rows, device=o_lat_BRC.device) % h
    return torch.einsum("brc,rcv->brv", o_lat_BRC.float(), w_HCV.float()[heads]).to(o_lat_BRC.dtype)


def check_w_out(
    w_HCV: torch.Tensor, num_heads: int, kv_lora_rank: int, dtype: torch.dtype, device: torch.device
) -> None:
    """ValueError unless w_HCV is a W_UV [H, C, V] for `num_heads` heads over a kv_lora_rank-wide
    latent output in `dtype` on `device`: H = num_heads, C = kv_lora_rank, any V >= 1."""
    check_tensor(w_HCV, "w_out", dtypes=(dtype,), ndim=3, device=device)
    h, c, v = w_HCV.shape
    if h != num_heads or c != kv_lora_rank or v < 1:
        raise ValueError(
            f"w_out has shape {tuple(w_HCV.shape)}: need [{num_heads}, {kv_lora_rank}, V >= 1] "
            "(heads, kv_lora_rank, value dims)"
        )


def merge_out_takes(v: int) -> bool:
    """Whether `mla_merge_out` takes W_UV's V value dims: a power of two >= 16 (its programs'
    16-wide slices; DeepSeek-V3: 128)."""
    return v >= _BV and v & (v - 1) == 0


def mla_merge_out(
    o: torch.Tensor,
    lse: torch.Tensor,
    w_HCV: torch.Tensor,
    out_dtype: torch.dtype,
    num_splits: int,
    ns_pow2: int,
    fresh_w: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge o [B, RW, NS, C] fp32 partials (num_splits of them; ns_pow2 its next power of two)
    and lse [B, RW, NS], then apply W_UV [H, C, V] (any strides; the caller checks it with
    `check_w_out`) per row's head r % H: (o_v [B, RW, V] in out_dtype, lse_out [B, RW] natural
    log). `fresh_w`: W was just made (by the kernel launched just before, say): read after the PDL
    wait, not before it."""
    b, rows = o.shape[:2]
    v = w_HCV.shape[-1]
    if not merge_out_takes(v):
        raise ValueError(f"w_HCV's V = {v}: must be a power of two >= {_BV} (DeepSeek-V3: 128)")
    out = torch.empty(b, rows, v, dtype=out_dtype, device=o.device)
    lse_out = torch.empty(b, rows, dtype=torch.float32, device=o.device)
    pdl = pdl_launch(o.device)
    _mla_merge_out_kernel[(rows * (v // _BV), b)](
        o,
        lse,
        w_HCV,
        out,
        lse_out,
        num_splits,
        w_HCV.shape[0],
        *o.stride()[:3],
        *lse.stride()[:2],
        *w_HCV.stride(),
        *out.stride()[:2],
        lse_out.stride(0),
        NS=ns_pow2,
        R=o.shape[-1],
        V=v,
        BV=_BV,
        PDL=pdl,
        PREFETCH_W=not fresh_w,
        num_warps=4,
        launch_pdl=pdl,
    )
    return out, lse_out
