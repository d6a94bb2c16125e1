"""The k-grouped FP8 GEMM (`kernels/fp8/kgrouped.py`: every expert's weight gradient in one
launch, each reducing over its own token range) against per-expert `fp8_gemm`, under the
interpreter; the compiled GPU check below."""

import pytest
import torch

from moeray.kernels import fp8
from moeray.kernels.fp8.kgrouped import fp8_gemm_kgrouped, fp8_gemm_kgrouped_ref


def _quantized_t(p: int, width: int, seed: int):
    """act_quant_t of a [P, width] activation whose 128-token blocks differ in magnitude, so a
    tile that reads another expert's tokens or scales is off by far more than rounding."""
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(p, width, generator=g)
        * torch.logspace(-1, 1, p // 128).repeat_interleave(128)[:, None]
    )
    return fp8.act_quant_t(x)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("tokens", [[256, 0, 128, 384], [0, 128, 0], [512]])
def test_kgrouped_gemm_matches_per_expert_gemms(tokens):
    M, N = 101, 167  # neither a multiple of the tiles: ragged row and column tiles
    p = sum(tokens)
    a, a_s = _quantized_t(p, M, seed=len(tokens))
    b, b_s = _quantized_t(p, N, seed=len(tokens) + 10)
    ends = torch.tensor(tokens, dtype=torch.int32).cumsum(0).to(torch.int32)
    out = fp8_gemm_kgrouped(a, a_s, b, b_s, ends, out_dtype=torch.float32)
    assert out.shape == (len(tokens), M, N)
    start = 0
    for e, n in enumerate(tokens):
        t, tb = slice(start, start + n), slice(start // 128, (start + n) // 128)
        if n == 0:
            assert out[e].abs().max() == 0, (
                f"expert {e} has no tokens: its gradient must be exactly 0"
            )
        else:
            want = fp8.fp8_gemm_ref(a[:, t], a_s[:, tb], b[:, t], b_s[:, tb], torch.float32)
            # fp32 sums in another order (per 128-token block, then scaled): ~1e-7 relative; a
            # token block or scale of another expert: O(1)
            assert _rel(out[e], want) < 1e-5, (e, _rel(out[e], want))
        start += n
    ref = fp8_gemm_kgrouped_ref(a, a_s, b, b_s, ends, torch.float32)
    assert _rel(out, ref) < 1e-5


def test_kgrouped_gemm_accumulates_into_a_gradient():
    """accumulate_into: the product added in the epilogue equals the fresh fp32 product added
    afterwards, bit for bit (one fp32 add of the same two values), for every expert, the one
    without tokens included; a bf16 or misshaped target is refused by name."""
    tokens = [128, 0, 256]
    M, N = 70, 131
    a, a_s = _quantized_t(sum(tokens), M, seed=4)
    b, b_s = _quantized_t(sum(tokens), N, seed=5)
    ends = torch.tensor(tokens, dtype=torch.int32).cumsum(0).to(torch.int32)
    grad = torch.randn(len(tokens), M, N, generator=torch.Generator().manual_seed(6))
    want = grad + fp8_gemm_kgrouped(a, a_s, b, b_s, ends, out_dtype=torch.float32)
    got = fp8_gemm_kgrouped(a, a_s, b, b_s, ends, accumulate_into=grad)
    assert got is grad
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="accumulate_into"):
        fp8_gemm_kgrouped(a, a_s, b, b_s, ends, accumulate_into=grad.to(torch.bfloat16))
    with pytest.raises(ValueError, match="accumulate_into"):
        fp8_gemm_kgrouped(a, a_s, b, b_s, ends, accumulate_into=grad[:, :, :-1].contiguous())


@pytest.mark.parametrize("tokens", [[128, 0, 256], [0, 384, 0]])
def test_kgrouped_gemm_reads_no_token_past_the_last_end(tokens):
    """A device-planned layout (`GroupedExperts` given counts as a tensor) has P past the last
    expert's end, 3 blocks here: the kernel reduces expert e over [ends[e - 1], ends[e]) only,
    so NaN codes and inf scales in the tail change nothing, and the result equals the same call
    on the tokens up to ends[-1], bit for bit. A last expert without tokens included."""
    M, N = 70, 131
    p, tail = sum(tokens), 3 * 128
    a, a_s = _quantized_t(p + tail, M, seed=12)
    b, b_s = _quantized_t(p + tail, N, seed=13)
    ends = torch.tensor(tokens, dtype=torch.int32).cumsum(0).to(torch.int32)
    cut = [t[:, : p // d].contiguous() for t, d in ((a, 1), (a_s, 128), (b, 1), (b_s, 128))]
    want = fp8_gemm_kgrouped(*cut, ends, out_dtype=torch.float32)
    for q, scale in ((a, a_s), (b, b_s)):
        q.view(torch.uint8)[:, p:] = 0x7F  # e4m3fn NaN
        scale[:, p // 128 :] = float("inf")
    got = fp8_gemm_kgrouped(a, a_s, b, b_s, ends, out_dtype=torch.float32)
    assert torch.equal(got, want)


def test_kgrouped_gemm_bf16_output_and_input_errors():
    a, a_s = _quantized_t(256, 64, seed=1)
    b, b_s = _quantized_t(256, 32, seed=2)
    ends = torch.tensor([128, 256], dtype=torch.int32)
    out = fp8_gemm_kgrouped(a, a_s, b, b_s, ends)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 64, 32)
    with pytest.raises(ValueError, match=r"ends=\[100, 256\]"):
        fp8_gemm_kgrouped(a, a_s, b, b_s, torch.tensor([100, 256], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"ends=\[256, 128\]"):
        fp8_gemm_kgrouped(a, a_s, b, b_s, torch.tensor([256, 128], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"ends=\[128, 384\]"):
        fp8_gemm_kgrouped(a, a_s, b, b_s, torch.tensor([128, 384], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"ends has dtype torch\.int64"):
        fp8_gemm_kgrouped(a, a_s, b, b_s, ends.long())
    with pytest.raises(ValueError, match=r"out_dtype=torch\.float16"):
        fp8_gemm_kgrouped(a, a_s, b, b_s, ends, out_dtype=torch.float16)
    empty = fp8_gemm_kgrouped(
        a[:, :0], a_s[:, :0], b[:, :0], b_s[:, :0], torch.zeros(2, dtype=torch.int32)
    )
    assert empty.shape == (2, 64, 32) and empty.abs().max() == 0
    with pytest.raises(ValueError, match="P must match"):
        fp8_gemm_kgrouped(a, a_s, b[:, :128].contiguous(), b_s[:, :1], ends)
    with pytest.raises(ValueError, match="b_fp8 must be contiguous"):
        fp8_gemm_kgrouped(a, a_s, b[:, :128], b_s[:, :1], ends)


_GPU_CHECK = r"""
import torch
from moeray.kernels import fp8
from moeray.kernels.fp8 import kgrouped

torch.manual_seed(0)
bad = []
# small()'s experts (I 288, D 1024, ~512 tokens each, some without), Moonlight's (64 experts,
# I 1408, D 2048, ~384 tokens each at 4096 tokens top-6) and V3-sized ones.
for tokens, m, n in [([512, 0, 384, 640] * 8, 288, 1024), ([512, 0, 384, 640] * 8, 1024, 288),
                     ([384, 0, 256, 512] * 16, 1408, 2048), ([384, 0, 256, 512] * 16, 2048, 1408),
                     ([1024, 1152, 0, 896] * 2, 2048, 7168), ([128, 0, 256], 160, 256)]:
    p = sum(tokens)
    scale = torch.logspace(-1, 1, p // 128, device="cuda").repeat_interleave(128)[:, None]
    a, a_s = fp8.act_quant_t(torch.randn(p, m, device="cuda") * scale)
    b, b_s = fp8.act_quant_t(torch.randn(p, n, device="cuda"))
    ends = torch.tensor(tokens, device="cuda").cumsum(0).to(torch.int32)
    torch.empty(1 << 28, device="cuda").fill_(float("nan"))  # freed NaNs: an unwritten tile shows
    out = kgrouped.fp8_gemm_kgrouped(a, a_s, b, b_s, ends, out_dtype=torch.float32)
    ref = kgrouped.fp8_gemm_kgrouped_ref(a, a_s, b, b_s, ends, torch.float32)
    rel = ((out - ref).norm() / ref.norm()).item()
    zero = all(out[e].abs().max().item() == 0 for e, t in enumerate(tokens) if t == 0)
    per = [
        fp8.fp8_gemm(a[:, s:s + t], a_s[:, s // 128:(s + t) // 128],
                     b[:, s:s + t], b_s[:, s // 128:(s + t) // 128])
        for s, t in zip([0] + ends.tolist()[:-1], tokens) if t
    ]
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(10):  # fp32 out: the variant compiled above (the variant count below is bf16)
        kgrouped.fp8_gemm_kgrouped(a, a_s, b, b_s, ends, out_dtype=torch.float32)
    t1.record()
    torch.cuda.synchronize()
    ms = t0.elapsed_time(t1) / 10
    tflops = 2 * m * n * p / ms / 1e9
    print(f"E{len(tokens)} M{m} N{n} P{p}: rel {rel:.2e} vs ref, empty experts zero: {zero}, "
          f"{ms * 1e3:.0f} us, {tflops:.0f} TFLOP/s")
    ok = rel < 1e-2 and zero and torch.isfinite(out).all()
    if not (ok and len(per) == sum(t > 0 for t in tokens)):
        bad.append(f"M{m} N{n}")
# One compiled variant for every token count: P / 128 (the scales' row stride) odd, even, 1 and a
# multiple of 16 must not each compile their own (a mid-step compile hung multi-GPU training).
m, n = 96, 160
before = sum(len(v[0]) for v in kgrouped._fp8_gemm_kgrouped_kernel.device_caches.values())
for p in (128, 384, 2048, 2176, 4096):
    a, a_s = fp8.act_quant_t(torch.randn(p, m, device="cuda"))
    b, b_s = fp8.act_quant_t(torch.randn(p, n, device="cuda"))
    ends = torch.tensor([p // 2 // 128 * 128, p], device="cuda", dtype=torch.int32)
    kgrouped.fp8_gemm_kgrouped(a, a_s, b, b_s, ends)
kernel = kgrouped._fp8_gemm_kgrouped_kernel
variants = sum(len(v[0]) for v in kernel.device_caches.values()) - before
print(f"compiled variants for 5 token counts: {variants}")
if variants != 1:
    bad.append(f"{variants} variants")
print("RESULT", "PASS" if not bad else f"FAIL {bad}")
"""


def test_gpu_compiled_kgrouped_gemm(compiled_check):
    compiled_check(_GPU_CHECK, "fp8_kgrouped_gpu.txt")


def test_kgrouped_gemm_config_override_and_errors():
    """A swept tile (`config`) gives the default tile's result; a bad one is refused by name."""
    tokens = [128, 256]
    a, a_s = _quantized_t(sum(tokens), 48, seed=7)
    b, b_s = _quantized_t(sum(tokens), 40, seed=8)
    ends = torch.tensor(tokens, dtype=torch.int32).cumsum(0).to(torch.int32)
    want = fp8_gemm_kgrouped(a, a_s, b, b_s, ends, torch.float32)
    cfg = dict(BLOCK_M=32, BLOCK_N=16, GROUP_M=2, num_warps=4, num_stages=1)
    got = fp8_gemm_kgrouped(a, a_s, b, b_s, ends, torch.float32, config=cfg)
    assert _rel(got, want) < 1e-6
    with pytest.raises(ValueError, match="BLOCK_N=24"):
        fp8_gemm_kgrouped(a, a_s, b, b_s, ends, config=dict(cfg, BLOCK_N=24))
    with pytest.raises(ValueError, match="config keys"):
        fp8_gemm_kgrouped(a, a_s, b, b_s, ends, config=dict(cfg, BLOCK_K=64))
    with pytest.raises(ValueError, match="num_stages must be >= 1"):
        fp8_gemm_kgrouped(a, a_s, b, b_s, ends, config=dict(cfg, num_stages=0))
