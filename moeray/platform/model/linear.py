"""The model's plain (non-FP8) projections, and several projections of one input run as one.

`Linear`: nn.Linear with its forward through kernels.gemv.linear. Same parameters, state-dict names
and initialization as nn.Linear (HF checkpoints load as before); only where the product runs
differs: `moeray.kernels.gemv.linear` picks the one-launch GEMV for decode rows (<= GEMV_MAX_ROWS)
of CUDA inference without gradients and F.linear for everything else, training included.
MOERAY_FUSED_GEMV=0 keeps F.linear everywhere.

`MergedLinear`: projections that read the same input (Linear or FP8Linear ones) stacked by rows
into one weight, so that one GEMM computes them all; `model/merge.py` builds them for inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moeray.kernels.common import FP8_BLOCK
from moeray.kernels.gemv import linear
from moeray.platform.model.quant import FP8Linear, fp8_as_bf16, fp8_gemv_max_rows


class Linear(nn.Linear):
    """nn.Linear whose forward is kernels.gemv.linear (F.linear, or gemv at decode rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _tensor_names(part: Linear | FP8Linear) -> tuple[str, ...]:
    """The tensors of a projection that stack by rows: weight (and bias), or FP8 weight + scales."""
    if isinstance(part, FP8Linear):
        return ("weight", "weight_scale_inv")
    return ("weight",) if part.bias is None else ("weight", "bias")


def _layout(t: torch.Tensor) -> tuple:
    """What a part's tensor and its rows of the stack share while it is still a view of them."""
    return t.dtype, t.shape, t.stride(), t.device


def merge_refusal(parts: Sequence[nn.Module]) -> str | None:
    """Why `parts` cannot stack into one MergedLinear, or None when they can: two or more, all
    `Linear` or all `FP8Linear` (exactly: a subclass may compute otherwise), one input width, dtype
    and device, biases on all or none, and for FP8 every part but the last a whole number of
    128-row scale blocks (else one scale block would span rows of two parts)."""
    if len(parts) < 2:
        return f"{len(parts)} projection(s): nothing to merge"
    kinds = {type(p) for p in parts}
    if len(kinds) != 1 or not kinds <= {Linear, FP8Linear}:
        return "not all Linear or all FP8Linear: " + ", ".join(type(p).__name__ for p in parts)
    projs = [p for p in parts if isinstance(p, (Linear, FP8Linear))]  # all of them
    weights = [p.weight for p in projs]
    if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1:
        return "input width, dtype or device differ: " + ", ".join(
            f"{tuple(w.shape)} {w.dtype} {w.device}" for w in weights
        )
    if len({_tensor_names(p) for p in projs}) != 1:
        return "a bias on some of the projections only"
    if kinds == {FP8Linear}:
        for i, w in enumerate(weights[:-1]):
            if w.shape[0] % FP8_BLOCK:
                return (
                    f"FP8 part {i} has {w.shape[0]} rows, not a multiple of {FP8_BLOCK}: its last "
                    "scale block would hold rows of the next part"
                )
    return None


class MergedLinear(nn.Module):
    """Projections that read one input, run as one layer over their weights stacked by rows, for
    inference: forward(x) -> each part's output (views into one [..., sum of N] result).

    The parts keep their modules, Parameters and state-dict names; what changes is where their
    tensors live: each part's weight (its bias, its FP8 scales) becomes a view of its rows of the
    stacked tensors held here as non-persistent buffers. So the state dict and the memory are as
    before the merge, a load_state_dict (in-place copies) updates both, and the parts still run on
    their own: the owner calls them where `applies` says no.
    """

    def __init__(self, parts: Sequence[Linear | FP8Linear]) -> None:
        super().__init__()
        reason = merge_refusal(parts)
        if reason is not None:
            raise ValueError(f"cannot merge: {reason}")
        self.sizes = tuple(int(p.weight.shape[0]) for p in parts)
        names = _tensor_names(parts[0])
        fp8 = isinstance(parts[0], FP8Linear)
        # Normal tensors even when called under inference_mode (the parts' Parameters become
        # views of them and may later train).
        with torch.inference_mode(False), torch.no_grad():
            stacked = {n: torch.cat([getattr(p, n) for p in parts]) for n in names}
            fused: nn.Module
            if fp8:
                fused = FP8Linear(stacked["weight"], stacked["weight_scale_inv"])
                stacked = {n: getattr(fused, n) for n in names}  # as FP8Linear keeps them
            else:
                fused = Linear(
                    parts[0].weight.shape[1], sum(self.sizes), bias="bias" in names, device="meta"
                )
                for n in names:
                    delattr(fused, n)  # the meta Parameters: the stacked tensors replace them
            for n in names:
                # non-persistent: the state dict keeps the parts' names only
                fused.register_buffer(n, stacked[n], persistent=False)
            for n in names:
                for p, rows in zip(parts, self._row_ranges(n), strict=True):
                    getattr(p, n).data = getattr(fused, n)[rows]
        self.fused = fused
        # An FP8 stack whose rows are off the 128-grid (q 3072 + kv_a 576 = 3648) runs fp8_gemv at
        # any row count (FP8Linear.forward), which suits decode only: above FP8Linear's gemv rows
        # (quant.fp8_gemv_max_rows) the parts run, and an aligned part keeps act_quant + the
        # block-scaled tensor-core GEMM.
        self.gemv_only = fp8 and sum(self.sizes) % FP8_BLOCK != 0

    def _row_ranges(self, name: str) -> list[slice]:
        """Each part's rows of the stacked tensor `name` (scale rows are 128-row blocks)."""
        block = FP8_BLOCK if name == "weight_scale_inv" else 1
        out, start = [], 0
        for n in self.sizes:
            out.append(slice(start // block, -(-(start + n) // block)))
            start += n
        return out

    def holds(self, parts: Sequence[nn.Module]) -> bool:
        """Whether `parts` are still what was merged here: each of their tensors the view of its
        rows (False once a part's module or tensor was replaced, e.g. a dtype or device move)."""
        if len(parts) != len(self.sizes) or merge_refusal(parts) is not None:
            return False
        projs = [p for p in parts if isinstance(p, (Linear, FP8Linear))]  # all of them
        if isinstance(projs[0], FP8Linear) != isinstance(self.fused, FP8Linear):
            return False
        for n in _tensor_names(projs[0]):
            whole = getattr(self.fused, n, None)
            if not isinstance(whole, torch.Tensor):
                return False
            for p, rows in zip(parts, self._row_ranges(n), strict=True):
                t, v = getattr(p, n), whole[rows]
                if _layout(t) != _layout(v) or t.data_ptr() != v.data_ptr():
                    return False
        return True

    def applies(self, x: torch.Tensor) -> bool:
        """Whether the owner runs this merged layer for `x` rather than its parts: never while
        autograd records (training: the stacked tensors are no Parameters, gradients go to the
        parts'), and for an FP8 stack off the 128-grid up to `fp8_gemv_max_rows()` rows only (or
        where it runs as bf16 over its kept copy, `quant.fp8_as_bf16`)."""
        if torch.is_grad_enabled():
            return False
        rows = x.numel() // max(x.shape[-1], 1)
        if not self.gemv_only or rows <= fp8_gemv_max_rows():
            return True
        n, k = self.fused.weight.shape
        return fp8_as_bf16(rows, n, k, x.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.fused(x).split(self.sizes, dim=-1))

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, gemv_only={self.gemv_only}"
