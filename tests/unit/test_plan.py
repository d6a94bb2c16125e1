"""`moeray plan` against DeepSeek-V3's published figures (docs/deepseek-v3.md), within 2%, through
the command a user runs; and the planner's own arithmetic on shapes where it is checked by hand."""

from __future__ import annotations

import json

import pytest

from moeray.platform import plan
from moeray.platform.config import deepseek_v3, kimi_k2, moonlight_16b_a3b, tiny
from moeray.platform.parallel.simulate import Costs
from moeray.platform.plan.comm import decode_tpot_bound_s, training_all_to_all
from moeray.platform.plan.gpus import GPUS, gpu
from moeray.platform.plan.memory import (
    DEEPSEEK_V3,
    MOERAY_FP32,
    TrainLayout,
    stage_blocks,
    train_memory,
    worst_rank,
)
from moeray.platform.plan.params import Params
from moeray.platform.plan.search import score, search
from moeray.platform.plan.serving import (
    Workload,
    kv_capacity_tokens,
    plan_serving,
    weight_bytes_per_gpu,
)


def within(value: float, published: float, rel: float = 0.02) -> bool:
    return abs(value - published) <= rel * published


@pytest.fixture(scope="module")
def v3_report() -> dict:
    out = _run(["--model", "deepseek_v3", "--gpu", "h800", "--json"])
    return json.loads(out)


def _run(argv: list[str]) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert plan.main(argv) == 0
    return buf.getvalue()


def test_v3_defaults_are_the_papers_setting(v3_report):
    r = v3_report
    for key in (
        "params_total",
        "params_activated",
        "kv_bytes_per_token",
        "decode_tpot_bound_ms",
        "memory_per_gpu_gb",
        "fits",
    ):
        assert key in r
    lay = r["layout"]
    assert (lay["pp"], lay["ep"], lay["dp"], lay["schedule"]) == (16, 64, 2, "dualpipe")
    assert r["gpus"] == 2048 and r["gpu"]["name"] == "h800"
    assert within(r["params_total"], 671e9) and within(r["params_activated"], 37e9)
    assert r["params"]["embedding"] == r["params"]["head"] == 129280 * 7168
    # the HF checkpoint's 685B adds the MTP module and its own copy of embedding and head
    p = r["params"]
    assert within(p["total"] + p["mtp"] + p["embedding"] + p["head"], 685e9)
    assert r["kv_bytes_per_token"] == 61 * (512 + 64) * 2 == 70272
    # PP16 x EP64 x ZeRO-1 DP on 2048 H800 fits in 80 GB, and not by a mile
    assert r["fits"] and 60 < r["memory_per_gpu_gb"] <= 80
    # ISCA'25: 14.76 ms per output token at 400 Gb/s IB; the planner counts the 58 MoE layers plus
    # the MTP module's and V3's exact width 7168, where the paper takes 61 layers and 7K = 7000
    assert within(r["decode_tpot_bound_ms"], 14.76)
    assert r["decode_all_to_all_layers"] == 59
    # the report's serving units: prefill EP32 (4 nodes); decode EP144 (18 nodes, production)
    assert r["serving"]["prefill_ep"] == 32 and r["serving"]["decode_ep"] == 144
    # at EP144 the all-to-all, not reading weights and KV from HBM, bounds the step
    assert r["serving"]["decode_memory_ms"] < r["serving"]["decode_all_to_all_ms"]


def test_isca_tpot_derivation_reproduced():
    """(1 B dispatch + 2 B combine) x 32 tokens x 9 experts x 7000 / 50 GB/s = 120.96 us per EP
    step; x 2 micro-batches x 61 layers = 14.76 ms; 900 GB/s links give 0.82 ms."""
    h800 = gpu("h800")
    step = decode_tpot_bound_s(h800, hidden=7000, experts_per_token=9, layers=1, microbatches=1)
    assert step == pytest.approx(120.96e-6, rel=1e-9)
    full = decode_tpot_bound_s(h800, hidden=7000, experts_per_token=9, layers=61)
    assert full * 1e3 == pytest.approx(14.76, abs=0.005)
    nvl = GPUS["h800"].__class__("x", 80, 3.35, 989, 1979, 1800, 900)
    fast = decode_tpot_bound_s(nvl, hidden=7000, experts_per_token=9, layers=61)
    assert fast * 1e3 == pytest.approx(0.82, abs=0.005)


def test_bubbles_follow_the_formulas(v3_report):
    b = v3_report["bubbles"]
    c = Costs(1.0, 2.0, 1.0)
    assert b["1f1b"]["formula_bubble"] == 15 * (c.f + c.b)
    assert b["zb1p"]["formula_bubble"] == 15 * (c.f + c.b - 2 * c.w)
    assert b["dualpipe"]["formula_bubble"] == 7 * (c.f_and_b + c.b - 3 * c.w)
    # activations per rank: PP for 1F1B/ZB1P, PP+1 for DualPipe
    assert [b[s]["peak_microbatches"] for s in ("1f1b", "zb1p", "dualpipe")] == [16, 16, 17]
    assert b["dualpipe"]["bubble_fraction"] < b["zb1p"]["bubble_fraction"]
    assert b["zb1p"]["bubble_fraction"] < b["1f1b"]["bubble_fraction"]


def test_param_parts_add_up_on_every_preset():
    for cfg in (deepseek_v3(), kimi_k2(), moonlight_16b_a3b(), tiny()):
        p = Params.of(cfg)
        assert p.total == cfg.num_parameters()
        assert p.activated == cfg.num_parameters(activated=True)
        assert p.total + p.mtp == cfg.num_parameters(include_mtp=True)
    assert within(Params.of(kimi_k2()).total, 1.04e12) and within(
        Params.of(kimi_k2()).activated, 32.9e9
    )


def test_stage_split_puts_the_remainder_in_the_middle():
    blocks = stage_blocks(61, 16)
    assert [len(b) for b in blocks] == [3] + [4] * 13 + [3, 3]
    assert blocks[0].start == 0 and blocks[-1].stop == 61
    with pytest.raises(ValueError, match="pp=62 exceeds"):
        stage_blocks(61, 62)


def test_memory_by_hand_on_tiny():
    """PP1 x EP2: parameters of the whole model, routed experts halved; fp32 recipe 16 B each."""
    cfg, p = tiny(), Params.of(tiny())
    layout = TrainLayout(1, 2, 1, "1f1b", seq_len=64, global_batch=8)
    (m,) = train_memory(cfg, layout, MOERAY_FP32, reserve_gb=0)
    held = p.total + p.mtp - p.routed_total // 2
    assert m.params == held
    assert m.weights + m.grads + m.optimizer == pytest.approx(16 * held)
    assert m.live_microbatches == 1 and m.activations > 0


def test_memory_grows_with_microbatch_and_shrinks_with_ep():
    cfg, h800 = deepseek_v3(), gpu("h800")
    base = worst_rank(train_memory(cfg, TrainLayout(16, 64, 2))).total
    assert worst_rank(train_memory(cfg, TrainLayout(16, 64, 2, microbatch_seqs=2))).total > base
    assert worst_rank(train_memory(cfg, TrainLayout(16, 32, 4))).total > base
    # too few GPUs for V3: PP16 x EP8 does not fit an H800
    assert not score(cfg, h800, TrainLayout(16, 8, 1, global_batch=1536)).fits
    with pytest.raises(ValueError, match="ep=3 must divide"):
        train_memory(cfg, TrainLayout(16, 3, 1, global_batch=1536 * 3))


def test_all_to_all_bytes_under_the_node_limit():
    cfg = deepseek_v3()
    a = training_all_to_all(cfg, 64, 8)  # 8 nodes = 8 groups: node limit M = 4
    assert a.ib_copies == 4 and a.nvlink_copies == 8
    assert a.ib_bytes == 4 * (7168 + 2 * 7168)
    assert training_all_to_all(cfg, 8, 8).ib_bytes == 0  # inside one node


def test_kv_capacity_and_weights_per_decode_gpu():
    cfg, h800 = deepseek_v3(), gpu("h800")
    w = weight_bytes_per_gpu(cfg, 144)
    # 2 expert copies x 59 MoE layers in FP8 plus the dense part: about 24.5 GB
    assert 20e9 < w < 30e9
    cap = kv_capacity_tokens(cfg, h800, 144)
    assert cap == int((80e9 - w - 3e9) // 70272)
    assert kv_capacity_tokens(cfg, h800, 8) == 0  # EP8: the experts alone overflow HBM


def test_search_ranks_fitting_layouts(capsys):
    out = _run(["--search", "--gpus", "2048", "--gpu", "h800", "--json"])
    layouts = json.loads(out)["layouts"]
    assert layouts and all(x["fits"] and x["memory_per_gpu_gb"] <= 80 for x in layouts)
    assert all(x["pp"] * x["ep"] * x["dp"] == 2048 for x in layouts)
    eff = [round(x["efficiency"], 4) for x in layouts]
    assert eff == sorted(eff, reverse=True)
    assert (layouts[0]["pp"], layouts[0]["ep"], layouts[0]["schedule"]) == (16, 64, "dualpipe")
    # 32 H800 cannot hold V3's 671B parameters with their gradients (5 B each at least)
    ranked = search(deepseek_v3(), gpu("h800"), 32, TrainLayout(1, 1, 1, global_batch=1536))
    assert ranked and not any(s.fits for s in ranked)
    assert any(s.fits for s in search(deepseek_v3(), gpu("h800"), 256, TrainLayout(1, 1, 1)))


def test_table_and_errors(capsys):
    table = _run(["--model", "moonlight_16b_a3b", "--gpu", "h200", "--gpus", "64"])
    assert "fits" in table and "KV cache 31,104 bytes per token" in table
    assert "all-to-all none (EP1)" in table  # 16B fits one H200: no expert parallelism
    assert plan.main(["--model", "nope"]) == 2
    assert "expected a preset" in capsys.readouterr().err
    assert plan.main(["--gpus", "1000", "--pp", "16", "--ep", "64"]) == 2
    assert "multiple of pp*ep = 1024" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plan.main(["--gpu", "a100"])


def test_recipe_matters():
    cfg = deepseek_v3()
    paper = worst_rank(train_memory(cfg, TrainLayout(16, 64, 2), DEEPSEEK_V3)).total
    fp32 = worst_rank(train_memory(cfg, TrainLayout(16, 64, 2), MOERAY_FP32)).total
    assert fp32 > 1.5 * paper


def test_pd_split_uses_the_gpus_and_follows_the_workload():
    h800 = gpu("h800")
    s = plan_serving(deepseek_v3(), h800, gpus=1024)
    assert s.prefill_gpus + s.decode_gpus <= 1024 and s.prefill_groups >= 1 <= s.decode_groups
    assert 1024 - (s.prefill_gpus + s.decode_gpus) < max(s.prefill_ep, s.decode_ep)
    long_in = plan_serving(deepseek_v3(), h800, gpus=1024, workload=Workload(8000, 500))
    long_out = plan_serving(deepseek_v3(), h800, gpus=1024, workload=Workload(500, 8000))
    assert long_in.prefill_gpus > s.prefill_gpus > long_out.prefill_gpus
    # the decode rate is the batch over the step bound
    assert s.decode_tokens_per_s_per_gpu == pytest.approx(32 / (s.decode_tpot_bound_ms / 1e3))
    with pytest.raises(ValueError, match="fewer than one prefill group"):
        plan_serving(deepseek_v3(), h800, gpus=100)
    out = json.loads(_run(["--serve-gpus", "1024", "--json"]))
    assert out["serving"]["prefill_gpus"] == s.prefill_gpus


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe"])
def test_long_steps_extrapolate_to_the_full_simulation(name):
    from moeray.platform.parallel.schedule import build
    from moeray.platform.parallel.simulate import peak_activations, simulate
    from moeray.platform.plan.memory import schedule_stats

    costs = Costs(1.5, 3.0, 1.0, 3.5)
    s = build(name, 8, 202)  # past 8 x PP: schedule_stats extrapolates
    t = simulate(s, costs)
    frac, live = schedule_stats(name, 8, 202, costs)
    assert frac == pytest.approx(t.bubble() / t.makespan, rel=1e-9)
    assert live == tuple(peak_activations(s, r) for r in range(8))
    with pytest.raises(ValueError):
        schedule_stats("dualpipe", 8, 203, costs)  # odd: invalid at full length too
