"""moe_gemv compiled on the GPU (marker gpu; skipped without CUDA) at published expert shapes:
Moonlight-16B-A3B (H 2048, I 1408, 64 routed experts top-6 plus the 2 shared ones appended as ids
64, 65: E 66, K 8) at 1 and 2 tokens, DeepSeek-V3 (H 7168, I 2048, 256 routed top-8 plus shared id
256: E 257, K 9) at 1 token, bf16 and FP8 weights (e4m3 with per-block scales spread over 0.5-2x):
against moe_gemv_ref, with outputs poisoned with NaN first (an unwritten row shows); captured in a
CUDA graph and replayed on new tokens and routings, bit-equal to eager calls; fused_moe_gate_up's
dispatch giving moe_gemv's bits, and the aligned path (MOERAY_FUSED_MOE_GEMV=0) agreeing within
bf16 rounding (bf16 weights) or the 1x128 activation quantization it applies (FP8); the sum folded
into the down kernel (the default) giving the three-launch path's bits
(MOERAY_FUSED_MOE_SUM_FOLD=0)."""

import pytest
import torch

from tests.gpu.gemv_checks import captured, poison

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# name: (H, I, routed experts, routed top-k, shared experts)
SHAPES = {"moonlight": (2048, 1408, 64, 6, 2), "v3": (7168, 2048, 256, 8, 1)}
CASES = [("moonlight", 1), ("moonlight", 2), ("v3", 1)]


@pytest.fixture(scope="module")
def experts():
    """experts(shape, fp8) -> ((w1, w3, w2), scale keywords), made once per module (V3's 257
    experts are 22.6 GB in bf16) and freed after it."""
    cache: dict = {}

    def get(shape: str, fp8: bool):
        if (shape, fp8) not in cache:
            h, i, routed, _, shared = SHAPES[shape]
            e = routed + shared
            g = torch.Generator(device="cuda").manual_seed(0)
            ws, scales = [], {}
            for name, (n, k) in zip(("w1", "w3", "w2"), ((i, h), (i, h), (h, i)), strict=True):
                w = torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16, generator=g)
                if fp8:
                    w = w.to(torch.float8_e4m3fn)
                    s = torch.rand(e, n // 128, k // 128, device="cuda", generator=g)
                    scales[f"{name}_scale"] = (0.5 + 1.5 * s) * k**-0.5
                else:
                    w.mul_(k**-0.5)
                ws.append(w)
            cache[(shape, fp8)] = (tuple(ws), scales)
        return cache[(shape, fp8)]

    yield get
    cache.clear()
    torch.cuda.empty_cache()


def _routing(shape: str, t: int, seed: int):
    """x [T, H] bf16, ids [T, K] (routed top-k, then the shared ids), weights [T, K] bf16."""
    h, _, routed, top_k, shared = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, h, device="cuda", generator=g).bfloat16()
    ids = torch.rand(t, routed, device="cuda", generator=g).topk(top_k, dim=1).indices
    shared_ids = torch.arange(routed, routed + shared, device="cuda").expand(t, -1)
    ids = torch.cat([ids, shared_ids], 1)
    wts = torch.rand(t, top_k, device="cuda", generator=g)
    wts = torch.cat([wts, torch.ones(t, shared, device="cuda")], 1).bfloat16()
    return x, ids, wts


def _check(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 sums in another order, h and y_tk rounded to bf16 from nearly equal values (a rare
    one-ulp flip), y rounded once more: within two bf16 ulps of y plus half an ulp of the largest
    value. The floor is for a flip in a y_tk as large as the largest output, landing on an output
    the K terms nearly cancel in (seen at Moonlight, bf16, one token: 1.25x a floor of 1e-3 of
    the largest value); a wrong row or expert is off by whole terms, ~100x this."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) output"
    err = (out.float() - ref.float()).abs()
    bound = ref.float().abs() * 2.0**-7 + 2.0**-8 * ref.float().abs().max()
    assert (err <= bound).all(), (err / bound).max().item()
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-3


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize(("shape", "t"), CASES)
def test_moe_gemv_matches_reference(experts, shape, t, fp8):
    from moeray.kernels.moe_gemv import moe_gemv, moe_gemv_ref

    ws, scales = experts(shape, fp8)
    x, ids, wts = _routing(shape, t, seed=t)
    if t == 2:  # a choice on another rank (expert parallelism): adds nothing
        ids[1, 0] = ids.max() + 3
    add = torch.randn_like(x)
    poison()
    out = moe_gemv(x, *ws, ids, wts, add_TH=add, **scales)
    _check(out, moe_gemv_ref(x, *ws, ids, wts, add_TH=add, **scales))


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize(("shape", "t"), CASES)
def test_moe_gemv_in_a_cuda_graph(experts, shape, t, fp8):
    """One capture (PDL on sm_90), replayed on new tokens routed to other experts: the eager
    call's bits each time (the same kernels; no host sync or shape-dependent allocation)."""
    from moeray.kernels.moe_gemv import moe_gemv

    ws, scales = experts(shape, fp8)
    x0, ids0, wts0 = _routing(shape, t, seed=100)
    add0 = torch.randn_like(x0)

    graph, static = captured(lambda: moe_gemv(x0, *ws, ids0, wts0, add_TH=add0, **scales))
    for seed in range(3):
        x, ids, wts = _routing(shape, t, seed=200 + seed)
        x0.copy_(x)
        ids0.copy_(ids)
        wts0.copy_(wts)
        add0.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, moe_gemv(x, *ws, ids, wts, add_TH=add0, **scales))


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize(("shape", "t"), CASES)
def test_sum_fold_gives_the_same_bits_eager_and_in_a_graph(experts, shape, t, fp8, monkeypatch):
    """The fold (the default: the last down program of a row block sums the token's rows, an
    atomic counter per block): the three-launch path's bits (MOERAY_FUSED_MOE_SUM_FOLD=0), eager
    and from a CUDA graph replayed on new routings (a remote id included), output poisoned
    first."""
    from moeray.kernels.moe_gemv import moe_gemv

    ws, scales = experts(shape, fp8)
    x0, ids0, wts0 = _routing(shape, t, seed=300)
    add0 = torch.randn_like(x0)
    monkeypatch.setenv("MOERAY_FUSED_MOE_SUM_FOLD", "0")
    want = moe_gemv(x0, *ws, ids0, wts0, add_TH=add0, **scales)
    monkeypatch.setenv("MOERAY_FUSED_MOE_SUM_FOLD", "1")
    poison()
    assert torch.equal(moe_gemv(x0, *ws, ids0, wts0, add_TH=add0, **scales), want)

    graph, static = captured(lambda: moe_gemv(x0, *ws, ids0, wts0, add_TH=add0, **scales))
    for seed in range(4):
        x, ids, wts = _routing(shape, t, seed=400 + seed)
        ids[0, seed % ids.shape[1]] = -1  # a choice on another rank
        x0.copy_(x)
        ids0.copy_(ids)
        wts0.copy_(wts)
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.setenv("MOERAY_FUSED_MOE_SUM_FOLD", "0")
        assert torch.equal(static, moe_gemv(x, *ws, ids, wts, add_TH=add0, **scales))
        monkeypatch.setenv("MOERAY_FUSED_MOE_SUM_FOLD", "1")


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize(("shape", "t"), CASES)
def test_dispatch_and_agreement_with_the_aligned_path(experts, shape, t, fp8, monkeypatch):
    """fused_moe_gate_up at these assignments (8, 16, 9 <= MOE_GEMV_MAX_ASSIGNMENTS) with
    MOERAY_FUSED_MOE_GEMV=1 gives moe_gemv's bits; =0 runs the aligned kernels, which round x and
    h to e4m3 per 1x128 group with FP8 weights and multiply in bf16 MMAs with bf16 weights."""
    from moeray.kernels.moe import fused_moe_gate_up
    from moeray.kernels.moe_gemv import MOE_GEMV_MAX_ASSIGNMENTS, moe_gemv

    ws, scales = experts(shape, fp8)
    x, ids, wts = _routing(shape, t, seed=7)
    assert ids.numel() <= MOE_GEMV_MAX_ASSIGNMENTS
    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV", "1")
    gemv = moe_gemv(x, *ws, ids, wts, **scales)
    assert torch.equal(fused_moe_gate_up(x, *ws, ids, wts, **scales), gemv)
    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV", "0")
    poison()
    aligned = fused_moe_gate_up(x, *ws, ids, wts, **scales)
    assert torch.isfinite(aligned).all()
    rel = ((aligned.float() - gemv.float()).norm() / gemv.float().norm()).item()
    # FP8: two e4m3 roundings (x, h) per 1x128 group, 4.1-4.6% of the norm on random data
    assert rel < (0.08 if fp8 else 1e-2), rel


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize(("shape", "t"), CASES)
def test_early_shared_after_the_routing_launches_in_a_graph(experts, shape, t, fp8):
    """early_shared (the shared slots' gate/up before the PDL wait, x read two launches back) in
    the engine's launch order, captured once and replayed on new inputs: rms_norm writes x,
    router_logits and moe_gate (appending the shared ids) route it, moe_gemv runs; the output is
    the bits of the same chain with early_shared=0, run eagerly. An x read before the norm had
    finished (the previous replay's) would differ."""
    from moeray.kernels.gate import moe_gate
    from moeray.kernels.moe_gemv import moe_gemv
    from moeray.kernels.norm import rms_norm
    from moeray.kernels.router_logits import router_logits

    h, _, routed, top_k, shared = SHAPES[shape]
    ws, scales = experts(shape, fp8)
    g = torch.Generator(device="cuda").manual_seed(7)
    norm_w = torch.rand(h, device="cuda", generator=g).bfloat16() + 0.5
    router_w = (torch.randn(routed, h, device="cuda", generator=g) * h**-0.5).bfloat16()
    bias = torch.zeros(routed, device="cuda")
    groups = 8 if routed % 8 == 0 else 1
    gate_kw = dict(top_k=top_k, n_group=groups, topk_group=min(4, groups))
    gate_kw |= dict(routed_scaling_factor=2.5, shared_experts=shared)

    def chain(x_in, early):
        x, _ = rms_norm(x_in, norm_w, 1e-6)
        r = moe_gate(router_logits(x, router_w), bias, **gate_kw)
        return moe_gemv(x, *ws, r.fused_ids_TJ, r.fused_weights_TJ,
                        early_shared=early, **scales)  # fmt: skip

    x_in = torch.randn(t, h, device="cuda", generator=g).bfloat16()
    graph, static = captured(lambda: chain(x_in, shared))
    for _ in range(4):
        x_in.normal_(generator=g)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, chain(x_in.clone(), 0))
