"""The Triton block-scaled GEMM's tile variants (one-FMA row scale, split-M, per-column b scales)
against the fp32 reference under the interpreter, and the split-M choice against the H200 sweep."""

import pytest
import torch

from moeray.kernels import fp8
from moeray.kernels.fp8.gemm import _split_m_wins


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output: unwritten tile or bad scale"
    return ((out - ref).norm() / ref.norm()).item()


def _cfg(block_m: int, block_n: int, split_m: bool) -> dict:
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=128,
        GROUP_M=2,
        SPLIT_M=split_m,
        num_warps=4,
        num_stages=1,
    )


def _block_scaled(m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # Row magnitudes over 3 decades and a distinct magnitude per 128-row block of w: a row scale
    # or block scale read from the wrong place changes the result far beyond the tolerance.
    x = torch.randn(m, k, generator=g) * torch.logspace(-1, 2, m).reshape(-1, 1)
    blk = torch.rand(-(-n // 128), 1, generator=g).mul(30).add(0.1).repeat_interleave(128, 0)[:n]
    w = torch.randn(n, k, generator=g) * blk
    xq, xs = fp8.act_quant(x, scale_col_major=True)
    wq, ws = fp8.weight_quant(w)
    return xq, xs, wq, ws


# (m, n, k): ragged M inside the second half of a split tile (m=50 with BLOCK_M=32 leaves rows
# 32..49 in half 1 of tile 1), N with a partial 128-column scale block (n=200), ragged K (k=300:
# 2 full K blocks + 44), and exact multiples.
SHAPES = [(50, 200, 300), (64, 256, 384), (17, 130, 128)]


@pytest.mark.parametrize("mnk", SHAPES)
@pytest.mark.parametrize(
    "block_m,block_n,split_m", [(32, 32, True), (16, 32, False), (32, 64, True), (16, 256, False)]
)
def test_gemm_variants_block_scaled(mnk, block_m, block_n, split_m):
    m, n, k = mnk
    xq, xs, wq, ws = _block_scaled(m, n, k, seed=m + n + k)
    ref = fp8.fp8_gemm_ref(xq, xs, wq, ws)
    out = fp8.fp8_gemm_triton(xq, xs, wq, ws, config=_cfg(block_m, block_n, split_m))
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    # bf16 output rounding alone is ~2e-3 relative; a wrong scale or missed K tail is >> 1e-2.
    assert _rel(out, ref) < 8e-3


def test_split_m_strided_b_and_per_row_b_scales():
    # dgrad's triton path passes W^T as a strided view; wgrad's b has one scale per row and 128
    # K columns (1x128): both through the split-M tile with a ragged reduction length (m=200
    # tokens).
    m, n, k = 200, 96, 160
    g = torch.Generator().manual_seed(3)
    x, dy = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g) * 3
    dyt, dyts = fp8.act_quant_t(dy)  # [N, M], [N, MB]
    xt, xts = fp8.act_quant_t(x)  # [K, M], [K, MB]
    ref = fp8.fp8_gemm_ref(dyt, dyts, xt, xts)
    split = fp8.fp8_gemm_triton(dyt, dyts, xt, xts, config=_cfg(32, 32, True))
    assert _rel(split, ref) < 8e-3
    assert _rel(split, fp8.fp8_gemm_triton(dyt, dyts, xt, xts, config=_cfg(16, 32, False))) < 1e-6
    xq, xs, wq, ws = _block_scaled(40, 256, 384, seed=5)
    wt = wq.t().contiguous().t()  # [N, K] with strides (1, N)
    dense = fp8.fp8_gemm_triton(xq, xs, wq, ws, config=_cfg(32, 64, True))
    assert _rel(fp8.fp8_gemm_triton(xq, xs, wt, ws, config=_cfg(32, 64, True)), dense) < 1e-6


def test_config_errors():
    xq, xs, wq, ws = _block_scaled(8, 128, 128, seed=1)
    with pytest.raises(ValueError, match="SPLIT_M needs BLOCK_M >= 32"):
        fp8.fp8_gemm_triton(xq, xs, wq, ws, config=_cfg(16, 32, True))
    with pytest.raises(ValueError, match="BLOCK_K=64"):
        fp8.fp8_gemm_triton(xq, xs, wq, ws, config={**_cfg(16, 32, False), "BLOCK_K": 64})
    with pytest.raises(ValueError, match="BLOCK_N=96"):
        fp8.fp8_gemm_triton(xq, xs, wq, ws, config=_cfg(16, 96, False))
    no_stages = {k: v for k, v in _cfg(16, 32, False).items() if k != "num_stages"}
    with pytest.raises(ValueError, match=r"need .*num_stages"):
        fp8.fp8_gemm_triton(xq, xs, wq, ws, config=no_stages)
    with pytest.raises(ValueError, match="BLOCK_SIZE_M"):
        fp8.fp8_gemm_triton(xq, xs, wq, ws, config={**_cfg(16, 32, False), "BLOCK_SIZE_M": 64})


@pytest.mark.parametrize(
    "n,k,split_faster_or_tied",
    [(2112, 7168, False), (24576, 1536, True), (7168, 16384, True), (4096, 7168, True)],
)
def test_split_m_choice_matches_h200_sweep(n, k, split_faster_or_tied):
    # H200 (132 SMs), M=4096, ratio to _scaled_mm, 64x128 / split-M: 0.777/0.675, 0.676/0.717,
    # 0.760/0.825, 0.688/0.688 (scripts/fp8_gemm_sweep.py, one run). k does not enter the rule.
    assert _split_m_wins(4096, n, 132) is split_faster_or_tied


def test_split_m_not_chosen_for_small_grids():
    # 256 x 2112: 68 tiles of 64 rows already leave most of 132 SMs idle; halving the CTAs is worse.
    assert not _split_m_wins(256, 2112, 132)
    # 100 rows: a 128-row tile computes 28 padded rows (22%) for nothing.
    assert not _split_m_wins(100, 24576, 132)


def test_ctas_per_sm_from_registers_and_shared_memory():
    from types import SimpleNamespace

    def kernel(regs, shared, warps=4):
        return SimpleNamespace(
            n_regs=regs, n_spills=0, metadata=SimpleNamespace(num_warps=warps, shared=shared)
        )

    # The 64x128 tile on Triton 3.6 (ptxas, sm_90): 167 registers fit 3 CTAs, 177 (the `range`
    # loop) only 2; its 74,248 B of shared memory alone would allow 3.
    assert fp8.ctas_per_sm(kernel(167, 74248)) == dict(
        regs=167, spills=0, shared=74248, ctas_by_regs=3, ctas_by_smem=3, ctas_per_sm=3
    )
    assert fp8.ctas_per_sm(kernel(177, 74248))["ctas_per_sm"] == 2
    assert (
        fp8.ctas_per_sm(kernel(168, 74248))["ctas_per_sm"] == 3
    )  # registers come in 8s: 168 is the edge
    # Split-M 128x128: 255 registers x 4 warps -> 2 CTAs; 99 KB of shared memory -> 2 as well.
    assert fp8.ctas_per_sm(kernel(255, 99336))["ctas_per_sm"] == 2
    assert fp8.ctas_per_sm(kernel(64, 150_000))["ctas_by_smem"] == 1
