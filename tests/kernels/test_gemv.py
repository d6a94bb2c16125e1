"""gemv (weight-only bf16/fp16/fp32 GEMM for decode) against gemv_ref under the interpreter: odd
shapes (N and K not multiples of the tile), each dtype, strided operands, split-K, configs and bad
input; the model's one dispatch (kernels.gemv.linear via model.linear.Linear): gemv only for
CUDA inference at decode rows, F.linear for training, bias, more rows and MOERAY_FUSED_GEMV=0."""

import pytest
import torch
import torch.nn.functional as F

from moeray.kernels import gemv as gemv_module
from moeray.kernels.gemv import GEMV_MAX_ROWS, bcast_config, gemv, gemv_applies, gemv_ref, linear
from moeray.platform.model.linear import Linear

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.shape[0])
    assert torch.isfinite(y).all(), "unwritten or non-finite output"
    ref32 = x.double() @ w.double().t()
    if x.dtype == torch.float32:
        rel = ((y.double() - ref32).norm() / ref32.norm().clamp(min=1e-30)).item()
        assert rel < 1e-5, rel
        return
    # fp32 sums in another order, then one rounding to x's dtype (the interpreter truncates):
    # within one unit in the last place of the exact value, element by element.
    err = (y.double() - ref32).abs()
    bound = ref32.abs() * ULP[x.dtype] + 1e-5 * ref32.abs().max()
    assert (err <= bound).all(), (err / bound).max().item()


def _operands(m: int, n: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    # Rows of x and of w over 2 decades (fp16 keeps the products finite): a row mixed into
    # another's output shows up.
    x = torch.randn(m, k, generator=g) * torch.logspace(-1, 1, m)[:, None]
    w = torch.randn(n, k, generator=g) * torch.logspace(-1, 1, n)[:, None]
    return x.to(dtype), w.to(dtype)


@pytest.mark.parametrize("m", [1, 3, 5])  # one row; a partial 4-row tile; two M tiles
@pytest.mark.parametrize("n", [1, 7, 576, 1000])
@pytest.mark.parametrize("k", [64, 200, 2048 + 64])
def test_gemv_odd_shapes_fp32(m, n, k):
    x, w = _operands(m, n, k, torch.float32, seed=m + n + k)
    _check(gemv(x, w), x, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 576, 2048 + 64), (3, 1000, 200), (4, 7, 2048 + 64)])
def test_gemv_half_dtypes(dtype, m, n, k):
    x, w = _operands(m, n, k, dtype, seed=n)
    y = gemv(x, w)
    _check(y, x, w)
    torch.testing.assert_close(y, gemv_ref(x, w), rtol=2 * ULP[dtype], atol=0)


def test_gemv_strided_operands():
    x, w = _operands(3, 200, 300, torch.bfloat16, seed=1)
    xt = x.t().contiguous().t()  # [3, 300] with strides (1, 3)
    wt = w.t().contiguous().t()  # [200, 300] with strides (1, 200)
    _check(gemv(xt, wt), x, w)
    wide = torch.zeros(3, 600, dtype=torch.bfloat16)
    wide[:, ::2] = x  # stride 2 over K
    _check(gemv(wide[:, ::2], w), x, w)


@pytest.mark.parametrize(
    "cfg,n",
    [
        # The GPU's tiles at Moonlight shapes, a ragged last step, split-K with a partial split.
        # N 37 where the tiles are narrow (one program per 1 or 8 rows: N 200 took 9 and 6 s of
        # the interpreter), a ragged last tile of 8 there.
        (dict(BLOCK_M=1, BLOCK_N=1, BLOCK_K=2048, SPLIT_K=1, num_warps=4, num_stages=3), 37),
        (dict(BLOCK_M=4, BLOCK_N=4, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=3), 200),
        (dict(BLOCK_M=2, BLOCK_N=64, BLOCK_K=64, SPLIT_K=3, num_warps=8, num_stages=2), 200),
        (dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=128, SPLIT_K=5, num_warps=2, num_stages=1), 37),
    ],
)
def test_gemv_configs(cfg, n):
    x, w = _operands(3, n, 1000, torch.float32, seed=cfg["BLOCK_N"])
    _check(gemv(x, w, config=cfg), x, w)


def test_gemv_heuristic_fills_an_h200(monkeypatch):
    monkeypatch.setattr(gemv_module, "num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    # Moonlight and V3 decode shapes (N, K): one launch with >= 2 programs per SM.
    shapes = [(3072, 2048), (576, 2048), (2048, 2048), (2816, 2048), (2048, 2816)]
    shapes += [(1536, 7168), (576, 7168), (7168, 16384), (2048, 7168), (7168, 2048)]
    for n, k in [*shapes, (163840, 2048)]:
        for m in (1, 2, 4):
            cfg = bcast_config(m, n, k, cpu)
            programs = -(-n // cfg["BLOCK_N"])
            assert cfg["SPLIT_K"] == 1 and cfg["BLOCK_M"] == m, cfg
            assert programs >= 4 * 132 or cfg["BLOCK_N"] == 1, (n, k, cfg)
            assert m * cfg["BLOCK_N"] * cfg["BLOCK_K"] <= 8192, cfg
            if m == 1:  # at least two K steps: the loop's loads pipeline
                assert -(-k // cfg["BLOCK_K"]) >= 2, (n, k, cfg)
    assert bcast_config(1, 7, 7168, cpu)["SPLIT_K"] > 1
    assert bcast_config(1, 3072, 2048, cpu)["BLOCK_K"] == 1024  # Moonlight q_proj at one row


def test_gemv_empty_and_k0():
    assert gemv(torch.randn(0, 30), torch.randn(20, 30)).shape == (0, 20)
    assert gemv(torch.randn(2, 30), torch.randn(0, 30)).shape == (2, 0)
    assert torch.equal(gemv(torch.randn(2, 0), torch.randn(5, 0)), torch.zeros(2, 5))


def test_gemv_bad_input():
    x = torch.randn(2, 300, dtype=torch.bfloat16)
    w = torch.randn(200, 300, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="K=301"):
        gemv(torch.randn(2, 301, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match=r"x has dtype torch\.int32; accepted: torch\.bfloat16"):
        gemv(x.int(), w)
    with pytest.raises(ValueError, match=r"w has dtype torch\.float32; accepted: torch\.bfloat16"):
        gemv(x, w.float())
    with pytest.raises(ValueError, match="x must have 2 dims"):
        gemv(x[None], w)
    with pytest.raises(ValueError, match="w must have 2 dims"):
        gemv(x, w[None])
    with pytest.raises(ValueError, match="w is on meta"):
        gemv(x, w.to("meta"))
    cfg = dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=3)
    for bad, msg in (
        ({"BLOCK_N": 3}, "BLOCK_N=3: must be a power of two <= 128"),
        ({"BLOCK_M": 6}, "BLOCK_M=6"),
        ({"BLOCK_K": 8}, "BLOCK_K=8: must be a power of two >= 16"),
        ({"SPLIT_K": 0}, "SPLIT_K=0"),
        ({"num_stages": 0}, "num_stages=0"),
        ({"BLOCK_N": 64, "BLOCK_K": 1024}, "the fp32 accumulator"),
    ):
        with pytest.raises(ValueError, match=msg):
            gemv(x, w, config={**cfg, **bad})
    with pytest.raises(ValueError, match="need exactly"):
        gemv(x, w, config={**cfg, "DOT": False})


def _on_cuda(monkeypatch):
    """CPU tensors that say they are on CUDA: the dispatch's CUDA branch, run by the interpreter."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))


def test_linear_dispatch(monkeypatch):
    x = torch.randn(2, 1, 40)
    w = torch.randn(24, 40, requires_grad=True)
    assert not gemv_applies(x, w, None)  # CPU
    _on_cuda(monkeypatch)
    with torch.no_grad():
        assert gemv_applies(x, w, None)
        assert gemv_applies(torch.randn(GEMV_MAX_ROWS, 40), w, None)
        assert not gemv_applies(torch.randn(GEMV_MAX_ROWS + 1, 40), w, None)
        assert not gemv_applies(x, w, torch.zeros(24))  # bias: F.linear
        assert not gemv_applies(x.bfloat16(), w, None)  # mixed dtypes: F.linear
        assert not gemv_applies(torch.randn(0, 40), w, None)
    assert not gemv_applies(x, w, None)  # a gradient is wanted (training)
    with torch.inference_mode():
        assert gemv_applies(x, w, None)
        monkeypatch.setenv("MOERAY_FUSED_GEMV", "0")
        assert not gemv_applies(x, w, None)


def test_model_linear_takes_gemv_only_for_inference(monkeypatch, launch_spy):
    torch.manual_seed(0)
    layer = Linear(40, 24, bias=False)
    ref = torch.nn.Linear(40, 24, bias=False)
    ref.load_state_dict(layer.state_dict())  # the same state-dict names as nn.Linear
    assert list(layer.state_dict()) == ["weight"]
    x = torch.randn(1, 3, 40)
    grids = launch_spy(gemv_module, "_gemv_kernel")
    _on_cuda(monkeypatch)
    with torch.no_grad():
        y = layer(x)
    assert len(grids) == 1 and y.shape == (1, 3, 24)
    _check(y[0], x[0], layer.weight.detach())
    y_train = layer(x)  # autograd: F.linear, gradients flow
    assert len(grids) == 1 and y_train.requires_grad
    y_train.sum().backward()
    torch.testing.assert_close(y_train, F.linear(x, layer.weight))
    with torch.no_grad():
        layer(torch.randn(GEMV_MAX_ROWS + 1, 40))  # prefill rows: F.linear
    assert len(grids) == 1
    torch.testing.assert_close(linear(x, ref.weight.detach()), y, rtol=1e-5, atol=1e-6)
    assert len(grids) == 2
