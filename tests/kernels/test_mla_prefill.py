"""MLA prefill (causal, packed variable lengths, 2-part qk head, narrower v) vs the fp32 reference,
under the Triton interpreter."""

import pytest
import torch

from moeray.kernels.mla_prefill import mla_prefill, mla_prefill_bshd, mla_prefill_ref


def _case(lens, heads, n, r, v, seed, dtype=torch.float32, shared_pe=True):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q_nope, q_pe = rnd(t, heads, n), rnd(t, heads, r)
    k_nope, v_ = rnd(t, heads, n), rnd(t, heads, v)
    k_pe = rnd(t, r) if shared_pe else rnd(t, heads, r)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q_nope, q_pe, k_nope, k_pe, v_, cu


def _rel(out, ref):
    assert not torch.isnan(out).any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("shared_pe", [True, False])
def test_odd_lengths_match_reference(shared_pe):
    # Lengths straddle the 16-row blocks (1, 15, 16, 17, 50) and include an empty sequence.
    lens = [17, 1, 0, 50, 16, 15]
    q_nope, q_pe, k_nope, k_pe, v, cu = _case(
        lens, heads=3, n=32, r=16, v=16, seed=0, shared_pe=shared_pe
    )
    scale = 0.2
    out, lse = mla_prefill(q_nope, q_pe, k_nope, k_pe, v, cu, scale, return_lse=True)
    ref, ref_lse = mla_prefill_ref(q_nope, q_pe, k_nope, k_pe, v, cu, scale)
    assert out.shape == (sum(lens), 3, 16)
    assert _rel(out, ref) < 1e-5
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=0)


def test_blocks_of_unequal_size_and_bf16():
    # BLOCK_M = 32 over BLOCK_N = 16: two diagonal key blocks per query block.
    lens = [70, 33, 5]
    q_nope, q_pe, k_nope, k_pe, v, cu = _case(
        lens, heads=2, n=16, r=16, v=32, seed=1, dtype=torch.bfloat16
    )
    cfg = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    out = mla_prefill(q_nope, q_pe, k_nope, k_pe, v, cu, 0.25, config=cfg)
    ref, _ = mla_prefill_ref(q_nope, q_pe, k_nope, k_pe, v, cu, 0.25)
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) < 1e-2


def test_causality_and_packing_matter():
    # The kernel must not see the future or the neighbouring sequence: changing token 30 (the first
    # of sequence 2) changes no output of sequence 1 and only rows >= 30 of sequence 2.
    lens = [30, 20]
    q_nope, q_pe, k_nope, k_pe, v, cu = _case(lens, heads=2, n=16, r=16, v=16, seed=2)
    out = mla_prefill(q_nope, q_pe, k_nope, k_pe, v, cu, 0.3)
    k_nope2, v2 = k_nope.clone(), v.clone()
    k_nope2[35] += 3.0
    v2[35] -= 2.0
    out2 = mla_prefill(q_nope, q_pe, k_nope2, k_pe, v2, cu, 0.3)
    assert torch.equal(out[:35], out2[:35])
    assert (out[35:] - out2[35:]).abs().amax(-1).amin() > 1e-4


def test_deepseek_head_dims_and_bshd_views():
    # 128 + 64 qk, 128 v, k_nope and v as the two halves of one projection (strided views).
    b, s, h = 2, 19, 2
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, s, h, 192, generator=g)
    kv = torch.randn(b, s, h, 256, generator=g)
    pe = torch.randn(b, s, 64, generator=g)
    q_nope, q_pe = q.split([128, 64], -1)
    k_nope, v = kv.split([128, 128], -1)
    scale = 192**-0.5
    out = mla_prefill_bshd(q_nope, q_pe, k_nope, pe, v, scale)
    kk = torch.cat([k_nope, pe[:, :, None].expand(b, s, h, 64)], -1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), kk.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
    ).transpose(1, 2)
    assert out.shape == (b, s, h, 128)
    assert _rel(out, ref) < 1e-5


def test_input_errors():
    q_nope, q_pe, k_nope, k_pe, v, cu = _case([5], heads=2, n=16, r=16, v=16, seed=4)
    with pytest.raises(ValueError, match="k_nope has shape"):
        mla_prefill(q_nope, q_pe, k_nope[:, :, :8], k_pe, v, cu, 0.1)
    with pytest.raises(ValueError, match="power of 2"):
        mla_prefill(q_nope[..., :12], q_pe, k_nope[..., :12], k_pe, v, cu, 0.1)
    with pytest.raises(ValueError, match="softmax_scale"):
        mla_prefill(q_nope, q_pe, k_nope, k_pe, v, cu, 0.0)
    with pytest.raises(ValueError, match="dtype"):
        mla_prefill(q_nope, q_pe, k_nope, k_pe, v.double(), cu, 0.1)
    with pytest.raises(ValueError, match="multiple of BLOCK_N"):
        mla_prefill(
            q_nope,
            q_pe,
            k_nope,
            k_pe,
            v,
            cu,
            0.1,
            config=dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
        )


def test_supported_only_for_cuda_pow2_no_grad():
    from moeray.kernels.mla_prefill import mla_prefill_supported

    q_nope, q_pe, k_nope, k_pe, v, _ = _case([4], heads=2, n=16, r=16, v=16, seed=5)
    assert not mla_prefill_supported(
        q_nope, q_pe, k_nope, k_pe, v
    )  # CPU tensors: the caller's own path
    if torch.cuda.is_available():
        c = [t.cuda() for t in (q_nope, q_pe, k_nope, k_pe, v)]
        assert mla_prefill_supported(*c)
        assert not mla_prefill_supported(
            c[0], c[1][..., :8], c[2], c[3][..., :8], c[4]
        )  # rope dim 8
        with torch.enable_grad():
            assert not mla_prefill_supported(c[0].requires_grad_(), *c[1:])
