"""kernels/l2_prefetch.py and model/prefetch.py under the Triton interpreter: the region table
covers each tensor's bytes exactly (CHUNK-byte regions, word offsets from the base); the TOUCH
mode reads every word of every region (its per-region sums equal PyTorch's); bad input names the
value; the plan picks o_proj, then the shared experts' gate/up, then down, within the budget, from
the fused stacks where the shared experts are fused (FP8 scales after each weight); the engine's
hooks launch one prefetch per decoder layer at decode-sized forwards and none at a long prefill,
and leave the greedy tokens unchanged."""

import pytest
import torch

from moeray.kernels import l2_prefetch as l2
from moeray.kernels.l2_prefetch import (
    CHUNK,
    l2_prefetch,
    prefetchable,
    region_checksum_ref,
    region_table,
    regions_bytes,
)
from moeray.platform.config import tiny
from moeray.platform.engine.bench.model import quantize_fp8_
from moeray.platform.model import prefetch
from moeray.platform.model.prefetch import (
    PrefetchSettings,
    install_l2_prefetch,
    layer_prefetch_tensors,
)
from moeray.platform.model.shared_fuse import fuse_shared_experts
from moeray.platform.model.transformer import Transformer


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randint(-(2**15), 2**15, (3, 40), generator=g, dtype=torch.int16).view(
            torch.bfloat16
        ),  # 240 bytes
        torch.randn(5, 7000, generator=g),  # 140,000 bytes: 3 regions, the last ragged
        torch.randn(48, 80, generator=g).to(torch.float8_e4m3fn),  # 3,840 bytes
    ]


def test_region_table_covers_each_tensor_exactly():
    ts = _tensors()
    table, base = region_table(ts, torch.device("cpu"))
    assert base.dtype == torch.int32 and base.data_ptr() == ts[0].data_ptr()
    sizes = [t.numel() * t.element_size() for t in ts]
    assert regions_bytes(table) == sum(sizes)
    assert table.shape[0] == sum(-(-n // CHUNK) for n in sizes) == 5
    assert bool((table[:, 1] <= CHUNK).all())
    # the second tensor's regions start at its address, CHUNK apart
    rows = table[1:4].tolist()
    start = (ts[1].data_ptr() - ts[0].data_ptr()) // 4
    assert [r[0] for r in rows] == [start, start + CHUNK // 4, start + 2 * CHUNK // 4]
    assert [r[1] for r in rows] == [CHUNK, CHUNK, 140_000 - 2 * CHUNK]


def test_touch_reads_every_word_of_every_region():
    ts = _tensors()
    table, base = region_table(ts, torch.device("cpu"))
    sums = l2_prefetch(table, base, "TOUCH")
    assert sums is not None
    assert torch.equal(sums, region_checksum_ref(ts))
    # a changed word changes its region's sum: the check would catch a skipped word
    ts[1].view(torch.int32)[-1, -1] += 1
    again = l2_prefetch(table, base, "TOUCH")
    assert again is not None and not torch.equal(again, sums)
    assert torch.equal(again, region_checksum_ref(ts))


def test_bad_input_names_the_value():
    ts = _tensors()
    with pytest.raises(ValueError, match="must be contiguous"):
        region_table([ts[1].t()], torch.device("cpu"))
    with pytest.raises(ValueError, match="multiples of 16"):
        region_table([torch.zeros(3, dtype=torch.float32)], torch.device("cpu"))
    table, base = region_table(ts, torch.device("cpu"))
    with pytest.raises(ValueError, match="'FAST'"):
        l2_prefetch(table, base, "FAST")
    with pytest.raises(ValueError, match="LINES needs a compiled CUDA kernel"):
        l2_prefetch(table, base, "LINES")
    with pytest.raises(ValueError, match=r"int64 \[R, 2\]"):
        l2_prefetch(table[:, 0], base, "TOUCH")
    with pytest.raises(ValueError, match="budget"):
        PrefetchSettings(budget_mb=0)
    with pytest.raises(ValueError, match="'EVERY'"):
        PrefetchSettings(mode="EVERY")


def _model(fp8: bool, n_shared: int = 2):
    cfg = tiny().replace(
        hidden_size=128,
        moe_intermediate_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        vocab_size=300,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=3,
        n_shared_experts=n_shared,
        eos_token_id=None,
    )
    model = Transformer(cfg)
    model.reset_parameters(seed=3)
    with torch.no_grad():  # wide logit margins: greedy choices robust to summation order
        model.lm_head.weight.mul_(30.0)
    model = model.to(torch.bfloat16).eval()
    if fp8:
        quantize_fp8_(model)
    return model


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_plan_order_and_budget(fp8, fused):
    model = _model(fp8)
    if fused:
        fuse_shared_experts(model)
    layer = model.model.layers[1]  # a MoE layer
    o = layer.self_attn.o_proj
    moe = layer.mlp
    everything = layer_prefetch_tensors(layer, 2**40)
    o_part = [o.weight, o.weight_scale_inv] if fp8 else [o.weight]
    if fused:
        f, e = moe.fused_shared, moe.fused_shared.routed

        def rows(n):
            return [f.get_buffer(n)[e:]] + ([f.get_buffer(f"{n}_scale_inv")[e:]] if fp8 else [])

        want = o_part + rows("gate_proj") + rows("up_proj") + rows("down_proj")
    else:
        s = moe.shared_experts
        gate_up = [s.gate_proj.weight, s.up_proj.weight]
        if fp8:
            gate_up = [s.gate_proj.weight, s.gate_proj.weight_scale_inv]
            gate_up += [s.up_proj.weight, s.up_proj.weight_scale_inv]
        down = [s.down_proj.weight] + ([s.down_proj.weight_scale_inv] if fp8 else [])
        want = o_part + gate_up + down
    want = [t for t in want if prefetchable(t)]  # this model's FP8 scales are 4-8 bytes
    assert len(want) >= 4
    assert [(t.data_ptr(), t.shape) for t in everything] == [(t.data_ptr(), t.shape) for t in want]
    # a budget that ends inside the shared gate weight keeps o_proj (and its scale) only
    o_part = [t for t in o_part if prefetchable(t)]
    cut = layer_prefetch_tensors(layer, _nbytes(o_part) + 16)
    assert [t.data_ptr() for t in cut] == [t.data_ptr() for t in o_part]
    # the dense layer: o_proj only
    d = model.model.layers[0]
    dense = layer_prefetch_tensors(d, 2**40)
    o0 = d.self_attn.o_proj
    want0 = [
        t for t in ([o0.weight, o0.weight_scale_inv] if fp8 else [o0.weight]) if prefetchable(t)
    ]
    assert [t.data_ptr() for t in dense] == [t.data_ptr() for t in want0]


def test_engine_hooks_launch_per_layer_at_decode_only(launch_spy, monkeypatch):
    from moeray.platform.engine.engine import Engine, EngineConfig
    from moeray.platform.engine.sampler import SamplingParams

    model = _model(False)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [[1, 2, 3], [7, 9, 11, 13, 15, 4]]
    cfg = EngineConfig(page_size=16, num_pages=12, max_model_len=160)
    tokens = {}
    rows: list[int] = []  # tokens of each forward through the first layer
    model.model.layers[0].register_forward_pre_hook(
        lambda _m, a: rows.append(a[0].numel() // a[0].shape[-1])
    )
    for on in (False, True):
        monkeypatch.setenv("MOERAY_FUSED_L2_PREFETCH", "1" if on else "0")
        grids = launch_spy(l2, "_l2_prefetch_kernel")
        eng = Engine(model, cfg)
        layers = 3 + model.config.num_nextn_predict_layers  # the MTP module's layer too
        assert len(eng.l2_prefetch) == (layers if on else 0), eng.l2_prefetch
        rows.clear()
        tokens[on] = [o.output_token_ids for o in eng.generate(prompts, params)]
        decode_sized = sum(1 for n in rows if n <= prefetch.MAX_TOKENS)
        assert decode_sized >= 3  # the prefill and at least the decode steps
        assert len(grids) == (3 * decode_sized if on else 0)
        grids.clear()
        rows.clear()
        long_prompt = list(range(1, prefetch.MAX_TOKENS + 10))
        eng.generate([long_prompt], SamplingParams(temperature=0, max_tokens=1))
        assert rows and max(rows) > prefetch.MAX_TOKENS
        assert len(grids) == 3 * sum(1 for n in rows if n <= prefetch.MAX_TOKENS)
        del eng
    assert tokens[True] == tokens[False]
    install_l2_prefetch(model, None)  # the hooks removed again
    assert not any(prefetch.HOOK_ATTR in m.__dict__ for m in model.modules())
