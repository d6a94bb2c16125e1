"""The MLA decode's merge with W_UV folded in (kernels/mla_merge.py `mla_merge_out`) compiled on the
GPU (marker gpu; skipped without CUDA), at Moonlight-16B-A3B (16 heads) and DeepSeek-V3 (128 heads)
widths, C = 512, V = 128, batch 1: against mla_merge (the same latent bits) and the per-head product
(within one bf16 rounding, nearly all bits equal), outputs NaN-poisoned first, eagerly and replayed
from a CUDA graph on new partials; and mla_decode with W_UV (by default; MOERAY_FUSED_MLA_WUV=0
keeps the GEMM): two launches (split, merge with W_UV), within a rounding of the unfused latent +
head_matmul; and the tiny model's greedy tokens through the engine (decode in CUDA graphs) with the
switch set and unset."""

import os

import pytest
import torch

from moeray.kernels import mla_decode as decode_mod
from moeray.kernels.head_gemv import head_matmul
from moeray.kernels.mla_decode import mla_decode
from moeray.kernels.mla_merge import mla_merge, mla_merge_out, mla_merge_out_ref
from tests.gpu.gemv_checks import captured, cuda_kernels, poison, tiny_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# fp32 Triton dots default to TF32 (the engine's other kernels): IEEE keeps fp32 paths comparable.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

HEADS = {"moonlight": 16, "v3": 128}
C, V, NOPE = 512, 128, 128
SPLITS, NS = 5, 8  # the partials' splits, padded to a power of two in the kernel


def _w_uv(h: int) -> torch.Tensor:
    """W_UV [H, 512, 128]: the K-contiguous transpose view of kv_b_proj's weight [H * 256, 512]
    as MLA passes it."""
    g = torch.Generator(device="cuda").manual_seed(h)
    kv_b = (torch.randn(h * (NOPE + V), C, device="cuda", generator=g) * C**-0.5).bfloat16()
    return kv_b.view(h, NOPE + V, C)[:, NOPE:].transpose(1, 2)


def _fill(o: torch.Tensor, lse: torch.Tensor, seed: int) -> None:
    """Split partials as the split kernel leaves them: split 2 of head 1 and all splits of head 3
    empty (lse -inf, output 0), the padding splits never written (NaN)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    o.copy_(torch.randn(o.shape, device="cuda", generator=g))
    lse.copy_(torch.randn(lse.shape, device="cuda", generator=g) * 3)
    o[:, :, SPLITS:] = float("nan")
    lse[:, :, SPLITS:] = float("nan")
    lse[0, 1, 2], lse[0, 3, :SPLITS] = float("-inf"), float("-inf")
    o[0, 1, 2], o[0, 3, :SPLITS] = 0.0, 0.0


def _check(o, lse, w, out, lse_out) -> None:
    """out, lse_out against mla_merge's latent and lse and that latent's per-head product."""
    lat = torch.empty(1, w.shape[0], C, device="cuda", dtype=torch.bfloat16)
    lse_lat = torch.empty(1, w.shape[0], device="cuda")
    mla_merge(o, lse, lat, lse_lat, SPLITS, NS)
    want = mla_merge_out_ref(lat, w)
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or NaN output"
    torch.testing.assert_close(
        out.float(), want.float(), rtol=2**-7, atol=1e-4 * want.float().abs().max().item()
    )
    assert (out == want).float().mean() > 0.99  # fp32 sums in another order: rare flips
    torch.testing.assert_close(lse_out, lse_lat, rtol=1e-6, atol=1e-6)
    assert lse_out[0, 3] == float("-inf") and not out[0, 3].any()


@pytest.mark.parametrize("fresh_w", [False, True])
@pytest.mark.parametrize("model", sorted(HEADS))
def test_merge_out_model_shapes(model, fresh_w):
    h = HEADS[model]
    w = _w_uv(h)
    o = torch.empty(1, h, NS, C, device="cuda")
    lse = torch.empty(1, h, NS, device="cuda")
    _fill(o, lse, seed=1)
    poison()
    out, lse_out = mla_merge_out(o, lse, w, torch.bfloat16, SPLITS, NS, fresh_w=fresh_w)
    _check(o, lse, w, out, lse_out)
    first = out.clone()
    graph, (out_g, lse_g) = captured(
        lambda: mla_merge_out(o, lse, w, torch.bfloat16, SPLITS, NS, fresh_w=fresh_w)
    )
    for seed in (2, 3):
        _fill(o, lse, seed)
        out_g.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(o, lse, w, out_g, lse_g)
    assert not torch.equal(out_g, first)  # the replay read the new partials


@pytest.mark.parametrize("model", sorted(HEADS))
def test_decode_with_w_uv_in_the_merge(model, monkeypatch):
    """Batch 1 over 300 cached tokens: by default the split kernel and the merge with W_UV, no
    GEMM; with MOERAY_FUSED_MLA_WUV=0 the latent and head_matmul (cuBLAS): within one bf16
    rounding."""
    h = HEADS[model]
    w = _w_uv(h)
    page, n = 64, 300
    g = torch.Generator(device="cuda").manual_seed(4)
    kv = torch.randn(8, page, C + 64, device="cuda", generator=g).bfloat16()
    table = torch.randperm(8, device="cuda", generator=g)[:6].view(1, 6).int()
    seq = torch.tensor([n], device="cuda", dtype=torch.int32)
    q = (torch.randn(1, h, C + 64, device="cuda", generator=g) * 0.3).bfloat16()

    def run():
        return mla_decode(q, kv, table, seq, 192**-0.5, w_out=w)

    monkeypatch.setenv("MOERAY_FUSED_MLA_WUV", "0")
    off = run()
    assert torch.equal(off, head_matmul(mla_decode(q, kv, table, seq, 192**-0.5), w))
    monkeypatch.delenv("MOERAY_FUSED_MLA_WUV", raising=False)
    poison()
    on = run()
    assert on.shape == (1, h, V) and torch.isfinite(on).all()
    torch.testing.assert_close(
        on.float(), off.float(), rtol=2**-7, atol=1e-4 * off.float().abs().max().item()
    )
    names = cuda_kernels(run)
    assert len(names) == 2 and "_mla_merge_out_kernel" in names[1], names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_greedy_unchanged_by_w_uv_in_the_merge(dtype, monkeypatch):
    monkeypatch.delenv("MOERAY_FUSED_MLA_WUV", raising=False)
    fused, n_fused = tiny_greedy(dtype, monkeypatch, decode_mod, "mla_merge_out")
    monkeypatch.setenv("MOERAY_FUSED_MLA_WUV", "0")
    plain, n_plain = tiny_greedy(dtype, monkeypatch, decode_mod, "mla_merge_out")
    assert n_fused > 0 and n_plain == 0, (n_fused, n_plain)  # decode rows (3) took the fold
    assert all(len(o) == 10 for o in fused)
    assert fused == plain
