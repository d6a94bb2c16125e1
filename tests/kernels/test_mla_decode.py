"""Paged MLA decode (split-KV + LSE merge) vs the fp32 reference, under the interpreter."""

import pytest
import torch

from moeray.kernels.mla_decode import mla_decode, mla_decode_multi, mla_decode_ref


def _paged_case(seq_lens, heads, r, p, page, seed, s_q=1, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    b = len(seq_lens)
    max_pages = max(-(-n // page) for n in seq_lens) + 1  # one spare column: tables are padded
    num_pages = b * max_pages + 3
    kv = torch.randn(num_pages, page, r + p, generator=g).to(dtype)
    perm = torch.randperm(num_pages, generator=g)[: b * max_pages]  # scattered pages
    table = perm.reshape(b, max_pages).to(torch.int32)
    q = (torch.randn(b, s_q, heads, r + p, generator=g) * 0.5).to(dtype)
    return q, kv, table, torch.tensor(seq_lens, dtype=torch.int32)


def _rel(out, ref):
    assert not torch.isnan(out).any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_small_dims(num_splits):
    q, kv, table, lens = _paged_case([37, 1, 80, 16], heads=5, r=64, p=16, page=16, seed=1)
    scale = 0.3
    out, lse = mla_decode(
        q[:, 0], kv, table, lens, scale, kv_lora_rank=64, num_splits=num_splits, return_lse=True
    )
    ref, ref_lse = mla_decode_ref(q, kv, table, lens, scale, kv_lora_rank=64)
    assert out.shape == (4, 5, 64) and out.dtype == torch.bfloat16
    assert _rel(out, ref[:, 0]) < 1e-2
    torch.testing.assert_close(lse, ref_lse[:, 0], atol=2e-2, rtol=0)


@pytest.mark.parametrize("num_splits", [None, 5, 16])
def test_short_sequences_in_a_wide_block_table(num_splits):
    """As the engine's tables are: as wide as the longest sequence allowed (64 columns here), the
    sequences a few pages long, unused columns pointing at a scratch page. The splits share each
    sequence's own pages (5 splits over 1-5 pages, 16 over fewer), none reads past its length."""
    q, kv, table, lens = _paged_case([37, 1, 80, 16], heads=5, r=64, p=16, page=16, seed=4)
    scratch = min(set(range(kv.shape[0])) - set(table.flatten().tolist()))
    wide = torch.full((4, 64), scratch, dtype=torch.int32)
    wide[:, : table.shape[1]] = table
    kv[scratch] = 1e4  # a read of the scratch page would swamp the softmax
    out, lse = mla_decode(
        q[:, 0], kv, wide, lens, 0.3, kv_lora_rank=64, num_splits=num_splits, return_lse=True
    )
    ref, ref_lse = mla_decode_ref(q, kv, table, lens, 0.3, kv_lora_rank=64)
    assert _rel(out, ref[:, 0]) < 1e-2
    torch.testing.assert_close(lse, ref_lse[:, 0], atol=2e-2, rtol=0)


def test_decode_deepseek_dims():
    # 512 latent + 64 rope, 64-token pages; 17 heads spans two head blocks with a ragged second one.
    q, kv, table, lens = _paged_case([130, 64, 3], heads=17, r=512, p=64, page=64, seed=2)
    scale = (192) ** -0.5
    out = mla_decode(q[:, 0], kv, table, lens, scale, num_splits=2)
    ref, _ = mla_decode_ref(q, kv, table, lens, scale)
    assert _rel(out, ref[:, 0]) < 1e-2


def test_multi_token_causal():
    q, kv, table, lens = _paged_case([40, 21, 3], heads=3, r=32, p=16, page=16, seed=3, s_q=3)
    out, lse = mla_decode_multi(
        q, kv, table, lens, 0.25, kv_lora_rank=32, num_splits=2, return_lse=True
    )
    ref, ref_lse = mla_decode_ref(q, kv, table, lens, 0.25, kv_lora_rank=32)
    assert out.shape == (3, 3, 3, 32)
    assert _rel(out, ref) < 1e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)
    # Causality matters: the last query must differ from the first (it sees 2 more tokens).
    assert (out[:, 0] - out[:, 2]).abs().max() > 1e-2


def test_input_errors():
    q, kv, table, lens = _paged_case([20], heads=2, r=32, p=16, page=16, seed=4)
    with pytest.raises(ValueError, match="head dim"):
        mla_decode(q[:, 0, :, :40], kv, table, lens, 0.1, kv_lora_rank=32)
    with pytest.raises(ValueError, match="powers of 2"):
        mla_decode(q[:, 0], kv, table, lens, 0.1, kv_lora_rank=40)
    with pytest.raises(ValueError, match="block_table has dtype"):
        mla_decode(q[:, 0], kv, table.float(), lens, 0.1, kv_lora_rank=32)
    with pytest.raises(ValueError, match="batch mismatch"):
        mla_decode(
            q[:, 0], kv, table, torch.tensor([3, 4], dtype=torch.int32), 0.1, kv_lora_rank=32
        )
    with pytest.raises(ValueError, match="softmax_scale"):
        mla_decode(q[:, 0], kv, table, lens, -1.0, kv_lora_rank=32)


def test_tiny_model_dims_pad_to_dot_minimum():
    # tiny(): 32 latent + 8 rope dims. On a GPU tl.dot needs every dim >= 16, so the kernel pads
    # the rope block to 16 with masked loads; padding must not leak into scores or outputs.
    q, kv, table, lens = _paged_case([70, 5], heads=4, r=32, p=8, page=16, seed=4, s_q=2)
    out, lse = mla_decode_multi(
        q, kv, table, lens, 0.3, kv_lora_rank=32, num_splits=2, return_lse=True
    )
    ref, ref_lse = mla_decode_ref(q, kv, table, lens, 0.3, kv_lora_rank=32)
    assert out.shape == (2, 2, 4, 32)
    assert _rel(out, ref) < 1e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)


def test_decode_launch_by_batch_and_table_width():
    """The split kernel's launch (H200: 132 SMs): 16-row head blocks while the sequences alone
    would give 64-row blocks less than half a wave (V3's 128 heads up to batch 32), 64 past it;
    at least 8 splits (one page each on short tables), 4 pages a split on long ones, within one
    wave of program slots; values passed in are kept."""
    from moeray.kernels.mla_decode import decode_launch

    assert decode_launch(1, 128, 3, 132) == (16, 4, 3)  # V3 b1, 160 tokens: 8 x 3 programs
    assert decode_launch(1, 128, 17, 132) == (16, 4, 8)
    assert decode_launch(32, 128, 17, 132) == (16, 4, 1)  # 264 slots // 256 head blocks
    assert decode_launch(33, 128, 64, 132) == (64, 8, 2)  # 66 sequences x 2 blocks: half a wave
    assert decode_launch(64, 128, 64, 132) == (64, 8, 1)
    assert decode_launch(1, 16, 3, 132) == (16, 4, 3)  # Moonlight b1
    assert decode_launch(1, 16, 16, 132) == (16, 4, 8)  # 1,024 tokens: 2 pages a split
    assert decode_launch(1, 16, 64, 132) == (16, 4, 16)  # 4K: 4 pages a split
    assert decode_launch(64, 16, 64, 132) == (16, 4, 4)  # 264 // 64
    assert decode_launch(1, 128, 3, 132, block_h=64, num_warps=4, num_splits=2) == (64, 4, 2)


def test_decode_launch_wgmma_blocks_from_eight_sequences():
    """Where the wgmma kernels take 64-row blocks (`wgmma`), 64 from WGMMA_MIN_BLOCKS
    (sequence, block) pairs at 64+ rows (V3's 128 heads from 8 sequences, 128 x 2 MTP rows
    from 4) whatever the table's width; Moonlight's 16 / 32 rows and the Triton-only path keep
    the rule by half a wave."""
    from moeray.kernels.mla_launch import WGMMA_MIN_BLOCKS, decode_launch

    assert WGMMA_MIN_BLOCKS == 16
    assert decode_launch(7, 128, 16, 132, wgmma=True) == (16, 4, 4)  # 264 // 56
    assert decode_launch(8, 128, 16, 132, wgmma=True) == (64, 8, 8)  # 132 // 16
    assert decode_launch(8, 128, 2560, 132, wgmma=True) == (64, 8, 8)  # a graph's wide table
    assert decode_launch(1, 128, 512, 132, wgmma=True) == (16, 4, 33)  # 1 x 32K: 16-row
    assert decode_launch(4, 256, 64, 132, wgmma=True) == (64, 8, 8)  # 128 heads x 2 tokens
    assert decode_launch(8, 128, 16, 132) == (16, 4, 4)  # no wgmma kernels: from 33
    assert decode_launch(64, 32, 64, 132, wgmma=True) == (16, 4, 2)  # Moonlight MTP: 16-row
    assert decode_launch(8, 128, 64, 132, block_h=16, wgmma=True)[0] == 16  # kept


@pytest.mark.parametrize(
    ("env", "fits", "wide"),
    [({}, True, True), ({"MLA_WIDE": "0"}, True, False), ({"MLA_WGMMA": "0"}, True, False),
     ({}, False, False)],
)  # fmt: skip
def test_wgmma_block_rule_wiring(env, fits, wide, monkeypatch):
    """`decode_launch` hears that the wgmma kernels take 64-row blocks only where they fit and
    neither MLA_WIDE=0 nor MLA_WGMMA=0 is set."""
    from moeray.kernels import mla_decode as md
    from moeray.kernels import mla_launch

    for name in ("MLA_WIDE", "MLA_WGMMA"):
        monkeypatch.delenv(f"MOERAY_FUSED_{name}", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(f"MOERAY_FUSED_{name}", value)
    seen = []

    def spy(*args):
        seen.append(args[-1])
        return mla_launch.decode_launch(*args)

    monkeypatch.setattr(md, "decode_launch", spy)
    monkeypatch.setattr(md, "mla_decode_wgmma_fits", lambda *a: fits)
    monkeypatch.setattr(md, "mla_decode_ws_split", lambda *a: None)  # (partials unused here)
    q, kv, table, lens = _paged_case([150, 64], heads=8, r=64, p=16, page=16, seed=2)
    mla_decode_multi(q, kv, table, lens, 0.5, kv_lora_rank=64)
    assert seen == [wide]


@pytest.mark.parametrize(("wgmma", "ws"), [(None, None), ("1", "0"), ("0", None)])
def test_wgmma_split_takes_the_partials(wgmma, ws, monkeypatch):
    """Where the wgmma kernels fit (faked here: they are sm_90 only; their numbers are
    tests/gpu/test_mla_wgmma_gpu.py's), by default the warp-specialized one, with
    MOERAY_FUSED_MLA_WS=0 the plain one (given the stages), writes the split partials the merge
    reads, given the log2-unit scale, the heads, tokens and splits; with MLA_WGMMA=0 the Triton
    split kernel runs."""
    from moeray.kernels import mla_decode as md

    calls = []

    def fake(name):
        def split(q, kv, table, lens, o, lse, scale_log2, heads, q_len, splits, *stages):
            calls.append((name, tuple(o.shape), tuple(lse.shape), round(scale_log2, 6)))
            calls.append((heads, q_len, splits, *stages))
            o.fill_(1.0)
            lse.fill_(0.0)

        return split

    for name, value in (("MLA_WGMMA", wgmma), ("MLA_WS", ws)):
        if value is None:
            monkeypatch.delenv(f"MOERAY_FUSED_{name}", raising=False)
        else:
            monkeypatch.setenv(f"MOERAY_FUSED_{name}", value)
    monkeypatch.setattr(md, "mla_decode_wgmma_fits", lambda *a: True)
    monkeypatch.setattr(md, "mla_decode_wgmma_split", fake("wgmma"))
    monkeypatch.setattr(md, "mla_decode_ws_split", fake("ws"))
    q, kv, table, lens = _paged_case([130, 64, 3], heads=8, r=64, p=16, page=16, seed=5, s_q=2)
    out = mla_decode_multi(q, kv, table, lens, 0.5, kv_lora_rank=64, num_splits=3, num_stages=3)
    scale = round(0.5 * md.LOG2E, 6)
    if wgmma != "0":
        name, stages = ("wgmma", (3,)) if ws == "0" else ("ws", ())
        assert calls == [(name, (3, 16, 3, 64), (3, 16, 3), scale), (8, 2, 3, *stages)]
        assert torch.equal(out, torch.ones_like(out))  # the merge of the fake's partials
    else:
        ref, _ = mla_decode_ref(q, kv, table, lens, 0.5, kv_lora_rank=64)
        assert not calls and _rel(out, ref) < 1e-2


@pytest.mark.parametrize(("s_q", "num_splits"), [(1, None), (2, 3), (1, 2), (1, 16)])
def test_half_page_splits_match_the_reference(s_q, num_splits, monkeypatch):
    """MOERAY_FUSED_MLA_SUBPAGE=1: the Triton split kernel walks 16-token halves of 32-token pages
    for the sequences with fewer pages than splits (at 2 and 3 splits some sequences take halves,
    others whole pages, in one launch; 16 splits over at most 6 halves): within the fp32
    reference's bound, the wide table's unused columns (a poisoned scratch page) never read; the
    rule (no halves without the switch, or for 16-token pages)."""
    from moeray.kernels.mla_launch import mla_subpage

    q, kv, table, lens = _paged_case([37, 2, 80, 16, 33], heads=5, r=64, p=16, page=32, seed=9,
                                     s_q=s_q)  # fmt: skip
    scratch = min(set(range(kv.shape[0])) - set(table.flatten().tolist()))
    wide = torch.full((5, 12), scratch, dtype=torch.int32)
    wide[:, : table.shape[1]] = table
    kv[scratch] = 1e4  # a read of the scratch page would swamp the softmax
    kw = dict(kv_lora_rank=64, num_splits=num_splits, return_lse=True)
    monkeypatch.setenv("MOERAY_FUSED_MLA_SUBPAGE", "1")
    out, lse = mla_decode_multi(q, kv, wide, lens, 0.3, **kw)
    ref, ref_lse = mla_decode_ref(q, kv, table, lens, 0.3, kv_lora_rank=64)
    assert _rel(out, ref) < 1e-2
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)
    assert mla_subpage(32) and mla_subpage(64) and not mla_subpage(16)
    monkeypatch.setenv("MOERAY_FUSED_MLA_SUBPAGE", "0")
    assert mla_subpage(64) is False
