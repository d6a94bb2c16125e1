"""The tiny model's greedy tokens through the engine on the GPU, with one kernel counted: the
A/B check of a fused decode kernel (its switch on and off give the same tokens)."""

import pytest
import torch

from moeray.platform.config import tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer


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
