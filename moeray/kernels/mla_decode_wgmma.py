"""MLA decode's split kernel on Hopper tensor cores (wgmma), for 64-row head blocks.

Legend as in kernels/mla_decode.py: H heads, R = kv_lora_rank (512) latent dims, P rope dims
(64), T page size, BT tokens a loop step (BLOCK_T), NS splits; BH = 64 query rows (heads x query
tokens) a program.

Math, one program (head block, sequence, split) over its share of the sequence's cached tokens:
    S[BH, BT]  = Q_nope[BH, R] C[BT, R]^T + Q_rope[BH, P] K_pe[BT, P]^T      (fp32, scaled, log2)
    m' = max(m, rowmax S);  p = 2^(S - m');  l' = l 2^(m - m') + rowsum p
    O[BH, R]   = O 2^(m - m') + bf16(p) C[BT, R]
and at the end the partial O / l with its log2-sum-exp m + log2 l, the same partials as
`mla_decode._mla_decode_split_kernel`, merged by kernels/mla_merge.py.

Why a second kernel: at DeepSeek-V3's 128 heads decode is compute-bound (each cached token meets
128 query rows: ~2,200 FLOPs a byte of cache) and the Triton kernel's tl.dot runs ~260 TFLOP/s
there (an H200 at batch 64, 4K context; benchmarks/notes-kernels.md): its [64, 512] fp32 output
and the 72 KB cache step leave room for only 2 pipeline stages of loads it issues in order. This
kernel is written in Gluon (Triton's explicit-layout dialect) as FlashMLA lays it out: the 8
warps form two warpgroups that split S's tokens and O's 512 columns between them (each holds
64 x 256 fp32 of O: 128 registers a thread), Q stays in shared memory for the whole loop, the next
step's cache rows stream in with cp.async (zero-filled past the split's end) while this step's
wgmmas run, and p goes through shared memory to both warpgroups. Shared memory: Q 72 KB + 2
stages x 72 KB + p 8 KB = 224 KB of the H100/H200's 227 KB.

Hopper only (wgmma is sm_90a); bf16 / fp16, R = 512 and P = 64 (DeepSeek-V3's widths), page
size a multiple of BT. `mla_decode_wgmma_fits` says where it applies; `mla_decode` runs its
warp-specialized form (kernels/mla_decode_ws.py, 1.34x this one) unless MOERAY_FUSED_MLA_WS=0.
The pieces shared with the warp-specialized form (kernels/mla_decode_ws.py) live here: the copy
of a cache step, the split's token range, Q's load, a softmax step, the store of the partials and
the launch.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy,
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from moeray.kernels.common import cdiv

BLOCK_H = 64  # query rows a program: one wgmma M of 64 per warpgroup
BLOCK_T = 64  # cached tokens a loop step at the default 2 stages
# Cached tokens a step by pipeline depth: Q's 72 KB and p leave ~150 KB for the stages, 2 of 64
# tokens (72 KB each) or 3-4 of 32.
STEP_TOKENS = {2: 64, 3: 32, 4: 32}
NUM_WARPS = 8  # two warpgroups
WGMMA_DTYPES = (torch.bfloat16, torch.float16)
# Gluon's API moves between releases (3.9 renamed the cp.async copy and dropped thread_barrier):
# these kernels are written against the GPU image's 3.6; elsewhere the Triton kernel runs.
# scripts/gluon_compile.py compiles them for sm_90a without a GPU.
GLUON_TRITON = "3.6."


@gluon.jit
def copy_step(kv_ptr, bt_ptr, c_smem, pe_smem, b, t0, t_end, stride_kvp, stride_kvt, stride_btb,
              R: gl.constexpr, P: gl.constexpr, PAGE: gl.constexpr, BT: gl.constexpr,
              C_LOAD: gl.constexpr, PE_LOAD: gl.constexpr):  # fmt: skip
    """cp.async of the BT cache rows from position t0 (its page through the block table) into
    one stage (c_smem [BT, R] latents, pe_smem [BT, P] rope keys); rows at or past t_end (all of
    a step past the split's end) are zero-filled, so the wgmmas never meet the pool's other
    rows (which may hold anything, NaN included)."""
    in_split = t0 < t_end
    page = gl.load(bt_ptr + b * stride_btb + t0 // PAGE, mask=in_split, other=0).to(gl.int64)
    base = kv_ptr + page * stride_kvp + (t0 % PAGE) * stride_kvt
    t_c = gl.arange(0, BT, layout=gl.SliceLayout(1, C_LOAD))
    r_c = gl.arange(0, R, layout=gl.SliceLayout(0, C_LOAD))
    ok_c = (t0 + t_c < t_end)[:, None] & (r_c < R)[None, :]
    async_copy.async_copy_global_to_shared(
        c_smem, base + t_c[:, None] * stride_kvt + r_c[None, :], mask=ok_c
    )
    t_p = gl.arange(0, BT, layout=gl.SliceLayout(1, PE_LOAD))
    r_p = gl.arange(0, P, layout=gl.SliceLayout(0, PE_LOAD))
    ok_p = (t0 + t_p < t_end)[:, None] & (r_p < P)[None, :]
    async_copy.async_copy_global_to_shared(
        pe_smem, base + R + t_p[:, None] * stride_kvt + r_p[None, :], mask=ok_p
    )


@gluon.jit
def _issue_step(kv_ptr, bt_ptr, c_smem, pe_smem, b, t0, t_end, stride_kvp, stride_kvt, stride_btb,
                R: gl.constexpr, P: gl.constexpr, PAGE: gl.constexpr, BT: gl.constexpr,
                C_LOAD: gl.constexpr, PE_LOAD: gl.constexpr):  # fmt: skip
    """`copy_step` as one commit group, issued even when empty, so the consumer always waits
    for all groups but the newest."""
    copy_step(kv_ptr, bt_ptr, c_smem, pe_smem, b, t0, t_end, stride_kvp, stride_kvt, stride_btb,
              R, P, PAGE, BT, C_LOAD, PE_LOAD)  # fmt: skip
    async_copy.commit_group()


@gluon.jit
def split_range(len_ptr, b, split, num_splits, PAGE: gl.constexpr, BT: gl.constexpr):
    """(seq_len, t_start, t_end, n_steps): this split's share of the sequence's own pages (not
    the block table's width) and the BT-token steps that cover it (0 for an empty share)."""
    seq_len = gl.load(len_ptr + b)
    pages_per_split = gl.cdiv(gl.cdiv(seq_len, PAGE), num_splits)
    t_start = split * pages_per_split * PAGE
    t_end = gl.minimum(seq_len, t_start + pages_per_split * PAGE)
    n_steps = gl.cdiv(gl.maximum(t_end - t_start, 0), BT)
    return seq_len, t_start, t_end, n_steps


@gluon.jit
def load_q(q_ptr, b, pid_h, ROWS, stride_qb, stride_qr, BH: gl.constexpr, R: gl.constexpr,
           P: gl.constexpr, SMEM: gl.constexpr, Q_LOAD: gl.constexpr,
           QP_LOAD: gl.constexpr):  # fmt: skip
    """The head block's query rows (row = token * H + head; zeros past ROWS) into shared memory:
    (latent part [BH, R], rope part [BH, P])."""
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    q_rows = pid_h * BH + gl.arange(0, BH, layout=gl.SliceLayout(1, Q_LOAD))
    q_cols = gl.arange(0, R, layout=gl.SliceLayout(0, Q_LOAD))
    q_ok = (q_rows < ROWS)[:, None] & (q_cols < R)[None, :]
    q_base = q_ptr + b * stride_qb + q_rows[:, None] * stride_qr
    q_smem = gl.allocate_shared_memory(
        dtype, [BH, R], SMEM, gl.load(q_base + q_cols[None, :], mask=q_ok, other=0.0)
    )
    qp_rows = pid_h * BH + gl.arange(0, BH, layout=gl.SliceLayout(1, QP_LOAD))
    qp_cols = gl.arange(0, P, layout=gl.SliceLayout(0, QP_LOAD))
    qp_ok = (qp_rows < ROWS)[:, None] & (qp_cols < P)[None, :]
    qp_base = q_ptr + b * stride_qb + qp_rows[:, None] * stride_qr + R
    qpe_smem = gl.allocate_shared_memory(
        dtype, [BH, P], SMEM, gl.load(qp_base + qp_cols[None, :], mask=qp_ok, other=0.0)
    )
    return q_smem, qpe_smem


@gluon.jit
def softmax_step(s, pos, limit, m_i, l_i, sm_scale_log2):
    """One step of the online softmax over raw scores s [BH, BT] at cache positions pos [BT]
    (past each row's `limit` masked): (p, alpha = the old rows' rescale, new m, new l)."""
    s = gl.where(pos[None, :] <= limit[:, None], s * sm_scale_log2, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    # Rows with nothing visible yet keep m = -inf; subtract 0 instead of -inf - -inf.
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s - m_safe[:, None])
    alpha = gl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def store_out(o_ptr, out, b, split, pid_h, ROWS, stride_ob, stride_or, stride_os,
              COL0: gl.constexpr, BH: gl.constexpr, NC: gl.constexpr,
              R: gl.constexpr):  # fmt: skip
    """out [BH, NC] (fp32) into the partials o[b, rows, split, COL0 : COL0 + NC]."""
    rows = pid_h * BH + gl.arange(0, BH, layout=gl.SliceLayout(1, out.type.layout))
    cols = COL0 + gl.arange(0, NC, layout=gl.SliceLayout(0, out.type.layout))
    gl.store(
        o_ptr + b * stride_ob + rows[:, None] * stride_or + split * stride_os + cols[None, :],
        out,
        mask=(rows < ROWS)[:, None] & (cols < R)[None, :],
    )


@gluon.jit
def _mla_decode_wgmma_kernel(
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
    STAGES: gl.constexpr,
):
    pid_h = gl.program_id(0)  # fastest: a (sequence, split)'s head blocks share its pages in L2
    b = gl.program_id(1)
    split = gl.program_id(2)

    # S [BH, BT]: the two warpgroups split the tokens; O [BH, R]: they split the 512 columns.
    S_L: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, BT // 2, 16]
    )
    O_L: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, R // 2, 16]
    )
    SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    # 16-byte loads, a warp over 256 contiguous latent columns (512 B) / 4 rows of the rope part
    C_LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [8, 1], [1, 0])
    PE_LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])
    dtype: gl.constexpr = q_ptr.dtype.element_ty

    seq_len, t_start, t_end, n_steps = split_range(len_ptr, b, split, num_splits, PAGE, BT)
    c_smem = gl.allocate_shared_memory(dtype, [STAGES, BT, R], SMEM)
    pe_smem = gl.allocate_shared_memory(dtype, [STAGES, BT, P], SMEM)
    for j in gl.static_range(STAGES - 1):  # the first STAGES - 1 steps in flight
        _issue_step(kv_ptr, bt_ptr, c_smem.index(j), pe_smem.index(j), b, t_start + j * BT,
                    t_end, stride_kvp, stride_kvt, stride_btb, R, P, PAGE, BT, C_LOAD,
                    PE_LOAD)  # fmt: skip
    q_smem, qpe_smem = load_q(q_ptr, b, pid_h, ROWS, stride_qb, stride_qr, BH, R, P, SMEM,
                              C_LOAD, PE_LOAD)  # fmt: skip
    # p's rows are BT x 2 bytes: 64 B at 32 tokens, the swizzle may not be wider than a row
    P_SMEM: gl.constexpr = gl.NVMMASharedLayout(
        swizzle_byte_width=128 if BT >= 64 else 64, element_bitwidth=16, rank=2
    )
    p_smem = gl.allocate_shared_memory(dtype, [BH, BT], P_SMEM)

    rows = pid_h * BH + gl.arange(0, BH, layout=gl.SliceLayout(1, S_L))
    limit = seq_len - Q_LEN + rows // NUM_HEADS  # the last cache position each row may attend to
    m_i = gl.full([BH], float("-inf"), gl.float32, layout=gl.SliceLayout(1, S_L))
    l_i = gl.zeros([BH], gl.float32, layout=gl.SliceLayout(1, S_L))
    acc = gl.zeros([BH, R], gl.float32, layout=O_L)
    for i in range(n_steps):
        t0 = t_start + i * BT
        stage = i % STAGES
        ahead = (i + STAGES - 1) % STAGES  # the stage step i-1 read
        # Every warp is past step i-1's wgmmas (which read that stage and p) before step
        # i + STAGES - 1's rows overwrite it.
        gl.thread_barrier()
        _issue_step(kv_ptr, bt_ptr, c_smem.index(ahead), pe_smem.index(ahead), b,
                    t0 + (STAGES - 1) * BT, t_end, stride_kvp, stride_kvt, stride_btb, R, P,
                    PAGE, BT, C_LOAD, PE_LOAD)  # fmt: skip
        async_copy.wait_group(STAGES - 1)  # this step's group (all but the newer ones)
        fence_async_shared()  # the cp.async writes, then the wgmmas' async-proxy reads
        gl.thread_barrier()
        c_s = c_smem.index(stage)
        s = gl.zeros([BH, BT], gl.float32, layout=S_L)
        s = warpgroup_mma(q_smem, c_s.permute((1, 0)), s, use_acc=False, is_async=True)
        s = warpgroup_mma(qpe_smem, pe_smem.index(stage).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))

        pos = t0 + gl.arange(0, BT, layout=gl.SliceLayout(0, S_L))
        p, alpha, m_i, l_i = softmax_step(s, pos, limit, m_i, l_i, sm_scale_log2)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_L))[:, None]
        p_smem.store(p.to(dtype))
        fence_async_shared()
        gl.thread_barrier()  # both warpgroups' halves of p are in place
        acc = warpgroup_mma(p_smem, c_s, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    async_copy.wait_group(0)  # the last (empty) groups: nothing in flight at exit

    has = l_i > 0.0
    lse = gl.where(has, m_i + gl.log2(gl.where(has, l_i, 1.0)), float("-inf"))
    gl.store(lse_ptr + b * stride_lb + rows * stride_lr + split, lse, mask=rows < ROWS)
    l_o = gl.convert_layout(gl.where(has, l_i, 1.0), gl.SliceLayout(1, O_L))
    store_out(o_ptr, acc / l_o[:, None], b, split, pid_h, ROWS, stride_ob, stride_or, stride_os,
              0, BH, R, R)  # fmt: skip


def mla_decode_wgmma_fits(
    q_BRD: torch.Tensor, kv_cache: torch.Tensor, kv_lora_rank: int, block_h: int
) -> bool:
    """Whether `mla_decode_wgmma_split` takes these (checked) inputs: Hopper (sm_90) CUDA
    tensors in bf16 / fp16, DeepSeek-V3's widths (R 512 + P 64), a page size that is a multiple
    of BLOCK_T, 64-row head blocks, the cache's rows and pages 16-element aligned (cp.async's
    16-byte copies), and the Triton whose Gluon these kernels are written in (GLUON_TRITON)."""
    return (
        q_BRD.is_cuda
        and q_BRD.dtype in WGMMA_DTYPES
        and block_h == BLOCK_H
        and kv_lora_rank == 512
        and kv_cache.shape[-1] == 576
        and kv_cache.shape[1] % BLOCK_T == 0
        and kv_cache.stride(0) % 16 == 0
        and kv_cache.stride(1) % 16 == 0
        and kv_cache.data_ptr() % 16 == 0
        and triton.__version__.startswith(GLUON_TRITON)
        and torch.cuda.get_device_capability(q_BRD.device)[0] == 9
    )


def launch_split(
    kernel,
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
    num_warps: int,
    **constexprs: int,
) -> None:
    """One launch of a split kernel of this family (this module's, kernels/mla_decode_ws.py's):
    a program per (64-row head block, sequence, split), the arguments they share, `constexprs`
    its own."""
    b, rows, d = q_BRD.shape
    r = o.shape[-1]
    kernel[(cdiv(rows, BLOCK_H), b, num_splits)](
        q_BRD,
        kv_cache,
        block_table,
        seq_lens,
        o,
        lse,
        softmax_scale_log2,
        rows,
        num_heads,
        q_len,
        num_splits,
        q_BRD.stride(0),
        q_BRD.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        block_table.stride(0),
        o.stride(0),
        o.stride(1),
        o.stride(2),
        lse.stride(0),
        lse.stride(1),
        BH=BLOCK_H,
        R=r,
        P=d - r,
        PAGE=kv_cache.shape[1],
        num_warps=num_warps,
        **constexprs,
    )


def mla_decode_wgmma_split(
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
    num_stages: int | None = None,
) -> None:
    """The split stage into o [B, rows, NS, R] fp32 and lse [B, rows, NS] (log2 units), as
    `_mla_decode_split_kernel` writes them, for inputs `mla_decode_wgmma_fits`; `num_stages`
    cache steps in flight (a key of STEP_TOKENS; default 2 of BLOCK_T tokens)."""
    stages = 2 if num_stages is None else num_stages
    if stages not in STEP_TOKENS:
        raise ValueError(
            f"num_stages={num_stages} for the wgmma kernel: one of {list(STEP_TOKENS)}"
        )
    launch_split(
        _mla_decode_wgmma_kernel, q_BRD, kv_cache, block_table, seq_lens, o, lse,
        softmax_scale_log2, num_heads, q_len, num_splits, NUM_WARPS,
        BT=STEP_TOKENS[stages], STAGES=stages,
    )  # fmt: skip
