"""Rotary position embedding with YaRN scaling, on interleaved pairs as DeepSeek-V3 lays them out.

Legend: B batch, S positions, R rope dims (qk_rope_head_dim), R2 = R/2 rotated pairs.

YaRN (arXiv 2309.00071) as the official inference code does it: frequencies below the correction
range are interpolated by `factor`, those above it kept, a linear ramp in between; the range comes
from `beta_fast`/`beta_slow` rotations over `original_max_position_embeddings`, floored/ceiled.
cos/sin are multiplied by mscale(factor, mscale)/mscale(factor, mscale_all_dim), which is 1.0 for
V3 (both 1.0); the softmax side of the correction is `ModelConfig.softmax_scale`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeray.kernels.rope import rope, rope_applies, rope_ref
from moeray.platform.config import ModelConfig


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R2] (fp32) and the cos/sin attention factor."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = config.rope_scaling
    if rs is None or not config.is_yarn:
        return inv_freq, 1.0
    factor = float(rs["factor"])
    original = int(rs["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rs.get("beta_fast", 32)), float(rs.get("beta_slow", 1))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all:
        attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    else:
        attention_factor = _yarn_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    inv_freq: torch.Tensor  # buffer [R2], registered in __init__

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, S, R2] in fp32. Three kernels at decode, where there were six:
        the integer positions are cast inside the multiply (type promotion: the same fp32
        values), and a factor of 1.0 (DeepSeek-V3's, Moonlight's) multiplies nothing."""
        angles_BSR2 = positions_BS[..., None] * self.inv_freq.float()
        cos_BSR2, sin_BSR2 = angles_BSR2.cos(), angles_BSR2.sin()
        if self.attention_factor != 1.0:
            cos_BSR2, sin_BSR2 = cos_BSR2 * self.attention_factor, sin_BSR2 * self.attention_factor
        return cos_BSR2, sin_BSR2


def use_fused_rope(x_BSHR: torch.Tensor, cos_BSR2: torch.Tensor, sin_BSR2: torch.Tensor) -> bool:
    """The one place that picks the Triton rotation over PyTorch: on CUDA, inference and training
    alike, with tensors the kernel takes (`moeray.kernels.rope.rope_applies`; `rope` itself runs
    its autograd Function when x records a gradient); CPU runs the reference. Both give the same
    bits, forward and backward. MOERAY_FUSED_ROPE=0 keeps the reference."""
    return x_BSHR.is_cuda and rope_applies(x_BSHR, cos_BSR2, sin_BSR2)


def apply_rope(
    x_BSHR: torch.Tensor, cos_BSR2: torch.Tensor, sin_BSR2: torch.Tensor
) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1), (x2, x3), ... of the last dim (the official layout)."""
    if use_fused_rope(x_BSHR, cos_BSR2, sin_BSR2):
        return rope(x_BSHR, cos_BSR2, sin_BSR2)
    return rope_ref(x_BSHR, cos_BSR2, sin_BSR2)
