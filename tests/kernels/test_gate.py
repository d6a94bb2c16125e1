"""The fused MoE gate (moeray.kernels.gate.moe_gate) against its PyTorch reference moe_gate_ref,
under the interpreter; the compiled kernel, route()'s dispatch and CUDA-graph capture on the GPU
(marker gpu).

Logits are continuous random numbers, so no two scores of a row tie and the top-k order is unique
(torch.topk's order among ties is unspecified; the kernel's is lowest index first).
"""

import pytest
import torch

from moeray.kernels.common import ROUTE_BATCH_MAX_TOKENS
from moeray.kernels.gate import (
    FUSED_MAX_TOKENS,
    MAX_EXPERTS,
    gate_block_t,
    moe_gate,
    moe_gate_applies,
    moe_gate_ref,
)
from moeray.platform.routing.gate import route

# (E, n_group, topk_group, top_k): tiny(), small(), DeepSeek-V3, groups of 4 that are not a power of
# 2 in number, one group, one-expert groups (group score = top-1), and one 256-wide group.
COMBOS = [
    (16, 4, 2, 4),
    (64, 8, 4, 8),
    (256, 8, 4, 8),
    (12, 3, 2, 5),
    (20, 1, 1, 6),
    (6, 6, 3, 2),
    (256, 1, 1, 8),
]
# Under the interpreter the sigmoid uses numpy's exp, torch's CPU sigmoid its own: they differ by
# at most 1 ulp of values in (0, 1), 1.2e-7 (measured on 1e6 normal logits: 17% differ).
SCORE_ATOL = 2.5e-7


def _case(t, e, seed, with_bias, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(t, e, generator=g) * 2.0).to(dtype)
    # Biases of the size training reaches (gamma 1e-3 for a few hundred steps) change the choice.
    bias = torch.randn(e, generator=g) * 0.3 if with_bias else None
    return logits, bias


def _check(out, ref, t, k, e):
    assert out.expert_ids_TK.shape == (t, k) and out.expert_ids_TK.dtype == torch.int64
    assert out.weights_TK.shape == (t, k) and out.weights_TK.dtype == torch.float32
    assert out.counts_E.shape == (e,) and out.counts_E.dtype == torch.int64
    assert out.scores_TE.shape == (t, e) and out.scores_TE.dtype == torch.float32
    assert torch.equal(
        out.expert_ids_TK.sort(-1).values, ref.expert_ids_TK.sort(-1).values
    )  # as sets
    assert torch.equal(out.expert_ids_TK, ref.expert_ids_TK)  # and in descending biased score
    torch.testing.assert_close(out.weights_TK, ref.weights_TK, atol=1e-6, rtol=0)
    assert torch.equal(out.counts_E, ref.counts_E)
    assert int(out.counts_E.sum()) == t * k
    torch.testing.assert_close(out.scores_TE, ref.scores_TE, atol=SCORE_ATOL, rtol=0)


# Rows 1 (one program of 1), 5 (one program of 8, 3 rows masked) and 33 (33 programs adding their
# counts atomically); bias and normalization on and off. Pairwise, not the full product (84 cases,
# ~44 s of the interpreter): each combo meets every row count and every bias/norm setting, and each
# row count every setting (28 cases). The kernel's branches are constexpr flags of separate stages
# (bias before the group and top-k choice, normalization after it, atomic or stored counts at the
# end); no branch takes two of them at once. Checked: ignoring the bias, skipping the
# normalization, storing instead of adding the counts, counting masked rows, a top-1 group score
# and one group too few each fail 9 to 15 of the 28.
_ROWS = [1, 5, 33]
_FLAGS = [(True, True), (False, True), (True, False), (False, False)]


@pytest.mark.parametrize(
    "combo,t,with_bias,norm",
    [
        (combo, _ROWS[(i + q) % 3], *flags)
        for i, combo in enumerate(COMBOS)
        for q, flags in enumerate(_FLAGS)
    ],
    ids=lambda v: "E{}_G{}_TG{}_K{}".format(*v) if isinstance(v, tuple) else str(v),
)
def test_matches_route(combo, t, with_bias, norm):
    e, ng, tg, k = combo
    logits, bias = _case(t, e, seed=e * 1000 + t * 10 + 2 * with_bias + norm, with_bias=with_bias)
    kw = dict(top_k=k, n_group=ng, topk_group=tg, routed_scaling_factor=2.5, norm_topk_prob=norm)
    out = moe_gate(logits, bias, **kw)
    ref = moe_gate_ref(logits, bias, **kw)
    _check(out, ref, t, k, e)
    if norm and k > 1:
        torch.testing.assert_close(out.weights_TK.sum(-1), torch.full((t,), 2.5), atol=2e-6, rtol=0)


@pytest.mark.parametrize("block_t", [1, 4, 64])
def test_row_blocks_and_atomic_counts(block_t):
    # 37 rows in blocks of 1 or 4 is 37 or 10 programs adding into the counts atomically; 64 is
    # one program that stores them. Every block size must give the same routing.
    logits, bias = _case(37, 64, seed=7, with_bias=True)
    kw = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=1.0)
    out = moe_gate(logits, bias, block_t=block_t, **kw)
    _check(out, moe_gate_ref(logits, bias, **kw), 37, 8, 64)


def test_default_rows_a_program(launch_spy):
    """Decode batches up to 8 rows: one program; 9-64: one row a program; past 64 about 16
    programs of at most 2048 cells (Moonlight's 64 experts: 16 rows at 256 tokens; V3's 256: 8);
    the launch takes that grid and routes as the reference."""
    assert [gate_block_t(t, 64) for t in (1, 3, 8, 9, 64, 65, 256, 4096)] == [
        *(1, 4, 8, 1, 1, 8, 16, 32)
    ]
    assert [gate_block_t(t, 256) for t in (8, 64, 256, 4096)] == [8, 1, 8, 8]
    from moeray.kernels import gate as gate_mod

    grids = launch_spy(gate_mod, "_moe_gate_kernel")
    logits, bias = _case(37, 64, seed=8, with_bias=True)
    kw = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=1.0)
    _check(moe_gate(logits, bias, **kw), moe_gate_ref(logits, bias, **kw), 37, 8, 64)
    assert grids == [(37,)]


def test_group_limit_with_negative_biased_scores():
    # Biases of -2 make every biased score negative: the -inf mask (official) must still keep each
    # token inside topk_group groups, where a 0.0 mask (transformers) would let masked experts win.
    logits, _ = _case(9, 64, seed=3, with_bias=False)
    bias = torch.full((64,), -2.0) + torch.linspace(0, 0.5, 64)
    out = moe_gate(logits, bias, top_k=8, n_group=8, topk_group=2, routed_scaling_factor=1.0)
    ref = moe_gate_ref(logits, bias, top_k=8, n_group=8, topk_group=2, routed_scaling_factor=1.0)
    _check(out, ref, 9, 8, 64)
    groups = out.expert_ids_TK // 8
    assert all(len(set(row.tolist())) <= 2 for row in groups)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_and_bias(dtype):
    logits, bias = _case(6, 64, seed=11, with_bias=True, dtype=dtype)
    bias = bias.to(dtype)
    kw = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    _check(moe_gate(logits, bias, **kw), moe_gate_ref(logits, bias, **kw), 6, 8, 64)


def test_strided_rows_and_empty_batch():
    logits, bias = _case(5, 96, seed=5, with_bias=True)
    view = logits[:, :64]  # row stride 96, unit stride over experts: taken as is
    kw = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    _check(moe_gate(view, bias[:64], **kw), moe_gate_ref(view, bias[:64], **kw), 5, 8, 64)
    empty = moe_gate(torch.empty(0, 64), bias[:64], **kw)
    assert empty.expert_ids_TK.shape == (0, 8) and torch.equal(
        empty.counts_E, torch.zeros(64, dtype=torch.int64)
    )


@pytest.mark.parametrize("combo", COMBOS[:5], ids=lambda c: "E{}_G{}_TG{}_K{}".format(*c))
@pytest.mark.parametrize("shared", [1, 2, 3])
@pytest.mark.parametrize("t", [1, 6])
def test_shared_experts_appended_in_the_same_launch(combo, shared, t):
    """shared_experts=S (model/shared_fuse.py): the routed outputs as without, and [T, K + S] ids
    and weights that are the routed ones, then E .. E+S-1 with weight 1.0 (not times the routed
    scaling), at K + S a power of two (K 6 + S 2) and not (K 4 + S 1, 5 + 3)."""
    e, ng, tg, k = combo
    logits, bias = _case(t, e, seed=e + t + shared, with_bias=True)
    kw = dict(top_k=k, n_group=ng, topk_group=tg, routed_scaling_factor=2.5)
    out = moe_gate(logits, bias, shared_experts=shared, **kw)
    _check(out, moe_gate_ref(logits, bias, **kw), t, k, e)
    assert out.fused_ids_TJ is not None and out.fused_weights_TJ is not None
    assert out.fused_ids_TJ.shape == (t, k + shared) and out.fused_ids_TJ.is_contiguous()
    assert torch.equal(out.fused_ids_TJ[:, :k], out.expert_ids_TK)
    assert torch.equal(out.fused_weights_TJ[:, :k], out.weights_TK)
    want_ids = torch.arange(e, e + shared).expand(t, -1)
    assert torch.equal(out.fused_ids_TJ[:, k:], want_ids)
    assert torch.equal(out.fused_weights_TJ[:, k:], torch.ones(t, shared))
    assert moe_gate(logits, bias, **kw).fused_ids_TJ is None
    assert moe_gate_ref(logits, bias, **kw).fused_ids_TJ is None
    empty = moe_gate(torch.empty(0, e), bias, shared_experts=shared, **kw)
    assert empty.fused_ids_TJ is not None and empty.fused_ids_TJ.shape == (0, k + shared)


def test_input_errors():
    logits, bias = _case(3, 16, seed=1, with_bias=True)
    kw = dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=1.0)
    with pytest.raises(ValueError, match=r"logits has dtype torch\.int64"):
        moe_gate(logits.long(), bias, **kw)
    with pytest.raises(ValueError, match="logits must have 2 dims"):
        moe_gate(logits[None], bias, **kw)
    with pytest.raises(ValueError, match="unit stride over experts"):
        moe_gate(logits.t().contiguous().t(), bias, **kw)
    with pytest.raises(
        ValueError, match=f"512 experts; the fused MoE gate supports 1..{MAX_EXPERTS}"
    ):
        moe_gate(torch.randn(2, 512), None, **{**kw, "n_group": 8})
    with pytest.raises(ValueError, match="bias has 15 entries, logits have 16"):
        moe_gate(logits, bias[:15], **kw)
    with pytest.raises(ValueError, match=r"bias has dtype torch\.int64"):
        moe_gate(logits, bias.long(), **kw)
    with pytest.raises(ValueError, match="bias is on meta"):
        moe_gate(logits, bias.to("meta"), **kw)
    # The group rules raise route's own messages.
    for bad, match in (
        (dict(n_group=3), "n_group=3 must divide"),
        (dict(topk_group=5), r"topk_group=5 must be in \[1, n_group=4\]"),
        (dict(top_k=9), r"top_k=9 must be in \[1, topk_group\*experts_per_group=8\]"),
    ):
        with pytest.raises(ValueError, match=match):
            moe_gate(logits, bias, **{**kw, **bad})
        with pytest.raises(ValueError, match=match):
            moe_gate_ref(logits, bias, **{**kw, **bad})
    with pytest.raises(ValueError, match="block_t=3 must be a power of 2"):
        moe_gate(logits, bias, block_t=3, **kw)
    with pytest.raises(ValueError, match="num_warps=3"):
        moe_gate(logits, bias, num_warps=3, **kw)
    with pytest.raises(ValueError, match="shared_experts=-1 must be >= 0"):
        moe_gate(logits, bias, shared_experts=-1, **kw)


def test_dispatch_rule_and_cpu_route(monkeypatch):
    monkeypatch.delenv("MOERAY_FUSED_ROUTE_BATCH", raising=False)
    logits, bias = _case(4, 64, seed=2, with_bias=True)
    assert moe_gate_applies(logits, bias)  # under the interpreter CPU tensors qualify
    assert not moe_gate_applies(logits.t().contiguous().t(), bias)
    assert not moe_gate_applies(torch.randn(2, 512), None)
    assert not moe_gate_applies(logits, bias[:32])
    # beyond ROUTE_BATCH_MAX_TOKENS rows (prefill) the PyTorch gate runs (kernels/gate.py)
    assert moe_gate_applies(torch.randn(ROUTE_BATCH_MAX_TOKENS, 64), bias)
    assert not moe_gate_applies(torch.randn(ROUTE_BATCH_MAX_TOKENS + 1, 64), bias)
    with pytest.MonkeyPatch.context() as mp:  # the A/B switch: the kernel's own 32-row bound
        mp.setenv("MOERAY_FUSED_ROUTE_BATCH", "0")
        assert moe_gate_applies(torch.randn(FUSED_MAX_TOKENS, 64), bias)
        assert not moe_gate_applies(torch.randn(FUSED_MAX_TOKENS + 1, 64), bias)
    # route() sends only CUDA tensors to the kernel: on CPU it is moe_gate_ref, gradients included.
    x = logits.clone().requires_grad_()
    r = route(x, bias, top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    r.weights_TK.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


_GPU_CHECK = r"""
import torch
import moeray.platform.routing.gate as routing_gate
from moeray.kernels.gate import moe_gate, moe_gate_ref
from moeray.platform.routing.gate import GROUP_MASK_TRANSFORMERS, route

torch.manual_seed(0)
rows, bad = [], []
combos = [
    (16, 4, 2, 4), (64, 8, 4, 8), (256, 8, 4, 8), (12, 3, 2, 5), (20, 1, 1, 6), (6, 6, 3, 2),
    (256, 1, 1, 8),
]
for e, ng, tg, k in combos:
    for t in (1, 5, 33, 1000, 8192):
        for dtype in (torch.float32, torch.bfloat16):
            logits = (torch.randn(t, e, device="cuda") * 2).to(dtype)
            bias = torch.randn(e, device="cuda") * 0.3
            kw = dict(top_k=k, n_group=ng, topk_group=tg, routed_scaling_factor=2.5)
            out, ref = moe_gate(logits, bias, **kw), moe_gate_ref(logits, bias, **kw)
            s_err = float((out.scores_TE - ref.scores_TE).abs().max())
            # Bit-equal scores feed the same fp32 comparisons, so the choice must be identical. If
            # the sigmoid were 1 ulp off somewhere, a near-tie (gap < 1e-7) could flip a row: allow
            # 1 in 1000 rows then, and compare weights and counts on the rows that agree.
            diff_T = (out.expert_ids_TK != ref.expert_ids_TK).any(-1)
            n_diff = int(diff_T.sum())
            same = ~diff_T
            w_err = (
                float((out.weights_TK[same] - ref.weights_TK[same]).abs().max())
                if bool(same.any())
                else 0.0
            )
            cnt_gap = int((out.counts_E - ref.counts_E).abs().sum())
            ids_ok = n_diff == 0 if s_err == 0.0 else n_diff <= t // 1000
            ok = ids_ok and cnt_gap <= 2 * k * n_diff and w_err <= 1e-6 and s_err <= 2.5e-7
            rows.append(
                (f"E{e} G{ng} TG{tg} K{k}", t, str(dtype)[6:], n_diff, cnt_gap, w_err, s_err, ok)
            )
            if not ok:
                bad.append(f"E{e}/T{t}/{dtype}")

# route() dispatch: no-grad CUDA goes to the kernel; gradients or the transformers mask do not.
calls = []
orig = routing_gate.moe_gate
routing_gate.moe_gate = lambda *a, **k: calls.append(1) or orig(*a, **k)
logits = torch.randn(4, 256, device="cuda")
bias = torch.randn(256, device="cuda") * 0.1
kw = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
with torch.no_grad():
    route(logits, bias, **kw)
n_nograd = len(calls)
x = logits.clone().requires_grad_()
r = route(x, bias, **kw)
r.weights_TK.sum().backward()
n_grad = len(calls) - n_nograd
with torch.no_grad():
    route(logits, bias, group_mask_value=GROUP_MASK_TRANSFORMERS, **kw)
n_tf = len(calls) - n_nograd - n_grad
routing_gate.moe_gate = orig
dispatch_ok = n_nograd == 1 and n_grad == 0 and n_tf == 0 and x.grad is not None
if not dispatch_ok:
    bad.append(f"dispatch nograd={n_nograd} grad={n_grad} transformers_mask={n_tf}")

# CUDA graph: capture route() on a static logits buffer (the engine's decode step), replay on new
# logits; the replayed outputs must equal a fresh eager PyTorch route on those logits.
static = torch.randn(3, 256, device="cuda")
with torch.inference_mode():
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            route(static, bias, **kw)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = route(static, bias, **kw)
    graph_ok = True
    for i in range(3):
        static.copy_(torch.randn(3, 256, device="cuda"))
        g.replay()
        ref = moe_gate_ref(static, bias, **kw)
        graph_ok &= torch.equal(captured.expert_ids_TK, ref.expert_ids_TK)
        graph_ok &= torch.equal(captured.counts_E, ref.counts_E)
        graph_ok &= float((captured.weights_TK - ref.weights_TK).abs().max()) <= 1e-6
    torch.cuda.synchronize()
if not graph_ok:
    bad.append("cuda graph replay")

print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
print("fused vs PyTorch route, worst over T in (1, 5, 33, 1000, 8192) x fp32/bf16 logits:")
print(f"{'shape':18s} {'rows!=':>6s} {'|dcnt|':>6s} {'w maxdiff':>10s} {'s maxdiff':>10s} ok")
for name in dict.fromkeys(r[0] for r in rows):
    rs = [r for r in rows if r[0] == name]
    print(f"{name:18s} {max(r[3] for r in rs):6d} {max(r[4] for r in rs):6d} "
          f"{max(r[5] for r in rs):10.2e} {max(r[6] for r in rs):10.2e} {all(r[7] for r in rs)}")
print(f"scores bit-exact vs torch sigmoid in every case: {all(r[6] == 0.0 for r in rows)}")
print(f"dispatch: no_grad -> fused {n_nograd}, with grad -> fused {n_grad}, "
      f"transformers mask -> fused {n_tf}: {'OK' if dispatch_ok else 'WRONG'}")
print(f"route() captured in a CUDA graph, 3 replays on new logits equal eager: {graph_ok}")
print("RESULT", "FAIL " + ", ".join(bad) if bad else "PASS")
"""


@pytest.mark.gpu
def test_gpu_compiled_kernel_dispatch_and_graph_capture(compiled_check):
    compiled_check(_GPU_CHECK, "gate_gpu.txt")


def test_env_switch_turns_the_fused_path_off(monkeypatch):
    logits = torch.randn(3, 16)
    assert moe_gate_applies(logits, None)  # the interpreter runs the kernel on CPU tensors
    monkeypatch.setenv("MOERAY_FUSED_GATE", "0")
    assert not moe_gate_applies(logits, None)
