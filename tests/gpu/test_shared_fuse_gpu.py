"""Shared experts fused into the fused MoE (model/shared_fuse.py) on the GPU (marker gpu; skipped
without CUDA): the engine's greedy outputs with the shared experts run as extra experts of the
fused MoE kernels match those with MOERAY_FUSED_SHARED=0 (bf16, FP8 e4m3 + 128x128 scales; with MTP
drafting), and a profiled decode step (CUDA-graph replays) runs fewer kernels: per MoE layer the
shared MLP's launches (gemv + SwiGLU + gemv and the reduce launches of the gemvs that split K):
4 a layer in bf16 and 3 in FP8 on an H100 (the fused gate writes the shared ids and weights in its
own launch at decode; unfused, the shared output is added in the routed sum's launch, SHARED_SUM).

"Match" as vLLM's check_logprobs_close: the fused sums round differently (shared_fuse.py), so a
near-tie may flip a greedy token; each sequence's tokens are equal up to its first difference,
the chosen tokens' logprobs close until then, and at the difference each run's token is among the
other's top TOP_LOGPROBS with the two tokens within MARGIN nats of each other in both runs (a wrong
weight or scale diverges at once, by whole nats: the test model's logits are scaled 30x)."""

import os

import pytest
import torch

from tests.gpu import test_merge_projections_gpu as merge_gpu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# fp32 Triton dots default to TF32 (the engine's other kernels): IEEE keeps fp32 paths comparable.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


TOP_LOGPROBS = 5
# nats, bf16 / FP8 (FP8 also quantizes the shared experts' activations when fused)
LOGPROB_TOL = {False: 0.2, True: 1.0}
MARGIN = {False: 0.5, True: 1.5}


def _check_close(fused, unfused, fp8: bool) -> int:
    """The module docstring's match of two runs' outputs; how many sequences diverged."""
    diverged, worst = 0, 0.0
    for a, b in zip(fused, unfused, strict=True):
        for i, (ta, tb) in enumerate(zip(a.output_token_ids, b.output_token_ids, strict=True)):
            la, lb = a.logprobs[i], b.logprobs[i]
            if ta == tb:
                worst = max(worst, abs(la.logprob - lb.logprob))
                assert abs(la.logprob - lb.logprob) < LOGPROB_TOL[fp8], (i, la, lb)
                continue
            top_a, top_b = dict(la.top), dict(lb.top)
            print(f"diverged at {i}: fused {la}, unfused {lb}")
            assert tb in top_a and ta in top_b, (i, la, lb)
            assert la.logprob - top_a[tb] < MARGIN[fp8], (i, la, lb)
            assert lb.logprob - top_b[ta] < MARGIN[fp8], (i, la, lb)
            diverged += 1
            break
    print(f"fp8={fp8}: {diverged} diverged, largest logprob difference before {worst:.4f}")
    return diverged


def _cfg():
    """tiny's features at 128-multiples where FP8 needs them: experts 128 x 128 with 2 shared (a
    shared MLP of 256 split in two), top-3 of 16 (not a power of two)."""
    from moeray.platform.config import tiny

    return tiny().replace(
        hidden_size=128,
        q_lora_rank=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        n_shared_experts=2,
        num_experts_per_tok=3,
        eos_token_id=None,
    )


def _model(dtype, fp8: bool):
    return merge_gpu._model(dtype, fp8, _cfg())


def _prompts(n=(3, 70, 16)):
    return merge_gpu._prompts(n)  # tokens below tiny's vocabulary, as _cfg() keeps it


def _engine(model, monkeypatch, fuse: bool, **kw):
    from moeray.platform.engine.engine import Engine, EngineConfig

    monkeypatch.setenv("MOERAY_FUSED_SHARED", "1" if fuse else "0")
    return Engine(model, EngineConfig(page_size=16, num_pages=64, max_model_len=256, **kw))


@pytest.mark.parametrize("fp8,spec", [(False, 0), (True, 0), (False, 1), (True, 1)])
def test_engine_greedy_matches_unfused(fp8, spec, monkeypatch):
    from moeray.platform.engine.sampler import SamplingParams

    model = _model(torch.bfloat16, fp8)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=TOP_LOGPROBS)
    outs = {}
    for fuse in (True, False):
        eng = _engine(model, monkeypatch, fuse, num_speculative_tokens=spec)
        fused = [k for k, why in eng.fused_shared.items() if why is None]
        assert len(fused) == (2 + 1 if fuse else 0), eng.fused_shared  # 2 MoE layers + MTP's
        assert eng.runner.graph_status.startswith("captured"), eng.runner.graph_status
        outs[fuse] = eng.generate(_prompts(), params)
        del eng
    assert all(len(o.output_token_ids) == 10 for o in outs[True])
    # of 3 sequences; FP8 more: its fused shared experts quantize their activations 1x128 (W8A8,
    # as vLLM and SGLang run block-FP8 linears), the unfused FP8 gemv does not: up to 0.35 nats
    # on this test model's 30x logits before a flip (H200)
    assert _check_close(outs[True], outs[False], fp8) <= (3 if fp8 else 1)


@pytest.mark.parametrize("fp8", [False, True])
def test_shared_early_keeps_the_engine_outputs(fp8, monkeypatch):
    """moe_gemv running the shared slots' gate/up before its PDL wait (the default; reading x two
    launches back) in the engine's captured decode graphs: the same tokens and logprobs as with
    MOERAY_FUSED_SHARED_EARLY=0, at batch 1 and 3 (1 x 5 and 3 x 5 assignments: moe_gemv). Stale x
    read before the norm had finished would change them."""
    from moeray.platform.engine.sampler import SamplingParams

    model = _model(torch.bfloat16, fp8)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=TOP_LOGPROBS)
    outs = {}
    for early in ("0", "1"):
        monkeypatch.setenv("MOERAY_FUSED_SHARED_EARLY", early)
        eng = _engine(model, monkeypatch, True)
        assert eng.runner.graph_status.startswith("captured"), eng.runner.graph_status
        assert (eng.fp8_as_bf16_bytes > 0) == fp8  # the small FP8 layers' copies, made up front
        outs[early] = [eng.generate(_prompts(n), params) for n in ((5,), (3, 70, 16))]
        del eng
    for a, b in zip(outs["0"], outs["1"], strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.output_token_ids == y.output_token_ids
            assert [lp.logprob for lp in x.logprobs] == [lp.logprob for lp in y.logprobs]


@pytest.mark.parametrize("fp8", [False, True])
def test_fewer_kernels_per_decode_step(fp8, monkeypatch):
    from moeray.platform.engine.bench.profile import profile_decode

    model = _model(torch.bfloat16, fp8)
    cfg = model.config
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    per_step = {}
    for fuse in (True, False):
        eng = _engine(model, monkeypatch, fuse, max_num_seqs=4)
        per_step[fuse] = profile_decode(eng, _prompts((5,)), 4)["kernels_per_step"]
        del eng
    saved = per_step[False] - per_step[True]
    print(f"kernels per decode step, fp8={fp8}: {per_step[False]} -> {per_step[True]}")
    # the shared MLP's launches: 8 / 6 fewer at these 2 MoE layers on an H100 (61 -> 53 in bf16,
    # 58 -> 52 in FP8); 10 / 8 before SHARED_SUM folded the unfused path's add launch into the
    # routed experts' sum (model/shared_stream.py)
    assert saved == (3 if fp8 else 4) * moe_layers, per_step
