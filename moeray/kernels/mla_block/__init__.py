"""mla_decode_block: a decode layer's whole MLA attention, from its input (normed, or normed in
the launch with the previous layer's deferred add) to o_proj's output, in ONE persistent launch,
for 1-4 decode tokens (one per sequence), bf16/fp16 weights or e4m3 projections with 128x128
block scales (weight-only, as fp8_gemv).
`mla_decode_block` is the checked wrapper, `mla_decode_block_ref` the PyTorch reference,
`mla_decode_block_applies` the test a caller chooses by. Opt-in (MOERAY_FUSED_MLA_BLOCK=1) until
a GPU run times it.

The math, stage by stage, is atop kernel.py (the Triton kernel); this module holds the wrapper,
the reference and the test by which a caller chooses it.

Why: at batch 1 these are 7 launches a layer (the merged GEMV, head_gemv or a cuBLAS bmm for W_UK,
mla_write_pack, the split and merge kernels, W_UV, o_proj) that move ~27 MB at Moonlight's shape
(~5.7 us at 4.8 TB/s) and took ~30 us with PDL off on an H200 (results/engine-nvidia-h200-
moonlight-bf16-b1-nopdl.json): each launch pays a ramp and a drain of ~2-3 us, and PDL returned
little of it (benchmarks/notes-engine.md). Here there is no kernel boundary inside the block: the
next stage's weights stream while the current stage drains.

How (the protocol of kernels/persistent.py): at most one program per SM, launched cooperatively
(all resident at once). The tasks of all stages are numbered in stage order (S0's row tiles, then
S1's (head, column block) tiles and one cache-row task per token, ...); program p runs tasks p,
p + P, p + 2P, ... Each task reads its weights first, then waits (`wait_count`, acquire) until
every task of the stage before has counted in (`count_in`, release), then reads its inputs,
computes, stores and counts in.
A task waits only on earlier-numbered tasks, which every program reaches before its own later
ones, so the launch cannot deadlock while all programs are resident. The last program to finish
zeroes the stage counters for the next launch; a wait that times out is counted in the last
counter (`given_up`) instead of hanging. Under Triton's interpreter, which runs programs one after
another, one program runs every task in order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton

from moeray.kernels.common import (
    FP8_DTYPE,
    cdiv,
    check_shape,
    check_tensor,
    interpreting,
    num_sms,
    switched_on,
    use_triton,
)
from moeray.kernels.fp8.quant import weight_dequant_ref
from moeray.kernels.mla_block.kernel import STAGES, _mla_block_kernel
from moeray.kernels.mla_decode import LOG2E, decode_launch, mla_decode_ref
from moeray.kernels.mla_write import mla_write_pack_ref
from moeray.kernels.norm import rms_norm_ref

DTYPES = (torch.bfloat16, torch.float16)
MAX_TOKENS = 4  # decode rows one broadcast tile covers (gemv.BCAST_MAX_ROWS)
# Counters: one per stage, the finished programs, the waits given up (read it after a launch).
COUNTERS = STAGES + 2
GIVEN_UP = STAGES + 1
# Launch cooperatively: the driver then guarantees every program resident at once (or refuses the
# launch). Without it residency rests on one program an SM fitting beside nothing else, which
# holds for a launch without PDL after the kernel before it has ended (the block does not call
# launch_dependents, so the kernel after it waits for its end too). False if a CUDA graph refuses
# a cooperative node (tests/gpu/test_mla_block_gpu.py tries both).
COOPERATIVE = True
# A counter polled this often (~0.5-1 us a poll on an H200's L2: seconds) means a broken launch.
MAX_POLLS = 1 << 22
# Tile sizes: 16 weight rows a GEMV task (S0: 228 tasks at Moonlight's 3,648 qkv rows, S4: 128),
# 64 latent columns a query task (S1: H x 8 of W_UK's [128, 64] tiles, 16 KB each), 16 value rows
# a merge task (S3: H x V / 16, [16, 512] of W_UV, 16 KB).
BN, BC, BV = 16, 64, 16
# fp32 products of one K step of the two big GEMVs (S0, S4): [T, 16, BK] with BK = this / (16 T),
# 64 registers a thread at 8 warps. With one program an SM the weight bytes in flight are what a
# program has in flight: 2 stages of [16, 1024] bf16 at one token, 64 KB an SM, ~8.4 MB over 132
# SMs (Little's law at 4.8 TB/s and ~0.6 us wants ~3 MB).
STEP_ELEMS = 16384
HEAD_BLOCK = 16  # heads per attention task (tl.dot's smallest M)


class MLAWeights(NamedTuple):
    """An MLA layer's weights as the block reads them (the model's `MLA.block_weights` makes them).
    FP8: w_qkv, w_o (and w_qb) e4m3 with their 128x128 block scales (weight_scale_inv); the rest
    in the activation dtype."""

    w_qkv: torch.Tensor  # q_proj's (q_a_proj's with a q LoRA) rows, then kv_a's [.., D]
    kv_norm: tuple[torch.Tensor, float]  # kv_a_layernorm's (weight [C], eps)
    w_kvb_HKC: torch.Tensor  # kv_b_proj's weight as [H, N + V, C]
    w_o: torch.Tensor  # o_proj's weight [D, H * V]
    nope_dim: int  # N
    w_qkv_scale: torch.Tensor | None = None
    w_o_scale: torch.Tensor | None = None
    q_norm: tuple[torch.Tensor, float] | None = None  # q LoRA: q_a_layernorm's (weight [QL], eps)
    w_qb: torch.Tensor | None = None  # q LoRA: q_b_proj's weight [H * (N + R), QL]
    w_qb_scale: torch.Tensor | None = None


def mla_decode_block_ref(
    x_TD: torch.Tensor,
    w: MLAWeights,
    cos_TR2: torch.Tensor,
    sin_TR2: torch.Tensor,
    cache_PNK: torch.Tensor,
    slots_T: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    delta_TD: torch.Tensor | None = None,
    h_TD: torch.Tensor | None = None,
) -> torch.Tensor:
    """The module docstring's math in PyTorch, rounding where the launch-per-step path does; the
    cache gets the new rows. FP8 weights (with their scales) are dequantized in fp32. With `norm`
    x is first normed (after adding `delta_TD`, the sum copied into `h_TD`), with `w_qb` the
    queries come through a q LoRA, as `mla_decode_block` says. Returns out [T, D] in x's dtype."""
    w_qkv, kv_norm, w_kvb_HKC, w_o, nope_dim, w_qkv_scale, w_o_scale, q_norm, w_qb, w_qb_scale = w
    if norm is not None:
        x_TD, h = rms_norm_ref(x_TD if delta_TD is None else delta_TD, norm[0], norm[1],
                               None if delta_TD is None else x_TD)  # fmt: skip
        if h_TD is not None:
            h_TD.copy_(h)
    if w_qkv_scale is not None and w_o_scale is not None:
        w_qkv = weight_dequant_ref(w_qkv, w_qkv_scale, out_dtype=torch.float32)
        w_o = weight_dequant_ref(w_o, w_o_scale, out_dtype=torch.float32)
    if w_qb is not None and w_qb_scale is not None:
        w_qb = weight_dequant_ref(w_qb, w_qb_scale, out_dtype=torch.float32)
    dt = x_TD.dtype
    T = x_TD.shape[0]
    H, C = w_kvb_HKC.shape[0], w_kvb_HKC.shape[2]
    R = cache_PNK.shape[-1] - C
    Q = w_qkv.shape[0] - C - R  # the kv rows' start: q_proj's rows, or q_a_proj's with a LoRA
    qkv = F.linear(x_TD.float(), w_qkv.float()).to(dt)
    q = qkv[:, :Q]
    if w_qb is not None and q_norm is not None:
        q = F.linear(rms_norm_ref(q, q_norm[0], q_norm[1])[0].float(), w_qb.float()).to(dt)
    q_THK = q.view(T, H, -1)
    q_nope, q_pe = q_THK[..., :nope_dim], q_THK[..., nope_dim:]
    w_uk, w_uv = w_kvb_HKC[:, :nope_dim].float(), w_kvb_HKC[:, nope_dim:].float()
    q_lat = torch.einsum("thn,hnc->thc", q_nope.float(), w_uk).to(dt)
    q = mla_write_pack_ref(
        cache_PNK,
        slots_T,
        qkv[:, None, Q : Q + C],
        qkv[:, None, Q + C :],
        q_lat[:, None],
        q_pe[:, None],
        norm=kv_norm,
        rope=(cos_TR2[:, None], sin_TR2[:, None]),
    )
    o_lat = mla_decode_ref(q, cache_PNK, block_table, seq_lens, softmax_scale, C)[0][:, 0].to(dt)
    v = torch.einsum("thc,hvc->thv", o_lat.float(), w_uv).to(dt)
    return F.linear(v.reshape(T, -1).float(), w_o.float()).to(dt)


def _dims(w: MLAWeights, cache_PNK: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(H, N, R, V, C, QL) from the weights and the cache (QL: q_lora_rank, 0 without w_qb);
    ValueError where they do not fit."""
    w_qkv, w_kvb_HKC, nope_dim, w_qb = w.w_qkv, w.w_kvb_HKC, w.nope_dim, w.w_qb
    H, NV, C = w_kvb_HKC.shape
    R = cache_PNK.shape[-1] - C
    N, V = nope_dim, NV - nope_dim
    QL = 0 if w_qb is None else w_qb.shape[1]
    Q = w_qkv.shape[0] - C - R if w_qb is None else w_qb.shape[0]
    if R <= 0 or V <= 0 or Q != H * (N + R) or (QL and w_qkv.shape[0] != QL + C + R):
        raise ValueError(
            f"w_qkv has {w_qkv.shape[0]} rows, kv_b {tuple(w_kvb_HKC.shape)}, the cache "
            f"{cache_PNK.shape[-1]} values a token, nope_dim {nope_dim}, w_qb "
            f"{None if w_qb is None else tuple(w_qb.shape)}: expected H * (N + R) (or, with "
            f"w_qb [H * (N + R), QL], QL) + C + R rows with H, N + V, C from kv_b and R = cache "
            f"width - C"
        )
    return H, N, R, V, C, QL


def _pow2(v: int) -> bool:
    return v >= 16 and v & (v - 1) == 0


def mla_decode_block_applies(x_TD: torch.Tensor, w: MLAWeights, cache_PNK: torch.Tensor) -> bool:
    """Whether `mla_decode_block` takes these (MOERAY_FUSED_MLA_BLOCK=1 only): 1..MAX_TOKENS rows,
    x, kv_b and the cache in one of bf16/fp16, w_qkv and w_o in that dtype too or both e4m3 (their
    scales go to the call), contiguous weights and cache, N, R, V, C powers of two >= 16 (C a
    multiple of 64), on CUDA or under the interpreter."""
    w_qkv, w_kvb_HKC, w_o, w_qb = w.w_qkv, w.w_kvb_HKC, w.w_o, w.w_qb
    if not switched_on("MLA_BLOCK") or not use_triton(x_TD, w_qkv, w_kvb_HKC, w_o, cache_PNK):
        return False
    tensors = (x_TD, w_qkv, w_kvb_HKC, w_o, cache_PNK)
    if x_TD.dtype not in DTYPES or any(t.dtype != x_TD.dtype for t in (w_kvb_HKC, cache_PNK)):
        return False
    projections = {p.dtype for p in (w_qkv, w_o, w_qb) if p is not None}
    if projections not in ({x_TD.dtype}, {FP8_DTYPE}):
        return False
    if x_TD.dim() != 2 or not 1 <= x_TD.shape[0] <= MAX_TOKENS or x_TD.stride(-1) != 1:
        return False
    if not all(t.is_contiguous() for t in tensors[1:]) or w_kvb_HKC.dim() != 3:
        return False
    try:
        H, N, R, V, C, _ = _dims(w, cache_PNK)
    except ValueError:
        return False
    D = x_TD.shape[1]
    return (
        all(_pow2(d) for d in (N, R, V, C))
        and C % BC == 0
        and w_qkv.shape[1] == D
        and tuple(w_o.shape) == (D, H * V)
    )


def mla_decode_block(
    x_TD: torch.Tensor,
    w: MLAWeights,
    cos_TR2: torch.Tensor,
    sin_TR2: torch.Tensor,
    cache_PNK: torch.Tensor,
    slots_T: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    counters: torch.Tensor,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    delta_TD: torch.Tensor | None = None,
    h_TD: torch.Tensor | None = None,
    programs: int | None = None,
) -> torch.Tensor:
    """`mla_decode_block_ref` in one launch: x [T, D] the normed hidden rows of T decode tokens
    (token t is sequence t's one new token: seq_lens[t] counts it, slots_T[t] is its cache slot);
    `w` the layer's weights (MLAWeights: w_qkv [H * (N + R) + C + R, D], q_proj's rows then
    kv_a_proj_with_mqa's; kv_b as [H, N + V, C]; w_o [D, H * V]); cos / sin [T, R / 2] fp32; the
    paged cache [pages, page size, C + R]; `counters` an int32 [COUNTERS] of zeros on x's device
    (left zero but for counters[GIVEN_UP], the waits that timed out: 0 on a correct launch; one
    launch at a time per tensor). w_qkv and w_o may both be e4m3 with their block scales (each
    128-row block of w_qkv's scales must be 128 rows of the stack: every part but the last a
    multiple of 128 rows); x stays bf16 (weight-only, as fp8_gemv). With a q LoRA (DeepSeek-V3,
    Kimi-K2) w_qkv holds q_a_proj's rows [QL] instead of q_proj's, with w.q_norm and w.w_qb
    [H * (N + R), QL] (e4m3 with its scales where w_qkv is). With `norm` = (the input norm's
    weight [D], eps) x is the layer's un-normed input: the launch norms it first (as
    `rms_norm`), after adding `delta_TD` to it where given (the previous layer's deferred add),
    the sum stored in `h_TD` (required with delta). `programs` overrides the program count (one
    per SM; one under the interpreter). Returns out [T, D]. No host sync (CUDA graphs)."""
    w_qkv, kv_norm, w_kvb_HKC, w_o, _, w_qkv_scale, w_o_scale, q_norm, w_qb, w_qb_scale = w
    dev = x_TD.device
    dt = (x_TD.dtype,)
    check_tensor(x_TD, "x", dtypes=DTYPES, ndim=2)
    fp8 = w_qkv.dtype == FP8_DTYPE
    proj = (FP8_DTYPE,) if fp8 else dt
    check_tensor(w_qkv, "w_qkv", dtypes=(*dt, FP8_DTYPE), ndim=2, device=dev, contiguous=True)
    check_tensor(w_kvb_HKC, "w_kvb", dtypes=dt, ndim=3, device=dev, contiguous=True)
    check_tensor(w_o, "w_o", dtypes=proj, ndim=2, device=dev, contiguous=True)
    scaled = [("w_qkv", w_qkv, w_qkv_scale), ("w_o", w_o, w_o_scale)]
    if (w_qb is None) != (q_norm is None):
        raise ValueError("a q LoRA takes both q_norm and w_qb; got one of them")
    if w_qb is not None:
        check_tensor(w_qb, "w_qb", dtypes=proj, ndim=2, device=dev, contiguous=True)
        scaled.append(("w_qb", w_qb, w_qb_scale))
    for name, wt, sc in scaled:
        if not fp8:
            continue
        want = (cdiv(wt.shape[0], 128), cdiv(wt.shape[1], 128))
        if sc is None:
            raise ValueError(f"{name} is e4m3: pass its block scales {name}_scale {want}")
        check_tensor(sc, f"{name}_scale", dtypes=(torch.float32,), ndim=2, device=dev,
                     contiguous=True)  # fmt: skip
        if tuple(sc.shape) != want:
            raise ValueError(f"{name}_scale has shape {tuple(sc.shape)}; expected {want}")
    check_tensor(cache_PNK, "cache", dtypes=dt, ndim=3, device=dev, contiguous=True)
    check_tensor(counters, "counters", dtypes=(torch.int32,), ndim=1, device=dev)
    T, D = x_TD.shape
    H, N, R, V, C, QL = _dims(w, cache_PNK)
    if q_norm is not None:
        check_tensor(q_norm[0], "q_norm weight", dtypes=dt, ndim=1, device=dev, contiguous=True)
        check_shape(q_norm[0], "q_norm weight", (QL,))
    if not 1 <= T <= MAX_TOKENS:
        raise ValueError(f"x has {T} rows; mla_decode_block takes 1..{MAX_TOKENS} decode tokens")
    if not all(_pow2(d) for d in (N, R, V, C)) or C % BC:
        raise ValueError(
            f"N={N}, R={R}, V={V}, C={C}: each must be a power of two >= 16, C a multiple of {BC}"
        )
    if w_qkv.shape[1] != D or tuple(w_o.shape) != (D, H * V):
        raise ValueError(
            f"w_qkv {tuple(w_qkv.shape)}, w_o {tuple(w_o.shape)}: expected [.., {D}] and "
            f"[{D}, {H * V}] for x [T, {D}] and {H} heads of {V} values"
        )
    for name, t in (("cos", cos_TR2), ("sin", sin_TR2)):
        check_tensor(t, name, dtypes=(torch.float32,), ndim=2, device=dev, contiguous=True)
        if tuple(t.shape) != (T, R // 2):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {(T, R // 2)}")
    for name, t, n in (("slots", slots_T, T), ("seq_lens", seq_lens, T)):
        check_tensor(t, name, dtypes=(torch.int32, torch.int64), ndim=1, device=dev)
        if t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} entries; expected one per token ({n})")
    check_tensor(block_table, "block_table", dtypes=(torch.int32, torch.int64), ndim=2, device=dev)
    if block_table.shape[0] != T or block_table.stride(-1) != 1:
        raise ValueError(
            f"block_table {tuple(block_table.shape)} with strides {block_table.stride()}: "
            f"expected [{T}, max pages] with unit stride over pages"
        )
    check_tensor(kv_norm[0], "kv_norm weight", dtypes=dt, ndim=1, device=dev)
    if kv_norm[0].shape[0] != C:
        raise ValueError(f"kv_norm weight has {kv_norm[0].shape[0]} values; expected C = {C}")
    if norm is not None:
        check_tensor(norm[0], "norm weight", dtypes=dt, ndim=1, device=dev, contiguous=True)
        if norm[0].shape[0] != D:
            raise ValueError(f"norm weight has {norm[0].shape[0]} values; expected D = {D}")
        if not x_TD.is_contiguous():
            raise ValueError(f"x with a norm must be contiguous, got strides {x_TD.stride()}")
        if delta_TD is not None:
            if h_TD is None:
                raise ValueError("delta_TD needs h_TD, the buffer its sum x + delta goes to")
            for name, t in (("delta", delta_TD), ("h", h_TD)):
                check_tensor(t, name, dtypes=dt, ndim=2, device=dev, contiguous=True)
                check_shape(t, name, (T, D))
    elif delta_TD is not None:
        raise ValueError("delta_TD is added before the input norm: pass norm too")
    if counters.numel() < COUNTERS:
        raise ValueError(f"counters has {counters.numel()} elements; expected {COUNTERS}, zero")
    if not use_triton(x_TD):
        raise ValueError("mla_decode_block runs on CUDA tensors (or under Triton's interpreter)")
    if x_TD.stride(-1) != 1:
        raise ValueError(f"x needs unit stride over its last dim, got {x_TD.stride()}")
    max_pages = block_table.shape[1]
    sms = num_sms(dev)
    num_splits = decode_launch(T, H, max_pages, sms, block_h=HEAD_BLOCK)[2]
    num_splits = cdiv(max_pages, cdiv(max_pages, num_splits))  # none that no length could use
    nsp = triton.next_power_of_2(num_splits)
    NQKV = w_qkv.shape[0]
    Q = H * (N + R)
    tasks = (
        (T if norm is not None else 0)
        + cdiv(NQKV, BN)
        + (T + cdiv(Q, BN) if QL else 0)
        + H * (C // BC)
        + T
        + T * cdiv(H, HEAD_BLOCK) * num_splits
        + T * H * (V // BV)
        + cdiv(D, BN)
    )
    p = programs or (1 if interpreting() else min(tasks, sms))
    if not 1 <= p <= tasks:
        raise ValueError(f"programs={p}: must be 1..{tasks} (the launch's tasks)")
    f32 = torch.float32
    qkv = torch.empty(T, NQKV, dtype=x_TD.dtype, device=dev)
    q = torch.empty(T, H, C + R, dtype=x_TD.dtype, device=dev)
    po = torch.empty(T * H * nsp, C, dtype=f32, device=dev)
    plse = torch.empty(T * H * nsp, dtype=f32, device=dev)
    v = torch.empty(T, H * V, dtype=x_TD.dtype, device=dev)
    out = torch.empty(T, D, dtype=x_TD.dtype, device=dev)
    xn = x_TD if norm is None else torch.empty(T, D, dtype=x_TD.dtype, device=dev)
    has_delta = delta_TD is not None
    qa = torch.empty(T, QL, dtype=x_TD.dtype, device=dev) if QL else x_TD
    qb = torch.empty(T, Q, dtype=x_TD.dtype, device=dev) if QL else x_TD
    coop = {"launch_cooperative_grid": True} if COOPERATIVE and not interpreting() else {}
    _mla_block_kernel[(p,)](
        x_TD,
        delta_TD if has_delta else x_TD,  # (read only with a delta)
        norm[0] if norm is not None else x_TD,  # (read only with a norm)
        h_TD if has_delta else x_TD,  # (written only with a delta)
        xn,
        w_qkv,
        w_qkv_scale if fp8 else x_TD,  # (read only with FP8)
        qkv,
        q_norm[0] if q_norm is not None else x_TD,  # (the q LoRA's: read only with one)
        qa,
        w_qb if w_qb is not None else x_TD,
        w_qb_scale if fp8 and w_qb is not None else x_TD,
        qb,
        w_kvb_HKC,
        kv_norm[0],
        cos_TR2,
        sin_TR2,
        cache_PNK,
        slots_T,
        q,
        block_table,
        seq_lens,
        po,
        plse,
        v,
        w_o,
        w_o_scale if fp8 else x_TD,
        out,
        counters,
        T,
        float(kv_norm[1]),
        float(norm[1]) if norm is not None else 0.0,
        float(q_norm[1]) if q_norm is not None else 0.0,
        softmax_scale * LOG2E,
        num_splits,
        xn.stride(0),
        block_table.stride(0),
        cache_PNK.stride(0),
        cache_PNK.stride(1),
        D=D,
        H=H,
        N=N,
        R=R,
        V=V,
        C=C,
        BT=triton.next_power_of_2(T),
        BN=BN,
        BK=max(16, min(STEP_ELEMS // (BN * triton.next_power_of_2(T)), triton.next_power_of_2(D))),
        BC=BC,
        BV=BV,
        NSP=nsp,
        R2P=triton.next_power_of_2(R // 2),
        PAGE=cache_PNK.shape[1],
        UPCAST=interpreting(),
        FP8=fp8,
        NORM=norm is not None,
        HAS_DELTA=has_delta,
        DP=triton.next_power_of_2(D),
        QL=QL,
        QLP=triton.next_power_of_2(max(QL, 1)),
        BKQ=max(
            16,
            min(STEP_ELEMS // (BN * triton.next_power_of_2(T)), triton.next_power_of_2(max(QL, 1))),
        ),
        MAX_POLLS=MAX_POLLS,
        num_warps=8,  # 4 spill at Moonlight's shape (the attention task's [16, 512] tiles)
        num_stages=2,
        enable_fp_fusion=False,  # the rotations round each product, as PyTorch's kernels do
        **coop,
    )
    return out
