"""FP8 e4m3 weights with 128x128 block scales, as the official DeepSeek-V3 checkpoint stores them.

Each quantized weight W [N, K] comes with `weight_scale_inv` [ceil(N/128), ceil(K/128)] (fp32):
W ~= W_fp8 * scale_inv per block, scale_inv = amax(block) / 448 (448 = e4m3's largest normal).
Dimensions that are not multiples of 128 get a partial last block (the official code masks it).

These are the PyTorch references; `moeray.kernels` has the Triton versions for the GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from moeray.kernels.common import FP8_BLOCK, FP8_DTYPE, FP8_MAX, switched_off, switched_on
from moeray.kernels.fp8 import act_quant, fp8_gemm, fp8_gemv, fp8_gemv_workspace

# Rows up to which FP8Linear runs the weight-only fp8_gemv instead of act_quant + fp8_gemm. At
# decode batch sizes the layer is a weight read: fp8_gemv reads the e4m3 bytes once with x in
# bf16 and needs no act_quant launch, where act_quant + the 64-row-tile GEMM took 24 x 68 us per
# V3-width step at batch 1 on an H200 (benchmarks/results/engine-nvidia-h200-v3-fp8.json). Above
# this the tensor-core GEMM on quantized activations wins as the work turns compute-bound;
# `moeray bench kernels --only fp8_gemv` times both at M = 1, 8, 64 for tuning this bound.
FP8_GEMV_MAX_ROWS = 16
# With MOERAY_FUSED_FP8_GEMV_BATCH=1 (opt-in: at batch 64 on an H200 the engine ran 2.3% more
# tokens/s at Moonlight FP8, 4.0% fewer at V3 widths: results/engine-nvidia-h200-*-fp8-ab.json)
# decode batches up to this many rows take fp8_gemv too, with fewer K splits (kernels/fp8/gemv.py
# `_gemv_config`). Why:
# at 64 rows the block-scaled GEMM (its kernel name says 128 x 128 tiles) covers the rows with one
# tile per 128 weight rows, so small layers run on a few SMs (H200, V3's q_a: 17.5 us for 2.3 us
# of bytes, bf16 F.linear 11.0; benchmarks/notes-engine.md), where fp8_gemv puts 64 weight rows on
# each program and the tokens on the MMA's narrow side.
FP8_GEMV_BATCH_MAX_ROWS = 64


def fp8_gemv_max_rows() -> int:
    """Rows up to which FP8Linear (and an FP8 MergedLinear off the 128-grid) runs fp8_gemv:
    FP8_GEMV_MAX_ROWS, or FP8_GEMV_BATCH_MAX_ROWS with MOERAY_FUSED_FP8_GEMV_BATCH=1."""
    return FP8_GEMV_BATCH_MAX_ROWS if switched_on("FP8_GEMV_BATCH") else FP8_GEMV_MAX_ROWS


# An FP8Linear of at most FP8_AS_BF16_MAX_WEIGHTS weights runs F.linear over a kept bf16 copy of
# its weight (dequantized once, `dequantized_weight`; made up front by `keep_bf16_copies`) from
# fp8_gemv_max_rows() + 1 (FP8_AS_BF16_SMALL_MIN_ROWS by default, below) to FP8_AS_BF16_MAX_ROWS
# rows, in place of act_quant + the block-scaled GEMM (or the parts of a ragged merged stack);
# MOERAY_FUSED_FP8_AS_BF16=0 keeps the FP8 path. Half-precision activations only (`fp8_as_bf16`).
# Why: at 64 rows on an H200 such a layer is latency-bound, and bf16 F.linear beat act_quant + the
# GEMM on every layer up to 14.7M weights (V3's q_a 11.3 us vs 18.6, kv_a 9.7 vs 17.9, a shared
# expert's gate 13.4 vs 24.6 and down 10.4 vs 11.5) and lost from 37.7M up (q_b 22.3 vs 18.8,
# o_proj, the dense MLP; benchmarks/results/kernels-nvidia-h200-gemv.json, its fp8_gemv rows).
# In the engine at batch 64 (benchmarks/results/engine-nvidia-h200-{moonlight,v3}-fp8-ab2.json):
# Moonlight FP8 +9.8% tokens/s (graph 7.53 -> 6.79 ms), V3 widths +2.8%, batch 1 unchanged.
# Weight-only, as fp8_gemv (x is not rounded to e4m3); the copy costs 2 more bytes a weight
# (Moonlight: 1.6 GB; DeepSeek-V3: q_a + kv_a and the shared down, ~60 MB a layer).
FP8_AS_BF16_MAX_ROWS = 64
HALF_DTYPES = (torch.bfloat16, torch.float16)  # the activations that run the kept copies
FP8_AS_BF16_MAX_WEIGHTS = 16 * 2**20
# The kept copies also run from this many rows up to fp8_gemv_max_rows() (MOERAY_FUSED_FP8_AS_BF16_
# SMALL=0 keeps fp8_gemv there; so does the opt-in FP8_GEMV_BATCH). Measured with `bench engine
# --ab` on an H100, decode graph time against fp8_gemv at those rows: the copies from 5 rows
# (benchmarks/results/engine-nvidia-h100-80gb-hbm3-{moonlight,v3}-fp8-small.json) Moonlight FP8
# batch 8 1.003 (even), batch 16 0.985, V3 widths batch 16 0.984; from 9 rows (`-small2.json`,
# the switch flipped off against them) fp8_gemv 1.024x at batch 12, 1.002x at 16; batch 1
# unchanged. At 8 rows fp8_gemv reads q + kv_a (7.5 MB e4m3) and o_proj in ~8.5 us a call, about
# what cuBLAS takes for the bf16 copy's twice the bytes.
FP8_AS_BF16_SMALL_MIN_ROWS = 9


def fp8_as_bf16(rows: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether an FP8 [n, k] layer at `rows` rows of `dtype` activations runs as F.linear over its
    kept copy in that dtype (unless MOERAY_FUSED_FP8_AS_BF16=0; see FP8_AS_BF16_MAX_ROWS and
    FP8_AS_BF16_SMALL_MIN_ROWS). Half activations only: an fp32 model keeps fp32 numbers
    (fp8_gemv's weight-only dots), where a bf16 copy cost the tiny model 2.2e-3 relative logit
    error (tests/gpu/test_fp8_kv_cache_gpu.py bounds it at 1e-5)."""
    if dtype not in HALF_DTYPES:
        return False
    low = fp8_gemv_max_rows() + 1
    # (with the opt-in FP8_GEMV_BATCH, fp8_gemv keeps its rows up to 64: no small-row copies)
    if low == FP8_GEMV_MAX_ROWS + 1 and not switched_off("FP8_AS_BF16_SMALL"):
        low = FP8_AS_BF16_SMALL_MIN_ROWS
    return fp8_as_bf16_layer(n, k) and low <= rows <= FP8_AS_BF16_MAX_ROWS


def fp8_as_bf16_layer(n: int, k: int) -> bool:
    """Whether an FP8 [n, k] layer runs as bf16 at some row counts (`fp8_as_bf16`): it keeps a
    bf16 copy of its weight."""
    return not switched_off("FP8_AS_BF16") and n * k <= FP8_AS_BF16_MAX_WEIGHTS


def keep_bf16_copies(modules: Iterable[nn.Module], dtype: torch.dtype) -> int:
    """Make now the `dtype` copies that the FP8Linear layers among `modules` which run as bf16
    (`fp8_as_bf16_layer`) keep, so that a serving engine counts their memory before it sizes its
    KV cache instead of meeting them at its first batch of 9-64 rows. Returns their bytes (a copy
    already kept counts too); none for an fp32 model, whose FP8 layers never run them
    (`fp8_as_bf16`)."""
    if dtype not in HALF_DTYPES:
        return 0
    total = 0
    for m in modules:
        if isinstance(m, FP8Linear) and fp8_as_bf16_layer(m.out_features, m.in_features):
            total += m.dequantized_weight(dtype).nbytes
    return total


def quantize_fp8_blocks(
    w_NK: torch.Tensor, block: int = FP8_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (e4m3 [..., N, K], fp32 scale_inv [..., ceil(N/b), ceil(K/b)])."""
    if w_NK.dim() < 2:
        raise ValueError(f"need a matrix (or a stack of them), got shape {tuple(w_NK.shape)}")
    *lead, N, K = w_NK.shape
    nb, kb = -(-N // block), -(-K // block)
    w = F.pad(w_NK.float(), (0, kb * block - K, 0, nb * block - N))
    blocks = w.reshape(*lead, nb, block, kb, block)
    amax = blocks.abs().amax(dim=(-3, -1))
    scale_inv = (amax / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(*lead, nb * block, kb * block)[..., :N, :K].contiguous(), scale_inv


def dequantize_fp8_blocks(
    q_NK: torch.Tensor,
    scale_inv: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    block: int = FP8_BLOCK,
) -> torch.Tensor:
    *lead, N, K = q_NK.shape
    nb, kb = -(-N // block), -(-K // block)
    if tuple(scale_inv.shape) != (*lead, nb, kb):
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(q_NK.shape)}: "
            f"expected {(*lead, nb, kb)} for {block}x{block} blocks"
        )
    s = scale_inv.float().repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :N, :K]
    return (q_NK.float() * s).to(dtype)


class FP8Linear(nn.Module):
    """A linear layer that keeps its weight in FP8 plus block scales (inference).

    On a GPU, `forward` picks the kernel (`forward_kernels`): fp8_gemv (weight-only, x
    unquantized) for up to `fp8_gemv_max_rows()` rows (8 for small layers, below) and for any N or
    K that is not a multiple of 128; with MOERAY_FUSED_FP8_GEMV_ACT=1, act_quant + fp8_gemv on
    e4m3 x (fp8 dots) instead at those rows when N and K are multiples of 128; bf16 F.linear over
    a kept dequantized copy for small layers from 9 to 64 rows of bf16/fp16 x (`fp8_as_bf16`;
    MOERAY_FUSED_FP8_AS_BF16=0 turns it off); act_quant + the block-scaled fp8_gemm otherwise.
    Elsewhere it dequantizes and runs a plain matmul in the activation dtype.

    `gemv_workspace` holds fp8_gemv's split-K tile counters for up to FP8_GEMV_BATCH_MAX_ROWS rows,
    so a split-K call is one launch. It is a non-persistent buffer: moved with the module, not in
    the state dict; zero between calls (each call leaves it so), and zeroed again whenever the
    module's tensors are replaced (`to_empty` leaves new buffers uninitialized). A layer runs on one
    stream at a time: two of its calls in flight at once would share the counters."""

    # buffers, registered in __init__
    weight: torch.Tensor  # e4m3 [N, K]
    weight_scale_inv: torch.Tensor  # fp32 [ceil(N/128), ceil(K/128)]
    gemv_workspace: torch.Tensor  # int32 [tiles], non-persistent

    def __init__(self, weight_fp8: torch.Tensor, scale_inv: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight_fp8)
        self.register_buffer("weight_scale_inv", scale_inv.float())
        rows = FP8_GEMV_BATCH_MAX_ROWS  # the opt-in bound: as many counters as at 16 rows
        workspace = fp8_gemv_workspace(weight_fp8.shape[0], rows, weight_fp8.device)
        self.register_buffer("gemv_workspace", workspace, persistent=False)
        # dequantized_weight's copy (a plain attribute: not in the state dict, not moved by .to)
        self._dequantized: torch.Tensor | None = None
        self._dequantized_key: tuple[object, ...] = ()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FP8Linear:
        # Every move and conversion of the module's tensors comes through here, to_empty's too,
        # and fp8_gemv needs the counters at zero: one small memset per move, never in a step.
        super()._apply(fn, recurse)
        self.gemv_workspace.zero_()
        return self

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def _dequantized_key_of(self, dtype: torch.dtype) -> tuple[object, ...]:
        w, s = self.weight, self.weight_scale_inv
        return (dtype, w.device, w.data_ptr(), w._version, s.data_ptr(), s._version)

    def dequantized_kept(self, dtype: torch.dtype) -> bool:
        """Whether `dequantized_weight(dtype)` returns the kept copy (no dequantization now)."""
        key = self._dequantized_key_of(dtype)
        return self._dequantized is not None and key == self._dequantized_key

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a `dtype` matrix, for code that reads the matrix itself rather than
        applying the layer (MLA's absorbed path). Dequantized at the first call and kept until the
        weight, the scales, their device or `dtype` change."""
        w, s = self.weight, self.weight_scale_inv
        key = self._dequantized_key_of(dtype)
        if self._dequantized is None or key != self._dequantized_key:
            # A normal tensor even when first asked under inference_mode (the engine's step): an
            # inference tensor could not be saved for backward by a later forward with autograd.
            with torch.inference_mode(False), torch.no_grad():
                self._dequantized = dequantize_fp8_blocks(w, s, dtype)
            self._dequantized_key = key
        return self._dequantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            y = self.forward_kernels(x.reshape(-1, x.shape[-1]))
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, dequantize_fp8_blocks(self.weight, self.weight_scale_inv, x.dtype))

    def forward_kernels(self, x2: torch.Tensor) -> torch.Tensor:
        """`forward`'s GPU path on x2 [M, K] (float, rows flattened): the one place that picks the
        kernel. Runs on CPU tensors under Triton's interpreter too (the kernel tests)."""
        if fp8_as_bf16(x2.shape[0], self.out_features, self.in_features, x2.dtype):
            return F.linear(x2, self.dequantized_weight(x2.dtype))
        aligned = x2.shape[-1] % FP8_BLOCK == 0 and self.out_features % FP8_BLOCK == 0
        rows_ok = x2.shape[0] <= fp8_gemv_max_rows()
        if rows_ok and aligned and switched_on("FP8_GEMV_ACT"):
            # Opt-in: fp8 x fp8 dots skip the weight-only gemv's in-register weight convert but
            # add an act_quant launch and round x to 1x128 e4m3 groups. On an H200 the kernel won
            # 1.45x at M = 8 on V3's big layers and lost at M = 1 (the act_* columns of
            # benchmarks/results/kernels-nvidia-h200-gemvmma.json); in the engine V3 FP8 batch 1
            # gained 2% and Moonlight lost at every batch (benchmarks/notes-engine.md). Aligned
            # layers only: ragged ones (kv_a, N = 576, and merged stacks off the 128-grid) keep
            # the weight-only numbers at any M (below).
            xq, xs = act_quant(x2)
            return fp8_gemv(
                xq,
                self.weight,
                self.weight_scale_inv,
                x_scale=xs,
                out_dtype=x2.dtype,
                workspace=self.gemv_workspace,
            )
        if rows_ok or not aligned:
            # Weight-only, exact up to fp32 summation order: ragged layers (kv_a_proj_with_mqa,
            # N = 576) keep the dequantized model's numbers at any M, with no per-call
            # dequantization of the whole weight.
            # Above fp8_gemv_max_rows() (ragged layers only) the workspace may have too few
            # counters, and the heuristic's many K splits make a serial reduction slow: the
            # two-launch split-K, whose extra launch is small next to prefill.
            ws = self.gemv_workspace if rows_ok else None
            return fp8_gemv(x2, self.weight, self.weight_scale_inv, workspace=ws)
        xq, xs = act_quant(x2.to(torch.bfloat16).contiguous())
        return fp8_gemm(xq, xs, self.weight, self.weight_scale_inv)


def set_fp8_expert_weight(
    experts: nn.Module, name: str, q: torch.Tensor, scale_inv: torch.Tensor
) -> None:
    """Store one stacked expert projection ([E, N, K]) of an `Experts` module as e4m3 plus
    `<name>_scale_inv` [E, N/128, K/128]; `Experts` dequantizes one expert at a time when it
    runs."""
    if name in experts._parameters:
        del experts._parameters[name]
    experts.register_buffer(name, q)
    experts.register_buffer(f"{name}_scale_inv", scale_inv.float())
