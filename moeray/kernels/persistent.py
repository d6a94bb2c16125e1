"""Building blocks of persistent kernels: one launch whose programs (at most one an SM, all
resident: a cooperative launch) run many small tasks in a fixed order, each waiting for the tasks
it reads from through counters in global memory instead of a kernel boundary.

The protocol: tasks are numbered stage by stage; a task waits (`wait_count`, an acquire load
polled with a bound) until the stage it reads has counted every task in, then reads, computes,
stores, and counts itself in (`count_in`: a barrier, then one release atomic). A task waits only
on earlier-numbered tasks, which every program reaches before its own later ones, so a launch
whose programs are all resident cannot deadlock. Weights never depend on the step: a task reads
its weights before it waits, so the next stage's weight stream overlaps the current stage's drain.
Used by kernels/mla_block/.

Legend: T rows (decode tokens, padded to BT), K reduction width (step BK), N output rows (BN a
tile, BN dividing 128).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def wait_count(cnt_ptr, target, given_up_ptr, MAX_POLLS: tl.constexpr):
    """Spin until the int32 counter at cnt_ptr reaches `target` (an acquire load: what the
    programs that counted in stored before their release is visible after it), at most MAX_POLLS
    polls; a wait that gives up adds 1 at given_up_ptr and returns (the caller checks it) rather
    than hang. For persistent kernels whose programs are all resident (a cooperative launch)."""
    seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
    polls = 0
    while (seen < target) & (polls < MAX_POLLS):
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
        polls += 1
    if seen < target:
        tl.atomic_add(given_up_ptr, 1)


@triton.jit
def finish(cnt_ptr, n):
    """The launch's end for this program: count it in on counter n; the last program (it has seen
    every program count in, so every wait of the launch is over) zeroes counters 0 .. n for the
    next launch (the caller's counters past n, e.g. the given-up waits, are left)."""
    if tl.atomic_add(cnt_ptr + n, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        for j in range(n + 1):
            tl.atomic_xchg(cnt_ptr + j, 0)


@triton.jit
def count_in(cnt_ptr):
    """Add 1 to the counter at cnt_ptr once every thread of the program has issued its stores
    (the barrier orders them before the one release atomic): `wait_count`'s other half."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release")


@triton.jit
def x_step(x_ptr, stride_x, T, s_ptr, rb, k0, K: tl.constexpr, BT: tl.constexpr,
            BK: tl.constexpr, FP8: tl.constexpr):  # fmt: skip
    """x [BT, BK] at K offset k0 in fp32; with FP8 times the weight's block scales along K (of the
    tile's 128-row block rb): x_k s_kb w_k is the dequantized weight's product."""
    offs_t = tl.arange(0, BT)
    k = k0 + tl.arange(0, BK)
    mask = (offs_t < T)[:, None] & (k < K)[None, :]
    x = tl.load(x_ptr + offs_t[:, None] * stride_x + k[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if FP8:
        x = x * tl.load(s_ptr + rb * ((K + 127) // 128) + k // 128, mask=k < K, other=0.0)[None, :]
    return x


@triton.jit
def rows_gemv(x_ptr, stride_x, T, w_ptr, s_ptr, row0, w_first, K: tl.constexpr,
               N: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
               FP8: tl.constexpr):  # fmt: skip
    """[BT, BN] fp32 = x [T, K] @ w[row0 : row0 + BN]^T (dequantized by its 128x128 block scales
    s with FP8; BN divides 128, so the tile lies in one row block), w_first its first K step
    (read before the wait): gemv's broadcast product over K steps of BK, reduced after the loop."""
    rows = row0 + tl.arange(0, BN)
    rb = row0 // 128
    offs_k = tl.arange(0, BK)
    x = x_step(x_ptr, stride_x, T, s_ptr, rb, 0, K, BT, BK, FP8)
    acc = x[:, None, :] * w_first.to(tl.float32)[None, :, :]
    for k0 in tl.range(BK, K, BK):
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + k0 + offs_k[None, :],
                    mask=(rows < N)[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)  # fmt: skip
        x = x_step(x_ptr, stride_x, T, s_ptr, rb, k0, K, BT, BK, FP8)
        acc += x[:, None, :] * w.to(tl.float32)[None, :, :]
    return tl.sum(acc, axis=2)


@triton.jit
def first_k_step(w_ptr, row0, K: tl.constexpr, N: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr):  # fmt: skip
    """Rows row0 .. row0 + BN of w [N, K] at K offset 0: the first step of `rows_gemv`, read
    before a task waits (weights never depend on the step)."""
    rows = row0 + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    return tl.load(w_ptr + rows[:, None].to(tl.int64) * K + offs_k[None, :],
                   mask=(rows < N)[:, None] & (offs_k < K)[None, :], other=0.0)  # fmt: skip
