"""The m-grouped FP8 GEMM (`fp8_gemm_grouped`: all experts' rows in one launch) against its
PyTorch reference and against per-expert `fp8_gemm`, under the interpreter."""

import warnings

import pytest
import torch

from moeray.kernels import fp8


def _experts(e: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # each expert's weights at its own scale: a tile reading another expert's b or scales fails
    w = torch.randn(e, n, k, generator=g) * torch.logspace(-1, 1, e).reshape(e, 1, 1)
    qs = [fp8.weight_quant_ref(w[i]) for i in range(e)]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


@pytest.mark.parametrize("blocks", [[2, 0, 1], [1, 1, 2, 0]])
def test_grouped_gemm_matches_per_expert_gemms(blocks):
    E, N, K = 3, 160, 256  # N not a multiple of 128: each expert's last column tile is ragged
    b, b_s = _experts(E, N, K, seed=len(blocks))
    rows = 128 * len(blocks)
    x = torch.randn(rows, K)
    x[100:128] = 0.0  # the zero padding rows at the end of an expert's last block
    a, a_s = fp8.act_quant(x, scale_col_major=True)
    block_expert = torch.tensor(blocks, dtype=torch.int32)
    out = fp8.fp8_gemm_grouped(a, a_s, b, b_s, block_expert)
    ref = fp8.fp8_gemm_grouped_ref(a, a_s, b, b_s, block_expert)
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    for i, e in enumerate(blocks):  # the same as one fp8_gemm per block
        r = slice(128 * i, 128 * (i + 1))
        torch.testing.assert_close(out[r], fp8.fp8_gemm(a[r], a_s[r], b[e], b_s[e]))
    assert out[100:128].abs().max() == 0


def test_grouped_gemm_transposed_b_for_the_input_grad():
    """dx = dy W: b is each expert's W^T, a strided view of [E, N, K] (no copy), scales
    transposed."""
    E, N, K = 2, 256, 160
    w, w_s = _experts(E, N, K, seed=7)
    dy = torch.randn(256, N)
    a, a_s = fp8.act_quant(dy, scale_col_major=True)
    block_expert = torch.tensor([1, 0], dtype=torch.int32)
    out = fp8.fp8_gemm_grouped(a, a_s, w.transpose(1, 2), w_s.transpose(1, 2), block_expert)
    ref = fp8.fp8_gemm_grouped_ref(a, a_s, w.transpose(1, 2), w_s.transpose(1, 2), block_expert)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def _poisoned_empty(monkeypatch) -> None:
    """Float outputs of torch.empty start as NaN: rows a kernel leaves unwritten show (plain
    torch.empty could hand back an earlier call's bytes)."""
    real = torch.empty

    def empty(*shape, **kw):
        t = real(*shape, **kw)
        return t.fill_(float("nan")) if t.dtype in (torch.float32, torch.bfloat16) else t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("blocks", [[1, -1, -1], [-1, 0, 2, -1], [-1, -1]])
def test_grouped_gemm_skips_blocks_without_an_expert(blocks, monkeypatch):
    """Blocks of expert -1 (a device-planned layout's tail, `GroupedExperts.block_expert`) are
    skipped by the kernel and the reference: no arithmetic on their rows of a (NaN codes and inf
    scales here), exact zeros in their rows of c (over the NaN torch.empty gives here), and every
    other block equal, bit for bit, to the same call with the -1 blocks given an expert. Odd
    shapes: N = K = 136 (two 128 scale blocks each way, the last column tile and K block ragged:
    8 wide), a -1 block between experts, only -1 blocks."""
    E, N, K = 3, 136, 136
    b, b_s = _experts(E, N, K, seed=11)
    x = torch.randn(128 * len(blocks), K, generator=torch.Generator().manual_seed(12))
    a, a_s = fp8.act_quant(x, scale_col_major=True)
    skipped = [i for i, e in enumerate(blocks) if e < 0]
    for i in skipped:
        r = slice(128 * i, 128 * (i + 1))
        a.view(torch.uint8)[r] = 0x7F  # e4m3fn NaN
        a_s[r] = float("inf")
    ids = torch.tensor(blocks, dtype=torch.int32)
    filled = torch.tensor([i % E if e < 0 else e for i, e in enumerate(blocks)], dtype=torch.int32)
    with warnings.catch_warnings():  # NaN * scale in the blocks given an expert: expected here
        warnings.simplefilter("ignore", RuntimeWarning)
        want = {
            f: f(a, a_s, b, b_s, filled) for f in (fp8.fp8_gemm_grouped, fp8.fp8_gemm_grouped_ref)
        }
    _poisoned_empty(monkeypatch)
    for f, w in want.items():
        with warnings.catch_warnings():  # ...but none in the skipped ones: numpy would warn
            warnings.simplefilter("error", RuntimeWarning)
            out = f(a, a_s, b, b_s, ids)
        for i in range(len(blocks)):
            r = slice(128 * i, 128 * (i + 1))
            if i in skipped:
                assert out[r].eq(0).all() and not out[r].signbit().any(), (f.__name__, i)
            else:
                assert torch.equal(out[r], w[r]) and torch.isfinite(out[r].float()).all()
    kept = [
        r for i in range(len(blocks)) if i not in skipped for r in range(128 * i, 128 * i + 128)
    ]
    kernel, ref = want[fp8.fp8_gemm_grouped][kept], want[fp8.fp8_gemm_grouped_ref][kept]
    torch.testing.assert_close(kernel.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_grouped_gemm_input_errors():
    b, b_s = _experts(2, 128, 128, seed=1)
    a, a_s = fp8.act_quant(torch.randn(200, 128), scale_col_major=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8.fp8_gemm_grouped(a, a_s, b, b_s, torch.zeros(2, dtype=torch.int32))
    a, a_s = fp8.act_quant(torch.randn(256, 128), scale_col_major=True)
    with pytest.raises(ValueError, match="block_expert"):
        fp8.fp8_gemm_grouped(a, a_s, b, b_s, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="b_scale"):
        fp8.fp8_gemm_grouped(a, a_s, b, b_s[:, :, :0], torch.zeros(2, dtype=torch.int32))
    for ids, named in (([0, 2], 2), ([-2, 1], -2)):  # 2 experts: ids in [0, 2) or -1
        with pytest.raises(ValueError, match=rf"block_expert holds \[{named}\]"):
            fp8.fp8_gemm_grouped(a, a_s, b, b_s, torch.tensor(ids, dtype=torch.int32))


_GPU_CHECK = r"""
import torch
from moeray.kernels import fp8

torch.manual_seed(0)
bad = []
shapes = [(32, 512, 288, 1024), (32, 512, 1024, 288), (8, 256, 2048, 7168), (3, 128, 160, 256)]
for e, per, n, k in shapes:
    scale = torch.logspace(-1, 1, e, device="cuda").reshape(e, 1, 1)
    w = torch.randn(e, n, k, device="cuda") * scale
    qs = [fp8.weight_quant(w[j]) for j in range(e)]
    b, b_s = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    a, a_s = fp8.act_quant(torch.randn(e * per, k, device="cuda"), scale_col_major=True)
    blocks = torch.arange(e, device="cuda", dtype=torch.int32).repeat_interleave(per // 128).flip(0)
    for name, bb, bs in (("forward", b, b_s), ("input grad", None, None)):
        if bb is None:  # W^T per expert as a strided view, with a [P, N]-wide a
            a, a_s = fp8.act_quant(torch.randn(e * per, n, device="cuda"), scale_col_major=True)
            bb, bs = b.transpose(1, 2), b_s.transpose(1, 2)
        out = fp8.fp8_gemm_grouped(a, a_s, bb, bs, blocks).float()
        ref = fp8.fp8_gemm_grouped_ref(a, a_s, bb, bs, blocks).float()
        rel = ((out - ref).norm() / ref.norm()).item()
        print(f"E{e} x {per} N{n} K{k} {name}: rel {rel:.2e}")
        if not (rel < 1e-2 and torch.isfinite(out).all()):
            bad.append(f"E{e} N{n} K{k} {name}")
print("RESULT", "PASS" if not bad else f"FAIL {bad}")
"""


def test_gpu_compiled_grouped_gemm(compiled_check):
    compiled_check(_GPU_CHECK, "fp8_grouped_gpu.txt")


@pytest.mark.parametrize("inter", [160, 128], ids=["gate-up-apart", "gate-up-one-weight"])
def test_grouped_fp8_experts_through_the_triton_kernels(inter):
    """The training path's grouped FP8 experts (parallel/experts_mlp.py `_GroupedFP8`) with the
    Triton kernels themselves (interpreted), against the per-expert FP8 emulation. The kernel
    promotes each 128-deep K block into its fp32 accumulator with its scales, the emulation
    multiplies dequantized matrices: the sums round differently, and the bf16 outputs then feed
    e4m3 quantization (a flip is a whole e4m3 step), so the bound is 5%; a wrong
    expert, block or scale gives O(1). At I 128 gate and up run as one weight (quantized into
    the halves of one, [dg, du] side by side), at I 160 apart."""
    from moeray.platform import fp8 as f8
    from moeray.platform.parallel.experts_mlp import experts_mlp

    g = torch.Generator().manual_seed(3)
    rows, D = [3, 0, 9], 128
    x = torch.randn(sum(rows), D, generator=g).bfloat16().float()
    ws = [
        torch.randn(len(rows), *s, generator=g) * 0.2 for s in ((inter, D), (inter, D), (D, inter))
    ]
    outs = []
    for grouped in (False, True):
        xi = x.clone().requires_grad_()
        wi = [w.clone().requires_grad_() for w in ws]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = experts_mlp(xi, *wi, rows, fp8=True, cache=f8.WeightCache(), grouped_fp8=grouped)
        (y.float() * torch.linspace(-1, 1, D)).sum().backward()
        outs.append((y.float(), xi.grad, *(w.grad for w in wi)))
    # the weight grads: one fp8_gemm per expert on slices of one 128x1 quantization
    for name, i in (("y", 0), ("dx", 1), ("dW1", 2), ("dW3", 3), ("dW2", 4)):
        rel = ((outs[1][i] - outs[0][i]).norm() / outs[0][i].norm()).item()
        assert rel < 5e-2, (name, rel)  # measured 0.019 (y), 0.021 (dx)
    assert all(outs[1][i][1].abs().max() == 0 for i in (2, 3, 4))  # expert 1 has no rows


def test_grouped_fp8_kgrouped_experts_from_device_counts_through_the_triton_kernels(monkeypatch):
    """The same experts with k-grouped weight gradients, counts as a list and as a tensor with
    the chooser forced (`GroupedExperts.device_layout`, CUDA in production): the device plan
    (P 384 where the exact size is 256: a block of expert -1 at the end) through the
    interpreted kernels gives the list's outputs and gradients bit for bit. An expert without
    rows, one of exactly 128. At I 128 (gate and up as one weight): the -1 blocks go through the
    same grouped GEMMs as at I 160 in fewer tiles (17 -> 11 s); test_pipeline.py runs the device
    plan at I 160 (gate and up apart) through the kernels' references."""
    from moeray.platform import fp8 as f8
    from moeray.platform.parallel.experts_mlp import GroupedExperts, experts_mlp

    monkeypatch.setattr(GroupedExperts, "device_layout", staticmethod(lambda x, **kw: True))
    g = torch.Generator().manual_seed(4)
    rows, D, inter = [2, 0, 128], 128, 128
    x = torch.randn(sum(rows), D, generator=g).bfloat16().float()
    ws = [
        torch.randn(len(rows), *s, generator=g) * 0.2 for s in ((inter, D), (inter, D), (D, inter))
    ]
    outs = []
    for counts in (rows, torch.tensor(rows)):
        xi = x.clone().requires_grad_()
        wi = [w.clone().requires_grad_() for w in ws]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = experts_mlp(
                xi,
                *wi,
                counts,
                fp8=True,
                cache=f8.WeightCache(),
                grouped_fp8=True,
                kgrouped_wgrad=True,
            )
        (y.float() * torch.linspace(-1, 1, D)).sum().backward()
        outs.append((y.float(), xi.grad, *(w.grad for w in wi)))
    for name, a, b in zip(("y", "dx", "dW1", "dW3", "dW2"), *outs, strict=True):
        assert torch.equal(b, a) and bool(torch.isfinite(b).all()), name
    assert all(outs[1][i][1].abs().max() == 0 for i in (2, 3, 4))  # expert 1 has no rows


@pytest.mark.parametrize("n", [256, 160])  # whole 128-row blocks; a ragged last block
def test_stacked_weight_equals_each_expert_quantized_alone(n, launch_spy):
    """StackedWeight (all experts' weights for the grouped GEMM) holds exactly what quantizing
    each expert on its own gives (blocks never straddle two experts), and W^T per expert, bit for
    bit what a transposing copy gives, all from one launch."""
    from moeray.kernels.fp8 import quant
    from moeray.platform.fp8 import StackedWeight

    w = torch.randn(3, n, 200, generator=torch.Generator().manual_seed(n)) * 4
    grids = launch_spy(quant, "_weight_quant_t_kernel")
    stacked = StackedWeight(w)
    assert grids == [(-(-n // 128), 2, 3)]
    for e in range(3):
        q, s = fp8.weight_quant(w[e])
        assert torch.equal(stacked.q[e].float(), q.float()) and torch.equal(stacked.scale[e], s)
    assert stacked.q.shape == (3, n, 200) and stacked.scale.shape == (3, -(-n // 128), 2)
    q_EKN, s_EKN = stacked.transposed
    assert q_EKN.is_contiguous() and s_EKN.is_contiguous()
    assert torch.equal(
        q_EKN.view(torch.uint8), stacked.q.transpose(1, 2).contiguous().view(torch.uint8)
    )
    assert torch.equal(s_EKN, stacked.scale.transpose(1, 2).contiguous())
    assert len(grids) == 1  # `transposed` launches nothing


def test_quantized_weight_makes_its_transpose_in_the_same_launch(monkeypatch, launch_spy):
    """QuantizedWeight's kernel path (CUDA in training; here the interpreter on CPU tensors):
    q_KN is q_NK.t().contiguous() bit for bit, made by the quantization's launch."""
    from moeray.kernels.fp8 import quant
    from moeray.platform import fp8 as f8

    monkeypatch.setattr(f8, "_kernels_for", lambda t: fp8)
    w = torch.randn(200, 136, generator=torch.Generator().manual_seed(5)) * 3
    grids = launch_spy(quant, "_weight_quant_t_kernel")
    wq = f8.QuantizedWeight(w)
    q, s = fp8.weight_quant(w)
    assert torch.equal(wq.q_NK.view(torch.uint8), q.view(torch.uint8)) and torch.equal(wq.scale, s)
    assert wq.q_KN.shape == (136, 200) and wq.q_KN.is_contiguous()
    assert torch.equal(wq.q_KN.view(torch.uint8), q.t().contiguous().view(torch.uint8))
    assert grids == [(2, 2, 1)]
