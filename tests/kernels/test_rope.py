"""The Triton RoPE kernel (moeray.kernels.rope) against its PyTorch reference under the
interpreter: equal bits at odd shapes and dtypes, on strided slices as MLA passes them (the rope
part of the query projection, the rope key of the latent projection); under autograd the forward
and the gradient equal to autograd through `rope_ref` bit for bit, one launch each way, incoming
gradients of any layout; and the model's one fast-path choice (model/rope.py use_fused_rope), in
inference and training."""

import dataclasses

import pytest
import torch

from moeray.kernels import rope as kernel_rope
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


def test_model_chooses_kernel_for_cuda_inference_and_training(monkeypatch):
    # The choice lives in model/rope.py: CPU tensors (here) run the reference; CUDA the kernel,
    # with or without a gradient for x, unless the angles record one or MOERAY_FUSED_ROPE=0.
    x = torch.randn(1, 2, 3, 8)
    cos, sin = _cos_sin(1, 2, 8)
    assert not model_rope.use_fused_rope(x, cos, sin)  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert model_rope.use_fused_rope(x, cos, sin)
    assert model_rope.use_fused_rope(x.requires_grad_(), cos, sin)
    assert not model_rope.use_fused_rope(x, cos.requires_grad_(), sin)
    with torch.no_grad():  # angles that require grad but record nothing
        assert model_rope.use_fused_rope(x, cos, sin)
    monkeypatch.setenv("MOERAY_FUSED_ROPE", "0")
    assert not model_rope.use_fused_rope(x.detach(), cos.detach(), sin)
    assert not model_rope.use_fused_rope(x, cos.detach(), sin)


def _grads(fn, q, x, cos, sin, layout, seed):
    """(y, dq) of y = fn(x, cos, sin) for x a view of the leaf q, the incoming gradient dy laid
    out as `layout` says: contiguous, a slice of a wider gradient (what the concatenation with
    q_nope gives back), or without unit stride over R (a transposed consumer)."""
    y = fn(x, cos, sin)
    g = torch.Generator().manual_seed(seed)
    B, S, H, R = y.shape
    if layout == "contiguous":
        return y, torch.autograd.grad(y, q, torch.randn(B, S, H, R, generator=g).to(y.dtype))[0]
    if layout == "slice":
        wide = torch.cat([torch.zeros(B, S, H, 5, dtype=y.dtype), y], dim=-1)
        dwide = torch.randn(wide.shape, generator=g).to(y.dtype)
        return y, torch.autograd.grad(wide, q, dwide)[0]
    yt = y.transpose(-1, -2)
    return y, torch.autograd.grad(yt, q, torch.randn(yt.shape, generator=g).to(y.dtype))[0]


@pytest.mark.parametrize("layout", ["contiguous", "slice", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("B", "S", "H", "R"), [(3, 5, 7, 64), (1, 9, 3, 6), (5, 3, 1, 64), (3, 1, 5, 2)]
)
def test_rope_gradient_equals_autograd_through_reference(launch_spy, layout, dtype, B, S, H, R):
    # x is q's rope part as MLA slices it (q [B, S, H, N + R], N = 11): autograd through the
    # reference computes in fp32 and rounds once to x's dtype; so do the kernels.
    seed = B * 1000 + S * 100 + H * 10 + R
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, S, H, 11 + R, generator=g) * 3).to(dtype).requires_grad_()
    cos, sin = _cos_sin(B, S, R, start=500)
    grids = launch_spy(kernel_rope, "_rope_kernel")
    y, dq = _grads(rope, q, q[..., 11:], cos, sin, layout, seed)
    assert type(y.grad_fn).__name__ == "_RopeFunctionBackward"
    assert grids == [(B * S,)] * 2  # one launch forward, one backward
    y_ref, dq_ref = _grads(rope_ref, q, q[..., 11:], cos, sin, layout, seed)
    assert torch.equal(y, y_ref)
    assert dq.dtype == dtype and torch.equal(dq, dq_ref)
    assert not dq[..., :11].any()  # the nope part got nothing


def test_rope_gradient_of_the_shared_rope_key():
    # MLA's rope key: a [B, S, R] slice of the latent projection, unsqueezed to one head and
    # squeezed back, then broadcast to every head (a reduction in the backward).
    g = torch.Generator().manual_seed(3)
    B, S, H, C, R = 3, 7, 5, 9, 64
    kv = torch.randn(B, S, C + R, generator=g).bfloat16().requires_grad_()
    cos, sin = _cos_sin(B, S, R)
    dk = torch.randn(B, S, H, R, generator=g).bfloat16()
    grads = []
    for fn in (rope, rope_ref):
        pe = fn(kv[..., C:].unsqueeze(2), cos, sin).squeeze(2)
        grads.append(torch.autograd.grad(pe[:, :, None, :].expand(B, S, H, R), kv, dk)[0])
    assert torch.equal(grads[0], grads[1])


def test_rope_without_autograd_keeps_one_launch(launch_spy):
    q = torch.randn(2, 3, 4, 8, requires_grad=True)
    cos, sin = _cos_sin(2, 3, 8)
    grids = launch_spy(kernel_rope, "_rope_kernel")
    with torch.no_grad():
        y = rope(q, cos, sin)
    assert y.grad_fn is None and grids == [(6,)]
    y = rope(q.detach(), cos, sin)
    assert y.grad_fn is None and len(grids) == 2


def test_rope_angles_recording_a_gradient_take_the_reference(launch_spy):
    # the kernel gives cos/sin no gradient: angles that record one go through rope_ref, which does
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    cos, sin = (t.clone().requires_grad_() for t in _cos_sin(2, 3, 8))
    grids = launch_spy(kernel_rope, "_rope_kernel")
    y = rope(x, cos, sin)
    assert grids == [] and type(y.grad_fn).__name__ != "_RopeFunctionBackward"
    dy = torch.randn(y.shape)
    grads = torch.autograd.grad(y, (x, cos, sin), dy)
    grads_ref = torch.autograd.grad(rope_ref(x, cos, sin), (x, cos, sin), dy)
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.equal(a, b)


def test_rope_backward_refuses_a_second_order():
    # the backward launch records no graph: differentiating through it fails loudly instead of
    # giving a silent zero
    x = torch.randn(1, 2, 3, 8, requires_grad=True)
    cos, sin = _cos_sin(1, 2, 8)
    dy = torch.randn(1, 2, 3, 8, requires_grad=True)
    (dx,) = torch.autograd.grad(rope(x, cos, sin), x, dy, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_training_with_fused_rope_equals_reference(monkeypatch, launch_spy, dtype):
    """An MLA layer of tiny() in training (expanded path, autograd recording) with the kernel
    chosen for both rotations: the output and every parameter's gradient are the PyTorch path's
    bits, and both rotations ran `_RopeFunction`."""
    from moeray.platform.model.mla import MLA

    cfg = tiny()
    torch.manual_seed(0)
    mla = MLA(cfg, 0)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.1)
    mla = mla.to(dtype).train()
    x = torch.randn(2, 5, cfg.hidden_size).to(dtype).requires_grad_()
    cos, sin = RotaryEmbedding(cfg)(torch.arange(5).expand(2, 5))
    dout = torch.randn(2, 5, cfg.hidden_size).to(dtype)
    params = [x, *mla.parameters()]
    out_ref = mla(x, cos, sin)
    grads_ref = torch.autograd.grad(out_ref, params, dout, allow_unused=True)
    chosen = []

    def interpreter_choice(x, cos, sin):
        chosen.append(x.requires_grad and rope_applies(x, cos, sin))
        return chosen[-1]

    monkeypatch.setattr(model_rope, "use_fused_rope", interpreter_choice)
    grids = launch_spy(kernel_rope, "_rope_kernel")
    out = mla(x, cos, sin)
    assert len(chosen) == 2 and all(chosen) and len(grids) == 2
    grads = torch.autograd.grad(out, params, dout, allow_unused=True)
    assert len(grids) == 4  # both backward rotations ran the kernel
    assert torch.equal(out, out_ref)
    for a, b in zip(grads, grads_ref, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


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


@pytest.mark.gpu
def test_rope_backward_compiled_on_gpu(compiled_check):
    # Training on CUDA (the chooser takes the kernel with x requiring grad): forward and gradient
    # bit-equal to autograd through the reference compiled (FMA contraction off), on q's rope
    # slice at Moonlight's training shape (B 1, S 4096, 16 heads) and V3's 128 heads, odd shapes,
    # the shared rope key (one head, broadcast to all), the incoming gradient contiguous and as a
    # slice of the concatenation with q_nope.
    compiled_check(
        """
import torch
from moeray.kernels.rope import rope, rope_ref
from moeray.platform.model.rope import use_fused_rope
bad = 0
cases = ((1, 4096, 16, 128, 64), (2, 1024, 128, 128, 64), (3, 33, 5, 5, 6), (5, 7, 3, 11, 2))
for B, S, H, N, R in cases:
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        q = (torch.randn(B, S, H, N + R, device="cuda") * 4).to(dtype).requires_grad_()
        kv = (torch.randn(B, S, 512 + R, device="cuda") * 4).to(dtype).requires_grad_()
        pos = torch.randint(0, 100000, (B, S), device="cuda").float()
        ang = pos[..., None] * torch.rand(R // 2, device="cuda")
        cos, sin = ang.cos(), ang.sin()
        dq_BSHK = torch.randn(B, S, H, N + R, device="cuda").to(dtype)
        assert use_fused_rope(q[..., N:], cos, sin)
        outs = []
        for fn in (rope, rope_ref):
            q_pe = fn(q[..., N:], cos, sin)
            k_pe = fn(kv[..., 512:].unsqueeze(2), cos, sin).squeeze(2)
            wide = torch.cat([q[..., :N], q_pe], -1)
            loss_k = (k_pe[:, :, None, :].expand(B, S, H, R) * dq_BSHK[..., N:]).sum()
            grads = torch.autograd.grad((wide, loss_k), (q, kv), (dq_BSHK, None))
            outs.append((q_pe.detach(), k_pe.detach(), *grads, type(q_pe.grad_fn).__name__))
        (*got, name), (*ref, _) = outs
        ok = name == "_RopeFunctionBackward"
        ok = ok and all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
        bad += not ok
        if not ok:
            diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref)]
            print("MISMATCH", B, S, H, N, R, dtype, name, diffs)
print("RESULT PASS" if bad == 0 else f"RESULT FAIL {bad}")
""",
        "rope-train-gpu.log",
    )
