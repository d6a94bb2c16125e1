"""The router-logits kernel (moeray.kernels.router_logits) against its PyTorch reference under the
interpreter at odd shapes: every product is exact in fp32, so the two differ only by the order of
the fp32 sum; the model Gate's one fast-path choice; the compiled kernel on the GPU (marker gpu)."""

import pytest
import torch

from moeray.kernels import router_logits as router_logits_mod
from moeray.kernels.common import ROUTE_BATCH_MAX_TOKENS
from moeray.kernels.router_logits import (
    MAX_TOKENS,
    ROW_MAX_TOKENS,
    router_logits,
    router_logits_applies,
    router_logits_ref,
)
from moeray.platform.config import tiny
from moeray.platform.model.moe import Gate


def _close_in_sum_order(out, ref, x, w):
    """|out - ref| within a few fp32 ulps of the sum of |products| (the reordering bound)."""
    scale = x.float().abs() @ w.float().abs().t()
    assert ((out - ref).abs() <= 8 * torch.finfo(torch.float32).eps * scale + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("T", "E", "D"),
    # one-row programs (E <= 128) and two-row ones (E = 257: the last half masked); D over
    # 2,048-feature steps with a partial last one (4,437 = 2 x 2,048 + 341)
    [(1, 1, 1), (3, 7, 100), (1, 64, 2048), (32, 9, 600), (3, 130, 2100), (1, 257, 4437)],
)
def test_router_logits_match_reference(dtype, T, E, D):
    g = torch.Generator().manual_seed(T * 1000 + E + D)
    x = torch.randn(T, D, generator=g).to(dtype)
    w = (torch.randn(E, D, generator=g) * 0.05).to(dtype)
    out = router_logits(x, w)
    assert out.dtype == torch.float32 and out.shape == (T, E)
    _close_in_sum_order(out, router_logits_ref(x, w), x, w)


def test_router_logits_past_the_kernels_rows_is_one_gemm(monkeypatch, launch_spy):
    # Past ROW_MAX_TOKENS a CUDA call is cuBLAS's fp32-output GEMM (CUDA only: its numbers are
    # the GPU check's), under the interpreter the reference; the kernel does not launch.
    x = torch.randn(ROW_MAX_TOKENS + 1, 64).bfloat16()
    w = (torch.randn(16, 64) * 0.1).bfloat16()
    kernel = launch_spy(router_logits_mod, "_router_logits_kernel")
    gemms = []

    def mm_fp32(a, b):
        gemms.append((tuple(a.shape), tuple(b.shape)))
        return router_logits_ref(a, b)

    monkeypatch.setattr(router_logits_mod, "_mm_fp32", mm_fp32)
    assert torch.equal(router_logits(x, w), router_logits_ref(x, w)) and not gemms
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    router_logits(x, w)
    assert gemms == [((ROW_MAX_TOKENS + 1, 64), (16, 64))] and not kernel
    router_logits(x[:ROW_MAX_TOKENS], w)
    assert len(gemms) == 1 and len(kernel) == 1


def test_router_logits_inputs_and_applies(monkeypatch):
    x, w = torch.randn(2, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    with pytest.raises(ValueError, match="weight has shape"):
        router_logits(x, w[:, :7])
    with pytest.raises(ValueError, match="weight has dtype"):
        router_logits(x, w.half())
    assert router_logits_applies(x, w)
    assert not router_logits_applies(x.float(), w.float())  # an fp32 model: no copies to save
    monkeypatch.delenv("MOERAY_FUSED_ROUTE_BATCH", raising=False)
    # decode batches to ROUTE_BATCH_MAX_TOKENS (cuBLAS's fp32-output GEMM), prefill not
    assert router_logits_applies(torch.zeros(ROUTE_BATCH_MAX_TOKENS, 8).bfloat16(), w)
    assert not router_logits_applies(torch.zeros(ROUTE_BATCH_MAX_TOKENS + 1, 8).bfloat16(), w)
    monkeypatch.setenv("MOERAY_FUSED_ROUTE_BATCH", "0")  # the A/B switch: the kernel's own bound
    assert router_logits_applies(torch.zeros(MAX_TOKENS, 8).bfloat16(), w)
    assert not router_logits_applies(torch.zeros(MAX_TOKENS + 1, 8).bfloat16(), w)
    monkeypatch.setenv("MOERAY_FUSED_GATE_LOGITS", "0")
    assert not router_logits_applies(x, w)


def test_gate_chooses_the_kernel_only_for_cuda_inference(monkeypatch, launch_spy):
    from moeray.kernels import router_logits as mod

    gate = Gate(tiny())
    torch.nn.init.normal_(gate.weight, std=0.1)
    gate = gate.bfloat16()
    x = torch.randn(3, tiny().hidden_size).bfloat16()
    launches = launch_spy(mod, "_router_logits_kernel")
    with torch.no_grad():
        assert torch.equal(gate.logits(x), router_logits_ref(x, gate.weight))  # CPU: reference
        assert not launches
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        out = gate.logits(x)
    assert len(launches) == 1
    _close_in_sum_order(out, router_logits_ref(x, gate.weight), x, gate.weight)
    gate.logits(x)  # gradients wanted (training): the reference
    assert len(launches) == 1


@pytest.mark.gpu
def test_router_logits_compiled_on_gpu(compiled_check):
    compiled_check(
        """
import torch
from moeray.kernels.router_logits import router_logits, router_logits_ref
bad = 0
for E, D in ((64, 2048), (256, 7168), (7, 100)):
    for T in (1, 5, 32, 33, 64, 256):
        x = torch.randn(T, D, device="cuda").bfloat16()
        w = (torch.randn(E, D, device="cuda") * 0.02).bfloat16()
        out, ref = router_logits(x, w), router_logits_ref(x, w)
        scale = x.float().abs() @ w.float().abs().t()
        # The kernel (T <= 32) sums in fp32 in its own order: 8 ulps of the sum of |products|.
        # Past 32 rows cuBLAS's tensor-core GEMM sums in fp32 in blocks: sqrt(D) ulps.
        ulps = 8 if T <= 32 else max(8, D ** 0.5)
        ratio = float(((out - ref).abs() / (ulps * 1.2e-7 * scale + 1e-30)).max())
        ok = ratio <= 1
        same_top = torch.equal(out.topk(min(6, E)).indices, ref.topk(min(6, E)).indices)
        bad += not ok
        print(E, D, T, "ok" if ok else "MISMATCH", "max diff", float((out - ref).abs().max()),
              "of the bound", round(ratio, 3), "top-6 same:", same_top,
              "bit-equal:", torch.equal(out, ref))
print("RESULT PASS" if bad == 0 else f"RESULT FAIL {bad}")
""",
        "router-logits-gpu.log",
    )
