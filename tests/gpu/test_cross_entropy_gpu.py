"""The fused cross-entropy compiled on the GPU (moeray.kernels.cross_entropy) at Moonlight's
vocabulary (T=4096 tokens, V=163,840) and DeepSeek-V3's (129,280), bf16 logits, against torch
autograd through cross_entropy_ref: the loss, the gradient (the reference's fp32 gradient rounded
to bf16, within one bf16 step), and the peak memory of forward+backward (the reference's fp32
copies, ~12 B a token and vocab entry, gone). Then a tiny model's training step under bf16
autocast, `compute_loss` with MTP, against MOERAY_FUSED_CROSS_ENTROPY=0. Marker gpu."""

import pytest
import torch

from moeray.kernels.cross_entropy import cross_entropy, cross_entropy_ref
from moeray.platform.config import tiny
from moeray.platform.loss import use_fused_cross_entropy
from moeray.platform.model.transformer import Transformer
from moeray.platform.train import step as ts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BF16 = torch.bfloat16
T = 4096


def _inputs(V, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(T, V, device="cuda", generator=g) * 3).to(BF16).requires_grad_()
    target = torch.randint(0, V, (T,), device="cuda", generator=g)
    target[::17] = -100
    return x, target


@pytest.mark.parametrize("T", [1, 33])
@pytest.mark.parametrize("V", [333, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_odd_shapes_compiled(T, V, dtype):
    """The interpreter tests' odd shapes, compiled (blocks ending inside a row, ignored rows)."""
    g = torch.Generator(device="cuda").manual_seed(T * V)
    logits = (torch.randn(T, V, device="cuda", generator=g) * 4).to(dtype)
    target = torch.randint(0, V, (T,), device="cuda", generator=g)
    if T > 1:
        target[::3] = -100
    xf = logits.float().requires_grad_()
    loss_ref = cross_entropy_ref(xf, target)
    (grad_f32,) = torch.autograd.grad(loss_ref, xf)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x * 1, target, inplace=True)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, x)
    if dtype == torch.float32:
        torch.testing.assert_close(grad, grad_f32, rtol=1e-5, atol=1e-7)
    else:
        want = grad_f32.to(BF16).float()
        assert ((grad.float() - want).abs() <= want.abs() * 2.0**-7 * 1.001 + 1e-30).all()


def _extra_peak(fn) -> tuple[object, int]:
    """(fn(), bytes allocated at the peak of fn beyond what was allocated before it)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("V", [163840, 129280])
def test_loss_grad_and_memory_against_the_reference(V):
    x, target = _inputs(V, seed=V)

    def ref():
        act = x * 1  # a non-leaf activation, as the head's output
        loss = cross_entropy_ref(act, target)
        (grad,) = torch.autograd.grad(loss, act)
        return loss.detach(), grad

    def fused(inplace):
        def run():
            act = x * 1
            loss = cross_entropy(act, target, inplace=inplace)
            (grad,) = torch.autograd.grad(loss, act)
            return loss.detach(), grad

        return run

    # the reference's fp32 gradient, to compare the bf16 ones with its rounding
    xf = x.detach().float().requires_grad_()
    (grad_f32,) = torch.autograd.grad(cross_entropy_ref(xf, target), xf)
    want = grad_f32.to(BF16).float()
    del xf, grad_f32
    (loss_ref, grad_ref), peak_ref = _extra_peak(ref)
    del grad_ref
    for inplace in (True, False):
        (loss, grad), peak = _extra_peak(fused(inplace))
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
        assert grad.dtype == BF16
        bad = (grad.float() - want).abs() > want.abs() * 2.0**-7 * 1.001 + 1e-30
        assert not bad.any(), f"{int(bad.sum())} entries more than 1 bf16 step off"
        assert (grad[target == -100] == 0).all()
        entry = T * V  # bytes per (token, vocab entry) below
        # in place: x * 1 (the activation, 2 B) is the gradient; otherwise one new bf16 tensor
        assert peak <= entry * (2 if inplace else 4) + (64 << 20), (inplace, peak / entry)
        # the reference's fp32 copy and log_softmax output (8 B) at least, more in its backward
        assert peak_ref - peak >= entry * 8, (inplace, peak_ref / entry, peak / entry)
        print(
            f"V={V} inplace={inplace}: extra peak {peak / 2**30:.2f} GiB fused vs "
            f"{peak_ref / 2**30:.2f} GiB reference ({peak_ref / entry:.1f} B a token and entry)"
        )
        del grad


def _step(monkeypatch, fused: bool):
    monkeypatch.setenv("MOERAY_FUSED_CROSS_ENTROPY", "1" if fused else "0")
    # dense layers only (a routed top-k flips on a last-bit difference), one MTP depth
    cfg = tiny()
    model = Transformer(cfg.replace(first_k_dense_replace=cfg.num_hidden_layers))
    model.reset_parameters(seed=3)
    model = model.cuda()
    tokens = torch.randint(0, 1024, (2, 65), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(tokens[:, :-1])
        assert use_fused_cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten()) is fused
        parts = ts.compute_loss(model, tokens, ts.LossConfig())
    parts.total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return parts, grads


def test_training_step_with_the_fused_loss_under_autocast(monkeypatch):
    """The forward is the same (the loss reads the logits only), so the same routing; the losses
    within fp32 rounding of each other, every gradient near PyTorch's (the logits' gradient is
    rounded to bf16 once in both, the MTP depth's scaled by 0.3 once more here)."""
    ref, ref_grads = _step(monkeypatch, fused=False)
    parts, grads = _step(monkeypatch, fused=True)
    assert parts.main == pytest.approx(ref.main, rel=1e-5)
    assert parts.mtp == pytest.approx(ref.mtp, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(grads[k], g, rtol=2e-2, atol=2e-2 * scale, msg=k)
