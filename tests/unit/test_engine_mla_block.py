"""The engine with MOERAY_FUSED_MLA_BLOCK=1: decode steps run each layer's input norm and MLA
attention as one mla_decode_block launch (here under Triton's interpreter, through the GPU's
attention view) with the numbers of the launch-per-step path, at Moonlight's structure (no q LoRA,
merged q + kv_a) with small widths, bf16 and FP8; prefill keeps the usual path."""

import pytest
import torch

from moeray.platform.config import moonlight_tiny
from moeray.platform.engine.bench.model import quantize_fp8_
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer


def _model(fp8: bool = False, q_lora: int | None = None) -> Transformer:
    # the dense layer: attention is the point
    cfg = moonlight_tiny().replace(num_hidden_layers=1, q_lora_rank=q_lora)
    model = Transformer(cfg)
    model.reset_parameters(seed=3)
    model = model.to(torch.bfloat16).eval()
    if fp8:
        quantize_fp8_(model)
    return model


def _generate(model, monkeypatch, on: bool, attn_out: list | None = None):
    """Greedy tokens and attention call counts; with `attn_out` each layer's decode-step MLP input
    (one token a sequence: post_attention_layernorm(x + attention), the attention's output normed
    with the residual it adds to) appended in call order."""
    hooks = []
    if attn_out is not None:
        for layer in model.model.layers:
            hooks.append(
                layer.mlp.register_forward_hook(
                    lambda m, args, out: (
                        attn_out.append(args[0].float()) if args[0].shape[1] == 1 else None
                    )
                )
            )
    if on:
        monkeypatch.setenv("MOERAY_FUSED_MLA_BLOCK", "1")
    else:
        monkeypatch.delenv("MOERAY_FUSED_MLA_BLOCK", raising=False)
    eng = Engine(model, EngineConfig(page_size=16, num_pages=32, attention="kernel"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (5, 12)]
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=3))
    for h in hooks:
        h.remove()
    return [o.output_token_ids for o in outs], eng.metrics()["attention_calls"]


@pytest.mark.parametrize(
    ("fp8", "q_lora"),
    [(False, None), (True, None), (False, 128), (True, 128)],
    ids=["bf16", "fp8", "bf16-qlora", "fp8-qlora"],
)
def test_engine_decode_through_mla_block_matches_the_launch_per_step_path(fp8, q_lora, monkeypatch):
    """Each decode step's attention output (as the MLP reads it), layer by layer, within the bf16
    roundings of the usual path's, for every step whose input tokens agree (random weights: a
    rounding may flip a near-tie argmax, after which the two runs decode different tokens). FP8:
    e4m3 q + kv_a (3,072 + 576 rows at Moonlight, here 128 + 80) and o_proj with block scales;
    q_lora: DeepSeek-V3's query LoRA (q_a + kv_a merged, q_a_layernorm, q_b)."""
    model = _model(fp8, q_lora)
    attn_off: list[torch.Tensor] = []
    attn_on: list[torch.Tensor] = []
    want, calls_off = _generate(model, monkeypatch, on=False, attn_out=attn_off)
    got, calls_on = _generate(model, monkeypatch, on=True, attn_out=attn_on)
    assert calls_off["block"] == 0 and calls_on["block"] > 0
    # prefill chunks (several tokens a sequence) keep the expanded path
    assert calls_on["expanded"] == calls_off["expanded"] > 0
    layers = len(model.model.layers)
    assert len(attn_on) == len(attn_off) == layers * (len(want[0]) - 1)
    # decode step k reads token k - 1 of every sequence: compare while those agree
    same = next(
        (i for i in range(len(want[0])) if [o[i] for o in got] != [o[i] for o in want]), None
    )
    steps = len(want[0]) - 1 if same is None else same
    assert steps >= 1
    for a, b in zip(attn_on[: steps * layers], attn_off[: steps * layers], strict=True):
        scale = b.abs().max()
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=2e-2)
