"""model/shared_fuse.py under the Triton interpreter: the shared experts stacked as extra experts of
the fused MoE give each MoE layer's output of today's fused path (the fused MoE kernel plus the
shared MLP's output added in its sum) within bf16 rounding, at n_shared 1 and 2 and top-k 3 and 5,
in bf16 and FP8 (e4m3 + 128x128 scales); the shared MLP is no longer called; the state dict is
unchanged and the routed experts' tensors are views of the stack; refusals name why; training and
MOERAY_FUSED_SHARED=0 keep the shared MLP; the engine's greedy tokens are the same either way.

Tolerances: each shared expert's output is rounded to bf16 before the fp32 sum of a token's
experts, where the unfused path rounds the routed sum and the shared output and adds them: a few
bf16 ulps of the output. FP8 also quantizes the shared experts' input and hidden activations per
1x128 group (the fused FP8 MoE's aligned kernels do for every expert; the shared FP8Linear's
reference does not): a relative error of a few percent of the output's norm, against ~1 for a
wrong weight or scale. (The fused MoE runs moe_gemv up to 16 assignments, weight-only, unless
MOERAY_FUSED_MOE_GEMV=0; the decode test runs both paths.)"""

import copy

import pytest
import torch

from moeray.kernels.gate import moe_gate
from moeray.platform.config import tiny
from moeray.platform.engine.bench.model import quantize_fp8_
from moeray.platform.model import moe as moe_module
from moeray.platform.model.merge import merge_projections
from moeray.platform.model.moe import MoE
from moeray.platform.model.quant import dequantize_fp8_blocks
from moeray.platform.model.shared_fuse import MAX_FUSED_TOKENS, SharedFused, fuse_shared_experts
from moeray.platform.model.transformer import Transformer


def _cfg(n_shared: int, top_k: int, fp8: bool = False):
    """Odd shapes: top-k 3 or 5 of 9 experts (3 groups of 3, 2 kept: 6 candidates; groups and
    their experts both padded to 4 in the fused gate); D 72 / I 24 in bf16, whole 128-blocks in
    FP8 (the fused FP8 MoE needs them). A dense layer, one MoE layer and the MTP module's: two MoE
    stacks fused apart. (12 experts and a second decoder MoE layer ran the same code: the aligned
    MoE's grid has a row block per expert, and each layer is one more MoE; ~40% more of the
    interpreter's time.)"""
    return tiny().replace(
        hidden_size=128 if fp8 else 72,
        moe_intermediate_size=128 if fp8 else 24,
        intermediate_size=256 if fp8 else 96,
        num_hidden_layers=2,
        vocab_size=300,
        n_routed_experts=9,
        n_group=3,
        topk_group=2,
        num_experts_per_tok=top_k,
        n_shared_experts=n_shared,
        routed_scaling_factor=2.5,  # a shared expert scaled by it would be far off
        eos_token_id=None,
    )


def _models(cfg, fp8=False, seed=1):
    plain = Transformer(cfg)
    plain.reset_parameters(seed=seed)
    with torch.no_grad():  # wide logit margins: greedy choices robust to summation order
        plain.lm_head.weight.mul_(30.0)
    plain = plain.to(torch.bfloat16)
    if fp8:
        quantize_fp8_(plain)
    fused = copy.deepcopy(plain)
    report = fuse_shared_experts(fused)
    return plain.eval(), fused.eval(), report


def _moe_pairs(plain, fused):
    """(plain MoE, fused MoE) of each MoE layer, the MTP module's too."""
    other = dict(fused.named_modules())
    return [(m, other[n]) for n, m in plain.named_modules() if type(m) is MoE]


def _unfused_fused_path(moe: MoE, x_TD):
    """Today's GPU path of `MoE.forward`: the fused kernel, the shared MLP's output in its sum.
    -> (that output, the shared MLP's output)."""
    r = moe.route(x_TD)
    assert moe.shared_experts is not None
    shared = moe.shared_experts(x_TD)
    y = moe.experts._fused(x_TD, r.expert_ids_TK, r.weights_TK, add_TD=shared)
    assert y is not None
    return y, shared


def _kernel_gate(logits_TE, bias_E, *, group_mask_value, shared_experts=0, **kw):
    """`route` as on the GPU at decode: the fused gate (here interpreted), which appends the
    shared experts' ids and weights in its launch."""
    return moe_gate(logits_TE, bias_E, shared_experts=shared_experts, **kw)


# (1, 3): the fused gate's K + S = 4 ids fill its power-of-two width; (2, 5): 7 of 8, a padding
# slot, and S = 2 (the shared MLP split in two experts, its down weight a column-split copy).
# (2, 3) took no branch these two miss: 4 cases, ~43 s of the interpreter. Each gate with bf16 and
# FP8 and S 1 and 2, pairwise: 4 cases (the full product's 8: ~60 s). The gate decides only where
# the ids come from (its launch, or the MoE's cats), the same J ids either way; bf16 or FP8 and S
# decide the stacks. These are the 4 that test_shared_early_switch_keeps_the_bits leaves out, so
# the fused path still runs every combination. Checked: the shared weights of the MoE's cats times
# 2.5, the fused gate's shared weights 2.0, S = 2's two down column blocks swapped, and the FP8 down
# scales doubled each fail 2 of the 4.
@pytest.mark.parametrize(
    "n_shared,top_k,fp8,gate",
    [
        (1, 3, True, "kernel"),
        (2, 5, False, "kernel"),
        (1, 3, False, "reference"),
        (2, 5, True, "reference"),
    ],
)
def test_moe_layers_equal_unfused(n_shared, top_k, fp8, gate, monkeypatch):
    """With the fused gate the ids and weights come from its launch (decode); with the reference
    (prefill beyond its 32 rows, CPU) the MoE appends them."""
    if gate == "kernel":
        monkeypatch.setattr(moe_module, "route", _kernel_gate)
    cfg = _cfg(n_shared, top_k, fp8)
    plain, fused, report = _models(cfg, fp8)
    # 1 MoE layer (the first is dense), and the MTP module's
    assert list(report.values()) == [None] * (1 + cfg.num_nextn_predict_layers), report
    assert len(_moe_pairs(plain, fused)) == 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, cfg.hidden_size, generator=g).to(torch.bfloat16)
    calls: list[str] = []
    for a, b in _moe_pairs(plain, fused):
        routed_by_kernel = b.route(x, n_shared).fused_ids_TJ is not None
        assert routed_by_kernel == (gate == "kernel")
        hook = b.shared_experts.register_forward_hook(lambda *_: calls.append("shared"))
        with torch.no_grad():
            want, shared = _unfused_fused_path(a, x)
            want = want.float()
            got = b(x[None]).squeeze(0).float()
        hook.remove()
        assert calls == []  # the shared MLP ran inside the fused kernels
        if fp8:
            rel = (got - want).norm() / want.norm()
            assert rel < 0.05, rel
        else:
            torch.testing.assert_close(got, want, rtol=2**-6, atol=2**-6 * want.abs().max().item())
        # and far from the result without the shared experts or with them scaled: the routed
        # experts' sum is want less the shared output (within bf16 rounding; their own launches
        # took ~1/4 of this test's interpreter time)
        routed = want - shared.float()
        assert (got - routed).norm() > 10 * (got - want).norm()


# Each gate (the fused gate's appended ids, the reference's cats) with bf16 and FP8 weights and S
# 1 and 2, pairwise: 4 cases, where the full product's 8 ran each pair twice (~8 s).
@pytest.mark.parametrize(
    "n_shared,top_k,fp8,gate",
    [
        (1, 3, False, "kernel"),
        (2, 5, True, "kernel"),
        (1, 3, True, "reference"),
        (2, 5, False, "reference"),
    ],
)
def test_shared_early_switch_keeps_the_bits(n_shared, top_k, fp8, gate, monkeypatch):
    """By default the fused MoE's moe_gemv gets early_shared = n_shared (the shared slots'
    gate/up before its PDL wait) and gives the bits of MOERAY_FUSED_SHARED_EARLY=0 (which passes
    0), at 1 and 2 tokens, with the fused gate's appended ids and with the reference gate's
    cats."""
    from moeray.kernels import moe as kernels_moe

    if gate == "kernel":
        monkeypatch.setattr(moe_module, "route", _kernel_gate)
    seen: list[int] = []
    real = kernels_moe.run_moe_gemv

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(kernels_moe, "run_moe_gemv", spy)
    _, fused, _ = _models(_cfg(n_shared, top_k, fp8), fp8)
    g = torch.Generator().manual_seed(4)
    for t in (1, 2):
        x = torch.randn(1, t, fused.config.hidden_size, generator=g).to(torch.bfloat16)
        for _, b in _moe_pairs(fused, fused)[:1]:
            with torch.no_grad():
                monkeypatch.setenv("MOERAY_FUSED_SHARED_EARLY", "0")
                want = b(x)
                monkeypatch.delenv("MOERAY_FUSED_SHARED_EARLY")
                got = b(x)
            assert torch.equal(got, want)
    assert seen == [0, n_shared] * 2


def test_more_tokens_than_the_fused_maximum_run_the_shared_mlp():
    """Past MAX_FUSED_TOKENS (a large decode batch, prefill) the shared MLP runs on its own and
    the layer's output is the unfused one's, bit for bit (the same kernels on the same weights)."""
    cfg = _cfg(2, 3)
    plain, fused, _ = _models(cfg)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, MAX_FUSED_TOKENS + 1, cfg.hidden_size, generator=g).to(torch.bfloat16)
    calls: list[str] = []
    for a, b in _moe_pairs(plain, fused):
        calls.clear()
        hook = b.shared_experts.register_forward_hook(lambda *_: calls.append("shared"))
        with torch.no_grad():
            want, got = a(x), b(x)
        hook.remove()
        assert calls == ["shared"]
        assert torch.equal(got, want)


@pytest.mark.parametrize("n_shared", [1, 2])
def test_stack_holds_the_weights_as_views(n_shared):
    cfg = _cfg(n_shared, 3, fp8=True)
    plain, fused, _ = _models(cfg, fp8=True)
    width = cfg.moe_intermediate_size
    for a, b in _moe_pairs(plain, fused):
        sf = b.fused_shared
        assert isinstance(sf, SharedFused) and sf.holds(b)
        E = b.experts.num_experts
        assert b.experts.gate_proj.data_ptr() == sf.gate_proj.data_ptr()
        assert b.shared_experts.up_proj.weight.data_ptr() == sf.up_proj[E].data_ptr()
        assert b.shared_experts.gate_up_proj is None
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(a.shared_experts, name)
            whole = dequantize_fp8_blocks(lin.weight, lin.weight_scale_inv, torch.float32)
            for j in range(n_shared):
                part = (
                    whole[:, j * width :][:, :width]
                    if name == "down_proj"
                    else whole[j * width :][:width]
                )
                stacked = getattr(sf, name)[E + j]
                scale = sf.get_buffer(f"{name}_scale_inv")[E + j]
                assert torch.equal(dequantize_fp8_blocks(stacked, scale, torch.float32), part)
    # merge_projections leaves the stacked shared gate + up as they are (no copy out of the
    # stacks), so a second fuse_shared_experts (a second engine on this model) keeps the stacks
    report = merge_projections(fused)
    stacks = [m.fused_shared.gate_proj.data_ptr() for _, m in _moe_pairs(plain, fused)]
    assert all(m.fused_shared.holds(m) for _, m in _moe_pairs(plain, fused))
    assert all("fused expert stacks" in str(v) for k, v in report.items() if "shared" in k)
    fuse_shared_experts(fused)
    assert [m.fused_shared.gate_proj.data_ptr() for _, m in _moe_pairs(plain, fused)] == stacks
    # a view replaced (a new tensor for a part): the stack no longer holds, a rerun fuses anew
    for _, m in _moe_pairs(plain, fused):
        m.shared_experts.up_proj.weight.data = m.shared_experts.up_proj.weight.data.clone()
    assert not any(m.fused_shared.holds(m) for _, m in _moe_pairs(plain, fused))
    fuse_shared_experts(fused)
    assert all(m.fused_shared.holds(m) for _, m in _moe_pairs(plain, fused))
    assert all(m.shared_experts.gate_up_proj is None for _, m in _moe_pairs(plain, fused))
    assert plain.state_dict().keys() == fused.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(v.float(), fused.state_dict()[k].float()), k


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("n_shared", [1, 2])
def test_save_load_and_load_state_dict_follow(n_shared, fp8, tmp_path):
    """save_model / load_model give the unfused state dict; loading new weights into the fused
    model updates its stack (views, and the shared down copy's post hook)."""
    from moeray.platform.checkpoint import load_model, save_model

    cfg = _cfg(n_shared, 3, fp8)
    plain, fused, _ = _models(cfg, fp8)
    save_model(fused, cfg, tmp_path)
    _, loaded = load_model(tmp_path, dtype=torch.bfloat16, keep_fp8=fp8)
    a, c = plain.state_dict(), loaded.state_dict()
    assert list(c) == list(a) and all(torch.equal(a[k].float(), c[k].float()) for k in a)
    other, _, _ = _models(cfg, fp8, seed=7)
    fused.load_state_dict(other.state_dict())
    # 2 tokens: 2 x (3 + S) <= 16 assignments, moe_gemv on both sides (the stack read as by the
    # aligned kernels, ~1/4 of their interpreter time; test_moe_layers_equal_unfused runs those)
    x = torch.randn(2, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    x = x.to(torch.bfloat16)
    for a_moe, b_moe in _moe_pairs(other, fused):
        with torch.no_grad():
            want = _unfused_fused_path(a_moe, x)[0].float()
            got = b_moe(x[None]).squeeze(0).float()
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < (0.05 if fp8 else 0.01), rel


@pytest.mark.parametrize("moe_gemv", ["0", "1"])
def test_decode_logits_and_greedy_tokens_equal_unfused(moe_gemv, monkeypatch):
    """Greedy tokens of 2 sequences over 4 decode steps, fused shared experts against the shared
    MLP; with MOERAY_FUSED_MOE_GEMV=1 (the default) the fused model's decode MoE (2 x (3 + 2) =
    10 assignments) runs moe_gemv and the prefill (14 + 14) the aligned kernels."""
    from moeray.platform.model.mla import DenseKVCache

    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV", moe_gemv)

    cfg = _cfg(2, 3)
    plain, fused, _ = _models(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    calls: list[str] = []
    for model in (plain, fused):
        for m in model.moe_layers():
            m.shared_experts.register_forward_hook(lambda mod, *_: calls.append(mod.tag))
            m.shared_experts.tag = "plain" if model is plain else "fused"
    tokens = {}
    for name, model in (("plain", plain), ("fused", fused)):
        cache = DenseKVCache(cfg.num_hidden_layers, 2, 12, cfg, dtype=torch.bfloat16)
        with torch.no_grad():
            out = [model(ids, cache=cache).logits[:, -1:]]
            for _ in range(4):
                out.append(model(out[-1].argmax(-1), cache=cache).logits)
        tokens[name] = torch.cat([o.argmax(-1) for o in out], 1)
    assert torch.equal(tokens["plain"], tokens["fused"])
    assert calls and set(calls) == {"plain"}  # the fused model never ran its shared MLP


def test_engine_greedy_unchanged_and_switch(monkeypatch):
    from moeray.platform.engine.engine import Engine, EngineConfig
    from moeray.platform.engine.sampler import SamplingParams

    cfg = _cfg(2, 3)
    model, _, _ = _models(cfg)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = [[1, 2, 3], [7, 9, 11, 13, 15, 4]]
    tokens = {}
    calls: list[int] = []
    for m in model.moe_layers():
        m.shared_experts.register_forward_hook(lambda *_: calls.append(1))
    for on in (True, False):
        calls.clear()
        monkeypatch.setenv("MOERAY_FUSED_SHARED", "1" if on else "0")
        eng = Engine(model, EngineConfig(page_size=16, num_pages=8, max_model_len=64))
        fused = [k for k, why in eng.fused_shared.items() if why is None]
        assert len(fused) == (1 + cfg.num_nextn_predict_layers if on else 0), eng.fused_shared
        assert all(m.fused_shared is None for m in model.moe_layers()) != on
        tokens[on] = [o.output_token_ids for o in eng.generate(prompts, params)]
        assert bool(calls) != on  # the shared MLP runs only unfused
        del eng
    assert all(len(t) == 5 for t in tokens[True])
    assert tokens[True] == tokens[False]


def test_a_second_engine_keeps_the_stacks():
    """Engines built one after another on one model (the bench's A/B rows, a restarted replica)
    keep the first one's expert stacks: no second copy of every routed expert while a new
    engine fuses (at DeepSeek-V3's widths 11 GB a MoE layer, which ran an H100 out of memory)."""
    from moeray.platform.engine.engine import Engine, EngineConfig

    _, model, _ = _models(_cfg(2, 3))
    stacks = []
    for _ in range(2):
        eng = Engine(model, EngineConfig(page_size=16, num_pages=8, max_model_len=64))
        assert all(why is None for why in eng.fused_shared.values()), eng.fused_shared
        stacks.append([(id(m.fused_shared), m.fused_shared.down_proj.data_ptr())
                       for m in model.moe_layers()])  # fmt: skip
        del eng
    assert stacks[0] == stacks[1] and len(stacks[0]) == 2


def test_three_launches_fewer_per_moe_layer(monkeypatch, load_script):
    """scripts/decode_ops.py's count of one batch-1 decode forward (the GPU's fast-path choices,
    Triton interpreted): the shared MLP's gemv, SwiGLU and gemv are gone from each MoE layer, and
    nothing came in their place (the fused gate appends the shared ids in its launch)."""
    decode_ops = load_script("decode_ops")
    # Moonlight's structure with 8 routed experts, not 64: the same ops by line and the same
    # launches by kernel, on and off (counted at both when this was set), in ~40% less of the
    # interpreter's time (the 4-token prefill's aligned MoE and router, which count nothing)
    moonlight = decode_ops.moonlight_16b_a3b
    monkeypatch.setattr(
        decode_ops, "moonlight_16b_a3b", lambda: moonlight().replace(n_routed_experts=8)
    )
    per_forward = {}
    for on in (True, False):
        monkeypatch.setenv("MOERAY_FUSED_SHARED", "1" if on else "0")
        # 1 dense layer, 1 MoE layer: every MoE layer runs the same forward (a second one took
        # ~1/3 more of the interpreter's time, mostly the 4-token prefill's aligned MoE)
        ops, launches = decode_ops.count(2)
        per_forward[on] = ops, launches
    (ops_on, k_on), (ops_off, k_off) = per_forward[True], per_forward[False]
    total_on = sum(ops_on.values()) + sum(k_on.values())
    total_off = sum(ops_off.values()) + sum(k_off.values())
    assert total_off - total_on == 3, (total_off, total_on)
    assert k_off["_swiglu_kernel"] - k_on["_swiglu_kernel"] == 1
    assert k_off["_gemv_kernel"] - k_on["_gemv_kernel"] == 2
    assert k_on["_moe_gate_kernel"] == k_off["_moe_gate_kernel"] == 1


def test_training_keeps_the_shared_mlp():
    cfg = _cfg(2, 3)
    _, fused, _ = _models(cfg)
    moe = fused.moe_layers()[0]
    calls = []
    moe.shared_experts.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(1, 5, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    moe(x).float().sum().backward()
    assert calls == [1]
    assert moe.shared_experts.down_proj.weight.grad is not None


def test_refusals_name_why(monkeypatch):
    plain = Transformer(_cfg(2, 3))  # fp32: the fused MoE takes bf16, fp16 or FP8
    report = fuse_shared_experts(plain)
    assert all("torch.float32" in why for why in report.values()), report
    _, fused, _ = _models(_cfg(1, 3, fp8=True), fp8=True)  # whole blocks: fused; I 24: refused
    assert all(m.fused_shared is not None for m in fused.moe_layers())
    _, _, report = _models(_cfg(1, 3).replace(hidden_size=128), fp8=True)
    assert all("whole 128x128 blocks" in why for why in report.values()), report
    monkeypatch.setenv("MOERAY_FUSED_SHARED", "0")
    report = fuse_shared_experts(fused)  # unfuses
    assert all(why == "MOERAY_FUSED_SHARED=0" for why in report.values()), report
    assert all(m.fused_shared is None for m in fused.moe_layers())
    with pytest.raises(ValueError, match="cannot fuse the shared experts"):
        SharedFused(plain.moe_layers()[0])
