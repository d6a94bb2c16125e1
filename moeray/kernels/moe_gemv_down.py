"""moe_gemv's down launch: y_a = r_a * (W2[e_a] h_a) for each assignment, one program per (row
block, assignment), and with the sum folded in the token's last program per row block writes
sum_k y_{tK+k} (+ add). `moeray.kernels.moe_gemv` (its docstring has the math, the legend and
why) launches it after the gate/up kernel; `run_moe_gemv` is the wrapper.

MOERAY_FUSED_MOE_DOWN_EARLY=1 (opt-in, the EARLY constexpr): the expert id and K step 0's weight
tile and scale are read before the PDL wait. The ids are the gate's output, two launches back
(the gate/up kernel always lies between), so they are complete once this kernel starts
(`common.pdl_launch`'s rule); h, the gate/up kernel's output, is read after the wait. Why: with
the wait first, a program reads the id, then the weights that it selects, two dependent memory
round trips after the gate/up kernel ends (~1 us each on an H200) before any weight byte
arrives; at Moonlight's batch 1 the down launch took 13.3 us a layer exclusive for 4.8 us of FP8
bytes (benchmarks/results/engine-nvidia-h200-moonlight-fp8-ab2.json). In the engine at Moonlight
FP8 batch 1 on an H100 the decode graph ran even with the run's own rebuilt engine with it
(benchmarks/results/engine-nvidia-h100-80gb-hbm3-*-b1ab*.json): opt-in.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moeray.kernels.common import load_k_step, pdl_wait, to_dtype_rn
from moeray.kernels.moe_common import gemv_assignment, gemv_step_product, store_token_sum


@triton.jit
def _moe_gemv_down_kernel(
    h_ptr,
    w_ptr,
    y_ptr,
    ids_ptr,
    s_ptr,
    rw_ptr,
    H,
    INTER,
    num_experts,
    T,
    K,
    stride_ht,
    stride_we,
    stride_wn,
    stride_wk,
    stride_yt,
    stride_se,
    stride_sn,
    stride_sk,
    cnt_ptr,
    out_ptr,
    add_ptr,
    stride_add,
    FP8: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_K: tl.constexpr,  # I % 128 == 0
    NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
    FOLD_SUM: tl.constexpr,  # the last of a token's K programs for a row block writes out (+ add)
    KC: tl.constexpr,  # K, as a constexpr for the fold's loop
    HAS_ADD: tl.constexpr,
    EARLY: tl.constexpr,  # ids and the first weight step before the PDL wait (module docstring)
):
    a, tok, _ = gemv_assignment(T, K, 0)
    pid_n = tl.program_id(0)
    if EARLY:
        # The ids are the gate's, two launches back (the gate/up kernel lies between): complete
        # once this kernel starts (common.pdl_launch's rule). h is the kernel before's: after.
        e = tl.load(ids_ptr + a)
        local = (e >= 0) & (e < num_experts)
        w0, s0 = _down_step(w_ptr, s_ptr, e, local, 0, pid_n, H, INTER, stride_we,
                            stride_wn, stride_wk, stride_se, stride_sn, stride_sk, FP8, BLOCK_N,
                            EVEN_K)  # fmt: skip
        pdl_wait(PDL)
    else:
        pdl_wait(PDL)  # first: the expert id, and h, are outputs of kernels before this one
        e = tl.load(ids_ptr + a)
        local = (e >= 0) & (e < num_experts)
        w0 = 0.0  # (w0, s0: not read)
        s0 = 0.0
    if not FOLD_SUM:
        if not local:
            return
        _down_rows(h_ptr, w_ptr, y_ptr, s_ptr, rw_ptr, e, a, H, INTER, stride_ht, stride_we,
                   stride_wn, stride_wk, stride_yt, stride_se, stride_sn, stride_sk, FP8, BLOCK_N,
                   EVEN_K, NUM_STAGES, w0, s0, EARLY)  # fmt: skip
    else:
        if local:
            _down_rows(h_ptr, w_ptr, y_ptr, s_ptr, rw_ptr, e, a, H, INTER, stride_ht, stride_we,
                       stride_wn, stride_wk, stride_yt, stride_se, stride_sn, stride_sk, FP8,
                       BLOCK_N, EVEN_K, NUM_STAGES, w0, s0, EARLY)  # fmt: skip
        # Split-K's semaphore: every program of the token's row block stores its y_tk rows (or
        # none: a remote expert), then counts itself in (the barrier orders the whole program's
        # stores before the release); the one that counts last sums them, as moe_sum would.
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + tok * tl.num_programs(0) + pid_n, 1, sem="acq_rel")
        if done == KC - 1:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            store_token_sum(y_ptr, ids_ptr, out_ptr, add_ptr, tok.to(tl.int64), offs_n, H,
                            num_experts, stride_yt, stride_add, KC, HAS_ADD, True)  # fmt: skip


@triton.jit
def _down_tile(w_ptr, s_ptr, e, pid_n, H, stride_we, stride_wn, stride_wk, stride_se, stride_sn,
               BLOCK_N: tl.constexpr):  # fmt: skip
    """Pointers to K step 0 of expert e's down tile [BN, 128] and to its block row's scales."""
    e64 = e.to(tl.int64)
    rows = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % H).to(tl.int64)
    w_ptrs = w_ptr + e64 * stride_we + rows[:, None] * stride_wn
    w_ptrs += tl.arange(0, 128)[None, :] * stride_wk
    s_ptr += e64 * stride_se + (pid_n * BLOCK_N // 128) * stride_sn  # read only with FP8
    return w_ptrs, s_ptr


@triton.jit
def _down_step(w_ptr, s_ptr, e, local, kb, pid_n, H, INTER, stride_we, stride_wn, stride_wk,
               stride_se, stride_sn, stride_sk, FP8: tl.constexpr, BLOCK_N: tl.constexpr,
               EVEN_K: tl.constexpr):  # fmt: skip
    """K step kb of expert e's down tile and its scale (1.0 without FP8); expert 0's when e is
    not `local` (a valid address; the caller then never uses them)."""
    w_ptrs, s_ptr = _down_tile(w_ptr, s_ptr, tl.where(local, e, 0), pid_n, H, stride_we,
                               stride_wn, stride_wk, stride_se, stride_sn, BLOCK_N)  # fmt: skip
    w = load_k_step(w_ptrs, kb * 128, stride_wk, tl.arange(0, 128), INTER, EVEN_K)
    s = 1.0
    if FP8:
        s = tl.load(s_ptr + kb * stride_sk)
    return w, s


@triton.jit
def _down_rows(
    h_ptr, w_ptr, y_ptr, s_ptr, rw_ptr, e, a, H, INTER, stride_ht, stride_we, stride_wn, stride_wk,
    stride_yt, stride_se, stride_sn, stride_sk, FP8: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr, w0, s0, PEELED: tl.constexpr,
):  # fmt: skip
    """y_tk[a] rows of this program's block: r_a * (W2[e] h_a), rounded to y's dtype. PEELED: K
    step 0's weight tile and scale are w0 and s0 (read before the PDL wait), the loop starts at 1;
    the same products in the same order, so the same bits."""
    BLOCK_K: tl.constexpr = 128
    a64 = a.to(tl.int64)
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + a64 * stride_ht + offs_k[None, :]
    w_ptrs, s_ptr = _down_tile(w_ptr, s_ptr, e, pid_n, H, stride_we, stride_wn, stride_wk,
                               stride_se, stride_sn, BLOCK_N)  # fmt: skip
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    kb_start = 0
    if PEELED:
        hv = load_k_step(h_ptrs, 0, 1, offs_k, INTER, EVEN_K).to(tl.float32)
        if FP8:
            hv = hv * s0
        acc += hv * w0.to(tl.float32)
        kb_start = 1
    for kb in tl.range(kb_start, tl.cdiv(INTER, BLOCK_K), num_stages=NUM_STAGES):
        hv = load_k_step(h_ptrs, kb * BLOCK_K, 1, offs_k, INTER, EVEN_K).to(tl.float32)
        acc += gemv_step_product(
            hv, w_ptrs, s_ptr, kb, stride_wk, stride_sk, offs_k, INTER, EVEN_K, FP8
        )
    y = tl.sum(acc, axis=1) * tl.load(rw_ptr + a64).to(tl.float32)
    tl.store(
        y_ptr + a64 * stride_yt + offs_n, to_dtype_rn(y, y_ptr.dtype.element_ty), mask=offs_n < H
    )
