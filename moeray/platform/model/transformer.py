"""The DeepSeek-V3 decoder: embedding, dense then MoE decoder layers, final norm, head, MTP.

Legend: B batch, S positions, D model width, V vocabulary.

Module names mirror the HF checkpoint (`model.embed_tokens`, `model.layers.N.self_attn.q_a_proj`,
`model.layers.N.mlp.gate`, `lm_head`, ...), so `checkpoint.py` only renames the routed experts
(stacked here, per-expert there) and the MTP modules (`mtp.k` here, `model.layers.{L+k}` there).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from moeray.platform.config import ModelConfig
from moeray.platform.model.autocast import Embedding
from moeray.platform.model.block import DecoderLayer
from moeray.platform.model.linear import Linear
from moeray.platform.model.mla import DenseKVCache, KVCache
from moeray.platform.model.moe import MoE
from moeray.platform.model.mtp import MTPModule
from moeray.platform.model.norm import RMSNorm
from moeray.platform.model.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V]: position s predicts token s+1
    hidden: torch.Tensor  # [B, S, D]: final-normed hidden states (what the head and MTP read)
    # One per MTP depth k=1..: [B, S-k, V], position s predicts token s+1+k.
    mtp_logits: list[torch.Tensor] = field(default_factory=list)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(config, config.num_hidden_layers + k)
            for k in range(config.num_nextn_predict_layers)
        )
        # MTP depths a checkpoint's config.json declared without their weights: load_model then
        # builds the model without them, and speculative decoding names this as its cause.
        self.missing_mtp_layers = 0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zero biases."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        for m in self.modules():
            if isinstance(m, MoE):
                m.gate.e_score_correction_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        *,
        positions_BS: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_mtp: bool | None = None,
        absorbed: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> ModelOutput:
        """Logits for every position, for the last `logits_to_keep` ones when it is an int > 0, or
        for the positions it lists when it is a 1-D index tensor (as in transformers; on the
        device, a CUDA graph's static input). With `cache` the attention runs the absorbed path
        over the cached latents; positions then default to continuing the cache. MTP logits are
        computed without a cache unless `return_mtp=False`."""
        B, S = input_ids_BS.shape
        if positions_BS is None:
            start = getattr(cache, "seq_len", 0) if cache is not None else 0
            positions_BS = torch.arange(start, start + S, device=input_ids_BS.device).expand(B, S)
        cos, sin = self.model.rotary_emb(positions_BS)
        x_BSD = self.model.embed_tokens(input_ids_BS)
        delta_BSD = None  # each layer's last residual add, done inside the next norm
        for layer in self.model.layers:
            x_BSD, delta_BSD = layer(x_BSD, cos, sin, cache, absorbed, delta_BSD, defer=True)
        if delta_BSD is None:
            hidden_BSD = self.model.norm(x_BSD)
        else:
            hidden_BSD = self.model.norm.add_forward(delta_BSD, x_BSD)[0]
        out = ModelOutput(
            logits=self.lm_head(_kept_rows(hidden_BSD, logits_to_keep)), hidden=hidden_BSD
        )
        if return_mtp is None:
            return_mtp = cache is None
        if return_mtp:
            h_BSD = hidden_BSD
            for k, module in enumerate(cast(Iterable[MTPModule], self.mtp), start=1):
                if S - k < 1:
                    break
                h_BSD, logits = self.mtp_step(
                    module,
                    h_BSD[:, :-1],
                    input_ids_BS[:, k:],
                    positions_BS[:, : S - k],
                    absorbed=absorbed,
                )
                out.mtp_logits.append(logits)
        return out

    def mtp_step(
        self,
        module: MTPModule,
        hidden_BSD: torch.Tensor,
        next_ids_BS: torch.Tensor,
        positions_BS: torch.Tensor,
        cache: KVCache | None = None,
        absorbed: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP depth: hidden of position s and the token at s+k -> (hidden', logits for
        s+k+1), the logits of the rows `logits_to_keep` names as in `forward`."""
        cos, sin = self.model.rotary_emb(positions_BS)
        h_BSD = module(hidden_BSD, self.model.embed_tokens(next_ids_BS), cos, sin, cache, absorbed)
        return h_BSD, self.lm_head(module.shared_head.norm(_kept_rows(h_BSD, logits_to_keep)))


def _kept_rows(h_BSD: torch.Tensor, keep: int | torch.Tensor) -> torch.Tensor:
    """The rows the LM head runs on: all (keep 0), the last `keep` (an int), or the positions a
    1-D index tensor lists (as transformers' logits_to_keep)."""
    if isinstance(keep, torch.Tensor):
        return h_BSD[:, keep]
    return h_BSD[:, -keep:] if keep > 0 else h_BSD


@torch.no_grad()
def greedy_generate(
    model: Transformer,
    input_ids_BS: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Plain greedy decoding with a dense latent cache: prefill, then one token per step."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    B, S = input_ids_BS.shape
    param = next(model.parameters())
    cache = DenseKVCache(
        model.config.num_hidden_layers,
        B,
        S + max_new_tokens,
        model.config,
        dtype=param.dtype if param.is_floating_point() else torch.float32,
        device=input_ids_BS.device,
    )
    out_ids = input_ids_BS
    logits = model(input_ids_BS, cache=cache).logits[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids_BS.device)
    for _ in range(max_new_tokens):
        nxt = logits.argmax(-1)
        out_ids = torch.cat([out_ids, nxt[:, None]], dim=1)
        if eos_token_id is not None:
            done |= nxt == eos_token_id
            if bool(done.all()):
                break
        if out_ids.shape[1] == S + max_new_tokens:
            break
        logits = model(nxt[:, None], cache=cache).logits[:, -1]
    return out_ids
