"""`recompute: [norm, mla_up]` on a GPU (train/recompute.py): the gradients equal those without
recompute, and the fused attention kernel's forward runs once per MLA either way (its outputs are
kept; only the up-projections and reshapes run again in the backward). Marker gpu."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moeray.platform.config import tiny
from moeray.platform.model.transformer import Transformer
from moeray.platform.train import step as ts
from moeray.platform.train.recompute import apply_recompute

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

_aten = torch.ops.aten
_FUSED = {
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


class _CountFused(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in _FUSED
        return func(*args, **(kwargs or {}))


def _grads(pieces):
    model = Transformer(tiny())
    model.reset_parameters(seed=2)
    apply_recompute(model, pieces)
    model = model.cuda()
    tokens = torch.randint(0, 1024, (2, 65), generator=torch.Generator().manual_seed(0)).cuda()
    count = _CountFused()
    with count:
        ts.compute_loss(model, tokens, ts.LossConfig()).total.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, count.calls


def test_recompute_on_gpu_keeps_the_attention_kernel_and_the_gradients():
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs: the two runs comparable
    try:
        base, calls = _grads(())
        again, calls_r = _grads(("norm", "mla_up"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    blocks = tiny().num_hidden_layers + tiny().num_nextn_predict_layers
    assert calls == calls_r == blocks  # one fused forward per MLA, none again in the backward
    for k, g in base.items():
        # the fused attention backward adds with atomics: equal up to fp32 summation order
        torch.testing.assert_close(again[k], g, rtol=1e-4, atol=1e-6, msg=k)
