"""Recompute in the backward instead of keeping activations (DeepSeek-V3 report, section 3.2.3:
"we recompute all RMSNorm operations and MLA up-projections during back-propagation"), applied
from outside the model by `replica.parallelize` (`recompute: [norm, mla_up]` in the job config).

Each chosen piece runs under non-reentrant `torch.utils.checkpoint`: its forward keeps only its
inputs (which the surrounding graph holds anyway) and runs again right before its backward.

- `norm`: every RMSNorm (`forward` and the residual-add `add_forward`). Its fp32 normalized copy and
  1/rms are not kept (the GEMM that reads the norm's output still keeps that output).
- `mla_up`: `MLA.expanded_attention`, from the q and kv latents (Q + C + R values per token; V3:
  1536 + 512 + 64) through the up-projections q_b_proj / kv_b_proj to attention over the per-head
  keys and values. The per-head queries, keys and values (H x (2(N+R) + N + V) values per token;
  V3: 128 x 640 = 81,920) are made again in the backward instead of being kept. A fused attention
  kernel's outputs (flash, memory-efficient, cuDNN) are kept, so the recompute re-runs only the
  up-projections and the cheap reshapes; where attention is the math composite (CPU with
  v_head_dim != qk head dim), the attention is recomputed as well.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from moeray.platform.model.mla import MLA
from moeray.platform.model.norm import RMSNorm

_aten = torch.ops.aten
# attention kernels whose outputs are kept under `mla_up`: recomputing them would re-run attention
_KEPT_OPS = {
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _recomputed(fn: Callable, context_fn: Callable | None = None) -> Callable:
    """`fn` under non-reentrant checkpoint when autograd records it; plain otherwise."""
    kw: dict[str, Any] = {} if context_fn is None else {"context_fn": context_fn}

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False, **kw, **kwargs)

    return run


def apply_recompute(model: nn.Module, pieces: tuple[str, ...]) -> int:
    """Recompute `pieces` (names from job_config.RECOMPUTE) of `model` in its backward, in place;
    parameters and state-dict names are unchanged. Returns how many modules were wrapped."""
    wrapped = 0
    for module in model.modules():
        if "norm" in pieces and isinstance(module, RMSNorm):
            # instance attributes: nn.Module.__call__ and the decoder layer find these first
            module.forward = _recomputed(module.forward)  # type: ignore[method-assign]
            module.add_forward = _recomputed(module.add_forward)  # type: ignore[method-assign]
            wrapped += 1
        if "mla_up" in pieces and isinstance(module, MLA):
            module.expanded_attention = _recomputed(  # type: ignore[method-assign]
                module.expanded_attention,
                partial(create_selective_checkpoint_contexts, _keep_attention),
            )
            wrapped += 1
    return wrapped
