"""mla_decode_block (one persistent launch for a decode layer's MLA attention) under Triton's
interpreter: out and the cache rows equal the PyTorch reference at odd shapes (3 heads, hidden 48,
ragged pages, 1 and 3 tokens), the counters are left zero with no wait given up, and bad inputs
get a ValueError naming them. The GPU's many programs waiting on each other run in
tests/gpu/test_mla_block_gpu.py."""

import pytest
import torch

from moeray.kernels.bench.mla_block import block_case, mla_chain
from moeray.kernels.mla_block import (
    COUNTERS,
    GIVEN_UP,
    mla_decode_block,
    mla_decode_block_applies,
    mla_decode_block_ref,
)

PAGE = 16
SMALL = dict(H=3, N=16, R=16, V=16, C=64)  # 3 heads: the 16-head block masked


def _case(T: int, D: int = 48, fp8: bool = False, H: int = 3, q_lora: int = 0) -> dict:
    """Ragged lengths (5, 33, 17 cached tokens with the new one; then 32, a page boundary) on
    16-token pages."""
    lens = [5, 33, 17, 32][:T]
    dims = dict(SMALL, D=D, H=H)
    return block_case(T, lens, dims, device="cpu", page=PAGE, fp8=fp8, q_lora=q_lora)


@pytest.mark.parametrize(
    ("T", "D", "step_elems", "fp8", "H", "q_lora"),
    [
        (1, 48, 16384, False, 3, 0),
        (3, 40, 256, False, 3, 0),
        (2, 200, 256, True, 3, 0),
        (4, 32, 512, False, 17, 0),
        (2, 48, 256, False, 3, 40),
        (1, 200, 256, True, 3, 136),
    ],
)
def test_mla_decode_block_matches_the_reference(T, D, step_elems, fp8, H, q_lora, monkeypatch):
    """(3, 40, 256): the two GEMVs in 16-wide K steps, the last one ragged; (2, 200, 256, fp8):
    e4m3 q + kv_a (row blocks 0-1) and o_proj, K steps across 128-column scale blocks; (4, 32,
    512, 17 heads): the most tokens, a second 16-head block, a sequence ending on a page; q_lora:
    V3's query LoRA (q_a, its norm, q_b) at ranks 40 and 136 (FP8: q_b's scales over 2 blocks)."""
    from moeray.kernels import mla_block

    monkeypatch.setenv("MOERAY_FUSED_MLA_BLOCK", "1")
    monkeypatch.setattr(mla_block, "STEP_ELEMS", step_elems)
    kw = _case(T, D=D, fp8=fp8, H=H, q_lora=q_lora)
    ref_cache = kw["cache_PNK"].clone()
    want = mla_decode_block_ref(**{**kw, "cache_PNK": ref_cache})
    counters = torch.zeros(COUNTERS, dtype=torch.int32)
    assert mla_decode_block_applies(kw["x_TD"], kw["w"], kw["cache_PNK"])
    for _ in range(2):  # the second launch finds the counters the first one left
        got = mla_decode_block(**kw, counters=counters)
        assert counters.tolist() == [0] * COUNTERS
        torch.testing.assert_close(kw["cache_PNK"].float(), ref_cache.float(), rtol=0, atol=0)
        scale = want.float().abs().max()
        torch.testing.assert_close(got.float() / scale, want.float() / scale, rtol=0, atol=2e-2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the given-up stages read garbage
def test_mla_decode_block_counts_a_wait_it_gives_up(monkeypatch):
    """Two programs under the interpreter run one after the other: program 0's stage-1 task waits
    for stage-0 tiles that program 1 has not run yet, gives up after MAX_POLLS and counts it."""
    from moeray.kernels import mla_block

    monkeypatch.setattr(mla_block, "MAX_POLLS", 2)
    counters = torch.zeros(COUNTERS, dtype=torch.int32)
    mla_decode_block(**_case(1), counters=counters, programs=2)
    assert counters[GIVEN_UP] >= 1
    assert counters[:GIVEN_UP].tolist() == [0] * GIVEN_UP


def test_mla_decode_block_rejects_bad_inputs(monkeypatch):
    kw = _case(1)
    counters = torch.zeros(COUNTERS, dtype=torch.int32)
    w = kw["w"]
    bad = [
        (dict(x_TD=torch.zeros(5, 48, dtype=torch.bfloat16)), r"5 rows; .* takes 1\.\.4"),
        (dict(w=w._replace(w_o=torch.zeros(48, 40, dtype=torch.bfloat16))), r"w_o \(48, 40\)"),
        (dict(cos_TR2=torch.zeros(1, 4)), r"cos has shape \(1, 4\); expected \(1, 8\)"),
        (dict(w=w._replace(nope_dim=8)), "nope_dim 8"),
        (dict(seq_lens=torch.tensor([3, 4], dtype=torch.int32)), "seq_lens has 2 entries"),
    ]
    for change, words in bad:
        with pytest.raises(ValueError, match=words):
            mla_decode_block(**{**kw, **change}, counters=counters)
    fp8 = _case(1, fp8=True)
    w8 = fp8["w"]
    with pytest.raises(ValueError, match=r"w_qkv is e4m3: pass its block scales w_qkv_scale"):
        mla_decode_block(**{**fp8, "w": w8._replace(w_qkv_scale=None)}, counters=counters)
    with pytest.raises(ValueError, match=r"w_o_scale has shape \(1, 2\); expected \(1, 1\)"):
        mla_decode_block(**{**fp8, "w": w8._replace(w_o_scale=torch.ones(1, 2))}, counters=counters)
    with pytest.raises(ValueError, match="counters has 3 elements"):
        mla_decode_block(**kw, counters=torch.zeros(3, dtype=torch.int32))
    monkeypatch.delenv("MOERAY_FUSED_MLA_BLOCK", raising=False)
    assert not mla_decode_block_applies(kw["x_TD"], w, kw["cache_PNK"])  # opt-in


@pytest.mark.parametrize(("fp8", "q_lora"), [(False, 0), (True, 0), (False, 32), (True, 128)])
def test_mla_decode_block_matches_the_engines_launches(fp8, q_lora, monkeypatch):
    """Against the launches the engine runs for the same math (the bench's baseline `mla_chain`:
    linear or fp8_gemv, rms_norm and q_b for a q LoRA, head_matmul, mla_write_pack,
    mla_decode_multi), not only the reference."""
    monkeypatch.setenv("MOERAY_FUSED_MLA_BLOCK", "1")
    kw = block_case(2, 150, dict(SMALL, D=48), device="cpu", fp8=fp8, q_lora=q_lora)
    chain_cache = kw["cache_PNK"].clone()
    want = mla_chain(**{**kw, "cache_PNK": chain_cache})
    got = mla_decode_block(**kw, counters=torch.zeros(COUNTERS, dtype=torch.int32))
    # the new rows come from qkv, whose fp32 sums run in another order: a bf16 ulp or two
    torch.testing.assert_close(kw["cache_PNK"], chain_cache, rtol=1.6e-2, atol=1e-2)
    scale = want.float().abs().max()
    torch.testing.assert_close(got.float() / scale, want.float() / scale, rtol=0, atol=2e-2)


@pytest.mark.parametrize("delta", [False, True])
def test_mla_decode_block_norms_its_input_first(delta, monkeypatch):
    """With `norm`, x is the layer's un-normed input: the launch adds delta (the previous layer's
    deferred add) and norms it as rms_norm does, in its first stage; h = x + delta comes back."""
    monkeypatch.setenv("MOERAY_FUSED_MLA_BLOCK", "1")
    kw = _case(3)
    g = torch.Generator().manual_seed(5)
    D = kw["x_TD"].shape[1]
    norm = ((torch.rand(D, generator=g) + 0.5).to(torch.bfloat16), 1e-5)
    d = torch.randn(3, D, generator=g).to(torch.bfloat16) if delta else None
    ref_cache = kw["cache_PNK"].clone()
    want = mla_decode_block_ref(**{**kw, "cache_PNK": ref_cache}, norm=norm, delta_TD=d)
    h = torch.zeros(3, D, dtype=torch.bfloat16) if delta else None
    counters = torch.zeros(COUNTERS, dtype=torch.int32)
    got = mla_decode_block(**kw, counters=counters, norm=norm, delta_TD=d, h_TD=h)
    torch.testing.assert_close(kw["cache_PNK"].float(), ref_cache.float(), rtol=1.6e-2, atol=1e-2)
    scale = want.float().abs().max()
    torch.testing.assert_close(got.float() / scale, want.float() / scale, rtol=0, atol=2e-2)
    if d is not None:
        assert torch.equal(h, (kw["x_TD"].float() + d.float()).bfloat16())
    # not the normed-input call's numbers: the norm ran
    plain = mla_decode_block(**kw, counters=counters)
    assert (plain.float() - got.float()).abs().max() > 0.1 * scale
    with pytest.raises(ValueError, match="delta_TD needs h_TD"):
        mla_decode_block(**kw, counters=counters, norm=norm, delta_TD=torch.zeros_like(kw["x_TD"]))
    with pytest.raises(ValueError, match="pass norm too"):
        mla_decode_block(**kw, counters=counters, delta_TD=torch.zeros_like(kw["x_TD"]))


def test_bench_section_runs_every_case_on_the_cpu(monkeypatch):
    """`bench kernels --only mla_block`'s section end to end under the interpreter (small widths,
    the graph timer replaced by one call): a row per case with the block's error against the
    engine's launches and no wait given up, so a GPU call does not find a broken bench."""
    from moeray.kernels.bench import mla_block as bench

    small = dict(SMALL, D=48)
    monkeypatch.setenv("MOERAY_FUSED_MLA_BLOCK", "1")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "DIMS", {"moonlight": (small, 0), "v3": (small, 128)})
    monkeypatch.setattr(bench, "CASES", (("moonlight", 1, 40, False), ("v3", 2, 70, True)))
    monkeypatch.setattr(bench, "_copies", lambda nbytes: 2)
    times = iter([2.0, 1.0, 2.0, 1.0])

    def timed(fn):
        fn()
        return next(times)

    monkeypatch.setattr(bench, "_graph_ms", timed)
    rows = bench.bench_mla_block({"copy_TBps": 3.0})
    assert [r["shape"] for r in rows] == ["moonlight bf16 T=1 ctx=40", "v3 fp8 T=2 ctx=70"], rows
    for r in rows:
        assert r["speedup"] == 2.0 and r["waits_given_up"] == 0 and r["cooperative"], r
        assert r["max_rel_err_vs_chain"] < 2e-2, r
    assert len(bench.mla_block_records(rows)) == 2
