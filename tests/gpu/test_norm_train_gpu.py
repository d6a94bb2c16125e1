"""The fused RMSNorm's training path compiled on the GPU (moeray.kernels.norm.rms_norm when autograd
records) at Moonlight-16B-A3B and DeepSeek-V3 widths against torch.autograd through rms_norm_ref:
the layer norms (D 2048 / 7168, fp32 residual stream, a bf16 attention output added to it), the
LoRA norms (kv_a 512, q_a 1536, bf16 rows with an fp32 weight), 4096 tokens and an odd count.
Then a tiny model's training step under bf16 autocast with the kernels against
MOERAY_FUSED_NORM=0. Marker gpu."""

import pytest
import torch

from moeray.kernels.norm import rms_norm, rms_norm_ref
from moeray.platform.config import tiny
from moeray.platform.model.norm import use_fused_norm
from moeray.platform.model.transformer import Transformer
from moeray.platform.train import step as ts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

F32, BF16 = torch.float32, torch.bfloat16


def _close(out, ref, name, h_dtype):
    """As tests/kernels/test_norm_train.py: fp32 within fp32 rounding, else about one step of the
    coarser of the gradient's and h's dtype, relative to the largest value."""
    assert out.dtype == ref.dtype, name
    coarse = ref.dtype if ref.dtype != F32 else h_dtype
    eps = 1e-5 if coarse == F32 else 2 * torch.finfo(coarse).eps
    scale = float(ref.float().abs().max())
    torch.testing.assert_close(out.float(), ref.float(), rtol=eps, atol=eps * scale, msg=name)


@pytest.mark.parametrize("T", [4096, 4099])
@pytest.mark.parametrize(
    "D,dtypes",
    [
        (2048, (F32, F32, F32)),  # Moonlight's layer norms on the fp32 residual stream
        (2048, (BF16, F32, F32)),  # post-attention: a bf16 o_proj output + the fp32 stream
        (7168, (F32, F32, F32)),  # V3
        (7168, (BF16, F32, F32)),
        (512, (BF16, None, F32)),  # kv_a_layernorm on a bf16 latent, fp32 weight
        (1536, (BF16, None, F32)),  # V3's q_a_layernorm
        (2048, (BF16, BF16, BF16)),  # a bf16 model
    ],
)
def test_training_norm_matches_autograd_reference(T, D, dtypes):
    x_dtype, r_dtype, w_dtype = dtypes
    g = torch.Generator(device="cuda").manual_seed(D + T)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    x = (randn(T, D) * 3).to(x_dtype).requires_grad_()
    r = None if r_dtype is None else randn(T, D).to(r_dtype).requires_grad_()
    w = (1 + 0.1 * randn(D)).to(w_dtype).requires_grad_()
    assert use_fused_norm(x, w, r)
    y, h = rms_norm(x, w, 1e-6, r)
    y_ref, h_ref = rms_norm_ref(x, w, 1e-6, r)
    assert y.dtype == y_ref.dtype and torch.equal(h, h_ref)
    ulps = 4 if h_ref.dtype == F32 else 2
    step = ulps * torch.finfo(h_ref.dtype).eps * y_ref.detach().float().abs() * 1.01
    assert ((y - y_ref).detach().float().abs() <= step + 1e-30).all()
    dy = randn(T, D).to(y_ref.dtype)
    inputs = [t for t in (x, w, r) if t is not None]
    if r is None:
        grads, grads_ref = (torch.autograd.grad(o, inputs, dy) for o in (y, y_ref))
    else:
        dh = randn(T, D).to(h_ref.dtype)
        grads = torch.autograd.grad((y, h), inputs, (dy, dh))
        grads_ref = torch.autograd.grad((y_ref, h_ref), inputs, (dy, dh))
    for name, a, b in zip(["x", "weight", "residual"], grads, grads_ref, strict=False):
        _close(a, b, name, h_ref.dtype)


def _step_grads(monkeypatch, fused: bool):
    monkeypatch.setenv("MOERAY_FUSED_NORM", "1" if fused else "0")
    # Dense layers only, no MTP: a routed top-k flips an expert on a last-bit difference (a
    # different expert's whole gradient), which no tolerance on the norms' numerics can cover;
    # with the MoE layers in, one post-attention norm weight's gradient moved past 5% here.
    cfg = tiny()
    model = Transformer(
        cfg.replace(first_k_dense_replace=cfg.num_hidden_layers, num_nextn_predict_layers=0)
    )
    model.reset_parameters(seed=2)
    model = model.cuda()
    tokens = torch.randint(0, 1024, (2, 65), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = ts.compute_loss(model, tokens, ts.LossConfig()).total
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_training_step_with_fused_norms_under_autocast(monkeypatch):
    """bf16 autocast, fp32 parameters: the loss and every gradient near the PyTorch norms' (a
    normed row one bf16 step apart moves the bf16 GEMMs after it by about that much)."""
    loss_ref, ref = _step_grads(monkeypatch, fused=False)
    loss, out = _step_grads(monkeypatch, fused=True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-2, atol=1e-2)
    assert out.keys() == ref.keys()
    for k, g in ref.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(out[k], g, rtol=5e-2, atol=5e-2 * scale, msg=k)
