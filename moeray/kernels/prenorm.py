"""An RMSNorm (with the residual add before it) computed in a decode GEMV's prologue: `PreNorm`,
what the caller hands the GEMV in place of the normed rows, and the jit helpers the GEMV kernels
(`gemv.norm_gemv`, `fp8.gemv.norm_fp8_gemv`) call.

Legend: BM rows of a program, BK features a step, K the rows' width (the norm's and the GEMV's).

Why: a decode step runs the layer's input norm as a launch of its own (one program a row, ~2.5
us on an H100 at K = 2,048, the PDL wait, two L2 reads, a reduction and two writes, all on the
step's chain of dependent launches) just to hand the merged q / kv_a GEMV its input. Folded, each
GEMV program reads the row (x and the residual, 8 KB at Moonlight) after its PDL wait, sums the
squares, and scales the features of each of its K steps as it loads them; the programs of the
first N tile and K split also store h = x + residual for the rest of the layer. The weights,
read before the wait, overlap all of it.

Numerics: `norm.rms_norm`'s formula (h rounded once to the rows' dtype, rstd in fp32, the normed
row rounded, times the weight, rounded), so the GEMV sees `rms_norm`'s output up to the fp32 order
of the sum of squares.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from moeray.kernels.common import check_tensor, to_dtype_rn
from moeray.kernels.norm import rms_norm_ref

DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class PreNorm:
    """The norm a GEMV applies to its input rows x [M, K]: weight * normalize(x + residual)."""

    weight: torch.Tensor  # [K], the rows' dtype
    eps: float
    residual: torch.Tensor | None = None  # [M, K] like x, or None (no add)

    def check(self, x: torch.Tensor) -> None:
        """ValueError naming what does not fit x [M, K] (bf16 / fp16, unit stride over K)."""
        check_tensor(x, "x", dtypes=DTYPES, ndim=2)
        check_tensor(self.weight, "norm weight", dtypes=(x.dtype,), ndim=1, device=x.device)
        if self.weight.shape != (x.shape[1],):
            raise ValueError(
                f"norm weight has shape {tuple(self.weight.shape)}; expected [{x.shape[1]}]"
            )
        r = self.residual
        if r is not None:
            check_tensor(r, "residual", dtypes=(x.dtype,), ndim=2, device=x.device)
            if r.shape != x.shape:
                raise ValueError(f"residual has shape {tuple(r.shape)}; expected {tuple(x.shape)}")
        for name, t in (("x", x), ("norm weight", self.weight), ("residual", r)):
            if t is not None and t.stride(-1) != 1:
                raise ValueError(f"{name} has stride {t.stride(-1)} over K: needs 1")

    def fits(self, x: torch.Tensor) -> bool:
        """Whether `check` passes (the dispatch tests of the GEMVs)."""
        try:
            self.check(x)
        except ValueError:
            return False
        return True

    def ref(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the normed rows, h = x + residual): `rms_norm_ref`."""
        return rms_norm_ref(x, self.weight, self.eps, self.residual)

    def flat(self) -> PreNorm:
        """This norm with its residual's leading dims flattened to rows ([..., K] -> [M, K])."""
        r = self.residual
        return self if r is None else replace(self, residual=r.reshape(-1, r.shape[-1]))

    def sum_buffer(self, x: torch.Tensor) -> torch.Tensor:
        """Where the kernel stores h: a new tensor with a residual (other programs still read x
        while the first ones write), x itself without one."""
        return x if self.residual is None else torch.empty_like(x)


@triton.jit
def prenorm_rstd(x_rows, r_rows, h_rows, K, eps, write, HAS_RES: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: skip
    """1 / sqrt(mean(h^2) + eps) [BM] of the rows whose first features x_rows / r_rows / h_rows
    ([BM, 1] pointers, unit stride over K) point at, h = x (+ r) rounded to x's dtype; stores h
    at h_rows where `write` ([BM, 1] or scalar) holds."""
    cols = tl.arange(0, BLOCK)[None, :]
    sq = tl.zeros(cols.shape, dtype=tl.float32) + tl.zeros(x_rows.shape, dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        ok = k0 + cols < K
        h = tl.load(x_rows + k0 + cols, mask=ok, other=0.0)
        if HAS_RES:
            r = tl.load(r_rows + k0 + cols, mask=ok, other=0.0)
            h = to_dtype_rn(h.to(tl.float32) + r.to(tl.float32), h.dtype)
            # (!= 0: the interpreter stores under bool masks only, which this & may not give)
            tl.store(h_rows + k0 + cols, h, mask=(ok & write) != 0)
        hf = h.to(tl.float32)
        sq += hf * hf
    return 1.0 / tl.sqrt(tl.sum(sq, axis=1) / K + eps)


@triton.jit
def prenorm_values(x_rows, r_rows, nw_ptr, cols, ok, rstd, HAS_RES: tl.constexpr):
    """The normed rows at features `cols` (any shape broadcasting against the row pointers and
    rstd; 0 where not `ok`): weight * (h * rstd rounded to h's dtype), rounded."""
    h = tl.load(x_rows + cols, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(r_rows + cols, mask=ok, other=0.0)
        h = to_dtype_rn(h.to(tl.float32) + r.to(tl.float32), h.dtype)
    nw = tl.load(nw_ptr + cols, mask=ok, other=0.0)
    normed = to_dtype_rn(h.to(tl.float32) * rstd, h.dtype)
    return to_dtype_rn(normed.to(tl.float32) * nw.to(tl.float32), h.dtype)


def prenorm_block(k: int) -> int:
    """The prologue's features a step: the whole row up to 2,048 (one read), else 2,048."""
    return min(2048, triton.next_power_of_2(max(k, 16)))
