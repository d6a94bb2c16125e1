"""Multi-head Latent Attention (MLA), with the expanded and the absorbed paths.

Legend: B batch, S new positions, T cached+new positions, H heads, D model width,
C kv_lora_rank (latent), R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, Q q_lora_rank.

Expanded path (prefill, training): up-project the latent to per-head keys and values, attend.
Absorbed path (decode): cache only the normalized latent c (C values) and the rotated rope key
(R values) per token; fold W_UK into the query (q_nope W_UK^T lives in latent space) and W_UV into
the output, so attention runs over C + R = 576 values per cached token (V3) instead of
H x (N + R + V) = 40,960 for the expanded keys and values.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moeray.kernels.head_gemv import head_matmul
from moeray.kernels.mla_prefill import mla_prefill_bshd, mla_prefill_supported
from moeray.platform.config import ModelConfig
from moeray.platform.model.linear import Linear, MergedLinear
from moeray.platform.model.norm import RMSNorm
from moeray.platform.model.quant import FP8Linear
from moeray.platform.model.rope import apply_rope


class KVCache(Protocol):
    """What the absorbed path needs from a latent cache (dense here, paged in the engine)."""

    def update(
        self, layer_idx: int, kv_BSC: torch.Tensor, pe_BSR: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the S new tokens' normalized latent kv_BSC and rotated rope key pe_BSR; return
        the whole context kv_BTC, pe_BTR and a bool mask_BST (True: query s may attend key t), or
        None for plain causal attention where the S new tokens are the last S of T."""
        ...

    # Optional: a cache with a fused kernel may also define
    #   attend(layer_idx, q_lat_BSHC, q_pe_BSHR, kv_BSC, pe_BSR, softmax_scale) -> o_lat_BSHC
    # which stores the new entries and returns softmax(q_lat.kv + q_pe.pe) @ kv over the context,
    # and with `takes_raw_latent = True` accept kv_norm=RMSNorm, cos=..., sin=... keywords, meaning
    # kv_BSC is not yet normed by kv_norm and pe_BSR, q_pe_BSHR not yet rotated by cos/sin (so the
    # norm, the rotations and the store can run as one kernel); with `folds_w_uk = True` as well
    # (raw-latent calls only) the query comes unabsorbed: q_nope [B, S, H, N] in q_lat's place
    # with w_uk_HNC=W_UK [H, N, C] and fresh_w (the cache absorbs it); with `folds_w_uv = True`
    # (raw-latent calls only) also w_uv_HCV=W_UV [H, C, V], fresh_w=bool (W_UV just made, as in
    # head_gemv), and then return o_BSHV = o_lat W_UV[h] per head in q_lat's dtype (so the
    # up-projection can run in the attention's last kernel).
    # And `expanded = True` asks for the expanded path over what `update` returns (long prefill
    # chunks, where up-projecting the context costs less than attending in the 512-wide latent
    # space with 128 heads); `update` may then return (kv_BSC, pe_BSR, None) when the S new tokens
    # are the whole context.


class DenseKVCache:
    """Contiguous latent cache for B sequences that advance together (demo, tests, oracle)."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        max_len: int,
        config: ModelConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.max_len = max_len
        self.kv_LBTC = torch.zeros(
            num_layers, batch, max_len, config.kv_lora_rank, dtype=dtype, device=device
        )
        self.pe_LBTR = torch.zeros(
            num_layers, batch, max_len, config.qk_rope_head_dim, dtype=dtype, device=device
        )
        self.lengths = [0] * num_layers

    @property
    def seq_len(self) -> int:
        """Tokens already cached (layer 0 is written first in every forward)."""
        return self.lengths[0]

    def update(self, layer_idx, kv_BSC, pe_BSR):
        start, S = self.lengths[layer_idx], kv_BSC.shape[1]
        if start + S > self.max_len:
            raise ValueError(
                f"cache holds {self.max_len} tokens; {start} cached + {S} new exceeds it"
            )
        self.kv_LBTC[layer_idx, :, start : start + S] = kv_BSC
        self.pe_LBTR[layer_idx, :, start : start + S] = pe_BSR
        self.lengths[layer_idx] = start + S
        return (
            self.kv_LBTC[layer_idx, :, : start + S],
            self.pe_LBTR[layer_idx, :, : start + S],
            None,
        )


# The official inference code (`RMSNorm(self.kv_lora_rank)`) and transformers build MLA's two
# LoRA norms with RMSNorm's default eps 1e-6, whatever rms_norm_eps says: Moonlight sets 1e-5,
# which its layer norms use and these do not (relative logit error 7e-5 when they did).
LORA_NORM_EPS = 1e-6


def causal_mask(S: int, T: int, device: torch.device) -> torch.Tensor:
    """[S, T] bool: the S queries are the last S of T positions."""
    q_pos = torch.arange(T - S, T, device=device)[:, None]
    return torch.arange(T, device=device)[None, :] <= q_pos


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.softmax_scale = config.softmax_scale
        D, H, bias = config.hidden_size, self.n_heads, config.attention_bias
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank is None:
            self.q_proj = Linear(D, H * qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(D, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = Linear(self.q_lora_rank, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, D, bias=bias)
        # Set for inference by model/merge.py: the first query projection (q_proj, or q_a_proj)
        # and kv_a_proj_with_mqa as one GEMM over their stacked rows (both read x).
        self.fused_qkv_a_proj: MergedLinear | None = None

    def _project_input(self, x_BSD):
        """The projections that read x: (query latent, the queries q_proj made or None, the kv
        projection [B, S, C + R]). The query latent is q_a_proj's output normed ([B, S, Q]), or x
        itself without a q LoRA; where the merged layer applies, one GEMM gives both halves and,
        without a q LoRA, the queries themselves."""
        fused = self.fused_qkv_a_proj
        if fused is not None and fused.applies(x_BSD):
            q_a, kv = fused(x_BSD)
            if self.q_lora_rank is None:
                return x_BSD, q_a, kv
            return self.q_a_layernorm(q_a), None, kv
        q_lat = x_BSD if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x_BSD))
        return q_lat, None, self.kv_a_proj_with_mqa(x_BSD)

    def _split_queries(self, q_lat, q=None):
        """Up-project the query latent to per-head queries: (q_nope [B,S,H,N], q_pe unrotated).
        `q`: q_proj's output [B, S, H * (N + R)] when the merged projection already made it."""
        B, S, _ = q_lat.shape
        if q is None:
            q = self.q_proj(q_lat) if self.q_lora_rank is None else self.q_b_proj(q_lat)
        q_BSHK = q.view(B, S, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope_BSHN, q_pe_BSHR = q_BSHK.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope_BSHN, q_pe_BSHR

    def _queries(self, q_lat, cos, sin, q=None):
        """(q_nope [B,S,H,N], rotated q_pe [B,S,H,R])."""
        q_nope_BSHN, q_pe_BSHR = self._split_queries(q_lat, q)
        return q_nope_BSHN, apply_rope(q_pe_BSHR, cos, sin)

    def _latent(self, kv, cos, sin):
        """The kv projection [B, S, C + R] -> (normed latent kv_BSC, rotated rope key pe_BSR)."""
        kv_BSC, pe_BSR = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        pe_BSR = apply_rope(pe_BSR.unsqueeze(2), cos, sin).squeeze(2)
        return self.kv_a_layernorm(kv_BSC), pe_BSR

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        *,
        absorbed: bool | None = None,
    ) -> torch.Tensor:
        """Attention over x (causal). With a cache the absorbed path runs over the cached latents,
        or the expanded one when the cache sets `expanded`; `absorbed=True` without a cache runs
        the absorbed math over x alone (for tests)."""
        B, S, _ = x_BSD.shape
        q_lat, q, kv = self._project_input(x_BSD)
        if getattr(cache, "takes_raw_latent", False) and not getattr(cache, "expanded", False):
            # The engine's paged view norms, rotates and stores the new latent itself, and with
            # `folds_w_uv` applies W_UV too (its kernel decides where).
            if getattr(cache, "folds_w_uv", False):
                return self._o_proj(self._attend_raw(cache, q_lat, q, kv, cos, sin, w_uv=True))
            return self._absorbed_out(self._attend_raw(cache, q_lat, q, kv, cos, sin))
        kv_BSC, pe_BSR = self._latent(kv, cos, sin)
        if cache is None and not absorbed:
            o_BSHV = self.expanded_attention(q_lat, kv_BSC, pe_BSR, cos, sin, q=q)
            return self.o_proj(o_BSHV.reshape(B, S, self.n_heads * self.v_dim))
        if cache is not None and getattr(cache, "expanded", False):
            kv_BTC, pe_BTR, mask = cache.update(self.layer_idx, kv_BSC, pe_BSR)
            dt = kv_BSC.dtype
            o_BSHV = self.expanded_attention(
                q_lat, kv_BTC.to(dt), pe_BTR.to(dt), cos, sin, mask, q=q
            )
            return self.o_proj(o_BSHV.reshape(B, S, self.n_heads * self.v_dim))
        q_nope, q_pe = self._queries(q_lat, cos, sin, q)
        q_lat_BSHC = self._absorb_query(q_nope)
        if cache is not None and hasattr(cache, "attend"):
            # A paged cache with a kernel attends over its pages itself (engine/paged_view.py).
            o_lat_BSHC = cache.attend(
                self.layer_idx, q_lat_BSHC, q_pe, kv_BSC, pe_BSR, self.softmax_scale
            )
        else:
            if cache is not None:
                kv_BTC, pe_BTR, mask = cache.update(self.layer_idx, kv_BSC, pe_BSR)
            else:
                kv_BTC, pe_BTR, mask = kv_BSC, pe_BSR, None
            o_lat_BSHC = self._absorbed_core(
                q_lat_BSHC, q_pe, kv_BTC.to(q_nope.dtype), pe_BTR.to(q_nope.dtype), mask
            )
        return self._absorbed_out(o_lat_BSHC)

    def _attend_raw(self, cache, q_lat, q, kv, cos, sin, *, w_uv=False):
        """The absorbed path through a cache that `takes_raw_latent` (see KVCache): the latent
        projection and the query as their GEMMs leave them, the norm and rotations to the cache.
        -> o_lat_BSHC, or with `w_uv` (a cache that `folds_w_uv`) o_BSHV with W_UV applied. A
        cache that `folds_w_uk` gets q_nope and W_UK, and absorbs the query itself."""
        kv_BSC, pe_BSR = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        q_nope, q_pe = self._split_queries(q_lat, q)
        w_kw: dict = {}
        if getattr(cache, "folds_w_uk", False):  # the cache absorbs the query (q_nope W_UK)
            w_HKC, fresh_uk = self._w_HKC(q_nope.dtype)
            q_in = q_nope
            w_kw = {"w_uk_HNC": w_HKC[:, : self.nope_dim], "fresh_w": fresh_uk}
        else:
            q_in = self._absorb_query(q_nope)
        if w_uv:
            w_uv_HCV, fresh_uv = self._w_uv(q_nope.dtype)
            w_kw |= {"w_uv_HCV": w_uv_HCV, "fresh_w": w_kw.get("fresh_w", False) or fresh_uv}
        return cache.attend(
            self.layer_idx,
            q_in,
            q_pe,
            kv_BSC,
            pe_BSR,
            self.softmax_scale,
            kv_norm=self.kv_a_layernorm,
            cos=cos,
            sin=sin,
            **w_kw,
        )

    def expanded_attention(self, q_lat, kv_BTC, pe_BTR, cos, sin, mask_BST=None, *, q=None):
        """From the latents to the attention output o [B, S, H, V]: the q and kv up-projections
        (q_b_proj, kv_b_proj) and attention over the per-head keys and values they make, for S
        queries that are the last S of the T context positions (causal), or that see what
        `mask_BST` says; `q` as in `_split_queries`. One method so that training can recompute
        it in the backward from the latents alone (train/replica.parallelize, `recompute:
        [mla_up]`)."""
        q_nope_BSHN, q_pe_BSHR = self._queries(q_lat, cos, sin, q)
        B, S, H, _ = q_nope_BSHN.shape
        T = kv_BTC.shape[1]
        kv = self.kv_b_proj(kv_BTC).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope_BTHN, v_BTHV = kv.split([self.nope_dim, self.v_dim], dim=-1)
        if mask_BST is None and S == T and q_nope_BSHN.is_cuda:
            # Inference on a GPU: the Triton MLA prefill kernel reads the split heads directly
            # (1.02-1.74x concat+SDPA on an H100, benchmarks/notes-kernels.md); training keeps SDPA.
            if mla_prefill_supported(q_nope_BSHN, q_pe_BSHR, k_nope_BTHN, pe_BTR, v_BTHV):
                return mla_prefill_bshd(
                    q_nope_BSHN, q_pe_BSHR, k_nope_BTHN, pe_BTR, v_BTHV, self.softmax_scale
                )
        q_BHSK = torch.cat([q_nope_BSHN, q_pe_BSHR], dim=-1).transpose(1, 2)
        k_BHTK = torch.cat(
            [k_nope_BTHN, pe_BTR[:, :, None, :].expand(B, T, H, self.rope_dim)], -1
        ).transpose(1, 2)
        v_BHTV = v_BTHV.transpose(1, 2)
        if mask_BST is None and S == T:
            o_BHSV = F.scaled_dot_product_attention(
                q_BHSK, k_BHTK, v_BHTV, is_causal=True, scale=self.softmax_scale
            )
        else:
            if mask_BST is None:
                mask_BST = causal_mask(S, T, kv_BTC.device)[None]
            o_BHSV = F.scaled_dot_product_attention(
                q_BHSK, k_BHTK, v_BHTV, attn_mask=mask_BST[:, None], scale=self.softmax_scale
            )
        return o_BHSV.transpose(1, 2)

    def _w_HKC(self, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        """kv_b_proj's weight as [H, N + V, C] in `dtype`, and whether it was made by this call
        (a cast, or the FP8 copy's first dequantization: a kernel just before the one reading it,
        so head_gemv must not prefetch it before its PDL wait). Kept in FP8
        (load_model(keep_fp8=True)) it is dequantized once and cached: V3's 32768 x 512 matrix is
        32 MiB per layer in bf16, 2 GiB over 61 layers (vLLM keeps the same), where dequantizing
        it at every decode step would read and write it all per layer and step."""
        proj = self.kv_b_proj
        if isinstance(proj, FP8Linear):
            fresh = not proj.dequantized_kept(dtype)
            w = proj.dequantized_weight(dtype)
        else:
            w = proj.weight.to(dtype)
            fresh = w is not proj.weight
        return w.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank), fresh

    def _absorb_query(self, q_nope_BSHN: torch.Tensor) -> torch.Tensor:
        """q_nope W_UK^T: the queries in latent space [B, S, H, C] (one head_gemv launch at
        decode rows, kernels/head_gemv.py)."""
        w_HKC, fresh = self._w_HKC(q_nope_BSHN.dtype)
        w_uk_HNC = w_HKC[:, : self.nope_dim]
        return head_matmul(q_nope_BSHN, w_uk_HNC, fresh_w=fresh)

    def _absorbed_core(self, q_lat_BSHC, q_pe_BSHR, kv_BTC, pe_BTR, mask_BST):
        """softmax(q_lat.kv + q_pe.pe) @ kv in latent space: [B, S, H, C]."""
        S = q_lat_BSHC.shape[1]
        scores_BSHT = (
            torch.einsum("bshc,btc->bsht", q_lat_BSHC, kv_BTC)
            + torch.einsum("bshr,btr->bsht", q_pe_BSHR, pe_BTR)
        ).float() * self.softmax_scale
        if mask_BST is None:
            mask_BST = causal_mask(S, kv_BTC.shape[1], kv_BTC.device)[None]
        scores_BSHT = scores_BSHT.masked_fill(~mask_BST[:, :, None, :], float("-inf"))
        probs_BSHT = scores_BSHT.softmax(dim=-1).to(kv_BTC.dtype)
        return torch.einsum("bsht,btc->bshc", probs_BSHT, kv_BTC)

    def _w_uv(self, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        """W_UV as the [H, C, V] view of `_w_HKC`'s weight (C contiguous), and its `fresh`."""
        w_HKC, fresh = self._w_HKC(dtype)
        return w_HKC[:, self.nope_dim :].transpose(1, 2), fresh

    def _o_proj(self, o_BSHV):
        B, S, H, V = o_BSHV.shape
        return self.o_proj(o_BSHV.reshape(B, S, H * V))

    def _absorbed_out(self, o_lat_BSHC):
        w_uv_HCV, fresh = self._w_uv(o_lat_BSHC.dtype)  # contract over C (contiguous)
        return self._o_proj(head_matmul(o_lat_BSHC, w_uv_HCV, fresh_w=fresh))
