"""Shared experts run inside the fused MoE kernels as extra experts that every token is routed to
with weight 1 (SGLang's "shared experts fusion"): a transform applied to a loaded model from
outside, once, for inference.

Why: at decode batch 1 a step is bound by per-kernel ramp and drain (~510-560 kernels per
Moonlight-16B-A3B step, benchmarks/notes-engine.md), and the shared MLP costs each MoE layer 3
launches of its own: gate+up gemv, SwiGLU, down gemv (FP8 too: fp8_gemv sums its split-K in the
same launch). Fused, it rides on the routed experts' gate/up and down launches, and the fused gate
writes the shared ids and weights after the routed ones in its own launch
(`moe_gate(shared_experts=S)`): scripts/decode_ops.py counts 22 -> 19 launches per bf16 MoE layer
at batch 1 (Moonlight: 26 MoE layers, 78 a step). Only forwards of at most MAX_FUSED_TOKENS
tokens run fused (decode batches; past that the shared MLP's own GEMMs are faster, numbers at the
constant); where the reference gate ran (the fused gate declined) the MoE appends them with two
cats.

What changes, per `MoE` whose experts and shared experts qualify (`fuse_refusal`):
`MoE.fused_shared` gets a `SharedFused` that holds the stacked weights [E + S, ...] as
non-persistent buffers: the E routed experts, then the shared MLP of width S * I split into S
experts of width I (Moonlight: 2 shared of 1408 = one MLP of 2816; DeepSeek-V3: 1 of 2048), with
their FP8 scale_inv stacked alike. The routed experts' tensors and the shared gate/up weights
become views of their rows, so those bytes are not doubled and a load_state_dict (in-place copies)
updates both; the shared down weight [D, S * I] is a column split, no view of [S, D, I]: with S > 1
it is a copy (Moonlight bf16: 11.5 MB a layer, 0.3 GB in all), refreshed after a load_state_dict by
a post hook. The shared MLP's merged gate_up (model/merge.py) is dropped: its stack would keep a
second copy of gate/up alive. A fused layer replaced afterwards (eplb.apply_placement) leaves its
stack alive through the shared views: place experts before fusing (`Engine` fuses at build).

Where it runs: the MoE's forward asks the gate for the appended ids and weights and hands the
routing to `SharedFused` first, which runs `fused_experts` over the E + S experts with each token's
routed ids followed by the S shared ids E .. E+S-1 with weight 1.0 (the routed weights already
carry routed_scaling_factor; the shared output is added unscaled, as before); where that does not
apply (CPU, gradients, more than MAX_FUSED_TOKENS tokens) the MoE runs as before. bf16 sums differ
from the unfused ones by rounding only: each shared expert's output is rounded to bf16 then summed
in fp32 with the routed ones, where before the shared MLP's output was rounded and added to the
rounded routed sum. FP8 also quantizes the shared experts' input and hidden activations per 1x128
group, as the fused FP8 MoE does for every expert (the FP8Linear gemv of the unfused shared MLP at
decode does not).

Only plain `MoE` layers with every expert local are fused: the expert-parallel and placed layers
(parallel/expert.py, serve_ep.py, engine/eplb.py) have forwards of their own that run the shared
MLP themselves. MOERAY_FUSED_SHARED=0 fuses nothing (and unfuses a model fused before): the A/B
switch for the engine bench. Run it before merge_projections (`Engine` does), which then leaves
the stacked shared gate/up alone: a stack that still holds its views is kept by a second run (a
second engine on the model), where re-merging them first would have made it stack every routed
expert of the layer anew.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeray.kernels.common import FP8_BLOCK, FP8_DTYPE, interpreting, switched_off
from moeray.kernels.gate import Routing
from moeray.platform.model.linear import Linear
from moeray.platform.model.moe import MoE, fused_experts
from moeray.platform.model.quant import FP8Linear

PROJS = ("gate_proj", "up_proj", "down_proj")
# The most tokens a forward runs the shared experts inside the fused MoE. One H200, Moonlight
# decode, fused vs MOERAY_FUSED_SHARED=0 (benchmarks/results/engine-nvidia-h200-moonlight-
# {bf16,fp8}{,-unfused-shared}.json): kernel time a step at batch 1 2.88 vs 3.05 ms (bf16) and
# 2.69 vs 3.07 (FP8), at batch 8 6.19 vs 6.35 and 4.72 vs 5.00, but at batch 64 11.6 vs 10.9 and
# 9.24 vs 8.79: there the shared MLP's own dense GEMMs beat 64 more rows in the grouped kernel.
# With today's decode tiles, fused up to 64 tokens still loses at batch 64 on an H100: decode
# graph 1.005x (FP8) and 1.025x (bf16) as long, batch 1 even (benchmarks/results/engine-nvidia-
# h100-80gb-hbm3-moonlight-{fp8,bf16}-sharedwide.json, engine.ab.SHARED_WIDE).
MAX_FUSED_TOKENS = 16
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
    if fp8 and any(getattr(experts, f"{n}_scale_inv", None) is None for n in PROJS):
        return "FP8 experts without their scale_inv"
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


def _same_view(t: torch.Tensor, v: torch.Tensor) -> bool:
    return t.shape == v.shape and t.stride() == v.stride() and t.data_ptr() == v.data_ptr()


class SharedFused(nn.Module):
    """One MoE layer's routed experts and its S shared experts stacked as E + S experts (module
    docstring): forward(x, the gate's routing) -> the MoE's output, or None where the fused MoE
    does not apply."""

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
        # The shared down weight (and FP8 scale) the stack copied where S > 1: refreshed from
        # them after a load_state_dict (a plain tuple: not registered twice in the module tree).
        self.n_shared = S
        down = shared.down_proj
        self._down_sources: tuple[tuple[str, torch.Tensor], ...] = ()
        if S > 1:
            self._down_sources = (("down_proj", down.weight),)
            if fp8:
                down_scale = down.get_buffer("weight_scale_inv")
                self._down_sources += (("down_proj_scale_inv", down_scale),)
            self.register_load_state_dict_post_hook(SharedFused._refresh_down)
        ids = torch.arange(E, E + S, device=dev)
        self.register_buffer("shared_ids_S", ids, persistent=False)
        self.register_buffer("shared_weights_S", torch.ones(S, device=dev), persistent=False)

    @staticmethod
    def _refresh_down(module: nn.Module, _incompatible_keys: object) -> None:
        """After a load_state_dict (the parent MoE's loads the shared MLP first: it was
        registered before this module), copy the shared down weight's new values into the stack."""
        assert isinstance(module, SharedFused)
        with torch.no_grad():
            for name, src in module._down_sources:
                stacked = module.get_buffer(name)[module.routed :]
                stacked.copy_(_shared_stack(src, "down_proj", module.n_shared))

    def holds(self, moe: MoE) -> bool:
        """Whether `moe`'s routed experts' tensors and its shared MLP's viewed ones are still the
        views of their rows here (False once one was replaced: a dtype or device move, an FP8
        quantization, a placement, a merge_projections of the shared MLP run since)."""
        shared = moe.shared_experts
        if fuse_refusal(moe) is not None or moe.experts.num_experts != self.routed:
            return False
        assert shared is not None  # (fuse_refusal says so; mypy needs it here)
        E, S = self.routed, self.n_shared
        for n, whole in self._buffers.items():
            if n.startswith("shared_") or whole is None:
                continue
            if not _same_view(getattr(moe.experts, n), whole[:E]):
                return False
            proj = n.removesuffix("_scale_inv")
            lin = getattr(shared, proj)
            part = lin.weight_scale_inv if n.endswith("_scale_inv") else lin.weight
            if proj != "down_proj" and not _same_view(part, whole[E:].flatten(0, 1)):
                return False
            if proj == "down_proj" and S == 1 and not _same_view(part, whole[E]):
                return False
        return True

    def applies(self, x_TD: torch.Tensor) -> bool:
        """Where the routed experts would run the fused kernel (`Experts.forward`: CUDA, some
        tokens, at most MAX_FUSED_TOKENS), or its interpreter (tests on CPU); the rest keeps
        the shared MLP."""
        T = x_TD.shape[0]
        return 0 < T <= MAX_FUSED_TOKENS and (x_TD.is_cuda or interpreting())

    def forward(self, x_TD: torch.Tensor, r: Routing) -> torch.Tensor | None:
        if not self.applies(x_TD):
            return None
        T = x_TD.shape[0]
        ids, weights = r.fused_ids_TJ, r.fused_weights_TJ  # the fused gate wrote them (decode)
        if ids is None or weights is None:  # the reference gate: two cats
            ids_TK, weights_TK = r.expert_ids_TK, r.weights_TK
            ids = torch.cat([ids_TK, self.shared_ids_S.to(ids_TK.dtype).expand(T, -1)], 1)
            ones_TS = self.shared_weights_S.to(weights_TK.dtype).expand(T, -1)
            weights = torch.cat([weights_TK, ones_TS], 1)
        w = (self.gate_proj, self.up_proj, self.down_proj)
        scales = None
        if self.gate_proj.dtype == FP8_DTYPE:
            s1, s3, s2 = (self.get_buffer(f"{n}_scale_inv") for n in PROJS)
            scales = (s1, s3, s2)
        # moe_gemv runs the shared slots' gate/up before its PDL wait, overlapping the gate: on
        # an H200 at batch 1 +2.6% / +2.1% tokens/s at Moonlight bf16 / FP8 and +3.1% at V3
        # widths FP8 (benchmarks/results/engine-nvidia-h200-*-ab2.json); MOERAY_FUSED_SHARED_EARLY=0
        # keeps the wait first. Its promise holds here: the ids end with E .. E+S-1, and since the
        # norm wrote x only the routing's launches (and the cats above) ran, none writing x.
        early = 0 if switched_off("SHARED_EARLY") else self.n_shared
        return fused_experts(x_TD, w, scales, ids, weights, early_shared=early)


def fuse_shared_experts(model: nn.Module) -> dict[str, str | None]:
    """Fuse, in place, the shared experts of each MoE layer of `model` into its fused MoE (module
    docstring). Returns {MoE module name: None where fused, else why not}; layers without shared
    experts are left out."""
    off = switched_off("SHARED")
    report: dict[str, str | None] = {}
    for name, moe in list(model.named_modules()):
        if not isinstance(moe, MoE) or moe.shared_experts is None:
            continue
        fused = moe._fused_shared()
        reason = "MOERAY_FUSED_SHARED=0" if off else fuse_refusal(moe)
        if reason is not None:
            if fused is not None:
                moe.register_module("fused_shared", None)
        elif not (isinstance(fused, SharedFused) and fused.holds(moe)):
            moe.register_module("fused_shared", SharedFused(moe))
        report[name] = reason
    return report
