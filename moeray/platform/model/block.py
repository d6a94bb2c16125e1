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

    def forward(
        self,
        x_BSD,
        cos,
        sin,
        cache: KVCache | None = None,
        absorbed: bool | None = None,
        delta_BSD=None,
        *,
        defer: bool = False,
    ):
        """x + attn + mlp, the layer's output. `delta_BSD`: the input is x + delta, an add the
        previous layer left undone; `defer=True` returns (x + attn, mlp) and leaves this layer's
        last add to the next norm. Each such add then runs inside that norm's kernel on the GPU
        (model/norm.py), one launch fewer per layer; the sums are the same either way."""
        if delta_BSD is None:
            normed_BSD = self.input_layernorm(x_BSD)
        else:
            normed_BSD, x_BSD = self.input_layernorm.add_forward(delta_BSD, x_BSD)
        attn_BSD = self.self_attn(normed_BSD, cos, sin, cache, absorbed=absorbed)
        folded = self._norm_logits(attn_BSD, x_BSD)
        if folded is None:
            normed_BSD, x_BSD = self.post_attention_layernorm.add_forward(attn_BSD, x_BSD)
            mlp_BSD = self.mlp(normed_BSD)
        else:
            logits_TE, normed_TD, x_TD = folded
            assert isinstance(self.mlp, MoE)  # as `_norm_logits` checked
            mlp_BSD = self.mlp.forward_with_logits(normed_TD.view_as(x_BSD), logits_TE)
            x_BSD = x_TD.view_as(x_BSD)
        return (x_BSD, mlp_BSD) if defer else x_BSD + mlp_BSD

    def _norm_logits(self, attn_BSD, x_BSD):
        """The post-attention add and norm with the router's logits of the normed rows, one
        launch at decode rows (`Gate.norm_logits`: (logits, normed, sum) or None). A plain MoE
        only: the expert-parallel and placed subclasses route in forwards of their own."""
        if type(self.mlp) is not MoE:
            return None
        D = x_BSD.shape[-1]
        return self.mlp.gate.norm_logits(
            self.post_attention_layernorm, attn_BSD.reshape(-1, D), x_BSD.reshape(-1, D)
        )
