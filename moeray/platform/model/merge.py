"""Projections that read one input, merged into one GEMM for inference (vLLM's fused_qkv_a_proj and
gate_up_proj): a transform applied to a loaded model from outside, once.

Why: at decode batch 1 each projection is a weight read of one launch (gemv; FP8: fp8_gemv plus
its split-K reduce), ~5-7 us on an H200 of which a few us are fixed cost: a Moonlight-16B-A3B step
runs ~560 kernels in bf16, ~780 in FP8. Two pairs in every decoder layer (the MTP modules' too)
read the same tensor:
  * MLA: the first query projection (q_proj, or q_a_proj with a q LoRA) and kv_a_proj_with_mqa
    read the normed hidden state -> `MLA.fused_qkv_a_proj`;
  * MLP (dense layers, shared experts): gate_proj and up_proj -> `MLP.gate_up_proj`.
Stacking each pair's rows gives one GEMM of the same bytes: per layer 2 launches fewer in bf16 and
4 in FP8 (where each part was fp8_gemv + reduce), 54 / 108 per Moonlight step (27 layers).

What changes: the owner gets a `MergedLinear` (model/linear.py) that holds the stacked weight; the
parts keep their modules and Parameters, now views of their rows of it. So the state dict (names,
values, memory) is unchanged and a checkpoint still loads and saves under the original names;
training (autograd on) runs the parts as before. FP8 pairs merge only where the first part's rows
are whole 128-row scale blocks (q 3072 / q_a 1536 then kv_a 576; gate then up at every published
shape); otherwise that pair stays as it is and the report says why.

Run it once the weights are final (`Engine` does, at construction, before capturing its CUDA
graphs, after fusing the shared experts: their gate and up, rows of the fused expert stacks, are
left apart); again after a part's module or tensor was replaced (a new FP8Linear, a dtype or
device move): pairs whose views still hold are kept, the others merged anew. MOERAY_FUSED_PROJ=0
leaves every pair unmerged (and unmerges a model merged before): the A/B switch for the engine
bench.
"""

from __future__ import annotations

from torch import nn

from moeray.kernels.common import switched_off
from moeray.platform.model.linear import MergedLinear, merge_refusal
from moeray.platform.model.mla import MLA
from moeray.platform.model.moe import MLP, MoE


def _pair(module: nn.Module) -> tuple[str, tuple[str, str]] | None:
    """(the owner's merged attribute, the names of the two projections it merges), or None."""
    if isinstance(module, MLA):
        q = "q_proj" if module.q_lora_rank is None else "q_a_proj"
        return "fused_qkv_a_proj", (q, "kv_a_proj_with_mqa")
    if isinstance(module, MLP):
        return "gate_up_proj", ("gate_proj", "up_proj")
    return None


def merged_parts(model: nn.Module) -> list[nn.Module]:
    """The projections of `model` that run inside a MergedLinear (merge_projections merged them):
    at decode rows their own layers do not run; they run only where the merged one does not apply
    (autograd on; an FP8 stack off the 128-row grid past its rows)."""
    parts: list[nn.Module] = []
    for owner in model.modules():
        pair = _pair(owner)
        if pair is not None and getattr(owner, pair[0], None) is not None:
            parts += [getattr(owner, n) for n in pair[1]]
    return parts


def _stacked_shared_mlps(model: nn.Module) -> set[int]:
    """The shared-expert MLPs whose weights are rows of their MoE layer's fused expert stacks
    (model/shared_fuse.py, while it holds them): merging their gate and up would copy those rows
    out, and the next `fuse_shared_experts` (another engine on the same model) would then stack
    every routed expert of the layer anew, a second copy of them all while it runs."""
    return {
        id(m.shared_experts)
        for m in model.modules()
        if isinstance(m, MoE)
        and m.shared_experts is not None
        and (fused := m._fused_shared()) is not None
        and fused.holds(m)
    }


def merge_projections(model: nn.Module) -> dict[str, str | None]:
    """Merge, in place, each pair of projections of `model` that read one input (module
    docstring), but the gate and up of shared experts stacked with their layer's routed ones.
    Returns {owner module name: None where merged, else why not}."""
    off = switched_off("PROJ")
    stacked = _stacked_shared_mlps(model)
    report: dict[str, str | None] = {}
    for name, owner in list(model.named_modules()):
        pair = _pair(owner)
        if pair is None:
            continue
        attr, part_names = pair
        parts = [getattr(owner, n) for n in part_names]
        merged = getattr(owner, attr)
        if id(owner) in stacked:
            reason: str | None = "rows of the fused expert stacks (model/shared_fuse.py)"
        else:
            reason = "MOERAY_FUSED_PROJ=0" if off else merge_refusal(parts)
        if reason is not None:
            setattr(owner, attr, None)
        elif merged is None or not merged.holds(parts):
            setattr(owner, attr, MergedLinear(parts))
        report[name] = None if reason is None else f"{' + '.join(part_names)}: {reason}"
    return report
