"""FP8 (e4m3) block quantization and block-scaled GEMMs, DeepSeek-V3 recipe.

- quant:    act_quant (1x128 groups), act_quant_t (128x1, transposed), weight_quant (128x128
            blocks), weight_quant_t (weight_quant and W^T in one launch, [N, K] or stacked
            [E, N, K]), weight_dequant, and their PyTorch references
- gemm:     the Triton block-scaled GEMM (fp8_gemm_triton), its tile configs and occupancy
            (ctas_per_sm), and fp8_gemm_ref
- gemv:     fp8_gemv, the FP8-weight GEMM for decode (weight-only with x in bf16/fp16/fp32, or
            e4m3 x with act_quant's 1x128 scales into fp8 dots), fp8_gemv_ref, fp8_gemv_act_ref
            and fp8_gemv_workspace (its split-K tile counters)
- grouped:  fp8_gemm_grouped, the m-grouped GEMM of all experts in one launch
- dispatch: fp8_gemm (torch._scaled_mm where cuBLASLt computes the shape right, else Triton) and
            the three GEMMs of an FP8 linear layer (fp8_linear_forward / _dgrad / _wgrad)

This package exports the public functions of those modules; private names are imported from the
module that defines them.
"""

from moeray.kernels.fp8.dispatch import (
    fp8_gemm,
    fp8_linear_dgrad,
    fp8_linear_forward,
    fp8_linear_wgrad,
    native_blockscaled_layout,
    native_shape_ok,
)
from moeray.kernels.fp8.gemm import ctas_per_sm, fp8_gemm_ref, fp8_gemm_triton
from moeray.kernels.fp8.gemv import (
    fp8_gemv,
    fp8_gemv_act_ref,
    fp8_gemv_ref,
    fp8_gemv_workspace,
)
from moeray.kernels.fp8.grouped import fp8_gemm_grouped, fp8_gemm_grouped_ref
from moeray.kernels.fp8.quant import (
    act_quant,
    act_quant_ref,
    act_quant_t,
    act_quant_t_ref,
    dequant_rows_ref,
    weight_dequant,
    weight_dequant_ref,
    weight_quant,
    weight_quant_ref,
    weight_quant_t,
    weight_quant_t_ref,
)

__all__ = [
    "act_quant",
    "act_quant_ref",
    "act_quant_t",
    "act_quant_t_ref",
    "ctas_per_sm",
    "dequant_rows_ref",
    "fp8_gemm",
    "fp8_gemm_grouped",
    "fp8_gemm_grouped_ref",
    "fp8_gemm_ref",
    "fp8_gemm_triton",
    "fp8_gemv",
    "fp8_gemv_act_ref",
    "fp8_gemv_ref",
    "fp8_gemv_workspace",
    "fp8_linear_dgrad",
    "fp8_linear_forward",
    "fp8_linear_wgrad",
    "native_blockscaled_layout",
    "native_shape_ok",
    "weight_dequant",
    "weight_dequant_ref",
    "weight_quant",
    "weight_quant_ref",
    "weight_quant_t",
    "weight_quant_t_ref",
]
