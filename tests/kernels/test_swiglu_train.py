"""The training SwiGLU kernels (moeray.kernels.swiglu_train) under the interpreter, at odd shapes
(P 0, 1, 37, 130; I 96, 128, 176, 320: ragged and whole 128-wide groups) on row-strided views of a
[P, 2I] tensor, fp32, bf16 and fp16: outputs bit-equal to the CUDA formulas evaluated here in
PyTorch with the interpreter's exp (numpy's), within two rounding steps of PyTorch's own ops (the
references, whose CPU exp differs by an ulp), quantized outputs bit-equal to act_quant of the
returned tensors; bad inputs refused by name; the experts' autograd node (experts_mlp) running them
on its grouped paths, one launch each way; and bit-equality with PyTorch's CUDA ops and act_quant,
compiled on the GPU (marker gpu)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moeray.kernels import swiglu_train as kmod
from moeray.kernels.common import FP8_DTYPE
from moeray.kernels.fp8 import act_quant
from moeray.kernels.fp8 import quant as quant_mod
from moeray.kernels.swiglu_train import (
    swiglu_bwd,
    swiglu_bwd_ref,
    swiglu_fwd,
    swiglu_fwd_ref,
    swiglu_train_applies,
    use_fused_swiglu_train,
)

SHAPES = [(P, width) for P in (0, 1, 37, 130) for width in (96, 128, 176, 320)]
DTYPES = (torch.float32, torch.bfloat16)


def _inputs(P, width, dtype, seed):
    """g, u: the halves of one [P, 2I] tensor (row stride 2I), g spread over +-12 with the exp's
    edge cases in row 0 (0, overflow of exp(-g) at -100, silu_backward's zero near -1.278); dh
    contiguous."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(P, 2 * width, generator=gen) * torch.tensor([4.0] * width + [1.0] * width)
    if P:
        wide[0, :6] = torch.tensor([0.0, -100.0, 100.0, -1.278, 88.0, -88.0])
    wide = wide.to(dtype)
    dh = torch.randn(P, width, generator=gen).to(dtype)
    return dh, wide[:, :width], wide[:, width:]


def _neg_exp(x):
    """exp(-x) of fp32 x as the interpreter's tl.exp computes it: numpy's exp."""
    return torch.from_numpy(np.exp(-x.numpy()))


def _div(a, b):
    return torch.div(a, b)  # one IEEE fp32 division (a `1 / t` would be a reciprocal times 1)


def _fma(a, b, c):
    """fp32 a * b + c rounded once. In fp64 the product is exact; the sum's rounding error (Knuth's
    TwoSum, exact) decides the one case where rounding that sum to fp32 goes wrong: a sum exactly
    halfway between two fp32 values."""
    p, c = a.double() * b.double(), c.double()
    s = p + c
    t = s - p
    err = (p - (s - t)) + (c - t)
    r = s.float()
    half = s - r.double()
    away = torch.nextafter(r, torch.where(half > 0, torch.inf, -torch.inf))
    tie = (half != 0) & (2 * half == away.double() - r.double())
    return torch.where(tie & (err * half > 0), away, r)


def _cuda_fwd(g, u):
    """h as the GPU kernel computes it (PyTorch's CUDA silu and multiply), the exp numpy's."""
    gf = g.float()
    act = _div(gf, 1 + _neg_exp(gf)).to(g.dtype)
    return (act.float() * u.float()).to(g.dtype)


def _cuda_bwd(dh, g, u):
    """(dg, du) as the GPU kernel computes them: `dh * u` rounded, CUDA's silu_backward with its
    `1 + x * (1 - s)` one fma, `dh * silu(g)` with silu rounded; the exp numpy's."""
    gf = g.float()
    e = _neg_exp(gf)
    s = _div(torch.ones_like(gf), 1 + e)
    dhu = (dh.float() * u.float()).to(g.dtype).float()
    dg = (dhu * s * _fma(gf, 1 - s, torch.ones_like(gf))).to(g.dtype)
    du = (dh.float() * _div(gf, 1 + e).to(g.dtype).float()).to(g.dtype)
    return dg, du


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_bits(out, want, name):
    assert out.dtype == want.dtype and out.shape == want.shape, name
    diff = int((_bits(out) != _bits(want)).sum())
    assert diff == 0, f"{name}: {diff} of {out.numel()} elements differ"


def _assert_quant_of(pair, x, name):
    """(q, s) is act_quant(x, scale_col_major=True) bit for bit, in its layout."""
    q, s = act_quant(x, scale_col_major=True)
    assert pair[1].stride() == s.stride() and pair[1].shape == s.shape, name
    _assert_bits(pair[0], q, f"{name} e4m3")
    _assert_bits(pair[1], s, f"{name} scales")


def _near(out, ref, slack_PI=0.0):
    """out as near ref as their exps allow: under the interpreter the exp is numpy's, in PyTorch's
    CPU ops their own, an ulp or two of fp32 apart; bf16 and fp16 results can then move by a step
    of their dtype, twice (silu, then the product); fp32 ones by ~3 ulp (4e-7, as test_swiglu.py);
    plus slack_PI."""
    rel = 4e-7 if ref.dtype == torch.float32 else 2.02 * torch.finfo(ref.dtype).eps
    bound = rel * ref.float().abs() + torch.finfo(ref.dtype).tiny + slack_PI
    assert bool(((out.float() - ref.float()).abs() <= bound).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("P", "width"), SHAPES)
def test_swiglu_fwd(dtype, P, width):
    _, g, u = _inputs(P, width, dtype, seed=P * 1000 + width)
    assert g.stride() == u.stride() == (2 * width, 1)
    h = swiglu_fwd(g, u)
    assert h.shape == (P, width) and h.dtype == dtype and h.is_contiguous()
    _assert_bits(h, _cuda_fwd(g, u), "h")
    _near(h, swiglu_fwd_ref(g, u))
    h2, hq, hs = swiglu_fwd(g, u, quant=True)
    _assert_bits(h2, h, "h with quant")
    assert hq.dtype == FP8_DTYPE and hs.dtype == torch.float32
    assert hs.shape == (P, -(-width // 128)) and (P == 0 or hs.stride() == (1, P))
    _assert_quant_of((hq, hs), h, "h")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("P", "width"), SHAPES)
def test_swiglu_bwd(dtype, P, width):
    dh, g, u = _inputs(P, width, dtype, seed=P * 1000 + width + 1)
    dg, du = swiglu_bwd(dh, g, u)
    for t in (dg, du):
        assert t.shape == (P, width) and t.dtype == dtype and t.is_contiguous()
    want_dg, want_du = _cuda_bwd(dh, g, u)
    _assert_bits(dg, want_dg, "dg")
    _assert_bits(du, want_du, "du")
    ref_dg, ref_du = swiglu_bwd_ref(dh, g, u)
    # dg: torch's CPU silu_backward has its own exp and no fma; near its zero (g ~ -1.278) those
    # ulps are large against 1 + g (1 - s): up to an ulp of fp32 of (dh u)(1 + |g|), absolute
    # (measured 0.75), here 4
    dhu = (dh.float() * u.float()).to(dtype).float()
    _near(dg, ref_dg, 4 * 2.0**-23 * dhu.abs() * (1 + g.float().abs()))
    _near(du, ref_du)
    dg2, du2, dgq, duq = swiglu_bwd(dh, g, u, quant=True)
    _assert_bits(dg2, dg, "dg with quant")
    _assert_bits(du2, du, "du with quant")
    _assert_quant_of(dgq, dg, "dg")
    _assert_quant_of(duq, du, "du")


@pytest.mark.parametrize(("P", "width"), [(0, 128), (37, 128), (130, 256), (37, 96)])
def test_swiglu_bwd_side_by_side(P, width):
    """cat: dg and du in one [P, 2I] tensor and its act_quant, for the input-grad GEMM of gate
    and up as one weight: the same bits as the separate outputs, side by side."""
    dh, g, u = _inputs(P, width, torch.bfloat16, seed=P + width)
    dg, du = swiglu_bwd(dh, g, u)
    dgu = swiglu_bwd(dh, g, u, cat=True)
    assert dgu.shape == (P, 2 * width) and dgu.is_contiguous()
    _assert_bits(dgu, torch.cat([dg, du], 1), "dgu")
    if width % 128:
        with pytest.raises(ValueError, match=r"I a multiple of 128 .*got I=96"):
            swiglu_bwd(dh, g, u, cat=True, quant=True)
        return
    dgu2, pair = swiglu_bwd(dh, g, u, cat=True, quant=True)
    _assert_bits(dgu2, dgu, "dgu with quant")
    _assert_quant_of(pair, dgu, "dgu")


def test_fp16_and_contiguous_inputs():
    dh, g, u = _inputs(37, 320, torch.float16, seed=5)
    g, u = g.contiguous(), u.contiguous()
    h, hq, hs = swiglu_fwd(g, u, quant=True)
    _assert_bits(h, _cuda_fwd(g, u), "h")
    _assert_quant_of((hq, hs), h, "h")
    dg, du, dgq, duq = swiglu_bwd(dh, g, u, quant=True)
    want_dg, want_du = _cuda_bwd(dh, g, u)
    _assert_bits(dg, want_dg, "dg")
    _assert_bits(du, want_du, "du")
    _assert_quant_of(dgq, dg, "dg")
    _assert_quant_of(duq, du, "du")


def test_one_launch_a_call(launch_spy):
    fwd = launch_spy(kmod, "_swiglu_fwd_kernel")
    bwd = launch_spy(kmod, "_swiglu_bwd_kernel")
    dh, g, u = _inputs(37, 320, torch.bfloat16, seed=6)
    swiglu_fwd(g, u, quant=True)
    swiglu_bwd(dh, g, u, quant=True)
    # BLOCK_M rows x one 128-wide group a program
    assert fwd == bwd == [(-(-37 // kmod.BLOCK_M), 3)]
    swiglu_fwd(g[:0], u[:0])  # P = 0: nothing to launch
    assert len(fwd) == 1


@pytest.mark.parametrize("block_m", [1, 8, 64])
def test_rows_a_program_change_no_bit(launch_spy, block_m):
    fwd = launch_spy(kmod, "_swiglu_fwd_kernel")
    dh, g, u = _inputs(37, 176, torch.bfloat16, seed=10)
    want_h = swiglu_fwd(g, u, quant=True)
    want_d = swiglu_bwd(dh, g, u, quant=True)
    got_h = swiglu_fwd(g, u, quant=True, block_m=block_m)
    got_d = swiglu_bwd(dh, g, u, quant=True, block_m=block_m)
    assert fwd[-1] == (-(-37 // block_m), 2)
    for name, a, b in zip(("h", "hq", "hs"), got_h, want_h, strict=True):
        _assert_bits(a, b, name)
    for name, a, b in zip(("dg", "du"), got_d[:2], want_d[:2], strict=True):
        _assert_bits(a, b, name)
    for name, a, b in zip(("dg", "du"), got_d[2:], want_d[2:], strict=True):
        _assert_bits(a[0], b[0], f"{name} e4m3")
        _assert_bits(a[1], b[1], f"{name} scales")


def test_bad_inputs_are_refused_by_name():
    dh, g, u = _inputs(5, 96, torch.float32, seed=7)
    cases = [
        (lambda: swiglu_fwd(g, u.double()), "u has dtype torch.float64, g torch.float32"),
        (lambda: swiglu_fwd(g.double(), u.double()), "g has dtype torch.float64; accepted"),
        (lambda: swiglu_fwd(g, u[:, :64]), r"u has shape \(5, 64\), g \(5, 96\)"),
        (lambda: swiglu_fwd(g[0], u[0]), r"g must have 2 dims, got shape \(96,\)"),
        (lambda: swiglu_fwd(g.t(), u.t()), "g has strides .*unit stride along I"),
        (lambda: swiglu_fwd(g[:, :0], u[:, :0]), "I must be >= 1"),
        (lambda: swiglu_bwd(dh.bfloat16(), g, u), "g has dtype torch.float32, dh torch.bfloat16"),
        (lambda: swiglu_bwd(dh, g, u[:4]), r"u has shape \(4, 96\), dh \(5, 96\)"),
        (lambda: swiglu_bwd(dh[:, ::2], g[:, ::2], u[:, ::2]), "dh has strides"),
        (lambda: swiglu_bwd(dh.tolist(), g, u), "dh must be a torch.Tensor"),
        (lambda: swiglu_fwd(g, u, block_m=24), "block_m=24; accepted: 1, 2, 4"),
        (lambda: swiglu_bwd(dh, g, u, block_m=256), "block_m=256; accepted"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_the_choice(monkeypatch):
    dh, g, u = _inputs(5, 96, torch.bfloat16, seed=8)
    assert swiglu_train_applies(g, u) and swiglu_train_applies(dh, g, u)  # interpreter
    assert not swiglu_train_applies(dh.float(), g, u)
    assert not swiglu_train_applies(g[:, ::2], u[:, ::2])
    assert not swiglu_train_applies(g[:, :0], u[:, :0])
    assert not swiglu_train_applies(g, u[:4])
    assert not use_fused_swiglu_train(g, u)  # the experts' choice: CUDA only
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not swiglu_train_applies(g, u)  # CPU, compiled: PyTorch
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert use_fused_swiglu_train(g, u) and use_fused_swiglu_train(dh, g, u)
    assert not use_fused_swiglu_train(dh.float(), g, u)
    monkeypatch.setenv("MOERAY_FUSED_SWIGLU_TRAIN", "0")
    assert not use_fused_swiglu_train(g, u)


def _autograd_loop(x, w1, w3, w2, rows):
    """The experts' math by autograd through PyTorch's ops, one expert at a time."""
    ys, start = [], 0
    for e, n in enumerate(rows):
        x_e = x[start : start + n]
        ys.append((F.silu(x_e @ w1[e].t()) * (x_e @ w3[e].t())) @ w2[e].t())
        start += n
    return torch.cat(ys)


def _experts(rows, seed, *, loop=False, inter=160, **kw):
    """experts_mlp (or `_autograd_loop`) forward + backward: (y, dx, dW1, dW3, dW2). D 128, the
    expert width `inter` (160: a ragged 128-wide group, gate and up apart in FP8; 128: one
    weight)."""
    from moeray.platform import fp8 as f8
    from moeray.platform.parallel.experts_mlp import experts_mlp

    gen = torch.Generator().manual_seed(seed)
    D = 128
    x = torch.randn(sum(rows), D, generator=gen).bfloat16().float().requires_grad_()
    shapes = ((inter, D), (inter, D), (D, inter))
    ws = [(torch.randn(len(rows), *s, generator=gen) * 0.2).requires_grad_() for s in shapes]
    if kw.get("fp8"):
        kw["cache"] = f8.WeightCache()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(kw.get("fp8"))):
        y = _autograd_loop(x, *ws, rows) if loop else experts_mlp(x, *ws, rows, **kw)
    (y.float() * torch.linspace(-1, 1, D)).sum().backward()
    return [y.detach().float(), x.grad, *(w.grad for w in ws)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_grouped", "fp8_grouped"])
def test_experts_run_the_kernels(monkeypatch, launch_spy, fp8):
    """The grouped experts (experts_mlp: `GroupedExperts` on fp32 rows, any dtype on CPU; the
    grouped FP8 path under bf16 autocast), given the kernels (their choice takes CUDA tensors
    only, `use_fused_swiglu_train` says why: here the interpreter's), run one forward and one
    backward launch, with quant on the FP8 path, where act_quant then runs only on x and dy.
    Against MOERAY_FUSED_SWIGLU_TRAIN=0 (PyTorch's ops and act_quant through the same wiring):
    equal up to the interpreter's exp (fp32: measured 5e-8; FP8: 0 here, but an ulp of bf16 in
    h, dg or du could flip an e4m3 step). Against an independent path, which catches what both
    share (say dg's quantization given to W3's GEMM): autograd through PyTorch's ops per expert
    (fp32: measured 5e-8), or the per-expert FP8 emulation, which keeps PyTorch's SwiGLU (no
    launch) and is as far as in test_fp8_grouped.py (measured 0.02, bound 5%)."""
    monkeypatch.setattr(kmod, "use_fused_swiglu_train", swiglu_train_applies)
    # ragged experts around one without rows; on the FP8 path each non-empty one is a 128-row
    # block of every interpreted GEMM (P 256; with a fourth expert of 3 rows 384: 15 s, not 9)
    rows = [5, 0, 19]
    # FP8 at expert width 128: gate and up as one weight, [dg, du] side by side with one
    # quantization (and half the interpreted GEMM tiles of 160)
    kw = dict(fp8=True, grouped_fp8=True, inter=128) if fp8 else {}
    fwd = launch_spy(kmod, "_swiglu_fwd_kernel")
    bwd = launch_spy(kmod, "_swiglu_bwd_kernel")
    quants = launch_spy(quant_mod, "_act_quant_kernel")
    got = _experts(rows, seed=9, **kw)
    assert len(fwd) == len(bwd) == 1
    assert len(quants) == (2 if fp8 else 0)  # x forward, dy backward
    assert all(got[i][1].abs().max() == 0 for i in (2, 3, 4))  # expert 1 has no rows
    other = (
        _experts(rows, seed=9, fp8=True, inter=128) if fp8 else _experts(rows, seed=9, loop=True)
    )
    assert len(fwd) == len(bwd) == 1
    for name, a, b in zip(("y", "dx", "dW1", "dW3", "dW2"), got, other, strict=True):
        assert _rel(a, b) < (5e-2 if fp8 else 1e-5), name
    monkeypatch.setenv("MOERAY_FUSED_SWIGLU_TRAIN", "0")
    quants.clear()
    want = _experts(rows, seed=9, **kw)
    assert len(fwd) == len(bwd) == 1
    assert len(quants) == (4 if fp8 else 0)  # x, h; dy, [dg, du] (one weight: one tensor)
    for name, a, b in zip(("y", "dx", "dW1", "dW3", "dW2"), got, want, strict=True):
        assert _rel(a, b) < (2e-2 if fp8 else 1e-6), name


@pytest.mark.gpu
def test_swiglu_train_compiled_on_gpu(compiled_check):
    # Compiled on CUDA: swiglu_fwd / swiglu_bwd bit-equal to PyTorch's CUDA ops (F.silu(g) * u;
    # silu_backward(dh * u, g) and dh * F.silu(g)) and their quantizations to act_quant of the
    # returned tensors, at Moonlight's expert width (P 4,133 rows, I 1408) and odd shapes, fp32,
    # bf16 and fp16, on the halves of a [P, 2I] tensor, outputs over freed NaN memory (an
    # unwritten element shows); the exp's edge cases in row 0. Then the routed experts
    # (experts_mlp, BF16 and FP8 grouped paths, Moonlight's widths) give the same bits with the
    # kernels as with MOERAY_FUSED_SWIGLU_TRAIN=0 (each output where two fused runs agree).
    compiled_check(
        """
import os
import torch
import torch.nn.functional as F
from moeray.kernels import swiglu_train as sw
from moeray.kernels.fp8 import act_quant
from moeray.kernels.swiglu_train import swiglu_bwd, swiglu_fwd, use_fused_swiglu_train
from moeray.platform import fp8 as f8
from moeray.platform.parallel.experts_mlp import experts_mlp

def same(a, b, layout=False):  # e4m3 compared as bytes; with layout the strides too (scales)
    return a.shape == b.shape and (not layout or a.stride() == b.stride()) and torch.equal(
        a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
        b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)

bad = 0
for P, I in ((4096 + 37, 1408), (130, 320), (37, 96), (1, 200)):
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        spread = torch.tensor([4.0] * I + [1.0] * I, device="cuda")
        wide = torch.randn(P, 2 * I, device="cuda") * spread
        wide[0, :6] = torch.tensor([0.0, -100.0, 100.0, -1.278, 88.0, -88.0], device="cuda")
        wide = wide.to(dtype)
        g, u = wide[:, :I], wide[:, I:]
        dh = torch.randn(P, I, device="cuda").to(dtype)
        assert use_fused_swiglu_train(dh, g, u)
        h_r = F.silu(g) * u
        dg_r, du_r = torch.ops.aten.silu_backward(dh * u, g), dh * F.silu(g)
        torch.empty(1 << 28, device="cuda").fill_(float("nan"))
        h = swiglu_fwd(g, u)
        h2, hq, hs = swiglu_fwd(g, u, quant=True)
        dg, du = swiglu_bwd(dh, g, u)
        dg2, du2, dgq, duq = swiglu_bwd(dh, g, u, quant=True)
        outs = (("h", h, h2, h_r), ("dg", dg, dg2, dg_r), ("du", du, du2, du_r))
        for name, out, again, ref in outs:
            if not (same(out, ref) and same(again, ref)):
                bad += 1
                print("MISMATCH", name, P, I, dtype, int((out != ref).sum()), "of", out.numel(),
                      "differ, max", float((out.float() - ref.float()).abs().max()))
        for name, pair, ref in (("h", (hq, hs), h_r), ("dg", dgq, dg_r), ("du", duq, du_r)):
            q, s = act_quant(ref, scale_col_major=True)
            if not (same(pair[0], q) and same(pair[1], s, layout=True)):
                bad += 1
                print("MISMATCH quant of", name, P, I, dtype)

calls = []  # the experts reach the kernels through the module (experts_mlp's `sw.`)
for name in ("swiglu_fwd", "swiglu_bwd"):
    real = getattr(sw, name)
    setattr(sw, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))

def experts(fused, **kw):
    os.environ["MOERAY_FUSED_SWIGLU_TRAIN"] = "1" if fused else "0"
    calls.clear()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, D, I = [700, 0, 1300, 37, 900, 1, 2000, 555], 2048, 1408
    x = torch.randn(sum(rows), D, device="cuda", generator=gen).bfloat16().requires_grad_()
    shapes = ((I, D), (I, D), (D, I))
    ws = [(torch.randn(len(rows), *s, device="cuda", generator=gen) * 0.02).requires_grad_()
          for s in shapes]
    if kw:
        kw = dict(kw, cache=f8.WeightCache())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = experts_mlp(x, *ws, rows, **kw)
    y.backward(torch.randn(y.shape, device="cuda", generator=gen, dtype=y.dtype))
    if calls != (["swiglu_fwd", "swiglu_bwd"] if fused else []):
        print("KERNELS NOT AS ASKED", fused, kw, calls)
        raise SystemExit(1)
    return [y.detach(), x.grad, *(w.grad for w in ws)]

for kw in ({}, dict(fp8=True, grouped_fp8=True)):
    a, b, ref = experts(True, **kw), experts(True, **kw), experts(False, **kw)
    for name, fused, again, unfused in zip(("y", "dx", "dW1", "dW3", "dW2"), a, b, ref):
        if not torch.equal(fused, again):  # the GEMMs' own run-to-run bits: nothing to compare
            print("NONDETERMINISTIC experts, not compared:", kw, name)
        elif not torch.equal(fused, unfused):
            bad += 1
            print("MISMATCH experts", kw, name, float((fused - unfused).float().abs().max()))
print("RESULT PASS" if bad == 0 else f"RESULT FAIL {bad}")
""",
        "swiglu-train-gpu.log",
    )
