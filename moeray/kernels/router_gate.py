"""The MoE router's logits and its gate in one launch, for decode's few tokens: `router_gate`,
the test `router_gate_applies` by which the model's Gate (`moeray.platform.model.moe.Gate.
fused_route`) chooses it, and the kernel `_router_gate_kernel`. Opt-in with
MOERAY_FUSED_ROUTE_FOLD=1: in the engine on an H200 Moonlight's batch 1 runs 6.1% (bf16) and 3.9%
(FP8) fewer tokens/s with it (benchmarks/results/engine-nvidia-h200-moonlight-*-ab.json). The
model takes it only where the router's logits are not made with the norm before them
(kernels/norm_router.py, the default at up to 32 rows): with MOERAY_FUSED_NORM_ROUTER=0.

Legend: T tokens (<= FOLD_MAX_TOKENS), D model width, E routed experts, BE experts per program.

Why: at batch 1 a MoE layer runs `router_logits` (64 programs at Moonlight's 64 experts; 2.2 us on
an H200 with PDL off) and then `moe_gate` (one program; 2.9 us), and under PDL removing a kernel
boundary returned ~0.8 us (benchmarks/notes-engine.md). Here the router's programs store the
logits, each counts itself in on a counter (one acq_rel atomic after a barrier that orders the
program's stores before it), and the one that counts last runs the gate (`gate._moe_gate_kernel`,
called as a function) on the stored logits, then sets the counter back to zero for the next call.

Numerics: the logits are `router_logits`' per-token kernel's (the same function, the same order
of additions) and the gate is `moe_gate`'s code on them, read back from memory: ids, counts and
scores equal `router_logits` then `moe_gate` bit for bit. The weights' normalizing sum
over K runs with this launch's 4 warps where `moe_gate` may use 1, so on a GPU its fp32 order,
hence the weights' last bit, may differ (the GPU test reports it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeray.kernels.common import (
    check_tensor,
    pdl_launch,
    precise_exp,
    switched_on,
    use_triton,
)
from moeray.kernels.gate import (
    MAX_EXPERTS,
    Routing,
    _moe_gate_kernel,
    check_group_sizes,
    gate_bias_fits,
)
from moeray.kernels.router_logits import (
    DTYPES,
    _router_logits_kernel,
    router_logits_applies,
    row_tiles,
)

# Tokens up to which the gate runs in the last program (one [BLOCK_T, GP, PGP] tile: V3's 256
# experts x 8 rows is 2,048 cells, gate.TILE_CELLS); decode batches of 1-8.
FOLD_MAX_TOKENS = 8


@triton.jit
def _router_gate_kernel(
    x_ptr,
    w_ptr,
    logits_ptr,
    bias_ptr,
    ids_ptr,
    wts_ptr,
    counts_ptr,
    scores_ptr,
    fids_ptr,
    fw_ptr,
    cnt_ptr,
    T,
    D,
    stride_x,
    stride_w,
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
    PRECISE: tl.constexpr,
    BE: tl.constexpr,
    BD: tl.constexpr,
    PDL: tl.constexpr,  # the logits' first weight step before the wait (router_logits' rule)
):
    _router_logits_kernel(x_ptr, w_ptr, logits_ptr, D, E, stride_x, stride_w, BE, BD, PDL)
    # Every program's logits stored before its release; the last to count in sees them all.
    tl.debug_barrier()
    programs = tl.num_programs(0) * tl.num_programs(1)
    done = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if done == programs - 1:
        _moe_gate_kernel(logits_ptr, bias_ptr, ids_ptr, wts_ptr, counts_ptr, scores_ptr,
                         fids_ptr, fw_ptr, T, E, scaling, E, G, PG, GP, PGP, TOPK_GROUP, K, S,
                         KP, BLOCK_T, HAS_BIAS, NORM, False, PRECISE, False, True)  # fmt: skip
        tl.atomic_xchg(cnt_ptr, 0)  # no program of this launch counts again: zero for the next


def router_gate_applies(
    x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None
) -> bool:
    """Whether `router_gate` takes these as they are (MOERAY_FUSED_ROUTE_FOLD=1 only): what
    `router_logits` takes, 1 to FOLD_MAX_TOKENS rows, at most gate.MAX_EXPERTS experts and a bias
    `moe_gate` takes."""
    if not switched_on("ROUTE_FOLD") or not router_logits_applies(x_TD, weight_ED):
        return False
    E = weight_ED.shape[0]
    return (
        1 <= x_TD.shape[0] <= FOLD_MAX_TOKENS
        and 1 <= E <= MAX_EXPERTS
        and (bias_E is None or gate_bias_fits(bias_E, E, x_TD.device))
    )


def router_gate(
    x_TD: torch.Tensor,
    weight_ED: torch.Tensor,
    bias_E: torch.Tensor | None,
    counter: torch.Tensor,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool = True,
    shared_experts: int = 0,
) -> Routing:
    """`moe_gate(router_logits(x, W), bias, ...)` in one launch: x [T, D] (T <= FOLD_MAX_TOKENS)
    and W [E, D] bf16 or fp16, bias [E] or None; `counter` an int32 [1] on x's device, zero (each
    call leaves it zero; one call at a time per counter). Returns the gate's Routing (with the
    shared experts' fused ids for shared_experts=S > 0). No host sync (CUDA graphs)."""
    check_tensor(x_TD, "x", dtypes=DTYPES, ndim=2)
    check_tensor(weight_ED, "weight", dtypes=(x_TD.dtype,), ndim=2, device=x_TD.device)
    check_tensor(counter, "counter", dtypes=(torch.int32,), ndim=1, device=x_TD.device)
    T, D = x_TD.shape
    E = weight_ED.shape[0]
    if weight_ED.shape[1] != D:
        raise ValueError(f"weight has shape {tuple(weight_ED.shape)}; expected [E, {D}]")
    if not 1 <= T <= FOLD_MAX_TOKENS:
        raise ValueError(f"x has {T} rows; router_gate takes 1..{FOLD_MAX_TOKENS}")
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"weight has {E} experts; router_gate supports 1..{MAX_EXPERTS}")
    if bias_E is not None and not gate_bias_fits(bias_E, E, x_TD.device):
        raise ValueError(
            f"bias: expected a contiguous [{E}] float tensor on {x_TD.device}, got "
            f"{tuple(bias_E.shape)} {bias_E.dtype} on {bias_E.device}"
        )
    if shared_experts < 0:
        raise ValueError(f"shared_experts={shared_experts} must be >= 0")
    if counter.numel() < 1:
        raise ValueError("counter has no element; expected an int32 [1], zero")
    if not use_triton(x_TD):
        raise ValueError("router_gate runs on CUDA tensors (or under Triton's interpreter)")
    per_group = check_group_sizes(E, top_k, n_group, topk_group)
    x = x_TD if x_TD.stride(-1) == 1 else x_TD.contiguous()
    w = weight_ED if weight_ED.stride(-1) == 1 else weight_ED.contiguous()
    dev = x.device
    S, J = shared_experts, top_k + shared_experts
    logits = torch.empty(T, E, dtype=torch.float32, device=dev)
    ids_TK = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    weights_TK = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    counts_E = torch.empty(E, dtype=torch.int64, device=dev)
    scores_TE = torch.empty(T, E, dtype=torch.float32, device=dev)
    fused_ids_TJ = torch.empty(T, J, dtype=torch.int64, device=dev) if S else None
    fused_weights_TJ = torch.empty(T, J, dtype=torch.float32, device=dev) if S else None
    be, bd = row_tiles(E, D)  # router_logits' per-token tiles
    pdl = pdl_launch(dev) and w is weight_ED
    _router_gate_kernel[(triton.cdiv(E, be), T)](
        x,
        w,
        logits,
        bias_E if bias_E is not None else logits,
        ids_TK,
        weights_TK,
        counts_E,
        scores_TE,
        ids_TK if fused_ids_TJ is None else fused_ids_TJ,
        weights_TK if fused_weights_TJ is None else fused_weights_TJ,
        counter,
        T,
        D,
        x.stride(0),
        w.stride(0),
        float(routed_scaling_factor),
        E=E,
        G=n_group,
        PG=per_group,
        GP=triton.next_power_of_2(n_group),
        PGP=triton.next_power_of_2(per_group),
        TOPK_GROUP=topk_group,
        K=top_k,
        S=S,
        KP=triton.next_power_of_2(J),
        BLOCK_T=triton.next_power_of_2(T),
        HAS_BIAS=bias_E is not None,
        NORM=bool(norm_topk_prob) and top_k > 1,
        PRECISE=precise_exp(),
        BE=be,
        BD=bd,
        PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )
    return Routing(ids_TK, weights_TK, counts_E, scores_TE, fused_ids_TJ, fused_weights_TJ)
