"""The folded router logits + gate (moeray.kernels.router_gate) under the interpreter: the same
Routing as `router_logits` then `moe_gate` (two launches), bit for bit, at decode row counts and
the gate's group layouts, the counter back at zero after every call; its dispatch test and bad
input; the model's Gate choosing it only with MOERAY_FUSED_ROUTE_FOLD=1; the compiled kernel on
the GPU (marker gpu)."""

import pytest
import torch

from moeray.kernels import gate as gate_mod
from moeray.kernels import router_gate as fold_mod
from moeray.kernels import router_logits as logits_mod
from moeray.kernels.gate import moe_gate
from moeray.kernels.router_gate import FOLD_MAX_TOKENS, router_gate, router_gate_applies
from moeray.kernels.router_logits import router_logits
from moeray.platform.config import tiny
from moeray.platform.model.moe import MoE

# (T, D, E, n_group, topk_group, top_k, shared, bias): Moonlight's one group of 64 with its 2
# shared experts, V3's 8 groups of 32 (two-row router programs past 128 experts), tiny()'s, and a
# ragged width past one 2,048-feature step.
CASES = [
    (1, 256, 64, 1, 1, 6, 2, True),
    (3, 200, 256, 8, 4, 8, 1, True),
    (FOLD_MAX_TOKENS, 64, 16, 4, 2, 4, 0, False),
    (5, 2100, 12, 3, 2, 5, 0, True),
]


def _inputs(T, D, E, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).bfloat16()
    w = (torch.randn(E, D, generator=g) * D**-0.5).bfloat16()
    b = torch.randn(E, generator=g) * 0.3 if bias else None
    return x, w, b


@pytest.mark.parametrize("case", CASES)
def test_router_gate_equals_logits_then_gate(case):
    T, D, E, n_group, topk_group, top_k, shared, bias = case
    kw = dict(
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=2.5,
        shared_experts=shared,
    )
    counter = torch.zeros(1, dtype=torch.int32)
    for seed in range(2):  # a second call needs the counter the first left at zero
        x, w, b = _inputs(T, D, E, bias, seed)
        got = router_gate(x, w, b, counter, **kw)
        ref = moe_gate(router_logits(x, w), b, **kw)
        assert torch.equal(got.expert_ids_TK, ref.expert_ids_TK)
        assert torch.equal(got.weights_TK, ref.weights_TK)
        assert torch.equal(got.counts_E, ref.counts_E) and int(got.counts_E.sum()) == T * top_k
        assert torch.equal(got.scores_TE, ref.scores_TE)
        if shared:
            assert torch.equal(got.fused_ids_TJ, ref.fused_ids_TJ)
            assert torch.equal(got.fused_weights_TJ, ref.fused_weights_TJ)
        else:
            assert got.fused_ids_TJ is None and got.fused_weights_TJ is None
        assert int(counter.item()) == 0


def test_router_gate_applies_and_bad_input(monkeypatch):
    x, w, b = _inputs(2, 64, 16, True, 0)
    monkeypatch.delenv("MOERAY_FUSED_ROUTE_FOLD", raising=False)
    assert not router_gate_applies(x, w, b)  # opt-in
    monkeypatch.setenv("MOERAY_FUSED_ROUTE_FOLD", "1")
    assert router_gate_applies(x, w, b) and router_gate_applies(x, w, None)
    assert not router_gate_applies(torch.zeros(FOLD_MAX_TOKENS + 1, 64).bfloat16(), w, b)
    assert not router_gate_applies(x.float(), w.float(), b)  # router_logits' dtypes only
    assert not router_gate_applies(x, w, b[:8])
    kw = dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=1.0)
    counter = torch.zeros(1, dtype=torch.int32)
    too_many = torch.zeros(FOLD_MAX_TOKENS + 1, 64).bfloat16()
    with pytest.raises(ValueError, match=f"x has 9 rows; router_gate takes 1..{FOLD_MAX_TOKENS}"):
        router_gate(too_many, w, b, counter, **kw)
    with pytest.raises(ValueError, match=r"counter has dtype torch\.int64"):
        router_gate(x, w, b, counter.long(), **kw)
    with pytest.raises(ValueError, match=r"bias: expected a contiguous \[16\] float tensor"):
        router_gate(x, w, b[:8], counter, **kw)
    with pytest.raises(ValueError, match="n_group=3 must divide"):
        router_gate(x, w, b, counter, **{**kw, "n_group": 3})


@pytest.mark.parametrize("switch", [None, "1"])
def test_moe_routes_through_the_fold_only_when_switched_on(switch, monkeypatch, launch_spy):
    if switch is None:
        monkeypatch.delenv("MOERAY_FUSED_ROUTE_FOLD", raising=False)
    else:
        monkeypatch.setenv("MOERAY_FUSED_ROUTE_FOLD", switch)
    cfg = tiny()
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.1)
    moe.gate.e_score_correction_bias.normal_(0.0, 0.3)
    moe = moe.bfloat16()
    assert set(moe.gate.state_dict()) == {"weight", "e_score_correction_bias"}  # unchanged keys
    x = torch.randn(3, cfg.hidden_size).bfloat16()
    folds = launch_spy(fold_mod, "_router_gate_kernel")
    logits = launch_spy(logits_mod, "_router_logits_kernel")
    gates = launch_spy(gate_mod, "_moe_gate_kernel")
    with torch.no_grad():
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        got = moe.route(x, shared_experts=1)
        launched = (len(folds), len(logits), len(gates))
        assert launched == ((1, 0, 0) if switch == "1" else (0, 1, 1)), launched
        c = cfg
        ref = moe_gate(
            router_logits(x, moe.gate.weight),
            moe.gate.e_score_correction_bias,
            top_k=c.num_experts_per_tok,
            n_group=c.n_group,
            topk_group=c.topk_group,
            routed_scaling_factor=c.routed_scaling_factor,
            shared_experts=1,
        )
    assert torch.equal(got.expert_ids_TK, ref.expert_ids_TK)
    assert torch.equal(got.weights_TK, ref.weights_TK)
    assert torch.equal(got.fused_ids_TJ, ref.fused_ids_TJ)


def test_gate_counter_is_zero_after_to_empty():
    with torch.device("meta"):
        moe = MoE(tiny())
    for _ in range(3):
        torch.full((4,), 7, dtype=torch.int32)  # nonzero bytes for empty() to hand back
        built = moe.to_empty(device="cpu")
        assert built.gate.fold_counter.shape == (1,) and not built.gate.fold_counter.any()


@pytest.mark.gpu
def test_router_gate_compiled_on_gpu(compiled_check):
    compiled_check(
        """
import torch
from moeray.kernels.gate import moe_gate
from moeray.kernels.router_gate import router_gate
from moeray.kernels.router_logits import router_logits
bad = 0
counter = torch.zeros(1, dtype=torch.int32, device="cuda")
# Moonlight (64 experts, 1 group, 2 shared), V3 (256 in 8 groups of 32, 1 shared)
for E, D, G, TG, K, S in ((64, 2048, 1, 1, 6, 2), (256, 7168, 8, 4, 8, 1)):
    for T in (1, 4, 8):
        kw = dict(top_k=K, n_group=G, topk_group=TG, routed_scaling_factor=2.5, shared_experts=S)
        x = torch.randn(T, D, device="cuda").bfloat16()
        w = (torch.randn(E, D, device="cuda") * D**-0.5).bfloat16()
        b = torch.randn(E, device="cuda") * 0.3
        for _ in range(3):
            got = router_gate(x, w, b, counter, **kw)
            ref = moe_gate(router_logits(x, w), b, **kw)
        same = all(torch.equal(getattr(got, f), getattr(ref, f)) for f in
                   ("expert_ids_TK", "counts_E", "scores_TE", "fused_ids_TJ"))
        wdiff = float((got.weights_TK - ref.weights_TK).abs().max())
        ok = same and wdiff <= 1e-6 and int(counter.item()) == 0
        bad += not ok
        print(E, D, T, "ok" if ok else "MISMATCH", "ids/counts/scores equal:", same,
              "weights max diff", wdiff, "weights bit-equal:",
              torch.equal(got.weights_TK, ref.weights_TK))
g = torch.cuda.CUDAGraph()
x = torch.randn(1, 2048, device="cuda").bfloat16()
w = (torch.randn(64, 2048, device="cuda") * 2048**-0.5).bfloat16()
kw = dict(top_k=6, n_group=1, topk_group=1, routed_scaling_factor=2.5)
router_gate(x, w, None, counter, **kw)
with torch.cuda.graph(g):
    out = router_gate(x, w, None, counter, **kw)
for i in range(5):
    x.copy_(torch.randn_like(x))
    g.replay()
    ref = moe_gate(router_logits(x, w), None, **kw)
    ok = torch.equal(out.expert_ids_TK, ref.expert_ids_TK) and int(counter.item()) == 0
    bad += not ok
    print("graph replay", i, "ok" if ok else "MISMATCH")
print("RESULT PASS" if bad == 0 else f"RESULT FAIL {bad}")
""",
        "router-gate-gpu.log",
    )
