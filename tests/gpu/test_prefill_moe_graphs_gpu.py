"""GPU checks (marker gpu; skipped without CUDA): MLA prefill at real head dims, the fused MoE
inside `Experts.forward` (vs the per-expert loop, host-sync free, CUDA-graph capturable) and the
engine's decode CUDA graphs (captured, same greedy tokens as eager)."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def _rel(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output: unwritten (poisoned) elements"
    return ((out - ref).norm() / ref.norm()).item()


def _poison(nbytes: int = 1 << 30) -> None:
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))


def test_mla_prefill_fp32_fits_shared_memory():
    """fp32 inputs at V3's head dims take smaller tiles: the bf16 tiles would need 336 KB of
    shared memory (an fp32 engine's expanded prefill launched them and failed)."""
    from moeray.kernels.mla_prefill import mla_prefill, mla_prefill_ref

    lens = [3, 200, 77]
    t = sum(lens)
    q = torch.randn(t, 16, 192, device="cuda")
    kv = torch.randn(t, 16, 256, device="cuda")
    pe = torch.randn(t, 64, device="cuda")
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q_nope, q_pe = q.split([128, 64], -1)
    k_nope, v = kv.split([128, 128], -1)
    ref, _ = mla_prefill_ref(q_nope, q_pe, k_nope, pe, v, cu, 192**-0.5)
    _poison()
    out = mla_prefill(q_nope, q_pe, k_nope, pe, v, cu, 192**-0.5)
    assert _rel(out, ref) < 5e-3  # TF32 dots unless TRITON_F32_DEFAULT=ieee


@pytest.mark.parametrize("heads", [16, 128])
def test_mla_prefill_real_dims(heads):
    from moeray.kernels.mla_prefill import mla_prefill, mla_prefill_ref

    lens = [1, 700, 129, 2050, 64, 333]
    t = sum(lens)
    q = torch.randn(t, heads, 192, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(t, heads, 256, device="cuda", dtype=torch.bfloat16)
    pe = torch.randn(t, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q_nope, q_pe = q.split([128, 64], -1)
    k_nope, v = kv.split([128, 128], -1)
    scale = 192**-0.5
    ref, ref_lse = mla_prefill_ref(q_nope, q_pe, k_nope, pe, v, cu, scale)
    _poison()
    out, lse = mla_prefill(q_nope, q_pe, k_nope, pe, v, cu, scale, return_lse=True)
    assert _rel(out, ref) < 1e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)
    _poison()  # a second block config: 128 x 128 tiles
    out2 = mla_prefill(
        q_nope,
        q_pe,
        k_nope,
        pe,
        v,
        cu,
        scale,
        config=dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    )
    assert _rel(out2, ref) < 1e-2


def _experts(fp8: bool, n_experts=32, dim=1024, inter=288):
    from moeray.platform.config import small
    from moeray.platform.model.moe import Experts
    from moeray.platform.model.quant import quantize_fp8_blocks, set_fp8_expert_weight

    cfg = small().replace(n_routed_experts=n_experts, hidden_size=dim, moe_intermediate_size=inter)
    ex = Experts(cfg).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in (ex.gate_proj, ex.up_proj, ex.down_proj):
            p.copy_(torch.randn(p.shape, generator=g, device="cuda") / p.shape[-1] ** 0.5)
    ex = ex.to(torch.bfloat16)
    if fp8:
        for name in ("gate_proj", "up_proj", "down_proj"):
            q, s = quantize_fp8_blocks(getattr(ex, name).detach().float())
            set_fp8_expert_weight(ex, name, q, s)
    return ex


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("t", [3, 200])
def test_experts_fused_path_matches_loop(fp8, t):
    # 32 local experts at offset 16 of 64: ids outside [16, 48) belong to other ranks.
    ex = _experts(fp8, inter=256 if fp8 else 288)
    x = torch.randn(t, 1024, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(t, 64, device="cuda").topk(8, dim=1).indices
    w = torch.rand(t, 8, device="cuda")
    with torch.no_grad():
        _poison()
        fused = ex(x, ids, w, expert_offset=16)
    with torch.enable_grad():  # grad mode + a leaf that needs grad: the loop path
        loop = ex(x.clone().requires_grad_(), ids, w, expert_offset=16).detach()
    assert fused.dtype == torch.bfloat16 and fused.shape == (t, 1024)
    # FP8: the fused kernel also quantizes x and h per 1x128 (the DeepSeek-V3 recipe); the loop
    # multiplies dequantized weights by unquantized activations. e4m3 rounds to 3 mantissa bits
    # (~3.6% rms per element), twice: ~5% apart; a wrong expert or weight would be ~100%.
    assert _rel(fused, loop) < (0.1 if fp8 else 1e-2)
    assert loop.abs().amax() > 0


def test_experts_fused_path_has_no_host_sync_and_captures():
    ex = _experts(False)
    t = 16
    x = torch.randn(t, 1024, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(t, 32, device="cuda").topk(8, dim=1).indices
    w = torch.rand(t, 8, device="cuda")
    with torch.inference_mode():
        ex(x, ids, w)  # compile outside the checks
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ex(x, ids, w)
        finally:
            torch.cuda.set_sync_debug_mode(prev)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ex(x, ids, w)
        # new routing and inputs, replayed: must equal an eager call on them
        x.copy_(torch.randn_like(x))
        ids.copy_(torch.rand(t, 32, device="cuda").topk(8, dim=1).indices)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, ex(x, ids, w))


def test_engine_decode_graphs_capture_and_match_eager():
    from moeray.platform.config import small
    from moeray.platform.engine.engine import Engine, EngineConfig
    from moeray.platform.engine.sampler import SamplingParams
    from moeray.platform.model.transformer import Transformer

    cfg = small().replace(num_hidden_layers=3, vocab_size=4096, eos_token_id=None)
    model = Transformer(cfg)
    model.reset_parameters(seed=3)
    model = model.to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 64, 130, 17, 90)
    ]
    params = SamplingParams(temperature=0, max_tokens=12)
    outs = {}
    for graphs in (False, True):
        eng = Engine(
            model,
            EngineConfig(
                page_size=64,
                num_pages=64,
                max_model_len=512,
                use_cuda_graphs=graphs,
                enable_prefix_caching=False,
                # the prefill-chunk graphs compute MLA's absorbed path: the eager engine too
                prefill_attention="absorbed",
            ),
        )
        outs[graphs] = [o.output_token_ids for o in eng.generate(prompts, params)]
        status = eng.metrics()["cuda_graphs"]
        print(f"use_cuda_graphs={graphs}: cuda_graphs={status!r}")
        if graphs:
            assert status == "captured", status
            assert eng.runner.graphs, "no decode graph was built"
    assert outs[True] == outs[False]
