"""The paged MLA decode's inputs in one launch: the new tokens' latent and rope key stored into
their cache slots, and the absorbed query packed as the kernel reads it. `mla_write_pack` is the
checked wrapper, `mla_write_pack_ref` the PyTorch reference, `mla_write_pack_applies` the test by
which the engine's paged view (`moeray.platform.engine.runner.KernelPagedView.attend`) chooses
between them.

Legend: B sequences, S new tokens each, H heads, C kv_lora_rank (latent), R rope dims,
K = C + R values per cached token, HB heads per loop step; CP, RP padded to powers of 2.

Why: before each paged MLA decode, PyTorch spends 3 launches per layer on copies of a few KB: two
index_put (latent, then rope key, into the slots) and a cat of the query's latent and rope parts.
One program per new token does all three here. Pure copies (one dtype throughout), so the result
equals the reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import check_tensor, use_triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def mla_write_pack_ref(
    cache_PNK: torch.Tensor,
    slots_T: torch.Tensor,
    kv_BSC: torch.Tensor,
    pe_BSR: torch.Tensor,
    q_lat_BSHC: torch.Tensor,
    q_pe_BSHR: torch.Tensor,
) -> torch.Tensor:
    """Store token t = b * S + s's kv (first C) and pe (last R) in flat slot slots_T[t] of the
    cache [P, N, K]; return q [B, S, H, K] = the query's latent then rope part."""
    flat = cache_PNK.view(-1, cache_PNK.shape[-1])
    C = kv_BSC.shape[-1]
    flat[slots_T, :C] = kv_BSC.reshape(-1, C).to(flat.dtype)
    flat[slots_T, C:] = pe_BSR.reshape(-1, pe_BSR.shape[-1]).to(flat.dtype)
    return torch.cat([q_lat_BSHC, q_pe_BSHR], dim=-1).to(flat.dtype)


@triton.jit
def _mla_write_pack_kernel(
    cache_ptr,
    slots_ptr,
    kv_ptr,
    pe_ptr,
    ql_ptr,
    qp_ptr,
    q_ptr,
    S,
    H,
    C,
    R,
    stride_kvb,
    stride_kvs,
    stride_peb,
    stride_pes,
    stride_qlb,
    stride_qls,
    stride_qlh,
    stride_qpb,
    stride_qps,
    stride_qph,
    HB: tl.constexpr,
    CP: tl.constexpr,
    RP: tl.constexpr,
):
    t = tl.program_id(0)
    b = (t // S).to(tl.int64)
    s = (t % S).to(tl.int64)
    K = C + R
    offs_c = tl.arange(0, CP)
    offs_r = tl.arange(0, RP)
    ok_c = offs_c < C
    ok_r = offs_r < R
    row = cache_ptr + tl.load(slots_ptr + t).to(tl.int64) * K
    kv = tl.load(kv_ptr + b * stride_kvb + s * stride_kvs + offs_c, mask=ok_c)
    tl.store(row + offs_c, kv, mask=ok_c)
    pe = tl.load(pe_ptr + b * stride_peb + s * stride_pes + offs_r, mask=ok_r)
    tl.store(row + C + offs_r, pe, mask=ok_r)
    q_row = q_ptr + t.to(tl.int64) * H * K
    for h0 in range(0, H, HB):
        offs_h = h0 + tl.arange(0, HB)
        ql_row = ql_ptr + b * stride_qlb + s * stride_qls
        _copy_heads(ql_row, stride_qlh, q_row, K, offs_h, offs_c, (offs_h < H)[:, None] & ok_c)
        qp_row = qp_ptr + b * stride_qpb + s * stride_qps
        _copy_heads(qp_row, stride_qph, q_row + C, K, offs_h, offs_r, (offs_h < H)[:, None] & ok_r)


@triton.jit
def _copy_heads(src, stride_src, dst, stride_dst, offs_h, offs, mask):
    """dst[h, i] = src[h, i] for a [heads, values] tile with the given row strides."""
    x = tl.load(src + offs_h[:, None] * stride_src + offs[None, :], mask=mask)
    tl.store(dst + offs_h[:, None] * stride_dst + offs[None, :], x, mask=mask)


def mla_write_pack_applies(
    cache_PNK: torch.Tensor,
    kv_BSC: torch.Tensor,
    pe_BSR: torch.Tensor,
    q_lat_BSHC: torch.Tensor,
    q_pe_BSHR: torch.Tensor,
) -> bool:
    """Whether `mla_write_pack` takes these as they are: every tensor in the cache's dtype (fp32,
    bf16 or fp16: the kernel copies, it does not convert; an FP8 cache keeps the reference's
    casts), unit stride over the last dim, a contiguous cache, on CUDA (or the interpreter)."""
    tensors = (cache_PNK, kv_BSC, pe_BSR, q_lat_BSHC, q_pe_BSHR)
    if cache_PNK.dtype not in DTYPES or any(t.dtype != cache_PNK.dtype for t in tensors):
        return False
    if any(t.stride(-1) != 1 for t in tensors) or not cache_PNK.is_contiguous():
        return False
    return kv_BSC.dim() == 3 and q_lat_BSHC.dim() == 4 and use_triton(*tensors)


def mla_write_pack(
    cache_PNK: torch.Tensor,
    slots_T: torch.Tensor,
    kv_BSC: torch.Tensor,
    pe_BSR: torch.Tensor,
    q_lat_BSHC: torch.Tensor,
    q_pe_BSHR: torch.Tensor,
) -> torch.Tensor:
    """`mla_write_pack_ref` in one launch (see `mla_write_pack_applies` for what it takes).
    Slots must be distinct (each new token has its own). No host sync (CUDA graphs)."""
    check_tensor(cache_PNK, "cache", dtypes=DTYPES, ndim=3, contiguous=True)
    dev = cache_PNK.device
    check_tensor(slots_T, "slots", dtypes=(torch.int32, torch.int64), ndim=1, device=dev)
    dt = (cache_PNK.dtype,)
    check_tensor(kv_BSC, "kv", dtypes=dt, ndim=3, device=dev)
    check_tensor(pe_BSR, "pe", dtypes=dt, ndim=3, device=dev)
    check_tensor(q_lat_BSHC, "q_lat", dtypes=dt, ndim=4, device=dev)
    check_tensor(q_pe_BSHR, "q_pe", dtypes=dt, ndim=4, device=dev)
    B, S, H, C = q_lat_BSHC.shape
    R = q_pe_BSHR.shape[-1]
    K = cache_PNK.shape[-1]
    shapes = (tuple(kv_BSC.shape), tuple(pe_BSR.shape), tuple(q_pe_BSHR.shape), slots_T.numel())
    if shapes != ((B, S, C), (B, S, R), (B, S, H, R), B * S) or C + R != K:
        raise ValueError(
            f"expected kv [B, S, C], pe [B, S, R], q_lat [B, S, H, C], q_pe [B, S, H, R], B * S "
            f"slots and a cache of C + R = {K} values per token; got kv {shapes[0]}, pe "
            f"{shapes[1]}, q_lat {(B, S, H, C)}, q_pe {shapes[2]}, {shapes[3]} slots"
        )
    if not use_triton(cache_PNK):
        return mla_write_pack_ref(cache_PNK, slots_T, kv_BSC, pe_BSR, q_lat_BSHC, q_pe_BSHR)
    for name, t in (("kv", kv_BSC), ("pe", pe_BSR), ("q_lat", q_lat_BSHC), ("q_pe", q_pe_BSHR)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs unit stride over its last dim, got {t.stride()}")
    q = torch.empty((B, S, H, K), dtype=cache_PNK.dtype, device=dev)
    if B * S:
        cp, rp = triton.next_power_of_2(C), triton.next_power_of_2(R)
        _mla_write_pack_kernel[(B * S,)](
            cache_PNK,
            slots_T,
            kv_BSC,
            pe_BSR,
            q_lat_BSHC,
            q_pe_BSHR,
            q,
            S,
            H,
            C,
            R,
            kv_BSC.stride(0),
            kv_BSC.stride(1),
            pe_BSR.stride(0),
            pe_BSR.stride(1),
            q_lat_BSHC.stride(0),
            q_lat_BSHC.stride(1),
            q_lat_BSHC.stride(2),
            q_pe_BSHR.stride(0),
            q_pe_BSHR.stride(1),
            q_pe_BSHR.stride(2),
            HB=max(1, min(triton.next_power_of_2(H), 4096 // cp)),
            CP=cp,
            RP=rp,
            num_warps=4,
        )
    return q
