"""fp8_gemv (weight-only FP8 GEMM for decode) against fp8_gemv_ref under the interpreter: odd
shapes (ragged N and K), both inner products (broadcast, dot), split-K, strided x, bad input."""

import pytest
import torch

from moeray.kernels import fp8
from moeray.kernels.fp8.gemv import _gemv_config


def _weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Block scales over ~3 decades, so a scale read from the wrong 128x128 block shows up.
    blk = torch.logspace(-1, 2, -(-n // 128))[torch.randperm(-(-n // 128), generator=g)]
    w = torch.randn(n, k, generator=g) * blk.repeat_interleave(128)[:n, None]
    return fp8.weight_quant(w)


def _check(y: torch.Tensor, x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> None:
    assert y.dtype == x.dtype and y.shape == (x.shape[0], wq.shape[0])
    assert torch.isfinite(y).all(), "unwritten (poisoned) or non-finite output"
    ref32 = x.float() @ fp8.weight_dequant_ref(wq, ws, out_dtype=torch.float32).t()
    if x.dtype == torch.float32:
        rel = ((y.double() - ref32.double()).norm() / ref32.double().norm()).item()
        assert rel < 1e-5, rel
    else:
        # fp32 sums in another order, then one rounding to x's dtype (the interpreter truncates
        # fp32 -> bf16): within one unit in the last place of the exact value, element by element.
        ulp = 2.0**-7 if x.dtype == torch.bfloat16 else 2.0**-10
        err = (y.float() - ref32).abs()
        bound = ref32.abs() * ulp + 1e-4 * ref32.abs().max()
        assert (err <= bound).all(), (err / bound).max().item()
        torch.testing.assert_close(
            y, fp8.fp8_gemv_ref(x, wq, ws), rtol=2 * ulp, atol=1e-4 * ref32.abs().max().item()
        )


@pytest.mark.parametrize(
    "m,n,k",
    [
        (1, 576, 7168),  # kv_a_proj_with_mqa at batch 1: N not a multiple of 128, split-K
        (3, 1536, 1000),
        (7, 200, 512),
        (16, 200, 1000),
        (1, 7168, 512),
        (16, 576, 512),
        (3, 200, 7168),  # (M 7, N 1536, K 7168) runs on the GPU only: 17 s per dtype here
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_gemv_matches_reference(m, n, k, dtype):
    wq, ws = _weight(n, k, seed=m * 7 + n + k)
    g = torch.Generator().manual_seed(m + n)
    # Rows over 3 decades: a row mixed into another's output shows up.
    x = (torch.randn(m, k, generator=g) * torch.logspace(-1, 2, m)[:, None]).to(dtype)
    _check(fp8.fp8_gemv(x, wq, ws), x, wq, ws)


def test_fp8_gemv_fp16_and_strided_x():
    wq, ws = _weight(576, 1000, seed=1)
    x = torch.randn(1000, 5, dtype=torch.float16).t()  # [5, 1000] with strides (1, 5)
    _check(fp8.fp8_gemv(x, wq, ws), x, wq, ws)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(BLOCK_M=1, BLOCK_N=32, SPLIT_K=3, DOT=False, num_warps=4, num_stages=4),
        dict(BLOCK_M=4, BLOCK_N=8, SPLIT_K=1, DOT=False, num_warps=4, num_stages=2),
        dict(BLOCK_M=16, BLOCK_N=64, SPLIT_K=8, DOT=True, num_warps=4, num_stages=4),
        dict(BLOCK_M=32, BLOCK_N=128, SPLIT_K=2, DOT=True, num_warps=8, num_stages=3),
    ],
)
def test_fp8_gemv_configs(cfg):
    # The GPU's tiles (narrower than the interpreter's defaults) and split counts, with M not a
    # multiple of BLOCK_M, ragged N and K.
    m = 3 if cfg["BLOCK_M"] <= 4 else 21
    wq, ws = _weight(200, 1000, seed=cfg["BLOCK_N"])
    x = torch.randn(m, 1000, dtype=torch.bfloat16)
    _check(fp8.fp8_gemv(x, wq, ws, config=cfg), x, wq, ws)


def test_fp8_gemv_config_heuristic():
    cuda_like = torch.device("cpu")
    # Few output tiles (kv_a at batch 1) split K; many (q_b, 24576 rows) do not.
    assert _gemv_config(1, 576, 7168, cuda_like)["SPLIT_K"] > 1
    assert _gemv_config(1, 24576, 1536, cuda_like)["SPLIT_K"] == 1
    assert not _gemv_config(4, 576, 7168, cuda_like)["DOT"]
    assert _gemv_config(5, 576, 7168, cuda_like)["DOT"]
    assert _gemv_config(200, 576, 7168, cuda_like)["BLOCK_M"] == 64


def test_fp8_gemv_empty():
    wq, ws = _weight(200, 300, seed=2)
    assert fp8.fp8_gemv(torch.randn(0, 300), wq, ws).shape == (0, 200)


def test_fp8_gemv_bad_input():
    wq, ws = _weight(200, 300, seed=3)
    x = torch.randn(2, 300, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="K=301"):
        fp8.fp8_gemv(torch.randn(2, 301), wq, ws)
    with pytest.raises(ValueError, match=r"w_scale has shape \(2, 2\); expected \(2, 3\)"):
        fp8.fp8_gemv(x, wq, ws[:, :2])
    with pytest.raises(ValueError, match=r"x has dtype torch\.int32"):
        fp8.fp8_gemv(x.int(), wq, ws)
    with pytest.raises(ValueError, match=r"w_fp8 has dtype torch\.bfloat16"):
        fp8.fp8_gemv(x, wq.bfloat16(), ws)
    with pytest.raises(ValueError, match="x must have 2 dims"):
        fp8.fp8_gemv(x[None], wq, ws)
    bad = dict(BLOCK_M=1, BLOCK_N=48, SPLIT_K=1, DOT=False, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="BLOCK_N=48"):
        fp8.fp8_gemv(x, wq, ws, config=bad)
    with pytest.raises(ValueError, match=r"BLOCK_M=4: .* >= 16 when DOT"):
        fp8.fp8_gemv(x, wq, ws, config={**bad, "BLOCK_N": 32, "BLOCK_M": 4, "DOT": True})
