"""The SwiGLU elementwise kernel (moeray.kernels.swiglu) against its PyTorch reference under the
interpreter at odd shapes and dtypes; the model's one fast-path choice (model/moe.py
use_fused_swiglu); bit-equality compiled on the GPU (marker gpu)."""

import pytest
import torch

from moeray.kernels.swiglu import swiglu, swiglu_applies, swiglu_ref
from moeray.platform.model import moe as model_moe
from moeray.platform.model.moe import MLP


def _within_one_step(out, ref):
    """Under the interpreter the exp is numpy's, torch's CPU exp its own: an ulp of fp32 on silu,
    which can move a rounded result by one step of the dtype (twice: silu, then the product)."""
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=4e-7, atol=1e-30)
        return
    step = torch.finfo(ref.dtype).eps * ref.float().abs() + torch.finfo(ref.dtype).tiny
    assert ((out.float() - ref.float()).abs() <= 2 * step * 1.01).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 100), (1, 2100)])
def test_swiglu_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    gate = (torch.randn(shape, generator=g) * 4).to(dtype)
    up = torch.randn(shape, generator=g).to(dtype)
    out = swiglu(gate, up)
    ref = swiglu_ref(gate, up)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    _within_one_step(out, ref)


def test_swiglu_on_strided_rows_and_bad_input(monkeypatch):
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(4, 2, 40, generator=g)
    gate, up = wide[..., :16], wide[..., 20:36]  # rows that do not flatten without a copy
    _within_one_step(swiglu(gate, up), swiglu_ref(gate, up))
    with pytest.raises(ValueError, match="one shape"):
        swiglu(gate, up[..., :8])
    with pytest.raises(ValueError, match="up has dtype"):
        swiglu(gate, up.double())
    assert not swiglu_applies(gate, up.bfloat16())
    monkeypatch.setenv("MOERAY_FUSED_SWIGLU", "0")
    assert not swiglu_applies(gate, up)


def test_mlp_chooses_kernel_only_for_cuda_inference(monkeypatch):
    torch.manual_seed(0)
    mlp = MLP(24, 40).eval()
    x = torch.randn(3, 24)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    assert not model_moe.use_fused_swiglu(gate, up)  # CPU
    with torch.no_grad():
        ref = mlp(x)
        chosen = []

        def interpreter_choice(gate, up):
            chosen.append(swiglu_applies(gate, up))
            return chosen[-1]

        monkeypatch.setattr(model_moe, "use_fused_swiglu", interpreter_choice)
        out = mlp(x)
    assert chosen == [True]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert model_moe.use_fused_swiglu(gate.detach(), up.detach())
    assert not model_moe.use_fused_swiglu(gate, up)  # gradients wanted: the reference


@pytest.mark.gpu
def test_swiglu_compiled_on_gpu(compiled_check):
    compiled_check(
        """
import torch
from moeray.kernels.swiglu import swiglu, swiglu_ref
from moeray.platform.model.moe import use_fused_swiglu
bad = 0
for T in (1, 5, 64, 4099):
    for width in (7, 1408, 2816, 18432):
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            gate = (torch.randn(T, width, device="cuda") * 6).to(dtype)
            up = torch.randn(T, width, device="cuda").to(dtype)
            assert use_fused_swiglu(gate, up)
            ok = torch.equal(swiglu(gate, up), swiglu_ref(gate, up))
            bad += not ok
            if not ok:
                print("MISMATCH", T, width, dtype)
print("RESULT PASS" if bad == 0 else f"RESULT FAIL {bad}")
""",
        "swiglu-gpu.log",
    )
