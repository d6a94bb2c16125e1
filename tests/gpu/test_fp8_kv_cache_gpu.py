"""load_model(keep_fp8=True) decoding with a KV cache on the GPU. Every forward with a cache runs
MLA's absorbed path, which reads kv_b_proj as a matrix: kept in FP8 it must be dequantized with its
block scales (the raw e4m3 gave 1.14 relative logit error), once, and the copy must survive CUDA
graph capture. The CPU twin is tests/unit/test_checkpoint.py::
test_kept_fp8_with_a_kv_cache_matches_dequantized. Marker gpu; skipped without CUDA."""

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# fp32 Triton dots default to TF32; IEEE keeps the paged kernel within fp32 rounding of the
# dense path. Read when a kernel compiles: set at import, before any test compiles one.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


def _saved(tmp_path, cfg, seed):
    from moeray.platform.checkpoint import save_model
    from moeray.platform.model.transformer import Transformer

    model = Transformer(cfg)
    model.reset_parameters(seed=seed)
    with torch.no_grad():  # wide logit margins: greedy choices robust to rounding
        model.lm_head.weight.mul_(30.0)
    return save_model(model, cfg, tmp_path / "fp8", fp8=True)


def _cached_logits(model, cfg, ids):
    """Prefill 16 tokens, then one token per step, through a dense latent cache."""
    from moeray.platform.model.mla import DenseKVCache

    B, S = ids.shape
    cache = DenseKVCache(
        cfg.num_hidden_layers, B, S, cfg, dtype=model.lm_head.weight.dtype, device="cuda"
    )
    with torch.no_grad():
        parts = [model(ids[:, :16], cache=cache).logits]
        parts += [model(ids[:, s : s + 1], cache=cache).logits for s in range(16, S)]
    return torch.cat(parts, dim=1).float()


def _engine_tokens(model, cfg, prompts, *, graphs=True):
    from moeray.platform.engine.engine import Engine, EngineConfig
    from moeray.platform.engine.sampler import SamplingParams

    eng = Engine(
        model,
        EngineConfig(
            page_size=16,
            num_pages=64,
            max_model_len=256,
            enable_prefix_caching=False,
            use_cuda_graphs=graphs,
        ),
    )
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    return eng, [o.output_token_ids for o in outs]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_kept_fp8_cache_matches_dequantized_fp32(tmp_path):
    # tiny's dims are not multiples of 128, so FP8Linear dequantizes before its matmul, as the
    # dequantized model's weights were: the same numbers, so fp32 rounding bounds the difference.
    from moeray.platform.checkpoint import load_model
    from moeray.platform.config import tiny
    from moeray.platform.model.quant import FP8Linear

    cfg = tiny().replace(eos_token_id=None)
    path = _saved(tmp_path, cfg, seed=7)
    _, deq = load_model(path, device="cuda")
    _, kept = load_model(path, device="cuda", keep_fp8=True)
    assert isinstance(kept.model.layers[0].self_attn.kv_b_proj, FP8Linear)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g).cuda()
    rel = _rel(_cached_logits(kept, cfg, ids), _cached_logits(deq, cfg, ids))
    assert rel < 1e-5, rel
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 40, 17)]
    eng, kept_tokens = _engine_tokens(kept, cfg, prompts)
    assert eng.runner.attention_calls["attend"] > 0  # the paged kernel path, absorbed MLA
    assert kept_tokens == _engine_tokens(deq, cfg, prompts)[1]


def test_kept_fp8_gemm_decode_graphs_bf16(tmp_path):
    # Dims that are multiples of 128 where the FP8 GEMM needs them (kv_b_proj 256 x 128, q_b_proj
    # 256 x 128, o_proj 256 x 128, experts 128 x 256): FP8Linear and the experts run the block-
    # scaled FP8 kernels, which quantize activations per 1x128 tile, so the kept model is no
    # longer the dequantized one's numbers. On a CPU emulation of those kernels (act_quant_ref +
    # fp8_gemm_ref, fp32) this config gave 0.063-0.113 relative logit error over 4 seeds against
    # the dequantized model; the raw-e4m3 bug gave 1.14.
    from moeray.platform.checkpoint import load_model
    from moeray.platform.config import tiny

    cfg = tiny().replace(
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_attention_heads=2,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=64,
        v_head_dim=64,
        eos_token_id=None,
    )
    path = _saved(tmp_path, cfg, seed=8)
    _, deq = load_model(path, device="cuda", dtype=torch.bfloat16)
    _, kept = load_model(path, device="cuda", dtype=torch.bfloat16, keep_fp8=True)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g).cuda()
    rel = _rel(_cached_logits(kept, cfg, ids), _cached_logits(deq, cfg, ids))
    assert rel < 0.3, rel
    # The engine captures its decode steps (the dequantized kv_b_proj is made in the warm-up
    # before the capture) and replays them to the tokens it decodes eagerly: the same kernels on
    # the same rows, so tokens differ only when a replay goes wrong (a stale kv_b_proj copy, say).
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 33)]
    eng, tokens = _engine_tokens(kept, cfg, prompts)
    assert eng.metrics()["cuda_graphs"] == "captured", eng.metrics()["cuda_graphs"]
    assert all(len(t) == 10 for t in tokens)
    assert tokens == _engine_tokens(kept, cfg, prompts, graphs=False)[1]
