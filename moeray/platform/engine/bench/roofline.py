"""The decode roofline of `moeray bench engine`: what one decode step must read, from the model.

Legend: B batch (sequences decoding one token each), E routed experts per MoE layer, K experts per
token, C latent width (kv_lora_rank), R rope width, L main layers, H heads.

A step reads, once each:
  - every weight the step uses whatever the routing: attention, dense FFNs, shared experts,
    routers, norms, the output head (the embedding is left out: B rows of it);
  - in each MoE layer the routed experts that at least one of the B tokens picked: under uniform
    routing (each token K distinct experts of E) the expected count is E * (1 - (1 - K/E)^B),
    e.g. 6.0 of 64 at B = 1, 29.8 at B = 8, 63.9 at B = 64 for Moonlight's top-6;
  - the latent cache: B * context * L * (C + R) elements.
Bytes are what the model holds: e4m3 plus fp32 block scales for FP8 weights, except MLA's kv_b_proj,
whose absorbed decode path reads a dequantized copy in the activation dtype (model/mla.py `_w_HKC`).
The time bound is the larger of bytes / bandwidth and FLOPs / peak; the FLOPs are 2 per active
weight per token plus the absorbed attention's 2 * H * (2C + R) per cached token and layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeray.platform.config import ModelConfig
from moeray.platform.model.linear import MergedLinear
from moeray.platform.model.moe import Experts
from moeray.platform.model.quant import FP8Linear


@dataclass(frozen=True)
class StepBytes:
    """What a decode step reads, by part (see the module docstring)."""

    fixed: int  # weights every step reads, in bytes
    expert: tuple[int, ...]  # bytes of one routed expert, per MoE layer
    num_experts: int  # E
    top_k: int  # K
    kv_per_token: int  # latent cache bytes per cached token, all main layers

    def distinct_experts(self, batch: int) -> float:
        """Expected routed experts per MoE layer that `batch` tokens touch (uniform routing)."""
        E, K = self.num_experts, self.top_k
        return E * (1 - (1 - K / E) ** batch) if E else 0.0

    def weight_bytes(self, batch: int) -> float:
        return self.fixed + self.distinct_experts(batch) * sum(self.expert)

    def total(self, batch: int, context: int) -> float:
        return self.weight_bytes(batch) + batch * context * self.kv_per_token


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def step_bytes(model: nn.Module, kv_dtype_bytes: int) -> StepBytes:
    """StepBytes of a Transformer's main model as it is stored (MTP modules left out: decoding
    without speculation does not run them)."""
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    expert_modules = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, Experts) and not name.startswith("mtp.")
    }
    fixed = 0
    for name, m in model.named_modules():
        if name.startswith("mtp.") or name in ("model.embed_tokens", "model.rotary_emb"):
            continue
        if isinstance(m, MergedLinear):
            continue  # its stacked tensors are the parts' (model/merge.py), counted with them
        if name in expert_modules or any(name.startswith(e + ".") for e in expert_modules):
            continue
        if isinstance(m, FP8Linear) and name.endswith("kv_b_proj"):
            fixed += m.weight.numel() * kv_dtype_bytes  # read as the dequantized copy
            continue
        # Persistent buffers only: the weights' kin (scales, the routing bias); kernel
        # workspaces (fp8_gemv's tile counters, the gate's fold counter) are not weights.
        buffers = [
            t for n, t in m.named_buffers(recurse=False) if n not in m._non_persistent_buffers_set
        ]
        fixed += sum(_nbytes(t) for t in [*m.parameters(recurse=False), *buffers])
    expert = tuple(
        sum(_nbytes(t) for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
        // m.num_experts
        for m in expert_modules.values()
    )
    kv = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * kv_dtype_bytes
    return StepBytes(
        fixed=fixed,
        expert=expert,
        num_experts=cfg.n_routed_experts if expert else 0,
        top_k=cfg.num_experts_per_tok,
        kv_per_token=kv,
    )


def step_flops(cfg: ModelConfig, batch: int, context: int) -> float:
    """FLOPs of one decode step: the active weights (less the embedding) and absorbed attention."""
    D, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    C, R, H = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
    return batch * (
        2 * (cfg.num_parameters(activated=True) - V * D) + 2 * context * L * H * (2 * C + R)
    )


def decode_roofline(
    step: StepBytes,
    cfg: ModelConfig,
    batch: int,
    context: int,
    bandwidths: dict[str, float],
    peak_flops: float,
) -> dict:
    """The roofline of one decode step at `batch` x `context`: bytes by part, and the tokens/s
    bound for each named bandwidth (bytes/s), e.g. {"datasheet": 4.8e12, "measured": 4.0e12}."""
    weights = step.weight_bytes(batch)
    kv = batch * context * step.kv_per_token
    flops = step_flops(cfg, batch, context)
    bound = {
        name: batch / max((weights + kv) / bw, flops / peak_flops)
        for name, bw in bandwidths.items()
    }
    return {
        "distinct_experts_per_layer": step.distinct_experts(batch),
        "weight_bytes": weights,
        "fixed_weight_bytes": step.fixed,
        "routed_expert_bytes": weights - step.fixed,
        "kv_bytes": kv,
        "flops": flops,
        "tokens_per_s": bound,
        "step_us": {name: 1e6 * batch / t for name, t in bound.items()},
    }


@dataclass(frozen=True)
class PeerDecode:
    """A published batch-1 decode figure as a fraction of its own machine's roofline, and on
    which bandwidth that roofline stands ("datasheet" or "measured")."""

    name: str
    roofline_fraction: float
    basis: str


# The published batch-1 references issue 19 sets against this engine (benchmarks/notes-engine.md
# quotes them): vLLM decoding DeepSeek-V2-Lite (2.4B active, 27 layers) at 155-164 tok/s on an
# H100, ~23% of that GPU's datasheet roofline; gpt-fast on Mixtral 8x7B at 74% of its measured
# bandwidth.
PEERS_BATCH1 = (
    PeerDecode("vLLM DeepSeek-V2-Lite H100", 0.23, "datasheet"),
    PeerDecode("gpt-fast Mixtral 8x7B", 0.74, "measured"),
)


def vs_peers(fraction_datasheet: float | None, fraction_measured: float | None) -> list[dict]:
    """This run's batch-1 roofline fraction against each peer's, on the peer's basis: the ratio
    > 1 where this engine runs closer to its roofline than the peer did to its own."""
    out = []
    for p in PEERS_BATCH1:
        ours = fraction_datasheet if p.basis == "datasheet" else fraction_measured
        out.append(
            {
                "peer": p.name,
                "basis": p.basis,
                "peer_roofline_fraction": p.roofline_fraction,
                "roofline_fraction": ours,
                "ratio": None if ours is None else ours / p.roofline_fraction,
            }
        )
    return out
