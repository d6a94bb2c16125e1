"""The fused cross-entropy (moeray.kernels.cross_entropy) under the interpreter against torch
autograd through `cross_entropy_ref`: odd T and V, blocks that end inside a row, ignored rows, in
place and into a new tensor, the backward's scale, and the wrapper's errors."""

import math

import pytest
import torch

from moeray.kernels import cross_entropy as ce
from moeray.kernels.cross_entropy import cross_entropy, cross_entropy_applies, cross_entropy_ref

F32, BF16 = torch.float32, torch.bfloat16


def _case(T, V, dtype, seed, ignore_every=0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, V, generator=g) * 4).to(dtype)
    target = torch.randint(0, V, (T,), generator=g)
    if ignore_every:
        target[::ignore_every] = ignore_index
    return logits, target


def _ref(logits, target, ignore_index=-100, scale=1.0):
    """(loss, fp32 gradient of the logits) by torch autograd through the reference."""
    x = logits.detach().float().requires_grad_()
    loss = cross_entropy_ref(x, target, ignore_index)
    (loss * scale).backward()
    return loss.detach(), x.grad


def _check_grad(grad, grad_ref_f32, dtype):
    """fp32: within fp32 rounding. bf16: the reference's fp32 gradient rounded to bf16, within
    one bf16 step of it."""
    assert grad.dtype == dtype
    if dtype == F32:
        torch.testing.assert_close(grad, grad_ref_f32, rtol=1e-5, atol=1e-7)
        return
    want = grad_ref_f32.to(dtype).float()
    # one bf16 ulp of the rounded value (2^-7 relative); 1e-30 absolute for exact zeros
    ulp = want.abs() * 2.0**-7 + 1e-30
    bad = (grad.float() - want).abs() > ulp * 1.001
    assert not bad.any(), (grad.float()[bad][:5], want[bad][:5])


@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("V", [1000, 333, 4097])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("inplace", [False, True])
def test_loss_and_grad_match_autograd_reference(T, V, dtype, inplace):
    logits, target = _case(T, V, dtype, seed=T * V, ignore_every=3 if T > 1 else 0)
    loss_ref, grad_ref = _ref(logits, target)
    x = logits.clone().requires_grad_()
    inp = x * 1 if inplace else x  # a non-leaf activation, as the model's head output is
    # 256-entry blocks: every V here ends inside a block, 4097 crosses 16 of them
    loss = cross_entropy(inp, target, inplace=inplace, block=256)
    assert loss.dtype == F32 and loss.shape == ()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    _check_grad(x.grad, grad_ref, dtype)
    ignored = target == -100
    assert (x.grad[ignored] == 0).all()
    if not inplace:
        assert torch.equal(x.detach(), logits)  # the logits are left alone


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_default_block_and_scaled_backward(dtype):
    """The default block (4096) at V=4097 and a backward scaled by 0.3 (an MTP depth's weight),
    with another ignore_index."""
    logits, target = _case(5, 4097, dtype, seed=1, ignore_every=2, ignore_index=7)
    loss_ref, grad_ref = _ref(logits, target, ignore_index=7, scale=0.3)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x * 1, target, ignore_index=7, inplace=True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    (loss * 0.3).backward()
    if dtype == F32:
        _check_grad(x.grad, grad_ref, dtype)
    else:  # rounded twice (the gradient, then the scaled gradient): within 2 bf16 steps
        want = grad_ref.to(dtype).float()
        assert ((x.grad.float() - want).abs() <= want.abs() * 2.0**-6 + 1e-30).all()


def test_sum_of_losses_accumulates_gradients():
    """Two losses on one tensor (as the main head and an MTP depth add into the total): each
    backward scales its own saved gradient."""
    logits, target = _case(6, 333, F32, seed=2)
    x = logits.clone().requires_grad_()
    (cross_entropy(x, target) + 0.5 * cross_entropy(x, target.flip(0))).backward()
    xr = logits.clone().requires_grad_()
    (cross_entropy_ref(xr, target) + 0.5 * cross_entropy_ref(xr, target.flip(0))).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-7)


def test_inplace_overwrites_the_logits_and_moves_their_version():
    logits, target = _case(4, 1000, BF16, seed=3)
    x = logits.clone().requires_grad_()
    act = x * 1
    version = act._version
    loss = cross_entropy(act, target, inplace=True)
    assert act._version > version
    assert not torch.equal(act.detach(), logits)  # now the (unscaled) gradient
    loss.backward()
    assert torch.equal(x.grad, act.detach())  # one tensor: the gradient in the logits' memory


def test_inplace_over_logits_a_backward_needs_fails_loudly():
    """exp saves its output: writing the gradient over it must not go unnoticed."""
    logits, target = _case(3, 333, F32, seed=4)
    x = logits.clone().requires_grad_()
    act = x.exp()
    loss = cross_entropy(act, target, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_gives_the_loss_and_leaves_the_logits():
    logits, target = _case(7, 1000, BF16, seed=5, ignore_every=2)
    x = logits.clone()
    with torch.no_grad():
        loss = cross_entropy(x, target, inplace=True)
    assert torch.equal(x, logits)
    torch.testing.assert_close(loss, cross_entropy_ref(logits, target), rtol=1e-5, atol=1e-6)


def test_all_rows_ignored_gives_nan_and_zero_grad():
    logits, _ = _case(3, 100, F32, seed=6)
    target = torch.full((3,), -100)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target)
    assert math.isnan(loss.item()) and math.isnan(cross_entropy_ref(logits, target).item())
    loss.backward()
    assert (x.grad == 0).all()


def test_target_out_of_range_gives_nan_not_a_fault():
    logits, target = _case(3, 100, F32, seed=7)
    target[1] = 100
    assert math.isnan(cross_entropy(logits, target).item())


def test_rows_with_a_stride():
    """A slice of wider rows (unit stride over V, row stride V+5) computed in place."""
    full, target = _case(4, 105, F32, seed=8)
    loss_ref, grad_ref = _ref(full[:, :100], target.clamp(max=99))
    x = full.clone().requires_grad_()
    wide = x * 1
    loss = cross_entropy(wide[:, :100], target.clamp(max=99), inplace=True, block=32)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(x.grad[:, :100], grad_ref, rtol=1e-5, atol=1e-7)
    assert (x.grad[:, 100:] == 0).all()


def test_launches_one_forward_program_a_row_and_skips_scale_at_one(launch_spy):
    fwd = launch_spy(ce, "_cross_entropy_fwd_kernel")
    scale = launch_spy(ce, "_scale_kernel")
    logits, target = _case(5, 333, BF16, seed=9)
    x = logits.clone().requires_grad_()
    cross_entropy(x * 1, target, inplace=True).backward()
    assert fwd == [(5,)] and scale == [(5, 1)]


def test_applies_and_errors():
    logits, target = _case(3, 10, BF16, seed=10)
    assert cross_entropy_applies(logits, target)
    assert not cross_entropy_applies(logits.t(), target)
    assert not cross_entropy_applies(logits, target.int())
    assert not cross_entropy_applies(logits.half().to(torch.float64), target)
    with pytest.raises(ValueError, match=r"logits has dtype torch.float64"):
        cross_entropy(logits.double(), target)
    with pytest.raises(ValueError, match=r"target has dtype torch.int32"):
        cross_entropy(logits, target.int())
    with pytest.raises(ValueError, match=r"target has shape \(4,\), expected \(3,\)"):
        cross_entropy(logits, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"logits must have 2 dims"):
        cross_entropy(logits[None], target)
    with pytest.raises(ValueError, match=r"stride 3 over V"):
        cross_entropy(torch.zeros(10, 3, dtype=BF16).t(), target)
    with pytest.raises(ValueError, match=r"V=0"):
        cross_entropy(torch.zeros(3, 0, dtype=BF16), target)


def test_switch_off(monkeypatch):
    logits, target = _case(3, 10, BF16, seed=11)
    monkeypatch.setenv("MOERAY_FUSED_CROSS_ENTROPY", "0")
    assert not cross_entropy_applies(logits, target)
