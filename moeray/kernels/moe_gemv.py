"""moe_gemv: the decode MoE without token alignment, for few assignments (decode at 1-2 tokens).

Legend: T tokens, H hidden, I expert width, E local experts, K top-k, TK = T * K assignments
(token t's k-th choice is assignment a = t * K + k, with expert e_a = expert_ids[t, k] and
routing weight r_a), BN weight rows per program.

    h_a = silu(W1[e_a] x_t) * (W3[e_a] x_t)     [I]  fp32, stored rounded to the act dtype
    y_a = r_a * (W2[e_a] h_a)                   [H]  fp32, stored rounded to the act dtype
    y_t = sum_k y_{tK+k} over local e (+ add_t)  [H]  `moe_common.moe_sum`

Two launches: gate/up (grid cdiv(I, BN) x TK) and down (cdiv(H, BN) x TK; moe_gemv_down.py),
whose last program of a token's K for a row block (an atomic counter per block, zeroed by the
gate/up kernel) sums the token's K rows itself, in k order with moe_sum's roundings: the bits of
the three-launch path (MOERAY_FUSED_MOE_SUM_FOLD=0: the sum as its own `moe_sum` launch). On an
H200 the fold took a
Moonlight batch-1 step from 408 to 382 kernels and its graph 2.26 -> 2.24 ms bf16 (the sum ran
2.2-2.5 us a layer alone, most of it hidden by PDL; benchmarks/notes-engine.md). A program
reads one row of x (or h) and BN rows of each weight over the whole reduction in 128-wide steps,
accumulates acc [BN, 128] += x[None, :] * w on the CUDA cores and reduces the 128 columns after
the loop: fp8_gemv's broadcast path with one row. Per weight element one convert and one FMA
(FP8's block scale multiplies the step's 128 x values instead): at 4.8 TB/s of e4m3 ~5 T FMA/s, a
sixth of the H200's fp32 rate, so the loop stays bandwidth-bound. An id outside [0, E) (an
expert on another rank) returns before any read: its h and y_tk rows are never written, and
moe_sum skips them.

Why: the aligned path (moe.py) pays moe_align's launch and, with FP8, two act_quant launches, and
its tl.dot pads each expert's rows to 16 (15 of 16 padding at one token). On an H200 at
Moonlight's experts and one token that MoE took 34.2 us with FP8 weights (1.52 TB/s of weight
bytes: latency-bound) and 37.7 us in bf16 (2.76 TB/s; results/moe-decode-sweep-nvidia-h200.json),
where fp8_gemv's one-row broadcast tile reads 3.2 TB/s.

FP8 weights (e4m3, 128x128 block scale_inv) are weight-only, like FP8Linear's decode fp8_gemv:
each tile is converted to fp32 and its block scale applied (to the step's x or h values); x and
h are not quantized. The
aligned path's FP8 numbers differ by the 1x128 e4m3 rounding of x and h it applies (4.1-4.6% of
the output's norm on random data). h and y_tk are stored in `moe_act_dtype(x)`, rounded to
nearest also under the interpreter (`to_dtype_rn`); `moe_gemv_ref` gives the same numbers up to
the order of fp32 sums.

Programs take assignments slot-major (grid row p: k = p // T, t = p % T): the shared experts,
which the fused gate appends at the same slots of every token, are then read by neighbouring
programs, so at two tokens the second read of their rows comes while they are likely in L2.

PDL (`common.pdl_launch`): a routed assignment's reads depend on its expert id, written by the
kernel before (the gate), so its programs wait first (`common.pdl_wait`). With `early_shared=S`
(model/shared_fuse.py passes it unless MOERAY_FUSED_SHARED_EARLY=0) the caller promises that each
token's last S slots hold experts E-S .. E-1 in order (the fused gate's shared experts) and that x
was not written by the kernel launched just before this one (the gate, which writes ids and
weights): those slots' programs come first in the grid and run their whole gate/up before the wait
(the x rows two launches back are complete by then: `common.pdl_launch`'s rule), storing after it.
Why: at Moonlight's batch 1 the shared gate/up is 23 MB in bf16 (4.8 us of HBM), streamed while
the one-program gate runs (~3 us) instead of after it; on an H200 the batch-1 graph took 3.1-3.3%
less time with it (Moonlight bf16 and FP8, V3 widths FP8; engine-nvidia-h200-*-ab2.json).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    cdiv,
    interpreting,
    is_pow2,
    load_k_step,
    neg_exp,
    pdl_launch,
    pdl_wait,
    precise_exp,
    switched_off,
    switched_on,
    to_dtype_rn,
    use_triton,
)
from moeray.kernels.moe_common import (
    MoEScales,
    check_moe_inputs,
    fused_moe_gate_up_ref,
    gemv_assignment,
    gemv_step_product,
    moe_act_dtype,
    moe_sum,
)
from moeray.kernels.moe_gemv_down import _moe_gemv_down_kernel

# Assignments (T * K) up to which fused_moe_gate_up runs moe_gemv: decode at 1-2 tokens (Moonlight
# with its 2 shared experts fused: 8 a token; DeepSeek-V3: 9, so one token). There the assignments'
# experts are mostly distinct (two tokens picking 6 of 64 share 6 * 6 / 64 = 0.56 routed experts on
# average, 5% of 12), so reading the weights once per assignment costs few bytes over the aligned
# path's once per expert, while the fixed costs it drops stay: moe_align's launch (2.8 us at one
# Moonlight token, results/kernels-nvidia-h200-decode-next.json) and FP8's two act_quant launches.
# At 8 tokens the 48 picks hit ~35 distinct experts (1.4x the bytes) and 16-row MMAs pay off.
# `scripts/moe_decode_sweep.py --path both` times the two paths for moving this bound.
MOE_GEMV_MAX_ASSIGNMENTS = 16
# Past that bound, two tokens (MTP's verification at batch 1: with the shared expert fused into
# the gate, V3's and the `small` preset's 9 picks a token make 18) still take moe_gemv where an
# expert is small, H x I up to MOE_GEMV_PAIR_MAX_HI: there the aligned path's fixed costs (its
# alignment launch, 16-row MMAs for 2 rows) outweigh re-reading a few small experts. On an H100
# at 2 tokens and 9 picks, default tiles, weights out of L2
# (benchmarks/results/moe-gemv-pair-sweep-nvidia-h100-80gb-hbm3.json): the small preset's
# 1024 x 288 experts 18.1 us against the aligned path's 20.0, and in the engine its MTP cycle 0.840
# ms against 0.897 (mtp-cycle-nvidia-h100-80gb-hbm3-b1-{pair,aligned}.json); V3's 7168 x 2048
# experts 505 us against 418 in bf16 and 261 against 233 in FP8, so the aligned path keeps them.
# 2^22 lies between (Moonlight's 2048 x 1408 = 2.9M runs moe_gemv at 2 tokens anyway: 16 picks).
# MOERAY_FUSED_MOE_GEMV_PAIR=0 keeps the 16-assignment bound alone (the A/B switch).
MOE_GEMV_PAIR_MAX_HI = 1 << 22
# Tokens up to which that small-expert rule holds: 2 (MTP's one-draft verification, the pair
# measured above), or MOE_GEMV_FEW_MAX_TOKENS with MOERAY_FUSED_MOE_GEMV_FEW=1 (opt-in, not yet
# timed): 3-4 tokens, the verification of 2-3 drafts a step, where the small preset's 27-36 picks
# re-read its 1024 x 288 experts (0.6 MB each in bf16) rather than pay the aligned path's launches.
# An H100 run of 2 and 3 drafts a step took 1.21 and 1.37 ms against one draft's 0.84
# (benchmarks/results/engine-nvidia-h100-80gb-hbm3-small-mtpdrafts.json): the step past the pair
# grows most. `scripts/device/mtp-drafts.sh` CYCLE_SWITCHES times it.
MOE_GEMV_PAIR_MAX_TOKENS = 2
MOE_GEMV_FEW_MAX_TOKENS = 4
_CONFIG_KEYS = frozenset({"BLOCK_N", "num_warps", "num_stages"})
_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension: the assignments


def moe_gemv_ref(
    x_TH: torch.Tensor,
    w1_EIH: torch.Tensor,
    w3_EIH: torch.Tensor,
    w2_EHI: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    *,
    w1_scale: torch.Tensor | None = None,
    w3_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    add_TH: torch.Tensor | None = None,
) -> torch.Tensor:
    """moe_gemv's numbers in PyTorch: weights dequantized to fp32, x not quantized (weight-only),
    h and y_tk rounded to `moe_act_dtype(x)` as the kernels store them, each token's K outputs
    summed in fp32 in k order, rounded to x's dtype, plus add_TH (as `moe_common.moe_sum`)."""
    scales = None
    if w1_scale is not None and w3_scale is not None and w2_scale is not None:
        scales = (w1_scale, w3_scale, w2_scale)
    return fused_moe_gate_up_ref(
        x_TH,
        w1_EIH,
        w3_EIH,
        w2_EHI,
        expert_ids_TK,
        weights_TK,
        scales=scales,
        quantize_activations=False,
        act_dtype=moe_act_dtype(x_TH.dtype),
        add_TH=add_TH,
    )


@triton.jit
def _moe_gemv_gate_up_kernel(
    x_ptr,
    wg_ptr,
    wu_ptr,
    h_ptr,
    ids_ptr,
    sg_ptr,
    su_ptr,
    H,
    INTER,
    num_experts,
    T,
    K,
    stride_xt,
    stride_xk,
    stride_wge,
    stride_wgn,
    stride_wgk,
    stride_wue,
    stride_wun,
    stride_wuk,
    stride_ht,
    stride_sge,
    stride_sgn,
    stride_sgk,
    stride_sue,
    stride_sun,
    stride_suk,
    cnt_ptr,
    num_cnt,
    FP8: tl.constexpr,
    BLOCK_N: tl.constexpr,  # a power of two <= 128: the tile lies in one 128-row scale block
    EVEN_K: tl.constexpr,  # H % 128 == 0: no masks in the loop
    NUM_STAGES: tl.constexpr,
    PRECISE: tl.constexpr,  # libdevice's expf in silu (common.neg_exp)
    PDL: tl.constexpr,
    ZERO_CNT: tl.constexpr,  # FOLD_SUM: program (0, 0) zeroes the down kernel's num_cnt counters
    CNT_BLOCK: tl.constexpr,
    EARLY_SHARED: tl.constexpr,  # S: the last S slots hold experts E-S .. E-1 (module docstring)
):
    a, tok, slot = gemv_assignment(T, K, EARLY_SHARED)
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h_ptrs = h_ptr + a.to(tl.int64) * stride_ht + offs_n
    early = False
    if EARLY_SHARED > 0:
        early = slot >= K - EARLY_SHARED
    if early:  # a shared expert: its id is fixed and x is two launches back, so before the wait
        act = _gate_up_act(x_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, num_experts - K + slot, tok,
                           pid_n, H, INTER, stride_xt, stride_xk, stride_wge, stride_wgn,
                           stride_wgk, stride_wue, stride_wun, stride_wuk, stride_sge, stride_sgn,
                           stride_sgk, stride_sue, stride_sun, stride_suk, FP8, BLOCK_N, EVEN_K,
                           NUM_STAGES, PRECISE)  # fmt: skip
    else:
        act = tl.zeros((BLOCK_N,), dtype=tl.float32)
    pdl_wait(PDL)  # the gate's expert ids pick the routed weights; every store comes after
    if ZERO_CNT:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            for c0 in range(0, num_cnt, CNT_BLOCK):
                offs_c = c0 + tl.arange(0, CNT_BLOCK)
                tl.store(cnt_ptr + offs_c, tl.zeros((CNT_BLOCK,), tl.int32), mask=offs_c < num_cnt)
    if early:
        tl.store(h_ptrs, to_dtype_rn(act, h_ptr.dtype.element_ty), mask=offs_n < INTER)
    else:
        e = tl.load(ids_ptr + a)
        if (e >= 0) & (e < num_experts):  # an id outside [0, E): another rank's, never written
            act = _gate_up_act(x_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, e, tok, pid_n, H, INTER,
                               stride_xt, stride_xk, stride_wge, stride_wgn, stride_wgk,
                               stride_wue, stride_wun, stride_wuk, stride_sge, stride_sgn,
                               stride_sgk, stride_sue, stride_sun, stride_suk, FP8, BLOCK_N,
                               EVEN_K, NUM_STAGES, PRECISE)  # fmt: skip
            tl.store(h_ptrs, to_dtype_rn(act, h_ptr.dtype.element_ty), mask=offs_n < INTER)


@triton.jit
def _gate_up_act(
    x_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, e, tok, pid_n, H, INTER, stride_xt, stride_xk,
    stride_wge, stride_wgn, stride_wgk, stride_wue, stride_wun, stride_wuk, stride_sge, stride_sgn,
    stride_sgk, stride_sue, stride_sun, stride_suk, FP8: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr, PRECISE: tl.constexpr,
):  # fmt: skip
    """silu(W1[e] x_tok) * (W3[e] x_tok) [BLOCK_N] in fp32 for this program's rows."""
    BLOCK_K: tl.constexpr = 128  # one scale block deep: one scale per (tile, K step)
    e64 = e.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past I wrap onto valid ones, so loads need no row mask; the store is masked.
    rows = (offs_n % INTER).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok.to(tl.int64) * stride_xt + offs_k[None, :] * stride_xk
    # int64: V3's 257 experts of [2048, 7168] are 3.8e9 elements a tensor
    wg_ptrs = wg_ptr + e64 * stride_wge + rows[:, None] * stride_wgn + offs_k[None, :] * stride_wgk
    wu_ptrs = wu_ptr + e64 * stride_wue + rows[:, None] * stride_wun + offs_k[None, :] * stride_wuk
    sg_ptr += e64 * stride_sge + (pid_n * BLOCK_N // 128) * stride_sgn  # read only with FP8
    su_ptr += e64 * stride_sue + (pid_n * BLOCK_N // 128) * stride_sun
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for kb in tl.range(0, tl.cdiv(H, BLOCK_K), num_stages=NUM_STAGES):
        x = load_k_step(x_ptrs, kb * BLOCK_K, stride_xk, offs_k, H, EVEN_K).to(tl.float32)
        acc_g += gemv_step_product(
            x, wg_ptrs, sg_ptr, kb, stride_wgk, stride_sgk, offs_k, H, EVEN_K, FP8
        )
        acc_u += gemv_step_product(
            x, wu_ptrs, su_ptr, kb, stride_wuk, stride_suk, offs_k, H, EVEN_K, FP8
        )
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    return tl.math.div_rn(g, 1.0 + neg_exp(g, PRECISE)) * u  # silu(gate) * up, in fp32


def moe_gemv_applies(tokens: int, k: int, hidden: int, inter: int) -> bool:
    """Whether `fused_moe_gate_up` (no explicit tiles) runs moe_gemv for `tokens` tokens of `k`
    picks over experts [inter, hidden]: up to MOE_GEMV_MAX_ASSIGNMENTS assignments, or two tokens
    (four with MOERAY_FUSED_MOE_GEMV_FEW=1) of small experts (MOE_GEMV_PAIR_MAX_HI); never with
    MOERAY_FUSED_MOE_GEMV=0."""
    if switched_off("MOE_GEMV") or tokens * k <= 0:
        return False
    if tokens * k <= MOE_GEMV_MAX_ASSIGNMENTS:
        return True
    few = MOE_GEMV_FEW_MAX_TOKENS if switched_on("MOE_GEMV_FEW") else MOE_GEMV_PAIR_MAX_TOKENS
    pair = tokens <= few and hidden * inter <= MOE_GEMV_PAIR_MAX_HI
    return pair and not switched_off("MOE_GEMV_PAIR")


def moe_gemv_config() -> dict:
    """The tiles of both kernels. On the GPU 16 weight rows x 128 columns, 2 warps, 4 stages: the
    H200 sweep's best or within 1 us of it at every decode shape it timed (whole MoE, weights out
    of L2, results/moe-gemv-sweep-nvidia-h200.json): Moonlight's experts 30.2 / 48.1 us in bf16 and
    21.1 / 30.7 in FP8 at 1 / 2 tokens, V3's 166.3 / 94.6 at one token. 6 stages lost 1-4 us, 4
    warps 7-15 us: small tiles, many programs and deep pipelines keep more bytes in flight per SM.
    At Moonlight's experts and one token that is 88 x 8 gate/up programs and 128 x 8 down
    programs, 5-8 per SM of 132. Under the interpreter (numpy per program) 64 rows, so CPU tests
    stay fast."""
    if interpreting():
        return dict(BLOCK_N=64, num_warps=4, num_stages=1)
    return dict(BLOCK_N=16, num_warps=2, num_stages=4)


def check_early_shared(early_shared: int, expert_ids_TK: torch.Tensor, num_experts: int) -> None:
    """ValueError unless 0 <= early_shared <= min(K, E); on CPU tensors (the interpreter, the
    reference) also unless each token's last S ids are E-S .. E-1 in order, the promise the early
    programs rely on (on the GPU that check would cost a host sync per layer, so the caller's
    word stands: model/shared_fuse.py passes it only for the fused gate's appended ids)."""
    k = expert_ids_TK.shape[1]
    if isinstance(early_shared, bool) or not isinstance(early_shared, int):
        raise ValueError(f"early_shared={early_shared!r}: must be an int")
    if not 0 <= early_shared <= min(k, num_experts):
        raise ValueError(
            f"early_shared={early_shared}: must lie in [0, min(K={k}, E={num_experts})]"
        )
    if early_shared and not expert_ids_TK.is_cuda:
        want = torch.arange(num_experts - early_shared, num_experts)
        tail = expert_ids_TK[:, k - early_shared :].to(torch.int64)
        if not torch.equal(tail, want.expand_as(tail)):
            raise ValueError(
                f"early_shared={early_shared}: each token's last {early_shared} expert ids must be "
                f"{want.tolist()} (the shared experts), got {tail.unique().tolist()}"
            )


def _check_config(cfg: dict, *, down: bool = True) -> None:
    """ValueError naming the bad key or value of a moe_gemv tile config (with `down`: also of its
    optional "down" entry, the down launch's own tiles, a config without one)."""
    if not isinstance(cfg, dict) or cfg.keys() - ({"down"} if down else set()) != _CONFIG_KEYS:
        got = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        extra = ' (and optionally "down")' if down else ' (the "down" tiles)'
        raise ValueError(f"config keys {got}: need exactly {sorted(_CONFIG_KEYS)}{extra}")
    if down and "down" in cfg:
        _check_config(cfg["down"], down=False)
    bn, warps, stages = cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]
    if not isinstance(bn, int) or not is_pow2(bn) or bn > 128:
        raise ValueError(
            f"BLOCK_N={bn!r}: must be a power of two <= 128 (a tile within one 128-row FP8 block)"
        )
    if not isinstance(warps, int) or not is_pow2(warps) or warps > 16:
        raise ValueError(f"num_warps={warps!r}: must be a power of two <= 16")
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"num_stages={stages!r}: must be an int >= 1")


def run_moe_gemv(
    x_TH: torch.Tensor,
    w1_EIH: torch.Tensor,
    w3_EIH: torch.Tensor,
    w2_EHI: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    scales: MoEScales | None,
    add_TH: torch.Tensor | None,
    config: dict | None,
    early_shared: int = 0,
) -> torch.Tensor:
    """`moe_gemv` on inputs that `check_moe_inputs` accepted, `scales` being what it returned
    (fused_moe_gate_up's dispatch checks once and calls this), and an `early_shared` that
    `check_early_shared` accepted."""
    if config is None:  # the default tiles need no check on every decode layer's call
        cfg = moe_gemv_config()
    else:
        _check_config(config)
        cfg = config
    t, h = x_TH.shape
    e_count, i, _ = w1_EIH.shape
    k = expert_ids_TK.shape[1]
    tk = t * k
    if tk > _MAX_GRID_Y:
        raise ValueError(
            f"moe_gemv takes at most {_MAX_GRID_Y} assignments (a grid dimension), got T*K={tk}: "
            "it is made for decode; fused_moe_gate_up runs larger batches aligned"
        )
    if not use_triton(x_TH):
        s1, s3, s2 = scales if scales is not None else (None, None, None)
        return moe_gemv_ref(
            x_TH,
            w1_EIH,
            w3_EIH,
            w2_EHI,
            expert_ids_TK,
            weights_TK,
            w1_scale=s1,
            w3_scale=s3,
            w2_scale=s2,
            add_TH=add_TH,
        )
    # (empty grids launch nothing: at K = 0 moe_sum writes zeros plus add_TH)
    act_dtype = moe_act_dtype(x_TH.dtype)
    hbuf = torch.empty(tk, i, dtype=act_dtype, device=x_TH.device)
    y_tk = torch.empty(tk, h, dtype=act_dtype, device=x_TH.device)
    ids = expert_ids_TK if expert_ids_TK.is_contiguous() else expert_ids_TK.contiguous()
    rw = weights_TK.reshape(-1).contiguous()
    fp8 = scales is not None
    # without FP8 the scale pointers are never read: the weights stand in
    w1s, w3s, w2s = scales if scales is not None else (w1_EIH, w3_EIH, w2_EHI)
    bn, warps, stages = cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]
    dcfg = cfg.get("down", cfg)
    dbn, dwarps, dstages = dcfg["BLOCK_N"], dcfg["num_warps"], dcfg["num_stages"]
    pdl = pdl_launch(x_TH.device)
    # The sum folded into the down kernel (module docstring): one counter per (token, down row
    # block), zeroed by the gate/up kernel, so no memset and no persistent workspace.
    fold = tk > 0 and not switched_off("MOE_SUM_FOLD")
    num_cnt = t * cdiv(h, dbn) if fold else 0
    # (without the fold the counter, output and add pointers are never read: ids stands in)
    cnt = torch.empty(num_cnt, dtype=torch.int32, device=x_TH.device) if fold else ids
    _moe_gemv_gate_up_kernel[(cdiv(i, bn), tk)](
        x_TH,
        w1_EIH,
        w3_EIH,
        hbuf,
        ids,
        w1s,
        w3s,
        h,
        i,
        e_count,
        t,
        k,
        *x_TH.stride(),
        *w1_EIH.stride(),
        *w3_EIH.stride(),
        hbuf.stride(0),
        *w1s.stride(),
        *w3s.stride(),
        cnt,
        num_cnt,
        FP8=fp8,
        BLOCK_N=bn,
        EVEN_K=h % 128 == 0,
        NUM_STAGES=stages,
        PRECISE=precise_exp(),
        PDL=pdl,
        ZERO_CNT=fold,
        CNT_BLOCK=256,
        EARLY_SHARED=early_shared,
        num_warps=warps,
        num_stages=stages,
        launch_pdl=pdl,
    )
    out = add = y_tk
    if fold:
        out = torch.empty(t, h, dtype=x_TH.dtype, device=x_TH.device)
        if add_TH is not None:
            add = add_TH if add_TH.stride(-1) == 1 else add_TH.contiguous()
    _moe_gemv_down_kernel[(cdiv(h, dbn), tk)](
        hbuf,
        w2_EHI,
        y_tk,
        ids,
        w2s,
        rw,
        h,
        i,
        e_count,
        t,
        k,
        hbuf.stride(0),
        *w2_EHI.stride(),
        y_tk.stride(0),
        *w2s.stride(),
        cnt,
        out,
        add,
        add.stride(0),
        FP8=fp8,
        BLOCK_N=dbn,
        EVEN_K=i % 128 == 0,
        NUM_STAGES=dstages,
        PDL=pdl,
        FOLD_SUM=fold,
        KC=k,
        HAS_ADD=add_TH is not None,
        EARLY=switched_on("MOE_DOWN_EARLY"),
        num_warps=dwarps,
        num_stages=dstages,
        launch_pdl=pdl,
    )
    return out if fold else moe_sum(y_tk, expert_ids_TK, e_count, x_TH.dtype, add_TH)


def moe_gemv(
    x_TH: torch.Tensor,
    w1_EIH: torch.Tensor,
    w3_EIH: torch.Tensor,
    w2_EHI: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    *,
    w1_scale: torch.Tensor | None = None,
    w3_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    add_TH: torch.Tensor | None = None,
    config: dict | None = None,
    early_shared: int = 0,
) -> torch.Tensor:
    """y [T, H] = sum_k weights[t, k] * expert_{ids[t, k]}(x_t) (+ add_TH), per assignment without
    alignment: `fused_moe_gate_up`'s contract (the same checks), made for few assignments.

    x [T, H] bf16/fp16/fp32 (any strides); w1, w3 [E, I, H] and w2 [E, H, I] bf16/fp16/fp32 (any
    strides), or e4m3 with w1_scale, w3_scale [E, I/128, H/128] and w2_scale [E, H/128, I/128]
    fp32 (weight-only: x and h are not quantized); expert_ids [T, K] int32/int64 (ids outside
    [0, E) add nothing); weights [T, K]; add_TH [T, H] in x's dtype, added in the sum's launch.
    `config` (keys BLOCK_N, num_warps, num_stages; optionally "down", a dict of the same three
    for the down launch alone) overrides `moe_gemv_config`. early_shared=S
    (the module docstring's promise: the last S ids of every token are E-S .. E-1, and x was not
    written by the kernel launched just before) runs those slots' gate/up before the PDL wait;
    the numbers are the same bits. No host syncs (CUDA-graph capturable). On CPU tensors outside
    the interpreter it runs moe_gemv_ref."""
    scales = check_moe_inputs(
        x_TH,
        w1_EIH,
        w3_EIH,
        w2_EHI,
        expert_ids_TK,
        weights_TK,
        w1_scale=w1_scale,
        w3_scale=w3_scale,
        w2_scale=w2_scale,
        add_TH=add_TH,
    )
    check_early_shared(early_shared, expert_ids_TK, w1_EIH.shape[0])
    return run_moe_gemv(
        x_TH,
        w1_EIH,
        w3_EIH,
        w2_EHI,
        expert_ids_TK,
        weights_TK,
        scales,
        add_TH,
        config,
        early_shared,
    )
