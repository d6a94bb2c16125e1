"""fp8_gemv (weight-only FP8 GEMM for decode) against fp8_gemv_ref under the interpreter: odd
shapes (ragged N and K), both inner products (broadcast, dot), split-K, strided x, bad input;
serial split-K with a workspace (one launch, bit-equal to the two-launch sum, counters back at
zero) and FP8Linear's workspace buffer; the e4m3-activation path (fp8 x fp8 dots) against
fp8_gemv_act_ref the same ways, its bad x_scale, and FP8Linear's MOERAY_FUSED_FP8_GEMV_ACT
switch."""

import pytest
import torch

from moeray.kernels import fp8
from moeray.kernels import gemv as gemv_module
from moeray.kernels.fp8 import gemm as fp8_gemm_module
from moeray.kernels.fp8 import gemv as fp8_gemv_module
from moeray.kernels.fp8.gemv import _gemv_config
from moeray.kernels.fp8.gemv_wide import INTERPRET_WIDE_ROWS, wide_config
from moeray.platform.model import quant as quant_module
from moeray.platform.model.quant import FP8_GEMV_MAX_ROWS, FP8Linear


def _weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Block scales over ~3 decades, so a scale read from the wrong 128x128 block shows up.
    blk = torch.logspace(-1, 2, -(-n // 128))[torch.randperm(-(-n // 128), generator=g)]
    w = torch.randn(n, k, generator=g) * blk.repeat_interleave(128)[:n, None]
    # The reference quantization: the same values as the interpreted kernel (test_fp8.py checks
    # it), a third of these tests' time less (N 576, K 7168: 2.6 s of 4.3).
    return fp8.weight_quant_ref(w)


def _check(y: torch.Tensor, x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> None:
    assert y.dtype == x.dtype and y.shape == (x.shape[0], wq.shape[0])
    assert torch.isfinite(y).all(), "unwritten (poisoned) or non-finite output"
    ref32 = x.float() @ fp8.weight_dequant_ref(wq, ws, out_dtype=torch.float32).t()
    if x.dtype == torch.float32:
        rel = ((y.double() - ref32.double()).norm() / ref32.double().norm()).item()
        assert rel < 1e-5, rel
    else:
        # fp32 sums in another order, then one rounding to x's dtype (the interpreter truncates
        # fp32 -> bf16): within one unit in the last place of the exact value, element by element.
        ulp = 2.0**-7 if x.dtype == torch.bfloat16 else 2.0**-10
        err = (y.float() - ref32).abs()
        bound = ref32.abs() * ulp + 1e-4 * ref32.abs().max()
        assert (err <= bound).all(), (err / bound).max().item()
        torch.testing.assert_close(
            y, fp8.fp8_gemv_ref(x, wq, ws), rtol=2 * ulp, atol=1e-4 * ref32.abs().max().item()
        )


@pytest.mark.parametrize(
    "m,n,k",
    [
        (1, 576, 7168),  # kv_a_proj_with_mqa at batch 1: N not a multiple of 128, split-K
        (3, 1536, 1000),
        (7, 200, 512),
        (16, 200, 1000),
        (1, 7168, 512),
        (16, 576, 512),
        (3, 200, 7168),  # (M 7, N 1536, K 7168) runs on the GPU only: 17 s per dtype here
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_gemv_matches_reference(m, n, k, dtype):
    wq, ws = _weight(n, k, seed=m * 7 + n + k)
    g = torch.Generator().manual_seed(m + n)
    # Rows over 3 decades: a row mixed into another's output shows up.
    x = (torch.randn(m, k, generator=g) * torch.logspace(-1, 2, m)[:, None]).to(dtype)
    _check(fp8.fp8_gemv(x, wq, ws), x, wq, ws)


def test_fp8_gemv_fp16_and_strided_x():
    wq, ws = _weight(576, 1000, seed=1)
    x = torch.randn(1000, 5, dtype=torch.float16).t()  # [5, 1000] with strides (1, 5)
    _check(fp8.fp8_gemv(x, wq, ws), x, wq, ws)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(BLOCK_M=1, BLOCK_N=32, SPLIT_K=3, DOT=False, num_warps=4, num_stages=4),
        dict(BLOCK_M=4, BLOCK_N=8, SPLIT_K=1, DOT=False, num_warps=4, num_stages=2),
        dict(BLOCK_M=16, BLOCK_N=64, SPLIT_K=8, DOT=True, num_warps=4, num_stages=4),
        dict(BLOCK_M=32, BLOCK_N=128, SPLIT_K=2, DOT=True, num_warps=8, num_stages=3),
        # the wide step (one program a row: M = 3 is 3 row tiles): K = 1000's 8 blocks in one
        # step of 8, and in 4 steps of 2 (the loop after the peeled first step)
        dict(BLOCK_M=1, BLOCK_N=4, SPLIT_K=1, DOT=False, K_BLOCKS=8, num_warps=4, num_stages=2),
        dict(BLOCK_M=1, BLOCK_N=8, SPLIT_K=1, DOT=False, K_BLOCKS=2, num_warps=4, num_stages=2),
    ],
)
def test_fp8_gemv_configs(cfg):
    # The GPU's tiles (narrower than the interpreter's defaults) and split counts, with M not a
    # multiple of BLOCK_M, ragged N and K.
    m = 3 if cfg["BLOCK_M"] <= 4 else 21
    wq, ws = _weight(200, 1000, seed=cfg["BLOCK_N"])
    x = torch.randn(m, 1000, dtype=torch.bfloat16)
    _check(fp8.fp8_gemv(x, wq, ws, config=cfg), x, wq, ws)


def test_fp8_gemv_config_heuristic():
    cuda_like = torch.device("cpu")
    # Few output tiles (kv_a at batch 1) split K; many (q_b, 24576 rows) do not, except that at
    # M = 1 a program streams at most 16 of K's 128-column blocks (K = 4096's 32: 2 splits).
    assert _gemv_config(1, 576, 7168, cuda_like)["SPLIT_K"] > 1
    assert _gemv_config(1, 24576, 1536, cuda_like)["SPLIT_K"] == 1
    assert _gemv_config(1, 24576, 4096, cuda_like)["SPLIT_K"] == 2
    assert _gemv_config(2, 24576, 4096, cuda_like)["SPLIT_K"] == 1
    assert not _gemv_config(4, 576, 7168, cuda_like)["DOT"]
    assert _gemv_config(5, 576, 7168, cuda_like)["DOT"]
    assert _gemv_config(200, 576, 7168, cuda_like)["BLOCK_M"] == 64


def test_fp8_gemv_wide_step_rule(monkeypatch, launch_spy):
    # At M = 1 (float x) the wide step by default where K is one step of at most 16 blocks
    # (Moonlight's 2,048; V3's q_b 1,536), at every K with MOERAY_FUSED_FP8_GEMV_WIDE=1, nowhere
    # with MOERAY_FUSED_FP8_GEMV_ONE_STEP=0 alone; other row counts and e4m3 x keep their tiles.
    cuda_like = torch.device("cpu")
    monkeypatch.delenv("MOERAY_FUSED_FP8_GEMV_WIDE", raising=False)
    monkeypatch.delenv("MOERAY_FUSED_FP8_GEMV_ONE_STEP", raising=False)
    moonlight_q = _gemv_config(1, 3648, 2048, cuda_like)  # q + kv_a: one step of 16 blocks
    assert (moonlight_q["SPLIT_K"], moonlight_q["K_BLOCKS"]) == (1, 16)
    assert _gemv_config(1, 24576, 1536, cuda_like)["K_BLOCKS"] == 16  # V3's q_b: 12 blocks
    assert _gemv_config(1, 1536, 2048 + 1, cuda_like).get("K_BLOCKS", 1) == 1  # 17 blocks
    assert _gemv_config(1, 1536, 7168, cuda_like).get("K_BLOCKS", 1) == 1  # V3's q_a
    assert _gemv_config(2, 3648, 2048, cuda_like).get("K_BLOCKS", 1) == 1
    assert _gemv_config(1, 3648, 2048, cuda_like, act_fp8=True)["DOT"]
    monkeypatch.setenv("MOERAY_FUSED_FP8_GEMV_ONE_STEP", "0")
    assert _gemv_config(1, 3648, 2048, cuda_like).get("K_BLOCKS", 1) == 1
    monkeypatch.setenv("MOERAY_FUSED_FP8_GEMV_WIDE", "1")
    v3_q_a = _gemv_config(1, 1536, 7168, cuda_like)  # 56 blocks: 4 splits of 14 in steps of 16
    assert (v3_q_a["SPLIT_K"], v3_q_a["K_BLOCKS"]) == (4, 16)
    # The GPU's tiles: 4 rows a program (912 programs at Moonlight's q + kv_a); the interpreter
    # runs 32.
    assert wide_config(3648, 16, 132)["BLOCK_N"] == 4
    assert _gemv_config(1, 3648, 2048, cuda_like)["BLOCK_N"] == INTERPRET_WIDE_ROWS
    # Split K at a ragged K (2048 + 77: 17 blocks, 2 splits) with the serial reduction: the
    # wide grid (N / 32 tiles x 2 under the interpreter) ran, right, and the counters are back
    # at zero.
    n, k = 200, 2048 + 77
    wq, ws = _weight(n, k, seed=4)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    grids = launch_spy(fp8_gemv_module, "_fp8_gemv_kernel")
    workspace = fp8.fp8_gemv_workspace(n, FP8_GEMV_MAX_ROWS)
    y = fp8.fp8_gemv(x, wq, ws, workspace=workspace)
    assert grids == [(1, 7, 2)], grids  # 200 / 32 rows a program (the interpreter's)
    assert not workspace.any()
    _check(y, x, wq, ws)


def test_fp8_gemv_empty():
    wq, ws = _weight(200, 300, seed=2)
    assert fp8.fp8_gemv(torch.randn(0, 300), wq, ws).shape == (0, 200)


def test_fp8_gemv_bad_input():
    wq, ws = _weight(200, 300, seed=3)
    x = torch.randn(2, 300, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="K=301"):
        fp8.fp8_gemv(torch.randn(2, 301), wq, ws)
    with pytest.raises(ValueError, match=r"w_scale has shape \(2, 2\); expected \(2, 3\)"):
        fp8.fp8_gemv(x, wq, ws[:, :2])
    with pytest.raises(ValueError, match=r"x has dtype torch\.int32"):
        fp8.fp8_gemv(x.int(), wq, ws)
    with pytest.raises(ValueError, match=r"w_fp8 has dtype torch\.bfloat16"):
        fp8.fp8_gemv(x, wq.bfloat16(), ws)
    with pytest.raises(ValueError, match="x must have 2 dims"):
        fp8.fp8_gemv(x[None], wq, ws)
    bad = dict(BLOCK_M=1, BLOCK_N=48, SPLIT_K=1, DOT=False, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="BLOCK_N=48"):
        fp8.fp8_gemv(x, wq, ws, config=bad)
    with pytest.raises(ValueError, match=r"BLOCK_M=4: .* >= 16 when DOT"):
        fp8.fp8_gemv(x, wq, ws, config={**bad, "BLOCK_N": 32, "BLOCK_M": 4, "DOT": True})
    with pytest.raises(ValueError, match="K_BLOCKS=3: must be a power of two"):
        fp8.fp8_gemv(x, wq, ws, config={**bad, "BLOCK_N": 4, "K_BLOCKS": 3})
    with pytest.raises(ValueError, match=r"K_BLOCKS=2 with BLOCK_M=2, DOT=False: .* BLOCK_M=1"):
        fp8.fp8_gemv(x, wq, ws, config={**bad, "BLOCK_N": 4, "BLOCK_M": 2, "K_BLOCKS": 2})
    with pytest.raises(ValueError, match=r"config keys .* K_BLOCKS optionally"):
        fp8.fp8_gemv(x, wq, ws, config={**bad, "BLOCK_N": 4, "SPLIT": 2})


# Tiles and splits that force split-K whatever num_sms says: the broadcast tiles of 1-4 rows (the
# GPU's widths) and a dot tile; K = 2048 + 77 is 17 blocks, the last ragged, so S = 3 leaves a
# short last split (6, 6, 5 blocks). N = 136 is two 128-row scale blocks and a ragged last tile
# at every BLOCK_N (9 tiles of 16, 5 of 32, 3 of 64, each its own counter); the interpreter's time
# goes with the programs, N tiles x S (N 576: 36 x 17 programs, 19 s; 136: 9 x 17, 4 s).
_SERIAL_CONFIGS = [
    (1, dict(BLOCK_M=1, BLOCK_N=64, SPLIT_K=3, DOT=False, num_warps=8, num_stages=4)),
    (2, dict(BLOCK_M=2, BLOCK_N=32, SPLIT_K=5, DOT=False, num_warps=4, num_stages=4)),
    (3, dict(BLOCK_M=4, BLOCK_N=16, SPLIT_K=3, DOT=False, num_warps=4, num_stages=4)),
    (4, dict(BLOCK_M=4, BLOCK_N=16, SPLIT_K=17, DOT=False, num_warps=4, num_stages=4)),
    (7, dict(BLOCK_M=16, BLOCK_N=64, SPLIT_K=4, DOT=True, num_warps=4, num_stages=4)),
    # the wide step: 3 splits of 6, 6, 5 blocks, each one step of 8
    (1, dict(BLOCK_M=1, BLOCK_N=4, SPLIT_K=3, DOT=False, K_BLOCKS=8, num_warps=4, num_stages=2)),
]


def _poisoned_empty(monkeypatch) -> None:
    """fp8_gemv's outputs and partials start as NaN: an element the kernel leaves unwritten
    shows, where plain torch.empty could hand back an earlier call's equal bytes."""
    real = torch.empty

    def empty(*shape, **kw):
        return real(*shape, **kw).fill_(float("nan"))

    monkeypatch.setattr(fp8_gemv_module.torch, "empty", empty)


# x's dtype reaches the serial reduction only in x's loads and the last store's cast (the one
# reduce_splits makes); the interpreter picks the same constexprs for both: both dtypes at the
# one-row broadcast tile and the dot tile, one each at the other tiles, which split alike in
# either (~20 s of the interpreter).
_SERIAL_CASES = [
    (*_SERIAL_CONFIGS[0], torch.bfloat16),
    (*_SERIAL_CONFIGS[0], torch.float32),
    (*_SERIAL_CONFIGS[1], torch.float32),
    (*_SERIAL_CONFIGS[2], torch.bfloat16),
    (*_SERIAL_CONFIGS[3], torch.bfloat16),
    (*_SERIAL_CONFIGS[4], torch.bfloat16),
    (*_SERIAL_CONFIGS[4], torch.float32),
    (*_SERIAL_CONFIGS[5], torch.float32),
]


@pytest.mark.parametrize("m,cfg,dtype", _SERIAL_CASES)
def test_fp8_gemv_serial_split_k(m, cfg, dtype, monkeypatch, launch_spy):
    n, k = 136, 2048 + 77
    wq, ws = _weight(n, k, seed=m)
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-1, 2, m)[:, None]).to(dtype)
    x2 = torch.randn(m, k, generator=g).to(dtype)
    two_launch = fp8.fp8_gemv(x, wq, ws, config=cfg)
    two_launch2 = fp8.fp8_gemv(x2, wq, ws, config=cfg)
    _poisoned_empty(monkeypatch)
    gemv_grids = launch_spy(fp8_gemv_module, "_fp8_gemv_kernel")
    reduce_grids = launch_spy(gemv_module, "_gemv_reduce_kernel")
    workspace = fp8.fp8_gemv_workspace(n, FP8_GEMV_MAX_ROWS)
    y = fp8.fp8_gemv(x, wq, ws, config=cfg, workspace=workspace)
    # One launch, K split, no reduce kernel: the sum happened inside it.
    assert len(gemv_grids) == 1 and gemv_grids[0][2] > 1 and reduce_grids == [], gemv_grids
    assert torch.equal(y, two_launch)  # the same fp32 sums in the same order
    assert not workspace.any(), workspace  # the counters are back at zero
    # A second call on the same counters (its output is a fresh NaN buffer): only right if the
    # first left them at zero.
    y2 = fp8.fp8_gemv(x2, wq, ws, config=cfg, workspace=workspace)
    assert torch.equal(y2, two_launch2) and not workspace.any()
    assert torch.equal(y, two_launch)  # the first output untouched by the second call
    _check(y2, x2, wq, ws)


def test_fp8_gemv_serial_split_k_heuristic_rows(monkeypatch, launch_spy):
    # FP8Linear's use: one workspace for every row count up to FP8_GEMV_MAX_ROWS, heuristic tiles
    # (tile and split counts change from call to call). N 136 (as the serial cases: two scale
    # blocks, a ragged last tile) with 8 SMs: splits 16, 7, 11, 11 at M 1, 4, 2, 16, where N 576
    # split 7, 2, 4, 4 over 4x the interpreter's K blocks (10 s).
    n, k = 136, 2048 + 77
    wq, ws = _weight(n, k, seed=9)
    workspace = fp8.fp8_gemv_workspace(n, FP8_GEMV_MAX_ROWS)
    monkeypatch.setattr(fp8_gemv_module, "num_sms", lambda device: 8)  # few SMs: K splits
    for m in (1, 4, 2, 16, 1):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        assert _gemv_config(m, n, k, x.device)["SPLIT_K"] > 1
        expected = fp8.fp8_gemv(x, wq, ws)
        assert torch.equal(fp8.fp8_gemv(x, wq, ws, workspace=workspace), expected), m
        assert not workspace.any()


def test_fp8_gemv_workspace_size_and_checks():
    # The GPU's tiles: 8 columns at 1 row, 64 // BLOCK_M at 2-4 rows (16 at 3-4), 64 above;
    # the wide step's 4 at 1 row (MOERAY_FUSED_FP8_GEMV_WIDE=1) sets the count.
    assert fp8.fp8_gemv_workspace(576, 1).numel() == 144
    assert fp8.fp8_gemv_workspace(576, 2).numel() == 144
    assert fp8.fp8_gemv_workspace(576, 16).numel() == 144
    assert fp8.fp8_gemv_workspace(24576, 16).numel() == 6144
    wq, ws = _weight(576, 2048, seed=4)
    x = torch.randn(1, 2048, dtype=torch.bfloat16)
    cfg = dict(BLOCK_M=1, BLOCK_N=64, SPLIT_K=2, DOT=False, num_warps=8, num_stages=4)
    with pytest.raises(ValueError, match="workspace has 8 counters; this call has 9 tiles"):
        fp8.fp8_gemv(x, wq, ws, config=cfg, workspace=torch.zeros(8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"workspace has dtype torch\.int64"):
        fp8.fp8_gemv(x, wq, ws, workspace=torch.zeros(36, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_rows=0"):
        fp8.fp8_gemv_workspace(576, 0)


def test_fp8_linear_workspace_buffer():
    q, s = fp8.weight_quant(torch.randn(576, 300))
    layer = FP8Linear(q, s)
    assert layer.gemv_workspace.dtype == torch.int32 and layer.gemv_workspace.numel() == 144
    assert set(layer.state_dict()) == {"weight", "weight_scale_inv"}  # checkpoints unchanged
    # Laid out on meta and materialized as the dummy-weight loader does: to_empty's buffers are
    # uninitialized memory, and the counters must still start at zero.
    with torch.device("meta"):
        meta = FP8Linear(torch.empty(576, 300, dtype=q.dtype), torch.empty(5, 3))
    for _ in range(3):
        torch.full((144,), 7, dtype=torch.int32)  # leaves nonzero bytes for empty() to reuse
        built = meta.to_empty(device="cpu")
        assert built.gemv_workspace.shape == (144,) and not built.gemv_workspace.any()


def _act_input(m: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [m, k] bf16 with rows over 3 decades (a row mixed into another's output shows up) and
    act_quant's (e4m3, fp32 scales [m, KB]) of it."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-1, 2, m)[:, None]).bfloat16()
    return (x, *fp8.act_quant(x))


def _check_act(y, xq, xs, wq, ws, out_dtype=torch.bfloat16) -> None:
    assert y.dtype == out_dtype and y.shape == (xq.shape[0], wq.shape[0])
    assert torch.isfinite(y).all(), "unwritten (poisoned) or non-finite output"
    w32 = fp8.weight_dequant_ref(wq, ws, out_dtype=torch.float32)
    ref32 = fp8.dequant_rows_ref(xq, xs) @ w32.t()
    if out_dtype == torch.float32:
        # Per 128-K block, e4m3 x e4m3 products (exact in fp32) summed, then scaled: fp32 sums in
        # another order than the reference's dequantize-then-multiply.
        rel = ((y.double() - ref32.double()).norm() / ref32.double().norm()).item()
        assert rel < 1e-5, rel
        return
    ulp = 2.0**-7 if out_dtype == torch.bfloat16 else 2.0**-10
    err = (y.float() - ref32).abs()
    bound = ref32.abs() * ulp + 1e-4 * ref32.abs().max()
    assert (err <= bound).all(), (err / bound).max().item()
    torch.testing.assert_close(
        y,
        fp8.fp8_gemv_act_ref(xq, xs, wq, ws, out_dtype),
        rtol=2 * ulp,
        atol=1e-4 * ref32.abs().max().item(),
    )


# out_dtype reaches only the output store's cast: both at the four narrow shapes, one each at the
# two wide ones (~9 s of the interpreter a dtype there).
@pytest.mark.parametrize(
    "m,n,k,out_dtype",
    [
        (1, 576, 7168, torch.bfloat16),  # kv_a at batch 1: split-K, rows wrap onto 16
        *[
            (*shape, out_dtype)
            for shape in (
                (3, 200, 1000),  # N off the 64-row tiles, ragged last K block
                (16, 576, 512),
                (17, 200, 1000),  # BLOCK_M 32, rows 17-31 wrap
                (40, 576, 1000),  # BLOCK_M 64
            )
            for out_dtype in (torch.bfloat16, torch.float32)
        ],
        (1, 1536, 2048 + 77, torch.float32),
    ],
)
def test_fp8_gemv_act_matches_reference(m, n, k, out_dtype):
    wq, ws = _weight(n, k, seed=m * 7 + n + k)
    _, xq, xs = _act_input(m, k, seed=m + n)
    y = fp8.fp8_gemv(xq, wq, ws, x_scale=xs, out_dtype=out_dtype)
    _check_act(y, xq, xs, wq, ws, out_dtype)


def test_fp8_gemv_act_layouts_and_default_dtype():
    # act_quant's column-major scales (strides (1, M)), a strided e4m3 x, fp16 out; the default
    # out_dtype of e4m3 x is bf16.
    wq, ws = _weight(200, 1000, seed=11)
    x, xq, xs = _act_input(5, 1000, seed=11)
    xq_c, xs_c = fp8.act_quant(x, scale_col_major=True)
    assert xs_c.stride() == (1, 5)
    y = fp8.fp8_gemv(xq_c, wq, ws, x_scale=xs_c)
    _check_act(y, xq, xs, wq, ws)
    assert torch.equal(y, fp8.fp8_gemv(xq, wq, ws, x_scale=xs))
    xq_t = xq.t().contiguous().t()  # [5, 1000] with strides (1, 5)
    xs_small = xs / 1024  # outputs within fp16's range (65504)
    y16 = fp8.fp8_gemv(xq_t, wq, ws, x_scale=xs_small, out_dtype=torch.float16)
    _check_act(y16, xq, xs_small, wq, ws, torch.float16)
    # Weight-only with out_dtype fp32: bf16 x, the fp32 sums unrounded.
    y32 = fp8.fp8_gemv(x, wq, ws, out_dtype=torch.float32)
    ref32 = x.float() @ fp8.weight_dequant_ref(wq, ws, out_dtype=torch.float32).t()
    assert y32.dtype == torch.float32
    assert ((y32 - ref32).norm() / ref32.norm()).item() < 1e-5
    empty = fp8.fp8_gemv(xq[:0], wq, ws, x_scale=xs[:0])
    assert empty.shape == (0, 200) and empty.dtype == torch.bfloat16


def test_fp8_gemv_act_config_heuristic():
    cpu = torch.device("cpu")
    for m, block_m in ((1, 16), (3, 16), (16, 16), (17, 32), (40, 64), (200, 64)):
        cfg = _gemv_config(m, 7168, 16384, cpu, act_fp8=True)
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["DOT"]) == (block_m, 64, True), (m, cfg)
        assert (cfg["num_warps"], cfg["num_stages"]) == (4, 4)
    # The programs-per-SM rule: kv_a's 9 tiles split K, q_b's 384 do not.
    assert _gemv_config(1, 576, 7168, cpu, act_fp8=True)["SPLIT_K"] > 1
    assert _gemv_config(1, 24576, 1536, cpu, act_fp8=True)["SPLIT_K"] == 1


def test_fp8_gemv_act_bad_input():
    wq, ws = _weight(200, 300, seed=3)
    x, xq, xs = _act_input(2, 300, seed=3)
    with pytest.raises(ValueError, match="x is e4m3 but x_scale is None"):
        fp8.fp8_gemv(xq, wq, ws)
    with pytest.raises(ValueError, match=r"x_scale given with x of dtype torch\.bfloat16"):
        fp8.fp8_gemv(x, wq, ws, x_scale=xs)
    with pytest.raises(ValueError, match=r"x_scale has shape \(2, 2\); expected \(2, 3\)"):
        fp8.fp8_gemv(xq, wq, ws, x_scale=xs[:, :2])
    with pytest.raises(ValueError, match=r"x_scale has shape \(1, 3\); expected \(2, 3\)"):
        fp8.fp8_gemv(xq, wq, ws, x_scale=xs[:1])
    with pytest.raises(ValueError, match=r"x_scale has dtype torch\.bfloat16"):
        fp8.fp8_gemv(xq, wq, ws, x_scale=xs.bfloat16())
    with pytest.raises(ValueError, match="x_scale must have 2 dims"):
        fp8.fp8_gemv(xq, wq, ws, x_scale=xs.flatten())
    with pytest.raises(ValueError, match=r"out_dtype=torch\.int32; accepted"):
        fp8.fp8_gemv(xq, wq, ws, x_scale=xs, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="DOT=False with e4m3 x"):
        bad = dict(BLOCK_M=1, BLOCK_N=16, SPLIT_K=1, DOT=False, num_warps=4, num_stages=1)
        fp8.fp8_gemv(xq, wq, ws, x_scale=xs, config=bad)


# The act path's tiles with split-K forced (as _SERIAL_CONFIGS): rows wrapping at 3 of 16, 17 of
# 32 and 40 of 64; N = 136 gives a ragged last tile at BLOCK_N 64 and 32; K = 2048 + 77 is 17
# blocks, the last ragged.
_ACT_SERIAL_CONFIGS = [
    (3, dict(BLOCK_M=16, BLOCK_N=64, SPLIT_K=4, DOT=True, num_warps=4, num_stages=4)),
    (17, dict(BLOCK_M=32, BLOCK_N=32, SPLIT_K=3, DOT=True, num_warps=4, num_stages=4)),
    (40, dict(BLOCK_M=64, BLOCK_N=64, SPLIT_K=17, DOT=True, num_warps=4, num_stages=4)),
]


@pytest.mark.parametrize("m,cfg", _ACT_SERIAL_CONFIGS)
def test_fp8_gemv_act_serial_split_k(m, cfg, monkeypatch, launch_spy):
    n, k = 136, 2048 + 77
    wq, ws = _weight(n, k, seed=m)
    _, xq, xs = _act_input(m, k, seed=m)
    _, xq2, xs2 = _act_input(m, k, seed=m + 100)
    two_launch = fp8.fp8_gemv(xq, wq, ws, x_scale=xs, config=cfg)
    two_launch2 = fp8.fp8_gemv(xq2, wq, ws, x_scale=xs2, config=cfg)
    _poisoned_empty(monkeypatch)
    gemv_grids = launch_spy(fp8_gemv_module, "_fp8_gemv_kernel")
    reduce_grids = launch_spy(gemv_module, "_gemv_reduce_kernel")
    workspace = fp8.fp8_gemv_workspace(n, max(m, FP8_GEMV_MAX_ROWS))
    y = fp8.fp8_gemv(xq, wq, ws, x_scale=xs, config=cfg, workspace=workspace)
    assert len(gemv_grids) == 1 and gemv_grids[0][2] > 1 and reduce_grids == [], gemv_grids
    assert torch.equal(y, two_launch)  # the same fp32 sums in the same order
    assert not workspace.any(), workspace
    y2 = fp8.fp8_gemv(xq2, wq, ws, x_scale=xs2, config=cfg, workspace=workspace)
    assert torch.equal(y2, two_launch2) and not workspace.any()
    assert torch.equal(y, two_launch)
    _check_act(y, xq, xs, wq, ws)
    _check_act(y2, xq2, xs2, wq, ws)


def test_fp8_gemv_act_serial_split_k_heuristic_rows(monkeypatch):
    # FP8Linear's use: its workspace (sized for either x) at every row count up to
    # FP8_GEMV_MAX_ROWS, heuristic tiles, K split.
    n, k = 256, 2048
    wq, ws = _weight(n, k, seed=12)
    workspace = fp8.fp8_gemv_workspace(n, FP8_GEMV_MAX_ROWS)
    monkeypatch.setattr(fp8_gemv_module, "num_sms", lambda device: 8)  # few SMs: K splits
    for m in (1, 16, 3):
        _, xq, xs = _act_input(m, k, seed=m)
        assert _gemv_config(m, n, k, xq.device, act_fp8=True)["SPLIT_K"] > 1
        expected = fp8.fp8_gemv(xq, wq, ws, x_scale=xs)
        assert torch.equal(fp8.fp8_gemv(xq, wq, ws, x_scale=xs, workspace=workspace), expected)
        assert not workspace.any()


@pytest.mark.parametrize("switch", [None, "0", "1"])
def test_fp8_linear_act_switch(switch, monkeypatch):
    # MOERAY_FUSED_FP8_GEMV_ACT=1 (only): act_quant + the e4m3 path at decode rows on aligned
    # layers; its numbers are act_quant's rounding of x, not the weight-only ones.
    if switch is None:
        monkeypatch.delenv("MOERAY_FUSED_FP8_GEMV_ACT", raising=False)
    else:
        monkeypatch.setenv("MOERAY_FUSED_FP8_GEMV_ACT", switch)
    wq, ws = _weight(256, 512, seed=13)
    layer = FP8Linear(wq, ws)
    x, xq, xs = _act_input(3, 512, seed=13)
    y = layer.forward_kernels(x)
    weight_only = fp8.fp8_gemv(x, wq, ws)
    if switch == "1":
        assert torch.equal(y, fp8.fp8_gemv(xq, wq, ws, x_scale=xs))
        _check_act(y, xq, xs, wq, ws)
        assert not torch.equal(y, weight_only)
        assert (y.float() - weight_only.float()).abs().max() > 1e-2 * weight_only.abs().max()
        assert not layer.gemv_workspace.any()
    else:
        assert torch.equal(y, weight_only)
    # Ragged N (kv_a, 576 rows) stays weight-only whatever the switch.
    wq_r, ws_r = _weight(576, 512, seed=14)
    ragged = FP8Linear(wq_r, ws_r).forward_kernels(x)
    assert torch.equal(ragged, fp8.fp8_gemv(x, wq_r, ws_r))


def test_fp8_gemv_batch_switch_splits_k_less(monkeypatch):
    # MOERAY_FUSED_FP8_GEMV_BATCH=1: dot tiles of more than 16 rows stream at least BLOCK_M / 8 K
    # blocks a program. On a 132-SM GPU the program-count rule gives Moonlight's q (3072 x 2048,
    # 16 K blocks) 11 splits at 64 rows and V3's q_a (1536 x 7168, 56 blocks) 22.
    monkeypatch.setattr(fp8_gemv_module, "num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    monkeypatch.delenv("MOERAY_FUSED_FP8_GEMV_BATCH", raising=False)
    assert _gemv_config(64, 3072, 2048, cpu)["SPLIT_K"] == 11
    assert _gemv_config(64, 1536, 7168, cpu)["SPLIT_K"] == 22
    small = [_gemv_config(m, 576, 7168, cpu) for m in (1, 4, 16)]
    monkeypatch.setenv("MOERAY_FUSED_FP8_GEMV_BATCH", "1")
    assert _gemv_config(64, 3072, 2048, cpu)["SPLIT_K"] == 2  # 16 blocks // 8
    assert _gemv_config(64, 1536, 7168, cpu)["SPLIT_K"] == 7
    assert _gemv_config(32, 1536, 7168, cpu)["SPLIT_K"] == 14  # BLOCK_M 32: >= 4 blocks each
    # up to 16 rows (BLOCK_M <= 16) the configs are the default's
    assert _gemv_config(16, 1536, 7168, cpu)["SPLIT_K"] == 22
    assert [_gemv_config(m, 576, 7168, cpu) for m in (1, 4, 16)] == small


@pytest.mark.parametrize("switch", [None, "1"])
def test_fp8_linear_batch_switch(switch, monkeypatch, launch_spy):
    # 40 rows (a padded decode batch of 64's shape class): act_quant + the block-scaled GEMM by
    # default; with MOERAY_FUSED_FP8_GEMV_BATCH=1 one fp8_gemv launch, weight-only numbers, the
    # layer's workspace (serial split-K) left at zero. (Without the bf16 copies, which take such
    # a small layer at these rows by default: test_fp8_linear_as_bf16_switch.)
    monkeypatch.setenv("MOERAY_FUSED_FP8_AS_BF16", "0")
    if switch is None:
        monkeypatch.delenv("MOERAY_FUSED_FP8_GEMV_BATCH", raising=False)
    else:
        monkeypatch.setenv("MOERAY_FUSED_FP8_GEMV_BATCH", switch)
    monkeypatch.setattr(fp8_gemv_module, "num_sms", lambda device: 64)  # K splits at 40 rows
    # gemv: 32 K blocks, 4 splits of 8 (BLOCK_M 64 / 8); the GEMM's choice takes any aligned K:
    # 4 blocks (its interpreted K loop and act_quant at 4096 took 6 s of the test's 7)
    k = 4096 if switch == "1" else 512
    wq, ws = _weight(256, k, seed=21)
    layer = FP8Linear(wq, ws)
    x = torch.randn(40, k, dtype=torch.bfloat16)
    gemv_launches = launch_spy(fp8_gemv_module, "_fp8_gemv_kernel")
    y = layer.forward_kernels(x)
    if switch == "1":
        assert gemv_launches == [(1, 4, 4)]  # one launch: 4 N tiles x 4 K splits
        _check(y, x, wq, ws)
        assert not layer.gemv_workspace.any()
    else:
        assert not gemv_launches
        xq, xs = fp8.act_quant(x)
        assert torch.equal(y, fp8.fp8_gemm(xq, xs, wq, ws))


def test_fp8_linear_as_bf16_switch(monkeypatch, launch_spy):
    # By default (MOERAY_FUSED_FP8_AS_BF16 unset or 1): from 9 to 64 rows a layer of at most
    # FP8_AS_BF16_MAX_WEIGHTS weights is F.linear over the kept bf16 copy (one dequantization,
    # then none); not at 8 rows (fp8_gemv), 65 rows or a larger layer (act_quant + the
    # block-scaled GEMM), nor with MOERAY_FUSED_FP8_AS_BF16=0.
    wq, ws = _weight(256, 512, seed=23)
    layer = FP8Linear(wq, ws)
    w_bf16 = quant_module.dequantize_fp8_blocks(wq, ws, torch.bfloat16)
    gemm_launches = launch_spy(fp8_gemm_module, "_fp8_gemm_kernel")
    gemv_launches = launch_spy(fp8_gemv_module, "_fp8_gemv_kernel")
    x40, x8, x65 = (torch.randn(m, 512, dtype=torch.bfloat16) for m in (40, 8, 65))
    monkeypatch.setenv("MOERAY_FUSED_FP8_AS_BF16", "0")
    assert torch.equal(layer.forward_kernels(x40), fp8.fp8_gemm(*fp8.act_quant(x40), wq, ws))
    assert not layer.dequantized_kept(torch.bfloat16)
    assert quant_module.keep_bf16_copies([layer], torch.bfloat16) == 0
    assert not layer.dequantized_kept(torch.bfloat16)
    monkeypatch.delenv("MOERAY_FUSED_FP8_AS_BF16")
    gemm_launches.clear()
    for _ in range(2):
        assert torch.equal(layer.forward_kernels(x40), torch.nn.functional.linear(x40, w_bf16))
        assert layer.dequantized_kept(torch.bfloat16)
    assert not gemm_launches and not gemv_launches
    layer.forward_kernels(x8)
    assert len(gemv_launches) == 1 and not gemm_launches
    layer.forward_kernels(x65)
    assert len(gemm_launches) == 1
    monkeypatch.setattr(quant_module, "FP8_AS_BF16_MAX_WEIGHTS", 256 * 512 - 1)
    layer.forward_kernels(x40)
    assert len(gemm_launches) == 2


def test_fp8_linear_fp32_rows_stay_weight_only(launch_spy):
    # fp32 activations never run the bf16 copy (an fp32 model keeps fp32 numbers): a ragged layer
    # (N 200, K 320) at 40 rows is fp8_gemv's weight-only product, within fp32 summation order
    # of F.linear over the fp32 dequantized weight, and no copy is kept.
    wq, ws = _weight(200, 320, seed=31)
    layer = FP8Linear(wq, ws)
    gemv_launches = launch_spy(fp8_gemv_module, "_fp8_gemv_kernel")
    x40 = torch.randn(40, 320)
    y = layer.forward_kernels(x40)
    assert y.dtype == torch.float32 and gemv_launches
    want = torch.nn.functional.linear(x40, quant_module.dequantize_fp8_blocks(wq, ws, x40.dtype))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert not layer.dequantized_kept(torch.bfloat16)
    assert not layer.dequantized_kept(torch.float32)


def test_keep_bf16_copies_makes_them_up_front(monkeypatch):
    """keep_bf16_copies (the engine calls it before sizing its KV cache) dequantizes every FP8
    layer that runs as bf16 and none larger, and returns their bytes."""
    small, big = FP8Linear(*_weight(256, 512, seed=1)), FP8Linear(*_weight(256, 1024, seed=2))
    model = torch.nn.Sequential(small, torch.nn.Linear(4, 4), big)
    monkeypatch.setattr(quant_module, "FP8_AS_BF16_MAX_WEIGHTS", 256 * 512)
    assert quant_module.keep_bf16_copies(model.modules(), torch.float32) == 0  # fp32: never run
    assert not small.dequantized_kept(torch.float32)
    assert quant_module.keep_bf16_copies(model.modules(), torch.bfloat16) == 256 * 512 * 2
    assert small.dequantized_kept(torch.bfloat16) and not big.dequantized_kept(torch.bfloat16)


def test_fp8_linear_as_bf16_small_switch(monkeypatch, launch_spy):
    """By default the kept bf16 copy runs from 9 rows (FP8_AS_BF16_SMALL_MIN_ROWS), where
    fp8_gemv ran before; 8 rows keep fp8_gemv; MOERAY_FUSED_FP8_AS_BF16_SMALL=0 keeps fp8_gemv to
    16 rows, and so does the opt-in MOERAY_FUSED_FP8_GEMV_BATCH=1 (to its 64)."""
    wq, ws = _weight(256, 512, seed=29)
    layer = FP8Linear(wq, ws)
    w_bf16 = quant_module.dequantize_fp8_blocks(wq, ws, torch.bfloat16)
    gemv_launches = launch_spy(fp8_gemv_module, "_fp8_gemv_kernel")
    x8, x9, x16 = (torch.randn(m, 512, dtype=torch.bfloat16) for m in (8, 9, 16))
    for x in (x9, x16):
        assert torch.equal(layer.forward_kernels(x), torch.nn.functional.linear(x, w_bf16))
    assert not gemv_launches
    layer.forward_kernels(x8)
    assert len(gemv_launches) == 1
    for env in ("MOERAY_FUSED_FP8_AS_BF16_SMALL", "MOERAY_FUSED_FP8_GEMV_BATCH"):
        with monkeypatch.context() as m:
            m.setenv(env, "0" if env.endswith("SMALL") else "1")
            layer.forward_kernels(x9)
            layer.forward_kernels(x16)
    assert len(gemv_launches) == 5
