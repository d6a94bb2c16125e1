"""The KVCache views of one forward over the paged latent cache (the model's KVCache protocol,
`moeray.platform.model.mla`), built by the runner (`runner.py`, whose docstring says how forwards
are grouped and padded).

Legend: B sequences in a forward, S new tokens per sequence, T context tokens (cached + new),
M pages per sequence (block table width), N tokens per page, C kv_lora_rank, R rope dims,
H heads.

  * GatherPagedView (CPU, and GPU fallback): `update` writes the new latents into their slots and
    gathers each sequence's context into padded [B, T, C] / [B, T, R] with a mask_BST.
  * KernelPagedView (GPU): also offers `attend`, which writes the new latents and runs
    `moeray.kernels.mla_decode.mla_decode_multi` straight over the pages (no gather); MLA hands it
    the raw latent (`takes_raw_latent`), so the latent's norm, the rotations, the slot writes and
    the query pack run as one launch (`moeray.kernels.mla_write`); its W_UK (`folds_w_uk`), so the
    query's absorption may run in that launch too (`moeray.kernels.mla_write_absorb`); and its
    W_UV (`folds_w_uv`), so the value up-projection may run in the attention's merge launch.
"""

from __future__ import annotations

import torch

from moeray.kernels.common import switched_off
from moeray.kernels.head_gemv import head_matmul
from moeray.kernels.mla_decode import mla_decode_multi
from moeray.kernels.mla_write import mla_write_pack, mla_write_pack_applies
from moeray.kernels.mla_write_absorb import mla_write_absorb
from moeray.kernels.paged_positions import (
    PagedPositions,
    paged_positions,
    paged_positions_ref,
    slots_ref,
)
from moeray.platform.engine.kv_cache import PagedKVStorage
from moeray.platform.model.norm import RMSNorm, use_fused_norm
from moeray.platform.model.rope import apply_rope, use_fused_rope


class GatherPagedView:
    """KVCache over the pages for one forward of B sequences with S new tokens each. `expanded`
    asks the model's MLA for its expanded path (see ModelRunner); `fresh` says every row starts at
    position 0, so that path attends over the new latents as they are, without a gather."""

    def __init__(
        self,
        storage: PagedKVStorage,
        block_table_BM: torch.Tensor,
        starts_B: torch.Tensor,
        S: int,
        *,
        expanded: bool = False,
        fresh: bool = False,
    ) -> None:
        self.storage = storage
        self.expanded = expanded
        self.fresh = fresh
        self.N = storage.shape.page_size
        self.block_table_BM = block_table_BM
        self.starts_B = starts_B
        self.S = S
        # positions [B, S], lengths (int64, and int32 for the MLA kernel), the new tokens' slots
        p = self._positions(block_table_BM, starts_B, S)
        self.positions_BS, self.seq_lens_B, self.seq_lens_i32_B, self.new_slots = p
        self._ctx = None  # (slots_BT, mask_BST), built on the first update and shared by all layers
        self.calls = {"update": 0, "attend": 0, "expanded": 0}

    def _positions(
        self, block_table_BM: torch.Tensor, starts_B: torch.Tensor, S: int
    ) -> PagedPositions:
        """The new tokens' positions, the lengths and the new tokens' slots, by PyTorch ops."""
        return paged_positions_ref(block_table_BM, starts_B, S, self.N)

    def _write(self, layer_idx: int, kv_BSC: torch.Tensor, pe_BSR: torch.Tensor) -> None:
        C, R = kv_BSC.shape[-1], pe_BSR.shape[-1]
        self.storage.write(layer_idx, self.new_slots, kv_BSC.reshape(-1, C), pe_BSR.reshape(-1, R))

    def _context(self):
        if self._ctx is None:
            T = int(self.seq_lens_B.max())
            dev = self.block_table_BM.device
            t_T = torch.arange(T, device=dev)
            # Positions past a row's end read its last position again; the mask hides them.
            t_BT = torch.minimum(t_T[None, :], (self.seq_lens_B - 1)[:, None])
            slots_BT = slots_ref(self.block_table_BM, t_BT, self.N)
            mask_BST = t_T[None, None, :] <= self.positions_BS[:, :, None]
            self._ctx = (slots_BT, mask_BST)
        return self._ctx

    def update(self, layer_idx: int, kv_BSC: torch.Tensor, pe_BSR: torch.Tensor):
        self.calls["update"] += 1
        self.calls["expanded"] += self.expanded  # the MLA runs its expanded path over the result
        self._write(layer_idx, kv_BSC, pe_BSR)
        if self.fresh and self.expanded:
            # The S new tokens are each row's whole context. (Kept to the expanded path: the
            # absorbed one reads back the stored, possibly FP8-rounded, latents as before.)
            return kv_BSC, pe_BSR, None
        slots_BT, mask_BST = self._context()
        kv_BTC, pe_BTR = self.storage.read(layer_idx, slots_BT)
        return kv_BTC.to(kv_BSC.dtype), pe_BTR.to(pe_BSR.dtype), mask_BST


class KernelPagedView(GatherPagedView):
    """GPU view: `attend` runs the paged MLA kernel over the pages."""

    def _positions(
        self, block_table_BM: torch.Tensor, starts_B: torch.Tensor, S: int
    ) -> PagedPositions:
        """In one launch (kernels/paged_positions.py says why), or as the gather view with
        MOERAY_FUSED_PAGED_POSITIONS=0 (the A/B switch): the same values."""
        if switched_off("PAGED_POSITIONS"):
            return super()._positions(block_table_BM, starts_B, S)
        return paged_positions(block_table_BM, starts_B, S, self.N)

    # MLA may hand `attend` its latent before the norm and the rope parts before the rotation.
    takes_raw_latent = True
    # its W_UK (`w_uk_HNC`) with the query before absorption,
    folds_w_uk = True
    # and its W_UV (`w_uv_HCV`), to get the value output back instead of the latent
    folds_w_uv = True

    def attend(
        self,
        layer_idx: int,
        q_lat_BSHC: torch.Tensor,
        q_pe_BSHR: torch.Tensor,
        kv_BSC: torch.Tensor,
        pe_BSR: torch.Tensor,
        softmax_scale: float,
        *,
        kv_norm: RMSNorm | None = None,
        cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None,
        w_uk_HNC: torch.Tensor | None = None,
        w_uv_HCV: torch.Tensor | None = None,
        fresh_w: bool = False,
    ) -> torch.Tensor:
        """Store the new tokens' latent kv_BSC and rope key pe_BSR, then return the absorbed
        attention output o_lat_BSHC = softmax(q_lat.kv + q_pe.pe) @ kv over each sequence's cached
        context (query s sees positions <= start + s), in q_lat's dtype; the caller applies W_UV
        and o_proj. Given MLA's W_UK as w_uk_HNC [H, N, C], q_lat_BSHC is the query before its
        absorption, q_nope [B, S, H, N], and the view absorbs it (q_nope W_UK[h] per head: in the
        write launch where `mla_write_absorb` chooses to, else `head_matmul`). Given MLA's W_UV as
        w_uv_HCV [H, C, V] in q_lat's dtype, the value output o_BSHV = o_lat W_UV[h] per head
        instead (`mla_decode_multi`'s w_out: its merge launch applies it where it chooses to), and
        the caller applies o_proj. `fresh_w`: either weight is a copy just made (as in head_gemv).
        With kv_norm, cos and sin (the MLA's kv_a_layernorm and rope angles), kv_BSC is not yet
        normed and pe_BSR, q_pe_BSHR not yet rotated: where the model would run its fused norm and
        RoPE kernels anyway (model/norm.py, model/rope.py choose), the norm, both rotations, the
        slot writes and the query pack are one launch (6 before); else they run one by one."""
        self.calls["attend"] += 1
        cache_PNK = self.storage.kv_LPNK[layer_idx]
        tensors = (cache_PNK, kv_BSC, pe_BSR, q_lat_BSHC, q_pe_BSHR)
        norm, rope = None, None
        if kv_norm is not None and cos is not None and sin is not None:
            norm, rope = (kv_norm.weight, kv_norm.eps), (cos, sin)
            fused = use_fused_norm(kv_BSC, kv_norm.weight) and use_fused_rope(q_pe_BSHR, cos, sin)
            if not (fused and mla_write_pack_applies(*tensors, norm=norm, rope=rope)):
                kv_BSC, norm = kv_norm(kv_BSC), None
                pe_BSR, rope = apply_rope(pe_BSR.unsqueeze(2), cos, sin).squeeze(2), None
                q_pe_BSHR = apply_rope(q_pe_BSHR, cos, sin)
                tensors = (cache_PNK, kv_BSC, pe_BSR, q_lat_BSHC, q_pe_BSHR)
        if w_uk_HNC is not None and mla_write_pack_applies(*tensors, norm=norm, rope=rope):
            # q_lat_BSHC is q_nope: mla_write_absorb absorbs it in the write launch where
            # `mla_write_absorb_applies`, else by head_matmul before mla_write_pack's launch.
            q_BSHK = mla_write_absorb(
                cache_PNK,
                self.new_slots,
                *tensors[1:3],
                q_lat_BSHC,
                w_uk_HNC,
                q_pe_BSHR,
                norm=norm,
                rope=rope,
                fresh_w=fresh_w,
            )
        elif w_uk_HNC is None and mla_write_pack_applies(*tensors, norm=norm, rope=rope):
            q_BSHK = mla_write_pack(cache_PNK, self.new_slots, *tensors[1:], norm=norm, rope=rope)
        else:  # no write kernel here (an FP8 cache, CPU): the writes and the query one by one
            if w_uk_HNC is not None:  # q_lat_BSHC is q_nope
                q_lat_BSHC = head_matmul(q_lat_BSHC, w_uk_HNC, fresh_w=fresh_w)
            self._write(layer_idx, kv_BSC, pe_BSR)
            q_BSHK = torch.cat([q_lat_BSHC, q_pe_BSHR], dim=-1).to(self.storage.dtype)
        # The kernel's output is in the cache's dtype; W_UV goes in only where that is q_lat's
        # (the engine's cache is in the model's dtype), else the model's product after the cast.
        fold = w_uv_HCV is not None and q_BSHK.dtype == q_lat_BSHC.dtype
        out = mla_decode_multi(
            q_BSHK,
            cache_PNK,
            self.block_table_BM,
            self.seq_lens_i32_B,
            softmax_scale,
            kv_lora_rank=self.storage.shape.kv_lora_rank,
            w_out=w_uv_HCV if fold else None,
            fresh_w=fresh_w,
        ).to(q_lat_BSHC.dtype)
        if w_uv_HCV is not None and not fold:
            out = head_matmul(out, w_uv_HCV, fresh_w=fresh_w)
        return out
