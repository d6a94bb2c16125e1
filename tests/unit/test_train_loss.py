"""The training loss's chooser (moeray.platform.loss): CPU keeps exactly PyTorch's
cross-entropy on an fp32 copy; the fused kernel is for CUDA with autograd recording."""

import torch
import torch.nn.functional as F

from moeray.platform.loss import (
    fused_cross_entropy_planned,
    token_cross_entropy,
    use_fused_cross_entropy,
)


def test_cpu_is_pytorch_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 33, generator=g).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 33, (2, 5), generator=g)
    assert not use_fused_cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss = token_cross_entropy(logits, targets)
    ref = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    assert torch.equal(loss, ref)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad, torch.autograd.grad(ref, logits)[0])


def test_planned_on_cuda_unless_switched_off(monkeypatch):
    assert fused_cross_entropy_planned("cuda") and not fused_cross_entropy_planned("cpu")
    monkeypatch.setenv("MOERAY_FUSED_CROSS_ENTROPY", "0")
    assert not fused_cross_entropy_planned("cuda")
