"""The shared experts on a second CUDA stream (model/shared_stream.py) on the GPU (marker gpu;
skipped without CUDA): a MoE layer at 17 and 64 tokens gives the same bits with its shared MLP on
the side stream as in order on one stream (bf16 and FP8, eagerly and replayed from a CUDA graph
on new inputs: a missing fork or join would read x before it is written or add the shared output
before it is), its kernels run on two streams, and the engine's greedy outputs at batch 20 match
those with MOERAY_FUSED_SHARED_STREAM=0 (the add rounds once more: test_shared_fuse_gpu's
match)."""

import pytest
import torch
from torch.autograd import DeviceType

from tests.gpu import test_shared_fuse_gpu as fuse_gpu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _moe_layer(fp8: bool, monkeypatch, add_in_sum: bool = False):
    """The test model's first MoE layer, merged and fused as the engine leaves it, with the
    transform applied (`add_in_sum`: MOERAY_FUSED_SHARED_SUM=1, the add in the routed sum)."""
    from moeray.platform.model.merge import merge_projections
    from moeray.platform.model.moe import MoE
    from moeray.platform.model.shared_fuse import fuse_shared_experts
    from moeray.platform.model.shared_stream import overlap_shared_experts

    monkeypatch.setenv("MOERAY_FUSED_SHARED_STREAM", "1")
    monkeypatch.setenv("MOERAY_FUSED_SHARED_SUM", "1" if add_in_sum else "0")
    model = fuse_gpu._model(torch.bfloat16, fp8)
    merge_projections(model)
    fuse_shared_experts(model)
    report = overlap_shared_experts(model)
    assert all(why is None for why in report.values()), report
    return next(m for m in model.modules() if isinstance(m, MoE))


def _in_order(moe, x):
    from moeray.platform.model.shared_stream import SharedStream

    side = moe._modules["shared_stream"]
    moe.register_module("shared_stream", SharedStream(None))
    try:
        return moe(x)
    finally:
        moe.register_module("shared_stream", side)


@pytest.mark.parametrize("add_in_sum", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("T", [17, 64])
def test_same_bits_as_in_order_eager_and_graphed(fp8, T, add_in_sum, monkeypatch):
    """Also with the shared output added in the routed experts' last launch after an event wait
    (SHARED_SUM): the fused MoE's sum rounds as the separate add does."""
    # built outside inference mode, as the engine's model
    moe = _moe_layer(fp8, monkeypatch, add_in_sum)
    assert moe._modules["shared_stream"].add_in_sum is add_in_sum
    with torch.inference_mode():
        _same_bits(moe, T)


def _same_bits(moe, T: int) -> None:
    D = moe.config.hidden_size
    g = torch.Generator(device="cuda").manual_seed(T)
    x1, x2 = (torch.randn(T, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in "ab")
    want1, want2 = _in_order(moe, x1), _in_order(moe, x2)
    torch.testing.assert_close(moe(x1), want1, rtol=0, atol=0)

    static = x1.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moe(static)  # warm-up outside the capture (lazy allocations, Triton compiles)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe(static)
    for x, want in ((x2, want2), (x1, want1)):
        static.copy_(x)
        graph.replay()
        torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_kernels_run_on_two_streams(monkeypatch):
    moe = _moe_layer(False, monkeypatch)
    x = torch.randn(32, moe.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    streams = {}
    for name, run in (("side", lambda: moe(x)), ("in_order", lambda: _in_order(moe, x))):
        with torch.inference_mode():
            run()  # warm-up: compiles, lazy copies
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        streams[name] = {e.device_resource_id for e in kernels}
    assert len(streams["in_order"]) == 1, streams
    assert len(streams["side"]) == 2, streams


@pytest.mark.parametrize("fp8", [False, True])
def test_engine_greedy_matches_in_order(fp8, monkeypatch):
    from moeray.platform.engine.engine import Engine, EngineConfig
    from moeray.platform.engine.sampler import SamplingParams

    model = fuse_gpu._model(torch.bfloat16, fp8)
    params = SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True, logprobs=fuse_gpu.TOP_LOGPROBS
    )
    prompts = fuse_gpu._prompts(tuple(3 + (7 * i) % 40 for i in range(20)))  # batch 20: > 16
    outs = {}
    for on in ("1", "0"):
        monkeypatch.setenv("MOERAY_FUSED_SHARED_STREAM", on)
        eng = Engine(model, EngineConfig(page_size=16, num_pages=128, max_model_len=256))
        side = [k for k, why in eng.shared_stream.items() if why is None]
        assert len(side) == (3 if on == "1" else 0), eng.shared_stream  # 2 MoE layers + MTP's
        assert eng.runner.graph_status.startswith("captured"), eng.runner.graph_status
        outs[on] = eng.generate(prompts, params)
        del eng
    assert fuse_gpu._check_close(outs["1"], outs["0"], fp8) <= (4 if fp8 else 2)
