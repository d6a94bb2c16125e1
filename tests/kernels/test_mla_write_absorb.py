"""The write + pack kernel with the query's absorption folded in (moeray.kernels.mla_write_absorb)
against its PyTorch reference under the interpreter (on by default): the cache rows and
the rope part bit-equal to `mla_write_pack`'s, the latent query within one rounding of the fp32
sum, at odd shapes (heads, N and C not powers of 2, C in several partial blocks, B x S tokens up
to ABSORB_MAX_ROWS); past that, or unset, the absorption runs apart (head_matmul) and
mla_write_pack packs; MLA handing KernelPagedView its W_UK (the view `folds_w_uk`)."""

import pytest
import torch
from test_mla_write import _tiny_mla, _view

from moeray.kernels import mla_write as write_mod
from moeray.kernels import mla_write_absorb as absorb_mod
from moeray.kernels.mla_write_absorb import (
    ABSORB_MAX_ROWS,
    absorb_block_c,
    absorb_token_programs,
    mla_write_absorb,
    mla_write_absorb_applies,
    mla_write_absorb_ref,
)


@pytest.fixture(autouse=True)
def _nan_query(nan_empty):
    nan_empty(absorb_mod)  # a packed query value the kernel leaves unwritten stays NaN


@pytest.fixture
def wuk_on(monkeypatch):
    monkeypatch.delenv("MOERAY_FUSED_MLA_WUK", raising=False)  # the default: on


def _case(B, S, H, N, C, R, dtype, seed=0):
    """(cache, slots, kv, pe, q_nope, w_uk, q_pe, norm, rope): the cache rows to write NaN, q_nope
    a slice of the query projection's [B, S, H, N + R] rows, W_UK a slice of [H, N + V, C]."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(5, 4, C + R, generator=g).to(dtype)
    slots = torch.randperm(20, generator=g)[: B * S]
    cache.view(-1, C + R)[slots] = float("nan")
    kv = (3 * torch.randn(B, S, C, generator=g)).to(dtype)
    pe = torch.randn(B, S, C + R, generator=g).to(dtype)[..., C:]
    q = torch.randn(B, S, H, N + R, generator=g).to(dtype)
    w_uk = (torch.randn(H, N + 7, C, generator=g) / N**0.5).to(dtype)[:, :N]
    norm = ((1 + 0.1 * torch.randn(C, generator=g)).to(dtype), 1e-6)
    ang = torch.rand(B, S, R // 2, generator=g) * 100
    return cache, slots, kv, pe, q[..., :N], w_uk, q[..., N:], norm, (ang.cos(), ang.sin())


def _close_latent(got, want, dtype):
    """Within one rounding of the dtype (the fp32 sums run in another order)."""
    step = torch.finfo(dtype).eps * want.float().abs() + 1e-6
    return bool(((got.float() - want.float()).abs() <= step).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("B", "S", "H", "N", "C", "R"),
    # 1 token; 3 tokens of 3 sequences; 4 of 2 x 2 (the most). Under the interpreter (one "SM")
    # a program absorbs 64 latent columns: C = 40 is one partial block, C = 136 three, the last
    # partial; N = 24 pads to 32
    [(1, 1, 1, 8, 16, 2), (3, 1, 5, 24, 40, 6), (2, 2, 3, 24, 136, 4)],
)
def test_mla_write_absorb_equals_reference(wuk_on, launch_spy, dtype, B, S, H, N, C, R):
    cache, slots, kv, pe, q_nope, w_uk, q_pe, norm, rope = _case(B, S, H, N, C, R, dtype, B + H)
    ref_cache = cache.clone()
    grids = launch_spy(absorb_mod, "_mla_write_absorb_kernel")
    packs = launch_spy(write_mod, "_mla_write_pack_kernel")
    args = (kv, pe, q_nope, w_uk, q_pe)
    assert mla_write_absorb_applies(cache, *args, norm=norm, rope=rope)
    q = mla_write_absorb(cache, slots, *args, norm=norm, rope=rope)
    q_ref = mla_write_absorb_ref(ref_cache, slots, *args, norm=norm, rope=rope)
    assert grids == [(H, -(-C // 64), 1)] and packs == []  # (one "SM": tokens in a loop)
    assert q.is_contiguous() and q.shape == (B, S, H, C + R)
    assert torch.equal(q[..., C:], q_ref[..., C:])  # the rotated rope query: the same bits
    assert _close_latent(q[..., :C], q_ref[..., :C], dtype)
    # the cache rows: mla_write_pack's (rope key bit-equal, normed latent a rounding step away)
    assert torch.equal(cache[..., C:], ref_cache[..., C:])
    step = torch.finfo(dtype).eps * ref_cache[..., :C].float().abs() + torch.finfo(dtype).tiny
    ulps = 4 if dtype == torch.float32 else 2
    assert ((cache[..., :C].float() - ref_cache[..., :C].float()).abs() <= ulps * step).all()


def test_mla_write_absorb_without_norm_and_rope(wuk_on):
    """Plain copies: the cache rows bit-equal; the rope query copied, not rotated."""
    cache, slots, kv, pe, q_nope, w_uk, q_pe, _, _ = _case(2, 1, 3, 8, 20, 4, torch.float32)
    ref_cache = cache.clone()
    q = mla_write_absorb(cache, slots, kv, pe, q_nope, w_uk, q_pe)
    q_ref = mla_write_absorb_ref(ref_cache, slots, kv, pe, q_nope, w_uk, q_pe)
    assert torch.equal(cache, ref_cache) and torch.equal(q[..., 20:], q_pe)
    assert _close_latent(q[..., :20], q_ref[..., :20], torch.float32)


@pytest.mark.parametrize(("B", "S"), [(1, 2), (3, 1), (2, 2)])
def test_mla_write_absorb_per_token_programs_give_the_loops_bits(
    wuk_on, launch_spy, monkeypatch, B, S
):
    """A program per token (grid axis 2, `absorb_token_programs`) writes what one program
    looping over the tokens writes: the query and the cache rows, bit for bit."""
    H, N, C, R, dtype = 3, 24, 136, 4, torch.bfloat16
    case = _case(B, S, H, N, C, R, dtype, 7)
    cache, slots, kv, pe, q_nope, w_uk, q_pe, norm, rope = case
    grids = launch_spy(absorb_mod, "_mla_write_absorb_kernel")
    args = (slots, kv, pe, q_nope, w_uk, q_pe)
    loop_cache = cache.clone()
    q_loop = mla_write_absorb(loop_cache, *args, norm=norm, rope=rope)
    monkeypatch.setattr(absorb_mod, "absorb_token_programs", lambda p, t, sms: True)
    q = mla_write_absorb(cache, *args, norm=norm, rope=rope)
    assert grids == [(H, 3, 1), (H, 3, B * S)]
    assert torch.equal(q, q_loop) and torch.equal(cache.nan_to_num(), loop_cache.nan_to_num())
    assert not cache.view(-1, C + R)[slots].isnan().any()


def test_absorb_token_programs_rule(monkeypatch):
    """A program per token where the grid stays within 4 programs an SM (16 heads x 16 blocks x 2
    tokens on 132 SMs), one looping program at one token, at V3's 128 heads, and with the switch
    off; 8 programs an SM with MOERAY_FUSED_MLA_WUK_SPLIT_WIDE=1 (3-4 tokens at 16 heads)."""
    monkeypatch.delenv("MOERAY_FUSED_MLA_WUK_SPLIT", raising=False)
    monkeypatch.delenv("MOERAY_FUSED_MLA_WUK_SPLIT_WIDE", raising=False)
    assert absorb_token_programs(16 * 16, 2, 132) and not absorb_token_programs(16 * 16, 1, 132)
    assert not absorb_token_programs(128 * 8, 2, 132) and not absorb_token_programs(256, 4, 132)
    assert not absorb_token_programs(256, 3, 132)
    monkeypatch.setenv("MOERAY_FUSED_MLA_WUK_SPLIT_WIDE", "1")
    assert absorb_token_programs(256, 3, 132) and absorb_token_programs(256, 4, 132)
    assert not absorb_token_programs(256, 5, 132) and not absorb_token_programs(128 * 8, 2, 132)
    monkeypatch.setenv("MOERAY_FUSED_MLA_WUK_SPLIT", "0")
    assert not absorb_token_programs(16 * 16, 2, 132)


def test_absorb_block_keeps_two_programs_an_sm():
    assert absorb_block_c(16, 512, 132) == 32  # Moonlight on an H200: 256 programs
    assert absorb_block_c(128, 512, 132) == 64  # V3: 1,024
    assert absorb_block_c(33, 512, 132) == 64 and absorb_block_c(32, 512, 132) == 32


@pytest.mark.parametrize("why", ["off", "rows"])
def test_mla_write_absorb_declines_to_head_matmul_then_pack(monkeypatch, launch_spy, why):
    """MOERAY_FUSED_MLA_WUK=0, or past ABSORB_MAX_ROWS tokens: the absorption apart, then
    mla_write_pack's launch; the same result as the reference."""
    if why == "off":
        monkeypatch.setenv("MOERAY_FUSED_MLA_WUK", "0")
    else:
        monkeypatch.delenv("MOERAY_FUSED_MLA_WUK", raising=False)
    B = 1 if why == "off" else ABSORB_MAX_ROWS + 1
    cache, slots, kv, pe, q_nope, w_uk, q_pe, norm, rope = _case(B, 1, 3, 8, 20, 4, torch.float32)
    ref_cache = cache.clone()
    folds = launch_spy(absorb_mod, "_mla_write_absorb_kernel")
    packs = launch_spy(write_mod, "_mla_write_pack_kernel")
    args = (kv, pe, q_nope, w_uk, q_pe)
    assert not mla_write_absorb_applies(cache, *args, norm=norm, rope=rope)
    q = mla_write_absorb(cache, slots, *args, norm=norm, rope=rope)
    q_ref = mla_write_absorb_ref(ref_cache, slots, *args, norm=norm, rope=rope)
    assert folds == [] and len(packs) == 1
    assert _close_latent(q, q_ref, torch.float32)


def test_mla_write_absorb_rejects(wuk_on):
    cache, slots, kv, pe, q_nope, w_uk, q_pe, _, _ = _case(2, 1, 3, 8, 20, 4, torch.float32)
    with pytest.raises(ValueError, match=r"w_uk has shape \(3, 7, 20\)"):
        mla_write_absorb(cache, slots, kv, pe, q_nope, w_uk[:, :7], q_pe)
    with pytest.raises(ValueError, match="w_uk has dtype"):
        mla_write_absorb(cache, slots, kv, pe, q_nope, w_uk.bfloat16(), q_pe)
    with pytest.raises(ValueError, match="got kv"):  # a latent width (C) unlike W_UK's
        mla_write_absorb(cache, slots, kv[..., :19], pe, q_nope, w_uk, q_pe)
    with pytest.raises(ValueError, match="norm weight has 7"):
        mla_write_absorb(cache, slots, kv, pe, q_nope, w_uk, q_pe, norm=(torch.ones(7), 0.1))
    # W_UK with N contiguous (a transposed view) is not what the kernel reads
    n_major = w_uk.transpose(1, 2).contiguous().transpose(1, 2)
    assert not mla_write_absorb_applies(cache, kv, pe, q_nope, n_major, q_pe)
    assert mla_write_absorb_applies(cache, kv, pe, q_nope, w_uk, q_pe)


@pytest.mark.parametrize("on", [False, True])
def test_mla_hands_w_uk_to_the_view(monkeypatch, launch_spy, on):
    """A bf16 MLA layer of tiny() decoding 2 sequences x 2 tokens (4 rows) through KernelPagedView,
    which `folds_w_uk` (MLA passes q_nope and W_UK), against a view that does not (MLA absorbs):
    with MOERAY_FUSED_MLA_WUK=0 the same bits; by default the write launch absorbs (one per layer
    call, no separate pack), the layer's output within a few bf16 roundings."""
    monkeypatch.setenv("MOERAY_FUSED_MLA_WUK", "1" if on else "0")  # "1": as unset
    mla, x, cos, sin = _tiny_mla(torch.bfloat16)
    folds = launch_spy(absorb_mod, "_mla_write_absorb_kernel")
    results = []
    for folds_w_uk in (True, False):
        view, storage = _view(mla, torch.bfloat16)
        if not folds_w_uk:
            monkeypatch.setattr(view, "folds_w_uk", False)
        with torch.no_grad():
            results.append((mla(x, cos, sin, view), storage.kv_LPNK.clone()))
    assert len(folds) == (1 if on else 0)
    (out, cache), (out_ref, cache_ref) = results
    if on:
        torch.testing.assert_close(out.float(), out_ref.float(), rtol=2**-6, atol=1e-3)
        torch.testing.assert_close(cache.float(), cache_ref.float(), rtol=2**-7, atol=1e-6)
    else:
        assert torch.equal(out, out_ref) and torch.equal(cache, cache_ref)
