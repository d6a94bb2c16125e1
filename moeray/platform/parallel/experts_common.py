"""What the routed experts' two autograd paths share (`experts_mlp.py`'s node and the grouped FP8
path of `experts_fp8.py`): the SwiGLU fast-path choice, gate and up as one weight, dx off the
padded layout, the weight gradients from bf16 operands or deferred to the W op.

Legend as in experts_mlp.py: P rows of the padded layout, D model width, I expert width, E experts,
N and K a GEMM's output and input widths.
"""

from __future__ import annotations

import torch

from moeray.kernels import swiglu_train as sw
from moeray.platform.parallel.grouped_experts import GroupedExperts
from moeray.platform.parallel.weight_grad import accumulate_weight_grad, grad_to_add_into


def swiglu_fwd(g_PI: torch.Tensor, u_PI: torch.Tensor, *, quant: bool = False):
    """The grouped paths' h = silu(g) * u, with quant also act_quant(h, scale_col_major=True): one
    launch where `use_fused_swiglu_train` allows (CUDA; MOERAY_FUSED_SWIGLU_TRAIN=0: PyTorch's)."""
    fused = sw.use_fused_swiglu_train(g_PI, u_PI)
    return (sw.swiglu_fwd if fused else sw.swiglu_fwd_ref)(g_PI, u_PI, quant=quant)


def swiglu_bwd(dh_PI, g_PI, u_PI, *, quant=False, cat=False):
    """(dg, du) of `swiglu_fwd`'s h, with quant also each one's act_quant, chosen as there; cat:
    side by side as one [P, 2I] tensor (the input-grad GEMM of gate and up as one weight)."""
    fused = sw.use_fused_swiglu_train(dh_PI, g_PI, u_PI)
    return (sw.swiglu_bwd if fused else sw.swiglu_bwd_ref)(dh_PI, g_PI, u_PI, quant=quant, cat=cat)


def gate_up_fused(w1_EID: torch.Tensor, fp8: bool) -> bool:
    """Whether the grouped paths run gate and up as one [E, 2I, D] weight (one GEMM forward, one
    input-grad GEMM over [dg, du] with no add after it, one quantization of [dg, du]): always in
    BF16, in FP8 where I is a multiple of 128 (no 128x128 block straddles the two). At
    Moonlight's MoE layer on the H200 the one GEMM of N 2I = 2816 ran 0.775 ms against 2 x
    0.382 (FP8) and 0.987 against 2 x 0.490 (BF16), and dx's add (3 passes of [P, D] bf16, ~0.2
    ms a layer-micro-batch) goes (benchmarks/results/grouped-gemm-probe-nvidia-h200.json)."""
    return not fp8 or w1_EID.shape[1] % 128 == 0


def unpadded(ctx, grp: GroupedExperts, dx_PD: torch.Tensor) -> torch.Tensor:
    """dx in x's dtype from the input-gradient GEMM's output on grp's layout: on it where x came
    padded, else unpadded (as `sum_unpadded`, for one GEMM)."""
    return (dx_PD if ctx.padded else grp.unpad(dx_PD)).to(ctx.x_dtype)


def sum_unpadded(ctx, grp: GroupedExperts, a_PD: torch.Tensor, b_PD: torch.Tensor):
    """dx = a + b in x's dtype, the two input-gradient GEMMs' outputs on grp's layout: on it
    (dx_PD) where x came padded (the permute's backward reads its rows), else each unpadded
    (dx_AD). The same values row for row: the add is elementwise."""
    if ctx.padded:
        return a_PD.to(ctx.x_dtype) + b_PD.to(ctx.x_dtype)
    return grp.unpad(a_PD).to(ctx.x_dtype) + grp.unpad(b_PD).to(ctx.x_dtype)


def grouped_wgrad_bf16(grp: GroupedExperts, d_PN, a_PK, w) -> torch.Tensor | None:
    """w's gradient from bf16 operands on grp's layout (`GroupedExperts.wgrad`). A later
    micro-batch adds into w.grad (in grouped_wgrad's epilogue where `GroupedExperts.wgrad` runs
    it, else the add autograd would make) and returns nothing for autograd to add."""
    g = grad_to_add_into(w)
    dw = grp.wgrad(d_PN, a_PK, w.dtype, accumulate_into=g)
    return None if g is not None else dw


def weight_grads_or_defer(ctx, weights, weight_grads) -> tuple:
    """The weight gradients now, or (during a BI backward) a W-op closure that accumulates them."""
    needs_w = any(ctx.needs_input_grad[1:4])
    if needs_w and ctx.store is not None and ctx.store.defer:

        def deferred():
            for w, dw in zip(weights, weight_grads(), strict=True):
                if dw is not None:  # None: already added into w.grad
                    accumulate_weight_grad(w, dw)

        ctx.store.put(deferred)
        return None, None, None
    return weight_grads() if needs_w else (None, None, None)


def stack_experts(got: dict[int, torch.Tensor], w_ENK: torch.Tensor) -> torch.Tensor:
    """[E, N, K] in w_ENK's dtype from per-expert results; zeros for experts not in `got`."""
    zero = torch.zeros_like(w_ENK[0])
    return torch.stack(
        [got[e].to(w_ENK.dtype) if e in got else zero for e in range(w_ENK.shape[0])]
    )
