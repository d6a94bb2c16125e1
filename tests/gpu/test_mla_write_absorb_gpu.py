"""The write + pack launch with the query's absorption folded in (kernels/mla_write_absorb.py, on
unless MOERAY_FUSED_MLA_WUK=0) compiled on the GPU (marker gpu; skipped without CUDA) at
Moonlight-16B-A3B (16 heads) and DeepSeek-V3 (128 heads) widths, N = 128, C = 512, R = 64, 1 and 4
tokens, W_UK read before the PDL wait and after it (`fresh_w`): one CUDA kernel, the rope query and
the cache rows equal to mla_write_pack's, the latent query within a bf16 rounding of the fp32
product (output NaN-poisoned first); replayed from a CUDA graph on a new query; and the tiny
model's greedy tokens through the engine with the switch on and off."""

import pytest
import torch

from moeray.kernels import mla_write_absorb as absorb_mod
from moeray.kernels.mla_write_absorb import mla_write_absorb, mla_write_absorb_ref
from moeray.platform.engine import paged_view as view_mod
from tests.gpu.gemv_checks import captured, cuda_kernels, poison, tiny_greedy, within_rounding

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

HEADS = {"moonlight": 16, "v3": 128}
N, C, R, V = 128, 512, 64, 128


def _inputs(h: int, rows: int, seed: int):
    """(cache, slots, kv, pe, q_nope, w_uk, q_pe, norm, rope) as the engine passes them: q_nope and
    q_pe slices of the query projection's rows, W_UK the [H, N, C] slice of kv_b_proj's weight."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf = "cuda", torch.bfloat16
    cache = torch.randn(16, 64, C + R, device=dev, generator=g).to(bf)
    slots = torch.randperm(16 * 64, device=dev, generator=g)[:rows]
    kv = torch.randn(rows, 1, C + R, device=dev, generator=g).to(bf) * 3
    q = torch.randn(rows, 1, h, N + R, device=dev, generator=g).to(bf)
    kv_b = (torch.randn(h * (N + V), C, device=dev, generator=g) * N**-0.5).to(bf)
    w_uk = kv_b.view(h, N + V, C)[:, :N]
    norm = ((1 + 0.1 * torch.randn(C, device=dev, generator=g)).to(bf), 1e-6)
    ang = torch.rand(rows, 1, R // 2, device=dev, generator=g) * 1000
    return (
        cache,
        slots,
        kv[..., :C],
        kv[..., C:],
        q[..., :N],
        w_uk,
        q[..., N:],
        norm,
        (
            ang.cos(),
            ang.sin(),
        ),
    )


def _check(q, cache, q_ref, ref_cache, q_nope, w_uk) -> None:
    """The rope query bit-equal; the latent query within one rounding of the fp32 product (not
    of q_ref's bf16 latent: two roundings of nearly equal sums may differ by a whole ulp)."""
    assert torch.equal(q[..., C:], q_ref[..., C:])
    within_rounding(q[..., :C], torch.einsum("bshn,hnc->bshc", q_nope.float(), w_uk.float()))
    assert torch.equal(cache[..., C:], ref_cache[..., C:])
    got, want = cache[..., :C].float(), ref_cache[..., :C].float()
    assert ((got - want).abs() <= 2 * torch.finfo(torch.bfloat16).eps * want.abs() + 1e-30).all()


@pytest.mark.parametrize("fresh_w", [False, True])
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("model", sorted(HEADS))
def test_absorb_at_model_shapes(model, rows, fresh_w, monkeypatch):
    monkeypatch.setenv("MOERAY_FUSED_MLA_WUK", "1")
    cache, slots, kv, pe, q_nope, w_uk, q_pe, norm, rope = _inputs(HEADS[model], rows, seed=rows)
    ref_cache = cache.clone()
    fused = dict(norm=norm, rope=rope)

    def run():
        return mla_write_absorb(cache, slots, kv, pe, q_nope, w_uk, q_pe, **fused, fresh_w=fresh_w)

    poison()
    q = run()
    q_ref = mla_write_absorb_ref(ref_cache, slots, kv, pe, q_nope, w_uk, q_pe, **fused)
    _check(q, cache, q_ref, ref_cache, q_nope, w_uk)
    names = cuda_kernels(run)
    assert len(names) == 1 and "_mla_write_absorb_kernel" in names[0], names
    graph, q_g = captured(run)
    q_nope.copy_(torch.randn_like(q_nope))
    q_g.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    q_ref = mla_write_absorb_ref(ref_cache, slots, kv, pe, q_nope, w_uk, q_pe, **fused)
    _check(q_g, cache, q_ref, ref_cache, q_nope, w_uk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_greedy_unchanged_by_absorbing_in_the_write(dtype, monkeypatch):
    def greedy(switch: str) -> tuple[list[list[int]], int]:
        """Greedy tokens with MLA_WUK set to `switch`, and the write launches that absorbed the
        query (the view calls mla_write_absorb either way; it runs its kernel where it applies)."""
        monkeypatch.setenv("MOERAY_FUSED_MLA_WUK", switch)
        ran, real = [], absorb_mod.mla_write_absorb_applies
        monkeypatch.setattr(
            absorb_mod,
            "mla_write_absorb_applies",
            lambda *a, **kw: ran.append(real(*a, **kw)) or ran[-1],
        )
        tokens, _ = tiny_greedy(dtype, monkeypatch, view_mod, "mla_write_absorb")
        return tokens, sum(ran)

    fused, n_fused = greedy("1")
    plain, n_plain = greedy("0")
    assert n_fused > 0 and n_plain == 0, (n_fused, n_plain)  # decode rows (3) took the fold
    assert all(len(o) == 10 for o in fused)
    assert fused == plain
