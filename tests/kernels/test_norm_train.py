"""The fused RMSNorm under autograd (moeray.kernels.norm.rms_norm when autograd records: the forward
kernel saving 1/rms, the fused backward) against torch.autograd through rms_norm_ref, under the
interpreter at odd shapes: D not a power of 2, T odd, with and without the residual add, fp32,
bf16 and fp16 rows with fp32 or matching weights, both outputs receiving gradients; the decoder
layer's gradients with the model's chooser taking the kernels, and under `recompute: [norm]`."""

import pytest
import torch

from moeray.kernels import norm as kernel_norm
from moeray.kernels.norm import rms_norm, rms_norm_applies, rms_norm_ref
from moeray.platform.config import tiny
from moeray.platform.model import norm as model_norm
from moeray.platform.model.block import DecoderLayer
from moeray.platform.model.rope import RotaryEmbedding
from moeray.platform.train.recompute import apply_recompute

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (x, residual or None, weight) dtypes: the fp32 residual stream (Moonlight training under bf16
# autocast), a bf16 attention output added to it, a bf16 latent with an fp32 weight
# (kv_a_layernorm), all-bf16 and fp16 models.
DTYPE_CASES = [
    (F32, F32, F32),
    (F32, None, F32),
    (BF16, F32, F32),
    (BF16, None, F32),
    (BF16, BF16, BF16),
    (F16, F16, F32),
]


def _grad_close(out: torch.Tensor, ref: torch.Tensor, name: str, h_dtype=F32) -> None:
    """fp32 gradients within fp32 rounding (the kernel sums in another order); bf16/fp16 within
    about one rounding step of the largest value (the reference rounds dy * weight, the weight
    products and its partial gradients to the dtype; the kernel keeps them in fp32). A bf16/fp16
    h (its normed row rounded to that dtype, a step apart where the fp32 sums' order moved it)
    gives even an fp32 weight gradient that step."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, name
    coarse = ref.dtype if ref.dtype != F32 else h_dtype
    eps = 1e-5 if coarse == F32 else 2 * torch.finfo(coarse).eps
    scale = float(ref.float().abs().max())
    torch.testing.assert_close(out.float(), ref.float(), rtol=eps, atol=eps * scale, msg=name)


def _inputs(shape, dtypes, seed):
    x_dtype, r_dtype, w_dtype = dtypes
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(x_dtype).requires_grad_()
    r = None if r_dtype is None else torch.randn(shape, generator=g).to(r_dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(w_dtype).requires_grad_()
    return x, w, r


@pytest.mark.parametrize("dtypes", DTYPE_CASES)
@pytest.mark.parametrize("shape", [(17, 200), (3, 5, 512), (9, 1031)])
def test_gradients_match_autograd_through_the_reference(dtypes, shape):
    x, w, r = _inputs(shape, dtypes, seed=shape[-1])
    y, h = rms_norm(x, w, 1e-6, r)
    y_ref, h_ref = rms_norm_ref(x, w, 1e-6, r)
    assert y.dtype == y_ref.dtype and h.dtype == h_ref.dtype  # the reference's type promotion
    assert torch.equal(h, h_ref)
    # the normed row rounds to h's dtype before the weight multiplies it: a different fp32 sum
    # order can move it one step of h's dtype (fp32: a few ulps of the scale), whatever y's dtype
    ulps = 4 if h_ref.dtype == F32 else 2
    step = ulps * torch.finfo(h_ref.dtype).eps * y_ref.detach().float().abs()
    assert ((y - y_ref).detach().float().abs() <= step * 1.01 + 1e-30).all()
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y_ref.shape, generator=g).to(y_ref.dtype)
    inputs = [t for t in (x, w, r) if t is not None]
    names = ["x", "weight", "residual"][: len(inputs)]
    if r is None:
        grads = torch.autograd.grad(y, inputs, dy)
        grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    else:  # both outputs receive gradients, as the decoder layer's residual stream does
        dh = torch.randn(h_ref.shape, generator=g).to(h_ref.dtype)
        grads = torch.autograd.grad((y, h), inputs, (dy, dh))
        grads_ref = torch.autograd.grad((y_ref, h_ref), inputs, (dy, dh))
    for name, a, b in zip(names, grads, grads_ref, strict=True):
        _grad_close(a, b, name, h_ref.dtype)


@pytest.mark.parametrize("used", ["normed", "sum"])
def test_one_output_unused(used):
    """The final norm drops h (its gradient arrives as None); a caller may drop the normed row."""
    x, w, r = _inputs((7, 96), (F32, F32, F32), seed=3)
    y, h = rms_norm(x, w, 1e-6, r)
    y_ref, h_ref = rms_norm_ref(x, w, 1e-6, r)
    out, out_ref = (y, y_ref) if used == "normed" else (h, h_ref)
    weights = torch.linspace(-1, 1, 96)
    grads = torch.autograd.grad((out * weights).sum(), [x, w, r], allow_unused=True)
    grads_ref = torch.autograd.grad((out_ref * weights).sum(), [x, w, r], allow_unused=True)
    for name, a, b in zip(["x", "weight", "residual"], grads, grads_ref, strict=True):
        if b is None:
            assert a is None or not a.any(), name
        else:
            _grad_close(a, b, name)


def test_gradient_of_a_slice_of_wider_rows():
    """kv_a_layernorm normalizes the first 512 of 576 features: rows with stride 576; the gradient
    lands in those columns of the full projection."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, 3, 40, generator=g).to(BF16).requires_grad_()
    w = (torch.rand(32, generator=g) + 0.5).requires_grad_()
    assert rms_norm_applies(full[..., :32], w)
    dy = torch.randn(2, 3, 32, generator=g)
    grads = torch.autograd.grad(rms_norm(full[..., :32], w, 1e-6)[0], [full, w], dy)
    grads_ref = torch.autograd.grad(rms_norm_ref(full[..., :32], w, 1e-6)[0], [full, w], dy)
    for name, a, b in zip(["x", "weight"], grads, grads_ref, strict=True):
        _grad_close(a, b, name, BF16)
    assert not grads[0][..., 32:].any()


def test_one_launch_each_way(launch_spy):
    """Forward: one program per row. Backward: one launch of BWD_PROGRAMS_PER_SM programs per SM
    (4 'SMs' on CPU), each over a block of rows, then the sum of their weight partials."""
    fwd = launch_spy(kernel_norm, "_rms_norm_kernel")
    bwd = launch_spy(kernel_norm, "_rms_norm_bwd_kernel")
    x, w, r = _inputs((17, 200), (F32, F32, F32), seed=2)
    y, h = rms_norm(x, w, 1e-6, r)
    assert fwd == [(17,)] and bwd == []
    torch.autograd.backward((y, h), (torch.ones_like(y), torch.ones_like(h)))
    assert fwd == [(17,)] and bwd == [(6,)]  # 17 rows over <= 8 programs: 3 rows each, 6 programs
    assert x.grad is not None and r.grad is not None and w.grad is not None


def test_no_autograd_keeps_the_inference_launch(launch_spy):
    fwd = launch_spy(kernel_norm, "_rms_norm_kernel")
    x, w, r = _inputs((5, 64), (BF16, BF16, BF16), seed=4)
    with torch.no_grad():
        y, h = rms_norm(x, w, 1e-6, r)
    assert y.grad_fn is None and h.grad_fn is None and len(fwd) == 1


def test_rejects_bad_input():
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"weight has dtype torch\.int32"):
        rms_norm(x, torch.ones(8, dtype=torch.int32), 1e-6)
    with pytest.raises(ValueError, match=r"residual has dtype torch\.float64"):
        rms_norm(x, torch.ones(8), 1e-6, torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"residual has shape \(2, 7\)"):
        rms_norm(x, torch.ones(8), 1e-6, torch.randn(2, 7))


def _layer_grads(dtype, fused: bool, recompute: bool, monkeypatch):
    """Gradients of every parameter and of the layer input, the chooser taking the kernels or not
    (the interpreter stands in for CUDA); `dtype` bf16 runs the layer under CPU bf16 autocast with
    fp32 parameters and an fp32 residual stream, as training does."""
    cfg = tiny()
    torch.manual_seed(0)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(5).expand(2, 5))
    layer = DecoderLayer(cfg, 1)  # an MoE layer
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    if recompute:
        # input, post-attention, q_a_ and kv_a_layernorm
        assert apply_recompute(layer, ("norm",)) == 4
    chosen: list[bool] = []

    def choice(x, weight, residual=None):
        chosen.append(fused and rms_norm_applies(x, weight, residual))
        return chosen[-1]

    monkeypatch.setattr(model_norm, "use_fused_norm", choice)
    x = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    x.requires_grad_()
    delta = (0.5 * x.detach()).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == BF16):
        out = layer(x, cos, sin, delta_BSD=delta)
    out.float().pow(2).sum().backward()
    monkeypatch.undo()
    assert chosen and all(chosen) == fused
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return {**grads, "x": x.grad, "delta": delta.grad}


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_decoder_layer_gradients_with_fused_norms(monkeypatch, dtype):
    ref = _layer_grads(dtype, fused=False, recompute=False, monkeypatch=monkeypatch)
    out = _layer_grads(dtype, fused=True, recompute=False, monkeypatch=monkeypatch)
    assert out.keys() == ref.keys()
    # fp32: the kernels' fp32 sums run in another order; bf16 autocast: a normed row one bf16
    # rounding step off moves the bf16 GEMMs downstream by about that much
    tol = 1e-4 if dtype == F32 else 3e-2
    for k, g in ref.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(out[k], g, rtol=tol, atol=tol * scale, msg=k)


def test_recompute_reruns_the_fused_norm(monkeypatch, launch_spy):
    """`recompute: [norm]` (non-reentrant checkpoint) re-runs the autograd Function's forward in
    the backward (4 norms: 4 forward launches, 4 again): the gradients are the same bits as
    without recompute."""
    plain = _layer_grads(F32, fused=True, recompute=False, monkeypatch=monkeypatch)
    fwd = launch_spy(kernel_norm, "_rms_norm_kernel")
    bwd = launch_spy(kernel_norm, "_rms_norm_bwd_kernel")
    again = _layer_grads(F32, fused=True, recompute=True, monkeypatch=monkeypatch)
    assert len(fwd) == 8 and len(bwd) == 4
    assert plain.keys() == again.keys()
    for k, g in plain.items():
        assert torch.equal(again[k], g), k
