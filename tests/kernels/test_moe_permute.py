"""The MoE token permute and weighted combine (moeray.kernels.moe_permute) under the interpreter:
forward bits equal to the references at odd shapes (T 13, K 3 and 6, D 200 and one past a D
chunk, some experts without rows) in fp32/bf16/fp16; gradients against autograd through the
references (dy and add's gradient bit for bit, dw within its fp32 dot product's error bound, dx
equal to the k-ordered fp32 sum); one launch per direction; bad inputs refused by name; and the
model's one choice (model/moe.py use_fused_moe_combine): the routed experts of an MoE layer with
the kernels give the PyTorch path's output and gradients."""

import dataclasses

import pytest
import torch

from moeray.kernels import moe_permute as kmod
from moeray.kernels.moe_permute import (
    MAX_BLOCK_D,
    moe_combine,
    moe_combine_applies,
    moe_combine_ref,
    moe_permute,
    moe_permute_ref,
    moe_positions,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One program a token, the same code for each: T 13 (not 37) takes a third of the interpreter's
# time (~35 s over the file's parametrized tests) through the same branches.
SHAPES = ((13, 3, 200), (13, 6, 200), (1, 1, 1), (5, 6, MAX_BLOCK_D + 300))
# unit roundoff of each dtype: one rounding of a value v moves it by at most |v| u
UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-9, torch.float16: 2.0**-11}


def _routing(T, K, E=8, seed=0):
    """(order, pos_TK) of a top-K assignment over E experts, experts 3 and 5 without rows, rows
    sorted by expert as `Experts._routed` sorts them (stable argsort of the flattened ids)."""
    g = torch.Generator().manual_seed(seed)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids_TK = torch.where((ids_TK == 3) | (ids_TK == 5), E, ids_TK)  # E: a ninth expert
    order = torch.argsort(ids_TK.flatten(), stable=True)
    return order, moe_positions(order, K)


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def test_positions_invert_the_sort():
    order, pos = _routing(37, 6)
    assert pos.shape == (37, 6) and pos.dtype == torch.int64
    assert torch.equal(pos.flatten()[order], torch.arange(37 * 6))
    with pytest.raises(ValueError, match="multiple of K=4"):
        moe_positions(order, 4)
    with pytest.raises(ValueError, match="dtype"):
        moe_positions(order.float(), 6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "K", "D"), SHAPES)
def test_permute_equals_gather(dtype, T, K, D):
    order, pos = _routing(T, K, seed=T + K)
    x = _randn(T, D, dtype=dtype, seed=D)
    x_AD = moe_permute(x, pos)
    assert x_AD.dtype == dtype and x_AD.shape == (T * K, D)
    assert torch.equal(x_AD, x[order // K])  # what the model's PyTorch path gathers
    assert torch.equal(x_AD, moe_permute_ref(x, pos))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "K", "D"), SHAPES)
def test_permute_gradient(launch_spy, dtype, T, K, D):
    # dx[t] = sum_k dx_AD[pos[t, k]], in fp32 in k order, rounded once: the spec's bits.
    # Autograd through moe_permute_ref sums the same fp32 values in torch's order (its sum over
    # K), through the model's gather (x[order // K]) in row order (on CPU rounding in x's dtype
    # after each add): at most K - 1 roundings apart, each <= 2 u sum_k |term| (fp32 or dtype).
    order, pos = _routing(T, K, seed=T * K)
    x = _randn(T, D, dtype=dtype, seed=1).requires_grad_()
    dx_AD = _randn(T * K, D, dtype=dtype, seed=2)
    grids = launch_spy(kmod, "_permute_kernel")
    sums = launch_spy(kmod, "_gather_sum_kernel")
    x_AD = moe_permute(x, pos)
    assert type(x_AD.grad_fn).__name__ == "_MoePermuteFunctionBackward"
    (dx,) = torch.autograd.grad(x_AD, x, dx_AD)
    assert grids == [(T,)] and sums == [(T,)]  # one launch each way
    spec = sum(dx_AD[pos[:, k]].float() for k in range(K)).to(dtype)
    assert dx.dtype == dtype and torch.equal(dx, spec)
    terms = sum(dx_AD[pos[:, k]].float().abs() for k in range(K))
    (dx_ref,) = torch.autograd.grad(moe_permute_ref(x, pos), x, dx_AD)
    (dx_torch,) = torch.autograd.grad(x[order // K], x, dx_AD)
    for other in (dx_ref, dx_torch):
        bound = (K - 1) * 2 * UNIT[dtype] * terms + 2 * UNIT[dtype] * dx.float().abs()
        assert ((dx.float() - other.float()).abs() <= bound).all()


@pytest.mark.parametrize("w_dtype", [torch.float32, None])  # None: y's dtype
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "K", "D"), SHAPES)
def test_combine_equals_reference(dtype, add, w_dtype, T, K, D):
    _, pos = _routing(T, K, seed=D)
    y = _randn(T * K, D, dtype=dtype, seed=3)
    w = torch.rand(T, K, generator=torch.Generator().manual_seed(4)).to(w_dtype or dtype)
    a = _randn(T, D, dtype=dtype, seed=5) if add else None
    out = moe_combine(y, w, pos, a)
    assert out.dtype == dtype and out.shape == (T, D)
    assert torch.equal(out, moe_combine_ref(y, w, pos, a))
    out32 = moe_combine(y, w, pos, a, out_dtype=torch.float32)
    assert out32.dtype == torch.float32 and torch.equal(
        out32, moe_combine_ref(y, w, pos, a, torch.float32)
    )


# T 37: at T 13 one bf16 output sits one step of bf16 from index_add_'s, past this bound's
# 2 UNIT |old| (UNIT[bf16] is 2^-9, half of bf16's unit roundoff 2^-8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("T", "K", "D"), [(37, 3, 200), (37, 6, 200)])
def test_combine_equals_the_index_add_it_replaces(dtype, T, K, D):
    # The model's PyTorch path: fp32 products index_add_-ed in row order, cast once. The kernel
    # adds the same fp32 products in k order: the fp32 sums differ by <= (K - 1) u32 sum|terms|,
    # which after the cast is at most one rounding step of the dtype.
    order, pos = _routing(T, K, seed=7)
    y = _randn(T * K, D, dtype=dtype, seed=8)
    w = torch.rand(T, K, generator=torch.Generator().manual_seed(9))
    old = torch.zeros(T, D).index_add_(0, order // K, y.float() * w.flatten()[order, None])
    out = moe_combine(y, w, pos)
    terms = sum((w[:, k, None] * y[pos[:, k]].float()).abs() for k in range(K))
    bound = (K - 1) * UNIT[torch.float32] * terms + 2 * UNIT[dtype] * old.abs()
    assert ((out.float() - old.to(dtype).float()).abs() <= bound).all()


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "K", "D"), SHAPES)
def test_combine_gradient(launch_spy, dtype, w_dtype, T, K, D):
    # dy = w g rounded once (the reference's own product): equal bits; add's gradient is g.
    # dw = <g, y> over D: the kernel sums per chunk in a tree and chunks in order, torch's sum in
    # its own order; two fp32 sums of D products differ by <= 2 D u32 sum|g y| (a dot product's
    # error bound, twice), plus one rounding of |dw| when w is bf16.
    _, pos = _routing(T, K, seed=11)
    y = _randn(T * K, D, dtype=dtype, seed=12).requires_grad_()
    w = torch.rand(T, K, generator=torch.Generator().manual_seed(13)).to(w_dtype).requires_grad_()
    a = _randn(T, D, dtype=dtype, seed=14).requires_grad_()
    g = _randn(T, D, dtype=dtype, seed=15)
    fwd = launch_spy(kmod, "_gather_sum_kernel")
    bwd = launch_spy(kmod, "_combine_bwd_kernel")
    out = moe_combine(y, w, pos, a)
    assert type(out.grad_fn).__name__ == "_MoeCombineFunctionBackward"
    dy, dw, da = torch.autograd.grad(out, (y, w, a), g)
    assert fwd == [(T,)] and bwd == [(T,)]
    dy_ref, dw_ref, da_ref = torch.autograd.grad(moe_combine_ref(y, w, pos, a), (y, w, a), g)
    assert dy.dtype == dtype and torch.equal(dy, dy_ref)
    assert da.dtype == dtype and torch.equal(da, da_ref)
    assert dw.dtype == w_dtype
    gy_TK = torch.stack([(g.float() * y[pos[:, k]].float()).abs().sum(-1) for k in range(K)], dim=1)
    bound = 2 * D * UNIT[torch.float32] * gy_TK + UNIT[w_dtype] * dw_ref.float().abs()
    assert ((dw.float() - dw_ref.float()).abs() <= bound).all()


def test_combine_gradient_for_one_input_only():
    _, pos = _routing(37, 6, seed=1)
    y = _randn(37 * 6, 200, dtype=torch.bfloat16, seed=1)
    w = torch.rand(37, 6, requires_grad=True)
    g = _randn(37, 200, dtype=torch.bfloat16, seed=2)
    (dw,) = torch.autograd.grad(moe_combine(y, w, pos), w, g)
    (dw_ref,) = torch.autograd.grad(moe_combine_ref(y, w, pos), w, g)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)
    a = _randn(37, 200, dtype=torch.bfloat16, seed=3).requires_grad_()
    (da,) = torch.autograd.grad(moe_combine(y, w.detach(), pos, a), a, g)
    assert torch.equal(da, g)


def test_without_autograd_one_launch_and_no_graph(launch_spy):
    _, pos = _routing(9, 3)
    x = torch.randn(9, 16, requires_grad=True)
    y = torch.randn(27, 16, requires_grad=True)
    w = torch.rand(9, 3)
    grids = launch_spy(kmod, "_permute_kernel")
    sums = launch_spy(kmod, "_gather_sum_kernel")
    with torch.no_grad():
        assert moe_permute(x, pos).grad_fn is None
        assert moe_combine(y, w, pos).grad_fn is None
    assert grids == [(9,)] and sums == [(9,)]


def _padded(order, K, extra, seed=0):
    """(dst_A, posP_TK, P) of a padded layout of the T * K sorted rows: A + extra rows, the sorted
    rows at increasing distinct rows (as `GroupedExperts` places them), gaps between and a tail."""
    A = order.numel()
    P = A + extra
    g = torch.Generator().manual_seed(seed)
    dst_A = torch.randperm(P, generator=g)[:A].sort().values
    return dst_A, moe_positions(order, K, dst_A), P


def _nan_empty(monkeypatch):
    """torch.empty full of NaN (floats): a row a kernel leaves unwritten shows."""
    empty = torch.empty

    def nan_empty(*shape, **kw):
        t = empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def test_positions_into_a_padded_layout():
    order, pos = _routing(37, 6)
    dst_A, posP, P = _padded(order, 6, 29)
    assert torch.equal(posP, dst_A[pos]) and posP.dtype == torch.int64 and int(posP.max()) < P
    with pytest.raises(ValueError, match=r"dst has shape \(221,\)"):
        moe_positions(order, 6, dst_A[:-1])
    with pytest.raises(ValueError, match="dst has dtype"):
        moe_positions(order, 6, dst_A.int())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "K", "D"), SHAPES)
def test_permute_into_padded_rows(monkeypatch, launch_spy, dtype, T, K, D):
    # x_PD [P, D], P = A + 3 K + 1 (odd): the tokens' rows at posP, every other row exact zeros
    # (torch.empty is NaN here: a row left unwritten would show), equal to the reference; the
    # backward reads the posP rows only (the others of the incoming gradient are NaN) and sums
    # them as the unpadded permute does, bit for bit.
    _nan_empty(monkeypatch)
    order, pos = _routing(T, K, seed=T + K)
    dst_A, posP, P = _padded(order, K, 3 * K + 1, seed=D)
    x = _randn(T, D, dtype=dtype, seed=D).requires_grad_()
    grids = launch_spy(kmod, "_permute_kernel")
    sums = launch_spy(kmod, "_gather_sum_kernel")
    x_PD = moe_permute(x, posP, rows=P)
    assert x_PD.shape == (P, D) and x_PD.dtype == dtype
    others = torch.ones(P, dtype=torch.bool)
    others[dst_A] = False
    assert torch.equal(x_PD[dst_A], x.detach()[order // K])
    assert x_PD[others].abs().sum() == 0 and not x_PD.isnan().any()
    assert torch.equal(x_PD, moe_permute_ref(x.detach(), posP, P))
    dx_AD = _randn(T * K, D, dtype=dtype, seed=2)
    dx_PD = torch.full((P, D), float("nan"), dtype=dtype).index_copy_(0, dst_A, dx_AD)
    (dx,) = torch.autograd.grad(x_PD, x, dx_PD)
    (dx_unpadded,) = torch.autograd.grad(moe_permute(x, pos), x, dx_AD)
    assert grids == [(T,), (T,)] and sums == [(T,), (T,)]  # one launch each way, each layout
    assert torch.equal(dx, dx_unpadded)
    with torch.no_grad():
        assert torch.equal(moe_permute(x, posP, rows=P), x_PD)  # no autograd: the same launch
    with pytest.raises(ValueError, match=f"rows={T * K - 1} for pos"):
        moe_permute(x, pos, rows=T * K - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("T", "K", "D"), SHAPES)
def test_combine_from_padded_rows(monkeypatch, dtype, T, K, D):
    # y_PD: the rows at posP, NaN in the others (not read). The output, dy at the posP rows, dw
    # and add's gradient are the unpadded combine's bit for bit (the same values in the same
    # order); dy's other rows are exact zeros (torch.empty is NaN here).
    _nan_empty(monkeypatch)
    order, pos = _routing(T, K, seed=D)
    dst_A, posP, P = _padded(order, K, 2 * K + 5, seed=T)
    y_AD = _randn(T * K, D, dtype=dtype, seed=3)
    y_PD = torch.full((P, D), float("nan"), dtype=dtype).index_copy_(0, dst_A, y_AD)
    y_AD.requires_grad_(), y_PD.requires_grad_()
    w = torch.rand(T, K, generator=torch.Generator().manual_seed(4)).requires_grad_()
    a = _randn(T, D, dtype=dtype, seed=5).requires_grad_()
    g = _randn(T, D, dtype=dtype, seed=6)
    out = moe_combine(y_PD, w, posP, a)
    want = moe_combine(y_AD, w, pos, a)
    assert torch.equal(out, want) and torch.equal(out, moe_combine_ref(y_PD, w, posP, a))
    dy_PD, dw, da = torch.autograd.grad(out, (y_PD, w, a), g)
    dy_AD, dw_want, da_want = torch.autograd.grad(want, (y_AD, w, a), g)
    assert (
        torch.equal(dy_PD[dst_A], dy_AD) and torch.equal(dw, dw_want) and torch.equal(da, da_want)
    )
    others = torch.ones(P, dtype=torch.bool)
    others[dst_A] = False
    assert dy_PD[others].abs().sum() == 0 and not dy_PD.isnan().any()  # zeros elsewhere
    (dy_ref,) = torch.autograd.grad(moe_combine_ref(y_PD, w, posP, a), y_PD, g)
    assert torch.equal(dy_PD, dy_ref)


def test_empty_tokens():
    pos = torch.empty(0, 6, dtype=torch.int64)
    x = torch.randn(0, 20, requires_grad=True)
    x_AD = moe_permute(x, pos)
    assert x_AD.shape == (0, 20)
    out = moe_combine(x_AD, torch.rand(0, 6, requires_grad=True), pos)
    assert out.shape == (0, 20)
    out.sum().backward()
    assert x.grad.shape == (0, 20)


def test_rejects_bad_inputs():
    _, pos = _routing(5, 2)
    y, w, x = torch.randn(10, 8), torch.rand(5, 2), torch.randn(5, 8)
    with pytest.raises(ValueError, match="x has dtype"):
        moe_permute(x.long(), pos)
    with pytest.raises(ValueError, match=r"pos has shape \(5, 2\), expected \[T=4"):
        moe_permute(x[:4], pos)
    with pytest.raises(ValueError, match="pos has dtype"):
        moe_permute(x, pos.float())
    with pytest.raises(ValueError, match="y has 9 rows"):
        moe_combine(y[:9], w, pos)
    with pytest.raises(ValueError, match=r"w has shape \(5, 3\)"):
        moe_combine(y, torch.rand(5, 3), pos)
    with pytest.raises(ValueError, match=r"add has shape \(5, 7\)"):
        moe_combine(y, w, pos, torch.randn(5, 7))
    with pytest.raises(ValueError, match="out_dtype"):
        moe_combine(y, w, pos, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="w must have 2 dims"):
        moe_combine(y, w.flatten(), pos)


def test_backward_refuses_a_second_order():
    _, pos = _routing(5, 2)
    y = torch.randn(10, 8, requires_grad=True)
    g = torch.randn(5, 8, requires_grad=True)
    (dy,) = torch.autograd.grad(moe_combine(y, torch.rand(5, 2), pos), y, g, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dy.sum().backward()


def test_chooser(monkeypatch):
    # The choice lives in model/moe.py: CUDA tokens (faked here), unless MOERAY_FUSED_MOE_COMBINE=0
    from moeray.platform.model import moe

    x, w = torch.randn(4, 8), torch.rand(4, 6)
    assert not moe.use_fused_moe_combine(x, w)  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert moe.use_fused_moe_combine(x, w) and moe.use_fused_moe_combine(x.bfloat16(), w, x)
    assert not moe.use_fused_moe_combine(x.double(), w)
    assert not moe.use_fused_moe_combine(x, w.double())
    assert not moe.use_fused_moe_combine(x, w, x[:3])
    monkeypatch.setenv("MOERAY_FUSED_MOE_COMBINE", "0")
    assert not moe.use_fused_moe_combine(x, w)


def _moe_layer(dtype):
    """An MoE layer of tiny() at top-6 with its routed experts through `experts_mlp` (the
    one-device trainer's `mlp_fn`), weights random at scale 0.1."""
    from moeray.platform.config import tiny
    from moeray.platform.model.moe import MoE
    from moeray.platform.parallel.experts_mlp import experts_mlp

    cfg = dataclasses.replace(tiny(), num_experts_per_tok=6)
    torch.manual_seed(0)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    layer.experts.mlp_fn = experts_mlp
    with torch.no_grad():  # experts 3 and 9 are never selected (the bias is for selection only)
        layer.gate.e_score_correction_bias[[3, 9]] = -100.0
    return cfg, layer.to(dtype)


def _step(layer, x, dout, autocast):
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(xi[None])[0]
    out.backward(dout.to(out.dtype))
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), xi.grad, grads


@pytest.mark.parametrize("autocast", [False, True])
def test_moe_layer_with_fused_combine_equals_pytorch(monkeypatch, launch_spy, autocast):
    """37 tokens through an MoE layer (router, routed experts through experts_mlp, shared
    experts added in the combine) with the kernels chosen (the interpreter stands in for CUDA)
    against the PyTorch path: the output, x's gradient and every parameter's gradient (the
    router's weight through the combine's dw, the experts' and the shared experts').

    fp32: the two paths add the same fp32 products in another order (k order against row
    order) and the shared output once instead of after a rounding: output and gradients agree to
    ~1e-6 relative; a wrong row, weight or token is O(1). bf16 autocast (the trainer's): the
    activations are bf16 and each path rounds its sums once at different points (the combine
    adds the shared output before rounding, PyTorch after): the output differs by at most a
    bf16 step or two (2^-7 relative), which the backward carries into gradients summed over 37
    tokens: bounded here by 2^-6 of each gradient's largest entry (measured: 5e-3 for dx)."""
    from moeray.platform.model import moe

    cfg, layer = _moe_layer(torch.float32)
    # under autocast the trainer's activation stream is bf16 (model/autocast.py)
    x = _randn(37, cfg.hidden_size, dtype=torch.bfloat16 if autocast else torch.float32, seed=21)
    dout = _randn(37, cfg.hidden_size, dtype=torch.float32, seed=22)
    want = _step(layer, x, dout, autocast)
    monkeypatch.setattr(moe, "use_fused_moe_combine", moe_combine_applies)
    permutes = launch_spy(kmod, "_permute_kernel")
    combines = launch_spy(kmod, "_combine_bwd_kernel")
    got = _step(layer, x, dout, autocast)
    # the fused combine ran, forward and back; the rows go out through PyTorch's gather
    # (Experts._routed says why)
    assert permutes == [] and combines == [(37,)]
    ids = layer.last_routing.expert_ids_TK
    assert ids.shape == (37, 6) and not ((ids == 3) | (ids == 9)).any()  # experts without rows
    rel = 2.0**-6 if autocast else 1e-5
    for name, a, b in (("out", got[0], want[0]), ("dx", got[1], want[1])):
        assert a.dtype == b.dtype, name
        assert (a.float() - b.float()).abs().max() <= rel * b.float().abs().max(), name
    assert got[2].keys() == want[2].keys() and "gate.weight" in got[2]
    for name, b in want[2].items():
        a = got[2][name]
        assert (a - b).abs().max() <= rel * b.abs().max(), name


def _ids(T, K, E, exact, seed):
    """ids_TK: K distinct experts per token, expert 0 on exactly the first `exact` tokens,
    experts 1 and E - 1 on none (between, last)."""
    g = torch.Generator().manual_seed(seed)
    others = torch.tensor([e for e in range(2, E - 1)])
    rows = []
    for t in range(T):
        pick = others[torch.randperm(len(others), generator=g)]
        rows.append(torch.cat([torch.tensor([0]), pick[: K - 1]]) if t < exact else pick[:K])
    return torch.stack(rows)


PADDED_PATHS = {  # experts_mlp's settings; the row count of expert 0 (a whole aligned block)
    "bf16": (dict(), 16),
    "fp8-kgrouped": (dict(fp8=True, grouped_fp8=True, kgrouped_wgrad=True), 128),
    "fp8-bf16-wgrad": (dict(fp8=True, grouped_fp8=True, bf16_wgrad=True), 128),
}


@pytest.mark.parametrize("path", PADDED_PATHS)
def test_moe_layer_on_the_padded_layout_equals_the_padding_path(monkeypatch, launch_spy, path):
    """The routed experts of an MoE layer as one-GPU training runs them (bf16 autocast, bf16
    tokens, the router's fp32 weights, the shared output added in the combine), the permute
    writing the grouped GEMMs' padded layout and the combine reading it (`ExpertsMLP.layout`),
    against the same experts taking the sorted rows and padding them (a plain partial: no
    layout), both with the layout planned on the device (the CUDA choosers forced: fused
    combine, device layout, BF16's 16-row alignment and grouped weight gradient; the permute
    and combine interpreted, the GEMMs' and quantizations' PyTorch references, the same on both
    sides: interpreted they took ~100 s a case). Two micro-batches accumulate into .grad. The
    same ops on the same rows: the output and every gradient bit for bit; no pad or unpad runs;
    torch.empty is NaN, so a padding row of x or dy left unwritten would poison the GEMMs'
    sums. Experts without rows
    (between, last) and one of exactly one aligned block (16 BF16, 128 FP8)."""
    import functools

    from moeray.kernels import grouped_wgrad
    from moeray.kernels.fp8 import dispatch as fp8_dispatch
    from moeray.kernels.fp8 import grouped as fp8_grouped
    from moeray.kernels.fp8 import kgrouped as fp8_kgrouped
    from moeray.kernels.fp8 import quant as fp8_quant
    from moeray.platform import fp8 as f8
    from moeray.platform.config import tiny
    from moeray.platform.model import moe
    from moeray.platform.model.moe import Experts
    from moeray.platform.parallel import experts_mlp as em
    from moeray.platform.parallel import grouped_experts as ge
    from moeray.platform.parallel.experts_common import gate_up_fused

    settings, exact = PADDED_PATHS[path]
    monkeypatch.setattr(moe, "use_fused_moe_combine", moe_combine_applies)
    monkeypatch.setattr(em.GroupedExperts, "device_layout", staticmethod(lambda x, **kw: True))
    monkeypatch.setattr(em.GroupedExperts, "default_align", staticmethod(lambda device: 16))
    monkeypatch.setattr(ge, "use_grouped_wgrad", lambda device: True)
    for module in (fp8_dispatch, fp8_grouped, fp8_kgrouped, fp8_quant, grouped_wgrad):
        monkeypatch.setattr(module, "use_triton", lambda *tensors: False)
    copies = []
    for name in ("pad", "unpad"):
        real = getattr(em.GroupedExperts, name)
        monkeypatch.setattr(
            em.GroupedExperts,
            name,
            lambda self, t, real=real, name=name: copies.append(name) or real(self, t),
        )
    _nan_empty(monkeypatch)
    E, K, T, D = 6, 3, exact + 5, 128  # D: whole 128-column groups for FP8
    cfg = dataclasses.replace(
        tiny(),
        hidden_size=D,
        moe_intermediate_size=160,
        n_routed_experts=E,
        n_group=2,
        topk_group=2,
    )
    torch.manual_seed(0)
    experts = Experts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    params = dict(experts.named_parameters())
    ids = [_ids(T, K, E, exact, seed=mb) for mb in range(2)]
    assert all(int((i == 0).sum()) == exact and not ((i == 1) | (i == E - 1)).any() for i in ids)
    inputs = [
        (
            _randn(T, D, dtype=torch.bfloat16, seed=30 + mb),  # x
            torch.rand(T, K, generator=torch.Generator().manual_seed(mb)),  # the router's weights
            _randn(T, D, dtype=torch.bfloat16, seed=40 + mb),  # the shared experts' output
            _randn(T, D, dtype=torch.float32, seed=50 + mb),  # the output's gradient
        )
        for mb in range(2)
    ]
    results = []
    for fn in (functools.partial, em.ExpertsMLP):
        experts.mlp_fn = fn(em.experts_mlp, cache=f8.WeightCache(), **settings)
        experts.zero_grad(set_to_none=True)
        copies.clear()
        permutes = launch_spy(kmod, "_permute_kernel")
        got = []
        for mb, (x, w, a, dout) in enumerate(inputs):
            xi, wi, ai = (t.clone().requires_grad_() for t in (x, w, a))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = experts(xi, ids[mb], wi, add_TD=ai)
            out.backward(dout.to(out.dtype))
            got += [out.detach(), xi.grad, wi.grad, ai.grad]
        # the permute kernel writes the padded layout in both micro-batches; without a layout
        # the rows go out through PyTorch's gather (Experts._routed says why)
        assert permutes == ([(T,), (T,)] if fn is em.ExpertsMLP else []), fn
        # x padded and y unpadded forward, dy padded and the input-gradient product unpadded
        # backward (two products where gate and up run apart: FP8 at I 160, not a multiple of
        # 128): four or five row copies of the layer's [A, D] a micro-batch, or none
        fp8 = settings.get("fp8", False)
        apart = [] if gate_up_fused(params["gate_proj"], fp8) else ["unpad"]
        padding = ["pad", "unpad", "pad", "unpad", *apart] * 2
        assert copies == ([] if fn is em.ExpertsMLP else padding)
        results.append(
            got + [params[n].grad.clone() for n in ("gate_proj", "up_proj", "down_proj")]
        )
    names = [f"{v}{mb}" for mb in range(2) for v in ("out", "dx", "dweights", "dadd")]
    for name, a, b in zip([*names, "dW1", "dW3", "dW2"], *results, strict=True):
        assert a.dtype == b.dtype, name
        if name.startswith("dx"):
            # x's gradient: the permute's backward sums a token's K rows in fp32 and rounds once,
            # the gather's (index_put) adds them into bf16 one by one: K - 1 = 5 bf16 roundings
            # of partial sums (2^-9 relative each) apart; a wrong row or token is O(1)
            assert (a.float() - b.float()).abs().max() <= 2**-6 * b.float().abs().max(), name
        else:
            assert torch.equal(a, b), name
        assert torch.isfinite(a).all() and a.abs().max() > 0, name
    for dW in results[1][-3:]:
        assert dW[1].abs().max() == 0 and dW[E - 1].abs().max() == 0  # experts without rows


def test_expert_parallel_keeps_pytorch(monkeypatch, launch_spy):
    # Under expert parallelism some ids are not this rank's: pos would not be a permutation of
    # all T * K rows, so the kernels are not asked for, whatever the chooser says.
    from moeray.platform.model import moe

    cfg, layer = _moe_layer(torch.float32)
    monkeypatch.setattr(moe, "use_fused_moe_combine", lambda *tensors: True)
    permutes = launch_spy(kmod, "_permute_kernel")
    experts = layer.experts
    n = experts.num_experts = cfg.n_routed_experts // 2
    full_mlp = experts.mlp_fn
    experts.mlp_fn = lambda x, w1, w3, w2, rows: full_mlp(x, w1[:n], w3[:n], w2[:n], rows)
    x = torch.randn(9, cfg.hidden_size)
    ids = torch.randint(0, cfg.n_routed_experts, (9, 6))
    experts(x, ids, torch.rand(9, 6))
    assert permutes == []


@pytest.mark.gpu
def test_moe_permute_and_combine_compiled_on_gpu(compiled_check):
    # Compiled on CUDA (FMA contraction off in the sums): forward bits equal to the references,
    # dy and add's gradient too, dx the k-ordered fp32 sum, dw within its dot product's bound,
    # at Moonlight's training shape (T 4096, K 6, D 2048, 64 experts, bf16), V3's width and odd
    # shapes; the model's chooser takes the kernels for CUDA tokens. On the grouped GEMMs'
    # padded layouts (16- and 128-row alignment, planned on the device by `experts_layout`, which
    # gives one for bf16 tokens and FP8 grouped experts on CUDA): the permute's x_PD is the
    # unpadded rows at dst_A and zeros elsewhere, the combine reads y_PD (NaN in the other rows)
    # and writes dy_PD zeros there; every output and gradient the unpadded launches' bits.
    compiled_check(
        """
import torch
from moeray.kernels.moe_permute import (
    moe_combine, moe_combine_ref, moe_permute, moe_permute_ref, moe_positions
)
from moeray.platform.model.moe import use_fused_moe_combine
from moeray.platform.parallel.experts_mlp import experts_layout
bad = 0
for T, K, D, E in ((4096, 6, 2048, 64), (1024, 8, 7168, 256), (37, 3, 200, 8), (5, 1, 1, 2)):
    for dtype in (torch.bfloat16, torch.float32):
        ids = torch.randint(0, E, (T, K), device="cuda")
        order = torch.argsort(ids.flatten(), stable=True)
        pos = moe_positions(order, K)
        x = torch.randn(T, D, device="cuda").to(dtype).requires_grad_()
        y = torch.randn(T * K, D, device="cuda").to(dtype).requires_grad_()
        w = torch.rand(T, K, device="cuda").requires_grad_()
        a = torch.randn(T, D, device="cuda").to(dtype).requires_grad_()
        g = torch.randn(T, D, device="cuda").to(dtype)
        gx = torch.randn(T * K, D, device="cuda").to(dtype)
        assert use_fused_moe_combine(x, w, a)
        x_AD = moe_permute(x, pos)
        ok = torch.equal(x_AD, x[order // K]) and torch.equal(x_AD, moe_permute_ref(x, pos))
        (dx,) = torch.autograd.grad(x_AD, x, gx)
        ok = ok and torch.equal(dx, sum(gx[pos[:, k]].float() for k in range(K)).to(dtype))
        out = moe_combine(y, w, pos, a)
        ref = moe_combine_ref(y, w, pos, a)
        ok = ok and torch.equal(out, ref)
        dy, dw, da = torch.autograd.grad(out, (y, w, a), g)
        dy_r, dw_r, da_r = torch.autograd.grad(ref, (y, w, a), g)
        ok = ok and torch.equal(dy, dy_r) and torch.equal(da, da_r)
        gy = torch.stack([(g.float() * y[pos[:, k]].float()).abs().sum(-1) for k in range(K)], 1)
        ok = ok and bool(((dw - dw_r).abs() <= 2 * D * 2.0**-24 * gy).all())
        counts = torch.bincount(ids.flatten(), minlength=E)
        for kw, align in (({}, 16), (dict(fp8=True, grouped_fp8=True, kgrouped_wgrad=True), 128)):
            lay = experts_layout(x, counts, T * K, **kw)
            if dtype == torch.float32 and not kw:  # CUDA's BF16 grouped GEMM: bf16 only
                ok = ok and lay is None
                continue
            ok = ok and lay is not None and lay.align == align
            dst, P = lay.dst_A, lay.P
            posP = moe_positions(order, K, dst)
            ok = ok and torch.equal(posP, dst[pos])
            x_PD = moe_permute(x, posP, rows=P)
            ok = ok and torch.equal(x_PD, torch.zeros_like(x_PD).index_copy_(0, dst, x_AD))
            gxP = torch.full((P, D), float("nan"), device="cuda", dtype=dtype).index_copy_(
                0, dst, gx
            )
            ok = ok and torch.equal(torch.autograd.grad(x_PD, x, gxP)[0], dx)
            yP = torch.full((P, D), float("nan"), device="cuda", dtype=dtype)
            yP = yP.index_copy_(0, dst, y.detach()).requires_grad_()
            outP = moe_combine(yP, w, posP, a)
            ok = ok and torch.equal(outP, out)
            dyP, dwP, daP = torch.autograd.grad(outP, (yP, w, a), g)
            ok = ok and torch.equal(dyP, torch.zeros_like(dyP).index_copy_(0, dst, dy))
            ok = ok and torch.equal(dwP, dw) and torch.equal(daP, da)
        bad += not ok
        if not ok:
            print("MISMATCH", T, K, D, dtype, float((out.float() - ref.float()).abs().max()),
                  float((dw - dw_r).abs().max()))
print("RESULT PASS" if bad == 0 else f"RESULT FAIL {bad}")
""",
        "moe-permute-gpu.log",
    )
