"""FP8 training linear: quantizer error within e4m3 bounds, exact emulation of the three GEMMs,
and the model conversion (what runs in FP8 and what stays in higher precision)."""

import pytest
import torch

from moeray.platform import fp8
from moeray.platform.model.linear import Linear

# e4m3: 3 mantissa bits -> round-to-nearest error <= 2^-4 relative for normals; subnormal spacing
# 2^-9 (in units of the scale) -> absolute error <= 2^-10 * scale below the normal range.
REL, SUB = 2.0**-4, 2.0**-10


def _elementwise_ok(x, qdq, scale):
    return ((qdq - x).abs() <= torch.maximum(REL * x.abs(), SUB * scale) * (1 + 1e-6)).all()


@pytest.mark.parametrize("M,K", [(37, 300), (128, 256), (3, 129)])
def test_quantizers_within_e4m3_bounds(M, K):
    g = torch.Generator().manual_seed(M * K)
    x = torch.randn(M, K, generator=g) * torch.logspace(-3, 2, K)  # wide dynamic range per row
    for qdq in (fp8.qdq_1x128,):
        out = qdq(x)
        # per-token scale of each 128-wide group, broadcast back to elements
        kb = -(-K // 128)
        pad = torch.nn.functional.pad(x.abs(), (0, kb * 128 - K)).view(M, kb, 128)
        scale = (pad.amax(-1, keepdim=True) / 448).expand(M, kb, 128).reshape(M, -1)[:, :K]
        assert _elementwise_ok(x, out, scale)
        assert not torch.equal(out, x)  # it did quantize
    # 128x1 is the transpose of 1x128 of the transpose; 128x128 one scale per block
    assert torch.equal(fp8.qdq_128x1(x), fp8.qdq_1x128(x.t()).t())
    w = torch.randn(K, M, generator=g)
    wq = fp8.qdq_128x128(w)
    for i in range(0, K, 128):
        for j in range(0, M, 128):
            blk, qblk = w[i : i + 128, j : j + 128], wq[i : i + 128, j : j + 128]
            assert _elementwise_ok(blk, qblk, blk.abs().max() / 448)
    # the largest element of each group is exactly representable after scaling (amax -> 448)
    row = x[0, :128]
    assert fp8.qdq_1x128(row[None])[0].abs().max() == pytest.approx(
        row.abs().max().item(), rel=1e-6
    )


def test_quantizers_match_the_kernel_references():
    kref = pytest.importorskip("moeray.kernels.fp8")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(19, 333, generator=g) * 3
    q, s = kref.act_quant_ref(x)
    assert torch.equal(kref.dequant_rows_ref(q, s), fp8.qdq_1x128(x))
    wq, ws = kref.weight_quant_ref(x)
    assert torch.equal(kref.weight_dequant_ref(wq, ws, out_dtype=torch.float32), fp8.qdq_128x128(x))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape", [(2, 37, 300, 200), (1, 130, 64, 96)])
def test_fp8_linear_forward_backward(shape):
    B, S, K, N = shape
    g = torch.Generator().manual_seed(K + N)
    x = torch.randn(B, S, K, generator=g, requires_grad=True)
    w = (torch.randn(N, K, generator=g) * K**-0.5).requires_grad_()
    bias = torch.randn(N, generator=g, requires_grad=True)
    dy = torch.randn(B, S, N, generator=g)
    y = fp8.fp8_linear(x, w, bias)
    y.backward(dy)

    x2, dy2 = x.detach().reshape(-1, K), dy.reshape(-1, N)
    # exact emulation: the three GEMMs on quantize-dequantized operands, fp32 accumulation
    y_emul = fp8.qdq_1x128(x2) @ fp8.qdq_128x128(w.detach()).t() + bias.detach()
    dx_emul = fp8.qdq_1x128(dy2) @ fp8.qdq_128x128(w.detach())
    dw_emul = fp8.qdq_128x1(dy2).t() @ fp8.qdq_128x1(x2)
    torch.testing.assert_close(y.detach().reshape(-1, N), y_emul, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.reshape(-1, K), dx_emul, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, dw_emul, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, dy2.sum(0), rtol=1e-5, atol=1e-5)

    # against fp64 without quantization: two e4m3 operands -> a few percent, not more
    ref_y = x2.double() @ w.detach().double().t() + bias.detach().double()
    ref_dx = dy2.double() @ w.detach().double()
    ref_dw = dy2.double().t() @ x2.double()
    for got, ref in (
        (y.detach().reshape(-1, N), ref_y),
        (x.grad.reshape(-1, K), ref_dx),
        (w.grad, ref_dw),
    ):
        assert 0.01 < _rel(got, ref) < 0.045

    # a wrong scale breaks that bound: amax/600 clips the top of every group (a wrong e4m3 max)
    bad = fp8.qdq_1x128(x2, fp8_max=600.0) @ fp8.qdq_128x128(w.detach(), fp8_max=600.0).t()
    assert _rel(bad + bias.detach(), ref_y) > 0.06
    # and so does re-tiling the weight-grad operands 1x128 instead of 128x1 (exactness check)
    wrong_tiles = fp8.qdq_1x128(dy2).t() @ fp8.qdq_1x128(x2)
    assert not torch.allclose(w.grad, wrong_tiles, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_keep_their_dtype():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 160, generator=g).bfloat16().requires_grad_()
    w = torch.randn(48, 160, generator=g).bfloat16().requires_grad_()
    y = fp8.fp8_linear(x, w)
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="does not match"):
        fp8.fp8_linear(x, w.t())


def test_enable_fp8_training_on_the_tiny_model():
    from moeray.platform.config import tiny
    from moeray.platform.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = tiny()
    ref = Transformer(cfg)
    model = Transformer(cfg)
    model.load_state_dict(ref.state_dict())
    params_before = {n: id(p) for n, p in model.named_parameters()}
    converted = fp8.enable_fp8_training(model)
    assert {n: id(p) for n, p in model.named_parameters()} == params_before  # same Parameters
    assert "model.layers.0.self_attn.q_a_proj" in converted
    assert "model.layers.0.mlp.down_proj" in converted  # dense layer
    assert (
        "model.layers.1.mlp.experts" in converted
        and "model.layers.1.mlp.shared_experts.up_proj" in converted
    )
    assert "mtp.0.block.self_attn.o_proj" in converted
    for kept in ("lm_head", "model.embed_tokens", "model.layers.1.mlp.gate", "mtp.0.eh_proj"):
        assert not any(c == kept or c.startswith(kept + ".") for c in converted)
    assert type(model.lm_head) is Linear and type(model.mtp[0].eh_proj) is Linear

    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))

    def loss_and_grads(m):
        m.zero_grad()
        out = m(ids[:, :-1])
        ce = torch.nn.functional.cross_entropy
        loss = ce(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + 0.3 * ce(out.mtp_logits[0].flatten(0, 1), ids[:, 2:].flatten())
        loss.backward()
        assert all(p.grad is not None for p in m.parameters())
        return loss.item(), torch.cat([p.grad.flatten() for p in m.parameters()])

    l_ref, g_ref = loss_and_grads(ref)
    l_fp8, g_fp8 = loss_and_grads(model)
    assert l_fp8 != l_ref  # FP8 is active
    assert abs(l_fp8 - l_ref) / l_ref < 2e-3
    assert torch.nn.functional.cosine_similarity(g_fp8, g_ref, dim=0) > 0.99


def test_weight_cache_reuses_until_the_weight_changes():
    cache = fp8.WeightCache()
    stacked = torch.nn.Parameter(torch.randn(3, 256, 128))
    first = cache.get(stacked[1])
    assert cache.get(stacked[1]) is first  # same expert, unchanged: no new quantization
    assert cache.get(stacked[2]) is not first  # another expert's slice
    x = torch.randn(5, 128)
    torch.testing.assert_close(
        fp8.forward_gemm(x, stacked[1], first), fp8.forward_gemm(x, stacked[1])
    )
    with torch.no_grad():  # an optimizer step: in place, the version counter moves
        stacked.mul_(2)
    again = cache.get(stacked[1])
    assert again is not first
    torch.testing.assert_close(
        fp8.forward_gemm(x, stacked[1], again), fp8.forward_gemm(x, stacked[1])
    )
    dy = torch.randn(5, 256)
    torch.testing.assert_close(
        fp8.dgrad_gemm(dy, stacked[1], again), fp8.dgrad_gemm(dy, stacked[1])
    )


def test_weight_cache_concatenations_follow_every_part():
    """Gate and up as one weight: the FP8 stacking (and the bf16 cast) of a tuple equals that of
    the concatenation, is reused while neither part changes and remade when either does; parts
    whose N would make a 128-row block straddle two are refused."""
    cache = fp8.WeightCache()
    w1, w3 = (torch.nn.Parameter(torch.randn(2, 256, 200) * c) for c in (0.1, 20.0))
    pair = cache.stacked((w1, w3))
    whole = fp8.StackedWeight(torch.cat([w1, w3], 1).detach())
    for got, want in ((pair.q, whole.q), *zip(pair.transposed, whole.transposed, strict=True)):
        assert torch.equal(got.float(), want.float())
    assert torch.equal(pair.scale, whole.scale)
    cast = cache.cast((w1, w3), torch.bfloat16)
    assert torch.equal(cast, torch.cat([w1, w3], 1).detach().to(torch.bfloat16))
    assert cache.stacked((w1, w3)) is pair and cache.cast((w1, w3), torch.bfloat16) is cast
    with torch.no_grad():
        w3.mul_(2)
    assert cache.stacked((w1, w3)) is not pair
    assert not torch.equal(cache.cast((w1, w3), torch.bfloat16), cast)
    with pytest.raises(ValueError, match=r"every N_i but the last a multiple of 128"):
        fp8.StackedWeight((torch.randn(2, 200, 128), torch.randn(2, 256, 128)))


@pytest.mark.parametrize("split", [False, True], ids=["fp8_train_linear", "split_linear"])
def test_fp8_layers_quantize_once_per_optimizer_step(monkeypatch, split):
    """FP8TrainLinear and the pipeline's SplitLinear quantize their weight once per optimizer step
    (not twice per micro-batch), and their gradients equal fp8_linear's without a cache."""
    from moeray.platform.parallel.weight_grad import SplitLinear, WeightGradStore

    made = []

    class Counting(fp8.QuantizedWeight):
        def __init__(self, w):
            made.append(w.shape)
            super().__init__(w)

    torch.manual_seed(3)
    lin = torch.nn.Linear(200, 130, bias=False)
    layer = (
        SplitLinear(lin.weight, None, WeightGradStore(), fp8=True)
        if split
        else (fp8.FP8TrainLinear(lin))
    )
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    monkeypatch.setattr(fp8, "QuantizedWeight", Counting)
    for step in range(2):
        ref_sum = torch.zeros_like(lin.weight)
        for _ in range(3):  # micro-batches, gradients accumulated
            x = torch.randn(7, 200)
            layer(x).square().sum().backward()
            w_ref = lin.weight.detach().clone().requires_grad_()
            fp8.fp8_linear(x, w_ref).square().sum().backward()  # no cache: quantizes itself
            ref_sum += w_ref.grad
            assert torch.equal(lin.weight.grad, ref_sum)
        # one quantization by the layer per step, one per micro-batch by the cacheless reference
        assert len(made) == (step + 1) * (1 + 3), made
        opt.step()
        opt.zero_grad()


def test_gemm_pairs_equal_the_single_gemms():
    """forward_gemm_pair / wgrad_gemm_pair quantize the shared operand once: same products."""
    torch.manual_seed(0)
    x, wa, wb = torch.randn(70, 256), torch.randn(160, 256), torch.randn(160, 256)
    ya, yb = fp8.forward_gemm_pair(x, fp8.QuantizedWeight(wa), fp8.QuantizedWeight(wb))
    torch.testing.assert_close(ya, fp8.forward_gemm(x, wa))
    torch.testing.assert_close(yb, fp8.forward_gemm(x, wb))
    dya, dyb = torch.randn(70, 160), torch.randn(70, 160)
    dwa, dwb = fp8.wgrad_gemm_pair(dya, dyb, x)
    torch.testing.assert_close(dwa, fp8.wgrad_gemm(dya, x))
    torch.testing.assert_close(dwb, fp8.wgrad_gemm(dyb, x))


def test_weight_cache_refresh_remakes_every_entry_in_place():
    """`refresh` (what a captured CUDA graph needs after an optimizer step): every entry whose
    weight changed is re-made into its own tensors (same objects, same storage) and equals a fresh
    quantization or cast; unchanged entries are left alone."""
    cache = fp8.WeightCache()
    w2 = torch.nn.Parameter(torch.randn(256, 200))
    w1, w3 = (torch.nn.Parameter(torch.randn(2, 256, 128) * c) for c in (0.1, 20.0))
    entries = {
        "get": cache.get(w2),
        "stacked": cache.stacked(w1),
        "pair": cache.stacked((w1, w3)),
        "cast": cache.cast((w1, w3), torch.bfloat16),
    }

    def tensors(value):
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, fp8.QuantizedWeight):
            return [value.qdq_NK]  # the CPU emulation's form
        return [value.q, value.scale, *value.transposed]

    ptrs = {k: [t.data_ptr() for t in tensors(v)] for k, v in entries.items()}
    assert cache.refresh() == 0  # nothing changed
    with torch.no_grad():
        w1.mul_(3)
        w2.add_(1)
    assert cache.refresh() == 4  # w1 is in three entries, w2 in one; w3 alone changed nothing
    assert cache.refresh() == 0
    fresh = {
        "get": fp8.QuantizedWeight(w2.detach()),
        "stacked": fp8.StackedWeight(w1.detach()),
        "pair": fp8.StackedWeight((w1.detach(), w3.detach())),
        "cast": torch.cat([w1, w3], 1).detach().to(torch.bfloat16),
    }
    for k, value in entries.items():
        assert [t.data_ptr() for t in tensors(value)] == ptrs[k], k
        for got, want in zip(tensors(value), tensors(fresh[k]), strict=True):
            assert torch.equal(got.float(), want.float()), k
        # and the cache still hands out the same (refreshed) object
    assert cache.get(w2) is entries["get"] and cache.stacked((w1, w3)) is entries["pair"]


def test_fp8_split_linear_with_bf16_wgrad_takes_the_bf16_layers_weight_grad():
    """An FP8 SplitLinear with `bf16_wgrad`: its forward and input grad are the FP8 layer's, its
    weight gradient the BF16 layer's (dy^T x from bf16 operands), bit for bit."""
    from moeray.platform.parallel.weight_grad import split_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 256, generator=g)
    dy = torch.randn(6, 128, generator=g)

    def run(fp8_on: bool, bf16_wgrad: bool):
        w = torch.nn.Parameter(torch.randn(128, 256, generator=torch.Generator().manual_seed(1)))
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = split_linear(xi, w, fp8=fp8_on, bf16_wgrad=bf16_wgrad)
        y.backward(dy.to(y.dtype))
        return y.detach(), xi.grad, w.grad

    y8, dx8, dw8 = run(True, False)
    y, dx, dw = run(True, True)
    _, _, dw_bf16 = run(False, False)
    assert torch.equal(y, y8) and torch.equal(dx, dx8)  # FP8 forward and input grad
    assert torch.equal(dw, dw_bf16) and not torch.equal(dw, dw8)  # BF16 weight grad


def test_weight_caches_finds_every_cache_of_a_model():
    """`weight_caches` (what a graphed step refreshes) finds the split linears' caches and the
    routed experts' (held by their `mlp_fn`): a cache left out is read stale by every replay."""
    from moeray.platform.config import tiny
    from moeray.platform.model.moe import Experts
    from moeray.platform.model.transformer import Transformer
    from moeray.platform.parallel.experts_mlp import enable_grouped_experts
    from moeray.platform.parallel.weight_grad import SplitLinear, enable_split_linears

    model = Transformer(tiny())
    fp8.enable_fp8_training(model, "experts")
    enable_grouped_experts(model, grouped_fp8=False)
    enable_split_linears(model)
    want = {id(m.mlp_fn.cache) for m in model.modules() if isinstance(m, Experts)}
    want |= {id(m.cache) for m in model.modules() if isinstance(m, SplitLinear)}
    assert len(want) > 2 and None not in want
    assert {id(c) for c in fp8.weight_caches(model)} == want
