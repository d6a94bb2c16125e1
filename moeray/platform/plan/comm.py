"""All-to-all traffic of the MoE layers, and the decode time it bounds.

Dispatch sends each token's hidden vector once per expert copy in FP8 (1 byte per element; the
1x128-tile scales add 4 bytes per 128 elements, 3%, which the published derivations leave out and
so does this module); combine returns it in BF16 (2 bytes). Under node-limited routing a token's
routed experts sit on at most `topk_group` nodes (DeepSeek-V3 report section 2.1.2, M = 4 of 8
groups, one group per node in training): its dispatch crosses the scale-out network once per node
and fans out over NVLink inside it (DeepEP's two-hop kernels), so InfiniBand carries at most M
copies and NVLink up to top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeray.platform.config import ModelConfig
from moeray.platform.plan.gpus import GpuSpec

DISPATCH_BYTES = 1  # FP8 e4m3
COMBINE_BYTES = 2  # BF16


@dataclass(frozen=True)
class AllToAll:
    """Bytes one token moves through one MoE layer's dispatch + combine (one direction each)."""

    hidden: int
    ib_copies: int  # copies that cross the scale-out network
    nvlink_copies: int  # copies delivered inside a node

    @property
    def per_copy(self) -> int:
        return (DISPATCH_BYTES + COMBINE_BYTES) * self.hidden

    @property
    def ib_bytes(self) -> int:
        return self.ib_copies * self.per_copy

    @property
    def nvlink_bytes(self) -> int:
        return self.nvlink_copies * self.per_copy

    def seconds(self, gpu: GpuSpec, tokens: int) -> float:
        """Time for `tokens` tokens of one GPU, IB and NVLink in parallel (the slower one)."""
        # NVLink datasheet figures add both directions; a GPU sends on half of it.
        return max(
            tokens * self.ib_bytes / (gpu.nic_gbs * 1e9),
            tokens * self.nvlink_bytes / (gpu.nvlink_gbs / 2 * 1e9),
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "dispatch_bytes_per_copy": DISPATCH_BYTES * self.hidden,
            "combine_bytes_per_copy": COMBINE_BYTES * self.hidden,
            "ib_copies": self.ib_copies,
            "nvlink_copies": self.nvlink_copies,
            "ib_bytes": self.ib_bytes,
            "nvlink_bytes": self.nvlink_bytes,
        }


def training_all_to_all(cfg: ModelConfig, ep: int, gpus_per_node: int) -> AllToAll:
    """Per token and MoE layer, for EP ranks packed `gpus_per_node` to a node."""
    nodes = -(-ep // gpus_per_node)
    k = cfg.num_experts_per_tok
    if nodes <= 1:
        return AllToAll(cfg.hidden_size, 0, k)
    # node limit M = topk_group holds when expert groups map onto nodes (n_group = EP nodes);
    # otherwise a token may reach up to min(k, nodes) nodes
    limit = cfg.topk_group if cfg.n_group == nodes else k
    return AllToAll(cfg.hidden_size, min(limit, nodes, k), k)


def decode_tpot_bound_s(
    gpu: GpuSpec,
    *,
    hidden: int,
    experts_per_token: int,
    layers: int,
    tokens_per_gpu: int = 32,
    microbatches: int = 2,
) -> float:
    """Decode step time bounded by the all-to-all alone (DeepSeek ISCA'25, section 4.2).

    Each GPU sends its `tokens_per_gpu` tokens to `experts_per_token` experts (the shared expert
    counted as a routed one every token picks), FP8 out and BF16 back, all over its scale-out NIC
    (wide EP puts nearly every expert on another node). Two micro-batches overlap computation with
    each other's communication, so the communication of both is serial per layer."""
    per_step = (DISPATCH_BYTES + COMBINE_BYTES) * tokens_per_gpu * experts_per_token * hidden
    return per_step / (gpu.nic_gbs * 1e9) * microbatches * layers


def decode_all_to_all_layers(cfg: ModelConfig, mtp: bool = True) -> int:
    """MoE layers one decode step runs: the main model's, plus the MTP modules' when speculative
    decoding drafts with them (DeepSeek's production setting)."""
    n = cfg.num_hidden_layers - cfg.first_k_dense_replace
    return n + (cfg.num_nextn_predict_layers if mtp else 0)
