"""fp8_gemm: the block-scaled e4m3 GEMM on the backend that suits the shape, and the three GEMMs of
an FP8 linear layer.

torch's native block-scaled `torch._scaled_mm` (cuBLASLt) runs where it works on this torch and GPU
(probed once per device against the reference) and the shape suits it (`native_shape_ok`), else
the Triton kernel of `gemm.py`. fp8_linear_forward / fp8_linear_dgrad / fp8_linear_wgrad are the
forward and the two backward GEMMs of y = x W^T, so all three GEMMs of a linear layer run in FP8.
"""

from __future__ import annotations

import functools

import torch

from moeray.kernels.common import FP8_DTYPE, cdiv, check_tensor, use_triton
from moeray.kernels.fp8.gemm import _check_gemm_inputs, fp8_gemm_ref, fp8_gemm_triton
from moeray.kernels.fp8.quant import FLOAT_IN, act_quant, act_quant_t, weight_quant


def _scaled_mm_call(a, a_scale_cm, b, b_scale, b_layout: str):
    """torch._scaled_mm with 1x128 a-scales and b-scales in the layout `b_layout` names."""
    if b_layout == "t_view":  # (KB, NB or N) view of the row-major (NB or N, KB) tensor
        sb = b_scale.t()
    else:  # "t_contig": the same values, contiguous
        sb = b_scale.t().contiguous()
    return torch._scaled_mm(a, b.t(), scale_a=a_scale_cm, scale_b=sb, out_dtype=torch.bfloat16)


@functools.lru_cache(maxsize=8)
def native_blockscaled_layout(device_index: int, per_row_b: bool) -> str | None:
    """Probe once per device: which b-scale layout torch._scaled_mm accepts and computes right.

    Returns "t_view" or "t_contig", or None where this torch/GPU has no block-scaled _scaled_mm
    (torch < 2.9, cuBLASLt < 12.9, not sm_90). The probe compares against fp8_gemm_ref, so a layout
    that runs but reads scales wrongly is rejected.
    """
    if not hasattr(torch, "_scaled_mm"):
        return None
    dev = torch.device("cuda", device_index)
    if torch.cuda.get_device_capability(dev)[0] != 9:
        return None  # cuBLASLt's 1x128/128x128 float32 block scaling is a Hopper (sm_90) mode
    g = torch.Generator(device=dev).manual_seed(0)
    m, n, k = 256, 384, 512
    a, sa = act_quant(torch.randn(m, k, device=dev, generator=g), scale_col_major=True)
    w = torch.randn(n, k, device=dev, generator=g)
    # Scales that vary strongly per block, so a layout mix-up cannot pass by accident.
    w = (
        w
        * torch.rand(
            n // 128 if not per_row_b else n, 1, device=dev, generator=g
        ).repeat_interleave(128 if not per_row_b else 1, 0)
        * 10
    )
    if per_row_b:
        b, sb = act_quant(w)
    else:
        b, sb = weight_quant(w)
    ref = fp8_gemm_ref(a, sa, b, sb).float()
    for layout in ("t_view", "t_contig"):
        try:
            out = _scaled_mm_call(a, sa, b, sb, layout).float()
        except (RuntimeError, NotImplementedError):
            continue
        if (out - ref).norm() / ref.norm() < 1e-2:
            return layout
    return None


def native_shape_ok(m: int, n: int, k: int, b_scale_div: int) -> bool:
    """Whether torch._scaled_mm (cuBLASLt) can compute a [M, K] x b [N, K]^T right, from the shape.

    cuBLASLt needs 16-byte aligned leading dims (N % 16, 1x128 a-scale columns of M floats: M % 4)
    and whole 128-wide K groups. 128x128 b-scales: cuBLASLt reads them with a leading dimension of
    round_up(KB, 4) (cuBLAS docs, "scaling factors layouts"; pytorch PR #166752), while torch's
    _scaled_mm accepts only the unpadded [NB, KB] layout (stride(0) == KB in ScaledBlas.cpp
    is_blockwise_128x128_scaling) and passes it through unchecked. So for KB % 4 != 0 and NB > 1
    no accepted layout is read right: K = 384 (KB = 3, small()'s q_lora_rank) reads block row nb
    at 4 * nb, the wrong scales, and the last rows past the end of the 3 * NB scales (stale
    allocator memory: any value, inf/NaN included). Those shapes go to Triton. 1x128 b-scales
    (the weight-grad GEMM) have no padding rule. The probe (K = 512, KB = 4) cannot see this.
    K = 128 with 128x128 b-scales (one K block, N = 128) is refused by cuBLASLt on an H200
    (CUBLAS_STATUS_NOT_SUPPORTED, torch 2.11; tests/gpu/test_merge_projections_gpu.py's
    128-wide model): Triton too.
    """
    if m <= 0 or m % 4 or n % 16 or k % 128:
        return False
    kb = k // 128
    return b_scale_div == 1 or kb % 4 == 0 or (cdiv(n, 128) == 1 and kb > 1)


def fp8_gemm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-scaled e4m3 GEMM: a [M, K] x b [N, K]^T -> [M, N] bf16 with fp32 accumulation.

    a_scale [M, KB]: 1x128 groups (any strides; strides (1, M) from act_quant(scale_col_major=True)
    avoid a copy on the native path). b_scale [NB, KB] per 128x128 block (weights) or [N, KB] per
    1x128 row group (the weight-grad GEMM). backend: "auto" (native when the probe accepts it and
    the shape suits cuBLASLt, else Triton), "native", "triton", or "ref".
    """
    if backend not in ("auto", "native", "triton", "ref"):
        raise ValueError(f"backend={backend!r}; accepted: auto, native, triton, ref")
    div = _check_gemm_inputs(a_fp8, a_scale, b_fp8, b_scale)
    if backend == "ref" or (backend == "auto" and not use_triton(a_fp8)):
        return fp8_gemm_ref(a_fp8, a_scale, b_fp8, b_scale)
    m, k = a_fp8.shape
    n = b_fp8.shape[0]
    if backend in ("auto", "native") and a_fp8.is_cuda:
        shape_ok = native_shape_ok(m, n, k, div)
        layout = native_blockscaled_layout(a_fp8.device.index or 0, div == 1) if shape_ok else None
        if layout is not None:
            a = a_fp8 if a_fp8.stride(1) == 1 else a_fp8.contiguous()
            b = b_fp8 if b_fp8.stride(1) == 1 else b_fp8.contiguous()
            sa = a_scale if a_scale.stride(0) == 1 else a_scale.t().contiguous().t()
            return _scaled_mm_call(a, sa, b, b_scale.contiguous(), layout)
        if backend == "native":
            raise ValueError(
                f"backend='native': torch._scaled_mm block scaling is unavailable for M={m}, "
                f"N={n}, K={k} on this torch/GPU (needs sm_90, cuBLASLt >= 12.9, K % 128 == 0, "
                f"N % 16 == 0, M % 4 == 0, M > 0, and for 128x128 b-scales K/128 % 4 == 0 or "
                f"N <= 128; see native_shape_ok)"
            )
    return fp8_gemm_triton(a_fp8, a_scale, b_fp8, b_scale)


def fp8_linear_forward(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T with x quantized 1x128 on the fly and W in 128x128 blocks."""
    xq, xs = act_quant(x, scale_col_major=x.dim() == 2)
    return fp8_gemm(xq, xs, w_fp8, w_scale, backend=backend)


def fp8_linear_dgrad(
    dy: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    w_t_fp8: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Input grad dx [M, K] = dy [M, N] @ W [N, K], dy quantized 1x128 along N.

    W's 128x128 blocks transpose exactly, so W^T reuses the same scales (transposed). Pass w_t_fp8
    (W^T contiguous, [K, N]) to skip the transposing copy of the weight.
    """
    check_tensor(dy, "dy", dtypes=FLOAT_IN, ndim=2)
    check_tensor(w_fp8, "w_fp8", dtypes=(FP8_DTYPE,), ndim=2)
    if dy.shape[1] != w_fp8.shape[0]:
        raise ValueError(f"dy [M, N] has N={dy.shape[1]} but w_fp8 [N, K] has N={w_fp8.shape[0]}")
    dyq, dys = act_quant(dy, scale_col_major=True)
    if w_t_fp8 is None:
        w_t_fp8 = w_fp8.t() if backend == "triton" else w_fp8.t().contiguous()
    return fp8_gemm(dyq, dys, w_t_fp8, w_scale.t().contiguous(), backend=backend)


def fp8_linear_wgrad(dy: torch.Tensor, x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Weight grad dW [N, K] = dy^T [N, M] @ x [M, K], both re-tiled to 128x1 (groups of 128
    tokens)."""
    check_tensor(dy, "dy", dtypes=FLOAT_IN, ndim=2)
    check_tensor(x, "x", dtypes=FLOAT_IN, ndim=2)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy has {dy.shape[0]} tokens but x has {x.shape[0]}: they must match")
    dyt, dyt_s = act_quant_t(dy)  # [N, M], [N, MB]
    xt, xt_s = act_quant_t(x)  # [K, M], [K, MB]
    return fp8_gemm(dyt, dyt_s, xt, xt_s, backend=backend)
