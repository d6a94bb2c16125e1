"""mla_decode_block compiled on the GPU (marker gpu; skipped without CUDA): one cooperative launch
whose programs wait on each other. Against the engine's launches for the same math (`mla_chain`)
at Moonlight-16B-A3B's attention and at 128 heads (8 head blocks), bf16 and FP8 projections, 1-4
tokens, from the new token alone to 1,024 cached ones: the cache rows and the output within the
bf16 roundings, the counters left zero and no wait given up; then from a CUDA graph (replays equal
the eager call), launched cooperatively and not."""

import pytest
import torch

from moeray.kernels.bench.mla_block import MOONLIGHT, V3, V3_Q_LORA, block_case, mla_chain
from moeray.kernels.mla_block import COUNTERS, GIVEN_UP, mla_decode_block

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

WIDE = dict(MOONLIGHT, H=128)  # V3's heads: 8 attention head blocks, 1,024 S3 tasks a token


def _check(kw, got, want, chain_cache, counters):
    # the new rows come from qkv, whose fp32 sums run in another order: a bf16 ulp or two
    torch.testing.assert_close(kw["cache_PNK"], chain_cache, rtol=1.6e-2, atol=1e-2)
    scale = want.float().abs().max()
    torch.testing.assert_close(got.float() / scale, want.float() / scale, rtol=0, atol=2e-2)
    assert counters.tolist() == [0] * COUNTERS, counters.tolist()


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("dims", [MOONLIGHT, WIDE], ids=["moonlight", "h128"])
@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("ctx", [1, 160, 1024])
def test_mla_decode_block_matches_the_engines_launches(dims, T, ctx, fp8):
    _against_the_chain(block_case(T, ctx, dims, fp8=fp8))


def _against_the_chain(kw: dict) -> None:
    chain_cache = kw["cache_PNK"].clone()
    want = mla_chain(**{**kw, "cache_PNK": chain_cache})
    counters = torch.zeros(COUNTERS, dtype=torch.int32, device="cuda")
    got = mla_decode_block(**kw, counters=counters)
    torch.cuda.synchronize()
    _check(kw, got, want, chain_cache, counters)


@pytest.mark.parametrize("cooperative", [True, False])
def test_mla_decode_block_from_a_cuda_graph(cooperative, monkeypatch):
    from moeray.kernels import mla_block

    monkeypatch.setattr(mla_block, "COOPERATIVE", cooperative)
    kw = block_case(2, 300)
    counters = torch.zeros(COUNTERS, dtype=torch.int32, device="cuda")
    eager = mla_decode_block(**kw, counters=counters)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode_block(**kw, counters=counters)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    assert counters.tolist() == [0] * COUNTERS
    assert int(counters[GIVEN_UP]) == 0


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("T", [1, 4])
def test_mla_decode_block_with_the_input_norm(T, fp8):
    """The layer's input norm and the previous layer's deferred add as the launch's first stage,
    against rms_norm's kernel then the engine's launches: h exact, the rest within the roundings."""
    from moeray.kernels.norm import rms_norm

    kw = block_case(T, 300, MOONLIGHT, fp8=fp8)
    g = torch.Generator(device="cuda").manual_seed(7)
    D = kw["x_TD"].shape[1]
    w = (torch.rand(D, generator=g, device="cuda") + 0.5).to(torch.bfloat16)
    delta = torch.randn(T, D, generator=g, device="cuda").to(torch.bfloat16)
    normed, h_want = rms_norm(delta, w, 1e-5, kw["x_TD"])
    chain_cache = kw["cache_PNK"].clone()
    want = mla_chain(**{**kw, "x_TD": normed, "cache_PNK": chain_cache})
    counters = torch.zeros(COUNTERS, dtype=torch.int32, device="cuda")
    h = torch.empty_like(delta)
    got = mla_decode_block(**kw, counters=counters, norm=(w, 1e-5), delta_TD=delta, h_TD=h)
    torch.cuda.synchronize()
    assert torch.equal(h, h_want)
    _check(kw, got, want, chain_cache, counters)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("T", [1, 4])
def test_mla_decode_block_at_deepseek_v3(T, fp8):
    """DeepSeek-V3's attention (hidden 7168, 128 heads, the q LoRA of rank 1536: q_a, its norm and
    q_b as stages) against the engine's launches."""
    _against_the_chain(block_case(T, 300, V3, fp8=fp8, q_lora=V3_Q_LORA))
