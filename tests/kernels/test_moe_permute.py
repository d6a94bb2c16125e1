"""The MoE token permute and weighted combine (moeray.kernels.moe_permute) under the interpreter:
forward bits equal to the references at odd shapes (T 37, K 3 and 6, D 200 and one past a D
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
SHAPES = ((37, 3, 200), (37, 6, 200), (1, 1, 1), (5, 6, MAX_BLOCK_D + 300))
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("T", "K", "D"), SHAPES[:2])
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
    # shapes; the model's chooser takes the kernels for CUDA tokens.
    compiled_check(
        """
import torch
from moeray.kernels.moe_permute import (
    moe_combine, moe_combine_ref, moe_permute, moe_permute_ref, moe_positions
)
from moeray.platform.model.moe import use_fused_moe_combine
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
        bad += not ok
        if not ok:
            print("MISMATCH", T, K, D, dtype, float((out.float() - ref.float()).abs().max()),
                  float((dw - dw_r).abs().max()))
print("RESULT PASS" if bad == 0 else f"RESULT FAIL {bad}")
""",
        "moe-permute-gpu.log",
    )
