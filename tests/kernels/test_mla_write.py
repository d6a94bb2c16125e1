"""The paged-cache write + query pack kernel (moeray.kernels.mla_write) against its PyTorch
reference under the interpreter: the same cache bits and packed query at odd shapes, on the
strided query latent the absorbed einsum returns, the packed query and the cache rows to write
NaN-poisoned first; the engine view's choice (KernelPagedView.attend) with and without it; MLA
handing the view its W_UV (MOERAY_FUSED_MLA_WUV=1: the attention's merge launch applies it)."""

import pytest
import torch

from moeray.kernels import mla_merge
from moeray.kernels import mla_write as write_mod
from moeray.kernels.mla_write import mla_write_pack, mla_write_pack_applies, mla_write_pack_ref
from moeray.platform.config import tiny
from moeray.platform.engine import paged_view as view_mod
from moeray.platform.engine.kv_cache import CacheShape, PagedKVStorage
from moeray.platform.model.mla import MLA
from moeray.platform.model.rope import RotaryEmbedding


@pytest.fixture(autouse=True)
def _nan_query(nan_empty):
    nan_empty(write_mod)  # a packed query value the kernel leaves unwritten stays NaN


def _case(B, S, H, C, R, dtype, pages=5, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(pages, N, C + R, generator=g).to(dtype)
    slots = torch.randperm(pages * N, generator=g)[: B * S]
    cache.view(-1, C + R)[slots] = float("nan")  # the rows to write: unwritten ones stay NaN
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


@pytest.mark.parametrize(("H", "blocks"), [(16, 2), (37, 5), (128, 16)])
def test_mla_write_pack_head_blocks(launch_spy, H, blocks):
    """At the real widths (C = 512, R = 64) the grid is (tokens, head blocks of 8): 2 a token at
    Moonlight's 16 heads, 16 at V3's 128, 5 at 37 (the last partial). Every block packs its own
    heads (NaN-poisoned query and cache rows: one left unwritten fails), rotated bit-equal to the
    reference, and the cache rows are the reference's."""
    B, S, C, R = 2, 2, 512, 64
    cache, slots, kv, pe, q_lat, q_pe = _case(B, S, H, C, R, torch.bfloat16, pages=2, N=4, seed=H)
    ang = torch.rand(B, S, R // 2, generator=torch.Generator().manual_seed(5)) * 100
    rope = (ang.cos(), ang.sin())
    ref_cache = cache.clone()
    grids = launch_spy(write_mod, "_mla_write_pack_kernel")
    q = mla_write_pack(cache, slots, kv, pe, q_lat, q_pe, rope=rope)
    q_ref = mla_write_pack_ref(ref_cache, slots, kv, pe, q_lat, q_pe, rope=rope)
    assert grids == [(B * S, blocks)]
    assert torch.equal(q, q_ref) and torch.equal(cache, ref_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("with_norm", "with_rope", "H", "C"),
    # 37 heads at the real latent width: 5 programs of 8 heads a token, the last one partial
    [(True, False, 5, 20), (False, True, 5, 20), (True, True, 5, 20), (True, True, 37, 512)],
)
def test_mla_write_pack_with_norm_and_rope(dtype, with_norm, with_rope, H, C):
    """The latent's RMSNorm and both rotations inside the launch: rotations and copies bit-equal to
    the reference, the normed latent within a rounding step of the dtype (its fp32 sum of squares
    runs in another order, as in moeray.kernels.norm); with several head blocks a token, each
    packs its own heads (rotated) and one writes the cache row."""
    B, S, R = 3, 2, 6
    cache, slots, kv, pe, q_lat, q_pe = _case(B, S, H, C, R, dtype, seed=11)
    g = torch.Generator().manual_seed(4)
    kv = kv * 3
    norm = ((1 + 0.1 * torch.randn(C, generator=g)).to(dtype), 1e-6) if with_norm else None
    ang = torch.rand(B, S, R // 2, generator=g) * 100
    rope = (ang.cos(), ang.sin()) if with_rope else None
    ref_cache = cache.clone()
    assert mla_write_pack_applies(cache, kv, pe, q_lat, q_pe, norm=norm, rope=rope)
    q = mla_write_pack(cache, slots, kv, pe, q_lat, q_pe, norm=norm, rope=rope)
    q_ref = mla_write_pack_ref(ref_cache, slots, kv, pe, q_lat, q_pe, norm=norm, rope=rope)
    assert torch.equal(q, q_ref)
    assert torch.equal(cache[..., C:], ref_cache[..., C:])
    got, want = cache[..., :C].float(), ref_cache[..., :C].float()
    step = torch.finfo(dtype).eps * want.abs() + torch.finfo(dtype).tiny
    ulps = 4 if dtype == torch.float32 else 2
    assert ((got - want).abs() <= ulps * step * 1.01).all()
    if with_rope:  # the rotation did something
        assert not torch.equal(q[..., C:], torch.cat([q_lat, q_pe], -1)[..., C:])


def test_mla_write_pack_rejects_and_declines():
    cache, slots, kv, pe, q_lat, q_pe = _case(2, 1, 3, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="got kv"):
        mla_write_pack(cache, slots[:1], kv, pe, q_lat, q_pe)
    with pytest.raises(ValueError, match="q_lat has dtype"):
        mla_write_pack(cache, slots, kv, pe, q_lat.bfloat16(), q_pe)
    # mixed dtypes (an FP8 or bf16 cache under fp32 activations) keep the reference's casts
    assert not mla_write_pack_applies(cache.bfloat16(), kv, pe, q_lat, q_pe)
    assert not mla_write_pack_applies(cache.to(torch.float8_e4m3fn), kv, pe, q_lat, q_pe)
    cos = torch.zeros(2, 1, 2)
    assert not mla_write_pack_applies(cache, kv, pe, q_lat, q_pe, rope=(cos.double(), cos))
    assert not mla_write_pack_applies(cache, kv, pe, q_lat, q_pe, norm=(torch.ones(8).half(), 0.1))
    with pytest.raises(ValueError, match="cos has shape"):
        mla_write_pack(cache, slots, kv, pe, q_lat, q_pe, rope=(cos[:, :, :1], cos[:, :, :1]))
    with pytest.raises(ValueError, match="norm weight has 7"):
        mla_write_pack(cache, slots, kv, pe, q_lat, q_pe, norm=(torch.ones(7), 0.1))


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
        view = view_mod.KernelPagedView(storage, table, torch.tensor([3, 5]), S)
        _, _, kv, pe, q_lat, q_pe = _case(B, S, H, C, R, torch.float32, seed=7)
        if not fused:
            monkeypatch.setattr(view_mod, "mla_write_pack_applies", lambda *a, **k: False)
        out = view.attend(1, q_lat, q_pe, kv, pe, 0.3)
        outs.append((out, storage.kv_LPNK.clone()))
    assert len(launches) == 1
    assert torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)


@pytest.mark.gpu
def test_mla_write_pack_compiled_on_gpu(compiled_check):
    # Bit-equal cache and query compiled on CUDA at Moonlight (16 heads) and V3 (128 heads) widths;
    # with the latent's norm and the rotations in the launch, the norm within a rounding step.
    compiled_check(
        """
import torch
from moeray.kernels.mla_write import mla_write_pack, mla_write_pack_applies, mla_write_pack_ref
from moeray.kernels.norm import rms_norm
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
        # the decode prologue: the latent's RMSNorm and both rotations in the same launch
        kv_raw = torch.randn(B, S, C + R, device="cuda").bfloat16() * 3
        w = (1 + 0.1 * torch.randn(C, device="cuda")).bfloat16()
        ang = torch.rand(B, S, R // 2, device="cuda") * 1000
        fused = dict(norm=(w, 1e-6), rope=(ang.cos(), ang.sin()))
        args = (slots, kv_raw[..., :C], kv_raw[..., C:], q_lat, q_pe)
        assert mla_write_pack_applies(cache, *args[1:], **fused)
        q = mla_write_pack(cache, *args, **fused)
        q_ref = mla_write_pack_ref(ref_cache, *args, **fused)
        got, want = cache[..., :C].float(), ref_cache[..., :C].float()
        step = 2 * torch.finfo(torch.bfloat16).eps * want.abs() + 1e-30
        ok = ok and torch.equal(q, q_ref) and torch.equal(cache[..., C:], ref_cache[..., C:])
        ok = ok and bool(((got - want).abs() <= step * 1.01).all())
        kernel_norm = rms_norm(kv_raw[..., :C], w, 1e-6)[0].reshape(-1, C)
        same = torch.equal(cache.view(-1, C + R)[slots.long(), :C], kernel_norm)
        bad += not ok
        print("H", H, "B", B, "S", S, "ok" if ok else "MISMATCH",
              "norm bits equal the rms_norm kernel's:", same)
print("RESULT PASS" if bad == 0 else f"RESULT FAIL {bad}")
""",
        "mla-write-gpu.log",
    )


STARTS = (3, 17)  # the 2 sequences' cached tokens before their 2 new ones


def _tiny_mla(dtype: torch.dtype):
    """An MLA layer of tiny() (weights normal(0, 0.1)) in `dtype` and its input: (mla,
    x [2, 2, D], cos, sin at positions STARTS[b] + s)."""
    cfg = tiny()
    torch.manual_seed(0)
    mla = MLA(cfg, 1)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(len(STARTS), 2, cfg.hidden_size).to(dtype)
    cos, sin = RotaryEmbedding(cfg)(torch.tensor(STARTS)[:, None] + torch.arange(2))
    return mla.to(dtype).eval(), x, cos, sin


def _view(mla, dtype: torch.dtype):
    """A KernelPagedView over a random cache in `dtype` for _tiny_mla's input: (view, storage)."""
    shape = CacheShape(num_layers=2, kv_lora_rank=mla.kv_lora_rank, rope_dim=8, page_size=16)
    storage = PagedKVStorage(shape, num_pages=6, dtype=dtype)
    storage.kv_LPNK.normal_(generator=torch.Generator().manual_seed(3))
    table = torch.tensor([[4, 1], [2, 0]], dtype=torch.int32)
    return view_mod.KernelPagedView(storage, table, torch.tensor(STARTS), 2), storage


@pytest.mark.parametrize("fused", [False, True])
def test_mla_hands_the_raw_latent_to_the_view(monkeypatch, launch_spy, fused):
    """An MLA layer of tiny() decoding through KernelPagedView.attend with the raw latent (the
    latent's norm and both rotations left to the view: one kernel launch when chosen, the
    interpreter standing in for CUDA; the model's own norm and rope otherwise) against a view that
    does not take it (MLA norms and rotates): the same output and the same cache."""
    from moeray.kernels.norm import rms_norm_applies
    from moeray.kernels.rope import rope_applies

    # W_UK and W_UV stay with MLA on both sides (test_mla_write_absorb.py folds W_UK into the
    # write, test_mla_hands_w_uv_to_the_view below W_UV into the merge)
    monkeypatch.setenv("MOERAY_FUSED_MLA_WUK", "0")
    monkeypatch.setenv("MOERAY_FUSED_MLA_WUV", "0")
    mla, x, cos, sin = _tiny_mla(torch.float32)
    launches = launch_spy(write_mod, "_mla_write_pack_kernel")
    view_ropes = []  # the view's own rotations: none when the kernel rotates
    real_rope = view_mod.apply_rope
    monkeypatch.setattr(view_mod, "apply_rope", lambda *a: view_ropes.append(1) or real_rope(*a))
    if fused:
        monkeypatch.setattr(view_mod, "use_fused_norm", lambda x, w: rms_norm_applies(x, w))
        monkeypatch.setattr(view_mod, "use_fused_rope", rope_applies)
    results = []
    for raw in (True, False):
        view, storage = _view(mla, torch.float32)
        if not raw:  # a view without takes_raw_latent: MLA norms and rotates, then calls attend
            view = _AttendOnly(view)
        with torch.no_grad():
            results.append((mla(x, cos, sin, view), storage.kv_LPNK.clone()))
    assert len(launches) == 2  # a write_pack each: with norm and rope (or plain after them), plain
    assert len(view_ropes) == (0 if fused else 2)
    (out, cache), (out_ref, cache_ref) = results
    if fused:  # the latent's norm sums its squares in another order: a rounding step or so
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cache, cache_ref, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(out, out_ref) and torch.equal(cache, cache_ref)


@pytest.mark.parametrize("on", [False, True])
def test_mla_hands_w_uv_to_the_view(monkeypatch, launch_spy, on):
    """A bf16 MLA layer of tiny() decoding 2 sequences x 2 tokens through KernelPagedView, which
    `folds_w_uv` (MLA passes W_UV and applies only o_proj), against a view that does not (MLA's
    own W_UV product): with MOERAY_FUSED_MLA_WUV=0, the same bits; with 1 (the default) the
    merge launch applies W_UV (one per layer call), its o_v within a bf16 rounding, the layer's
    output within a few."""
    monkeypatch.setenv("MOERAY_FUSED_MLA_WUV", "1" if on else "0")
    monkeypatch.setenv("MOERAY_FUSED_MLA_WUK", "0")  # the query absorbed by MLA on both sides
    mla, x, cos, sin = _tiny_mla(torch.bfloat16)
    folds = launch_spy(mla_merge, "_mla_merge_out_kernel")
    o_v = []  # o_proj's input
    real_o_proj = mla.o_proj.forward
    monkeypatch.setattr(mla.o_proj, "forward", lambda t: o_v.append(t) or real_o_proj(t))
    results = []
    for folds_w_uv in (True, False):
        view, _ = _view(mla, torch.bfloat16)
        if not folds_w_uv:
            monkeypatch.setattr(view, "folds_w_uv", False)
        with torch.no_grad():
            results.append(mla(x, cos, sin, view))
    assert len(folds) == (1 if on else 0)
    (out, out_ref), (ov, ov_ref) = results, o_v
    if on:
        torch.testing.assert_close(ov.float(), ov_ref.float(), rtol=2**-7, atol=1e-6)
        torch.testing.assert_close(out.float(), out_ref.float(), rtol=2**-6, atol=1e-3)
    else:
        assert torch.equal(ov, ov_ref) and torch.equal(out, out_ref)


class _AttendOnly:
    """A paged view whose `attend` takes normed, rotated inputs only (no `takes_raw_latent`)."""

    def __init__(self, view) -> None:
        self.view = view

    def attend(self, *args):
        return self.view.attend(*args)
