"""The paged MLA decode's inputs in one launch: the new tokens' latent (optionally RMS-normed) and
rope key (optionally rotated) stored into their cache slots, and the absorbed query packed as the
decode kernel reads it (its rope part optionally rotated). One program per (token, block of HB
heads); the token's first head block also writes its cache row. `mla_write_pack` is the checked
wrapper, `mla_write_pack_ref` the PyTorch reference, `mla_write_pack_applies` the test by which
the engine's paged view (`moeray.platform.engine.paged_view.KernelPagedView`) chooses between them.

Legend: B sequences, S new tokens each, H heads, C kv_lora_rank (latent), R rope dims, R2 = R/2,
K = C + R values per cached token, HB heads per program; CP, R2P padded to powers of 2.

Why: before each paged MLA decode, PyTorch-side glue spends launches on a few KB each: the latent's
RMSNorm, two RoPE rotations (the rope key and the query's rope part), two index_put (latent, then
rope key, into the slots) and a cat of the query's parts. One launch does all of it here: 6
launches become 1 per layer. The query's packing is spread over the grid, HB heads a program: one
program a token packing all H heads took 13.5 us a call at DeepSeek-V3's 128 heads on an H200
(128 x 576 bf16 values, 147 KB read and written serially by one program) against 3.5 us at
Moonlight's 16. HB = 8 at C = 512 (a [8, 512] tile, 32 values a thread at 4 warps) gives 16
programs a token at 128 heads and 2 at 16; the per-token work (norm, rope key, cache row) stays
with head block 0.

Numerics: the copies are exact; the rotations are `rope_ref`'s bit for bit (separate products, FMA
contraction off, as `moeray.kernels.rope`); the norm is `rms_norm_ref`'s up to the order of its
fp32 sum of squares (one rounding step of the dtype at most, as `moeray.kernels.norm`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import check_tensor, pdl_launch, pdl_wait, to_dtype_rn, use_triton
from moeray.kernels.norm import rms_norm_ref
from moeray.kernels.rope import rope_ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def mla_write_pack_ref(
    cache_PNK: torch.Tensor,
    slots_T: torch.Tensor,
    kv_BSC: torch.Tensor,
    pe_BSR: torch.Tensor,
    q_lat_BSHC: torch.Tensor,
    q_pe_BSHR: torch.Tensor,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Store token t = b * S + s's kv (first C) and pe (last R) in flat slot slots_T[t] of the
    cache [P, N, K]; return q [B, S, H, K] = the query's latent then rope part. With norm =
    (weight [C], eps) kv is RMS-normed first; with rope = (cos, sin) [B, S, R2] (fp32) pe and
    q_pe are rotated first."""
    if norm is not None:
        kv_BSC = rms_norm_ref(kv_BSC, norm[0], norm[1])[0]
    if rope is not None:
        pe_BSR = rope_ref(pe_BSR.unsqueeze(2), *rope).squeeze(2)
        q_pe_BSHR = rope_ref(q_pe_BSHR, *rope)
    flat = cache_PNK.view(-1, cache_PNK.shape[-1])
    C = kv_BSC.shape[-1]
    flat[slots_T, :C] = kv_BSC.reshape(-1, C).to(flat.dtype)
    flat[slots_T, C:] = pe_BSR.reshape(-1, pe_BSR.shape[-1]).to(flat.dtype)
    return torch.cat([q_lat_BSHC, q_pe_BSHR], dim=-1).to(flat.dtype)


@triton.jit
def _copy_heads(src, stride_src, dst, stride_dst, offs_h, offs, mask):
    """dst[h, i] = src[h, i] for a [heads, values] tile with the given row strides."""
    x = tl.load(src + offs_h[:, None] * stride_src + offs[None, :], mask=mask)
    tl.store(dst + offs_h[:, None] * stride_dst + offs[None, :], x, mask=mask)


@triton.jit
def _rotate_heads(
    src, stride_src, dst, stride_dst, offs_h, offs_j, mask, c, sn, ROPE: tl.constexpr
):
    """The pairs (2j, 2j+1) of a [heads, R] tile rotated by (c, sn) [R2] (copied without ROPE)."""
    x0 = tl.load(src + offs_h[:, None] * stride_src + 2 * offs_j[None, :], mask=mask)
    x1 = tl.load(src + offs_h[:, None] * stride_src + 2 * offs_j[None, :] + 1, mask=mask)
    if ROPE:
        f0 = x0.to(tl.float32)
        f1 = x1.to(tl.float32)
        x0 = to_dtype_rn(f0 * c[None, :] - f1 * sn[None, :], x0.dtype)
        x1 = to_dtype_rn(f0 * sn[None, :] + f1 * c[None, :], x1.dtype)
    tl.store(dst + offs_h[:, None] * stride_dst + 2 * offs_j[None, :], x0, mask=mask)
    tl.store(dst + offs_h[:, None] * stride_dst + 2 * offs_j[None, :] + 1, x1, mask=mask)


@triton.jit
def _token_angles(cos_row, sin_row, offs_j, R2, ROPE: tl.constexpr):
    """A token's rope angles (cos, sin) [R2P] in fp32 (zeros without ROPE: unread)."""
    c = tl.zeros(offs_j.shape, dtype=tl.float32)
    sn = tl.zeros(offs_j.shape, dtype=tl.float32)
    if ROPE:
        c = tl.load(cos_row + offs_j, mask=offs_j < R2, other=0.0)
        sn = tl.load(sin_row + offs_j, mask=offs_j < R2, other=0.0)
    return c, sn


@triton.jit
def _store_cache_row(
    row, kv_row, pe_row, w_ptr, eps, C, R2, offs_c, offs_j, c, sn, NORM: tl.constexpr, ROPE
):
    """One token's cache row: its latent [C] (RMS-normed with NORM) then its rope key [2 * R2]
    (rotated by (c, sn) with ROPE); offs_c / offs_j pad C / R2 to powers of 2."""
    ok_c = offs_c < C
    kv = tl.load(kv_row + offs_c, mask=ok_c, other=0.0)
    if NORM:  # as moeray.kernels.norm's _rms_norm_kernel without a residual
        hf = kv.to(tl.float32)
        mean_sq = tl.sum(hf * hf, axis=0) / C
        normed = to_dtype_rn(hf * (1.0 / tl.sqrt(mean_sq + eps)), kv.dtype)
        w = tl.load(w_ptr + offs_c, mask=ok_c, other=0.0)
        kv = to_dtype_rn(normed.to(tl.float32) * w.to(tl.float32), kv.dtype)
    tl.store(row + offs_c, kv, mask=ok_c)
    one = tl.zeros([1], dtype=tl.int32)  # the rope key as a single "head"
    _rotate_heads(pe_row, 0, row + C, 0, one, offs_j, (offs_j < R2)[None, :], c, sn, ROPE)


@triton.jit
def _mla_write_pack_kernel(
    cache_ptr,
    slots_ptr,
    kv_ptr,
    pe_ptr,
    ql_ptr,
    qp_ptr,
    q_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    eps,
    S,
    H,
    C,
    R2,
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
    stride_cb,
    stride_cs,
    stride_sb,
    stride_ss,
    NORM: tl.constexpr,
    ROPE: tl.constexpr,
    HB: tl.constexpr,
    CP: tl.constexpr,
    R2P: tl.constexpr,
    PDL: tl.constexpr,
):
    # PDL: the wait comes first; the norm weight (C values) is not worth a read before it.
    pdl_wait(PDL)
    t = tl.program_id(0)
    b = (t // S).to(tl.int64)
    s = (t % S).to(tl.int64)
    K = C + 2 * R2
    offs_c = tl.arange(0, CP)
    offs_j = tl.arange(0, R2P)
    ok_c = offs_c < C
    ok_j = offs_j < R2
    c, sn = _token_angles(
        cos_ptr + b * stride_cb + s * stride_cs,
        sin_ptr + b * stride_sb + s * stride_ss,
        offs_j,
        R2,
        ROPE,
    )
    if tl.program_id(1) == 0:  # the token's cache row: written by its first head block only
        row = cache_ptr + tl.load(slots_ptr + t).to(tl.int64) * K
        kv_row = kv_ptr + b * stride_kvb + s * stride_kvs
        pe_row = pe_ptr + b * stride_peb + s * stride_pes
        _store_cache_row(row, kv_row, pe_row, w_ptr, eps, C, R2, offs_c, offs_j, c, sn, NORM, ROPE)
    q_row = q_ptr + t.to(tl.int64) * H * K
    ql_row = ql_ptr + b * stride_qlb + s * stride_qls
    qp_row = qp_ptr + b * stride_qpb + s * stride_qps
    offs_h = tl.program_id(1) * HB + tl.arange(0, HB)
    ok_h = (offs_h < H)[:, None]
    _copy_heads(ql_row, stride_qlh, q_row, K, offs_h, offs_c, ok_h & ok_c[None, :])
    _rotate_heads(
        qp_row, stride_qph, q_row + C, K, offs_h, offs_j, ok_h & ok_j[None, :], c, sn, ROPE
    )


def mla_write_pack_applies(
    cache_PNK: torch.Tensor,
    kv_BSC: torch.Tensor,
    pe_BSR: torch.Tensor,
    q_lat_BSHC: torch.Tensor,
    q_pe_BSHR: torch.Tensor,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> bool:
    """Whether `mla_write_pack` takes these as they are: every tensor (and the norm weight) in the
    cache's dtype (fp32, bf16 or fp16: the kernel does not convert; an FP8 cache keeps the
    reference's casts), cos/sin fp32, unit stride over the last dim, a contiguous cache, on CUDA
    (or the interpreter)."""
    tensors = [cache_PNK, kv_BSC, pe_BSR, q_lat_BSHC, q_pe_BSHR]
    tensors += [] if norm is None else [norm[0]]
    if cache_PNK.dtype not in DTYPES or any(t.dtype != cache_PNK.dtype for t in tensors):
        return False
    if rope is not None:
        if any(t.dtype != torch.float32 or t.stride(-1) != 1 for t in rope):
            return False
        tensors += list(rope)
    if any(t.stride(-1) != 1 for t in tensors) or not cache_PNK.is_contiguous():
        return False
    return kv_BSC.dim() == 3 and q_lat_BSHC.dim() == 4 and use_triton(*tensors)


def check_write_inputs(
    cache_PNK: torch.Tensor,
    slots_T: torch.Tensor,
    kv_BSC: torch.Tensor,
    pe_BSR: torch.Tensor,
    q_lat_shape: tuple[int, ...] | torch.Size,
    q_pe_BSHR: torch.Tensor,
    norm: tuple[torch.Tensor, float] | None,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """ValueError naming the first input `mla_write_pack` cannot take, the packed query's latent
    being of `q_lat_shape` [B, S, H, C]: dtypes (the cache's), devices, ranks and shapes."""
    check_tensor(cache_PNK, "cache", dtypes=DTYPES, ndim=3, contiguous=True)
    dev = cache_PNK.device
    check_tensor(slots_T, "slots", dtypes=(torch.int32, torch.int64), ndim=1, device=dev)
    dt = (cache_PNK.dtype,)
    check_tensor(kv_BSC, "kv", dtypes=dt, ndim=3, device=dev)
    check_tensor(pe_BSR, "pe", dtypes=dt, ndim=3, device=dev)
    check_tensor(q_pe_BSHR, "q_pe", dtypes=dt, ndim=4, device=dev)
    if len(q_lat_shape) != 4:
        raise ValueError(f"q_lat has shape {tuple(q_lat_shape)}; expected [B, S, H, C]")
    B, S, H, C = q_lat_shape
    R = q_pe_BSHR.shape[-1]
    K = cache_PNK.shape[-1]
    shapes = (tuple(kv_BSC.shape), tuple(pe_BSR.shape), tuple(q_pe_BSHR.shape), slots_T.numel())
    if shapes != ((B, S, C), (B, S, R), (B, S, H, R), B * S) or C + R != K or R % 2:
        raise ValueError(
            f"expected kv [B, S, C], pe [B, S, R], q_lat [B, S, H, C], q_pe [B, S, H, R], B * S "
            f"slots and a cache of C + R = {K} values per token, R even; got kv {shapes[0]}, pe "
            f"{shapes[1]}, q_lat {(B, S, H, C)}, q_pe {shapes[2]}, {shapes[3]} slots"
        )
    if norm is not None:
        check_tensor(norm[0], "norm weight", dtypes=dt, ndim=1, device=dev)
        if norm[0].shape[0] != C:
            raise ValueError(f"norm weight has {norm[0].shape[0]} values; expected C = {C}")
    if rope is not None:
        for name, t in zip(("cos", "sin"), rope, strict=True):
            check_tensor(t, name, dtypes=(torch.float32,), ndim=3, device=dev)
            if tuple(t.shape) != (B, S, R // 2):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {(B, S, R // 2)}")


def mla_write_pack(
    cache_PNK: torch.Tensor,
    slots_T: torch.Tensor,
    kv_BSC: torch.Tensor,
    pe_BSR: torch.Tensor,
    q_lat_BSHC: torch.Tensor,
    q_pe_BSHR: torch.Tensor,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`mla_write_pack_ref` in one launch (see `mla_write_pack_applies` for what it takes).
    Slots must be distinct (each new token has its own). No host sync (CUDA graphs)."""
    check_tensor(q_lat_BSHC, "q_lat", ndim=4)
    check_write_inputs(cache_PNK, slots_T, kv_BSC, pe_BSR, q_lat_BSHC.shape, q_pe_BSHR, norm, rope)
    dev = cache_PNK.device
    check_tensor(q_lat_BSHC, "q_lat", dtypes=(cache_PNK.dtype,), device=dev)
    B, S, H, C = q_lat_BSHC.shape
    R = q_pe_BSHR.shape[-1]
    K = cache_PNK.shape[-1]
    if not use_triton(cache_PNK):
        return mla_write_pack_ref(
            cache_PNK, slots_T, kv_BSC, pe_BSR, q_lat_BSHC, q_pe_BSHR, norm=norm, rope=rope
        )
    named = [("kv", kv_BSC), ("pe", pe_BSR), ("q_lat", q_lat_BSHC), ("q_pe", q_pe_BSHR)]
    named += [] if rope is None else [("cos", rope[0]), ("sin", rope[1])]
    for name, t in named:
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs unit stride over its last dim, got {t.stride()}")
    q = torch.empty((B, S, H, K), dtype=cache_PNK.dtype, device=dev)
    if B * S:
        cp = triton.next_power_of_2(C)
        w, eps = norm if norm is not None else (kv_BSC, 0.0)  # the weight is unread without NORM
        cos, sin = rope if rope is not None else (q_pe_BSHR, q_pe_BSHR)  # unread without ROPE
        pdl = pdl_launch(dev)
        # One program per (token, block of HB heads), HB * CP <= 4096: 32 values a thread at 4
        # warps; HB = 8 at C = 512, 16 programs a token at V3's 128 heads (see the module's Why).
        hb = max(1, min(triton.next_power_of_2(H), 4096 // cp))
        _mla_write_pack_kernel[(B * S, triton.cdiv(H, hb))](
            cache_PNK,
            slots_T,
            kv_BSC,
            pe_BSR,
            q_lat_BSHC,
            q_pe_BSHR,
            q,
            w,
            cos,
            sin,
            float(eps),
            S,
            H,
            C,
            R // 2,
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
            cos.stride(0),
            cos.stride(1),
            sin.stride(0),
            sin.stride(1),
            NORM=norm is not None,
            ROPE=rope is not None,
            HB=hb,
            CP=cp,
            R2P=triton.next_power_of_2(max(R // 2, 1)),
            PDL=pdl,
            num_warps=4,
            enable_fp_fusion=False,  # the rotations round each product, as PyTorch's kernels do
            launch_pdl=pdl,
        )
    return q
