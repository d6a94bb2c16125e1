"""The k-grouped BF16 weight-gradient GEMM (`kernels/grouped_wgrad.py`: every expert's dW in one
launch, fp32 out or added into a gradient) against per-expert fp32 matmuls under the interpreter, at
odd shapes: ragged and empty experts, N and K not multiples of the tile, rows not multiples of
16 or 64, fp16; the compiled GPU check (Moonlight and V3 shapes, timed against torch._grouped_mm +
cast + add) below."""

import pytest
import torch

from moeray.kernels.grouped_wgrad import (
    DEFAULT_CONFIG,
    INTERPRETER_CONFIG,
    grouped_wgrad,
    grouped_wgrad_ref,
)

# BLOCK_P = 64 as on the GPU: experts 16-aligned or not, reduction tiles straddle their boundaries
WIDE_P = dict(INTERPRETER_CONFIG, BLOCK_P=64)


def _inputs(rows: list[int], n: int, k: int, dtype=torch.bfloat16, seed: int = 0):
    """dy [P, N], x [P, K] whose experts' rows differ in magnitude by up to 100x, so a tile that
    reads another expert's rows is off by far more than rounding; ends int32 [E]."""
    g = torch.Generator().manual_seed(seed)
    p = sum(rows)
    scale = torch.cat([torch.full((r,), 10.0 ** (e % 3 - 1)) for e, r in enumerate(rows)])
    dy = (torch.randn(p, n, generator=g) * scale[:, None]).to(dtype)
    x = torch.randn(p, k, generator=g).to(dtype)
    ends = torch.tensor(rows, dtype=torch.int32).cumsum(0).to(torch.int32)
    return dy, x, ends


def _per_expert(dy, x, rows):
    out, start = [], 0
    for r in rows:
        out.append(dy[start : start + r].double().t() @ x[start : start + r].double())
        start += r
    return torch.stack(out)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "rows, n, k, config",
    [
        ([37, 0, 16, 5, 80], 45, 70, None),  # no row count a multiple of 16 but one; N, K ragged
        ([48, 0, 112, 16, 0, 32], 33, 50, WIDE_P),  # 16-aligned experts, 64-row tiles straddle
        ([0, 0, 130], 16, 32, WIDE_P),  # leading empty experts, exact tiles in N and K
        ([3], 129, 17, None),  # fewer rows than a tile
        ([70, 1, 0], 40, 40, dict(WIDE_P, BLOCK_N=32, BLOCK_K=16, GROUP_N=1)),
    ],
)
def test_grouped_wgrad_matches_per_expert_matmuls(rows, n, k, config):
    dy, x, ends = _inputs(rows, n, k, seed=len(rows) + n)
    out = grouped_wgrad(dy, x, ends, config=config)
    assert out.shape == (len(rows), n, k) and out.dtype == torch.float32 and out.is_contiguous()
    want = _per_expert(dy, x, rows)
    for e, r in enumerate(rows):
        if r == 0:
            assert out[e].abs().max() == 0, f"expert {e} has no rows: its dW must be exactly 0"
        else:
            # fp32 sums of bf16 products in another order: ~1e-7 relative; another expert's
            # rows (10x or 100x larger or smaller): O(1)
            assert _rel(out[e], want[e]) < 1e-5, (e, _rel(out[e], want[e]))
    assert _rel(out, grouped_wgrad_ref(dy, x, ends)) < 1e-5


def test_grouped_wgrad_fp16_and_rows_past_the_last_expert():
    rows = [21, 0, 50]
    dy, x, ends = _inputs([*rows, 9], 24, 40, dtype=torch.float16, seed=3)
    ends = ends[:3].contiguous()  # 9 trailing rows belong to no expert: never read
    out = grouped_wgrad(dy, x, ends, config=WIDE_P)
    want = _per_expert(dy, x, rows)
    assert _rel(out, want) < 1e-5 and out[1].abs().max() == 0


def test_grouped_wgrad_takes_row_strided_halves():
    """dy and x as the halves of wider tensors (row stride 2N: the gate and up gradients of one
    [P, 2I] tensor) give what their contiguous copies give, bit for bit."""
    rows = [37, 0, 16, 5]
    dy, x, ends = _inputs(rows, 2 * 24, 40, seed=5)
    for half in (slice(0, 24), slice(24, 48)):
        got = grouped_wgrad(dy[:, half], x, ends, config=WIDE_P)
        assert torch.equal(got, grouped_wgrad(dy[:, half].contiguous(), x, ends, config=WIDE_P))
    wide_x = torch.cat([x, x.flip(1)], 1)
    got = grouped_wgrad(dy, wide_x[:, 40:], ends, config=WIDE_P)
    assert _rel(got, _per_expert(dy, x.flip(1), rows)) < 1e-5


def test_grouped_wgrad_accumulates_into_a_gradient():
    """accumulate_into: the product added in the epilogue equals the fresh fp32 product added
    afterwards, bit for bit (one fp32 add of the same two values), for every expert; an expert
    without rows keeps its gradient; a bf16, misshaped or strided target is refused by name."""
    rows = [33, 0, 17, 64]
    dy, x, ends = _inputs(rows, 50, 36, seed=5)
    grad = torch.randn(len(rows), 50, 36, generator=torch.Generator().manual_seed(6))
    for config in (None, WIDE_P):
        target = grad.clone()
        want = target + grouped_wgrad(dy, x, ends, config=config)
        got = grouped_wgrad(dy, x, ends, accumulate_into=target, config=config)
        assert got is target
        assert torch.equal(got, want)
        assert torch.equal(got[1], grad[1])
    with pytest.raises(ValueError, match=r"accumulate_into has dtype torch\.bfloat16"):
        grouped_wgrad(dy, x, ends, accumulate_into=grad.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"accumulate_into has shape \(4, 50, 35\)"):
        grouped_wgrad(dy, x, ends, accumulate_into=grad[:, :, :-1].contiguous())
    with pytest.raises(ValueError, match="accumulate_into must be contiguous"):
        grouped_wgrad(dy, x, ends, accumulate_into=grad.transpose(1, 2).contiguous().mT)


def test_grouped_wgrad_no_rows_and_input_errors():
    dy, x, ends = _inputs([16, 16], 24, 40)
    empty = grouped_wgrad(dy[:0], x[:0], torch.zeros(2, dtype=torch.int32))
    assert empty.shape == (2, 24, 40) and empty.abs().max() == 0
    grad = torch.ones(2, 24, 40)
    no_rows = torch.zeros(2, dtype=torch.int32)
    assert grouped_wgrad(dy[:0], x[:0], no_rows, accumulate_into=grad) is grad
    assert torch.equal(grad, torch.ones(2, 24, 40))
    assert grouped_wgrad(dy, x, ends[:0]).shape == (0, 24, 40)
    with pytest.raises(ValueError, match=r"ends=\[20, 10\]"):
        grouped_wgrad(dy, x, torch.tensor([20, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"ends=\[16, 40\]: .* up to P=32"):
        grouped_wgrad(dy, x, torch.tensor([16, 40], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"ends has dtype torch\.int64"):
        grouped_wgrad(dy, x, ends.long())
    with pytest.raises(ValueError, match=r"dy_PN has dtype torch\.float32"):
        grouped_wgrad(dy.float(), x, ends)
    with pytest.raises(ValueError, match=r"x_PK has dtype torch\.float16"):
        grouped_wgrad(dy, x.half(), ends)
    with pytest.raises(ValueError, match=r"x_PK has strides \(80, 2\): its rows must be"):
        grouped_wgrad(dy, torch.cat([x, x], 1)[:, ::2], ends)
    with pytest.raises(ValueError, match=r"P \(rows\) must match"):
        grouped_wgrad(dy, x[:20], ends)
    with pytest.raises(ValueError, match="BLOCK_P=24"):
        grouped_wgrad(dy, x, ends, config=dict(DEFAULT_CONFIG, BLOCK_P=24))
    with pytest.raises(ValueError, match="config keys"):
        grouped_wgrad(dy, x, ends, config={"BLOCK_N": 16})


_GPU_CHECK = r"""
import torch
from moeray.kernels import grouped_wgrad as gw

torch.manual_seed(0)
bad = []


def aligned_rows(e, total, align=16, empty=()):
    # random per-expert counts (GroupedExperts pads each expert to 16 rows on CUDA)
    raw = torch.multinomial(torch.ones(e), total, replacement=True).bincount(minlength=e)
    raw[list(empty)] = 0
    return [-(-int(r) // align) * align for r in raw]


def timed(fn, reps=20):
    fn()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        fn()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / reps


# Moonlight (64 experts, I 1408, D 2048, ~18,432 rows a micro-batch: both projections' shapes),
# V3 (8 local experts, 2048 x 7168 both ways), a small ragged one (unaligned rows, N/K odd)
for name, rows, n, k in [
    ("moonlight gate/up", aligned_rows(64, 18000, empty=(3, 40)), 1408, 2048),
    ("moonlight down", aligned_rows(64, 18000, empty=(3, 40)), 2048, 1408),
    ("v3 gate/up", aligned_rows(8, 16000, empty=(5,)), 2048, 7168),
    ("v3 down", aligned_rows(8, 16000, empty=(5,)), 7168, 2048),
    ("ragged", [37, 0, 5, 200, 1], 200, 72),
]:
    p = sum(rows)
    dy = torch.randn(p, n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(p, k, device="cuda", dtype=torch.bfloat16)
    ends = torch.tensor(rows, device="cuda").cumsum(0).to(torch.int32)
    torch.empty(1 << 28, device="cuda").fill_(float("nan"))  # freed NaNs: an unwritten tile shows
    out = gw.grouped_wgrad(dy, x, ends)
    ref = gw.grouped_wgrad_ref(dy, x, ends)
    rel = ((out - ref).norm() / ref.norm()).item()
    zero = all(out[e].abs().max().item() == 0 for e, t in enumerate(rows) if t == 0)
    grad = torch.randn_like(out)
    acc = gw.grouped_wgrad(dy, x, ends, accumulate_into=grad.clone())
    bit_equal = torch.equal(acc, grad + out)
    # the path it replaces: CUTLASS bf16 out, cast to fp32, autograd's in-place add
    base = torch._grouped_mm(dy.t(), x, offs=ends).float()
    base_rel = ((base - ref).norm() / ref.norm()).item()
    ms_acc = timed(lambda: gw.grouped_wgrad(dy, x, ends, accumulate_into=grad))
    ms_fresh = timed(lambda: gw.grouped_wgrad(dy, x, ends))
    cutlass = lambda: torch._grouped_mm(dy.t(), x, offs=ends).to(torch.float32)
    ms_base_acc = timed(lambda: grad.add_(cutlass()))
    ms_base = timed(cutlass)
    tf = 2 * p * n * k / 1e9
    print(f"{name:18s} E{len(rows):3d} N{n:5d} K{k:5d} P{p:6d}: rel {rel:.1e} (grouped_mm bf16 "
          f"{base_rel:.1e}), empty zero {zero}, acc bit== {bit_equal} | accumulate "
          f"{ms_acc * 1e3:6.0f} us ({tf / ms_acc:4.0f} TFLOP/s) vs grouped_mm+cast+add "
          f"{ms_base_acc * 1e3:6.0f} us x{ms_base_acc / ms_acc:.2f} | fresh {ms_fresh * 1e3:6.0f} "
          f"us vs grouped_mm+cast {ms_base * 1e3:6.0f} us x{ms_base / ms_fresh:.2f}")
    if not (rel < 1e-4 and zero and bit_equal and torch.isfinite(out).all()):
        bad.append(name)
# One compiled variant per (ACCUMULATE) for every token count: nothing depends on P
kernel = gw._grouped_wgrad_kernel
before = sum(len(v[0]) for v in kernel.device_caches.values())
for p in (16, 48, 2048, 2064, 4096, 18000):
    dy = torch.randn(p, 1408, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(p, 2048, device="cuda", dtype=torch.bfloat16)
    ends = torch.tensor([p // 32 * 16, p], device="cuda", dtype=torch.int32)
    gw.grouped_wgrad(dy, x, ends)
variants = sum(len(v[0]) for v in kernel.device_caches.values()) - before
print(f"new compiled variants for 6 token counts (shapes compiled above): {variants}")
if variants != 0:
    bad.append(f"{variants} variants")
print("RESULT", "PASS" if not bad else f"FAIL {bad}")
"""


@pytest.mark.gpu
def test_gpu_compiled_grouped_wgrad(compiled_check):
    compiled_check(_GPU_CHECK, "grouped_wgrad_gpu.txt")
