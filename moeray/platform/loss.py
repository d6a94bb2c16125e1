"""The training loss's next-token cross-entropy, and the one place that picks the fused kernel:
used by the one-process step (`train/step.compute_loss`) and the pipeline's last stage
(`parallel/stages.py`), so it lives below both.

Legend: B sequences, S positions, V vocabulary, T = B * S tokens.

On CUDA with autograd recording, `token_cross_entropy` runs `moeray.kernels.cross_entropy` on the
logits in their own dtype (bf16 under autocast), with the gradient written over the logits in
the forward: at Moonlight widths (V = 163,840, 4,096 tokens) ~1 ms and 1.34 GB kept a head instead
of ~13 ms and ~8 GB of fp32 copies (the kernel module's docstring). Elsewhere (CPU, no grad,
MOERAY_FUSED_CROSS_ENTROPY=0) it is exactly `F.cross_entropy` on an fp32 copy, as before (CPU
tests compare losses bit for bit). The two agree to fp32 rounding in the loss, and to one
rounding step of the logits' dtype in the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeray.kernels.common import switched_off
from moeray.kernels.cross_entropy import cross_entropy, cross_entropy_applies


def fused_cross_entropy_planned(device_type: str) -> bool:
    """Whether a training run on `device_type` will take the fused path (memory estimates ask
    before any logits exist): CUDA and the switch not off."""
    return device_type == "cuda" and not switched_off("CROSS_ENTROPY")


def use_fused_cross_entropy(logits_TV: torch.Tensor, target_T: torch.Tensor) -> bool:
    """The one place that picks the fused kernel over PyTorch: CUDA, autograd recording (the
    point is the gradient computed in the forward), and `cross_entropy_applies`."""
    return (
        logits_TV.is_cuda
        and torch.is_grad_enabled()
        and logits_TV.requires_grad
        and cross_entropy_applies(logits_TV, target_T)
    )


def token_cross_entropy(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32 scalar) of logits [B, S, V] against targets [B, S].

    The fused path overwrites the logits with their gradient (in place): only for logits that
    nothing reads after the loss, as `step.compute_loss`'s and the last pipeline stage's (the
    model's output, dropped when the loss is built; the head GEMM's backward saves its input and
    weight, not the logits, and the kernel moves the logits' version counter so a backward that
    did save them would fail)."""
    logits_TV, target_T = logits_BSV.flatten(0, 1), targets_BS.flatten()
    if use_fused_cross_entropy(logits_TV, target_T):
        return cross_entropy(logits_TV, target_T, inplace=True)
    return F.cross_entropy(logits_TV.float(), target_T)
