"""The DeepSeek-V3 gate as the model calls it (docs/deepseek-v3.md, "Gate").

Legend: T tokens, E routed experts, G expert groups (one per node in training), K experts per token.

  1. s = sigmoid(logits) in fp32;
  2. selection uses s + b (b = e_score_correction_bias), the weights use s;
  3. group score = sum of the top-2 biased scores in each group; keep the top `topk_group` groups;
  4. top-K experts among the kept groups; weights = s[topK] / sum(s[topK]) * routed_scaling_factor.
Experts outside the kept groups are masked with -inf, as the official code does. transformers masks
with 0.0, which differs only when a biased score is negative: then a masked expert (0.0) can beat a
kept one (< 0) and a token would reach more than `topk_group` groups, breaking the node limit.

`route` is the one place that chooses between the fused Triton gate and its PyTorch reference
(both in moeray.kernels.gate).
"""

from __future__ import annotations

from typing import Any

import torch

from moeray.kernels.gate import Routing, moe_gate, moe_gate_applies, moe_gate_ref

GROUP_MASK_OFFICIAL = float("-inf")
GROUP_MASK_TRANSFORMERS = 0.0


def route(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool = True,
    group_mask_value: float = GROUP_MASK_OFFICIAL,
    shared_experts: int = 0,
) -> Routing:
    """Group-limited top-k routing of T tokens over E experts (see the module docstring).

    CUDA inference with the official mask and at most `moe_gate_applies`'s rows goes to the fused
    Triton gate (`moe_gate`, one launch instead of ~15; same results, ties aside); training
    (gradients to the gate) and everything else run the PyTorch reference, `moe_gate_ref`.
    shared_experts=S: the fused gate also writes each token's routed ids and weights followed by
    the S shared experts' (Routing.fused_ids_TJ); the reference leaves them None.
    """
    kw: dict[str, Any] = dict(
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
        norm_topk_prob=norm_topk_prob,
    )
    needs_grad = torch.is_grad_enabled() and (
        logits_TE.requires_grad or (bias_E is not None and bias_E.requires_grad)
    )
    if (
        logits_TE.is_cuda
        and group_mask_value == GROUP_MASK_OFFICIAL
        and not needs_grad
        and moe_gate_applies(logits_TE, bias_E)
    ):
        return moe_gate(logits_TE, bias_E, shared_experts=shared_experts, **kw)
    return moe_gate_ref(logits_TE, bias_E, group_mask_value=group_mask_value, **kw)
