"""RMSNorm as DeepSeek-V3 uses it: normalize in fp32, scale in the input dtype.

The fast path is chosen here, in `use_fused_norm`: on CUDA, inference and training alike run the
fused Triton kernels `moeray.kernels.norm.rms_norm` (the residual add and the norm in one launch
instead of ~8; when autograd records, a forward that also saves 1/rms per row and a backward of
one launch plus a small sum instead of ~10 kernels); CPU runs the PyTorch reference
`rms_norm_ref`. Both give the same result up to one rounding step of the dtype (the kernel's sum
of squares runs in another order), the gradients up to one rounding step of theirs.
MOERAY_FUSED_NORM=0 turns the kernels off.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.kernels.norm import rms_norm, rms_norm_applies, rms_norm_ref
from moeray.platform.model.autocast import to_autocast


def use_fused_norm(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None
) -> bool:
    """The one place that picks the fused kernels over PyTorch (see the module docstring); with or
    without gradients: `rms_norm` itself runs its autograd Function when autograd records."""
    return x.is_cuda and rms_norm_applies(x, weight, residual)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = to_autocast(self.weight)  # under autocast: scale in its dtype (model/autocast.py)
        if use_fused_norm(x, weight):
            return rms_norm(x, weight, self.eps, fresh_w=weight is not self.weight)[0]
        return rms_norm_ref(x, weight, self.eps)[0]

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(x + residual), x + residual): the decoder layer's residual add fused with the
        norm that follows it (one kernel on the GPU)."""
        weight = to_autocast(self.weight)
        if use_fused_norm(x, weight, residual):
            return rms_norm(x, weight, self.eps, residual, fresh_w=weight is not self.weight)
        return rms_norm_ref(x, weight, self.eps, residual)
