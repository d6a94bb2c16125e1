"""The Triton RoPE kernel (moeray.kernels.rope) against its PyTorch reference under the
interpreter: equal bits at odd shapes and dtypes, on strided slices as MLA passes them (the rope
part of the query projection, the rope key of the latent projection), and the model's one
fast-path choice (model/rope.py use_fused_rope)."""

import dataclasses

import pytest
import torch

from moeray.kernels.rope import MAX_HR, rope, rope_applies, rope_ref
from moeray.platform.config import tiny
from moeray.platform.model import rope as model_rope
from moeray.platform.model.rope import RotaryEmbedding


def _cos_sin(B, S, R, start=0):
    # tiny() has YaRN scaling on, so the angles are the model's own.
    cfg = dataclasses.replace(tiny(), qk_rope_head_dim=R)
    positions = torch.arange(start, start + S)[None].expand(B, S) + torch.arange(B)[:, None] * 7
    return RotaryEmbedding(cfg)(positions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("B", "S", "H", "R"), [(1, 1, 1, 2), (2, 3, 5, 8), (3, 2, 16, 64), (1, 7, 3, 6)]
)
def test_rope_equals_reference(dtype, B, S, H, R):
    g = torch.Generator().manual_seed(B * 100 + S * 10 + H)
    x = (torch.randn(B, S, H, R, generator=g) * 3).to(dtype)
    cos, sin = _cos_sin(B, S, R, start=1000)
    y = rope(x, cos, sin)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert torch.equal(y, rope_ref(x, cos, sin))


def test_rope_on_strided_slices():
    # q [B, S, H, N + R] split into nope and rope parts; kv [B, S, C + R] whose rope key is
    # unsqueezed to one head: both are read in place.
    g = torch.Generator().manual_seed(0)
    B, S, H, N, R, C = 2, 3, 4, 12, 8, 20
    q = torch.randn(B, S, H, N + R, generator=g).bfloat16()
    kv = torch.randn(B, S, C + R, generator=g).bfloat16()
    cos, sin = _cos_sin(B, S, R)
    q_pe = q[..., N:]
    k_pe = kv[..., C:].unsqueeze(2)
    assert torch.equal(rope(q_pe, cos, sin), rope_ref(q_pe, cos, sin))
    assert torch.equal(rope(k_pe, cos, sin), rope_ref(k_pe, cos, sin))


def test_rope_rejects_bad_inputs():
    x = torch.zeros(1, 2, 3, 8)
    cos, sin = _cos_sin(1, 2, 8)
    with pytest.raises(ValueError, match="cos/sin"):
        rope(x, cos[:, :1], sin[:, :1])
    with pytest.raises(ValueError, match="even R"):
        rope(torch.zeros(1, 2, 3, 7), cos, sin)
    with pytest.raises(ValueError, match="dtype"):
        rope(x.long(), cos, sin)
    with pytest.raises(ValueError, match="values per position"):
        rope(torch.zeros(1, 2, MAX_HR // 8 + 1, 8), cos, sin)
    assert not rope_applies(x, cos.double(), sin)


def test_model_chooses_kernel_only_for_cuda_inference(monkeypatch):
    # The choice lives in model/rope.py: CPU tensors (here) and tensors needing gradients run the
    # reference; CUDA inference the kernel unless MOERAY_FUSED_ROPE=0.
    x = torch.randn(1, 2, 3, 8)
    cos, sin = _cos_sin(1, 2, 8)
    assert not model_rope.use_fused_rope(x, cos, sin)  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert model_rope.use_fused_rope(x, cos, sin)
    assert not model_rope.use_fused_rope(x.requires_grad_(), cos, sin)
    monkeypatch.setenv("MOERAY_FUSED_ROPE", "0")
    assert not model_rope.use_fused_rope(x.detach(), cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_with_fused_rope_equals_reference(monkeypatch, dtype):
    """An MLA layer of tiny() (expanded and absorbed paths) with the kernel chosen for both
    rotations (the interpreter stands in for CUDA): the same bits as the PyTorch path."""
    from moeray.platform.model.mla import MLA

    cfg = tiny()
    torch.manual_seed(0)
    mla = MLA(cfg, 0)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.1)
    mla = mla.to(dtype).eval()
    x = torch.randn(2, 5, cfg.hidden_size).to(dtype)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(5).expand(2, 5))
    chosen = []

    def interpreter_choice(x, cos, sin):
        chosen.append(rope_applies(x, cos, sin))
        return chosen[-1]

    with torch.no_grad():
        refs = [mla(x, cos, sin), mla(x, cos, sin, absorbed=True)]
        monkeypatch.setattr(model_rope, "use_fused_rope", interpreter_choice)
        outs = [mla(x, cos, sin), mla(x, cos, sin, absorbed=True)]
    assert len(chosen) == 4 and all(chosen)
    for out, ref in zip(outs, refs, strict=True):
        assert torch.equal(out, ref)


@pytest.mark.gpu
def test_rope_compiled_on_gpu(compiled_check):
    # Bit-equal to the reference compiled on CUDA (FMA contraction off), on MLA's strided slices
    # at Moonlight (16 heads) and V3 (128 heads) widths.
    compiled_check(
        """
import torch
from moeray.kernels.rope import rope, rope_ref
from moeray.platform.model.rope import use_fused_rope
bad = 0
for H, N, R in ((16, 128, 64), (128, 128, 64), (3, 5, 6), (1, 512, 64)):
    for B, S in ((1, 1), (5, 2), (3, 33), (64, 1)):
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            q = (torch.randn(B, S, H, N + R, device="cuda") * 4).to(dtype)
            pos = torch.randint(0, 100000, (B, S), device="cuda").float()
            ang = pos[..., None] * torch.rand(R // 2, device="cuda")
            cos, sin = ang.cos(), ang.sin()
            x = q[..., N:]
            assert use_fused_rope(x, cos, sin)
            ok = torch.equal(rope(x, cos, sin), rope_ref(x, cos, sin))
            bad += not ok
            if not ok:
                print("MISMATCH", H, N, R, B, S, dtype)
print("RESULT PASS" if bad == 0 else f"RESULT FAIL {bad}")
""",
        "rope-gpu.log",
    )
