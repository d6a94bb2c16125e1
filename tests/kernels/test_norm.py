"""The fused RMSNorm (+ residual add) kernel, moeray.kernels.norm.rms_norm, against its PyTorch
reference rms_norm_ref under the interpreter at odd shapes; the decoder layer through the model's
one fast-path choice (model/norm.py use_fused_norm); the compiled kernel on the GPU (marker gpu)."""

import pytest
import torch

from moeray.kernels import norm as kernel_norm
from moeray.kernels.norm import MAX_D, rms_norm, rms_norm_applies, rms_norm_ref
from moeray.platform.config import tiny
from moeray.platform.model import norm as model_norm
from moeray.platform.model.block import DecoderLayer
from moeray.platform.model.rope import RotaryEmbedding


def _ulp_close(out, ref):
    """Equal up to a couple of rounding steps of the dtype: the fp32 sum of squares runs in another
    order and 1/sqrt is not torch's rsqrt (a few fp32 ulps on the scale), which can move a
    bf16/fp16 result across one rounding boundary before the weight multiplies it, and another
    after; fp32 results carry those few ulps directly."""
    ulps = 4 if ref.dtype == torch.float32 else 2
    step = torch.finfo(ref.dtype).eps * ref.float().abs() + torch.finfo(ref.dtype).tiny
    assert ((out.float() - ref.float()).abs() <= ulps * step * 1.01).all(), (out - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 100), (17, 129), (1, 2048)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, shape, with_residual):
    g = torch.Generator().manual_seed(shape[-1] * 7 + len(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    r = (torch.randn(shape, generator=g)).to(dtype) if with_residual else None
    y, h = rms_norm(x, w, 1e-6, r)
    y_ref, h_ref = rms_norm_ref(x, w, 1e-6, r)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(h, h_ref)  # the sum rounds once, as PyTorch's add does
    _ulp_close(y, y_ref)
    if not with_residual:
        assert h is x


def test_rms_norm_on_a_slice_of_wider_rows():
    """MLA's kv_a_layernorm normalizes the first 512 of 576 features: rows with stride 576."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, 3, 40, generator=g)
    x = full[..., :32]
    w = torch.rand(32, generator=g) + 0.5
    assert rms_norm_applies(x, w)
    y, _ = rms_norm(x, w, 1e-5)
    _ulp_close(y, rms_norm_ref(x, w, 1e-5)[0])


def test_rms_norm_rejects_bad_input(monkeypatch):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="weight has dtype"):
        rms_norm(x, torch.ones(8, dtype=torch.float64), 1e-6)
    with pytest.raises(ValueError, match="residual has shape"):
        rms_norm(x, torch.ones(8), 1e-6, torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"supports 1\.\."):
        rms_norm(torch.randn(1, MAX_D + 1), torch.ones(MAX_D + 1), 1e-6)
    assert not rms_norm_applies(x, torch.ones(8, dtype=torch.float64))
    assert rms_norm_applies(x.bfloat16(), torch.ones(8), x)  # mixed dtypes, as autocast mixes them
    monkeypatch.setenv("MOERAY_FUSED_NORM", "0")
    assert not rms_norm_applies(x, torch.ones(8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_layer_with_fused_norms_matches_reference(monkeypatch, dtype):
    """A dense and an MoE decoder layer (tiny()) with the kernel chosen for every RMSNorm (the
    interpreter stands in for CUDA) against the PyTorch path."""
    cfg = tiny()
    torch.manual_seed(0)
    rope = RotaryEmbedding(cfg)
    x = torch.randn(2, 5, cfg.hidden_size).to(dtype)
    cos, sin = rope(torch.arange(5).expand(2, 5))
    chosen = []

    def interpreter_choice(x, weight, residual=None):
        ok = rms_norm_applies(x, weight, residual)
        chosen.append(ok)
        return ok

    for idx in (0, 1):
        layer = DecoderLayer(cfg, idx)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.1)
        layer = layer.to(dtype).eval()
        with torch.no_grad():
            ref = layer(x, cos, sin)
            monkeypatch.setattr(model_norm, "use_fused_norm", interpreter_choice)
            out = layer(x, cos, sin)
            monkeypatch.undo()
        assert chosen and all(chosen)
        chosen.clear()
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_rms_norm_compiled_on_gpu(compiled_check):
    compiled_check(
        """
import torch
from moeray.kernels.norm import rms_norm, rms_norm_ref
from moeray.platform.model.norm import use_fused_norm
bad = 0
for D in (7, 129, 512, 2048, 7168):
    for T in (1, 3, 64, 4099):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(T, D, device="cuda").to(dtype)
            r = torch.randn(T, D, device="cuda").to(dtype)
            w = (1 + 0.1 * torch.randn(D, device="cuda")).to(dtype)
            assert use_fused_norm(x, w, r)
            y, h = rms_norm(x, w, 1e-6, r)
            y0, h0 = rms_norm_ref(x, w, 1e-6, r)
            ulps = 4 if dtype == torch.float32 else 2
            step = ulps * torch.finfo(dtype).eps * y0.float().abs() + torch.finfo(dtype).tiny
            ok = torch.equal(h, h0) and bool(((y.float() - y0.float()).abs() <= step * 1.01).all())
            bad += not ok
            err = float((y.float() - y0.float()).abs().max())
            print(D, T, dtype, "ok" if ok else "MISMATCH", err)
print("RESULT PASS" if bad == 0 else f"RESULT FAIL {bad}")
""",
        "norm-gpu.log",
    )


@pytest.mark.parametrize("fused", [False, True])
def test_transformer_defers_each_layers_last_add_into_the_next_norm(monkeypatch, fused):
    """Transformer.forward leaves each layer's `x + mlp` to the next RMSNorm's residual add (the
    final norm's after the last layer): the same bits as the plain layer-by-layer sum, with the
    PyTorch norms and with the kernel chosen (the interpreter stands in for CUDA)."""
    from moeray.platform.model.transformer import Transformer

    cfg = tiny()
    model = Transformer(cfg)
    model.reset_parameters(seed=3)
    model = model.to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    residual_adds = []

    def choice(x, weight, residual=None):
        residual_adds.append(residual is not None)
        return fused and rms_norm_applies(x, weight, residual)

    monkeypatch.setattr(model_norm, "use_fused_norm", choice)
    with torch.no_grad():
        hidden = model(ids, return_mtp=False).hidden
        n_layers = len(model.model.layers)
        # one add per layer fused already (after attention), plus the deferred ones
        assert sum(residual_adds) == 2 * n_layers
        cos, sin = model.model.rotary_emb(torch.arange(5).expand(2, 5))
        x = model.model.embed_tokens(ids)
        for layer in model.model.layers:
            x = layer(x, cos, sin)
        plain = model.model.norm(x)
    assert torch.equal(hidden, plain)


def test_weight_before_the_wait_only_when_switched_on_and_not_copied(monkeypatch):
    """MOERAY_FUSED_NORM_W_EARLY=1: the kernel reads a contiguous weight before its PDL wait (the
    caller's own tensor), never a strided one (the .contiguous() copy made for the call) nor one
    the caller calls fresh (a cast made for the call); the same bits either way, with and without
    the residual add (bf16 rows, odd D)."""
    seen = []
    real = kernel_norm.w_early
    monkeypatch.setattr(kernel_norm, "w_early", lambda *a: seen.append(real(*a)) or seen[-1])
    g = torch.Generator().manual_seed(6)
    x, r = (torch.randn(3, 200, generator=g).bfloat16() for _ in range(2))
    w_wide = torch.randn(200, 2, generator=g).bfloat16()
    outs = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("MOERAY_FUSED_NORM_W_EARLY", switch)
        for w in (w_wide[:, 0].contiguous(), w_wide[:, 1]):
            outs[switch, w.is_contiguous()] = (rms_norm(x, w, 1e-6, r), rms_norm(x, w, 1e-6))
        rms_norm(x, w_wide[:, 0].contiguous(), 1e-6, fresh_w=True)
    assert seen == [False] * 5 + [True, True, False, False, False]
    for key in (True, False):
        for a, b in zip(outs["0", key], outs["1", key], strict=True):
            assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
