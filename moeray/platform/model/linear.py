"""The model's plain (non-FP8) projections: nn.Linear with its forward through kernels.gemv.linear.

Same parameters, state-dict names and initialization as nn.Linear (HF checkpoints load as
before); only where the product runs differs: `moeray.kernels.gemv.linear` picks the one-launch
GEMV for decode rows (<= GEMV_MAX_ROWS) of CUDA inference without gradients and F.linear for
everything else, training included. MOERAY_FUSED_GEMV=0 keeps F.linear everywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.kernels.gemv import linear


class Linear(nn.Linear):
    """nn.Linear whose forward is kernels.gemv.linear (F.linear, or gemv at decode rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
