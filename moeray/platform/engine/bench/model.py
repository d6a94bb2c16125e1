"""Random-weight models at real shapes for `moeray bench engine`, built on the target device.

Legend: E routed experts, I expert width, D model width, N output features, K input features.

`random_model` makes the module tree on the meta device (no memory), then materializes it one
top-level piece at a time (embedding, each decoder layer, norm, head) directly on the device in the
target dtype, filled with Normal(0, initializer_range) like `Transformer.reset_parameters`, norms
ones. With `fp8=True` every projection that the official FP8 release stores in e4m3 (the
checkpoint's `stored_in_fp8`) becomes what `load_model(keep_fp8=True)` makes of it: an `FP8Linear`,
or e4m3 expert stacks with `<proj>_scale_inv` buffers, 128x128 block scales from each block's amax.
A piece is quantized right after it is made, so the peak is the FP8 model plus one layer in bf16
(DeepSeek-V3 widths: 37 GB for 4 layers in FP8, 74 GB in bf16; one MoE layer in bf16 is 23 GB).

Why Normal(0, 0.02) keeps activations finite at V3 widths: after each RMSNorm the inputs have unit
scale, a projection's outputs then have std 0.02 * sqrt(K) (1.7 at K = 7168), and the residual
grows by about that per layer, far from bf16's range over 61 layers.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.platform.checkpoint import stored_in_fp8
from moeray.platform.config import ModelConfig
from moeray.platform.model.moe import Experts, MoE
from moeray.platform.model.quant import FP8Linear, quantize_fp8_blocks, set_fp8_expert_weight
from moeray.platform.model.rope import rope_frequencies
from moeray.platform.model.transformer import Transformer

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
# Experts quantized per call: quantize_fp8_blocks works in fp32 with a padded copy, ~10 bytes per
# weight; 2^28 weights (16 V3 experts) keep that near 2.5 GB.
_QUANT_CHUNK_WEIGHTS = 1 << 28


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules the official FP8 release stores in e4m3 (module names mirror
    the checkpoint's keys; the regex matches inside MTP's `mtp.k.block.` names as it does inside
    the checkpoint's `model.layers.{L+k}.`)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and stored_in_fp8(name + ".weight")
    ]


def _quantize_stack(w_ENK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8_blocks over a stack of experts, a chunk of experts at a time."""
    E, N, K = w_ENK.shape
    step = max(1, _QUANT_CHUNK_WEIGHTS // (N * K))
    parts = [quantize_fp8_blocks(w_ENK[i : i + step]) for i in range(0, E, step)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


def quantize_fp8_(model: nn.Module) -> nn.Module:
    """Replace, in place, the projections the official release stores in FP8 by their e4m3 +
    128x128-scale form, as load_model(keep_fp8=True) holds them: FP8Linear modules and FP8 expert
    stacks. Works on a whole Transformer or on one decoder layer."""
    for name in fp8_linear_names(model):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, child)
        q, s = quantize_fp8_blocks(linear.weight.detach())
        setattr(owner, child, FP8Linear(q, s))
    for m in model.modules():
        if isinstance(m, Experts):
            for proj in EXPERT_PROJS:
                w = getattr(m, proj)
                if w.dtype == torch.float8_e4m3fn:
                    continue
                q, s = _quantize_stack(w.detach())
                set_fp8_expert_weight(m, proj, q, s)
    return model


@torch.no_grad()
def _fill_(module: nn.Module, std: float, gen: torch.Generator | None) -> None:
    """Normal(0, std) for matrices, ones for norm weights, zero routing bias (fp32)."""
    for name, p in module.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)
    for m in module.modules():
        if isinstance(m, MoE):
            # fp32 whatever the model dtype, as Gate makes it (bias steps vanish in bf16)
            bias = m.gate.e_score_correction_bias
            m.gate.e_score_correction_bias = torch.zeros(
                bias.shape, dtype=torch.float32, device=bias.device
            )


@torch.no_grad()
def random_model(
    config: ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    fp8: bool = False,
    seed: int = 0,
) -> Transformer:
    """A Transformer with random weights made on `device` (see the module docstring); with `fp8`
    the projections are e4m3 with block scales, as `moeray serve --weights fp8` loads them."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(config)
    model.to(dtype)  # meta: shapes and dtypes only
    # a meta model (shapes only: the roofline of a shape without its memory) takes no generator
    gen = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
    std = config.initializer_range
    pieces: list[nn.Module] = [
        model.model.embed_tokens,
        *model.model.layers,
        model.model.norm,
        model.lm_head,
        *model.mtp,
    ]
    for piece in pieces:
        piece.to_empty(device=device)
        _fill_(piece, std, gen)
        if fp8:
            quantize_fp8_(piece)
    # Non-persistent: computed from the config, as load_model sets it.
    model.model.rotary_emb.to_empty(device=device)
    model.model.rotary_emb.inv_freq = rope_frequencies(config)[0].to(device)
    return model.eval()
