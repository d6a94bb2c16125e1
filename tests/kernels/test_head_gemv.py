"""head_gemv (MLA's per-head weight-only GEMM at decode rows) against the exact product under the
interpreter: odd shapes (R 1/3/16, H 1/5/16, K and N 128/512 and 96/80), both weight layouts (N
contiguous as W_UK, K contiguous as the W_UV transpose view), each dtype, the broadcast and tl.dot
paths, configs and bad input; the one dispatch (`head_matmul`): the einsum without the opt-in
switch, on CPU, with a gradient or past HEAD_GEMV_MAX_ROWS rows; PDL off for a fresh weight; and
the tiny model's decode logits unchanged with the switch on (the interpreter standing in for
CUDA)."""

import pytest
import torch

from moeray.kernels import head_gemv as hg
from moeray.kernels.head_gemv import (
    HEAD_GEMV_MAX_ROWS,
    head_config,
    head_gemv,
    head_gemv_applies,
    head_gemv_fits,
    head_gemv_ref,
    head_matmul,
)
from moeray.platform.config import tiny
from moeray.platform.model.mla import DenseKVCache
from moeray.platform.model.transformer import Transformer

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
CPU = torch.device("cpu")


def _exact(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.einsum("rhk,hkn->rhn", x.double(), w.double())


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    r, h, _ = x.shape
    assert y.dtype == x.dtype and y.shape == (r, h, w.shape[2]) and y.is_contiguous()
    assert torch.isfinite(y).all(), "unwritten or non-finite output"
    ref = _exact(x, w)
    err = (y.double() - ref).abs()
    if x.dtype == torch.float32:
        # fp32 sums in another order: a few fp32 ulps of the largest output
        bound = ref.abs() * 2.0**-20 + 2.0**-20 * ref.abs().max()
    else:
        # fp32 sums, then one rounding to x's dtype (the interpreter truncates): within one unit
        # in the last place of the exact value, element by element
        bound = ref.abs() * ULP[x.dtype] + 1e-5 * ref.abs().max()
    assert (err <= bound).all(), (err / bound).max().item()


def _operands(r: int, h: int, k: int, n: int, dtype, k_contiguous: bool, seed: int):
    """x [R, H, K] and w [H, K, N], rows, heads and columns scaled over 2 decades (fp16 keeps the
    products finite), so a row, head or column mixed into another's output shows up. With
    `k_contiguous` w is the transpose view of a [H, N, K] tensor (MLA's W_UV)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, h, k, generator=g) * torch.logspace(-1, 1, r)[:, None, None]
    x = x * torch.logspace(1, -1, h)[None, :, None]
    w_HNK = torch.randn(h, n, k, generator=g) * torch.logspace(-1, 1, n)[None, :, None]
    w_HNK = w_HNK * torch.logspace(-1, 1, h)[:, None, None]
    w_HNK = w_HNK.to(dtype)
    w = w_HNK.transpose(1, 2) if k_contiguous else w_HNK.transpose(1, 2).contiguous()
    return x.to(dtype), w


# (R, H, K, N): R 1, 3 (a partial broadcast tile) and 16 (the tl.dot tile in bf16, four broadcast
# tiles in fp32) at one head and at 5 heads of odd widths; Moonlight's 16 heads at W_UV and W_UK
# widths in bf16 only past one row (fp32 there is seconds of interpreter a case)
SHAPES = [(r, h, k, n) for r in (1, 3, 16) for h, k, n in [(1, 128, 512), (5, 96, 80)]]
SHAPES += [(1, 16, 512, 128)]
CASES = [(*s, dt) for s in SHAPES for dt in (torch.bfloat16, torch.float32)]
CASES += [(3, 16, 128, 512, torch.bfloat16), (16, 16, 512, 128, torch.bfloat16)]


@pytest.mark.parametrize("k_contiguous", [False, True], ids=["n_contig", "k_contig"])
@pytest.mark.parametrize("r,h,k,n,dtype", CASES)
def test_head_gemv_odd_shapes(r, h, k, n, dtype, k_contiguous):
    x, w = _operands(r, h, k, n, dtype, k_contiguous, seed=r + h + k)
    assert (w.stride(1) == 1) == k_contiguous and (w.stride(2) == 1) != k_contiguous
    _check(head_gemv(x, w), x, w)


@pytest.mark.parametrize("r", [2, 16])  # the broadcast and the tl.dot path
def test_head_gemv_fp16_and_reference(r):
    x, w = _operands(r, 5, 96, 80, torch.float16, True, seed=r)
    y = head_gemv(x, w)
    _check(y, x, w)
    torch.testing.assert_close(y, head_gemv_ref(x, w), rtol=2 * ULP[torch.float16], atol=1e-3)


def test_head_gemv_strided_x():
    # q_nope as MLA leaves it: a [R, H, N] slice of q [R, H, N + 64] (stride 192 over heads)
    x_full, w = _operands(3, 5, 128 + 64, 80, torch.bfloat16, False, seed=7)
    x = x_full[:, :, :128]
    w = w[:, :128]
    assert not x.is_contiguous()
    _check(head_gemv(x, w), x, w)


@pytest.mark.parametrize(
    "r,dtype,cfg",
    [
        # several ragged K steps, BLOCK_N wider than N, the broadcast over several row tiles
        (9, torch.float32, dict(BLOCK_R=4, BLOCK_N=128, BLOCK_K=32, DOT=False)),
        (1, torch.bfloat16, dict(BLOCK_R=1, BLOCK_N=1, BLOCK_K=512, DOT=False)),
        # tl.dot on a padded 16-row tile, and on two row tiles with a ragged K step
        (3, torch.bfloat16, dict(BLOCK_R=16, BLOCK_N=16, BLOCK_K=16, DOT=True)),
        (20, torch.bfloat16, dict(BLOCK_R=16, BLOCK_N=32, BLOCK_K=64, DOT=True)),
    ],
)
def test_head_gemv_configs(r, dtype, cfg):
    x, w = _operands(r, 2, 96, 80, dtype, True, seed=r)
    _check(head_gemv(x, w, config={**cfg, "num_warps": 4, "num_stages": 2}), x, w)


def test_head_config_fills_an_h200(monkeypatch):
    monkeypatch.setattr(hg, "num_sms", lambda device: 132)
    # (H, K, N, N contiguous): W_UK and W_UV at Moonlight (16 heads) and V3 (128 heads)
    widths = [(128, 512, True), (512, 128, False)]
    for h, k, n, n_contig in [(h, *kn) for h in (16, 128) for kn in widths]:
        for r in (1, 2, 4, 8, 16):
            for dtype in (torch.bfloat16, torch.float32):
                cfg = head_config(r, h, k, n, dtype, n_contig, CPU)
                dot = r > 4 and dtype == torch.bfloat16
                assert cfg["DOT"] == dot, cfg
                assert cfg["BLOCK_R"] == (16 if dot else min(4, 1 << (r - 1).bit_length()))
                programs = -(-r // cfg["BLOCK_R"]) * h * -(-n // cfg["BLOCK_N"])
                # a 32-byte run of each weight row when N is contiguous, 16 columns for tl.dot
                floor = max(16 if dot else 1, 32 // dtype.itemsize if n_contig else 1)
                assert programs >= 4 * 132 or cfg["BLOCK_N"] == floor, (h, n, r, cfg)
                assert cfg["BLOCK_K"] <= max(16, k)
                assert dot or cfg["BLOCK_R"] * cfg["BLOCK_N"] * cfg["BLOCK_K"] <= 8192, cfg


def test_head_gemv_empty_and_k0():
    assert head_gemv(torch.randn(0, 3, 8), torch.randn(3, 8, 5)).shape == (0, 3, 5)
    assert head_gemv(torch.randn(2, 3, 8), torch.randn(3, 8, 0)).shape == (2, 3, 0)
    assert torch.equal(head_gemv(torch.randn(2, 3, 0), torch.randn(3, 0, 5)), torch.zeros(2, 3, 5))


def test_head_gemv_bad_input():
    x = torch.randn(2, 4, 96, dtype=torch.bfloat16)
    w = torch.randn(4, 96, 80, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"has H=4, K=96 but w_HKN \(5, 96, 80\) has H=5, K=96"):
        head_gemv(x, torch.randn(5, 96, 80, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"H=4, K=96 but w_HKN \(4, 97, 80\) has H=4, K=97"):
        head_gemv(x, torch.randn(4, 97, 80, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"x_RHK has dtype torch\.int32; accepted: torch\.bf"):
        head_gemv(x.int(), w)
    with pytest.raises(ValueError, match=r"w_HKN has dtype torch\.float32; accepted: torch\.bf"):
        head_gemv(x, w.float())
    with pytest.raises(ValueError, match=r"x_RHK must have 3 dims, got shape \(1, 2, 4, 96\)"):
        head_gemv(x[None], w)
    with pytest.raises(ValueError, match=r"w_HKN must have 3 dims, got shape \(96, 80\)"):
        head_gemv(x, w[0])
    with pytest.raises(ValueError, match="w_HKN is on meta"):
        head_gemv(x, w.to("meta"))
    with pytest.raises(ValueError, match=r"x_RHK must be a torch\.Tensor, got list"):
        head_gemv([1.0], w)
    cfg = dict(BLOCK_R=1, BLOCK_N=16, BLOCK_K=128, DOT=False, num_warps=4, num_stages=3)
    for bad, msg in (
        ({"BLOCK_N": 3}, r"BLOCK_N=3: must be a power of two in \[1, 1024\]"),
        ({"BLOCK_K": 8}, r"BLOCK_K=8: must be a power of two in \[16, 1024\]"),
        ({"num_warps": 3}, "num_warps=3"),
        ({"num_stages": 0}, "num_stages=0"),
        ({"BLOCK_R": 4, "BLOCK_N": 64, "BLOCK_K": 128}, "4\\*64\\*128 = 32768: the fp32"),
        ({"DOT": True}, "DOT=True: BLOCK_R=1 and BLOCK_N=16 must be >= 16"),
    ):
        with pytest.raises(ValueError, match=msg):
            head_gemv(x, w, config={**cfg, **bad})
    with pytest.raises(ValueError, match="need exactly"):
        head_gemv(x, w, config={**cfg, "SPLIT_K": 1})
    with pytest.raises(ValueError, match="DOT=True takes bf16/fp16"):
        head_gemv(x.float(), w.float(), config={**cfg, "BLOCK_R": 16, "DOT": True})


def _on_cuda(monkeypatch):
    """CPU tensors that say they are on CUDA: the dispatch's CUDA branch, run by the interpreter."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))


def test_dispatch_opt_in_inference_decode_rows_only(monkeypatch):
    monkeypatch.delenv("MOERAY_FUSED_HEAD_GEMV", raising=False)
    x = torch.randn(2, 1, 4, 16)  # [B, S, H, K]
    w = torch.randn(4, 16, 32, requires_grad=True)
    with torch.no_grad():
        assert not head_gemv_applies(x, w)  # CPU
        _on_cuda(monkeypatch)
        assert not head_gemv_applies(x, w)  # the switch unset: default off
        monkeypatch.setenv("MOERAY_FUSED_HEAD_GEMV", "0")
        assert not head_gemv_applies(x, w)
        monkeypatch.setenv("MOERAY_FUSED_HEAD_GEMV", "1")
        assert head_gemv_applies(x, w)
        assert head_gemv_applies(torch.randn(HEAD_GEMV_MAX_ROWS, 4, 16), w)
        assert not head_gemv_applies(torch.randn(HEAD_GEMV_MAX_ROWS + 1, 4, 16), w)
        assert not head_gemv_applies(torch.randn(2, 1, 4, 16).bfloat16(), w)  # mixed dtypes
        assert not head_gemv_applies(torch.randn(2, 1, 5, 16), w)  # H mismatch
        assert not head_gemv_applies(torch.randn(0, 4, 16), w)
        assert not head_gemv_applies(torch.randn(4, 16), w)
    assert not head_gemv_applies(x, w)  # a gradient is wanted (training)
    with torch.inference_mode():
        assert head_gemv_applies(x, w)


def test_head_matmul_launches_only_where_it_applies(monkeypatch, launch_spy):
    grids = launch_spy(hg, "_head_gemv_kernel")
    x = torch.randn(2, 3, 4, 16)  # B 2, S 3: 6 rows
    w_HNK = torch.randn(4, 32, 16)
    w = w_HNK.transpose(1, 2)  # K contiguous, as W_UV
    ref = torch.einsum("bshk,hkn->bshn", x, w)
    monkeypatch.setenv("MOERAY_FUSED_HEAD_GEMV", "1")
    with torch.no_grad():
        torch.testing.assert_close(head_matmul(x, w), ref, rtol=0, atol=0)  # CPU: the einsum
        assert grids == []
        _on_cuda(monkeypatch)
        y = head_matmul(x, w)
        assert len(grids) == 1 and y.shape == (2, 3, 4, 32)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        head_matmul(torch.randn(HEAD_GEMV_MAX_ROWS + 1, 4, 16), w)  # prefill rows: the einsum
        assert len(grids) == 1
        monkeypatch.setenv("MOERAY_FUSED_HEAD_GEMV", "0")
        head_matmul(x, w)
        assert len(grids) == 1
    monkeypatch.setenv("MOERAY_FUSED_HEAD_GEMV", "1")
    xg = x.clone().requires_grad_()
    y_train = head_matmul(xg, w)  # autograd: the einsum, gradients flow
    assert len(grids) == 1 and y_train.requires_grad
    y_train.sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(-1).expand(2, 3, 4, 16))


@pytest.mark.parametrize("k_contiguous", [False, True])
def test_head_matmul_bmm_writes_rows_by_head(k_contiguous, monkeypatch):
    """By default, where head_gemv does not apply, at 2+ rows outside autograd: one batched GEMM
    whose output is [..., H, N] in memory (no permuted view for the next reshape to copy), equal
    to the einsum. MOERAY_FUSED_HEAD_BMM=0, and one row, keep the einsum (a permuted view at
    2+ rows)."""
    monkeypatch.delenv("MOERAY_FUSED_HEAD_BMM", raising=False)
    x = torch.randn(3, 5, 7, 24)  # B 3, S 5, H 7, K 24
    w = torch.randn(7, 40, 24).transpose(1, 2) if k_contiguous else torch.randn(7, 24, 40)
    ref = torch.einsum("bshk,hkn->bshn", x, w)
    with torch.no_grad():
        y = head_matmul(x, w)
        one = head_matmul(x[:1, :1], w)
        monkeypatch.setenv("MOERAY_FUSED_HEAD_BMM", "0")
        off = head_matmul(x, w)
    assert y.shape == (3, 5, 7, 40) and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-5)
    assert not off.is_contiguous()  # einsum's [H, rows, N] product, permuted back
    torch.testing.assert_close(off, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(one, ref[:1, :1], rtol=1e-6, atol=1e-5)


def test_fresh_weight_launches_without_pdl(monkeypatch):
    """A weight made for the call (a cast, a first dequantization) is not read before the PDL
    wait: the launch takes PDL off. The kernel is replaced by a recorder (the interpreter has no
    griddepcontrol)."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((kw["PDL"], kw["launch_pdl"]))

    monkeypatch.setattr(hg, "_head_gemv_kernel", Recorder())
    monkeypatch.setattr(hg, "pdl_launch", lambda device: True)
    x, w = torch.randn(1, 2, 16), torch.randn(2, 16, 32)
    head_gemv(x, w)
    head_gemv(x, w, fresh_w=True)
    assert launches == [(True, True), (False, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_model_decode_unchanged_with_head_gemv(monkeypatch, launch_spy, dtype):
    """tiny() (MLA with 4 heads, K/N 16 and 32) prefilling 4 tokens and decoding 1 through the
    absorbed path (a DenseKVCache) with MOERAY_FUSED_HEAD_GEMV=1 and the interpreter standing in
    for CUDA (the dispatch's device check taken out): two launches per layer and forward, and
    the logits of the einsum path within fp32 summation order (bf16: rounding of the
    intermediates). One SM: a program per head (the interpreter's time is per program)."""
    torch.manual_seed(0)
    cfg = tiny()
    model = Transformer(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=g)
    monkeypatch.setattr(hg, "num_sms", lambda device: 1)

    def decode() -> torch.Tensor:
        cache = DenseKVCache(cfg.num_hidden_layers, 2, 5, cfg, dtype=dtype)
        with torch.no_grad():
            prefill = model(ids[:, :4], cache=cache).logits  # 8 rows: the tl.dot path in bf16
            step = model(ids[:, 4:], cache=cache).logits  # 2 rows: the broadcast path
        return torch.cat([prefill, step], dim=1).float()

    monkeypatch.setenv("MOERAY_FUSED_HEAD_GEMV", "1")
    ref = decode()  # CPU tensors: the einsum
    grids = launch_spy(hg, "_head_gemv_kernel")
    monkeypatch.setattr(hg, "head_gemv_applies", head_gemv_fits)
    out = decode()
    assert len(grids) == 2 * cfg.num_hidden_layers * 2, len(grids)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 2e-2), rel
    if dtype == torch.float32:
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_mla_weight_views_say_when_they_are_fresh():
    """The weight MLA hands head_gemv: the parameter's view (kept), or a cast made for the call
    (fresh: head_gemv launches it without PDL)."""
    mla = Transformer(tiny()).model.layers[0].self_attn
    w_HKC, fresh = mla._w_HKC(torch.float32)
    assert not fresh and w_HKC.data_ptr() == mla.kv_b_proj.weight.data_ptr()
    assert mla._w_HKC(torch.bfloat16)[1]


@pytest.mark.parametrize("k_contiguous", [False, True], ids=["n_contig", "k_contig"])
@pytest.mark.parametrize("r", [17, 40, 64])
def test_head_tile_rows_in_one_tile(r, k_contiguous, monkeypatch, launch_spy):
    """MOERAY_FUSED_HEAD_TILE=1 (opt-in): 17-64 bf16 rows through head_gemv with one row tile
    (grid: one row tile, N / HEAD_TILE_BLOCK_N column tiles, H heads), each element within one
    bf16 ulp of the exact product at both weight layouts; unset, 16 rows, 65 rows, fp32 and a
    wanted gradient keep the bmm (no launch)."""
    grids = launch_spy(hg, "_head_gemv_kernel")
    x, w = _operands(r, 3, 128, 96, torch.bfloat16, k_contiguous, seed=r)
    monkeypatch.delenv("MOERAY_FUSED_HEAD_TILE", raising=False)
    monkeypatch.delenv("MOERAY_FUSED_HEAD_GEMV", raising=False)
    _on_cuda(monkeypatch)
    with torch.no_grad():
        head_matmul(x, w)
        assert grids == []  # opt-in
        monkeypatch.setenv("MOERAY_FUSED_HEAD_TILE", "1")
        y = head_matmul(x.view(r, 1, 3, 128), w).view(r, 3, 96)
        assert grids == [(1, 96 // hg.HEAD_TILE_BLOCK_N, 3)]
        _check(y, x, w)
        for rows in (16, 65):
            head_matmul(torch.randn(rows, 3, 128, dtype=torch.bfloat16), w)
        head_matmul(x.float(), w.float())
    assert len(grids) == 1
    head_matmul(x.requires_grad_(), w)
    assert len(grids) == 1
    assert hg.head_tile_config(r, 3, 128, 96)["BLOCK_R"] == (32 if r <= 32 else 64)
