"""Parameter counts of a DeepSeek-V3-architecture model, part by part, from its config's shapes.

The totals equal `ModelConfig.num_parameters` (tests check it); the parts are what the memory
model places on pipeline stages and expert-parallel ranks: the embedding on the first stage, the
output head, final norm and MTP module on the last, routed experts split over EP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeray.platform.config import ModelConfig


@dataclass(frozen=True)
class Params:
    """Parameter counts; `*_layer` fields are for one decoder block."""

    embedding: int
    head: int
    final_norm: int
    attention_layer: int  # MLA projections and norms (ModelConfig.attention_parameters)
    dense_mlp_layer: int  # one dense FFN (the first `first_k_dense_replace` blocks)
    expert: int  # one routed or shared expert (gate, up and down projections)
    gate_layer: int  # the router's weight
    n_dense: int
    n_moe: int
    n_routed: int
    n_shared: int
    top_k: int
    mtp_depth: int
    mtp_extra: int  # per MTP module beyond its decoder block: eh_proj and three norms

    @classmethod
    def of(cls, cfg: ModelConfig) -> Params:
        D = cfg.hidden_size
        return cls(
            embedding=cfg.vocab_size * D,
            head=cfg.vocab_size * D,
            final_norm=D,
            attention_layer=cfg.attention_parameters,
            dense_mlp_layer=3 * D * cfg.intermediate_size,
            expert=3 * D * cfg.moe_intermediate_size,
            gate_layer=cfg.n_routed_experts * D,
            n_dense=cfg.first_k_dense_replace,
            n_moe=cfg.num_hidden_layers - cfg.first_k_dense_replace,
            n_routed=cfg.n_routed_experts,
            n_shared=cfg.n_shared_experts,
            top_k=cfg.num_experts_per_tok,
            mtp_depth=cfg.num_nextn_predict_layers,
            mtp_extra=2 * D * D + 3 * D,
        )

    # ---- one block: (routed-expert parameters, everything else) --------------------------------
    @property
    def dense_block(self) -> tuple[int, int]:
        return 0, self.attention_layer + self.dense_mlp_layer

    @property
    def moe_block(self) -> tuple[int, int]:
        other = self.attention_layer + self.n_shared * self.expert + self.gate_layer
        return self.n_routed * self.expert, other

    @property
    def mtp_module(self) -> tuple[int, int]:
        """One MTP module: a MoE block plus eh_proj and norms; it shares embedding and head."""
        routed, other = self.moe_block
        return routed, other + self.mtp_extra

    # ---- totals ---------------------------------------------------------------------------------
    @property
    def layers(self) -> int:
        return self.n_dense * sum(self.dense_block) + self.n_moe * sum(self.moe_block)

    @property
    def total(self) -> int:
        """The main model: embedding, blocks, final norm and head (MTP not included)."""
        return self.embedding + self.layers + self.final_norm + self.head

    @property
    def idle_routed(self) -> int:
        """Routed-expert parameters a token does not use in the main model."""
        return self.n_moe * (self.n_routed - self.top_k) * self.expert

    @property
    def activated(self) -> int:
        """Parameters one token uses in the main model (embedding row and head included)."""
        return self.total - self.idle_routed

    @property
    def mtp(self) -> int:
        return self.mtp_depth * sum(self.mtp_module)

    @property
    def mtp_activated(self) -> int:
        return self.mtp - self.mtp_depth * (self.n_routed - self.top_k) * self.expert

    @property
    def routed_total(self) -> int:
        return (self.n_moe + self.mtp_depth) * self.n_routed * self.expert

    def as_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "activated": self.activated,
            "embedding": self.embedding,
            "head": self.head,
            "mtp": self.mtp,
            "mtp_activated": self.mtp_activated,
            "routed_experts": self.routed_total,
            "total_with_mtp": self.total + self.mtp,
        }
