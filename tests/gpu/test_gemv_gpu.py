"""gemv compiled on the GPU (marker gpu; skipped without CUDA): the Moonlight-16B-A3B
and DeepSeek-V3 decode linear shapes against their references, one launch per call at M = 1
(torch.profiler), a CUDA-graph replay, and the tiny model's greedy tokens through the engine with
the model's projections on gemv (default) and on F.linear (MOERAY_FUSED_GEMV=0)."""

import os

import pytest
import torch

from tests.gpu.gemv_checks import captured, cuda_kernels, poison, tiny_greedy, within_rounding

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# fp32 Triton dots default to TF32 (the engine's other kernels): IEEE keeps fp32 paths comparable.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

# (N, K) of the dense decode projections (moeray/kernels/bench/gemv.py DECODE_LINEARS).
MOONLIGHT = [(3072, 2048), (576, 2048), (2048, 2048), (2816, 2048), (2048, 2816)]
V3 = [(1536, 7168), (576, 7168), (7168, 16384), (2048, 7168), (7168, 2048)]


def _x(m: int, k: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(m + k)
    x = torch.randn(m, k, device="cuda", generator=g)
    return (x * torch.logspace(-1, 1, m, device="cuda")[:, None]).to(dtype)


@pytest.mark.parametrize("nk", MOONLIGHT + V3 + [(163840, 2048), (7, 2048), (1, 200)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
def test_gemv_decode_shapes(nk, m):
    from moeray.kernels.gemv import gemv

    n, k = nk
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = _x(m, k)
    poison()
    within_rounding(gemv(x, w), x.float() @ w.float().t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_other_dtypes_and_strides(dtype):
    from moeray.kernels.gemv import gemv, gemv_ref

    w = torch.randn(576, 2048 + 64, device="cuda", dtype=dtype)
    x = _x(2, 2048 + 64, dtype).t().contiguous().t()  # strides (1, 2)
    y = gemv(x, w)
    ref32 = gemv_ref(x.float(), w.float())
    within_rounding(y, ref32)


@pytest.mark.parametrize("nk", MOONLIGHT + V3)
def test_one_launch_at_batch_1(nk):
    from moeray.kernels.gemv import gemv

    n, k = nk
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = _x(1, k)
    names = cuda_kernels(lambda: gemv(x, w))
    assert len(names) == 1 and "_gemv_kernel" in names[0], names


@pytest.mark.parametrize("n", [3072, 7])  # one launch; split-K and the reduce
def test_gemv_cuda_graph(n):
    from moeray.kernels.gemv import gemv

    w = torch.randn(n, 2048, device="cuda", dtype=torch.bfloat16)
    x = _x(1, 2048)
    eager = gemv(x, w)
    graph, y = captured(lambda: gemv(x, w))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    within_rounding(y, x.float() @ w.float().t())
    assert not torch.equal(y, eager)  # the replay read the new x


def _tiny_greedy(dtype, monkeypatch, fused: bool) -> tuple[list, int]:
    from moeray.kernels import gemv as gemv_module

    monkeypatch.setenv("MOERAY_FUSED_GEMV", "1" if fused else "0")
    return tiny_greedy(dtype, monkeypatch, gemv_module, "gemv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_greedy_unchanged_by_gemv(dtype, monkeypatch):
    fused, n_fused = _tiny_greedy(dtype, monkeypatch, fused=True)
    plain, n_plain = _tiny_greedy(dtype, monkeypatch, fused=False)
    assert n_fused > 0 and n_plain == 0, (n_fused, n_plain)  # decode rows (3) took gemv
    assert all(len(o) == 10 for o in fused)
    assert fused == plain
