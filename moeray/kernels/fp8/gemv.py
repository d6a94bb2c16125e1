"""fp8_gemv: FP8-weight GEMM for decode (few rows): weight-only, or on per-token e4m3 activations.

y [M, N] = x [M, K] @ dequant(W [N, K] e4m3, scale_inv [NB, KB] fp32 per 128x128 block)^T with
fp32 accumulation. x is either float (bf16/fp16/fp32, y in x's dtype: weight-only, no activation
quantization) or e4m3 with `x_scale` [M, KB] fp32, one per row and 128-column group (act_quant's
output; y in bf16 unless `out_dtype` says otherwise). The kernel reads the e4m3 weight bytes and
scales once and x (small) per program: a bandwidth floor of N*K bytes, half the bf16 GEMV's.

Legend: M rows of x (tokens), N output features, K reduction, KB = ceil(K/128), NB = ceil(N/128),
S the split-K count.

Three inner products, chosen by x's dtype and M:
- broadcast (M <= _BCAST_MAX_ROWS): acc [BM, BN, BK] += x[:, None, :] * w[None, :, :] on the CUDA
  cores, reduced over K once after the loop (the block scale applied to x's values, not the
  weights'). Cost per weight byte: one convert and M FMAs; at 4.8 TB/s and M = 4 that is ~19 T
  FMA/s, under the H200's fp32 rate (~33 T FMA/s), so the loop stays bandwidth-bound. tl.dot
  would pad M to 16 for the tensor cores.
- dot (larger M): the tile converted to x's dtype (e4m3 -> bf16/fp16 is exact) and tl.dot with
  operands swapped (w as the MMA's 64-row side, BM = 16..64 tokens as its narrow side); fp32 x
  uses IEEE fp32 dots (no TF32), so fp32 models keep fp32 numbers.
- act_fp8 (e4m3 x, any M): the dot path's tiles and operand swap with both operands e4m3 into the
  tensor cores, no convert: acc^T [BN, BM] += (w [BN, 128] @ xq^T [128, BM]) * w_scale *
  x_scale[rows], each 128-deep K block promoted into fp32 as fp8_gemm does; the dot path's tiles
  at every M (`_dot_tile_shape`). It skips the weight convert for an act_quant launch and 1x128
  activation rounding. On an H200 (benchmarks/results/kernels-nvidia-h200-gemvmma.json, V3 shapes)
  the kernel is 1.45x the weight-only one at M = 8 on the big layers (o_proj 37.0 vs 54.2 us) and
  slower at M = 1 (38.9 vs 36.5 us, where the weight-only broadcast tile reads 3.2 TB/s).

Split-K: when cdiv(N, BN) tiles cannot fill the GPU (N = 576 kv_a, 1536 q_a at batch 1) each of
S programs per tile reduces a K range of whole 128-blocks into an fp32 partial [S, M, N]. The
partials are summed in split order 0..S-1 (deterministic, the same bits either way) by one of:
- serial split-K, with a caller-owned `workspace` of int32 tile counters (`fp8_gemv_workspace`):
  each program stores its partial and increments its tile's counter (acq_rel); the program that
  sees S-1 is the tile's last, sums the S partials into y and sets the counter back to 0. One
  launch; the counters are zero again after every call, so no memset is needed between calls.
- without a workspace, a second small kernel (`gemv.reduce_splits`); each launch costs ~2.7 us
  in a CUDA graph on an H200.
All allocations depend on the shape only and there is no host sync, so both are CUDA-graph safe.

With programmatic dependent launch (sm_90, `common.pdl_launch`) each program loads its first K
block's weights and scale before it waits for the previous kernel (`common.pdl_wait`); x, the
stores and the tile counters come after the wait. The weights and scales must not be written by
the kernel launched just before (model weights are not written during a step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    FP8_BLOCK,
    FP8_DTYPE,
    cdiv,
    check_tensor,
    interpreting,
    is_pow2,
    load_k_step,
    num_sms,
    pdl_launch,
    pdl_wait,
    switched_on,
)
from moeray.kernels.fp8.gemv_wide import (
    INTERPRET_WIDE_ROWS,
    WIDE_ROWS,
    wide_applies,
    wide_config,
    wide_rows,
)
from moeray.kernels.fp8.quant import dequant_rows_ref, weight_dequant_ref
from moeray.kernels.gemv import pow2_at_least, reduce_splits

GEMV_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Up to 4 rows the broadcast inner product keeps up with HBM (module docstring, the FMA count).
_BCAST_MAX_ROWS = 4
# Programs to aim for before splitting K: 4 per SM. Little's law on an H200: 4.8 TB/s x ~0.6 us
# latency is ~2.9 MB in flight, ~22 KB per SM, i.e. 2-3 CTAs each streaming 4-8 KB tiles with a
# few stages; 4 leave room for the CTAs that finish early.
_PROGRAMS_PER_SM = 4
# At M = 1 a program also streams at most this many 128-column K blocks (split-K past that). On
# an H200 (the M = 1 tile x split sweeps, benchmarks/results/kernels-nvidia-h200-fp8-gemv-splits
# {,-v3}.json, 8-row tiles) V3's dense down (K = 18432, 144 blocks; 896 tiles, so 1 split by the
# program count) took 40.6 us at 9 splits and 46.1 at 18; its o_proj 36.7 at 8 splits and 41.0 at
# 16; Moonlight's dense down (88 blocks) 9.9 at 8 splits and 11.6 at 3. 8 blocks instead of 16
# lost on every V3 layer past 16 blocks.
_MAX_K_BLOCKS_M1 = 16
_CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "SPLIT_K", "DOT", "K_BLOCKS", "num_warps", "num_stages"}


def fp8_gemv_ref(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x @ dequant(w)^T in fp32, returned in x's dtype (the oracle of fp8_gemv on float x)."""
    w = weight_dequant_ref(w_fp8, w_scale, out_dtype=torch.float32)
    return (x.float() @ w.t()).to(x.dtype)


def fp8_gemv_act_ref(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """dequant(xq [M, K] e4m3, x_scale [M, KB] per 1x128 group) @ dequant(w)^T in fp32, returned
    in `out_dtype` (the oracle of fp8_gemv on e4m3 x)."""
    w = weight_dequant_ref(w_fp8, w_scale, out_dtype=torch.float32)
    return (dequant_rows_ref(xq, x_scale) @ w.t()).to(out_dtype)


@triton.jit
def _dot_part(x, w, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """w [BN, 128] @ x^T [128, BM] (unscaled) on the tensor cores, fp32: in x's dtype (e4m3 x:
    an fp8 x fp8 MMA, w as it is), or fp32 operands with IEEE (UPCAST: exact, as the e4m3 and
    bf16 products are exact in fp32)."""
    if UPCAST:
        x = x.to(tl.float32)
    if IEEE:
        part = tl.dot(w.to(tl.float32), tl.trans(x), input_precision="ieee")
    else:
        part = tl.dot(w.to(x.dtype), tl.trans(x))
    return part


@triton.jit
def _dot_scale(s, xs_ptrs, kb, stride_xsk, ACT_FP8: tl.constexpr):
    """The promotion scale of one K block's dot part [BN, BM]: the tile's weight scale s, times
    each token's x scale (a column of acc^T) when x is e4m3. Folded into one vector first, so the
    promotion is one FMA per accumulator element (`common.scaled_block_dot` says why)."""
    if ACT_FP8:
        scale = (tl.load(xs_ptrs + kb * stride_xsk) * s)[None, :]
    else:
        scale = s
    return scale


@triton.jit
def _bcast_part(x, w, s):
    """The broadcast products (x * s)[:, None, :] * w[None, :, :] [BM, BN, 128] in fp32: the block
    scale s multiplies x's BM x 128 values, not the tile's BN x 128 (per weight one convert and
    one FMA a row)."""
    return (x.to(tl.float32) * s)[:, None, :] * w.to(tl.float32)[None, :, :]


@triton.jit
def _fp8_gemv_kernel(
    x_ptr,
    xs_ptr,
    w_ptr,
    s_ptr,
    c_ptr,
    y_ptr,
    lock_ptr,
    M,
    N,
    K,
    KB_PER_SPLIT,
    stride_xm,
    stride_xk,
    stride_xsm,
    stride_xsk,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sk,
    stride_cs,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # divides 128: the tile lies in one 128-row scale block
    DOT: tl.constexpr,
    ACT_FP8: tl.constexpr,  # x e4m3 with per-row 1x128 scales xs [M, KB]: fp8 x fp8 dots (DOT)
    IEEE: tl.constexpr,  # fp32 dots in IEEE precision, not TF32 (fp32 x, or UPCAST)
    UPCAST: tl.constexpr,  # the CPU interpreter's bf16 tl.dot is wrong and it has no fp8 one:
    # the same math in fp32
    EVEN_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    # S > 1: serial split-K, c holds the S fp32 partials and the tile's last program sums them
    # into y (contiguous [M, N], as each partial); 0: c is the output (or the partials of the
    # two-launch path), y and lock_ptr are not read.
    REDUCE_SPLITS: tl.constexpr,
    PDL: tl.constexpr,  # launched with PDL (common.pdl_launch): the first K step's weights and
    # scales are loaded before the wait, so their read overlaps the previous kernel's tail
    K_BLOCKS: tl.constexpr,  # > 1: the wide step (BLOCK_M = 1, broadcast; `wide_rows`)
):
    BLOCK_K: tl.constexpr = 128  # one scale block deep: one scale per (tile, K step)
    # M tiles vary fastest, so the programs sharing a weight tile run together and hit it in L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    s_ptrs = s_ptr + (pid_n * BLOCK_N // 128) * stride_sn
    kb_lo = pid_k * KB_PER_SPLIT
    kb_hi = tl.minimum(kb_lo + KB_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    if K_BLOCKS > 1:
        acc = wide_rows(
            x_ptr + pid_m * stride_xm, w_ptr, s_ptrs, (offs_n % N).to(tl.int64), kb_lo, kb_hi, K,
            stride_xk, stride_wn, stride_wk, stride_sk, BLOCK_N, K_BLOCKS, EVEN_K, PDL,
        )[None, :]  # fmt: skip
        c_offs = offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    else:
        acc, c_offs, mask = _step_rows(
            x_ptr, xs_ptr, w_ptr, s_ptrs, offs_m, offs_n, offs_k, kb_lo, kb_hi, M, N, K,
            stride_xm, stride_xk, stride_xsm, stride_xsk, stride_wn, stride_wk, stride_sk,
            stride_cm, stride_cn, BLOCK_M, BLOCK_N, DOT, ACT_FP8, IEEE, UPCAST, EVEN_K,
            NUM_STAGES, PDL,
        )  # fmt: skip
    tl.store(c_ptr + pid_k * stride_cs + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    if REDUCE_SPLITS > 0:
        # Every thread's partial store must happen before the increment: a scalar atomic runs on
        # one thread, and its release orders only what that thread has seen, so the CTA barrier
        # comes first. acq_rel at GPU scope: the release publishes this partial to the other
        # SMs; the acquire (then the barrier that hands the result to the whole CTA) makes the
        # last program see the S-1 partials released before its increment.
        tl.debug_barrier()
        lock = lock_ptr + pid_n * tl.num_programs(0) + pid_m
        arrived = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
        if arrived == REDUCE_SPLITS - 1:
            # The last of the tile's programs. ".cg" loads read L2, not this SM's L1, which is not
            # coherent with the other SMs' stores. Split order 0..S-1 from zero, as
            # reduce_splits sums: bit-identical outputs with or without a workspace.
            # Unrolled, the independent loads are in flight together (one L2 round trip, not S).
            # Broadcast tiles hold <= 1 element a thread: all S at once, sm_90 registers stay
            # 60 / 96 at S = 56. Dot tiles hold 8 (16 x 64 at 4 warps): 4 at a time keeps them
            # at 80-102; all 56 took 150 under Triton 3.6 (3 CTAs an SM, not 5).
            total = tl.zeros_like(acc)
            for i in tl.range(0, REDUCE_SPLITS, loop_unroll_factor=4 if DOT else REDUCE_SPLITS):
                total += tl.load(
                    c_ptr + i * stride_cs + c_offs, mask=mask, other=0.0, cache_modifier=".cg"
                )
            tl.store(y_ptr + c_offs, total.to(y_ptr.dtype.element_ty), mask=mask)
            # No program of this launch touches the counter again: back to 0 for the next call.
            tl.store(lock, 0)


@triton.jit
def _step_rows(
    x_ptr, xs_ptr, w_ptr, s_ptrs, offs_m, offs_n, offs_k, kb_lo, kb_hi, M, N, K, stride_xm,
    stride_xk, stride_xsm, stride_xsk, stride_wn, stride_wk, stride_sk, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, ACT_FP8: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """The tile [BM, BN] over K blocks kb_lo .. kb_hi - 1, one 128-column block a step (dot or
    broadcast inner product): (acc, its offsets in c, its store mask)."""
    BLOCK_K: tl.constexpr = 128
    # Out-of-range rows and columns wrap onto valid ones, so loads need no row mask; the store is
    # masked.
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + (offs_n % N)[:, None] * stride_wn + offs_k[None, :] * stride_wk
    xs_ptrs = xs_ptr + (offs_m % M) * stride_xsm  # read only with ACT_FP8
    if DOT:
        # Swapped operands, acc^T [BN, BM] = w [BN, BK] @ x^T [BK, BM]: the weight rows fill the
        # MMA's M side (64 rows, one Hopper warpgroup MMA; w is dequantized in registers, which an
        # A operand may be, or fed as e4m3 with ACT_FP8) and the few tokens its N side, which may
        # be as narrow as 16.
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    kb_start = kb_lo
    if PDL:
        # The split's first K block (never empty: at most ceil(KB / S) blocks a split and no
        # empty split) peeled off the loop: weight tile and scale (read by no earlier kernel's
        # writes) before the wait; x and its scales (act_quant's outputs, written by the kernel
        # just before), the partial stores and the tile counter after it. The same additions in
        # the same order as the loop's, so the same bits.
        w = load_k_step(w_ptrs, kb_lo * BLOCK_K, stride_wk, offs_k, K, EVEN_K)
        s = tl.load(s_ptrs + kb_lo * stride_sk)
        pdl_wait(PDL)
        x = load_k_step(x_ptrs, kb_lo * BLOCK_K, stride_xk, offs_k, K, EVEN_K)
        if DOT:
            acc_t += _dot_part(x, w, IEEE, UPCAST) * _dot_scale(
                s, xs_ptrs, kb_lo, stride_xsk, ACT_FP8
            )
        else:
            acc3 += _bcast_part(x, w, s)
        kb_start = kb_lo + 1
    for kb in tl.range(kb_start, kb_hi, num_stages=NUM_STAGES):
        x = load_k_step(x_ptrs, kb * BLOCK_K, stride_xk, offs_k, K, EVEN_K)
        w = load_k_step(w_ptrs, kb * BLOCK_K, stride_wk, offs_k, K, EVEN_K)
        s = tl.load(s_ptrs + kb * stride_sk)
        if DOT:
            acc_t += _dot_part(x, w, IEEE, UPCAST) * _dot_scale(s, xs_ptrs, kb, stride_xsk, ACT_FP8)
        else:
            acc3 += _bcast_part(x, w, s)
    if DOT:
        acc = acc_t
        c_offs = offs_n[:, None] * stride_cn + offs_m[None, :] * stride_cm
        mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    else:
        acc = tl.sum(acc3, axis=2)
        c_offs = offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    return acc, c_offs, mask


def _tile_shape(m: int, interpret: bool) -> tuple[int, int, bool, int, int]:
    """(BLOCK_M, BLOCK_N, DOT, num_warps, num_stages) of `_gemv_config` for m rows."""
    if m <= _BCAST_MAX_ROWS:
        block_m = pow2_at_least(m)
        if interpret:  # numpy per program: wider tiles keep CPU tests fast, same code path
            return block_m, 128 // block_m, False, 4, 4
        if block_m == 1:
            # 8 rows x 128 bytes a stage, 4 stages, 1 warp: within 3.4% of the best tile on
            # average over Moonlight's four projections and V3's q_a and kv_a, each at its best
            # split (H200, results/kernels-nvidia-h200-fp8-gemv-splits.json: Moonlight q + kv_a
            # 5.36 us vs 6.04 for the 16 x 2 warps x 6 stages tile it replaced, dense gate/up
            # 19.4 vs 23.6, V3's q_b 15.8 vs 19.4; the bf16 gemv takes 7.9, 27.7 and 23.3).
            # Small tiles, many programs: bytes in flight per SM come from programs, not from
            # warps (that tile had beaten 64 rows x 8 warps on V3's shapes: q_a 8.5 us vs
            # 12.4). At M = 4 the 4 x 16 tile below was within 7% of the best.
            return 1, 8, False, 1, 4
        return block_m, 64 // block_m, False, 4, 4
    return _dot_tile_shape(m)


def _dot_tile_shape(m: int) -> tuple[int, int, bool, int, int]:
    """The dot path's tiles for m rows (float x above _BCAST_MAX_ROWS, e4m3 x at every m).

    BM: 16 up to 16 rows (the narrowest MMA N side; fewer rows wrap), else the next power of two
    up to 64. BN = 64: one warpgroup MMA's M, and N = 576 (kv_a) in 9 whole tiles where 128 would
    read a wrapped half tile (11% more bytes). 4 warps, 4 stages."""
    return min(64, max(16, pow2_at_least(m))), 64, True, 4, 4


def fp8_gemv_workspace(
    n: int, max_rows: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Zeroed int32 tile counters for fp8_gemv's `workspace`: enough for N outputs at 1 to
    `max_rows` rows with the heuristic tiles (the GPU's, at least as many as the interpreter's
    wider ones; e4m3 x's dot tiles are never more than float x's), and the wide step's 4-row
    tiles at 1 row (`gemv_wide.wide_config`): ceil(N/4) counters, 24 KB for N = 24576."""
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows}: must be >= 1")
    tiles = cdiv(n, WIDE_ROWS)
    for m in range(1, max_rows + 1):
        block_m, block_n, *_ = _tile_shape(m, interpret=False)
        tiles = max(tiles, cdiv(m, block_m) * cdiv(n, block_n))
    return torch.zeros(tiles, dtype=torch.int32, device=device)


def _gemv_config(m: int, n: int, k: int, device: torch.device, act_fp8: bool = False) -> dict:
    """Tile shape and split-K count by shape (not autotuned: one launch per shape, graph-safe).

    Split-K: enough programs for `_PROGRAMS_PER_SM` per SM and, at M = 1, at most
    `_MAX_K_BLOCKS_M1` K blocks a program. At M = 1 the wide step where `gemv_wide.wide_applies`
    (K in one step by default). Broadcast tiles: 1 x 8 with 1 warp and 4 stages at M = 1
    (`_tile_shape` says why), else BM x BN = 64 (the BM x BN x 128 fp32 accumulator): 2x32
    and 4x16 with 4 warps (96 registers in offline sm_90 compiles, no spills). Dot tiles: 64
    weight rows (one wgmma M) x BM = 16..64 tokens, 96-142 registers. e4m3 x: the dot tiles at
    every M.
    With MOERAY_FUSED_FP8_GEMV_BATCH=1, dot tiles of more than 16 rows split K less (below).
    `moeray bench kernels --only fp8_gemv_sweep` and scripts/fp8_small_m_sweep.py time the
    alternatives."""
    kb = cdiv(k, FP8_BLOCK)
    if m == 1 and not act_fp8 and wide_applies(kb):
        rows = INTERPRET_WIDE_ROWS if interpreting() else WIDE_ROWS
        return wide_config(n, kb, num_sms(device), rows)
    if act_fp8:
        block_m, block_n, dot, num_warps, num_stages = _dot_tile_shape(m)
    else:
        block_m, block_n, dot, num_warps, num_stages = _tile_shape(m, interpreting())
    tiles = cdiv(m, block_m) * cdiv(n, block_n)
    split = cdiv(_PROGRAMS_PER_SM * num_sms(device), tiles)
    if m == 1 and not dot:
        split = max(split, cdiv(kb, _MAX_K_BLOCKS_M1))
    if dot and block_m > 16 and switched_on("FP8_GEMV_BATCH"):
        # Batch rows (opt-in with FP8Linear's 64-row bound): each program streams at least
        # BLOCK_M / 8 K blocks, so its fp32 partial tile (BLOCK_M x BLOCK_N x 4 B) is at most a
        # quarter of its weight slice. The program-count rule alone splits V3's q_a 22 ways at 64
        # rows: partials of 8.6 MB next to 11 MB of weight, 27.7 us with the serial reduction and
        # 19.4 with two launches on an H200 (results/kernels-nvidia-h200-gemvmma.json).
        split = min(split, max(1, kb // (block_m // 8)))
    split = max(1, min(kb, split))
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SPLIT_K=split,
        DOT=dot,
        K_BLOCKS=1,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _check_config(cfg: dict, act_fp8: bool) -> None:
    if not _CONFIG_KEYS - {"K_BLOCKS"} <= cfg.keys() <= _CONFIG_KEYS:
        raise ValueError(
            f"config keys {sorted(cfg)}: need {sorted(_CONFIG_KEYS - {'K_BLOCKS'})}, and "
            "K_BLOCKS optionally (default 1)"
        )
    if act_fp8 and not cfg["DOT"]:
        raise ValueError("DOT=False with e4m3 x: the e4m3 path runs fp8 dots only, DOT=True")
    bm, bn, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_K"]
    if bn < 1 or bn > 128 or 128 % bn:
        raise ValueError(f"BLOCK_N={bn}: must be a power of two <= 128 (a divisor of 128)")
    if bm < 1 or bm & (bm - 1) or (cfg["DOT"] and bm < 16):
        raise ValueError(f"BLOCK_M={bm}: must be a power of two, >= 16 when DOT=True")
    if cfg["DOT"] and bn < 16:
        raise ValueError(f"BLOCK_N={bn}: must be >= 16 when DOT=True")
    if split < 1:
        raise ValueError(f"SPLIT_K={split}: must be >= 1")
    kbs = cfg.get("K_BLOCKS", 1)
    if not is_pow2(kbs):
        raise ValueError(f"K_BLOCKS={kbs}: must be a power of two (1: one 128-column block a step)")
    if kbs > 1 and (bm != 1 or cfg["DOT"]):
        raise ValueError(
            f"K_BLOCKS={kbs} with BLOCK_M={bm}, DOT={cfg['DOT']}: the wide step (K_BLOCKS > 1) "
            "takes BLOCK_M=1 and DOT=False"
        )


def _check_gemv_inputs(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> None:
    check_tensor(x, "x", dtypes=(*GEMV_X_DTYPES, FP8_DTYPE), ndim=2)
    if x.dtype == FP8_DTYPE and x_scale is None:
        raise ValueError(
            "x is e4m3 but x_scale is None: pass its fp32 scales [M, ceil(K/128)], one per row "
            "and 128-column group (act_quant's second output)"
        )
    if x_scale is not None:
        if x.dtype != FP8_DTYPE:
            raise ValueError(
                f"x_scale given with x of dtype {x.dtype}: x_scale goes with e4m3 x "
                f"({FP8_DTYPE}, act_quant's first output); float x takes no scales"
            )
        check_tensor(x_scale, "x_scale", dtypes=(torch.float32,), ndim=2, device=x.device)
        expected = (x.shape[0], cdiv(x.shape[1], FP8_BLOCK))
        if tuple(x_scale.shape) != expected:
            raise ValueError(
                f"x_scale has shape {tuple(x_scale.shape)}; expected {expected}: one fp32 scale "
                f"per row and 128-column group of x [{x.shape[0]}, {x.shape[1]}]"
            )
    if out_dtype is not None and out_dtype not in GEMV_X_DTYPES:
        raise ValueError(
            f"out_dtype={out_dtype}; accepted: {', '.join(map(str, GEMV_X_DTYPES))} or None"
        )
    check_tensor(w_fp8, "w_fp8", dtypes=(FP8_DTYPE,), ndim=2, device=x.device)
    check_tensor(w_scale, "w_scale", dtypes=(torch.float32,), ndim=2, device=x.device)
    n, k = w_fp8.shape
    if x.shape[1] != k:
        raise ValueError(f"x [M, K] has K={x.shape[1]} but w_fp8 [N, K] has K={k}: they must match")
    expected = (cdiv(n, FP8_BLOCK), cdiv(k, FP8_BLOCK))
    if tuple(w_scale.shape) != expected:
        raise ValueError(
            f"w_scale has shape {tuple(w_scale.shape)}; expected {expected}: one fp32 scale per "
            f"128x128 block of w_fp8 [{n}, {k}]"
        )


def fp8_gemv(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: dict | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(w_fp8 [N, K], w_scale [NB, KB])^T, fp32 accumulation.

    x: bf16, fp16 or fp32 (any strides; weight-only), or e4m3 (any strides) with `x_scale`
    [M, KB] fp32 (any strides: act_quant's row-major or scale_col_major layout), x = xq * x_scale
    per 1x128 group (fp8 x fp8 dots). w_fp8: e4m3; w_scale: fp32, one per 128x128 block (the
    checkpoint's weight_scale_inv). `out_dtype` (bf16, fp16 or fp32): y's dtype; None is x's
    dtype for float x and bf16 for e4m3 x. Any N and K (ragged last blocks are masked). Made for
    few rows (decode); correct at any M. `config` (keys of `_CONFIG_KEYS`; DOT=True for e4m3 x)
    overrides the heuristic tiles. On CPU tensors outside the interpreter it runs fp8_gemv_ref or
    fp8_gemv_act_ref.

    `workspace`: int32 counters on x's device, all zero, at least one per output tile
    (`fp8_gemv_workspace`); with it a split-K call is one launch, and the counters are zero again
    when it ends. One call at a time per workspace: two launches in flight on different streams
    would share counters. Without it a split-K call launches `reduce_splits` after the GEMV. The
    output is the same to the bit either way.
    """
    _check_gemv_inputs(x, w_fp8, w_scale, x_scale, out_dtype)
    if workspace is not None:
        check_tensor(
            workspace, "workspace", dtypes=(torch.int32,), ndim=1, contiguous=True, device=x.device
        )
    act_fp8 = x_scale is not None
    if out_dtype is None:
        out_dtype = torch.bfloat16 if act_fp8 else x.dtype
    if not (x.is_cuda or interpreting()):
        if x_scale is not None:
            return fp8_gemv_act_ref(x, x_scale, w_fp8, w_scale, out_dtype)
        return fp8_gemv_ref(x, w_fp8, w_scale).to(out_dtype)
    m, k = x.shape
    n = w_fp8.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    cfg = config if config is not None else _gemv_config(m, n, k, x.device, act_fp8)
    _check_config(cfg, act_fp8)
    kb = cdiv(k, FP8_BLOCK)
    kb_per_split = cdiv(kb, cfg["SPLIT_K"])
    split = cdiv(kb, kb_per_split)  # no empty splits
    c = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (cdiv(m, cfg["BLOCK_M"]), cdiv(n, cfg["BLOCK_N"]), split)
    locks = workspace if split > 1 else None  # serial split-K: the tile counters
    pdl = pdl_launch(x.device)
    if locks is not None and locks.numel() < grid[0] * grid[1]:
        raise ValueError(
            f"workspace has {locks.numel()} counters; this call has {grid[0] * grid[1]} tiles "
            f"(M={m}, N={n}, BLOCK_M={cfg['BLOCK_M']}, BLOCK_N={cfg['BLOCK_N']}): size it with "
            f"fp8_gemv_workspace(N, max rows)"
        )
    xs = x_scale if x_scale is not None else x  # not read without ACT_FP8
    _fp8_gemv_kernel[grid](
        x,
        xs,
        w_fp8,
        w_scale,
        c,
        y,
        y if locks is None else locks,  # not read without REDUCE_SPLITS
        m,
        n,
        k,
        kb_per_split,
        x.stride(0),
        x.stride(1),
        xs.stride(0),
        xs.stride(1),
        w_fp8.stride(0),
        w_fp8.stride(1),
        w_scale.stride(0),
        w_scale.stride(1),
        c.stride(0) if split > 1 else 0,
        c.stride(-2),
        c.stride(-1),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        DOT=cfg["DOT"],
        ACT_FP8=act_fp8,
        IEEE=x.dtype == torch.float32 or interpreting(),
        UPCAST=interpreting(),
        EVEN_K=k % FP8_BLOCK == 0,
        NUM_STAGES=cfg["num_stages"],
        REDUCE_SPLITS=0 if locks is None else split,
        PDL=pdl,
        K_BLOCKS=cfg.get("K_BLOCKS", 1),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        launch_pdl=pdl,
    )
    if split > 1 and locks is None:
        reduce_splits(c, y)
    return y
