"""KV rows that move from a prefill engine to a decode engine (prefill/decode disaggregation).

Legend: L cached layers, T tokens, C kv_lora_rank, R qk_rope_head_dim.

The prefill engine exports the latent rows of prompt tokens [start, P) right before it frees the
request's pages; the decode engine writes them into its own pages (it already holds tokens
[0, start) through its prefix cache) and continues with the first sampled token. Rows, not pages:
the two sides' page tables are unrelated, and the last page of a prompt is usually partial.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVRows:
    start: int  # first token position these rows hold
    kv_LTC: torch.Tensor
    pe_LTR: torch.Tensor

    def __post_init__(self) -> None:
        if self.kv_LTC.shape[:2] != self.pe_LTR.shape[:2]:
            raise ValueError(
                f"kv rows {tuple(self.kv_LTC.shape)} and rope rows {tuple(self.pe_LTR.shape)} "
                "disagree on layers/tokens"
            )
        if self.start < 0:
            raise ValueError(f"start={self.start} must be >= 0")

    @property
    def num_tokens(self) -> int:
        return self.kv_LTC.shape[1]

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def nbytes(self) -> int:
        return (
            self.kv_LTC.numel() * self.kv_LTC.element_size()
            + self.pe_LTR.numel() * self.pe_LTR.element_size()
        )

    def to(self, device: torch.device | str) -> KVRows:
        return KVRows(self.start, self.kv_LTC.to(device), self.pe_LTR.to(device))
