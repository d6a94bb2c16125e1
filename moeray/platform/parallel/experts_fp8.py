"""The routed experts in FP8 on the 128-aligned layout (`GroupedFP8`): the grouped FP8 GEMMs
forward and input-grad, weight gradients per expert, k-grouped or from bf16 operands. Called by
`experts_mlp._ExpertsMLPFn` with its autograd context.

Legend as in experts_mlp.py: A rows sorted by expert, P rows of the padded layout, D model width,
I expert width, E experts.
"""

from __future__ import annotations

import torch

from moeray.kernels import fp8 as k
from moeray.kernels.fp8.kgrouped import fp8_gemm_kgrouped
from moeray.platform.parallel.experts_common import (
    gate_up_fused,
    grouped_wgrad_bf16,
    stack_experts,
    sum_unpadded,
    swiglu_bwd,
    swiglu_fwd,
    unpadded,
    weight_grads_or_defer,
)
from moeray.platform.parallel.grouped_experts import GroupedExperts
from moeray.platform.parallel.weight_grad import grad_to_add_into

# backward's gradients for forward's non-tensor arguments (rows, store, fp8, cache, grouped_fp8,
# kgrouped_wgrad, bf16_wgrad)
NO_GRAD_ARGS = (None,) * 7


class GroupedFP8:
    """FP8 experts on the 128-aligned layout (`GroupedExperts` with align 128, DeepGEMM's contiguous
    layout): one quantization per tensor for all experts (1x128 and 128x1 groups never straddle
    two experts there), one grouped GEMM per projection forward and input-grad
    (`kernels.fp8.fp8_gemm_grouped`), weight gradients one GEMM per expert on slices of one 128x1
    quantization (or, with `kgrouped_wgrad`, one k-grouped launch per projection over the same
    quantization). Weights come stacked from the WeightCache. Launches per MoE layer and
    micro-batch: ~10 forward, ~12 + 3 E backward (~15 k-grouped) with PyTorch's SwiGLU, 2 and 5
    fewer fused (`swiglu_fwd`: silu, multiply, act_quant of h; `swiglu_bwd`: 4 ops and 2
    act_quant), where the per-expert path makes ~29 E.

    Rows as a device tensor (`GroupedExperts.device_layout`: k-grouped or bf16 weight gradients)
    give the layout planned on the device: P a bound, the blocks past the last expert's end of
    expert -1, whose rows nothing reads (see `forward`). `layout` (that layout, planned by
    `experts_layout`): x comes as x_PD and y goes as y_PD (dy and dx backward), no pad or
    unpad."""

    @staticmethod
    def forward(ctx, x_AD, w1, w3, w2, act, layout=None):
        cache = ctx.cache
        grp = GroupedExperts(x_AD, ctx.rows, align=128) if layout is None else layout
        blocks = grp.block_expert()
        x_bf16 = x_AD.to(torch.bfloat16)
        x_PD = x_bf16 if ctx.padded else grp.pad(x_bf16)
        xq, xs = k.act_quant(x_PD, scale_col_major=True)
        s2 = cache.stacked(w2)
        if gate_up_fused(w1, fp8=True):
            s13 = cache.stacked((w1, w3))
            gu_P2I = k.fp8_gemm_grouped(xq, xs, s13.q, s13.scale, blocks)
            g_PI, u_PI = gu_P2I.chunk(2, dim=1)
        else:
            s1, s3 = cache.stacked(w1), cache.stacked(w3)
            g_PI = k.fp8_gemm_grouped(xq, xs, s1.q, s1.scale, blocks)
            u_PI = k.fp8_gemm_grouped(xq, xs, s3.q, s3.scale, blocks)
        # A device-planned layout's tail (the -1 blocks) is zeros in x (pad, or the permute's
        # zeroed output), g and u (the grouped GEMM), so in h and, backward, in dy (pad, or
        # the combine's zeroed dy), dh, dg, du; nor could it reach real
        # rows: every op is row-wise (1x128 groups) or per block (act_quant_t's 128x1 groups:
        # experts start 128-aligned, the tail at the last padded end, and P % 128 == 0), and
        # no sum spans more than an expert's rows (fp8_gemm_kgrouped: [offs[e - 1], offs[e])).
        h_PI, hq, hs = swiglu_fwd(g_PI, u_PI, quant=True)
        y_PD = k.fp8_gemm_grouped(hq, hs, s2.q, s2.scale, blocks)
        y_AD = (y_PD if ctx.padded else grp.unpad(y_PD)).to(act)
        ctx.grp, ctx.blocks = grp, blocks
        ctx.save_for_backward(x_PD, g_PI, u_PI, h_PI, w1, w3, w2)
        return y_AD

    @staticmethod
    def backward(ctx, dy_AD):
        x_PD, g_PI, u_PI, h_PI, w1, w3, w2 = ctx.saved_tensors
        grp, blocks, cache = ctx.grp, ctx.blocks, ctx.cache

        def input_grad(d_q, s):  # d @ W per expert from d's 1x128 quantization, W^T K-major
            return k.fp8_gemm_grouped(*d_q, *s.transposed, blocks)

        with torch.autocast(dy_AD.device.type, enabled=False):
            dy_bf16 = dy_AD.to(torch.bfloat16)
            dy_PD = dy_bf16 if ctx.padded else grp.pad(dy_bf16)
            dh_PI = input_grad(k.act_quant(dy_PD, scale_col_major=True), cache.stacked(w2))
            # dg and du come with their quantizations, made in the same pass
            if gate_up_fused(w1, fp8=True):
                dgu_P2I, dgu_q = swiglu_bwd(dh_PI, g_PI, u_PI, quant=True, cat=True)
                dg_PI, du_PI = dgu_P2I.chunk(2, dim=1)
                dx_AD = unpadded(ctx, grp, input_grad(dgu_q, cache.stacked((w1, w3))))
            else:
                dg_PI, du_PI, dg_q, du_q = swiglu_bwd(dh_PI, g_PI, u_PI, quant=True)
                s1, s3 = cache.stacked(w1), cache.stacked(w3)
                dx_AD = sum_unpadded(ctx, grp, input_grad(dg_q, s1), input_grad(du_q, s3))

        def weight_grads(dy=dy_PD, dg=dg_PI, du=du_PI, x=x_PD, h=h_PI):
            with torch.no_grad(), torch.autocast(dy.device.type, enabled=False):
                if ctx.bf16_wgrad:  # from the bf16 operands, as the BF16 experts do
                    return tuple(
                        grouped_wgrad_bf16(grp, d, a, w)
                        for d, a, w in ((dg, x, w1), (du, x, w3), (dy, h, w2))
                    )
                xt, ht, dgt, dut, dyt = (k.act_quant_t(t) for t in (x, h, dg, du, dy))
                if ctx.kgrouped_wgrad:  # every expert in one launch, over its own tokens

                    def kgrouped(at, bt, w):
                        g = grad_to_add_into(w)
                        if g is not None:  # a later micro-batch: += in the GEMM's epilogue
                            fp8_gemm_kgrouped(*at, *bt, grp.offs, accumulate_into=g)
                            return None
                        out = torch.float32 if w.dtype == torch.float32 else torch.bfloat16
                        return fp8_gemm_kgrouped(*at, *bt, grp.offs, out_dtype=out).to(w.dtype)

                    return kgrouped(dgt, xt, w1), kgrouped(dut, xt, w3), kgrouped(dyt, ht, w2)

                def per_expert(at, bt, w):  # dW[e] = a[rows of e]^T b[rows of e], 128x1 on both
                    got = {}
                    for e, sl in grp.padded_segments():
                        sb = slice(sl.start // 128, sl.stop // 128)
                        got[e] = k.fp8_gemm(at[0][:, sl], at[1][:, sb], bt[0][:, sl], bt[1][:, sb])
                    return stack_experts(got, w)

                return per_expert(dgt, xt, w1), per_expert(dut, xt, w3), per_expert(dyt, ht, w2)

        return (
            dx_AD,
            *weight_grads_or_defer(ctx, (w1, w3, w2), weight_grads),
            *NO_GRAD_ARGS,
        )
