"""Fused MoE (bf16 and FP8 block-scaled weights) vs the per-expert loop, under the interpreter."""

import pytest
import torch

from moeray.kernels import fp8
from moeray.kernels import moe as moe_mod
from moeray.kernels.moe import fused_moe, fused_moe_ref, moe_align


def _case(t, h, i, e, k, seed, skip_experts=(), foreign=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).bfloat16()
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).bfloat16()
    w2 = (torch.randn(e, h, i, generator=g) / i**0.5).bfloat16()
    allowed = torch.tensor([j for j in range(e) if j not in skip_experts])
    ids = allowed[torch.stack([torch.randperm(len(allowed), generator=g)[:k] for _ in range(t)])]
    if foreign:  # some choices live on another rank: ids outside [0, E)
        ids[::3, 0] = e + 2
        ids[1, 1] = -1
    wts = torch.rand(t, k, generator=g).bfloat16()
    return x, w13, w2, ids.to(torch.int32), wts


def _fp8_experts(w13, w2):
    """The experts' weights as e4m3 with 128x128 block scales: (w13, w2, their scale kwargs)."""
    q13, s13 = zip(*[fp8.weight_quant(w.float()) for w in w13], strict=False)
    q2, s2 = zip(*[fp8.weight_quant(w.float()) for w in w2], strict=False)
    return (
        torch.stack(q13),
        torch.stack(q2),
        dict(w13_scale=torch.stack(s13), w2_scale=torch.stack(s2)),
    )


def _rel(out, ref):
    assert not torch.isnan(out).any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_moe_align_blocks_and_padding():
    ids = torch.tensor(
        [[2, 0], [2, 5], [2, 0], [9, 2]], dtype=torch.int32
    )  # expert 1,3,4 empty; 9 foreign
    sorted_ids, block_expert = moe_align(ids, num_experts=6, block_m=4)
    tk = ids.numel()
    # expert 0: assignments 1, 5; expert 2: 0, 2, 4, 7; expert 5: 3 -> 3 blocks of 4
    assert block_expert.tolist()[:3] == [0, 2, 5] and all(
        b == -1 for b in block_expert.tolist()[3:]
    )
    assert sorted_ids[:12].tolist() == [1, 5, tk, tk, 0, 2, 4, 7, 3, tk, tk, tk]
    assert (sorted_ids[12:] == tk).all()


@pytest.mark.parametrize("t", [1, 19])
def test_fused_moe_bf16(t, monkeypatch):
    # Expert 3 gets no tokens; 19 tokens x top-3 is not a multiple of the 16-row block. The
    # aligned kernels at 1 token too: MOERAY_FUSED_MOE_GEMV=0 keeps them below the moe_gemv bound
    # (test_moe_gemv.py tests moe_gemv and the dispatch).
    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV", "0")
    x, w13, w2, ids, wts = _case(t, h=96, i=80, e=6, k=3, seed=t, skip_experts=(3,))
    out = fused_moe(x, w13, w2, ids, wts)
    ref = fused_moe_ref(x, w13, w2, ids, wts)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert _rel(out, ref) < 2e-2  # h and y_tk are rounded to bf16 (the interpreter truncates)


@pytest.mark.parametrize("fp8_weights", [False, True])
def test_masked_and_unmasked_padding_rows_give_the_same_bits(fp8_weights, monkeypatch):
    """MASK_ROWS (decode tiles mask their padding rows' activation loads; prefill tiles let them
    read token 0's row): padding rows are never stored, so both give the same output bits, at a
    ragged K (bf16: H 100, I 72 in 32-wide K blocks) and with FP8 scales."""
    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV", "0")
    h, i = (256, 128) if fp8_weights else (100, 72)
    x, w13, w2, ids, wts = _case(7, h=h, i=i, e=5, k=2, seed=21, skip_experts=(4,))
    kw = {}
    if fp8_weights:
        w13, w2, kw = _fp8_experts(w13, w2)
    bk = 128 if fp8_weights else 32
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=bk, num_warps=4, num_stages=1)
    outs = [fused_moe(x, w13, w2, ids, wts, **kw, config=dict(cfg, MASK_ROWS=m)) for m in (0, 1)]
    assert torch.equal(outs[0], outs[1])
    assert _rel(outs[1], fused_moe_ref(x, w13, w2, ids, wts, **kw)) < 2e-2


def test_fused_moe_foreign_experts_skipped():
    x, w13, w2, ids, wts = _case(10, h=64, i=48, e=4, k=2, seed=5, foreign=True)
    out = fused_moe(x, w13, w2, ids, wts)
    ref = fused_moe_ref(x, w13, w2, ids, wts)
    assert _rel(out, ref) < 2e-2  # h and y_tk are rounded to bf16 (the interpreter truncates)


def test_fused_moe_fp8():
    t, h, i, e, k = 11, 256, 128, 4, 2
    x, w13, w2, ids, wts = _case(t, h, i, e, k, seed=9, skip_experts=(1,))
    q13, q2, kw = _fp8_experts(w13, w2)
    out = fused_moe(x, q13, q2, ids, wts, **kw)
    ref = fused_moe_ref(x, q13, q2, ids, wts, **kw)
    assert _rel(out, ref) < 2e-2
    # and FP8 stays near the bf16 model (e4m3 weights and activations: a few percent)
    assert _rel(out, fused_moe_ref(x, w13, w2, ids, wts)) < 0.08


@pytest.mark.parametrize(
    "h, cfg",
    [
        (384, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)),  # one scale per tile, 2 K blocks/scale
        (256, dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=128)),  # wider than a block: column scales
    ],
)
def test_fused_moe_fp8_tiles(h, cfg):
    """The FP8 kernels' other tile cases equal the reference: K blocks shorter than a scale
    block, and tiles wider than a 128-row weight block (per-column scales, not ROW_SCALE). (A
    ragged last K block is bf16's: FP8 needs H and I in whole 128 blocks.)"""
    t, i, e, k = 9, 256, 3, 2
    x, w13, w2, ids, wts = _case(t, h, i, e, k, seed=h)
    q13, q2, kw = _fp8_experts(w13, w2)
    out = fused_moe(x, q13, q2, ids, wts, **kw, config=dict(cfg, num_warps=4, num_stages=1))
    assert _rel(out, fused_moe_ref(x, q13, q2, ids, wts, **kw)) < 2e-2


@pytest.mark.parametrize("fp8_weights", [False, True])
def test_down_launch_takes_its_own_tile(fp8_weights, monkeypatch):
    """A config's "down" entry sets the down launch's columns (its grid: cdiv(H, 64) column
    blocks, not gate/up's cdiv(H, 32)) and warps, and the output still equals the reference, with
    ROW_SCALE off in down (128 % 256) and on in gate/up for FP8."""
    h, i = 256, 128
    x, w13, w2, ids, wts = _case(9, h=h, i=i, e=3, k=2, seed=33)
    kw = {}
    if fp8_weights:
        w13, w2, kw = _fp8_experts(w13, w2)
    grids = []
    down_kernel = moe_mod._moe_down_kernel

    class Recorder:  # the down kernel, its launch grid written down
        def __getitem__(self, grid):
            grids.append(grid)
            return down_kernel[grid]

    monkeypatch.setattr(moe_mod, "_moe_down_kernel", Recorder())
    down_bn = 256 if fp8_weights else 64
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128 if fp8_weights else 32, num_warps=4)
    down = dict(BLOCK_N=down_bn, num_warps=2, num_stages=1)
    out = fused_moe(x, w13, w2, ids, wts, **kw, config=dict(cfg, num_stages=1, down=down))
    assert [g[0] for g in grids] == [h // down_bn]
    assert _rel(out, fused_moe_ref(x, w13, w2, ids, wts, **kw)) < 2e-2


@pytest.mark.parametrize("t", [3, 21])
def test_fp8_gate_up_quantizes_h_itself_at_128_columns(t, monkeypatch):
    """FP8 gate/up tiles of 128 columns write h as e4m3 with its 1x128 scales (no act_quant
    launch on h): the output has the bits of 64-column tiles + act_quant, at I = 384 (three
    groups), with the down launch's tile the same in both."""
    monkeypatch.setenv("MOERAY_FUSED_ALIGN_QUANT", "0")  # x's act_quant in its own launch too
    x, w13, w2, ids, wts = _case(t, h=256, i=384, e=4, k=2, seed=40 + t, skip_experts=(2,))
    q13, q2, kw = _fp8_experts(w13, w2)
    quantized = []
    act_quant = moe_mod.act_quant
    monkeypatch.setattr(moe_mod, "act_quant", lambda a: quantized.append(a.shape) or act_quant(a))
    down = dict(BLOCK_N=64, num_warps=4, num_stages=1)
    base = dict(BLOCK_M=16, BLOCK_K=128, num_warps=4, num_stages=1, down=down)
    want = fused_moe(x, q13, q2, ids, wts, **kw, config=dict(base, BLOCK_N=64))
    assert quantized == [x.shape, (t * 2, 384)]  # x, then h
    quantized.clear()
    got = fused_moe(x, q13, q2, ids, wts, **kw, config=dict(base, BLOCK_N=128))
    assert quantized == [x.shape]
    assert torch.equal(got, want)
    assert _rel(got, fused_moe_ref(x, q13, q2, ids, wts, **kw)) < 2e-2


@pytest.mark.parametrize("foreign", [False, True])
def test_fp8_x_quantized_in_the_alignment_launch(monkeypatch, foreign):
    """ALIGN_QUANT (the default): x's act_quant runs inside moe_align's launch
    (`moe_align_quant`); the fused MoE's output has the same bits as with
    MOERAY_FUSED_ALIGN_QUANT=0, and act_quant is left with h only; also where some ids name
    experts on other ranks (expert parallelism: outside [0, E), they add nothing)."""
    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV", "0")
    monkeypatch.setenv("MOERAY_FUSED_ALIGN_QUANT", "0")
    x, w13, w2, ids, wts = _case(
        13, h=256, i=128, e=5, k=2, seed=50, skip_experts=(3,), foreign=foreign
    )
    q13, q2, kw = _fp8_experts(w13, w2)
    quantized = []
    act_quant = moe_mod.act_quant
    monkeypatch.setattr(moe_mod, "act_quant", lambda a: quantized.append(a.shape) or act_quant(a))
    want = fused_moe(x, q13, q2, ids, wts, **kw)
    assert quantized == [x.shape, (26, 128)]
    quantized.clear()
    monkeypatch.delenv("MOERAY_FUSED_ALIGN_QUANT")
    assert torch.equal(fused_moe(x, q13, q2, ids, wts, **kw), want)
    assert quantized == [(26, 128)]
    if foreign:
        assert _rel(want, fused_moe_ref(x, q13, q2, ids, wts, **kw)) < 2e-2


def test_input_errors():
    x, w13, w2, ids, wts = _case(4, h=64, i=32, e=2, k=2, seed=1)
    with pytest.raises(ValueError, match="w2 has shape"):
        fused_moe(x, w13, w2[:, :, :16], ids, wts)
    with pytest.raises(ValueError, match="must both be"):
        fused_moe(x, w13, w2, ids, wts[:, :1])
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match=r"config \"down\" keys \['BLOCK_M'\]"):
        fused_moe(x, w13, w2, ids, wts, config=dict(cfg, down=dict(BLOCK_M=32)))
    with pytest.raises(ValueError, match="BLOCK_N=48"):
        fused_moe(x, w13, w2, ids, wts, config=dict(cfg, down=dict(BLOCK_N=48)))
    with pytest.raises(ValueError, match="FP8 weights need"):
        fused_moe(x, w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn), ids, wts)
    with pytest.raises(ValueError, match="expert_ids has dtype"):
        fused_moe(x, w13, w2, ids.float(), wts)


@pytest.mark.parametrize("moe_gemv", ["1", "0"])
def test_fused_moe_adds_the_shared_output_in_its_last_launch(moe_gemv, monkeypatch):
    """add_TH (the shared experts' output) summed in the final kernel: the same bits as adding it
    to the result afterwards, foreign ids included; a wrong shape or dtype is refused. 14
    assignments: moe_gemv's path, and the aligned one with MOERAY_FUSED_MOE_GEMV=0."""
    from moeray.kernels.moe import fused_moe_gate_up

    monkeypatch.setenv("MOERAY_FUSED_MOE_GEMV", moe_gemv)
    x, w13, w2, ids, wts = _case(7, h=64, i=48, e=4, k=2, seed=9, foreign=True)
    i = w13.shape[1] // 2
    args = (x, w13[:, :i], w13[:, i:], w2, ids, wts)
    shared = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert torch.equal(fused_moe_gate_up(*args, add_TH=shared), fused_moe_gate_up(*args) + shared)
    with pytest.raises(ValueError, match="add has shape"):
        fused_moe_gate_up(*args, add_TH=shared[:3])
    with pytest.raises(ValueError, match="add has dtype"):
        fused_moe_gate_up(*args, add_TH=shared.float())
