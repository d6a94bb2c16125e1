"""The paged-cache write + query pack kernel (moeray.kernels.mla_write) against its PyTorch
reference under the interpreter: the same cache bits and packed query at odd shapes, on the
strided query latent the absorbed einsum returns; the engine view's choice (KernelPagedView.attend)
with and without it."""

import pytest
import torch

from moeray.kernels import mla_write as write_mod
from moeray.kernels.mla_write import mla_write_pack, mla_write_pack_applies, mla_write_pack_ref
from moeray.platform.engine import runner as runner_mod
from moeray.platform.engine.kv_cache import CacheShape, PagedKVStorage


def _case(B, S, H, C, R, dtype, pages=5, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(pages, N, C + R, generator=g).to(dtype)
    slots = torch.randperm(pages * N, generator=g)[: B * S]
    kv = torch.randn(B, S, C, generator=g).to(dtype)
    pe = torch.randn(B, S, C + R, generator=g).to(dtype)[..., C:]  # a slice of a wider row
    # the einsum's output layout: [H, B*S, C] permuted to [B, S, H, C]
    q_lat = torch.randn(H, B * S, C, generator=g).to(dtype).view(H, B, S, C).permute(1, 2, 0, 3)
    q_pe = torch.randn(B, S, H, R, generator=g).to(dtype)
    return cache, slots, kv, pe, q_lat, q_pe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("B", "S", "H", "C", "R"), [(1, 1, 1, 4, 2), (3, 2, 5, 20, 6), (2, 1, 16, 64, 16)]
)
def test_mla_write_pack_equals_reference(dtype, B, S, H, C, R):
    cache, slots, kv, pe, q_lat, q_pe = _case(B, S, H, C, R, dtype, seed=B + H)
    ref_cache = cache.clone()
    assert mla_write_pack_applies(cache, kv, pe, q_lat, q_pe)
    q = mla_write_pack(cache, slots, kv, pe, q_lat, q_pe)
    q_ref = mla_write_pack_ref(ref_cache, slots, kv, pe, q_lat, q_pe)
    assert q.is_contiguous() and q.shape == (B, S, H, C + R)
    assert torch.equal(q, q_ref) and torch.equal(cache, ref_cache)


def test_mla_write_pack_rejects_and_declines():
    cache, slots, kv, pe, q_lat, q_pe = _case(2, 1, 3, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="got kv"):
        mla_write_pack(cache, slots[:1], kv, pe, q_lat, q_pe)
    with pytest.raises(ValueError, match="q_lat has dtype"):
        mla_write_pack(cache, slots, kv, pe, q_lat.bfloat16(), q_pe)
    # mixed dtypes (an FP8 or bf16 cache under fp32 activations) keep the reference's casts
    assert not mla_write_pack_applies(cache.bfloat16(), kv, pe, q_lat, q_pe)
    assert not mla_write_pack_applies(cache.to(torch.float8_e4m3fn), kv, pe, q_lat, q_pe)


def test_kernel_view_attend_same_with_and_without_fused_write(monkeypatch, launch_spy):
    """KernelPagedView.attend through the kernel (interpreter) and through index_put + cat: the same
    output and the same cache."""
    B, S, H, C, R, N = 2, 2, 3, 16, 8, 16
    shape = CacheShape(num_layers=2, kv_lora_rank=C, rope_dim=R, page_size=N)
    outs = []
    launches = launch_spy(write_mod, "_mla_write_pack_kernel")
    for fused in (True, False):
        storage = PagedKVStorage(shape, num_pages=6, dtype=torch.float32)
        g = torch.Generator().manual_seed(3)
        storage.kv_LPNK.copy_(torch.randn(storage.kv_LPNK.shape, generator=g))
        table = torch.tensor([[4, 1], [2, 0]], dtype=torch.int32)
        view = runner_mod.KernelPagedView(storage, table, torch.tensor([3, 5]), S)
        _, _, kv, pe, q_lat, q_pe = _case(B, S, H, C, R, torch.float32, seed=7)
        if not fused:
            monkeypatch.setattr(runner_mod, "mla_write_pack_applies", lambda *a: False)
        out = view.attend(1, q_lat, q_pe, kv, pe, 0.3)
        outs.append((out, storage.kv_LPNK.clone()))
    assert len(launches) == 1
    assert torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)


@pytest.mark.gpu
def test_mla_write_pack_compiled_on_gpu(compiled_check):
    # Bit-equal cache and query compiled on CUDA at Moonlight (16 heads) and V3 (128 heads) widths.
    compiled_check(
        """
import torch
from moeray.kernels.mla_write import mla_write_pack, mla_write_pack_applies, mla_write_pack_ref
bad = 0
for H in (16, 128, 3):
    for B, S in ((1, 1), (64, 1), (5, 2)):
        C, R = 512, 64
        cache = torch.randn(40, 64, C + R, device="cuda").bfloat16()
        slots = torch.randperm(40 * 64, device="cuda")[: B * S]
        kv = torch.randn(B, S, C, device="cuda").bfloat16()
        pe = torch.randn(B, S, R, device="cuda").bfloat16()
        q_lat = torch.randn(H, B, S, C, device="cuda").bfloat16().permute(1, 2, 0, 3)
        q_pe = torch.randn(B, S, H, R, device="cuda").bfloat16()
        assert mla_write_pack_applies(cache, kv, pe, q_lat, q_pe)
        ref_cache = cache.clone()
        q = mla_write_pack(cache, slots, kv, pe, q_lat, q_pe)
        q_ref = mla_write_pack_ref(ref_cache, slots, kv, pe, q_lat, q_pe)
        ok = torch.equal(q, q_ref) and torch.equal(cache, ref_cache)
        bad += not ok
        if not ok:
            print("MISMATCH", H, B, S)
print("RESULT PASS" if bad == 0 else f"RESULT FAIL {bad}")
""",
        "mla-write-gpu.log",
    )
