"""fp8_gemv at one row with the input's RMSNorm (and residual add) in its prologue:
`norm_fp8_gemv`, its reference `norm_fp8_gemv_ref`, and `norm_fp8_gemv_fits`, the shape test by
which FP8Linear's folded forward (model/quant.py) chooses it.

Where: one row of float x whose fp8_gemv runs the wide step (`gemv_wide.wide_applies`: the whole
K in one step of at most 16 blocks, K <= 2,048 by default, at least 2 blocks a program): a
decode step at batch 1, Moonlight's merged q / kv_a projection (N = 3,648, K = 2,048) and V3's
q_b. The norm and the stores of h are kernels/prenorm.py's; the weights and scales are read
before the PDL wait as in fp8_gemv, so the row's reads and its reduction overlap them.
"""

from __future__ import annotations

import torch

from moeray.kernels.common import FP8_BLOCK, cdiv, interpreting
from moeray.kernels.fp8.gemv import _check_gemv_inputs, _gemv_config, fp8_gemv_ref, launch_fp8_gemv
from moeray.kernels.fp8.gemv_wide import wide_applies
from moeray.kernels.prenorm import PreNorm


def norm_fp8_gemv_ref(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, norm: PreNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x) @ dequant(w)^T in x's dtype, h = x + the norm's residual)."""
    normed, h = norm.ref(x)
    return fp8_gemv_ref(normed, w_fp8, w_scale).to(x.dtype), h


def _config(x: torch.Tensor, n: int) -> dict | None:
    """fp8_gemv's heuristic config for x where it is the wide step (K_BLOCKS > 1), else None."""
    m, k = x.shape
    if m != 1 or not wide_applies(cdiv(k, FP8_BLOCK)):
        return None
    cfg = _gemv_config(1, n, k, x.device)
    return cfg if cfg.get("K_BLOCKS", 1) > 1 else None


def norm_fp8_gemv_fits(x: torch.Tensor, w_fp8: torch.Tensor) -> bool:
    """Whether norm_fp8_gemv takes x [M, K] for this weight: one row whose fp8_gemv is the wide
    step (module docstring)."""
    return x.dim() == 2 and w_fp8.dim() == 2 and _config(x, w_fp8.shape[0]) is not None


def norm_fp8_gemv(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    norm: PreNorm,
    *,
    workspace: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`norm_fp8_gemv_ref` in fp8_gemv's one launch (wide step, serial split-K with a
    `workspace` as fp8_gemv's): (y [1, N] in x's dtype, h; h is x itself without a residual).
    x: one bf16 / fp16 row with unit stride, the norm's tensors in its dtype. `config`: a wide
    step's tiles (`gemv_wide.wide_config`) in place of the heuristic's."""
    _check_gemv_inputs(x, w_fp8, w_scale, None, None)
    norm.check(x)
    cfg = _config(x, w_fp8.shape[0]) if config is None else config
    if cfg is None or x.shape[0] != 1 or cfg.get("K_BLOCKS", 1) < 2:
        raise ValueError(
            f"x {tuple(x.shape)}: norm_fp8_gemv takes one row whose K is one wide step "
            f"(at most 16 blocks of {FP8_BLOCK}, at least 2 a program)"
        )
    if not (x.is_cuda or interpreting()):
        return norm_fp8_gemv_ref(x, w_fp8, w_scale, norm)
    h = norm.sum_buffer(x)
    return launch_fp8_gemv(x, w_fp8, w_scale, None, x.dtype, cfg, workspace, norm, h), h
