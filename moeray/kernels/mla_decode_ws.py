"""MLA decode's wgmma split kernel with warp specialization: three warp groups, each one job.
The split kernel `mla_decode` runs for 64-row head blocks on Hopper (MOERAY_FUSED_MLA_WS=0: the
plain form; MOERAY_FUSED_MLA_WGMMA=0: the Triton kernel). H100, 128 heads, batch 64, 4K
context, CUDA graph: 472 TFLOP/s (plain form 352, Triton 246;
benchmarks/results/kernels-nvidia-h100-80gb-hbm3-mla-ws.json).

Same math, inputs and partials as kernels/mla_decode_wgmma.py (read its docstring first); what
differs is who does what. There both warpgroups compute half of every step's scores, each
reading all of Q's 72 KB from shared memory for it (the step's largest shared-memory traffic),
and every phase (scores, softmax, p V) waits for the one before in both.

Here, as FlashMLA splits it:
- the default partition, warpgroup A, computes the step's full scores S [64, BT] (reading Q
  once), the online softmax, writes p and the row rescale alpha to shared memory, then p V into
  the left half of O (columns 0..R/2);
- worker B (4 warps) waits for p, rescales the right half of O by alpha and adds p V into it,
  while A goes on to the next step's scores;
- worker L (4 warps) streams the cache steps into two stages with cp.async (zero-filled past the
  split's end), each stage handed over by an mbarrier.

mbarriers (phase parity = completions so far, mod 2): kv_ready[s] (L's 128 threads arrive when
their copies land), kv_free[s] (A and B arrive when their p V read the stage), p_ready (A: p and
alpha written), p_free (B: done with p and alpha), fin (A: the final row sums written).
Shared memory: Q 72 KB + 2 stages x 72 KB + p 8 KB + alpha 256 B + barriers.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy,
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from moeray.kernels.mla_decode_wgmma import (
    BLOCK_T,
    copy_step,
    launch_split,
    load_q,
    softmax_step,
    split_range,
    store_out,
)

# Registers a thread for workers B and L (setmaxnreg); warpgroup A gets what is left of the 64K:
# (65,536 - 128 x (192 + 88)) / 128 = 232. A holds half of O (128 fp32) plus the scores and
# softmax (~64), B half of O, L the copy addresses.
REGS_B = gl.constexpr(192)
REGS_L = gl.constexpr(88)


@gluon.jit
def _loader(kv_ptr, bt_ptr, c_smem, pe_smem, kv_ready, kv_free, b, t_start, t_end, n_steps,
            stride_kvp, stride_kvt, stride_btb, R: gl.constexpr, P: gl.constexpr,
            PAGE: gl.constexpr, BT: gl.constexpr):  # fmt: skip
    """Worker L: step j's rows into stage j % 2 once A and B freed it (step j - 2's p V)."""
    C_LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
    PE_LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    for j in range(n_steps):
        s = j % 2
        mbarrier.wait(kv_free.index(s), ((j // 2) & 1) ^ 1, pred=j >= 2)
        copy_step(kv_ptr, bt_ptr, c_smem.index(s), pe_smem.index(s), b, t_start + j * BT, t_end,
                  stride_kvp, stride_kvt, stride_btb, R, P, PAGE, BT, C_LOAD,
                  PE_LOAD)  # fmt: skip
        async_copy.mbarrier_arrive(kv_ready.index(s), increment_count=False)


@gluon.jit
def _right_half(c_smem, p_smem, a_smem, kv_ready, kv_free, p_ready, p_free, fin, o_ptr, b, split,
                pid_h, n_steps, ROWS, stride_ob, stride_or, stride_os, BH: gl.constexpr,
                R: gl.constexpr):  # fmt: skip
    """Worker B: O's columns R/2..R, rescaled and accumulated as A hands over each step's p."""
    O_L: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, R // 2, 16]
    )
    acc = gl.zeros([BH, R // 2], gl.float32, layout=O_L)
    for i in range(n_steps):
        s = i % 2
        mbarrier.wait(kv_ready.index(s), (i // 2) & 1)
        mbarrier.wait(p_ready, i & 1)
        fence_async_shared()
        acc = acc * a_smem.load(gl.SliceLayout(1, O_L))[:, None]
        v = c_smem.index(s).slice(R // 2, R // 2, dim=1)
        acc = warpgroup_mma(p_smem, v, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        gl.thread_barrier()  # all four warps are past the read of p, alpha and the stage
        mbarrier.arrive(p_free, count=1)
        mbarrier.arrive(kv_free.index(s), count=1)
    mbarrier.wait(fin, 0)
    out = acc / a_smem.load(gl.SliceLayout(1, O_L))[:, None]
    store_out(o_ptr, out, b, split, pid_h, ROWS, stride_ob, stride_or, stride_os, R // 2, BH,
              R // 2, R)  # fmt: skip


@gluon.jit
def _scores_left_half(q_smem, qpe_smem, c_smem, pe_smem, p_smem, a_smem, kv_ready, kv_free,
                      p_ready, p_free, fin, o_ptr, lse_ptr, b, split, pid_h, seq_len, t_start,
                      n_steps, sm_scale_log2, ROWS, NUM_HEADS, Q_LEN, stride_ob, stride_or,
                      stride_os, stride_lb, stride_lr, BH: gl.constexpr, R: gl.constexpr,
                      BT: gl.constexpr):  # fmt: skip
    """Warpgroup A (default partition): scores, online softmax, p and alpha for B, O's columns
    0..R/2; at the end the row sums for B, the lse and its half of the partial output."""
    S_L: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BT, 16]
    )
    O_L: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, R // 2, 16]
    )
    rows = pid_h * BH + gl.arange(0, BH, layout=gl.SliceLayout(1, S_L))
    limit = seq_len - Q_LEN + rows // NUM_HEADS  # the last cache position each row may attend to
    m_i = gl.full([BH], float("-inf"), gl.float32, layout=gl.SliceLayout(1, S_L))
    l_i = gl.zeros([BH], gl.float32, layout=gl.SliceLayout(1, S_L))
    acc = gl.zeros([BH, R // 2], gl.float32, layout=O_L)
    for i in range(n_steps):
        s = i % 2
        t0 = t_start + i * BT
        mbarrier.wait(kv_ready.index(s), (i // 2) & 1)
        fence_async_shared()  # the cp.async writes, then the wgmmas' async-proxy reads
        c_s = c_smem.index(s)
        sc = gl.zeros([BH, BT], gl.float32, layout=S_L)
        sc = warpgroup_mma(q_smem, c_s.permute((1, 0)), sc, use_acc=False, is_async=True)
        sc = warpgroup_mma(qpe_smem, pe_smem.index(s).permute((1, 0)), sc, is_async=True)
        sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc,))

        pos = t0 + gl.arange(0, BT, layout=gl.SliceLayout(0, S_L))
        p, alpha, m_i, l_i = softmax_step(sc, pos, limit, m_i, l_i, sm_scale_log2)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_L))[:, None]
        mbarrier.wait(p_free, (i & 1) ^ 1, pred=i >= 1)  # B is done with step i-1's p, alpha
        p_smem.store(p.to(p_smem.dtype))
        a_smem.store(alpha)
        fence_async_shared()
        gl.thread_barrier()  # all of A's stores before the arrive and A's own wgmma
        mbarrier.arrive(p_ready, count=1)
        acc = warpgroup_mma(p_smem, c_s.slice(0, R // 2, dim=1), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        gl.thread_barrier()
        mbarrier.arrive(kv_free.index(s), count=1)

    has = l_i > 0.0
    l_safe = gl.where(has, l_i, 1.0)
    mbarrier.wait(p_free, (n_steps - 1) & 1, pred=n_steps >= 1)  # B read the last alpha
    a_smem.store(l_safe)
    gl.thread_barrier()
    mbarrier.arrive(fin, count=1)
    lse = gl.where(has, m_i + gl.log2(l_safe), float("-inf"))
    gl.store(lse_ptr + b * stride_lb + rows * stride_lr + split, lse, mask=rows < ROWS)
    out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, O_L))[:, None]
    store_out(o_ptr, out, b, split, pid_h, ROWS, stride_ob, stride_or, stride_os, 0, BH, R // 2,
              R)  # fmt: skip


@gluon.jit
def _mla_decode_ws_kernel(
    q_ptr,
    kv_ptr,
    bt_ptr,
    len_ptr,
    o_ptr,
    lse_ptr,
    sm_scale_log2,
    ROWS,
    NUM_HEADS,
    Q_LEN,
    num_splits,
    stride_qb,
    stride_qr,
    stride_kvp,
    stride_kvt,
    stride_btb,
    stride_ob,
    stride_or,
    stride_os,
    stride_lb,
    stride_lr,
    BH: gl.constexpr,
    R: gl.constexpr,
    P: gl.constexpr,
    PAGE: gl.constexpr,
    BT: gl.constexpr,
):
    pid_h = gl.program_id(0)
    b = gl.program_id(1)
    split = gl.program_id(2)
    SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    ROW_SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    Q_LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
    QP_LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    dtype: gl.constexpr = q_ptr.dtype.element_ty

    seq_len, t_start, t_end, n_steps = split_range(len_ptr, b, split, num_splits, PAGE, BT)
    q_smem, qpe_smem = load_q(q_ptr, b, pid_h, ROWS, stride_qb, stride_qr, BH, R, P, SMEM,
                              Q_LOAD, QP_LOAD)  # fmt: skip
    c_smem = gl.allocate_shared_memory(dtype, [2, BT, R], SMEM)
    pe_smem = gl.allocate_shared_memory(dtype, [2, BT, P], SMEM)
    p_smem = gl.allocate_shared_memory(dtype, [BH, BT], SMEM)
    a_smem = gl.allocate_shared_memory(gl.float32, [BH], ROW_SMEM)
    kv_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    kv_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    p_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    p_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    fin = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for s in gl.static_range(2):
        mbarrier.init(kv_ready.index(s), count=128)  # each of L's threads, its copies landed
        mbarrier.init(kv_free.index(s), count=2)  # A and B
    mbarrier.init(p_ready, count=1)
    mbarrier.init(p_free, count=1)
    mbarrier.init(fin, count=1)
    fence_async_shared()  # Q and the barriers' init before any partition uses them

    # fmt: off
    gl.warp_specialize(
        [
            (
                _scores_left_half,
                (q_smem, qpe_smem, c_smem, pe_smem, p_smem, a_smem, kv_ready, kv_free, p_ready,
                 p_free, fin, o_ptr, lse_ptr, b, split, pid_h, seq_len, t_start, n_steps,
                 sm_scale_log2, ROWS, NUM_HEADS, Q_LEN, stride_ob, stride_or, stride_os,
                 stride_lb, stride_lr, BH, R, BT),
            ),
            (
                _right_half,
                (c_smem, p_smem, a_smem, kv_ready, kv_free, p_ready, p_free, fin, o_ptr, b, split,
                 pid_h, n_steps, ROWS, stride_ob, stride_or, stride_os, BH, R),
            ),
            (
                _loader,
                (kv_ptr, bt_ptr, c_smem, pe_smem, kv_ready, kv_free, b, t_start, t_end, n_steps,
                 stride_kvp, stride_kvt, stride_btb, R, P, PAGE, BT),
            ),
        ],
        [4, 4],
        [REGS_B, REGS_L],
    )
    # fmt: on


def mla_decode_ws_split(
    q_BRD: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale_log2: float,
    num_heads: int,
    q_len: int,
    num_splits: int,
) -> None:
    """`mla_decode_wgmma.mla_decode_wgmma_split` (the same inputs, where
    `mla_decode_wgmma_fits`, and the same partials) with the warp-specialized kernel: 64-token
    steps, 2 stages."""
    # num_warps 4: warpgroup A runs the kernel's own warps; B and L add 4 warps each
    launch_split(
        _mla_decode_ws_kernel, q_BRD, kv_cache, block_table, seq_lens, o, lse,
        softmax_scale_log2, num_heads, q_len, num_splits, 4, BT=BLOCK_T,
    )  # fmt: skip
