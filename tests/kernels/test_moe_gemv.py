"""moe_gemv (the decode MoE without alignment) under the interpreter: the kernels against
moe_gemv_ref at odd shapes (bf16/fp16/fp32 x, bf16 and fp32 weights, FP8 weights weight-only),
moe_gemv_ref against the plain float64 math, ids outside [0, E) adding nothing, the GPU's 16-row
tile giving the interpreter tile's bits, fused_moe_gate_up's dispatch (moe_gemv up to
MOE_GEMV_MAX_ASSIGNMENTS assignments and at two tokens of small experts, the aligned kernels
otherwise, with MOERAY_FUSED_MOE_GEMV=0 or a config; on CPU without the interpreter the chosen
path's reference), and bad inputs.

Tolerances: the kernels and the reference differ only in the order of fp32 sums (and silu's exp,
numpy's vs torch's, an ulp): fp32 outputs within ~3e-7 of the norm; bf16 and fp16 outputs, rounded
from nearly equal fp32 values, equal but for a rare one-ulp flip (0 of 2,880 bf16 values and 2 of
2,880 fp16 values differed over 12 seeds when these were set)."""

import pytest
import torch

from moeray.kernels import fp8
from moeray.kernels import moe as moe_mod
from moeray.kernels import moe_gemv as gemv_mod
from moeray.kernels.moe import fused_moe_gate_up
from moeray.kernels.moe_common import fused_moe_gate_up_ref
from moeray.kernels.moe_gemv import (
    MOE_GEMV_MAX_ASSIGNMENTS,
    moe_gemv,
    moe_gemv_applies,
    moe_gemv_config,
    moe_gemv_ref,
)

E = 5
NAMES = ("w1", "w3", "w2")


def _ids(t: int, k: int, g: torch.Generator) -> torch.Tensor:
    """[T, K] ids with non-local ones (-1 and >= E) and the same experts chosen by several
    tokens (expert 3 in every row; the rest random, repeats across tokens likely)."""
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)])
    ids[:, 0] = 3
    ids[0, -1] = -1
    if t > 1:
        ids[1, 1] = E + 2
    return ids


def _bf16_case(t, h, i, k, dtype, seed, wdtype=None):
    g = torch.Generator().manual_seed(seed)
    wdtype = wdtype or dtype
    x = torch.randn(t, h, generator=g).to(dtype)
    w1 = (torch.randn(E, i, h, generator=g) / h**0.5).to(wdtype)
    w3 = (torch.randn(E, i, h, generator=g) / h**0.5).to(wdtype)
    w2 = (torch.randn(E, h, i, generator=g) / i**0.5).to(wdtype)
    wts = torch.rand(t, k, generator=g).to(dtype)
    return x, (w1, w3, w2), _ids(t, k, g), wts, {}


def _fp8_case(t, h, i, k, dtype, seed):
    x, ws, ids, wts, _ = _bf16_case(t, h, i, k, torch.float32, seed)
    # each expert's (e4m3, scales), from the reference quantization: the interpreted kernel's
    # values (test_fp8.py checks it) in a fraction of the time
    qs = [[fp8.weight_quant_ref(m) for m in w] for w in ws]
    q = tuple(torch.stack([a for a, _ in pairs]) for pairs in qs)
    scales = {
        f"{n}_scale": torch.stack([b for _, b in pairs]) for n, pairs in zip(NAMES, qs, strict=True)
    }
    return x.to(dtype), q, ids, wts.to(dtype), scales


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _check_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape and not torch.isnan(out).any()
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())
        return
    eps = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out, ref, rtol=eps, atol=eps * ref.abs().max().item())
    assert (out != ref).float().mean() < 0.01


def _plain(x, ws, ids, wts, scales, add=None) -> torch.Tensor:
    """The math in float64, one assignment at a time, weights dequantized."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if not 0 <= e < E:
                continue
            w1, w3, w2 = (_expert(w, e, scales, n) for n, w in zip(NAMES, ws, strict=True))
            xe = x[t].double()
            hid = torch.nn.functional.silu(w1 @ xe) * (w3 @ xe)
            y[t] += float(wts[t, k]) * (w2 @ hid)
    return y if add is None else y + add.double()


def _expert(w, e, scales, name):
    if scales:
        return fp8.weight_dequant_ref(w[e], scales[f"{name}_scale"][e], out_dtype=torch.float64)
    return w[e].double()


CASES = [  # (make, t, h, i, k, x dtype, weight dtype)
    (_bf16_case, 1, 80, 48, 3, torch.bfloat16, None),
    (_bf16_case, 3, 80, 48, 3, torch.bfloat16, None),
    (_bf16_case, 2, 80, 48, 3, torch.float32, None),
    (_bf16_case, 2, 72, 40, 2, torch.float16, None),
    (_bf16_case, 3, 80, 48, 3, torch.bfloat16, torch.float32),
    (_fp8_case, 2, 256, 128, 3, torch.bfloat16, None),
    (_fp8_case, 3, 256, 256, 3, torch.float32, None),
    (_fp8_case, 1, 256, 256, 4, torch.bfloat16, None),
]


@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize(("make", "t", "h", "i", "k", "dtype", "wdtype"), CASES)
def test_moe_gemv_equals_reference(make, t, h, i, k, dtype, wdtype, with_add):
    args = (t, h, i, k, dtype, 7 * t + h)
    x, ws, ids, wts, scales = make(*args, wdtype) if wdtype else make(*args)
    add = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    add = add if with_add else None
    out = moe_gemv(x, *ws, ids, wts, add_TH=add, **scales)
    ref = moe_gemv_ref(x, *ws, ids, wts, add_TH=add, **scales)
    _check_close(out, ref)
    # the reference against the plain math: fp32 x keeps fp32 h under the interpreter
    plain = _plain(x, ws, ids, wts, scales, add)
    rel = _rel(ref, plain)
    assert rel < (1e-6 if dtype == torch.float32 else 1e-2), rel


def test_non_local_ids_add_nothing():
    """An assignment routed outside [0, E) gives the bits of the same assignment routed to a
    local expert with weight 0; all of them non-local: the output is add_TH alone."""
    x, ws, ids, wts, _ = _bf16_case(3, 80, 48, 3, torch.bfloat16, seed=2)
    foreign = (ids < 0) | (ids >= E)
    assert foreign.sum() == 2
    local_ids = torch.where(foreign, torch.zeros_like(ids), ids)
    zero_wts = torch.where(foreign, torch.zeros_like(wts), wts)
    assert torch.equal(moe_gemv(x, *ws, ids, wts), moe_gemv(x, *ws, local_ids, zero_wts))
    add = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    away = torch.full_like(ids, E)
    away[0, 0] = -7
    assert torch.equal(moe_gemv(x, *ws, away, wts, add_TH=add), add)
    assert not moe_gemv(x, *ws, away, wts).any()


@pytest.mark.parametrize("make", [_bf16_case, _fp8_case])
def test_gpu_tile_gives_the_same_bits(make):
    """The GPU's tile (16 rows, here 3 row blocks of I = 48 and 5 of H = 80, 16 of FP8's 256) and
    any other width compute each output row alike: the same bits as the interpreter's."""
    h, i = (80, 48) if make is _bf16_case else (256, 256)
    x, ws, ids, wts, scales = make(2, h, i, 3, torch.bfloat16, 5)
    want = moe_gemv(x, *ws, ids, wts, **scales)
    for bn in (16, 128):
        cfg = dict(BLOCK_N=bn, num_warps=2, num_stages=6)
        assert torch.equal(moe_gemv(x, *ws, ids, wts, config=cfg, **scales), want)
    assert moe_gemv_config()["BLOCK_N"] != 16  # (under the interpreter: the wider tile)
    # The down launch's own tile ("down"): its grid and the fold's counters follow it.
    down = dict(BLOCK_N=16, num_warps=2, num_stages=2)
    cfg = {**moe_gemv_config(), "down": down}
    assert torch.equal(moe_gemv(x, *ws, ids, wts, config=cfg, **scales), want)


# The fold's sum reads y_tk in x's dtype whatever the weights: every x and weight dtype, and one
# FP8 case (t 2: both non-local ids) for its down rows; the two FP8 cases of I 256 add only more
# programs (~20 s of the interpreter). add_TH enters only that sum, which does not know the
# weights: the bf16-weight cases run with and without it, the FP8 case with it (~3.5 s). Checked:
# the fold's sum without add_TH fails the 6 cases with it, the FP8 one among them.
FOLD_CASES = CASES[:6]


@pytest.mark.parametrize(
    ("make", "t", "h", "i", "k", "dtype", "wdtype", "with_add"),
    [(*case, add) for case in FOLD_CASES[:5] for add in (False, True)] + [(*FOLD_CASES[5], True)],
)
def test_sum_folded_into_down_gives_the_same_bits(
    make, t, h, i, k, dtype, wdtype, with_add, monkeypatch
):
    """The fold (the default): the last down program of each (token, row block) sums the token's
    rows (non-local ids included, add_TH or not) with moe_sum's roundings: the bits of the
    three-launch path (MOERAY_FUSED_MOE_SUM_FOLD=0), without moe_sum's launch; run twice (the
    counters start from zero again)."""
    args = (t, h, i, k, dtype, 7 * t + h)
    x, ws, ids, wts, scales = make(*args, wdtype) if wdtype else make(*args)
    add = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    add = add if with_add else None
    monkeypatch.setenv("MOERAY_FUSED_MOE_SUM_FOLD", "0")
    want = moe_gemv(x, *ws, ids, wts, add_TH=add, **scales)
    monkeypatch.delenv("MOERAY_FUSED_MOE_SUM_FOLD")
    for _ in range(2):
        assert torch.equal(moe_gemv(x, *ws, ids, wts, add_TH=add, **scales), want)
    cfg = dict(BLOCK_N=16, num_warps=2, num_stages=4)  # the GPU's tile: more row blocks
    assert torch.equal(moe_gemv(x, *ws, ids, wts, add_TH=add, config=cfg, **scales), want)


# The early read peels K step 0 (and, FP8, its scale): every bf16-weight case (one ragged step)
# and FP8 at I 256 (an even first step, its scale, then the loop from step 1); FP8 at I 128 (one
# step) and the one-token FP8 case repeat what those run (~21 s of the interpreter). The early
# read changes only how a program's K loop starts, the fold only what follows the loop (both
# paths call the same row loop with the peeled step): the bf16-weight cases run both folds, the
# FP8 case the default fold alone (its unfolded run: ~10 s). Checked: the peeled step without its
# FP8 scale fails the FP8 case; step 0 summed twice fails all 11.
EARLY_CASES = CASES[:5] + CASES[6:7]


@pytest.mark.parametrize(
    ("make", "t", "h", "i", "k", "dtype", "wdtype", "fold"),
    [(*case, fold) for case in EARLY_CASES[:5] for fold in ("1", "0")] + [(*EARLY_CASES[5], "1")],
)
def test_down_early_gives_the_same_bits(make, t, h, i, k, dtype, wdtype, fold, monkeypatch):
    """MOERAY_FUSED_MOE_DOWN_EARLY=1: the down kernel's ids and first weight step read first
    (before the PDL wait on a GPU), the loop from step 1: the same products in the same order,
    so the bits of the plain order, with the sum folded or not, non-local ids (the cases' -1 and
    E + 2) included, at the interpreter's tile and the GPU's."""
    args = (t, h, i, k, dtype, 7 * t + h)
    x, ws, ids, wts, scales = make(*args, wdtype) if wdtype else make(*args)
    add = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    monkeypatch.setenv("MOERAY_FUSED_MOE_SUM_FOLD", fold)
    for cfg in (None, dict(BLOCK_N=16, num_warps=2, num_stages=4)):
        monkeypatch.delenv("MOERAY_FUSED_MOE_DOWN_EARLY", raising=False)
        want = moe_gemv(x, *ws, ids, wts, add_TH=add, config=cfg, **scales)
        monkeypatch.setenv("MOERAY_FUSED_MOE_DOWN_EARLY", "1")
        assert torch.equal(moe_gemv(x, *ws, ids, wts, add_TH=add, config=cfg, **scales), want)


def test_sum_fold_launches_two_kernels(launch_spy, monkeypatch):
    """With the fold (the default) moe_sum is not launched; with MOERAY_FUSED_MOE_SUM_FOLD=0 it
    is."""
    from moeray.kernels import moe_common

    x, ws, ids, wts, _ = _bf16_case(2, 80, 48, 3, torch.bfloat16, seed=4)
    sums = launch_spy(moe_common, "_moe_sum_kernel")
    moe_gemv(x, *ws, ids, wts)
    assert len(sums) == 0
    monkeypatch.setenv("MOERAY_FUSED_MOE_SUM_FOLD", "0")
    moe_gemv(x, *ws, ids, wts)
    assert len(sums) == 1


def _count(launch_spy):
    return launch_spy(gemv_mod, "_moe_gemv_gate_up_kernel"), launch_spy(
        moe_mod, "_moe_gate_up_kernel"
    )


@pytest.mark.parametrize("fp8_weights", [False, True])
def test_dispatch_by_assignments_switch_and_config(fp8_weights, launch_spy, monkeypatch):
    """By default (and with MOERAY_FUSED_MOE_GEMV=1) fused_moe_gate_up runs moe_gemv up to
    MOE_GEMV_MAX_ASSIGNMENTS assignments, and the aligned kernels above (counted launches), with
    a config, and with the switch at 0; each gives its own reference's numbers (FP8: weight-only
    vs quantized activations, which differ)."""
    monkeypatch.delenv("MOERAY_FUSED_MOE_GEMV", raising=False)
    make, h, i = (_fp8_case, 256, 128) if fp8_weights else (_bf16_case, 80, 48)
    k = 4
    t_small = MOE_GEMV_MAX_ASSIGNMENTS // k
    x, ws, ids, wts, scales = make(t_small + 1, h, i, k, torch.bfloat16, 11)
    gemv_grids, aligned_grids = _count(launch_spy)

    def run(t, **kw):
        out = fused_moe_gate_up(x[:t], *ws, ids[:t], wts[:t], **scales, **kw)
        ref_gemv = moe_gemv_ref(x[:t], *ws, ids[:t], wts[:t], **scales)
        s = (
            tuple(scales.values()) or None
        )  # h rounded to bf16 before FP8's act_quant, as the kernel
        ref_aligned = fused_moe_gate_up_ref(
            x[:t], *ws, ids[:t], wts[:t], scales=s, act_dtype=torch.bfloat16
        )
        return out, ref_gemv, ref_aligned

    out, ref_gemv, ref_aligned = run(t_small)  # 16 assignments: moe_gemv
    assert (len(gemv_grids), len(aligned_grids)) == (1, 0)
    assert gemv_grids[0][1] == t_small * k
    _check_close(out, ref_gemv)
    if fp8_weights:  # the weight-only numbers, not the quantized ones
        assert _rel(out, ref_gemv) < 1e-3 < _rel(out, ref_aligned) < 0.08
    out, _, ref_aligned = run(t_small + 1)  # 20: aligned
    assert (len(gemv_grids), len(aligned_grids)) == (1, 1)
    _check_close(out, ref_aligned)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=1)
    run(1, config=cfg)
    assert (len(gemv_grids), len(aligned_grids)) == (1, 2)
    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV", "0")
    run(1)
    assert (len(gemv_grids), len(aligned_grids)) == (1, 3)
    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV", "1")
    run(1)
    assert (len(gemv_grids), len(aligned_grids)) == (2, 3)


def test_two_tokens_of_small_experts_take_moe_gemv_past_the_bound(launch_spy, monkeypatch):
    """Past MOE_GEMV_MAX_ASSIGNMENTS (4 here, so 2 tokens x 3 picks pass it) two tokens of small
    experts still run moe_gemv (MTP's verification at batch 1), with its numbers; three tokens
    run the aligned kernels, as do two with MOERAY_FUSED_MOE_GEMV_PAIR=0."""
    for name in ("MOERAY_FUSED_MOE_GEMV", "MOERAY_FUSED_MOE_GEMV_PAIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(gemv_mod, "MOE_GEMV_MAX_ASSIGNMENTS", 4)
    x, ws, ids, wts, _ = _bf16_case(3, 80, 48, 3, torch.bfloat16, 5)
    gemv_grids, aligned_grids = _count(launch_spy)
    out = fused_moe_gate_up(x[:2], *ws, ids[:2], wts[:2])
    assert (len(gemv_grids), len(aligned_grids)) == (1, 0)
    _check_close(out, moe_gemv_ref(x[:2], *ws, ids[:2], wts[:2]))
    fused_moe_gate_up(x, *ws, ids, wts)
    assert (len(gemv_grids), len(aligned_grids)) == (1, 1)
    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV_PAIR", "0")
    fused_moe_gate_up(x[:2], *ws, ids[:2], wts[:2])
    assert (len(gemv_grids), len(aligned_grids)) == (1, 2)


def test_moe_gemv_applies_at_published_shapes(monkeypatch):
    """The rule at the engine's picks (the shared experts fused into the gate): one token of any
    model and two of the small preset's or Moonlight's experts take moe_gemv, two tokens of V3's
    7168 x 2048 experts (9 picks) and three of the small preset's the aligned kernels; the
    switches turn the pair rule, and moe_gemv, off. MOERAY_FUSED_MOE_GEMV_FEW=1 stretches the
    small-expert rule to 4 tokens (2-3 MTP drafts verified), not to 5 nor to V3's experts."""
    for name in ("MOE_GEMV", "MOE_GEMV_PAIR", "MOE_GEMV_FEW"):
        monkeypatch.delenv(f"MOERAY_FUSED_{name}", raising=False)
    small, moonlight, v3 = (1024, 288), (2048, 1408), (7168, 2048)
    assert moe_gemv_applies(1, 9, *v3) and moe_gemv_applies(2, 8, *moonlight)
    assert moe_gemv_applies(2, 9, *small)
    assert not moe_gemv_applies(2, 9, *v3)
    assert not moe_gemv_applies(3, 9, *small) and not moe_gemv_applies(0, 9, *small)
    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV_FEW", "1")
    assert moe_gemv_applies(3, 9, *small) and moe_gemv_applies(4, 9, *small)
    assert not moe_gemv_applies(5, 9, *small) and not moe_gemv_applies(3, 9, *v3)
    monkeypatch.delenv("MOERAY_FUSED_MOE_GEMV_FEW")
    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV_PAIR", "0")
    assert not moe_gemv_applies(2, 9, *small) and moe_gemv_applies(2, 8, *moonlight)
    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV", "0")
    assert not moe_gemv_applies(1, 9, *v3)


def test_cpu_without_interpreter_runs_the_chosen_paths_reference(monkeypatch):
    """On CPU tensors without the interpreter, MOERAY_FUSED_MOE_GEMV=1: moe_gemv_ref at few
    assignments (weight-only FP8), the quantized reference above, no kernel launched."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV", "1")
    x, ws, ids, wts, scales = _fp8_case(6, 256, 128, 3, torch.bfloat16, 4)  # 18 assignments
    s = tuple(scales.values())
    small = fused_moe_gate_up(x[:2], *ws, ids[:2], wts[:2], **scales)
    assert torch.equal(small, moe_gemv_ref(x[:2], *ws, ids[:2], wts[:2], **scales))
    assert not torch.equal(small, fused_moe_gate_up_ref(x[:2], *ws, ids[:2], wts[:2], scales=s))
    big = fused_moe_gate_up(x, *ws, ids, wts, **scales)
    assert torch.equal(big, fused_moe_gate_up_ref(x, *ws, ids, wts, scales=s))


def test_bad_inputs_and_configs_name_the_value():
    x, (w1, w3, w2), ids, wts, _ = _bf16_case(2, 80, 48, 3, torch.bfloat16, 1)
    with pytest.raises(ValueError, match=r"w2 has shape \(5, 80, 16\)"):
        moe_gemv(x, w1, w3, w2[:, :, :16], ids, wts)
    with pytest.raises(ValueError, match=r"w3 has dtype torch\.float32"):
        moe_gemv(x, w1, w3.float(), w2, ids, wts)
    with pytest.raises(ValueError, match=r"expert_ids has dtype torch\.float32"):
        moe_gemv(x, w1, w3, w2, ids.float(), wts)
    with pytest.raises(ValueError, match="must both be"):
        moe_gemv(x, w1, w3, w2, ids, wts[:, :1])
    with pytest.raises(ValueError, match=r"add has shape \(1, 80\)"):
        moe_gemv(x, w1, w3, w2, ids, wts, add_TH=x[:1])
    q = [w.to(torch.float8_e4m3fn) for w in (w1, w3, w2)]
    with pytest.raises(ValueError, match="FP8 weights need"):
        moe_gemv(x, *q, ids, wts)
    xf, qf, idsf, wtsf, sf = _fp8_case(1, 256, 128, 2, torch.bfloat16, 1)
    with pytest.raises(ValueError, match=r"w2_scale has shape \(5, 1, 1\)"):
        moe_gemv(xf, *qf, idsf, wtsf, **{**sf, "w2_scale": sf["w2_scale"][:, :1]})
    bad = [
        ({"BLOCK_N": 16, "num_warps": 2}, "config keys"),
        ({"BLOCK_N": 24, "num_warps": 2, "num_stages": 6}, "BLOCK_N=24"),
        ({"BLOCK_N": 256, "num_warps": 2, "num_stages": 6}, "BLOCK_N=256"),
        ({"BLOCK_N": 16, "num_warps": 3, "num_stages": 6}, "num_warps=3"),
        ({"BLOCK_N": 16, "num_warps": 2, "num_stages": 0}, "num_stages=0"),
        ({"BLOCK_N": 16, "num_warps": 2, "num_stages": 6, "down": {"BLOCK_N": 16}}, "down"),
        (
            {"BLOCK_N": 16, "num_warps": 2, "num_stages": 6, "down": dict(_GOOD, BLOCK_N=48)},
            "BLOCK_N=48",
        ),
    ]
    for cfg, match in bad:
        with pytest.raises(ValueError, match=match):
            moe_gemv(x, w1, w3, w2, ids, wts, config=cfg)


_GOOD = {"BLOCK_N": 16, "num_warps": 2, "num_stages": 6}


def _shared_tail(ids: torch.Tensor, s: int) -> torch.Tensor:
    """ids with each token's last s slots set to experts E-s .. E-1 (the fused gate's shared
    experts) and the routed slots moved off them (-1 stays: another rank's expert)."""
    ids = ids.clone()
    k = ids.shape[1]
    routed = ids[:, : k - s]
    ids[:, : k - s] = torch.where(routed >= E - s, routed % (E - s), routed)
    ids[:, k - s :] = torch.arange(E - s, E)
    return ids


@pytest.mark.parametrize(
    ("make", "t", "h", "i", "k", "dtype", "s"),
    [
        (_bf16_case, 1, 80, 48, 3, torch.bfloat16, 1),
        (_bf16_case, 1, 80, 48, 3, torch.bfloat16, 2),
        (_bf16_case, 3, 72, 40, 4, torch.float16, 1),
        (_bf16_case, 3, 72, 40, 4, torch.float16, 2),
        # FP8's early branch (the shared slots' scales too) at S 1; S 2 runs the same branch,
        # the bf16 cases cover it (~10 s of the interpreter)
        (_fp8_case, 2, 256, 128, 3, torch.bfloat16, 1),
    ],
)
def test_early_shared_gives_the_same_bits(make, t, h, i, k, dtype, s, launch_spy, monkeypatch):
    """early_shared=S (the shared slots' gate/up before the PDL wait, their programs first in the
    grid): the bits of the plain launch on the same grid, with the sum folded or not, at the
    interpreter's tile and the GPU's, and through fused_moe_gate_up's dispatch."""
    x, ws, ids, wts, scales = make(t, h, i, k, dtype, 11 * t + s)
    ids = _shared_tail(ids, s)
    wts[:, k - s :] = 1.0
    add = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    grids = launch_spy(gemv_mod, "_moe_gemv_gate_up_kernel")
    want = moe_gemv(x, *ws, ids, wts, add_TH=add, **scales)
    assert _rel(want, moe_gemv_ref(x, *ws, ids, wts, add_TH=add, **scales)) < 1e-2
    assert torch.equal(moe_gemv(x, *ws, ids, wts, add_TH=add, early_shared=s, **scales), want)
    assert grids[0] == grids[1]
    cfg = dict(BLOCK_N=16, num_warps=2, num_stages=4)
    got = moe_gemv(x, *ws, ids, wts, add_TH=add, config=cfg, early_shared=s, **scales)
    assert torch.equal(got, want)
    got = fused_moe_gate_up(x, *ws, ids, wts, add_TH=add, early_shared=s, **scales)
    assert torch.equal(got, want)
    monkeypatch.setenv("MOERAY_FUSED_MOE_SUM_FOLD", "0")
    assert torch.equal(moe_gemv(x, *ws, ids, wts, add_TH=add, early_shared=s, **scales), want)


def test_early_shared_is_checked():
    """A bad early_shared, or ids whose last slots are not the last experts, name the value."""
    x, ws, ids, wts, _ = _bf16_case(2, 80, 48, 3, torch.bfloat16, 1)
    tail = _shared_tail(ids, 1)
    for bad, match in [
        (True, "early_shared=True: must be an int"),
        (1.0, "early_shared=1.0: must be an int"),
        (-1, r"early_shared=-1: must lie in \[0, min\(K=3, E=5\)\]"),
        (4, r"early_shared=4: must lie in \[0, min\(K=3, E=5\)\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            moe_gemv(x, *ws, tail, wts, early_shared=bad)
        with pytest.raises(ValueError, match=match):
            fused_moe_gate_up(x, *ws, tail, wts, early_shared=bad)
    wrong = tail.clone()
    wrong[1, -1] = 0
    with pytest.raises(ValueError, match=r"last 1 expert ids must be \[4\].*got \[0, 4\]"):
        moe_gemv(x, *ws, wrong, wts, early_shared=1)
    with pytest.raises(ValueError, match=r"last 2 expert ids must be \[3, 4\]"):
        moe_gemv(x, *ws, tail, wts, early_shared=2)
