"""Merged projections (model/merge.py) on the GPU (marker gpu; skipped without CUDA): the engine's
greedy tokens with MLA's q_a + kv_a and the MLPs' gate + up merged equal those with
MOERAY_FUSED_PROJ=0 (bf16, fp32, FP8 e4m3 + 128x128 scales; with MTP drafting), and a profiled
decode step (CUDA-graph replays) runs fewer kernels: 2 per layer in bf16 (gemv, one launch per
projection), at least 2 per layer in FP8 (4 with today's fp8_gemv: each part was gemv + split-K
reduce)."""

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# fp32 Triton dots default to TF32 (the engine's other kernels): IEEE keeps fp32 paths comparable.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


def _cfg():
    """tiny's features at 128-multiples where FP8 needs them: q_a 128 rows then kv_a 40 (a stack
    of 168 rows, off the grid: merged at fp8_gemv's rows), dense MLP 256 + 256, shared expert
    128 + 128, experts 128 x 128 (the fused FP8 MoE applies)."""
    from moeray.platform.config import tiny

    return tiny().replace(
        hidden_size=128,
        q_lora_rank=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        eos_token_id=None,
    )


def _model(dtype, fp8: bool, cfg=None):
    """The test model on the GPU (`cfg`: default `_cfg()`), FP8 weights with `fp8`."""
    from moeray.platform.engine.bench.model import quantize_fp8_
    from moeray.platform.model.transformer import Transformer

    model = Transformer(cfg or _cfg())
    model.reset_parameters(seed=5)
    with torch.no_grad():  # wide logit margins: greedy choices robust to summation order
        model.lm_head.weight.mul_(30.0)
    model = model.to("cuda", dtype)
    if fp8:
        quantize_fp8_(model)
    return model


def _prompts(n=(3, 70, 16)):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, _cfg().vocab_size, (k,), generator=g).tolist() for k in n]


def _engine(model, monkeypatch, merge: bool, **kw):
    from moeray.platform.engine.engine import Engine, EngineConfig

    monkeypatch.setenv("MOERAY_FUSED_PROJ", "1" if merge else "0")
    # The shared experts' gate + up merged are launched only where they are not fused into the
    # fused MoE (model/shared_fuse.py): counted here apart from that fusion.
    monkeypatch.setenv("MOERAY_FUSED_SHARED", "0")
    return Engine(model, EngineConfig(page_size=16, num_pages=64, max_model_len=256, **kw))


@pytest.mark.parametrize(
    "dtype,fp8,spec",
    [
        (torch.bfloat16, False, 0),
        (torch.float32, False, 0),
        (torch.bfloat16, True, 0),
        (torch.bfloat16, False, 1),
        (torch.bfloat16, True, 1),
    ],
)
def test_engine_greedy_unchanged_by_merge(dtype, fp8, spec, monkeypatch):
    from moeray.platform.engine.sampler import SamplingParams

    model = _model(dtype, fp8)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    tokens = {}
    for merge in (True, False):
        eng = _engine(model, monkeypatch, merge, num_speculative_tokens=spec)
        merged = [k for k, why in eng.merged_projections.items() if why is None]
        assert len(merged) == (2 * 4 if merge else 0), eng.merged_projections  # 3 layers + MTP
        if dtype != torch.float32:  # fp32 decodes eagerly: the fused MoE takes bf16/fp16 only
            assert eng.runner.graph_status.startswith("captured"), eng.runner.graph_status
        tokens[merge] = [o.output_token_ids for o in eng.generate(_prompts(), params)]
        del eng
    assert all(len(t) == 10 for t in tokens[True])
    assert tokens[True] == tokens[False]


@pytest.mark.parametrize("fp8", [False, True])
def test_fewer_kernels_per_decode_step(fp8, monkeypatch):
    from moeray.platform.engine.bench.profile import profile_decode

    model = _model(torch.bfloat16, fp8)
    layers = model.config.num_hidden_layers
    per_step = {}
    for merge in (True, False):
        eng = _engine(model, monkeypatch, merge, max_num_seqs=4)
        per_step[merge] = profile_decode(eng, _prompts((5,)), 4)["kernels_per_step"]
        del eng
    saved = per_step[False] - per_step[True]
    print(f"kernels per decode step, fp8={fp8}: {per_step[False]} -> {per_step[True]}")
    if fp8:
        assert saved >= 2 * layers, per_step
    else:
        assert saved == 2 * layers, per_step
