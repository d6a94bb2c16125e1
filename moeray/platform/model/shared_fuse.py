"""Shared experts run inside the fused MoE kernels as extra experts that every token is routed to
with weight 1 (SGLang's "shared experts fusion"): a transform applied to a loaded model from
outside, once, for inference.

Why: at decode batch 1 a step is bound by per-kernel ramp and drain (~510-560 kernels per
Moonlight-16B-A3B step, benchmarks/notes-engine.md), and the shared MLP costs each MoE layer its
own launches: gate+up gemv, SwiGLU, down gemv (3 in bf16; 5 in FP8, where each gemv is fp8_gemv
plus its split-K reduce). Fused, it rides on the routed experts' gate/up and down launches; what
it adds is the two appends of its ids and weights to the routing (one small cat each), so a bf16
MoE layer launches 1 kernel fewer and an FP8 one 3 fewer (scripts/decode_ops.py counts them).

What changes, per `MoE` whose experts and shared experts qualify (`fuse_refusal`):
`MoE.fused_shared` gets a `SharedFused` that holds the stacked weights [E + S, ...] as
non-persistent buffers: the E routed experts, then the shared MLP of width S * I split into S
experts of width I (Moonlight: 2 shared of 1408 = one MLP of 2816; DeepSeek-V3: 1 of 2048), with
their FP8 scale_inv stacked alike. The routed experts' tensors and the shared gate/up weights
become views of their rows, so those bytes are not doubled and a load_state_dict (in-place copies)
updates both; the shared down weight [D, S * I] is a column split, no view of [S, D, I]: with S > 1
it is a copy (Moonlight bf16: 11.5 MB a layer, 0.3 GB in all), which only a rerun refreshes. The
shared MLP's merged gate_up (model/merge.py) is dropped: its stack would keep a second copy of
gate/up alive.

Where it runs: the MoE's forward asks `SharedFused` first, which appends the S shared ids E.. E+S-1
with weight 1.0 to each token's routed ones (the routed weights already carry
routed_scaling_factor; the shared output is added unscaled, as before) and runs `fused_experts`;
where that does not apply (CPU, gradients) the MoE runs as before. The sum differs from the
unfused one by bf16 rounding only: each shared expert's output is rounded to bf16 then summed in
fp32 with the routed ones, where before the shared MLP's output was rounded and added to the
rounded routed sum.

Only plain `MoE` layers with every expert local are fused: the expert-parallel and placed layers
(parallel/expert.py, serve_ep.py, engine/eplb.py) have forwards of their own that run the shared
MLP themselves. MOERAY_FUSED_SHARED=0 fuses nothing (and unfuses a model fused before): the A/B
switch for the engine bench. Run it after merge_projections (`Engine` does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeray.kernels.common import FP8_BLOCK, FP8_DTYPE, interpreting, switched_off
from moeray.platform.model.linear import Linear
from moeray.platform.model.moe import MoE, fused_experts
from moeray.platform.model.quant import FP8Linear

PROJS = ("gate_proj", "up_proj", "down_proj")
FUSED_DTYPES = (torch.bfloat16, torch.float16, FP8_DTYPE)  # what `fused_experts` takes


def fuse_refusal(moe: MoE) -> str | None:
    """Why `moe`'s shared experts cannot run in its fused MoE, or None where they can."""
    if type(moe) is not MoE:
        return f"{type(moe).__name__}: its own forward runs the shared experts"
    experts, shared = moe.experts, moe.shared_experts
    if shared is None:
        return "no shared experts"
    if experts.num_experts != experts.routed_experts or experts.mlp_fn is not None:
        return "experts not all local, or an mlp_fn set (expert parallelism, training)"
    if experts.linear is not F.linear:
        return "a swapped linear (FP8 training)"
    _, width, D = experts.gate_proj.shape
    S = moe.config.n_shared_experts
    dtype = experts.gate_proj.dtype
    if dtype not in FUSED_DTYPES:
        return f"experts in {dtype}: the fused MoE takes bf16, fp16 or FP8"
    projs = [getattr(shared, n) for n in PROJS]
    fp8 = dtype == FP8_DTYPE
    kind = FP8Linear if fp8 else Linear
    if not all(type(p) is kind for p in projs) or any(
        getattr(p, "bias", None) is not None for p in projs
    ):
        return f"shared projections not all {kind.__name__} without bias like the experts"
    if any(p.weight.dtype != dtype or p.weight.device != experts.gate_proj.device for p in projs):
        return "shared experts in another dtype or on another device than the routed ones"
    want = {"gate_proj": (S * width, D), "up_proj": (S * width, D), "down_proj": (D, S * width)}
    for n, p in zip(PROJS, projs, strict=True):
        if tuple(p.weight.shape) != want[n]:
            return f"shared {n} {tuple(p.weight.shape)}, not {want[n]} (S={S} x I={width})"
    if fp8 and (width % FP8_BLOCK or D % FP8_BLOCK):
        return f"FP8 with I={width}, D={D}: the fused MoE needs whole 128x128 blocks"
    return None


def _shared_stack(w: torch.Tensor, name: str, S: int) -> torch.Tensor:
    """A shared projection's weight [S*I, D] (down: [D, S*I]) or its scale_inv, as S experts:
    [S, I, D] (a view) or [S, D, I] (a permuted view, copied by the stacking cat)."""
    if name == "down_proj":
        return w.unflatten(1, (S, w.shape[1] // S)).permute(1, 0, 2)
    return w.unflatten(0, (S, w.shape[0] // S))


class SharedFused(nn.Module):
    """One MoE layer's routed experts and its S shared experts stacked as E + S experts (module
    docstring): forward(x, routed ids, routed weights) -> the MoE's output, or None where the fused
    MoE does not apply."""

    # buffers, registered in __init__: the stacks [E + S, ...] (FP8: e4m3, their scale_inv too)
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor
    shared_ids_S: torch.Tensor  # int64 [S] = E .. E+S-1
    shared_weights_S: torch.Tensor  # fp32 [S] ones

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        reason = fuse_refusal(moe)
        if reason is not None:
            raise ValueError(f"cannot fuse the shared experts: {reason}")
        experts, shared = moe.experts, moe.shared_experts
        assert shared is not None  # (fuse_refusal says so; mypy needs it here)
        E = experts.num_experts
        S = moe.config.n_shared_experts
        fp8 = experts.gate_proj.dtype == FP8_DTYPE
        names = [*PROJS, *(f"{n}_scale_inv" for n in PROJS)] if fp8 else list(PROJS)
        dev = experts.gate_proj.device
        self.routed = E
        # Normal tensors even when called under inference_mode (the experts' tensors become views
        # of them and may later train).
        with torch.inference_mode(False), torch.no_grad():
            for n in names:
                proj, scale = n.removesuffix("_scale_inv"), n.endswith("_scale_inv")
                lin = getattr(shared, proj)
                part = lin.weight_scale_inv if scale else lin.weight
                whole = torch.cat([getattr(experts, n), _shared_stack(part, proj, S)])
                self.register_buffer(n, whole, persistent=False)
                getattr(experts, n).data = whole[:E]
                if proj != "down_proj" or S == 1:  # a view of the stack (docstring: down is not)
                    part.data = whole[E:].flatten(0, 1) if proj != "down_proj" else whole[E]
            shared.gate_up_proj = None  # would hold a second copy of gate/up (docstring)
        ids = torch.arange(E, E + S, device=dev)
        self.register_buffer("shared_ids_S", ids, persistent=False)
        self.register_buffer("shared_weights_S", torch.ones(S, device=dev), persistent=False)

    def holds(self, moe: MoE) -> bool:
        """Whether `moe`'s routed experts' tensors are still the views of their rows here (False
        once one was replaced: a dtype or device move, an FP8 quantization, a placement)."""
        if fuse_refusal(moe) is not None or moe.experts.num_experts != self.routed:
            return False
        for n, whole in self._buffers.items():
            if n.startswith("shared_") or whole is None:
                continue
            t, v = getattr(moe.experts, n), whole[: self.routed]
            if t.shape != v.shape or t.stride() != v.stride() or t.data_ptr() != v.data_ptr():
                return False
        return True

    def forward(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor
    ) -> torch.Tensor | None:
        # Where the routed experts would run the fused kernel (`Experts.forward`: CUDA, some
        # tokens), or its interpreter (tests on CPU); the rest keeps the shared MLP.
        T = x_TD.shape[0]
        if T == 0 or not (x_TD.is_cuda or interpreting()):
            return None
        # Two small launches (cat) replace the shared MLP's three or five.
        ids = torch.cat([ids_TK, self.shared_ids_S.to(ids_TK.dtype).expand(T, -1)], 1)
        ones_TS = self.shared_weights_S.to(weights_TK.dtype).expand(T, -1)
        weights = torch.cat([weights_TK, ones_TS], 1)
        w = (self.gate_proj, self.up_proj, self.down_proj)
        scales = None
        if self.gate_proj.dtype == FP8_DTYPE:
            s1, s3, s2 = (self.get_buffer(f"{n}_scale_inv") for n in PROJS)
            scales = (s1, s3, s2)
        return fused_experts(x_TD, w, scales, ids, weights)


def fuse_shared_experts(model: nn.Module) -> dict[str, str | None]:
    """Fuse, in place, the shared experts of each MoE layer of `model` into its fused MoE (module
    docstring). Returns {MoE module name: None where fused, else why not}; layers without shared
    experts are left out."""
    off = switched_off("SHARED")
    report: dict[str, str | None] = {}
    for name, moe in list(model.named_modules()):
        if not isinstance(moe, MoE) or moe.shared_experts is None:
            continue
        fused = getattr(moe, "fused_shared", None)
        reason = "MOERAY_FUSED_SHARED=0" if off else fuse_refusal(moe)
        if reason is not None:
            if fused is not None:
                moe.fused_shared = None
        elif not (isinstance(fused, SharedFused) and fused.holds(moe)):
            moe.fused_shared = SharedFused(moe)
        report[name] = reason
    return report
