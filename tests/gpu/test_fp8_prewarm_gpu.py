"""FP8 training GEMMs on the GPU: token padding keeps results, and `prewarm` leaves no kernel to
compile or load mid-step (a mid-step module load deadlocked NCCL ranks: platform/fp8.py)."""

import random

import pytest
import torch

from moeray.platform import fp8

# moeray.kernels is imported inside the tests: imported at collection it would bind its Triton
# kernels before tests/kernels/conftest.py turns on the CPU interpreter for the kernel tests.
pytestmark = pytest.mark.gpu

TRITON_KERNELS = (  # (module under moeray.kernels.fp8, kernel)
    ("quant", "_act_quant_kernel"),
    ("quant", "_act_quant_t_kernel"),
    ("gemm", "_fp8_gemm_kernel"),
    ("quant", "_weight_quant_t_kernel"),  # QuantizedWeight: W and W^T in one launch
)


def _compiled() -> dict[str, int]:
    import importlib

    # Triton keeps one compiled kernel per specialization key in device_caches[device][0]
    return {
        name: sum(
            len(c[0])
            for c in getattr(
                importlib.import_module(f"moeray.kernels.fp8.{module}"), name
            ).device_caches.values()
        )
        for module, name in TRITON_KERNELS
    }


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("m", [1, 130, 257])
def test_padded_gemms_match_cpu_emulation(m):
    # small()'s expert down projection: K = 288 is not a multiple of 128 (the Triton route)
    w = torch.randn(1024, 288)
    x, dy = torch.randn(m, 288), torch.randn(m, 1024)
    for name, gpu, cpu in (
        ("forward", fp8.forward_gemm(x.cuda(), w.cuda()), fp8.forward_gemm(x, w)),
        ("dgrad", fp8.dgrad_gemm(dy.cuda(), w.cuda()), fp8.dgrad_gemm(dy, w)),
        ("wgrad", fp8.wgrad_gemm(dy.cuda(), x.cuda()), fp8.wgrad_gemm(dy, x)),
    ):
        assert gpu.shape == cpu.shape
        # The same quantized values; the GPU's bf16 output and accumulation order differ from the
        # fp32 emulation (m = 1 measured 0.0209 on H200). A wrong pad or scale row gives O(1).
        assert _rel(gpu.cpu(), cpu) < 3e-2, name


def test_prewarm_covers_every_token_count():
    dev = torch.device("cuda")
    weights = {(288, 1024, torch.float32), (1024, 288, torch.float32), (384, 1024, torch.float32)}
    runs = fp8.prewarm(weights, fp8.padded_row_counts(1000), dev)
    assert runs == 3 * 3 * 8  # 3 shapes x 3 GEMMs x token counts 128..1024
    before = _compiled()
    assert before["_fp8_gemm_kernel"] > 0, "K = 288 and 1024 x 288 go to the Triton GEMM"
    rng = random.Random(0)
    for m in [1, 7, 16, 64, 65, 127, 128, 129, 500, 999, 1000] + [
        rng.randrange(1, 1001) for _ in range(20)
    ]:
        for n, k, _ in weights:
            w = torch.randn(n, k, device=dev)
            x = torch.randn(m, k, device=dev)
            dy = torch.randn(m, n, device=dev)
            fp8.forward_gemm(x, w), fp8.dgrad_gemm(dy, w), fp8.wgrad_gemm(dy, x)
    torch.cuda.synchronize()
    assert _compiled() == before, "a token count compiled a kernel variant that prewarm did not"


@pytest.mark.parametrize("m", [1, 130, 257])
def test_padded_bf16_matmuls_match_unpadded(m):
    from moeray.platform.parallel.weight_grad import (
        matmul_dgrad,
        matmul_forward,
        matmul_wgrad,
        prewarm_matmuls,
    )

    x, dy = torch.randn(m, 288, device="cuda"), torch.randn(m, 1024, device="cuda")
    w = torch.randn(1024, 288, device="cuda")
    bf = torch.bfloat16
    torch.testing.assert_close(matmul_forward(x, w, bf), x.to(bf) @ w.to(bf).t())
    torch.testing.assert_close(matmul_dgrad(dy.to(bf), w, bf), dy.to(bf) @ w.to(bf))
    torch.testing.assert_close(
        matmul_wgrad(dy.to(bf), x, bf).float(), (dy.t() @ x), rtol=2e-2, atol=0.5
    )
    assert (
        prewarm_matmuls(
            {(1024, 288, torch.float32)}, fp8.padded_row_counts(300), torch.device("cuda"), bf
        )
        == 3 * 3
    )


def test_cached_weights_give_the_same_gemms():
    """fp8.WeightCache on the GPU: the kernels' FP8 weight (and its transpose for the input grad)
    reused from the cache gives bit-identical GEMMs, and an in-place update is seen."""
    w = torch.nn.Parameter(torch.randn(2, 1024, 288, device="cuda"))
    x, dy = torch.randn(130, 288, device="cuda"), torch.randn(130, 1024, device="cuda")
    cache = fp8.WeightCache()
    for _ in range(2):
        q = cache.get(w[1])
        assert torch.equal(fp8.forward_gemm(x, w[1], q), fp8.forward_gemm(x, w[1]))
        assert torch.equal(fp8.dgrad_gemm(dy, w[1], q), fp8.dgrad_gemm(dy, w[1]))
        with torch.no_grad():
            w.mul_(0.5)
    assert cache.get(w[1]) is not q


@pytest.mark.parametrize("m", [1, 130])
def test_gemm_pairs_equal_the_single_gemms_on_gpu(m):
    x = torch.randn(m, 1024, device="cuda")
    wa, wb = torch.randn(288, 1024, device="cuda"), torch.randn(288, 1024, device="cuda")
    ya, yb = fp8.forward_gemm_pair(x, fp8.QuantizedWeight(wa), fp8.QuantizedWeight(wb))
    assert torch.equal(ya, fp8.forward_gemm(x, wa)) and torch.equal(yb, fp8.forward_gemm(x, wb))
    dya, dyb = torch.randn(m, 288, device="cuda"), torch.randn(m, 288, device="cuda")
    dwa, dwb = fp8.wgrad_gemm_pair(dya, dyb, x)
    assert torch.equal(dwa, fp8.wgrad_gemm(dya, x)) and torch.equal(dwb, fp8.wgrad_gemm(dyb, x))
