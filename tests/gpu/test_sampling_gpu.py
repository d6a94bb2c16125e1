"""vLLM's sampling parameters on the GPU engine: decode still runs as captured CUDA graphs (the
sampler works on the logits after the replay), greedy with penalties, logit_bias and min_tokens
equals a plain full-forward reference, and prompt logprobs equal the forward's log_softmax.
Sampler.tokens reads nothing back (sync debug mode "error"). Marker gpu; skipped without CUDA."""

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")  # as test_tiny_engine_gpu: fp32 dots in IEEE

EOS = 7


def _model(dtype):
    from moeray.platform.config import tiny
    from moeray.platform.model.transformer import Transformer

    cfg = tiny().replace(eos_token_id=EOS)
    model = Transformer(cfg)
    model.reset_parameters(seed=5)
    with torch.no_grad():  # wide logit margins: greedy choices robust to bf16 rounding
        model.lm_head.weight.mul_(30.0)
    return cfg, model.to("cuda", dtype)


def _engine(model, **kw):
    from moeray.platform.engine.engine import Engine, EngineConfig

    base = dict(page_size=16, num_pages=64, max_model_len=256, max_num_seqs=8)
    return Engine(model, EngineConfig(**{**base, **kw}))


def _reference(model, prompt, p, n):
    """Greedy with the processing written out per row: full forward, then bias, min_tokens,
    repetition (prompt + output), frequency and presence (output)."""
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            x = model(torch.tensor([prompt + out], device="cuda")).logits[0, -1].float().cpu()
        for t, b in p.logit_bias:
            x[t] += b
        if len(out) < p.min_tokens:
            x[[EOS, *p.stop_token_ids]] = float("-inf")
        seen = torch.zeros_like(x, dtype=torch.bool)
        seen[prompt + out] = True
        x = torch.where(seen & (x > 0), x / p.repetition_penalty, x)
        x = torch.where(seen & (x <= 0), x * p.repetition_penalty, x)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=x.numel()).float()
        x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        out.append(int(x.argmax()))
        if out[-1] == EOS and len(out) >= p.min_tokens:
            break
    return out


def test_processed_greedy_under_cuda_graphs_matches_the_reference():
    from moeray.platform.engine.sampler import SamplingParams

    cfg, model = _model(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(8, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 40, 90)]
    p = SamplingParams(
        temperature=0,
        max_tokens=12,
        min_tokens=5,
        repetition_penalty=1.7,
        frequency_penalty=0.5,
        presence_penalty=0.3,
        logit_bias=((EOS, 30.0), (11, -5.0)),
    )
    eng = _engine(model)
    outs = [o.output_token_ids for o in eng.generate(prompts, p)]
    assert eng.metrics()["cuda_graphs"] == "captured", eng.metrics()["cuda_graphs"]
    assert outs == [_reference(model, q, p, 12) for q in prompts]
    assert all(EOS not in o[:5] for o in outs)  # min_tokens holds eos back
    # sampling with +100 on one token: every row takes it, graphs or not
    forced = SamplingParams(temperature=1.0, seed=3, max_tokens=8, logit_bias=((42, 100.0),))
    assert [o.output_token_ids for o in eng.generate(prompts, forced)] == [[42] * 8] * 3


def test_prompt_logprobs_equal_the_forward():
    from moeray.platform.engine.sampler import SamplingParams

    cfg, model = _model(torch.float32)
    model.lm_head.weight.data.div_(30.0)  # natural logprob scale for the tolerance below
    prompt = torch.randint(0, cfg.vocab_size, (150,), generator=torch.Generator()).tolist()
    eng = _engine(model, max_num_batched_tokens=64)  # 150 tokens: three prefill chunks
    (o,) = eng.generate([prompt], SamplingParams(max_tokens=2, prompt_logprobs=3))
    with torch.no_grad():
        lp = model(torch.tensor([prompt], device="cuda")).logits[0].float().log_softmax(-1)
    got = torch.tensor([e.logprob for e in o.prompt_logprobs[1:]])
    want = lp[torch.arange(149), torch.tensor(prompt[1:])].cpu()
    assert o.prompt_logprobs[0] is None
    assert torch.allclose(got, want, atol=2e-3), (got - want).abs().max()


def test_sampler_tokens_read_nothing_back():
    """Sampler.tokens on CUDA logits (greedy and sampled rows, temperature, top-k, top-p, min-p)
    under torch's sync debug mode "error": no host read-back and no synchronizing copy, so async
    scheduling can launch a sampled step ahead (engine/overlap.py); and the same tokens as on
    the CPU."""
    from moeray.platform.engine.sampler import Sampler, SamplingParams, make_generator

    g = torch.Generator().manual_seed(0)
    logits_cpu = torch.randn(5, 1000, generator=g) * 3
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=2),
        SamplingParams(temperature=1.2, min_p=0.05, seed=3),
        SamplingParams(temperature=0.7, top_p=0.5, seed=4),
    ]

    def gens():
        fallback = torch.Generator().manual_seed(9)
        return [make_generator(p.seed, fallback) for p in params]

    want = Sampler().tokens(logits_cpu, params, gens()).tolist()
    logits = logits_cpu.cuda()
    sampler, generators = Sampler(), gens()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sampler.tokens(logits, params, generators)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.tolist() == want


@pytest.mark.parametrize("V", [129280, 163840])
def test_argmax_rows_on_cuda_is_torch_argmax(V, monkeypatch):
    """kernels/argmax.py compiled, through Sampler.greedy_ids: torch.argmax's ids with ties planted
    within and across chunks and a NaN, at batch 1, 64 and 300, bf16 and fp32; counters left
    zero."""
    from moeray.platform.engine.sampler import Sampler

    monkeypatch.setenv("MOERAY_FUSED_ARGMAX", "1")  # opt-in
    sampler = Sampler()
    g = torch.Generator(device="cuda").manual_seed(V)
    for B in (1, 64, 300):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(B, V, device="cuda", generator=g).to(dtype)
            top = x.max() + 1
            x[0, 5000] = x[0, 4097] = x[0, 4096] = x[0, V - 1] = top
            if B > 1:
                x[1] = top
                x[2, V - 1] = float("nan")
            want = x.float().argmax(-1)
            assert want[0] == 4096
            for _ in range(2):
                assert torch.equal(sampler.greedy_ids(x), want), (B, dtype)
            assert sampler._argmax_counters[x.device].count_nonzero() == 0
