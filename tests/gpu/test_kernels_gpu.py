"""The kernel checks at real DeepSeek-V3 shapes on the GPU (marker gpu; skipped without CUDA)."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def _rel(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output: unwritten (poisoned) elements"
    return ((out - ref).norm() / ref.norm()).item()


def _poison(nbytes: int = 1 << 30) -> None:
    """Fill a block with NaN and free it: the caching allocator hands it to the next outputs."""
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))


def test_quant_kernels_exact_at_real_shapes():
    from moeray.kernels import fp8

    x = (
        torch.randn(4099, 7168, device="cuda", dtype=torch.bfloat16)
        * torch.rand(4099, 1, device="cuda")
        * 4
    )
    _poison()
    q, s = fp8.act_quant(x)
    qr, sr = fp8.act_quant_ref(x)
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    assert torch.equal(q.float(), qr.float())
    _poison()
    qc, sc = fp8.act_quant(x, scale_col_major=True)
    assert sc.stride() == (1, 4099) and torch.equal(sc, sr) and torch.equal(qc.float(), qr.float())
    _poison()
    qt, st = fp8.act_quant_t(x)
    qtr, str_ = fp8.act_quant_t_ref(x)
    torch.testing.assert_close(st, str_, rtol=1e-6, atol=0)
    assert torch.equal(qt.float(), qtr.float())
    w = torch.randn(2112, 7168, device="cuda", dtype=torch.bfloat16)
    _poison()
    wq, ws = fp8.weight_quant(w)
    wqr, wsr = fp8.weight_quant_ref(w)
    torch.testing.assert_close(ws, wsr, rtol=1e-6, atol=0)
    assert torch.equal(wq.float(), wqr.float())
    _poison()
    d = fp8.weight_dequant(wq, ws)
    assert torch.equal(d, fp8.weight_dequant_ref(wq, ws))


@pytest.mark.parametrize("m", [64, 4096, 77])
@pytest.mark.parametrize("nk", [(2112, 7168), (24576, 1536), (4096, 7168)])
def test_fp8_gemm_native_and_triton(m, nk):
    from moeray.kernels import fp8

    n, k = nk
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda") * torch.rand(n, 1, device="cuda").mul(4).add(0.1)
    xq, xs = fp8.act_quant(x, scale_col_major=True)
    wq, ws = fp8.weight_quant(w)
    ref = fp8.fp8_gemm_ref(xq, xs, wq, ws).float()
    _poison()
    assert _rel(fp8.fp8_gemm_triton(xq, xs, wq, ws), ref) < 8e-3
    _poison()
    assert _rel(fp8.fp8_gemm(xq, xs, wq, ws), ref) < 8e-3
    assert _rel(fp8.fp8_gemm(xq, xs, wq, ws), x @ w.t()) < 0.06


def test_native_block_scaled_available_on_hopper():
    from moeray.kernels import fp8

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("block-scaled _scaled_mm is probed on sm_90 only")
    layout = fp8.native_blockscaled_layout(0, False)
    print(
        "native block-scaled _scaled_mm b-scale layout:",
        layout,
        "| per-row b:",
        fp8.native_blockscaled_layout(0, True),
    )
    assert layout is not None


def test_backward_gemms_real_shape():
    from moeray.kernels import fp8

    m, n, k = 4096, 2048, 7168
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda")
    dy = torch.randn(m, n, device="cuda")
    wq, ws = fp8.weight_quant(w)
    wd = fp8.weight_dequant(wq, ws, out_dtype=torch.float32)
    for backend in ("auto", "triton"):
        _poison()
        assert _rel(fp8.fp8_linear_dgrad(dy, wq, ws, backend=backend), dy @ wd) < 0.05
        _poison()
        assert _rel(fp8.fp8_linear_wgrad(dy, x, backend=backend), dy.t() @ x) < 0.05


# 5: decode tiles; 333: 166 rows an expert (64-row tiles); 700: 350 (FP8's 128x128 prefill tile)
@pytest.mark.parametrize("t", [5, 333, 700])
@pytest.mark.parametrize("fp8_weights", [False, True])
def test_fused_moe_real_width(t, fp8_weights, monkeypatch):
    from moeray.kernels import fp8
    from moeray.kernels.moe import fused_moe, fused_moe_ref

    e, h, i, k = 16, 7168, 2048, 8
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16) / h**0.5
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16) / i**0.5
    scores = torch.rand(t, e, device="cuda")
    scores[:, 7] = -1  # expert 7 gets no tokens
    ids = scores.topk(k, dim=1).indices.to(torch.int32)
    ids[::4, 0] = e + 3  # routed to an expert on another rank: skipped
    wts = torch.rand(t, k, device="cuda", dtype=torch.bfloat16)
    kw = {}
    if fp8_weights:
        q13, s13 = map(torch.stack, zip(*[fp8.weight_quant(w) for w in w13], strict=False))
        q2, s2 = map(torch.stack, zip(*[fp8.weight_quant(w) for w in w2], strict=False))
        w13, w2, kw = q13, q2, {"w13_scale": s13, "w2_scale": s2}
    _poison()
    out = fused_moe(x, w13, w2, ids, wts, **kw)
    ref = fused_moe_ref(x, w13, w2, ids, wts, **kw)
    # FP8: the kernel quantizes h after rounding it to bf16, the reference from fp32 (~1% apart)
    assert _rel(out, ref) < (2e-2 if fp8_weights else 1e-2)


@pytest.mark.parametrize(
    ("h", "i", "e", "k", "t"), [(7168, 2048, 32, 8, 64), (2048, 1408, 64, 6, 50)]
)
def test_fp8_gate_up_quantizes_h_itself_at_real_widths(h, i, e, k, t):
    """FP8 decode tiles of 128 columns quantize h in gate/up's epilogue: the fused MoE's output
    has the bits of 64-column tiles + act_quant (the same down tile in both), at V3's and
    Moonlight's expert widths (I = 2048 / 1408: 16 / 11 groups a row)."""
    from moeray.kernels import fp8
    from moeray.kernels.moe import fused_moe, fused_moe_ref

    torch.manual_seed(h)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16) / h**0.5
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16) / i**0.5
    q13, s13 = map(torch.stack, zip(*[fp8.weight_quant(w) for w in w13], strict=False))
    q2, s2 = map(torch.stack, zip(*[fp8.weight_quant(w) for w in w2], strict=False))
    ids = torch.rand(t, e, device="cuda").topk(k, dim=1).indices.to(torch.int32)
    wts = torch.rand(t, k, device="cuda", dtype=torch.bfloat16)
    kw = {"w13_scale": s13, "w2_scale": s2}
    base = dict(BLOCK_M=16, BLOCK_K=128, num_warps=4, num_stages=4)
    base["down"] = dict(BLOCK_N=64)
    _poison()
    want = fused_moe(x, q13, q2, ids, wts, **kw, config=dict(base, BLOCK_N=64))
    _poison()
    got = fused_moe(x, q13, q2, ids, wts, **kw, config=dict(base, BLOCK_N=128))
    assert torch.equal(got, want)
    assert _rel(got, fused_moe_ref(x, q13, q2, ids, wts, **kw)) < 2e-2


@pytest.mark.parametrize(("t", "h", "e", "k"), [(64, 2048, 64, 6), (33, 7168, 256, 8)])
def test_moe_align_quant_real_shapes(t, h, e, k):
    """moe_align + act_quant in one launch equal the two apart, compiled, at Moonlight's and V3's
    widths (64 / 33 decode tokens)."""
    from moeray.kernels import fp8
    from moeray.kernels.moe_align import moe_align_quant, moe_align_ref

    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16) * 3
    ids = torch.rand(t, e, device="cuda").topk(k, dim=1).indices.to(torch.int32)
    _poison()
    sorted_ids, block_expert, q, scale = moe_align_quant(ids, e, 16, x)
    ref = moe_align_ref(ids, e, 16)
    q_ref, s_ref = fp8.act_quant(x)
    assert torch.equal(sorted_ids, ref[0]) and torch.equal(block_expert, ref[1])
    assert torch.equal(q.float(), q_ref.float()) and torch.equal(scale, s_ref)


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("subpage", ["0", "1"])  # MOERAY_FUSED_MLA_SUBPAGE (half pages)
def test_mla_decode_real_shapes(heads, subpage, monkeypatch):
    from moeray.kernels.mla_decode import mla_decode, mla_decode_multi, mla_decode_ref

    monkeypatch.setenv("MOERAY_FUSED_MLA_SUBPAGE", subpage)

    lens = [5000, 1, 64, 4097, 300]
    b, page = len(lens), 64
    max_pages = max(-(-n // page) for n in lens) + 2
    kv = torch.randn(b * max_pages + 5, page, 576, device="cuda", dtype=torch.bfloat16)
    table = (
        torch.randperm(b * max_pages + 5, device="cuda")[: b * max_pages].view(b, max_pages).int()
    )
    seq = torch.tensor(lens, device="cuda", dtype=torch.int32)
    q = torch.randn(b, 3, heads, 576, device="cuda", dtype=torch.bfloat16) * 0.3
    scale = 192**-0.5
    ref, ref_lse = mla_decode_ref(q, kv, table, seq, scale)
    _poison()
    out, lse = mla_decode(q[:, 2], kv, table, seq, scale, return_lse=True)
    assert _rel(out, ref[:, 2]) < 1e-2
    torch.testing.assert_close(lse, ref_lse[:, 2], atol=1e-2, rtol=0)
    seq3 = seq.clamp(min=3)
    ref3, _ = mla_decode_ref(q, kv, table, seq3, scale)
    _poison()
    out3 = mla_decode_multi(q, kv, table, seq3, scale)
    assert _rel(out3, ref3) < 1e-2


def test_mla_decode_multi_rows_past_grid_y():
    """A 4,097-token chunk at 16 heads is 65,552 query rows: more than a grid's y limit (65,535),
    which the absorbed prefill of a 4K prompt launches."""
    from moeray.kernels.mla_decode import mla_decode_multi, mla_decode_ref

    s, heads, page = 4097, 16, 64
    pages = -(-s // page)
    kv = torch.randn(pages, page, 576, device="cuda", dtype=torch.bfloat16)
    table = torch.arange(pages, device="cuda", dtype=torch.int32).view(1, pages)
    seq = torch.tensor([s], device="cuda", dtype=torch.int32)
    q = torch.randn(1, s, heads, 576, device="cuda", dtype=torch.bfloat16) * 0.3
    rows = slice(s - 64, s)  # the reference on the last rows only: it is O(S^2) memory
    ref, _ = mla_decode_ref(q[:, rows], kv, table, seq, 192**-0.5)
    _poison()
    out = mla_decode_multi(q, kv, table, seq, 192**-0.5)
    assert _rel(out[:, rows], ref) < 1e-2


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_moonlight_moe_layer_fused_paths_equal_reference(tokens):
    """One Moonlight-shaped MoE layer (2048 wide, 64 experts top-6, 2 shared experts) in bf16: the
    shared experts' SwiGLU kernel and their add inside the fused MoE's last launch give the same
    bits as PyTorch's silu * up and a separate add (issue 19's decode fusions)."""
    import os
    from unittest import mock

    from moeray.platform.config import moonlight_16b_a3b
    from moeray.platform.model.moe import MoE

    torch.manual_seed(0)
    with torch.device("cuda"):
        moe = MoE(moonlight_16b_a3b())
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    moe = moe.to("cuda", torch.bfloat16).eval()
    x = torch.randn(1, tokens, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        fused = moe(x)
        r = moe.last_routing
        assert r is not None
        x_TD = x.view(-1, 2048)
        with mock.patch.dict(os.environ, {"MOERAY_FUSED_SWIGLU": "0"}):
            shared = moe.shared_experts(x_TD)
        ref = moe.experts(x_TD, r.expert_ids_TK, r.weights_TK) + shared
    assert torch.equal(fused.view(-1, 2048), ref)
