"""RMSNorm as DeepSeek-V3 uses it: normalize in fp32, scale in the input dtype.

The fast path is chosen here, in `use_fused_norm`: CUDA inference (no gradient) with one dtype
runs the fused Triton kernel `moeray.kernels.norm.rms_norm` (the residual add and the norm in one
launch instead of ~8); everything else, training included, runs the PyTorch reference
`rms_norm_ref`. Both give the same result up to one rounding step of the dtype (the kernel's sum
of squares runs in another order). MOERAY_FUSED_NORM=0 turns the kernel off.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.kernels.norm import rms_norm, rms_norm_applies, rms_norm_ref


def use_fused_norm(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None
) -> bool:
    """The one place that picks the fused kernel over PyTorch (see the module docstring)."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return x.is_cuda and not needs_grad and rms_norm_applies(x, weight, residual)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused_norm(x, self.weight):
            return rms_norm(x, self.weight, self.eps)[0]
        return rms_norm_ref(x, self.weight, self.eps)[0]

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(x + residual), x + residual): the decoder layer's residual add fused with the
        norm that follows it (one kernel on the GPU)."""
        if use_fused_norm(x, self.weight, residual):
            return rms_norm(x, self.weight, self.eps, residual)
        return rms_norm_ref(x, self.weight, self.eps, residual)
