"""model/merge.py: a merged model (MLA's q/q_a + kv_a, the MLP's gate + up as one GEMM each) gives
the unmerged model's outputs at shapes off the usual grids, in fp32, bf16 and FP8; keeps the state
dict (names, values, save and load); leaves training to the parts; refuses FP8 pairs whose first
part is not whole 128-row blocks; and the engine's greedy tokens are the same with
MOERAY_FUSED_PROJ=0 and without.

Bit for bit in bf16 and FP8: the stacked GEMM sums each output over the same K in the same order
as the part's own (FP8 dequantizes the stacked blocks to the same values). fp32 within 1e-6: CPU
silu runs a vectorized exp over whole vectors and a scalar exp on the tail, which differ by an ulp,
and gate/up as row views of the stacked output [T, 2 x 40] put other elements in the tail than
the contiguous [T, 40] outputs of the parts (bf16 rounds the difference away; the GPU's swiglu
kernel computes each element alike whatever the layout)."""

import copy

import pytest
import torch

from moeray.platform import config as config_presets
from moeray.platform.checkpoint import load_model, save_model
from moeray.platform.config import tiny
from moeray.platform.engine.bench.model import quantize_fp8_
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model import quant
from moeray.platform.model.block import DecoderLayer
from moeray.platform.model.linear import MergedLinear
from moeray.platform.model.merge import merge_projections
from moeray.platform.model.mla import DenseKVCache
from moeray.platform.model.moe import MLP
from moeray.platform.model.quant import FP8Linear
from moeray.platform.model.transformer import Transformer


def _cfg(q_lora: bool):
    """Odd widths: D = 72 (FP8: a partial 128-column block), kv_a 40 rows; FP8 merges the query
    pair (128 rows first: q_proj 4 x 32, or q_a 128) and the dense MLP (128 + 128) but not the
    shared expert (40 rows first)."""
    return tiny().replace(
        hidden_size=72,
        num_hidden_layers=2,
        vocab_size=300,
        q_lora_rank=128 if q_lora else None,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16 if not q_lora else 8,
        kv_lora_rank=24 if not q_lora else 32,
        intermediate_size=128,
        moe_intermediate_size=40,
        eos_token_id=None,
    )


def _models(cfg, dtype=torch.float32, fp8=False, seed=1):
    plain = Transformer(cfg)
    plain.reset_parameters(seed=seed)
    plain = plain.to(dtype)
    if fp8:
        quantize_fp8_(plain)
    merged = copy.deepcopy(plain)
    report = merge_projections(merged)
    return plain.eval(), merged.eval(), report


def _decode_logits(model, ids_BS, steps=3):
    """Prefill then `steps` single-token steps over a dense latent cache: every step's logits."""
    cfg = model.config
    B, S = ids_BS.shape
    dtype = model.lm_head.weight.dtype
    cache = DenseKVCache(cfg.num_hidden_layers, B, S + steps, cfg, dtype=dtype)
    out = [model(ids_BS, cache=cache).logits]
    for _ in range(steps):
        out.append(model(out[-1][:, -1:].argmax(-1), cache=cache).logits)
    return out


def _assert_same(a, b, exact=False):
    """Bit-equal; fp32 within 1e-6 unless `exact` (module docstring: CPU silu's tail)."""
    for x, y in zip(a, b, strict=True):
        if x.dtype == torch.float32 and not exact:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(x, y), (x.float() - y.float()).abs().max()


@pytest.mark.parametrize("q_lora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_model_equals_unmerged(q_lora, dtype):
    cfg = _cfg(q_lora)
    plain, merged, report = _models(cfg, dtype)
    assert report and all(v is None for v in report.values()), report
    assert len(report) == 2 * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    ids = torch.randint(0, cfg.vocab_size, (3, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for kw in ({}, {"absorbed": True}):
            a, b = plain(ids, **kw), merged(ids, **kw)
            _assert_same([a.logits, *a.mtp_logits], [b.logits, *b.mtp_logits])
        _assert_same(_decode_logits(plain, ids), _decode_logits(merged, ids))


@pytest.mark.parametrize("q_lora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_merges_whole_blocks_only_and_equals_unmerged(q_lora, dtype):
    """Bit-equal in fp32 too: the shared expert (the SwiGLU with a vector tail) stays apart."""
    cfg = _cfg(q_lora)
    plain, merged, report = _models(cfg, dtype, fp8=True)
    shared = {k: v for k, v in report.items() if k.endswith("shared_experts")}
    assert shared and all("40 rows, not a multiple of 128" in v for v in shared.values()), report
    assert all(v is None for k, v in report.items() if k not in shared), report
    attn = merged.model.layers[0].self_attn.fused_qkv_a_proj
    dense = merged.model.layers[0].mlp.gate_up_proj
    # q (128) + kv_a (40) = 168 rows, off the grid: merged at fp8_gemv's rows only; 256: always
    assert attn.gemv_only and not dense.gemv_only
    assert attn.applies(torch.zeros(16, cfg.hidden_size)) is False  # grad mode on
    with torch.no_grad():
        assert attn.applies(torch.zeros(2, 8, cfg.hidden_size))
        assert dense.applies(torch.zeros(1, 17, cfg.hidden_size))
        with pytest.MonkeyPatch.context() as mp:  # without the bf16 copies: fp8_gemv's rows only
            mp.setenv("MOERAY_FUSED_FP8_AS_BF16", "0")
            assert not attn.applies(torch.zeros(1, 17, cfg.hidden_size))
            mp.setenv("MOERAY_FUSED_FP8_GEMV_BATCH", "1")  # opt-in: fp8_gemv to 64 rows
            assert attn.applies(torch.zeros(2, 32, cfg.hidden_size))
            assert not attn.applies(torch.zeros(1, 65, cfg.hidden_size))
        with pytest.MonkeyPatch.context() as mp:  # the default: the small stack as bf16 to 64 rows
            mp.delenv("MOERAY_FUSED_FP8_AS_BF16", raising=False)
            bf16 = torch.bfloat16
            assert attn.applies(torch.zeros(2, 32, cfg.hidden_size, dtype=bf16))
            assert not attn.applies(torch.zeros(1, 65, cfg.hidden_size, dtype=bf16))
            # fp32 activations never run a bf16 copy: fp8_gemv's rows only
            assert not attn.applies(torch.zeros(2, 32, cfg.hidden_size))
            mp.setattr(quant, "FP8_AS_BF16_MAX_WEIGHTS", attn.fused.weight.numel() - 1)
            assert not attn.applies(torch.zeros(2, 32, cfg.hidden_size, dtype=bf16))  # too many
    # S = 19 rows per sequence: the prefill runs the query pair's parts, decode steps the stack
    ids = torch.randint(0, cfg.vocab_size, (3, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _assert_same(_decode_logits(plain, ids), _decode_logits(merged, ids), exact=True)
        _assert_same([plain(ids[:, :4]).logits], [merged(ids[:, :4]).logits], exact=True)


def test_tiny_fp8_refuses_ragged_first_parts():
    cfg = tiny()  # q_a 48 rows, MLP 160, shared expert 32: no FP8 pair starts on a 128-row block
    _, merged, report = _models(cfg, fp8=True)
    assert report and all(v is not None and "not a multiple of 128" in v for v in report.values())
    assert all(getattr(m, "fused_qkv_a_proj", None) is None for m in merged.modules())
    assert not any(isinstance(m, MergedLinear) for m in merged.modules())


def test_bias_merges_with_the_weight_or_is_refused():
    for q_lora in (True, False):
        cfg = _cfg(q_lora).replace(attention_bias=True)
        plain, merged, report = _models(cfg)
        attn = {k: v for k, v in report.items() if k.endswith("self_attn")}
        if q_lora:  # q_a_proj and kv_a_proj_with_mqa both have biases: stacked with the rows
            assert all(v is None for v in attn.values()), attn
            with torch.no_grad():
                for m in plain.modules():
                    if hasattr(m, "kv_a_proj_with_mqa"):
                        m.q_a_proj.bias.normal_()
                        m.kv_a_proj_with_mqa.bias.normal_()
            merged.load_state_dict(plain.state_dict())
        else:  # q_proj has none
            assert all("bias on some" in v for v in attn.values()), attn
        ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            _assert_same(_decode_logits(plain, ids), _decode_logits(merged, ids))


def test_state_dict_save_and_load_keep_the_original_names(tmp_path):
    cfg = _cfg(q_lora=True)
    plain, merged, _ = _models(cfg)
    a, b = plain.state_dict(), merged.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("fused" in k or "gate_up" in k for k in b)
    # the parts are views of the stacked weight: no second copy
    mlp = merged.model.layers[0].mlp
    assert isinstance(mlp, MLP) and mlp.gate_up_proj is not None
    stacked = mlp.gate_up_proj.fused.weight
    assert mlp.up_proj.weight.data_ptr() == stacked[cfg.intermediate_size :].data_ptr()
    assert isinstance(mlp.up_proj.weight, torch.nn.Parameter)
    save_model(merged, cfg, tmp_path)
    _, loaded = load_model(tmp_path)
    c = loaded.state_dict()
    assert list(c) == list(a) and all(torch.equal(a[k], c[k]) for k in a)
    # loading into the merged model copies in place: the stacked weights follow
    other, _, _ = _models(cfg, seed=7)
    merged.load_state_dict(other.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _assert_same(_decode_logits(other, ids), _decode_logits(merged, ids))


def test_training_runs_the_parts(monkeypatch):
    cfg = _cfg(q_lora=False)
    plain, merged, _ = _models(cfg)

    def refuse(self, x):
        raise AssertionError("the merged GEMM ran under autograd")

    monkeypatch.setattr(MergedLinear, "forward", refuse)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    grads = []
    for model in (plain, merged):
        model.train()
        out = model(ids)
        (out.logits.square().mean() + sum(m.square().mean() for m in out.mtp_logits)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert list(grads[0]) == list(grads[1])
    for n, g in grads[0].items():
        assert (g is None and grads[1][n] is None) or torch.equal(g, grads[1][n]), n


def test_switch_off_idempotence_and_re_merge(monkeypatch):
    cfg = _cfg(q_lora=True)
    plain, merged, _ = _models(cfg)
    attn = merged.model.layers[1].self_attn
    first = attn.fused_qkv_a_proj
    assert first is not None
    merge_projections(merged)
    assert attn.fused_qkv_a_proj is first  # still views of it: kept, nothing copied
    monkeypatch.setenv("MOERAY_FUSED_PROJ", "0")
    report = merge_projections(merged)
    assert all(v is not None and "MOERAY_FUSED_PROJ=0" in v for v in report.values())
    assert not any(isinstance(m, MergedLinear) for m in merged.modules())
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _assert_same(_decode_logits(plain, ids), _decode_logits(merged, ids))
    monkeypatch.delenv("MOERAY_FUSED_PROJ")
    merge_projections(merged)
    again = attn.fused_qkv_a_proj
    assert again is not None and again is not first
    # a dtype move replaces the parts' tensors (the views break): merged anew from them
    merged, plain = merged.double(), plain.double()
    assert not again.holds([attn.q_a_proj, attn.kv_a_proj_with_mqa])
    merge_projections(merged)
    assert attn.fused_qkv_a_proj is not again
    assert attn.fused_qkv_a_proj.fused.weight.dtype == torch.float64
    with torch.no_grad():
        _assert_same(_decode_logits(plain, ids), _decode_logits(merged, ids))


def _engine_tokens(model, monkeypatch, merge: bool, **kw):
    """Greedy tokens of two prompts, the engine's merge report, and how often a merged GEMM ran."""
    monkeypatch.setenv("MOERAY_FUSED_PROJ", "1" if merge else "0")
    calls = [0]
    real = MergedLinear.forward

    def counting(self, x):
        calls[0] += 1
        return real(self, x)

    monkeypatch.setattr(MergedLinear, "forward", counting)
    eng = Engine(model, EngineConfig(page_size=16, num_pages=64, max_num_batched_tokens=32, **kw))
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 40)
    ]
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    monkeypatch.setattr(MergedLinear, "forward", real)
    return [o.output_token_ids for o in outs], eng.merged_projections, calls[0]


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("spec", [0, 1])
def test_engine_greedy_tokens_unchanged(fp8, spec, monkeypatch):
    cfg = _cfg(q_lora=True)
    _, model, _ = _models(cfg, fp8=fp8)
    merged, report, calls = _engine_tokens(model, monkeypatch, True, num_speculative_tokens=spec)
    assert any(v is None for v in report.values()) and calls > 0, report
    assert any(isinstance(m, MergedLinear) for m in model.mtp.modules())  # MTP's block too
    plain, report, calls = _engine_tokens(model, monkeypatch, False, num_speculative_tokens=spec)
    assert all(v is not None for v in report.values()) and calls == 0
    assert all(len(t) == 8 for t in merged) and merged == plain


def _fp8_on_meta(module):
    """Every Linear of `module` as an FP8Linear of meta tensors (shapes only)."""
    for name, m in list(module.named_modules()):
        if isinstance(m, torch.nn.Linear):
            N, K = m.weight.shape
            q = torch.empty(N, K, dtype=torch.float8_e4m3fn, device="meta")
            fp8 = FP8Linear(q, torch.empty(-(-N // 128), -(-K // 128), device="meta"))
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, fp8)


@pytest.mark.parametrize("preset", ["moonlight_16b_a3b", "deepseek_v3"])
@pytest.mark.parametrize("fp8", [False, True])
def test_published_shapes_merge_every_pair(preset, fp8):
    """Moonlight: q_proj 3072 (16 x 192) + kv_a 576, dense MLP 11264, shared experts 2 x 1408;
    V3: q_a 1536 + kv_a 576, dense 18432, shared 2048. Every first part is whole 128-row blocks,
    so FP8 merges them all; the query stacks (3648, 2112 rows) are off the grid: merged up to
    fp8_gemv's 16 rows."""
    cfg = getattr(config_presets, preset)()
    with torch.device("meta"):
        layers = torch.nn.ModuleList(DecoderLayer(cfg, i) for i in (0, cfg.first_k_dense_replace))
    if fp8:
        _fp8_on_meta(layers)
    report = merge_projections(layers)
    assert list(report.values()) == [None] * 4, report
    attn = layers[0].self_attn.fused_qkv_a_proj
    q_rows = cfg.q_lora_rank or cfg.num_attention_heads * 192
    assert attn.sizes == (q_rows, 576) and attn.gemv_only == fp8
    assert not layers[0].mlp.gate_up_proj.gemv_only
    assert not layers[1].mlp.shared_experts.gate_up_proj.gemv_only


def test_decode_modules_leave_out_merged_parts_and_idle_mtp():
    """The engine's decode modules (whose FP8 layers get bf16 copies up front): each merged
    layer, not its parts; the MTP module only when drafting."""
    from moeray.platform.engine.engine import decode_modules
    from moeray.platform.model.merge import merged_parts

    _, merged, report = _models(_cfg(q_lora=False), torch.bfloat16, fp8=True)
    parts = merged_parts(merged)
    attn = merged.model.layers[0].self_attn
    assert attn.q_proj in parts and attn.kv_a_proj_with_mqa in parts
    assert len(parts) == 2 * sum(why is None for why in report.values())
    ids = {id(m) for m in decode_modules(merged, drafting=False)}
    assert id(attn.fused_qkv_a_proj.fused) in ids and not ids & {id(m) for m in parts}
    mtp = list(merged.mtp.modules())
    assert mtp and not ids & {id(m) for m in mtp}
    with_mtp = {id(m) for m in decode_modules(merged, drafting=True)}
    assert {id(m) for m in mtp} - {id(m) for m in parts} <= with_mtp  # (its merged parts not)
    assert with_mtp - ids == {id(m) for m in mtp} - {id(m) for m in parts}
