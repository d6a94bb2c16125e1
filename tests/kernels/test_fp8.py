"""FP8 quantization and block-scaled GEMM kernels vs their PyTorch references, under the
interpreter."""

import pytest
import torch

from moeray.kernels import fp8
from moeray.kernels.common import FP8_DTYPE


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any()
    return ((out - ref).norm() / ref.norm()).item()


def _poison_check(q: torch.Tensor) -> None:
    assert torch.isfinite(q.float()).all(), "unwritten (NaN-poisoned) or non-finite output"


@pytest.mark.parametrize("shape", [(3, 5, 200), (17, 128), (1, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    # Per-row magnitudes over 4 decades, so a scale taken from the wrong group shows up.
    x = (
        torch.randn(shape, generator=g)
        * torch.logspace(-2, 2, shape[-2] if len(shape) > 1 else 1).reshape(-1, 1)
    ).to(dtype)
    q, s = fp8.act_quant(x)
    qr, sr = fp8.act_quant_ref(x)
    assert (
        q.dtype == FP8_DTYPE
        and q.shape == x.shape
        and s.shape == (*shape[:-1], -(-shape[-1] // 128))
    )
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    assert torch.equal(q.float(), qr.float())
    # Round trip: 1x128 e4m3 keeps each element within half an e4m3 step (2^-4 relative) of x.
    deq = fp8.dequant_rows_ref(q.reshape(-1, shape[-1]), s.reshape(-1, s.shape[-1]))
    assert _rel(deq, x.reshape(-1, shape[-1]).float()) < 0.04


def test_act_quant_col_major_scale_and_zero_rows():
    x = torch.randn(9, 260)
    x[4] = 0.0  # an all-zero token must quantize to zeros, not NaN
    q, s = fp8.act_quant(x, scale_col_major=True)
    assert s.shape == (9, 3) and s.stride() == (1, 9)
    qr, sr = fp8.act_quant_ref(x)
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    assert torch.equal(q.float(), qr.float())
    assert (q[4].float() == 0).all()


def test_act_quant_t_matches_reference():
    x = torch.randn(131, 70) * torch.rand(1, 70) * 5
    q, s = fp8.act_quant_t(x)
    qr, sr = fp8.act_quant_t_ref(x)
    assert q.shape == (70, 131) and s.shape == (70, 2)
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    assert torch.equal(q.float(), qr.float())


@pytest.mark.parametrize("shape", [(130, 260), (128, 128), (40, 300)])
def test_weight_quant_dequant(shape):
    w = torch.randn(shape) * 3
    q, s = fp8.weight_quant(w)
    qr, sr = fp8.weight_quant_ref(w)
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    assert torch.equal(q.float(), qr.float())
    d = fp8.weight_dequant(q, s)
    dr = fp8.weight_dequant_ref(q, s)
    assert d.dtype == torch.bfloat16
    torch.testing.assert_close(d.float(), dr.float(), rtol=8e-3, atol=0)
    assert _rel(d, w) < 0.05


def test_rounding_carry_matches_torch():
    # Values that round up into the next binade (124.4 -> 128): the interpreter's own cast gets
    # these wrong; the kernels' exact rounding must not.
    x = torch.tensor([[124.4, -127.7, 31.2, 0.0178, 1e-3, 447.0] + [448.0] * 122])
    q, _ = fp8.act_quant(x)
    qr, _ = fp8.act_quant_ref(x)
    assert torch.equal(q.float(), qr.float())


@pytest.mark.parametrize("mnk", [(33, 160, 256), (5, 72, 200), (64, 256, 384)])
def test_fp8_gemm_block_scaled(mnk):
    m, n, k = mnk
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g)
    # Distinct magnitudes per 128-row block of w catch a scale read from the wrong block.
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).mul(8).add(0.1)
    xq, xs = fp8.act_quant(x)
    wq, ws = fp8.weight_quant(w)
    out = fp8.fp8_gemm(xq, xs, wq, ws, backend="triton")
    ref = fp8.fp8_gemm_ref(xq, xs, wq, ws)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert _rel(out, ref) < 8e-3
    # And the whole FP8 path stays close to the fp32 product (e4m3 error ~2-3%).
    assert _rel(out, x @ w.t()) < 0.06


def test_fp8_gemm_col_major_a_scale_and_strided_b():
    m, n, k = 20, 130, 256
    x, w = torch.randn(m, k), torch.randn(n, k)
    xq, xs = fp8.act_quant(x, scale_col_major=True)
    wq, ws = fp8.weight_quant(w)
    out = fp8.fp8_gemm_triton(xq, xs, wq, ws)
    assert _rel(out, fp8.fp8_gemm_ref(xq, xs, wq, ws)) < 8e-3
    # b given as a transposed view ([N, K] with strides (1, N)) must give the same result.
    wt = wq.t().contiguous().t()
    assert _rel(fp8.fp8_gemm_triton(xq, xs, wt, ws), out) < 1e-6


def test_backward_gemms():
    m, n, k = 136, 144, 256
    g = torch.Generator().manual_seed(7)
    x, w, dy = (
        torch.randn(m, k, generator=g),
        torch.randn(n, k, generator=g),
        torch.randn(m, n, generator=g),
    )
    wq, ws = fp8.weight_quant(w)
    dx = fp8.fp8_linear_dgrad(dy, wq, ws, backend="triton")
    assert dx.shape == (m, k)
    assert _rel(dx, dy @ fp8.weight_dequant_ref(wq, ws, out_dtype=torch.float32)) < 0.05
    dw = fp8.fp8_linear_wgrad(dy, x, backend="triton")
    assert dw.shape == (n, k)
    assert _rel(dw, dy.t() @ x) < 0.05
    # The wgrad GEMM with per-row (1x128) b scales against its reference.
    dyt, dyts = fp8.act_quant_t(dy)
    xt, xts = fp8.act_quant_t(x)
    assert (
        _rel(fp8.fp8_gemm_triton(dyt, dyts, xt, xts), fp8.fp8_gemm_ref(dyt, dyts, xt, xts)) < 8e-3
    )


def test_input_errors():
    xq, xs = fp8.act_quant(torch.randn(4, 256))
    wq, ws = fp8.weight_quant(torch.randn(128, 256))
    with pytest.raises(ValueError, match="a_fp8 has dtype"):
        fp8.fp8_gemm(xq.float(), xs, wq, ws)
    with pytest.raises(ValueError, match="b_scale has shape"):
        fp8.fp8_gemm(xq, xs, wq, ws[:, :1])
    with pytest.raises(ValueError, match="must match"):
        fp8.fp8_gemm(xq, xs, wq[:, :128].contiguous(), ws[:, :1].contiguous())
    with pytest.raises(ValueError, match="block=64"):
        fp8.act_quant(torch.randn(4, 256), block=64)
    with pytest.raises(ValueError, match="x has dtype"):
        fp8.act_quant(torch.randint(0, 4, (4, 128)))
    with pytest.raises(ValueError, match="backend"):
        fp8.fp8_gemm(xq, xs, wq, ws, backend="cutlass")


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


@pytest.mark.parametrize(
    "shape",
    [(200, 136), (128, 128), (3, 256, 384), (2, 200, 136)],
    ids=["ragged", "one-block", "stacked", "stacked-ragged"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_quant_t_matches_reference(shape, dtype, launch_spy):
    from moeray.kernels.fp8 import quant

    g = torch.Generator().manual_seed(sum(shape))
    # Magnitudes over 4 decades down the rows, so a scale from the wrong block (or expert) shows.
    rows = torch.logspace(-2, 2, shape[-2]).reshape(-1, 1)
    w = (torch.randn(shape, generator=g) * rows).to(dtype)
    grids = launch_spy(quant, "_weight_quant_t_kernel")
    q, s, q_t = fp8.weight_quant_t(w)
    qr, sr, q_tr = fp8.weight_quant_t_ref(w)
    *e, n, k = shape
    nb, kb = -(-n // 128), -(-k // 128)
    assert grids == [(nb, kb, e[0] if e else 1)]  # one launch, every expert
    assert q.dtype == q_t.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert q.shape == w.shape and s.shape == (*e, nb, kb) and q_t.shape == (*e, k, n)
    assert q.is_contiguous() and q_t.is_contiguous()
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    # .float(): the interpreter's exact rounding writes +0 where torch's cast keeps -0
    assert torch.equal(q.float(), qr.float()) and torch.equal(q_t.float(), q_tr.float())
    # W^T is the kernel's own q transposed, bit for bit, per expert
    assert torch.equal(_bits(q_t), _bits(q.transpose(-2, -1).contiguous()))
    # and q, s are what weight_quant gives each matrix alone (blocks never straddle experts)
    for i, w_NK in enumerate(w.reshape(-1, n, k)):
        q1, s1 = fp8.weight_quant(w_NK)
        assert torch.equal(_bits(q.reshape(-1, n, k)[i]), _bits(q1))
        assert torch.equal(s.reshape(-1, nb, kb)[i], s1)


def test_weight_quant_t_strided_inputs():
    """A row-strided slice is read in place; a transposed view (K not unit-stride) is copied."""
    base = torch.randn(2, 200, 300) * 3
    for w in (base[:, :, :136], base[0].t()[:136], base[1, 7:]):
        q, s, q_t = fp8.weight_quant_t(w)
        qr, sr, _ = fp8.weight_quant_t_ref(w.contiguous())
        assert torch.equal(q.float(), qr.float()) and torch.equal(s, sr)
        assert torch.equal(_bits(q_t), _bits(q.transpose(-2, -1).contiguous()))


def _cat_out(e: int, n: int, k: int):
    return (
        torch.full((e, n, k), 7.0).to(FP8_DTYPE),
        torch.full((e, -(-n // 128), -(-k // 128)), -1.0),
        torch.full((e, k, n), 7.0).to(FP8_DTYPE),
    )


def test_weight_quant_t_into_slices_of_a_concatenation():
    """Gate and up quantized into the halves of one [E, 2I, K] output (`out`) equal the
    quantization of their concatenation bit for bit, W^T [E, K, 2I] included: 128-row blocks
    never straddle the two (I a multiple of 128); K ragged."""
    g = torch.Generator().manual_seed(11)
    w1, w3 = (torch.randn(2, 256, 200, generator=g) * c for c in (0.1, 30.0))
    q, s, q_t = _cat_out(2, 512, 200)
    for half, w in ((slice(0, 256), w1), (slice(256, 512), w3)):
        blocks = slice(half.start // 128, half.stop // 128)
        got = fp8.weight_quant_t(w, out=(q[:, half], s[:, blocks], q_t[:, :, half]))
        assert got[0].data_ptr() == q[:, half].data_ptr()
    qr, sr, q_tr = fp8.weight_quant_t(torch.cat([w1, w3], 1))
    assert torch.equal(q.float(), qr.float()) and torch.equal(s, sr)
    assert torch.equal(q_t.float(), q_tr.float())


def test_weight_quant_t_out_errors():
    w = torch.randn(2, 256, 128)
    q, s, q_t = _cat_out(2, 256, 128)
    with pytest.raises(ValueError, match=r"out q_t has shape \(2, 256, 128\), expected"):
        fp8.weight_quant_t(w, out=(q, s, q))
    with pytest.raises(ValueError, match=r"out scale_inv has dtype torch\.float8"):
        fp8.weight_quant_t(w, out=(q, q, q_t))
    with pytest.raises(ValueError, match=r"out q has strides .*: its rows must be unit-stride"):
        fp8.weight_quant_t(w, out=(q.transpose(1, 2).contiguous().transpose(1, 2), s, q_t))
    with pytest.raises(ValueError, match=r"out needs a stacked w \[E, N, K\]"):
        fp8.weight_quant_t(w[0], out=(q, s, q_t))


def test_weight_quant_t_input_errors():
    with pytest.raises(ValueError, match=r"got shape \(256,\)"):
        fp8.weight_quant_t(torch.randn(256))
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 128, 128\)"):
        fp8.weight_quant_t(torch.randn(1, 2, 128, 128))
    with pytest.raises(ValueError, match=r"got shape \(0, 128\)"):
        fp8.weight_quant_t(torch.randn(0, 128))
    with pytest.raises(ValueError, match=r"w has dtype torch\.int64"):
        fp8.weight_quant_t(torch.randint(0, 4, (128, 128)))
    with pytest.raises(ValueError, match="block=64"):
        fp8.weight_quant_t(torch.randn(128, 128), block=64)


@pytest.mark.gpu
def test_weight_quant_t_compiled_on_gpu(compiled_check):
    # Compiled: q, scales and q_t equal to the reference's, q_t bit-equal to the kernel's own q
    # transposed, on outputs over freed NaN memory (an unwritten element shows), at Moonlight's
    # stacked expert shapes (64 x 1408 x 2048 gate/up, 64 x 2048 x 1408 down), V3's kv_a
    # (2112 x 7168) and ragged shapes; then StackedWeight and QuantizedWeight give the transposes
    # a separate copy would, and gate and up quantized into the halves of one weight what their
    # concatenation gives.
    compiled_check(
        """
import torch
from moeray.kernels import fp8
from moeray.platform.fp8 import QuantizedWeight, StackedWeight
bits = lambda t: t.view(torch.uint8)
bad = []
cases = [((64, 1408, 2048), torch.float32), ((64, 2048, 1408), torch.float32),
         ((2112, 7168), torch.bfloat16), ((200, 136), torch.float32),
         ((3, 200, 136), torch.bfloat16), ((3, 256, 384), torch.float32)]
for shape, dtype in cases:
    w = (torch.randn(shape, device="cuda") * torch.rand(shape[-2], 1, device="cuda") * 8).to(dtype)
    torch.empty(1 << 28, device="cuda").fill_(float("nan"))
    q, s, q_t = fp8.weight_quant_t(w)
    qr, sr, q_tr = fp8.weight_quant_t_ref(w)
    ok = (torch.equal(q.float(), qr.float()) and torch.equal(s, sr)
          and torch.equal(q_t.float(), q_tr.float())
          and torch.equal(bits(q_t), bits(q.transpose(-2, -1).contiguous())))
    print(shape, dtype, "ok" if ok else "MISMATCH")
    if not ok:
        bad.append(shape)
w = torch.randn(4, 384, 200, device="cuda")
sw = StackedWeight(w)
qt, st = sw.transposed
if not (torch.equal(bits(qt), bits(sw.q.transpose(1, 2).contiguous()))
        and torch.equal(st, sw.scale.transpose(1, 2).contiguous())):
    bad.append("StackedWeight")
w1, w3 = torch.randn(64, 1408, 2048, device="cuda"), torch.randn(64, 1408, 2048, device="cuda") * 9
pair, whole = StackedWeight((w1, w3)), StackedWeight(torch.cat([w1, w3], 1))
if not (torch.equal(bits(pair.q), bits(whole.q)) and torch.equal(pair.scale, whole.scale)
        and torch.equal(bits(pair.transposed[0]), bits(whole.transposed[0]))):
    bad.append("StackedWeight of gate and up")
qw = QuantizedWeight(w[1])
q1, s1 = fp8.weight_quant(w[1])
if not (torch.equal(bits(qw.q_NK), bits(q1)) and torch.equal(qw.scale, s1)
        and torch.equal(bits(qw.q_KN), bits(q1.t().contiguous()))):
    bad.append("QuantizedWeight")
print("RESULT", "PASS" if not bad else f"FAIL {bad}")
""",
        "fp8_weight_quant_t_gpu.txt",
    )
