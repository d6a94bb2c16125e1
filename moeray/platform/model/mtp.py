"""Multi-token prediction module (docs/deepseek-v3.md, "Multi-token prediction").

Depth k combines the previous depth's hidden state at position s with the embedding of token s+k:
  h' = eh_proj([enorm(Emb(t_{s+k})); hnorm(h_s)])  ->  one decoder block  ->  shared head.
The concatenation order (embedding first) is the one the official checkpoint was trained with
(vLLM and SGLang load it that way). The embedding and output head are the main model's; only
`shared_head.norm` is the module's own.
"""

from __future__ import annotations

import torch
from torch import nn

from moeray.platform.config import ModelConfig
from moeray.platform.model.block import DecoderLayer
from moeray.platform.model.linear import Linear
from moeray.platform.model.norm import RMSNorm


class SharedHead(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        D = config.hidden_size
        self.layer_idx = layer_idx
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = Linear(2 * D, D, bias=False)
        self.block = DecoderLayer(config, layer_idx)
        self.shared_head = SharedHead(config)

    def forward(self, hidden_BSD, emb_BSD, cos, sin, cache=None, absorbed=None) -> torch.Tensor:
        h_BSD = self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(hidden_BSD)], dim=-1))
        return self.block(h_BSD, cos, sin, cache, absorbed)
