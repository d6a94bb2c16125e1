"""The `tiny()` model (what `make demo` trains and `moeray serve` serves by default) on the GPU
engine: its dims are below tl.dot's 16-element minimum in places (rope 8), so every Triton path
the engine takes for it must pad or fall back. Marker gpu; skipped without CUDA."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_tiny_engine_kernel_path_matches_gather_path():
    from moeray.platform.config import tiny
    from moeray.platform.engine.engine import Engine, EngineConfig
    from moeray.platform.engine.sampler import SamplingParams
    from moeray.platform.model.transformer import Transformer

    cfg = tiny().replace(eos_token_id=None)
    model = Transformer(cfg)
    model.reset_parameters(seed=5)
    with torch.no_grad():  # wide logit margins: greedy choices robust to bf16 rounding
        model.lm_head.weight.mul_(30.0)
    # bf16 as served: the fused MoE (graph-capturable, no host sync) takes half dtypes only
    model = model.to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 70, 129, 16)]
    params = SamplingParams(temperature=0, max_tokens=10)
    outs = {}
    for attention in ("gather", "kernel"):
        eng = Engine(model, EngineConfig(page_size=16, num_pages=64, max_model_len=256,
                                         attention=attention, enable_prefix_caching=False))
        outs[attention] = [o.output_token_ids for o in eng.generate(prompts, params)]
        if attention == "kernel":
            assert eng.metrics()["cuda_graphs"] == "captured", eng.metrics()["cuda_graphs"]
            assert eng.runner.attention_calls["attend"] > 0 or eng.runner.graphs
    assert all(len(o) == 10 for o in outs["kernel"])
    assert outs["kernel"] == outs["gather"]
