"""The decoder block: attention then feed-forward, each behind a pre-norm and a residual. The main
model stacks them and each MTP module runs one (`transformer.py`, `mtp.py`).

Legend: B batch, S positions, D model width.
"""

from __future__ import annotations

from torch import nn

from moeray.platform.config import ModelConfig
from moeray.platform.model.mla import MLA, KVCache
from moeray.platform.model.moe import MLP, MoE
from moeray.platform.model.norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = (
            MoE(config)
            if config.is_moe_layer(layer_idx)
            else MLP(config.hidden_size, config.intermediate_size)
        )

    def forward(self, x_BSD, cos, sin, cache: KVCache | None = None, absorbed: bool | None = None):
        attn_BSD = self.self_attn(self.input_layernorm(x_BSD), cos, sin, cache, absorbed=absorbed)
        # x + attn and the norm after it: one kernel on the GPU (model/norm.py chooses)
        normed_BSD, x_BSD = self.post_attention_layernorm.add_forward(attn_BSD, x_BSD)
        return x_BSD + self.mlp(normed_BSD)
