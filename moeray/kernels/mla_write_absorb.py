"""`mla_write_pack` with the query's absorption folded in: at a few decode tokens, one launch
stores the new tokens' cache rows (as `mla_write_pack`), and packs the query the decode kernel
reads with its latent part computed here from the unabsorbed query and MLA's W_UK:

    q [T, H, C + R] = cat(q_nope [T, H, N] @ W_UK [H, N, C] per head, rotated q_pe [T, H, R])

Legend: T = B * S new tokens (at most ABSORB_MAX_ROWS), H heads, N qk_nope_head_dim, C
kv_lora_rank, R rope dims; NP, CP, R2P padded to powers of 2; BC latent columns per program.

Why: the absorption is otherwise its own launch per layer (a batched cuBLAS GEMM, ~3.2 us on an
H200 at Moonlight's 16 heads for 2 MB of W_UK whose bytes take ~0.44 us at 4.8 TB/s; 27 a step),
between the two kernels that this one and the query projection already are. Here each program owns
one head and BC latent columns of W_UK over the whole N (128 at V3 and Moonlight), so W_UK is read
once for all T tokens: 16 KB a program at BC = 64, 1,024 programs at V3's 128 heads; BC = 32 where
64 would give fewer than two programs an SM (Moonlight: 16 heads x 16 blocks = 256 programs). Past
ABSORB_MAX_ROWS the per-token loop would re-read nothing but lengthen every program, and a GEMM
serves better: the caller absorbs first (`head_matmul`) and packs with `mla_write_pack`. Where
the grid is small, each of the tokens gets its own programs instead (`absorb_token_programs`).
The program of (head h, block 0) also rotates head h's rope query for each of its tokens, and
that of (head 0, block 0) writes their cache rows.

PDL (sm_90, `common.pdl_launch`), gemv's rule: a program loads its W_UK tile before it waits for
the previous kernel, so the read overlaps that kernel's tail; the query, the latent and every store
come after the wait. A W_UK made for the call (`fresh_w`: a cast, an FP8 copy's first
dequantization) is read after the wait.

Numerics: the latent query is the fp32 sum over N of q_nope * W_UK rounded once to the output dtype
(cuBLAS's einsum: the same up to the fp32 summation order); the rope part and the cache rows are
`mla_write_pack`'s bits.

On by default; MOERAY_FUSED_MLA_WUK=0 keeps the absorption apart (`mla_write_absorb_applies`).
In the engine at Moonlight's shape, batch 1, on an H100 (`bench engine --ab`), the decode graph
replays 2.3-2.6% faster with it than the main run while the same engine built again (as_run_again)
replays 1.3-2.4% slower: FP8 twice, bf16 once; at DeepSeek-V3's widths (128 heads) it is even with
as_run_again (benchmarks/results/engine-nvidia-h100-80gb-hbm3-*-b1ab*.json).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    check_tensor,
    pdl_launch,
    pdl_wait,
    switched_off,
    switched_on,
    use_triton,
)
from moeray.kernels.head_gemv import head_matmul
from moeray.kernels.mla_write import (
    _rotate_heads,
    _store_cache_row,
    _token_angles,
    check_write_inputs,
    mla_write_pack,
    mla_write_pack_applies,
    mla_write_pack_ref,
)

# Tokens one launch absorbs: each program loops over them with its W_UK tile in registers, so
# the weight is read once; the decode batches of batch-1 serving (1 token, or 1 + MTP drafts).
ABSORB_MAX_ROWS = 4


def absorb_block_c(heads: int, c: int, sms: int) -> int:
    """Latent columns a program absorbs: 64 (16 KB of W_UK at N = 128 bf16) where that still
    gives two programs an SM, else 32 (H200, 132 SMs: 32 at Moonlight's 16 heads, 256 programs;
    64 at V3's 128, 1,024)."""
    return 64 if heads * triton.cdiv(c, 64) >= 2 * sms else 32


def absorb_token_programs(programs: int, tokens: int, sms: int) -> bool:
    """Whether each of a few tokens gets its own programs (grid axis 2) rather than one program
    looping over them with the W_UK tile in registers: where the grid of one token's `programs`
    times `tokens` stays within 4 programs an SM (Moonlight's and the small preset's 16 heads at
    2 tokens: 512 on an H200's 132 SMs; V3's 128 heads keep the loop), as at MTP's 2-token
    verification, whose serial loop made each launch ~2x a token's. The tile is then read once
    a token (the repeats from L2). On an H100 the small preset's MTP cycle at batch 1 took 0.793
    ms with it against 0.815 without (benchmarks/results/mtp-cycle-nvidia-h100-80gb-hbm3-b1-wuk
    {split,loop}.json). MOERAY_FUSED_MLA_WUK_SPLIT=0: always the loop. With
    MOERAY_FUSED_MLA_WUK_SPLIT_WIDE=1 (opt-in, not yet timed) the bound is 8 programs an SM, so
    the 3-4 tokens of 2-3 drafts' verification at 16 heads split too (768-1,024 programs)."""
    if tokens < 2 or switched_off("MLA_WUK_SPLIT"):
        return False
    per_sm = 8 if switched_on("MLA_WUK_SPLIT_WIDE") else 4
    return programs * tokens <= per_sm * sms


def mla_write_absorb_ref(
    cache_PNK: torch.Tensor,
    slots_T: torch.Tensor,
    kv_BSC: torch.Tensor,
    pe_BSR: torch.Tensor,
    q_nope_BSHN: torch.Tensor,
    w_uk_HNC: torch.Tensor,
    q_pe_BSHR: torch.Tensor,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`mla_write_pack_ref` of the absorbed query q_lat = q_nope W_UK per head (fp32 products
    and sum, rounded once to q_nope's dtype)."""
    q_lat_BSHC = torch.einsum("bshn,hnc->bshc", q_nope_BSHN.float(), w_uk_HNC.float())
    q_lat_BSHC = q_lat_BSHC.to(q_nope_BSHN.dtype)
    return mla_write_pack_ref(
        cache_PNK, slots_T, kv_BSC, pe_BSR, q_lat_BSHC, q_pe_BSHR, norm=norm, rope=rope
    )


def mla_write_absorb_applies(
    cache_PNK: torch.Tensor,
    kv_BSC: torch.Tensor,
    pe_BSR: torch.Tensor,
    q_nope_BSHN: torch.Tensor,
    w_uk_HNC: torch.Tensor,
    q_pe_BSHR: torch.Tensor,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> bool:
    """Whether `mla_write_absorb` runs its kernel here: MOERAY_FUSED_MLA_WUK not "0", at most
    ABSORB_MAX_ROWS tokens, W_UK [H, N, C] in the cache's dtype with C contiguous, and what
    `mla_write_pack_applies` asks of the rest (q_nope in the place of q_lat)."""
    if switched_off("MLA_WUK") or q_nope_BSHN.dim() != 4 or w_uk_HNC.dim() != 3:
        return False
    if q_nope_BSHN.shape[0] * q_nope_BSHN.shape[1] > ABSORB_MAX_ROWS:
        return False
    if w_uk_HNC.dtype != cache_PNK.dtype or w_uk_HNC.stride(-1) != 1 or not use_triton(w_uk_HNC):
        return False
    return mla_write_pack_applies(
        cache_PNK, kv_BSC, pe_BSR, q_nope_BSHN, q_pe_BSHR, norm=norm, rope=rope
    )


@triton.jit
def _mla_write_absorb_kernel(
    cache_ptr,
    slots_ptr,
    kv_ptr,
    pe_ptr,
    qn_ptr,
    wuk_ptr,
    qp_ptr,
    q_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    eps,
    T,
    S,
    H,
    N,
    C,
    R2,
    stride_kvb,
    stride_kvs,
    stride_peb,
    stride_pes,
    stride_qnb,
    stride_qns,
    stride_qnh,
    stride_wh,
    stride_wn,
    stride_qpb,
    stride_qps,
    stride_qph,
    stride_cb,
    stride_cs,
    stride_sb,
    stride_ss,
    NORM: tl.constexpr,
    ROPE: tl.constexpr,
    ROWS: tl.constexpr,
    NP: tl.constexpr,
    BC: tl.constexpr,
    CP: tl.constexpr,
    R2P: tl.constexpr,
    PDL: tl.constexpr,
    EARLY: tl.constexpr,
):
    h = tl.program_id(0)
    cb = tl.program_id(1)
    offs_n = tl.arange(0, NP)
    offs_bc = cb * BC + tl.arange(0, BC)
    ok_w = (offs_n < N)[:, None] & (offs_bc < C)[None, :]
    w_tile = wuk_ptr + h.to(tl.int64) * stride_wh + offs_n[:, None] * stride_wn + offs_bc[None, :]
    if EARLY:  # W_UK is a model weight: no earlier kernel writes it
        w = tl.load(w_tile, mask=ok_w, other=0.0)
        pdl_wait(PDL)
    else:
        pdl_wait(PDL)
        w = tl.load(w_tile, mask=ok_w, other=0.0)
    wf = w.to(tl.float32)
    K = C + 2 * R2
    offs_j = tl.arange(0, R2P)
    # tokens program_id(2) .. + ROWS - 1: all of them in one program (ROWS = ABSORB_MAX_ROWS, one
    # program along axis 2), or one each (ROWS = 1, `absorb_token_programs`)
    r0 = tl.program_id(2)
    for i in tl.static_range(ROWS):
        r = r0 + i
        if r < T:
            b = r // S
            s = r % S
            qn_row = qn_ptr + b * stride_qnb + s * stride_qns + h * stride_qnh
            x = tl.load(qn_row + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            q_lat = tl.sum(x[:, None] * wf, axis=0)
            q_row = q_ptr + (r * H + h).to(tl.int64) * K
            tl.store(q_row + offs_bc, q_lat.to(w.dtype), mask=offs_bc < C)
            if cb == 0:  # head h's rope query, and with head 0 the token's cache row
                cos_row = cos_ptr + b * stride_cb + s * stride_cs
                c, sn = _token_angles(
                    cos_row, sin_ptr + b * stride_sb + s * stride_ss, offs_j, R2, ROPE
                )
                one = tl.zeros([1], dtype=tl.int32)
                qp_row = qp_ptr + b * stride_qpb + s * stride_qps + h * stride_qph
                ok_j = (offs_j < R2)[None, :]
                _rotate_heads(qp_row, 0, q_row + C, 0, one, offs_j, ok_j, c, sn, ROPE)
                if h == 0:
                    row = cache_ptr + tl.load(slots_ptr + r).to(tl.int64) * K
                    kv_row = kv_ptr + b * stride_kvb + s * stride_kvs
                    pe_row = pe_ptr + b * stride_peb + s * stride_pes
                    offs_c = tl.arange(0, CP)
                    _store_cache_row(
                        row, kv_row, pe_row, w_ptr, eps, C, R2, offs_c, offs_j, c, sn, NORM, ROPE
                    )


def mla_write_absorb(
    cache_PNK: torch.Tensor,
    slots_T: torch.Tensor,
    kv_BSC: torch.Tensor,
    pe_BSR: torch.Tensor,
    q_nope_BSHN: torch.Tensor,
    w_uk_HNC: torch.Tensor,
    q_pe_BSHR: torch.Tensor,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    fresh_w: bool = False,
) -> torch.Tensor:
    """`mla_write_absorb_ref`: in one launch where `mla_write_absorb_applies`, else the
    absorption (`head_matmul`) then `mla_write_pack`. Slots distinct; no host sync (CUDA
    graphs). `fresh_w`: W_UK was made for this call (read after the PDL wait)."""
    check_tensor(cache_PNK, "cache", ndim=3)
    dev = cache_PNK.device
    check_tensor(q_nope_BSHN, "q_nope", dtypes=(cache_PNK.dtype,), ndim=4, device=dev)
    check_tensor(w_uk_HNC, "w_uk", dtypes=(cache_PNK.dtype,), ndim=3, device=dev)
    B, S, H, N = q_nope_BSHN.shape
    if w_uk_HNC.shape[:2] != (H, N):
        raise ValueError(
            f"w_uk has shape {tuple(w_uk_HNC.shape)}; expected [H, N, C] with H = {H}, N = {N} "
            f"as q_nope's {(B, S, H, N)}"
        )
    if not mla_write_absorb_applies(
        cache_PNK, kv_BSC, pe_BSR, q_nope_BSHN, w_uk_HNC, q_pe_BSHR, norm=norm, rope=rope
    ):
        q_lat_BSHC = head_matmul(q_nope_BSHN, w_uk_HNC, fresh_w=fresh_w)
        return mla_write_pack(
            cache_PNK, slots_T, kv_BSC, pe_BSR, q_lat_BSHC, q_pe_BSHR, norm=norm, rope=rope
        )
    C = w_uk_HNC.shape[2]
    check_write_inputs(cache_PNK, slots_T, kv_BSC, pe_BSR, (B, S, H, C), q_pe_BSHR, norm, rope)
    R = q_pe_BSHR.shape[-1]
    K = cache_PNK.shape[-1]
    q = torch.empty((B, S, H, K), dtype=cache_PNK.dtype, device=dev)
    if B * S == 0:
        return q
    w, eps = norm if norm is not None else (kv_BSC, 0.0)  # the weight is unread without NORM
    cos, sin = rope if rope is not None else (q_pe_BSHR, q_pe_BSHR)  # unread without ROPE
    pdl = pdl_launch(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
    bc = absorb_block_c(H, C, sms)
    np_ = triton.next_power_of_2(N)
    per_token = absorb_token_programs(H * triton.cdiv(C, bc), B * S, sms)
    _mla_write_absorb_kernel[(H, triton.cdiv(C, bc), B * S if per_token else 1)](
        cache_PNK,
        slots_T,
        kv_BSC,
        pe_BSR,
        q_nope_BSHN,
        w_uk_HNC,
        q_pe_BSHR,
        q,
        w,
        cos,
        sin,
        float(eps),
        B * S,
        S,
        H,
        N,
        C,
        R // 2,
        kv_BSC.stride(0),
        kv_BSC.stride(1),
        pe_BSR.stride(0),
        pe_BSR.stride(1),
        q_nope_BSHN.stride(0),
        q_nope_BSHN.stride(1),
        q_nope_BSHN.stride(2),
        w_uk_HNC.stride(0),
        w_uk_HNC.stride(1),
        q_pe_BSHR.stride(0),
        q_pe_BSHR.stride(1),
        q_pe_BSHR.stride(2),
        cos.stride(0),
        cos.stride(1),
        sin.stride(0),
        sin.stride(1),
        NORM=norm is not None,
        ROPE=rope is not None,
        ROWS=1 if per_token else ABSORB_MAX_ROWS,
        NP=np_,
        BC=bc,
        CP=triton.next_power_of_2(C),
        R2P=triton.next_power_of_2(max(R // 2, 1)),
        PDL=pdl,
        EARLY=pdl and not fresh_w,
        num_warps=4,
        enable_fp_fusion=False,  # the rotations round each product, as mla_write_pack's
        launch_pdl=pdl,
    )
    return q
