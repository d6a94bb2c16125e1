"""Activations under torch.autocast: the model's stream in the autocast dtype, end to end.

Autocast casts the inputs and weights of matmuls (F.linear, SDPA) to its dtype, but not an
embedding lookup or a normalization, so with fp32 master weights the embedding, every RMSNorm and,
through them, the residual stream stay fp32: each linear then casts its input again, and each
residual add, norm and their gradients move twice the bytes (one-H200 Moonlight training step:
~500 dtype-converting copies a step; benchmarks/notes-train.md). Here those two take the autocast
dtype as a linear layer does: the embedding's output is cast, and RMSNorm scales by its weight in
that dtype, so the residual stream is bf16 as in a bf16 model (Megatron-LM's default without
fp32_residual_connection). Without autocast (inference in the weights' dtype, the fp32 oracle
tests) nothing changes.
"""

from __future__ import annotations

import torch
from torch import nn


def to_autocast(t: torch.Tensor) -> torch.Tensor:
    """t in the autocast dtype of its device when autocast is on there and t is floating point;
    else t itself. Differentiable (a cast)."""
    dev = t.device.type
    if t.is_floating_point() and torch.is_autocast_enabled(dev):
        return t.to(torch.get_autocast_dtype(dev))
    return t


class Embedding(nn.Embedding):
    """nn.Embedding (same parameter and state dict) whose output takes the autocast dtype."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return to_autocast(super().forward(input))
