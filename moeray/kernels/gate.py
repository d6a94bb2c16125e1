"""The MoE gate: DeepSeek-V3's expert choice (docs/deepseek-v3.md, "Gate") as one Triton launch,
with its checked wrapper `moe_gate`, its PyTorch reference `moe_gate_ref` (also the differentiable
training path) and the test `moe_gate_applies` by which `moeray.platform.routing.gate.route`
chooses between the two.

Legend: T tokens, E routed experts, G expert groups (n_group), PG experts per group, K experts per
token; GP, PGP, KP are G, PG, K padded to powers of 2.

Why: at decode batch 1 the gate is ~15 tiny PyTorch kernels per MoE layer (sigmoid, bias add,
per-group top-2, group top-k, scatter, masked_fill, top-k, gather, sum, div, mul, zeros,
scatter_add), each a few microseconds of launch and dependency latency for ~1 KB of data
(benchmarks/notes-engine.md: ~80 kernels per layer, 3 ms per step vs a 0.12 ms roofline).
Here a block of token rows lives in registers as a [BLOCK_T, GP, PGP] tile and the whole gate runs
there: sigmoid, bias, per-group top-2 sums, the `topk_group` best groups, the top-K experts over
the kept groups (-inf outside them, the official mask), the normalized and scaled weights, and
the per-expert counts.

Top-k is K rounds of max, then the lowest index holding that max, then masking it to -inf: ties go
to the lowest expert (or group) index. torch.topk's order among ties is unspecified, so the two
agree whenever scores are distinct (continuous logits; tests use random ones). The K experts come
out in descending biased score, as torch.topk returns them.

Numerics: the sigmoid is 1 / (1 + exp(-x)) with libdevice's expf and an IEEE division on the GPU,
the same operations PyTorch's CUDA sigmoid compiles to, so the scores should match
`moe_gate_ref`'s bit for bit there (Triton's own tl.exp is ex2.approx, a few ulp off); the GPU
test reports whether they do. Under the CPU interpreter the exp is numpy's, which differs from
torch's CPU sigmoid by up to 1 ulp (1.2e-7) on ~17% of values.
NaN logits give expert id E (out of range, skipped by the MoE as "another rank's") and no count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    cdiv,
    check_tensor,
    neg_exp,
    pdl_launch,
    pdl_wait,
    precise_exp,
    route_max_tokens,
    switched_off,
    use_triton,
)

# One row's padded tile GP * PGP is held in registers; V3's 256 experts in 8 groups of 32 is 256
# cells, and a 256-wide group tile (n_group=1) is the widest case tested.
MAX_EXPERTS = 256
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows per program: at most this many cells (~2048 fp32, 16 per thread at 4 warps); `gate_block_t`.
TILE_CELLS = 2048
ONE_PROGRAM_ROWS = 8


def gate_block_t(tokens: int, cells: int) -> int:
    """Rows a program of the gate takes by default (a power of 2), for `tokens` rows of `cells`
    padded experts: up to ONE_PROGRAM_ROWS rows one program (plain count stores, no zero-fill
    launch), then one row a program up to 64 rows, then about 16 programs of at most TILE_CELLS
    cells. Why (kernels bench `--only router` on an H100, one gate a call in a CUDA graph of 20,
    benchmarks/results/kernels-nvidia-h100-80gb-hbm3-gate.txt): a program's rows run one after
    another through K rounds of max, so 64 rows as 2 programs of 32 took 9.8 us at Moonlight's 64
    experts and 14.2 at V3's 256 (8 rows a program), against 6.0 and 11.6 at one row a program; at
    256 rows 16 a program took 6.6 us at Moonlight against 9.8 with 32."""
    if tokens <= ONE_PROGRAM_ROWS:
        return triton.next_power_of_2(max(tokens, 1))
    if tokens <= 64:
        return 1
    return max(1, min(triton.next_power_of_2(cdiv(tokens, 16)), TILE_CELLS // cells))


# `route` sends at most common.ROUTE_BATCH_MAX_TOKENS rows to the kernel, this many with
# MOERAY_FUSED_ROUTE_BATCH=0. The kernel alone wins at every size (H200, in a CUDA graph:
# 3.7-14.6 us against 54-73 us for the reference's ~11 launches up to 256 tokens).
FUSED_MAX_TOKENS = 32


@dataclass(frozen=True)
class Routing:
    """The gate's choice for T tokens, from the kernel or the reference."""

    expert_ids_TK: torch.Tensor  # int64
    weights_TK: torch.Tensor  # fp32, already times routed_scaling_factor
    counts_E: torch.Tensor  # int64 tokens per expert in this batch
    scores_TE: torch.Tensor  # fp32 sigmoid affinities (before bias), for the balance loss
    # From `moe_gate(shared_experts=S)` only: [T, J = K + S] ids and weights, each token's K
    # routed choices then the S shared experts E .. E+S-1 with weight 1.0 (their output is not
    # scaled), for a fused MoE that runs the shared experts as extra experts
    # (model/shared_fuse.py). None otherwise.
    fused_ids_TJ: torch.Tensor | None = None  # int64
    fused_weights_TJ: torch.Tensor | None = None  # fp32


def check_group_sizes(num_experts: int, top_k: int, n_group: int, topk_group: int) -> int:
    """ValueError unless top_k experts can be chosen from topk_group of n_group equal groups;
    returns the experts per group. Shared by `moe_gate_ref` and `moe_gate`."""
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"n_group={n_group} must divide the number of experts {num_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    per_group = num_experts // n_group
    if not 1 <= top_k <= topk_group * per_group:
        raise ValueError(
            f"top_k={top_k} must be in [1, topk_group*experts_per_group={topk_group * per_group}]"
        )
    return per_group


def moe_gate_ref(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool = True,
    group_mask_value: float = float("-inf"),
) -> Routing:
    """The gate in PyTorch ops: the reference for the kernel, and the differentiable path.

    Experts outside the kept groups are masked with `group_mask_value` before the top-K: -inf, the
    official code's mask (`routing.gate.GROUP_MASK_OFFICIAL`), or 0.0, transformers'.
    """
    if logits_TE.dim() != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    per_group = check_group_sizes(E, top_k, n_group, topk_group)
    scores_TE = logits_TE.float().sigmoid()
    biased_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    if n_group > 1:
        top2 = min(2, per_group)
        group_scores_TG = biased_TE.view(T, n_group, per_group).topk(top2, dim=-1).values.sum(-1)
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_scores_TG.topk(topk_group, dim=-1).indices, True)
        keep_TE = keep_TG.unsqueeze(-1).expand(T, n_group, per_group).reshape(T, E)
        biased_TE = biased_TE.masked_fill(~keep_TE, group_mask_value)
    expert_ids_TK = biased_TE.topk(top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, expert_ids_TK)
    if norm_topk_prob and top_k > 1:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    weights_TK = weights_TK * routed_scaling_factor
    # scatter_add, not bincount: bincount syncs with the host on CUDA, which breaks graph capture.
    flat = expert_ids_TK.flatten()
    counts_E = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    return Routing(expert_ids_TK, weights_TK, counts_E, scores_TE)


@triton.jit
def _moe_gate_kernel(
    logits_ptr,
    bias_ptr,
    ids_ptr,
    w_ptr,
    counts_ptr,
    scores_ptr,
    fids_ptr,
    fw_ptr,
    T,
    stride_lt,
    scaling,
    E: tl.constexpr,
    G: tl.constexpr,
    PG: tl.constexpr,
    GP: tl.constexpr,
    PGP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    K: tl.constexpr,
    S: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    ATOMIC_COUNTS: tl.constexpr,
    PRECISE: tl.constexpr,
    PDL: tl.constexpr,
):
    # PDL: the wait comes first; even the bias (a few hundred bytes) waits, since the router
    # updates it between steps.
    pdl_wait(PDL)
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    r64 = rows.to(tl.int64)
    g = tl.arange(0, GP)
    j = tl.arange(0, PGP)
    col_GJ = g[:, None] * PG + j[None, :]  # expert index of each cell; increasing in (g, j)
    valid_GJ = (g[:, None] < G) & (j[None, :] < PG)
    col = col_GJ[None, :, :]
    valid = valid_GJ[None, :, :]
    mask = row_ok[:, None, None] & valid

    x = tl.load(logits_ptr + r64[:, None, None] * stride_lt + col, mask=mask, other=0.0).to(
        tl.float32
    )
    e = neg_exp(x, PRECISE)
    s = tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + e)
    tl.store(scores_ptr + r64[:, None, None] * E + col, s, mask=mask)
    b = s
    if HAS_BIAS:
        b = s + tl.load(bias_ptr + col, mask=valid, other=0.0).to(tl.float32)
    b = tl.where(valid, b, float("-inf"))  # padding cells never win a max

    if G > 1:
        # Group score: sum of the group's top-2 biased scores (top-1 for one-expert groups).
        m1 = tl.max(b, axis=2)  # [BT, GP]; -inf for padding groups
        if PG > 1:
            jj = j[None, None, :]
            i1 = tl.min(tl.where(b == m1[:, :, None], jj, PGP), axis=2)
            m2 = tl.max(tl.where(jj == i1[:, :, None], float("-inf"), b), axis=2)
            gs = m1 + m2
        else:
            gs = m1
        gg = g[None, :]
        keep = tl.zeros([BLOCK_T, GP], dtype=tl.int32)
        for _r in tl.static_range(TOPK_GROUP):
            gm = tl.max(gs, axis=1)
            gi = tl.min(tl.where(gs == gm[:, None], gg, GP), axis=1)
            ghit = gg == gi[:, None]
            keep += ghit.to(tl.int32)
            gs = tl.where(ghit, float("-inf"), gs)
        b = tl.where(keep[:, :, None] > 0, b, float("-inf"))

    kk = tl.arange(0, KP)[None, :]
    ids = tl.zeros([BLOCK_T, KP], dtype=tl.int32)
    wts = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
    hits = tl.zeros([BLOCK_T, GP, PGP], dtype=tl.int32)
    for k in tl.static_range(K):
        m = tl.max(tl.max(b, axis=2), axis=1)  # [BT]
        idx = tl.min(tl.min(tl.where(b == m[:, None, None], col, E), axis=2), axis=1)
        hit = col == idx[:, None, None]
        w = tl.sum(tl.sum(tl.where(hit, s, 0.0), axis=2), axis=1)
        ids = tl.where(kk == k, idx[:, None], ids)
        wts = tl.where(kk == k, w[:, None], wts)
        hits += hit.to(tl.int32)
        b = tl.where(hit, float("-inf"), b)

    if NORM:
        wts = tl.math.div_rn(wts, tl.broadcast_to(tl.sum(wts, axis=1)[:, None], (BLOCK_T, KP)))
    wts = wts * scaling
    kmask = row_ok[:, None] & (kk < K)
    tl.store(ids_ptr + r64[:, None] * K + kk, ids.to(tl.int64), mask=kmask)
    tl.store(w_ptr + r64[:, None] * K + kk, wts, mask=kmask)
    if S > 0:  # the shared experts after the routed ones (Routing.fused_ids_TJ), in this launch
        shared = (kk >= K) & (kk < K + S)
        ids = tl.where(shared, E + kk - K, ids)
        wts = tl.where(shared, 1.0, wts)
        jmask = row_ok[:, None] & (kk < K + S)
        tl.store(fids_ptr + r64[:, None] * (K + S) + kk, ids.to(tl.int64), mask=jmask)
        tl.store(fw_ptr + r64[:, None] * (K + S) + kk, wts, mask=jmask)
    cnt_GJ = tl.sum(tl.where(row_ok[:, None, None], hits, 0), axis=0).to(tl.int64)
    if ATOMIC_COUNTS:
        tl.atomic_add(counts_ptr + col_GJ, cnt_GJ, mask=valid_GJ)
    else:  # the only program: plain stores, so counts need no zero-fill launch before it
        tl.store(counts_ptr + col_GJ, cnt_GJ, mask=valid_GJ)


def moe_gate_applies(logits_TE: torch.Tensor, bias_E: torch.Tensor | None) -> bool:
    """Whether `moe_gate` takes these tensors as they are and gets them: at most
    common.ROUTE_BATCH_MAX_TOKENS rows, or FUSED_MAX_TOKENS with MOERAY_FUSED_ROUTE_BATCH=0
    (`route`'s dispatch test).
    MOERAY_FUSED_GATE=0 in the environment routes with PyTorch instead: an A/B switch for
    `moeray bench engine`, and a way out if a new Triton miscompiles the kernel."""
    if switched_off("GATE"):
        return False
    if logits_TE.dim() != 2 or logits_TE.dtype not in LOGIT_DTYPES or logits_TE.stride(-1) != 1:
        return False
    rows_ok = logits_TE.shape[0] <= route_max_tokens(FUSED_MAX_TOKENS)
    if not 1 <= logits_TE.shape[1] <= MAX_EXPERTS or not rows_ok:
        return False
    if bias_E is not None and not gate_bias_fits(bias_E, logits_TE.shape[1], logits_TE.device):
        return False
    return use_triton(logits_TE)


def gate_bias_fits(bias_E: torch.Tensor, num_experts: int, device: torch.device) -> bool:
    """Whether the gate kernels read this bias as it is: contiguous [E] float on `device`."""
    return (
        bias_E.dim() == 1
        and bias_E.dtype in LOGIT_DTYPES
        and bias_E.is_contiguous()
        and bias_E.device == device
        and bias_E.shape[0] == num_experts
    )


def moe_gate(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool = True,
    block_t: int | None = None,
    num_warps: int | None = None,
    shared_experts: int = 0,
) -> Routing:
    """`moe_gate_ref` with the official -inf group mask, in one Triton launch (see module doc).

    logits [T, E] fp32/bf16/fp16 with unit stride over experts, bias [E] or None, E <= 256.
    Returns int64 ids [T, K], fp32 weights [T, K], int64 counts [E], fp32 scores [T, E]. No host
    sync, so it captures in CUDA graphs. block_t (rows per program, a power of 2) and num_warps
    override the automatic choice (benchmark sweeps). shared_experts=S > 0 also fills
    Routing.fused_ids_TJ / fused_weights_TJ in the same launch (at decode, two cats fewer per
    MoE layer than appending them afterwards). On CPU without the interpreter it is `moe_gate_ref`
    (which leaves them None).
    """
    check_tensor(logits_TE, "logits", dtypes=LOGIT_DTYPES, ndim=2)
    if logits_TE.stride(-1) != 1:
        raise ValueError(
            f"logits must have unit stride over experts, got strides {logits_TE.stride()}"
        )
    T, E = logits_TE.shape
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"logits has {E} experts; the fused MoE gate supports 1..{MAX_EXPERTS}")
    if bias_E is not None:
        check_tensor(
            bias_E, "bias", dtypes=LOGIT_DTYPES, ndim=1, contiguous=True, device=logits_TE.device
        )
        if bias_E.shape[0] != E:
            raise ValueError(f"bias has {bias_E.shape[0]} entries, logits have {E} experts")
    per_group = check_group_sizes(E, top_k, n_group, topk_group)
    if block_t is not None and (block_t < 1 or block_t & (block_t - 1)):
        raise ValueError(f"block_t={block_t} must be a power of 2 >= 1")
    if num_warps is not None and num_warps not in (1, 2, 4, 8):
        raise ValueError(f"num_warps={num_warps} must be 1, 2, 4 or 8")
    if shared_experts < 0:
        raise ValueError(f"shared_experts={shared_experts} must be >= 0")
    if not use_triton(logits_TE):
        return moe_gate_ref(
            logits_TE,
            bias_E,
            top_k=top_k,
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=routed_scaling_factor,
            norm_topk_prob=norm_topk_prob,
        )
    dev = logits_TE.device
    gp, pgp = triton.next_power_of_2(n_group), triton.next_power_of_2(per_group)
    cells = gp * pgp
    if block_t is None:
        block_t = gate_block_t(T, cells)
    if num_warps is None:
        # One warp holds a decode row of V3 (256 cells, 8 per thread): every reduction is warp
        # shuffles, no shared memory round trip; bigger tiles get more warps.
        num_warps = max(1, min(4, block_t * cells // 256))
    grid = cdiv(T, block_t)
    ids_TK = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    weights_TK = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    scores_TE = torch.empty(T, E, dtype=torch.float32, device=dev)
    S, J = shared_experts, top_k + shared_experts
    fused_ids_TJ = torch.empty(T, J, dtype=torch.int64, device=dev) if S else None
    fused_weights_TJ = torch.empty(T, J, dtype=torch.float32, device=dev) if S else None
    out = (fused_ids_TJ, fused_weights_TJ)
    atomic = grid > 1
    counts_E = (torch.zeros if atomic or grid == 0 else torch.empty)(
        E, dtype=torch.int64, device=dev
    )
    if grid == 0:
        return Routing(ids_TK, weights_TK, counts_E, scores_TE, *out)
    pdl = pdl_launch(dev)
    _moe_gate_kernel[(grid,)](
        logits_TE,
        bias_E if bias_E is not None else logits_TE,
        ids_TK,
        weights_TK,
        counts_E,
        scores_TE,
        ids_TK if fused_ids_TJ is None else fused_ids_TJ,
        weights_TK if fused_weights_TJ is None else fused_weights_TJ,
        T,
        logits_TE.stride(0),
        float(routed_scaling_factor),
        E=E,
        G=n_group,
        PG=per_group,
        GP=gp,
        PGP=pgp,
        TOPK_GROUP=topk_group,
        K=top_k,
        S=S,
        KP=triton.next_power_of_2(J),
        BLOCK_T=block_t,
        HAS_BIAS=bias_E is not None,
        NORM=bool(norm_topk_prob) and top_k > 1,
        ATOMIC_COUNTS=atomic,
        PRECISE=precise_exp(),
        PDL=pdl,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    return Routing(ids_TK, weights_TK, counts_E, scores_TE, *out)
