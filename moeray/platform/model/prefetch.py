"""Weights that a decode layer reads late, fetched into L2 at the layer's start
(kernels/l2_prefetch.py): a transform applied to a loaded model from outside, once, for inference.

Why: at decode batch 1 the attention half of a layer is latency-bound (MLA over a few pages, norms,
the router and the gate move almost no bytes: kernels/l2_prefetch.py has the numbers) while the
MoE after it streams its experts at DRAM speed. Of those, the shared experts' ids are known before
the router runs, and o_proj is read after the attention: both can be fetched into L2 while the
latency-bound kernels run, so that their kernels then read part of their bytes from L2.

What, per `DecoderLayer`: a forward pre-hook on its attention launches one `l2_prefetch` of, in
this order and while they fit in the byte budget (whole tensors; the first that does not fit ends
the list):
  1. `self_attn.o_proj`'s weight (FP8Linear: and its weight_scale_inv);
  2. the shared experts' gate and up weights (where fused, model/shared_fuse.py: the stacks' rows
     E.. ; else the shared MLP's merged gate_up or its gate and up), FP8 scales after each;
  3. their down weight (and scale).
Only forwards of at most MAX_TOKENS tokens launch it (decode batches: prefill streams its weights
through many rows and gains nothing). A tensor that is not contiguous or not 16-byte aligned is
left out. The tables hold the weights' addresses: run it again after the weights are replaced
or moved (`Engine` runs it at construction, after merge_projections and fuse_shared_experts,
before capturing its graphs); a second run replaces the first's hooks.

Settings (`PrefetchSettings.from_env`): opt-in with MOERAY_FUSED_L2_PREFETCH=1 (not yet measured
on a GPU); MOERAY_L2_PREFETCH_MB the budget a layer (default 32: L2 is 50 MB on an H100/H200);
MOERAY_L2_PREFETCH_MODE one of kernels/l2_prefetch.MODES (default LINES). On a CPU only the
interpreter's TOUCH mode runs (tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from moeray.kernels.common import interpreting, switched_on
from moeray.kernels.l2_prefetch import (
    MODES,
    l2_prefetch,
    prefetchable,
    region_table,
    regions_bytes,
)
from moeray.platform.model.block import DecoderLayer
from moeray.platform.model.moe import MoE
from moeray.platform.model.quant import FP8Linear
from moeray.platform.model.shared_fuse import SharedFused

MAX_TOKENS = 64  # the largest decode batch the engine captures by default
HOOK_ATTR = "_l2_prefetch_hook"  # where a layer keeps its hook's handle (to replace it)


@dataclass(frozen=True)
class PrefetchSettings:
    budget_mb: float = 32.0
    mode: str = "LINES"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"L2 prefetch mode {self.mode!r}: choose one of {MODES}")
        if not self.budget_mb > 0:
            raise ValueError(f"L2 prefetch budget {self.budget_mb} MB: must be > 0")

    @staticmethod
    def from_env() -> PrefetchSettings | None:
        """The settings MOERAY_FUSED_L2_PREFETCH=1 asks for (module docstring), else None."""
        if not switched_on("L2_PREFETCH"):
            return None
        return PrefetchSettings(
            budget_mb=float(os.environ.get("MOERAY_L2_PREFETCH_MB", "32")),
            mode=os.environ.get("MOERAY_L2_PREFETCH_MODE", "LINES"),
        )


def _with_scale(linear: nn.Module) -> list[torch.Tensor]:
    weight = linear.weight
    assert isinstance(weight, torch.Tensor)
    return [weight, linear.weight_scale_inv] if isinstance(linear, FP8Linear) else [weight]


def _shared_parts(moe: MoE) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(gate/up tensors, down tensors) of a MoE's shared experts, as its decode forward reads
    them."""
    fused = moe._fused_shared()
    if isinstance(fused, SharedFused):  # the stacks' shared rows
        e = fused.routed
        fp8 = "gate_proj_scale_inv" in fused._buffers

        def rows(name: str) -> list[torch.Tensor]:
            parts = [fused.get_buffer(name)[e:]]
            if fp8:
                parts.append(fused.get_buffer(f"{name}_scale_inv")[e:])
            return parts

        return rows("gate_proj") + rows("up_proj"), rows("down_proj")
    shared = moe.shared_experts
    if shared is None:
        return [], []
    if shared.gate_up_proj is not None:
        gate_up = _with_scale(shared.gate_up_proj)
    else:
        gate_up = _with_scale(shared.gate_proj) + _with_scale(shared.up_proj)
    return gate_up, _with_scale(shared.down_proj)


def layer_prefetch_tensors(layer: DecoderLayer, budget_bytes: int) -> list[torch.Tensor]:
    """The tensors a layer's hook prefetches, in order, within `budget_bytes` (module docstring)."""
    groups = [_with_scale(layer.self_attn.o_proj)]
    if isinstance(layer.mlp, MoE):
        groups.extend(_shared_parts(layer.mlp))
    chosen: list[torch.Tensor] = []
    used = 0
    for t in (t for g in groups for t in g):
        if not prefetchable(t):  # (tiny FP8 scales of odd shapes: nothing to gain)
            continue
        nbytes = t.numel() * t.element_size()
        if used + nbytes > budget_bytes:
            break
        chosen.append(t)
        used += nbytes
    return chosen


class LayerPrefetch:
    """A layer's pre-hook: one l2_prefetch of its table at decode-sized forwards."""

    def __init__(self, tensors: list[torch.Tensor], mode: str) -> None:
        self.tensors = tensors  # kept: the table holds their addresses
        self.mode = mode
        self.table, self.base = region_table(tensors, tensors[0].device)
        self.bytes = regions_bytes(self.table)
        self.sink = (
            torch.empty(self.table.shape[0], dtype=torch.int32, device=self.table.device)
            if mode == "TOUCH"
            else None
        )

    def __call__(self, _module: nn.Module, args: tuple) -> None:
        x = args[0]
        if x.numel() // x.shape[-1] <= MAX_TOKENS and not torch.is_grad_enabled():
            l2_prefetch(self.table, self.base, self.mode, self.sink)


def install_l2_prefetch(
    model: nn.Module, settings: PrefetchSettings | None = None
) -> dict[str, int]:
    """Hook every DecoderLayer of `model` (module docstring), replacing hooks a previous call
    made; with `settings` None (the switch off), or on a device that cannot run it, remove them.
    Returns {layer name: bytes its hook prefetches}."""
    report: dict[str, int] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, DecoderLayer):
            continue
        old = layer.__dict__.pop(HOOK_ATTR, None)
        if old is not None:
            old.remove()
        if settings is None:
            continue
        dev = layer.self_attn.o_proj.weight.device
        if interpreting():
            mode = "TOUCH"  # the interpreter runs no inline PTX
        elif dev.type == "cuda":
            mode = settings.mode
        else:
            continue
        tensors = layer_prefetch_tensors(layer, int(settings.budget_mb * 2**20))
        if not tensors:
            continue
        hook = LayerPrefetch(tensors, mode)
        layer.__dict__[HOOK_ATTR] = layer.self_attn.register_forward_pre_hook(hook)
        report[name] = hook.bytes
    return report
