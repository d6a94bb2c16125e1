"""The routed experts of a pipeline stage as one autograd node with a deferrable weight gradient
(`experts_mlp`, set as `Experts.mlp_fn` by `stages.enable_weight_grad_split`).

Legend: A rows sorted by expert, P rows of the padded layout (each expert's rows start aligned),
D model width, I expert width, E local experts, N and K a GEMM's output and input widths.

Three paths, picked per call (`_ExpertsMLPFn.forward`): with FP8 and `grouped_fp8`, the grouped
FP8 kernel on the 128-aligned layout (`_GroupedFP8`); without FP8, one grouped GEMM per projection
for all experts (`GroupedExperts`: bf16 on CUDA, any dtype on CPU; its weight gradients one Triton
k-grouped launch per projection where `use_grouped_wgrad`); otherwise one GEMM per expert (the
block-scaled FP8 GEMMs of `platform/fp8.py`, or `weight_grad.py`'s padded matmuls).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeray.kernels import fp8 as k
from moeray.kernels.common import switched_off
from moeray.kernels.fp8.kgrouped import fp8_gemm_kgrouped
from moeray.kernels.grouped_wgrad import grouped_wgrad
from moeray.platform import fp8 as f8
from moeray.platform.model.moe import Experts
from moeray.platform.parallel.weight_grad import (
    WeightGradStore,
    accumulate_weight_grad,
    grad_to_add_into,
    linear_gemms,
)


def _cast(w: torch.Tensor, dtype: torch.dtype, cache) -> torch.Tensor:
    """w in the GEMMs' dtype, from `cache` (an fp8.WeightCache) when there is one."""
    return w.to(dtype) if cache is None else cache.cast(w, dtype)


def _swiglu_backward(
    dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of h = silu(g) * u."""
    return torch.ops.aten.silu_backward(dh * u, g), dh * F.silu(g)


class _ExpertsMLPFn(torch.autograd.Function):
    """Every local expert's SwiGLU, y = (silu(x W1^T) * (x W3^T)) W2^T, on rows sorted by expert
    (`rows[e]` of them for expert e), as ONE autograd node with a deferrable weight gradient.

    Why: the per-expert loop of `Experts.forward` builds ~10 autograd nodes and ~17 kernel launches
    per expert, plus as many again backward; with small()'s 32 local experts in 6 MoE layers per
    stage, one micro-batch's stage forward took 0.2 s on an H200, ~45 us per op for 1.75
    GFLOP/token: host-bound (benchmarks/notes-train.md). Here the SwiGLU runs once over all rows,
    and the weight gradients of all experts are one deferred closure and one accumulation per
    stacked weight. GEMMs (module docstring): without FP8 one grouped GEMM per projection for all
    experts (`GroupedExperts`); with FP8 the grouped FP8 kernel (`_GroupedFP8`) or the per-expert
    block-scaled GEMMs of split_linear (padded on CUDA as there). Gradients equal the loop's (unit
    tests): the same products on the same rows.
    """

    @staticmethod
    def forward(
        ctx,
        x_AD,
        w1_EID,
        w3_EID,
        w2_EDI,
        rows: list[int] | torch.Tensor,
        store: WeightGradStore | None,
        fp8: bool,
        cache,
        grouped_fp8: bool,
        kgrouped_wgrad: bool,
        bf16_wgrad: bool = False,
    ):
        dev = x_AD.device.type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        act = cast or x_AD.dtype
        ctx.rows, ctx.store, ctx.fp8, ctx.cast, ctx.x_dtype = rows, store, fp8, cast, x_AD.dtype
        ctx.cache = cache
        ctx.grouped = GroupedExperts.applies(x_AD, fp8, act)
        ctx.grouped_fp8 = fp8 and grouped_fp8 and x_AD.shape[0] > 0
        if isinstance(rows, torch.Tensor) and not (
            (ctx.grouped or ctx.grouped_fp8)
            and GroupedExperts.device_layout(
                x_AD, fp8=fp8, kgrouped_wgrad=kgrouped_wgrad, bf16_wgrad=bf16_wgrad
            )
        ):
            # the per-expert paths, and grouped ones whose weight gradients slice experts on the
            # host, plan on the host
            rows = ctx.rows = rows.tolist()
        ctx.kgrouped_wgrad, ctx.bf16_wgrad = kgrouped_wgrad, bf16_wgrad
        if ctx.grouped_fp8:
            with torch.autocast(dev, enabled=False):
                return _GroupedFP8.forward(ctx, x_AD, w1_EID, w3_EID, w2_EDI, act)
        if ctx.grouped:
            with torch.autocast(dev, enabled=False):
                grp = GroupedExperts(x_AD, rows)
                w1, w3, w2 = (_cast(w, act, cache) for w in (w1_EID, w3_EID, w2_EDI))
                x_PD = grp.pad(x_AD.to(act))
                g_PI = grp.mm(x_PD, w1.transpose(-2, -1))
                u_PI = grp.mm(x_PD, w3.transpose(-2, -1))
                h_PI = F.silu(g_PI) * u_PI
                y_AD = grp.unpad(grp.mm(h_PI, w2.transpose(-2, -1)))
            ctx.grp = grp
            ctx.save_for_backward(x_PD, g_PI, u_PI, h_PI, w1_EID, w3_EID, w2_EDI)
            return y_AD
        assert isinstance(rows, list)  # read back above: only grouped paths keep a tensor
        fwd, _, _ = linear_gemms(fp8, cast, cache)
        with torch.autocast(dev, enabled=False):
            if fp8:  # gate and up quantize their shared rows once
                quantized = cache.get if cache is not None else f8.QuantizedWeight
                pairs = [
                    f8.forward_gemm_pair(x_AD[sl], quantized(w1_EID[e]), quantized(w3_EID[e]))
                    for e, sl in _segments(rows)
                ]
                g_AI, u_AI = (
                    torch.cat([p[i].to(act) for p in pairs])
                    if pairs
                    else x_AD.new_empty(0, w1_EID.shape[1], dtype=act)
                    for i in (0, 1)
                )
            else:
                g_AI = _per_expert(fwd, x_AD, w1_EID, rows, act, w1_EID.shape[1])
                u_AI = _per_expert(fwd, x_AD, w3_EID, rows, act, w3_EID.shape[1])
            h_AI = F.silu(g_AI) * u_AI
            y_AD = _per_expert(fwd, h_AI, w2_EDI, rows, act, w2_EDI.shape[1])
        ctx.save_for_backward(x_AD, g_AI, u_AI, h_AI, w1_EID, w3_EID, w2_EDI)
        return y_AD

    @staticmethod
    def backward(ctx, dy_AD):
        if ctx.grouped_fp8:
            return _GroupedFP8.backward(ctx, dy_AD)
        if ctx.grouped:
            return _ExpertsMLPFn._grouped_backward(ctx, dy_AD)
        x_AD, g_AI, u_AI, h_AI, w1, w3, w2 = ctx.saved_tensors
        rows = ctx.rows
        _, dgrad, wgrad = linear_gemms(ctx.fp8, ctx.cast, ctx.cache)
        with torch.autocast(dy_AD.device.type, enabled=False):
            dh_AI = _per_expert(dgrad, dy_AD, w2, rows, h_AI.dtype, w2.shape[2])
            dg_AI, du_AI = _swiglu_backward(dh_AI, g_AI, u_AI)
            dx_AD = _per_expert(dgrad, dg_AI, w1, rows, x_AD.dtype, w1.shape[2]) + _per_expert(
                dgrad, du_AI, w3, rows, x_AD.dtype, w3.shape[2]
            )

        def weight_grads(dy=dy_AD, dg=dg_AI, du=du_AI, x=x_AD, h=h_AI):
            with torch.no_grad(), torch.autocast(dy.device.type, enabled=False):
                if ctx.fp8:  # gate and up re-tile their shared rows x once
                    pairs = {
                        e: f8.wgrad_gemm_pair(dg[sl], du[sl], x[sl]) for e, sl in _segments(rows)
                    }
                    dw1, dw3 = (
                        _stack_experts({e: p[i] for e, p in pairs.items()}, w)
                        for i, w in ((0, w1), (1, w3))
                    )
                else:
                    dw1, dw3 = (
                        _per_expert_wgrad(wgrad, dg, x, rows, w1),
                        _per_expert_wgrad(wgrad, du, x, rows, w3),
                    )
                return dw1, dw3, _per_expert_wgrad(wgrad, dy, h, rows, w2)

        return (
            dx_AD,
            *_weight_grads_or_defer(ctx, (w1, w3, w2), weight_grads),
            *_NO_GRAD_ARGS,
        )

    @staticmethod
    def _grouped_backward(ctx, dy_AD):
        x_PD, g_PI, u_PI, h_PI, w1, w3, w2 = ctx.saved_tensors
        grp = ctx.grp
        act = x_PD.dtype
        with torch.autocast(dy_AD.device.type, enabled=False):
            w1c, w3c, w2c = (_cast(w, act, ctx.cache) for w in (w1, w3, w2))
            dy_PD = grp.pad(dy_AD.to(act))
            dh_PI = grp.mm(dy_PD, w2c)
            dg_PI, du_PI = _swiglu_backward(dh_PI, g_PI, u_PI)
            dx_AD = grp.unpad(grp.mm(dg_PI, w1c)).to(ctx.x_dtype) + grp.unpad(
                grp.mm(du_PI, w3c)
            ).to(ctx.x_dtype)

        def weight_grads(dy=dy_PD, dg=dg_PI, du=du_PI, x=x_PD, h=h_PI):
            with torch.no_grad(), torch.autocast(dy.device.type, enabled=False):
                return tuple(
                    _grouped_wgrad(grp, d, a, w)
                    for d, a, w in ((dg, x, w1), (du, x, w3), (dy, h, w2))
                )

        return (
            dx_AD,
            *_weight_grads_or_defer(ctx, (w1, w3, w2), weight_grads),
            *_NO_GRAD_ARGS,
        )


class _GroupedFP8:
    """FP8 experts on the 128-aligned layout (`GroupedExperts` with align 128, DeepGEMM's contiguous
    layout): one quantization per tensor for all experts (1x128 and 128x1 groups never straddle
    two experts there), one grouped GEMM per projection forward and input-grad
    (`kernels.fp8.fp8_gemm_grouped`), weight gradients one GEMM per expert on slices of one 128x1
    quantization (or, with `kgrouped_wgrad`, one k-grouped launch per projection over the same
    quantization). Weights come stacked from the WeightCache. Launches per MoE layer and
    micro-batch: ~10 forward, ~12 + 3 E backward (~15 k-grouped), where the per-expert path makes
    ~29 E.

    Rows as a device tensor (`GroupedExperts.device_layout`: k-grouped weight gradients only)
    give the layout planned on the device: P a bound, the blocks past the last expert's end of
    expert -1, whose rows nothing reads (see `forward`)."""

    @staticmethod
    def forward(ctx, x_AD, w1, w3, w2, act):
        cache = ctx.cache
        grp = GroupedExperts(x_AD, ctx.rows, align=128)
        blocks = grp.block_expert()
        x_PD = grp.pad(x_AD.to(torch.bfloat16))
        xq, xs = k.act_quant(x_PD, scale_col_major=True)
        s1, s3, s2 = cache.stacked(w1), cache.stacked(w3), cache.stacked(w2)
        g_PI = k.fp8_gemm_grouped(xq, xs, s1.q, s1.scale, blocks)
        u_PI = k.fp8_gemm_grouped(xq, xs, s3.q, s3.scale, blocks)
        # A device-planned layout's tail (the -1 blocks) is zeros in x (pad), g and u (the
        # grouped GEMM), so in h and, backward, in dy, dh, dg, du; nor could it reach real
        # rows: every op is row-wise (1x128 groups) or per block (act_quant_t's 128x1 groups:
        # experts start 128-aligned, the tail at the last padded end, and P % 128 == 0), and
        # no sum spans more than an expert's rows (fp8_gemm_kgrouped: [offs[e - 1], offs[e])).
        h_PI = F.silu(g_PI) * u_PI
        hq, hs = k.act_quant(h_PI, scale_col_major=True)
        y_AD = grp.unpad(k.fp8_gemm_grouped(hq, hs, s2.q, s2.scale, blocks)).to(act)
        ctx.grp, ctx.blocks = grp, blocks
        ctx.save_for_backward(x_PD, g_PI, u_PI, h_PI, w1, w3, w2)
        return y_AD

    @staticmethod
    def backward(ctx, dy_AD):
        x_PD, g_PI, u_PI, h_PI, w1, w3, w2 = ctx.saved_tensors
        grp, blocks, cache = ctx.grp, ctx.blocks, ctx.cache

        def input_grad(d_PN, s):  # d @ W per expert, with W^T stored K-major
            dq, ds = k.act_quant(d_PN, scale_col_major=True)
            return k.fp8_gemm_grouped(dq, ds, *s.transposed, blocks)

        with torch.autocast(dy_AD.device.type, enabled=False):
            s1, s3, s2 = cache.stacked(w1), cache.stacked(w3), cache.stacked(w2)
            dy_PD = grp.pad(dy_AD.to(torch.bfloat16))
            dh_PI = input_grad(dy_PD, s2)
            dg_PI, du_PI = _swiglu_backward(dh_PI, g_PI, u_PI)
            dx_AD = grp.unpad(input_grad(dg_PI, s1)).to(ctx.x_dtype) + grp.unpad(
                input_grad(du_PI, s3)
            ).to(ctx.x_dtype)

        def weight_grads(dy=dy_PD, dg=dg_PI, du=du_PI, x=x_PD, h=h_PI):
            with torch.no_grad(), torch.autocast(dy.device.type, enabled=False):
                if ctx.bf16_wgrad:  # from the bf16 operands, as the BF16 experts do
                    return tuple(
                        _grouped_wgrad(grp, d, a, w)
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
                    return _stack_experts(got, w)

                return per_expert(dgt, xt, w1), per_expert(dut, xt, w3), per_expert(dyt, ht, w2)

        return (
            dx_AD,
            *_weight_grads_or_defer(ctx, (w1, w3, w2), weight_grads),
            *_NO_GRAD_ARGS,
        )


# backward's gradients for forward's non-tensor arguments (rows, store, fp8, cache, grouped_fp8,
# kgrouped_wgrad, bf16_wgrad)
_NO_GRAD_ARGS = (None,) * 7


def _grouped_wgrad(grp: GroupedExperts, d_PN, a_PK, w) -> torch.Tensor | None:
    """w's gradient from bf16 operands on grp's layout (`GroupedExperts.wgrad`). A later
    micro-batch adds into w.grad (in grouped_wgrad's epilogue where `GroupedExperts.wgrad` runs
    it, else the add autograd would make) and returns nothing for autograd to add."""
    g = grad_to_add_into(w)
    dw = grp.wgrad(d_PN, a_PK, w.dtype, accumulate_into=g)
    return None if g is not None else dw


def _weight_grads_or_defer(ctx, weights, weight_grads) -> tuple:
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


def use_grouped_wgrad(device: torch.device) -> bool:
    """Whether `GroupedExperts.wgrad` runs the Triton k-grouped GEMM (`kernels/grouped_wgrad.py`:
    fp32 sums written as fp32, or added into the fp32 gradient in its epilogue) instead of
    `torch._grouped_mm` (bf16 out), a cast to fp32 and autograd's add (profiled: ~160 ms of casts
    and adds in a 0.7 s one-H200 Moonlight step). On CUDA, in a process alone (the FP8 k-grouped
    GEMM hung the 4-GPU pipeline's first step, cause not found: benchmarks/notes-train.md;
    `train/replica.py` keeps that one to one rank too), unless MOERAY_FUSED_GROUPED_WGRAD=0. CPU
    keeps torch's GEMM."""
    alone = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1
    return device.type == "cuda" and alone and not switched_off("GROUPED_WGRAD")


class GroupedExperts:
    """All experts' rows in one grouped GEMM (`torch._grouped_mm`: CUTLASS on sm90 for bf16, a
    per-group loop on CPU): one launch per projection instead of one per expert; the weight
    gradients one k-grouped launch per projection too (`wgrad`). On CUDA each expert's rows start
    at a multiple of ALIGN (zero rows between), the grouped kernel's alignment; on CPU the rows
    stay as they are."""

    ALIGN = 16

    @staticmethod
    def available(device: torch.device, fp8: bool, act: torch.dtype | None) -> bool:
        """Whether experts with these settings run their GEMMs grouped. FP8 keeps its own GEMMs
        (torch's grouped FP8 GEMM scales per row, not in 1x128 / 128x128 blocks); on CUDA the
        grouped kernel takes bf16 only."""
        return (
            not fp8
            and hasattr(torch, "_grouped_mm")
            and (act == torch.bfloat16 if device.type == "cuda" else device.type == "cpu")
        )

    @staticmethod
    def applies(x: torch.Tensor, fp8: bool, act: torch.dtype) -> bool:
        return x.shape[0] > 0 and GroupedExperts.available(x.device, fp8, act)

    @staticmethod
    def device_layout(
        x_AD: torch.Tensor, *, fp8: bool, kgrouped_wgrad: bool, bf16_wgrad: bool = False
    ) -> bool:
        """Whether a grouped path (BF16 `GroupedExperts`, or `_GroupedFP8` with `fp8`) keeps
        rows given as a device tensor there (`__init__` plans on the device). On CUDA only (on
        the CPU reading them makes nothing wait), where every weight gradient takes its row
        ranges from the device ends `offs`: BF16 where `use_grouped_wgrad`, FP8 with
        `kgrouped_wgrad` (`fp8_gemm_kgrouped`), FP8 with `bf16_wgrad` as BF16; FP8's per-expert
        ones slice on the host."""
        if not x_AD.is_cuda:
            return False
        if fp8 and not bf16_wgrad:
            return kgrouped_wgrad
        return use_grouped_wgrad(x_AD.device)

    def __init__(
        self, x_AD: torch.Tensor, rows: list[int] | torch.Tensor, align: int | None = None
    ) -> None:
        self.rows, self.device = rows, x_AD.device
        self.padded: list[int] | None
        self.align = align = align or (self.ALIGN if x_AD.is_cuda else 1)
        if isinstance(rows, torch.Tensor):
            self._device_plan(x_AD, rows, align)
            return
        self.padded = padded = [-(-n // align) * align for n in rows]
        ends = torch.tensor(padded).cumsum(0)
        self.P = int(ends[-1]) if len(rows) else 0
        self._ends = ends
        if align == 1:
            self.dst_A = None
        else:  # padded position of each row: its expert's padded start + its rank within the expert
            starts = [0, *ends.tolist()[:-1]]
            self.dst_A = _to_device(
                torch.cat([torch.arange(s, s + n) for s, n in zip(starts, rows, strict=True)]),
                x_AD.device,
            )

    def _device_plan(self, x_AD: torch.Tensor, counts_E: torch.Tensor, align: int) -> None:
        """The padded layout from per-expert counts on the device, with no host sync: P is a
        bound instead of the exact size, and rows past the last expert's end belong to no
        expert (zeros in `pad`; whatever torch._grouped_mm leaves there, zeros from the FP8
        grouped GEMM, whose `block_expert` is -1 there): the grouped GEMMs, `grouped_wgrad` and
        `fp8_gemm_kgrouped` read each expert's rows only, and `unpad` never selects them. One
        host sync per MoE layer and micro-batch less, each of which let the GPU run dry while
        the host caught up."""
        A, E = x_AD.shape[0], counts_E.shape[0]
        counts = counts_E.to(torch.int64)
        padded = (counts + (align - 1)) // align * align
        self._ends = ends = padded.cumsum(0)
        self.padded = None  # on the device; the per-expert FP8 weight gradients need a list
        # Each expert pads by at most align - 1, so the exact size, a multiple of align, is at
        # most A + E (align - 1) rounded down to one (P % 128 == 0 for the FP8 grouped GEMM).
        # A = 4096, E = 64, align 128: P = 12,160, the exact size of 63 experts of 1 row and
        # one of 4033 (at least 4096).
        self.P = (A + E * (align - 1)) // align * align
        if align == 1:
            self.dst_A = None
            return
        expert_A = torch.repeat_interleave(
            torch.arange(E, device=counts.device), counts, output_size=A
        )
        shift_E = (ends - padded) - (counts.cumsum(0) - counts)  # padded start - packed start
        self.dst_A = torch.arange(A, device=counts.device) + shift_E[expert_A]

    def block_expert(self, block: int = 128) -> torch.Tensor:
        """int32 [P / block] on the device: the expert of each `block`-row block of the padded
        layout, -1 for the blocks past the last expert's end (a device-planned layout's tail).
        Needs `block` to divide the alignment (no block straddles two experts)."""
        if self.align % block:
            raise ValueError(
                f"GroupedExperts: {block}-row blocks of a layout aligned to {self.align} rows "
                "would straddle experts"
            )
        if self.padded is not None:
            ids = [e for e, p in enumerate(self.padded) for _ in range(p // block)]
            return _to_device(torch.tensor(ids, dtype=torch.int32), self.device)
        # Device ops only (no .tolist(), nonzero or masked indexing: each waits for the GPU):
        # the block at row r is the first expert whose padded end is past r (experts without
        # rows are passed over), none past the last end.
        ends, E = self._ends, self._ends.shape[0]
        starts = torch.arange(0, self.P, block, device=ends.device)
        first_past = torch.searchsorted(ends, starts, right=True)
        return torch.where(first_past < E, first_past, -1).to(torch.int32)

    def padded_segments(self):
        """(expert, slice of its padded rows) for every expert with rows."""
        if self.padded is None:
            raise ValueError(
                "GroupedExperts: this layout was planned on the device (rows as a "
                "tensor); per-expert slices need rows as a list"
            )
        return _segments(self.padded)

    def pad(self, t_A: torch.Tensor) -> torch.Tensor:
        if self.dst_A is None:
            return t_A
        return t_A.new_zeros(self.P, t_A.shape[1]).index_copy_(0, self.dst_A, t_A)

    def unpad(self, t_P: torch.Tensor) -> torch.Tensor:
        return t_P if self.dst_A is None else t_P.index_select(0, self.dst_A)

    @functools.cached_property
    def offs(self) -> torch.Tensor:
        """int32 end row of each expert on the device: torch._grouped_mm's offsets (made on first
        use: the grouped FP8 path indexes blocks instead)."""
        return _to_device(self._ends.to(torch.int32), self.device)

    def mm(self, a_P: torch.Tensor, b_E: torch.Tensor) -> torch.Tensor:
        """Rows of expert e times b_E[e] ([E, K, N]) -> [P, N]."""
        return torch._grouped_mm(a_P, b_E, offs=self.offs)

    def wgrad(
        self,
        dy_PN: torch.Tensor,
        x_PK: torch.Tensor,
        dtype: torch.dtype,
        *,
        accumulate_into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """dW [E, N, K] in `dtype`: dW[e] = dy[rows of e]^T x[rows of e], exact zeros for experts
        without rows. `accumulate_into` (fp32 contiguous [E, N, K], a gradient): += dW, returned.

        Where `use_grouped_wgrad`: `grouped_wgrad`, summed and written in fp32, added in its
        epilogue. Else `torch._grouped_mm` (bf16 out on CUDA), cast to `dtype`, empty experts
        zeroed here (not left to the kernel's handling of empty groups)."""
        if use_grouped_wgrad(self.device):
            dw = grouped_wgrad(dy_PN, x_PK, self.offs, accumulate_into=accumulate_into)
            return dw if accumulate_into is not None else dw.to(dtype)
        dw = torch._grouped_mm(dy_PN.t(), x_PK, offs=self.offs).to(dtype)
        if isinstance(self.rows, torch.Tensor):
            dw.masked_fill_((self.rows == 0)[:, None, None], 0)  # no host sync
        else:
            empty = [e for e, n in enumerate(self.rows) if n == 0]
            if empty:
                dw[empty] = 0
        return dw if accumulate_into is None else accumulate_into.add_(dw)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t (built on the host, or already on `device`) on `device` without making the host wait:
    from pageable memory a non_blocking copy may still wait for the stream (the driver stages
    it), so CUDA copies go through pinned memory (PyTorch's caching host allocator: no
    cudaHostAlloc once warm)."""
    if t.device == device:
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _segments(rows: list[int]):
    """(expert, slice of its rows) for every expert with rows, in expert order."""
    start = 0
    for e, n in enumerate(rows):
        if n:
            yield e, slice(start, start + n)
        start += n


def _per_expert(
    gemm, a_A: torch.Tensor, w_E: torch.Tensor, rows: list[int], dtype: torch.dtype, width: int
) -> torch.Tensor:
    """gemm(rows of expert e, w_E[e]) for every expert with rows, concatenated in one copy;
    [0, width] when no expert has rows."""
    outs = [gemm(a_A[sl], w_E[e]).to(dtype) for e, sl in _segments(rows)]
    return torch.cat(outs) if outs else a_A.new_empty(0, width, dtype=dtype)


def _per_expert_wgrad(
    wgrad, dy_AN: torch.Tensor, x_AK: torch.Tensor, rows: list[int], w_ENK: torch.Tensor
) -> torch.Tensor:
    """dW [E, N, K]: dW[e] = dy[rows of e]^T x[rows of e]; zeros for experts without rows."""
    return _stack_experts({e: wgrad(dy_AN[sl], x_AK[sl]) for e, sl in _segments(rows)}, w_ENK)


def _stack_experts(got: dict[int, torch.Tensor], w_ENK: torch.Tensor) -> torch.Tensor:
    """[E, N, K] in w_ENK's dtype from per-expert results; zeros for experts not in `got`."""
    zero = torch.zeros_like(w_ENK[0])
    return torch.stack(
        [got[e].to(w_ENK.dtype) if e in got else zero for e in range(w_ENK.shape[0])]
    )


def experts_mlp(
    x_AD: torch.Tensor,
    w1_EID: torch.Tensor,
    w3_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    rows: list[int] | torch.Tensor,
    *,
    store: WeightGradStore | None = None,
    fp8: bool = False,
    cache=None,
    grouped_fp8: bool = False,
    kgrouped_wgrad: bool = False,
    bf16_wgrad: bool = False,
) -> torch.Tensor:
    """`Experts.mlp_fn` for pipeline stages: see _ExpertsMLPFn. `cache`: an fp8.WeightCache.
    `grouped_fp8`: the FP8 GEMMs on the 128-aligned layout with the grouped kernel (_GroupedFP8).
    `kgrouped_wgrad` (with `grouped_fp8`): its weight gradients in one k-grouped launch per
    projection (`kernels/fp8/kgrouped.py`) instead of one GEMM per expert; one-process training
    only (the kernel's module docstring says why). `bf16_wgrad` (with `grouped_fp8`): the
    weight gradients from the bf16 operands instead (`GroupedExperts.wgrad`), forward and input
    gradients staying FP8: at 4,096-token micro-batches each expert's weight gradient is
    memory-bound on the fp32 accumulation (K ~ 384 rows per expert), which FP8 does not shorten,
    while its 128x1 quantizations cost a pass over five operands. `rows`: per expert, a list or
    an int64 [E] tensor on x's device (its sum is not checked: reading it would sync)."""
    if isinstance(rows, torch.Tensor):
        if rows.shape != (w1_EID.shape[0],) or rows.device != x_AD.device:
            raise ValueError(
                f"experts_mlp: rows tensor of shape {tuple(rows.shape)} on {rows.device}; "
                f"expected [{w1_EID.shape[0]}] (one count per expert) on {x_AD.device}"
            )
    elif sum(rows) != x_AD.shape[0] or len(rows) != w1_EID.shape[0]:
        raise ValueError(
            f"experts_mlp: rows {rows} (sum {sum(rows)}) for {x_AD.shape[0]} rows "
            f"and {w1_EID.shape[0]} experts"
        )
    if grouped_fp8 and (not fp8 or cache is None):
        raise ValueError(
            f"experts_mlp: grouped_fp8 needs fp8=True and a WeightCache, got fp8={fp8}, "
            f"cache={cache}"
        )
    if (kgrouped_wgrad or bf16_wgrad) and not grouped_fp8:
        raise ValueError(
            f"experts_mlp: kgrouped_wgrad={kgrouped_wgrad}, bf16_wgrad={bf16_wgrad} need "
            "grouped_fp8=True"
        )
    if kgrouped_wgrad and bf16_wgrad:
        raise ValueError("experts_mlp: kgrouped_wgrad and bf16_wgrad exclude each other")
    return _ExpertsMLPFn.apply(
        x_AD,
        w1_EID,
        w3_EID,
        w2_EDI,
        rows,
        store,
        fp8,
        cache,
        grouped_fp8,
        kgrouped_wgrad,
        bf16_wgrad,
    )


def enable_grouped_experts(
    model: torch.nn.Module,
    *,
    grouped_fp8: bool,
    kgrouped_wgrad: bool = False,
    bf16_wgrad: bool = False,
) -> int:
    """Run every routed-experts module of a whole (PP = 1) model through `experts_mlp`, weight
    gradients computed at once (no W-op store: pipeline stages get theirs from
    `stages.enable_weight_grad_split`). FP8 experts (`linear` set to `fp8.fp8_linear` by
    `fp8.enable_fp8_training`, called first) keep FP8 with a WeightCache, through the grouped FP8
    GEMM when `grouped_fp8` (its weight gradients k-grouped with `kgrouped_wgrad`, see
    `experts_mlp`; from bf16 operands with `bf16_wgrad`); BF16 ones take `GroupedExperts` where
    it applies. Returns the number of modules switched. Every module gets a WeightCache: FP8
    keeps its quantized weights there, BF16 its bf16 casts of the fp32 weights (one per
    optimizer step instead of two per micro-batch)."""
    n = 0
    for module in model.modules():
        if isinstance(module, Experts):
            fp8 = module.linear is f8.fp8_linear
            module.mlp_fn = functools.partial(
                experts_mlp,
                fp8=fp8,
                cache=f8.WeightCache(),
                grouped_fp8=fp8 and grouped_fp8,
                kgrouped_wgrad=fp8 and grouped_fp8 and kgrouped_wgrad,
                bf16_wgrad=fp8 and grouped_fp8 and bf16_wgrad,
            )
            n += 1
    return n
