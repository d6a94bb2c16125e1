"""What the decode GEMV GPU tests (gemv, head_gemv) share: a NaN-poisoned allocator block so that
unwritten outputs show, the bound of one rounding from an fp32 reference, the CUDA kernels one
call launches, a CUDA-graph capture after a side-stream warm-up, and the tiny model's greedy
tokens through the engine with one kernel counted (the A/B check of a fused decode kernel: its
switch on and off give the same tokens)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from moeray.platform.config import tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer


def poison(nbytes: int = 1 << 30) -> None:
    """Fill a block with NaN and free it: the caching allocator hands it to the next outputs."""
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))


def within_rounding(y: torch.Tensor, ref32: torch.Tensor) -> None:
    """fp32 sums in another order, one rounding to y's dtype (half an ulp, 2^-9 relative for
    bf16) per element; fp32 output within 1e-5 relative."""
    assert torch.isfinite(y).all(), "unwritten (NaN-poisoned) output"
    if y.dtype == torch.float32:
        assert ((y - ref32).norm() / ref32.norm()).item() < 1e-5
        return
    err = (y.float() - ref32).abs()
    bound = ref32.abs() * 2.0**-8 + 1e-4 * ref32.abs().max()
    assert (err <= bound).all(), (err / bound).max().item()


def cuda_kernels(fn) -> list[str]:
    """Names of the CUDA kernels one call of fn launches (compiled before the profile)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def captured(fn) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """fn warmed up on a side stream, then captured: the graph and the output it writes."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn()
    return graph, y


def tiny_greedy(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch, module, kernel: str
) -> tuple[list[list[int]], int]:
    """Greedy tokens (10 each) for 3 prompts (3, 70 and 16 tokens) from the tiny model with wide
    logit margins, and the calls made to `module.kernel` meanwhile (the caller sets the switch)."""
    calls = [0]
    real = getattr(module, kernel)

    def counting(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(module, kernel, counting)
    cfg = tiny().replace(eos_token_id=None)
    model = Transformer(cfg)
    model.reset_parameters(seed=5)
    with torch.no_grad():  # wide logit margins: greedy choices robust to rounding
        model.lm_head.weight.mul_(30.0)
    model = model.to("cuda", dtype)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 70, 16)]
    eng = Engine(model, EngineConfig(page_size=16, num_pages=64, max_model_len=256))
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    monkeypatch.undo()
    return [o.output_token_ids for o in outs], calls[0]
