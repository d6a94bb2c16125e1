"""Shared pieces of the kernels: the FP8 format's constants (their one definition: the model's
checkpoint quantization and the FP8 training emulation import them from here), input checks with
clear errors, interpreter detection, the e4m3 and bf16 rounding helpers that keep Triton's CPU
interpreter exact, the exp and silu that PyTorch's CUDA kernels compute (`neg_exp`, `silu_rn`,
`swiglu_rn`: the inference and the training SwiGLU kernels share them), and the one choice of
programmatic dependent launch (`pdl_launch`, `pdl_wait`).

Imports torch and triton only; never touches CUDA at import time.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # the GPU path's precise expf; the interpreter cannot call libdevice and never reaches it
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - every supported Triton (3.x) has it
    libdevice = None

FP8_DTYPE = torch.float8_e4m3fn
# torch float dtypes as Triton's, for dtype constexprs
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
FP8_MAX = 448.0  # largest finite e4m3fn value; scale = amax / 448 (DeepSeek-V3 recipe)
FP8_BLOCK = 128  # one scale per 1x128 activation group and per 128x128 weight block
# A zero group would give scale 0 and 0/0; clamping amax keeps zero groups at q = 0, scale ~2e-15.
AMAX_FLOOR = 1e-12
# The same numbers for Triton kernels: a @triton.jit function may read only constexpr globals.
TL_FP8_MAX = tl.constexpr(FP8_MAX)
TL_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=16)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: launch heuristics ask on every call);
    4 for CPU tensors, so the interpreter exercises several programs per launch."""
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def switched_off(name: str) -> bool:
    """Whether MOERAY_FUSED_<name>=0 is set: the A/B switch that keeps a fused kernel's PyTorch
    reference (the engine bench records each switch)."""
    return os.environ.get(f"MOERAY_FUSED_{name}", "1") == "0"


def switched_on(name: str) -> bool:
    """Whether MOERAY_FUSED_<name>=1 is set: the opt-in switch of a fused kernel that is off by
    default (unmeasured on a GPU, or measured slower); the engine bench records it as "0" unset."""
    return os.environ.get(f"MOERAY_FUSED_{name}", "0") == "1"


# Decode batches the MoE router's fast paths take (router_logits: cuBLAS's fp32-output GEMM past
# 32 rows; moe_gate): past 32 rows the reference runs ~14 launches a layer (topk's sort and
# gather, fp32 casts, an fp32 SIMT GEMM). On an H200 at batch 64 the engine runs 7.3% (Moonlight
# bf16) / 9.3% (FP8) / 1.7-2.1% (V3 widths) more tokens/s with them, batch 1 unchanged within
# the run's spread (benchmarks/results/engine-nvidia-h200-*-ab.json). MOERAY_FUSED_ROUTE_BATCH=0
# keeps their own 32-row bound (the A/B switch).
ROUTE_BATCH_MAX_TOKENS = 256


def route_max_tokens(default: int) -> int:
    """Rows up to which a router kernel runs: ROUTE_BATCH_MAX_TOKENS, or the kernel's own
    `default` when MOERAY_FUSED_ROUTE_BATCH=0."""
    return default if switched_off("ROUTE_BATCH") else ROUTE_BATCH_MAX_TOKENS


@functools.lru_cache(maxsize=16)
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_launch(device: torch.device) -> bool:
    """Whether the decode kernels launch with programmatic dependent launch (PDL): the one place
    that decides. True on CUDA devices of compute capability >= 9.0 (griddepcontrol is sm_90 PTX;
    ROCm reports gfx9 as 9.x and has no PDL), compiled (not under the interpreter, which has no
    griddepcontrol), unless MOERAY_FUSED_PDL=0 (the A/B switch; the engine bench records it).
    A kernel takes it twice: as its `PDL` constexpr (so the interpreter and older GPUs compile the
    plain kernel) and as the launch option `launch_pdl`.

    What PDL allows: a kernel launched with it may start while its predecessor in the stream still
    runs, as soon as every program of the predecessor has called gdc_launch_dependents (or
    exited). In a CUDA graph of 108 dependent 8.4 MB GEMVs on an H200 a GEMV took 3.80 us plain,
    3.67 with PDL and 3.40 with each program loading its weight tile before the wait
    (benchmarks/results/pdl-probe-nvidia-h200.json). The rule a kernel with PDL follows, so that
    it computes what the plain kernel computes (scripts/pdl_ptx_check.py lists the kernels and
    checks it in their sm_90 PTX):
    - every program calls `pdl_wait` (gdc_wait, then gdc_launch_dependents), unconditionally and
      before any early return: the wait returns once the predecessor has completed and its memory
      is visible, and this kernel's own completion then implies its predecessor's, which is what
      the kernel after it relies on;
    - before the wait it only READS tensors that no kernel of the step writes (weights, weight
      scales) and never one that its wrapper has just made (a `.contiguous()` copy is the kernel
      right before it); it WRITES nothing, and touches no atomics, tile counters or workspaces;
    - everything else (activations, caches, routing ids, counters, every store) comes after;
      one exception: a tensor that the kernel launched right before this one does not write,
      where the caller promises it or the launches guarantee it (moe_gemv's `early_shared` reads
      x, the norm's output two launches back; its down kernel with MOERAY_FUSED_MOE_DOWN_EARLY=1
      the gate's ids, the gate/up launch always between). A kernel starts only once every
      program of its predecessor has passed that predecessor's own wait (or the predecessor,
      launched plainly, started after its own predecessor ended), so everything two launches
      back has completed.
    Calling gdc_launch_dependents right after the wait is safe: a dependent runs only its own
    pre-wait part (weight reads) early and waits in its own gdc_wait for this kernel's completion.
    A plain kernel between two PDL ones is correct too; it only ends the overlap there.
    """
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    if interpreting() or switched_off("PDL"):
        return False
    return (
        _cuda_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9
    )


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """With PDL (`pdl_launch`): wait for the predecessor kernel's completion and memory, then let
    the dependents launch. Without: nothing (the plain kernel)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def load_k_step(ptrs, k0, stride_k, offs_k, K, EVEN_K: tl.constexpr):
    """One K step [rows, BLOCK_K] of an operand at k0 (`offs_k` the step's column offsets); a
    ragged last step (not EVEN_K) reads zeros past K."""
    if EVEN_K:
        v = tl.load(ptrs + k0 * stride_k)
    else:
        v = tl.load(ptrs + k0 * stride_k, mask=offs_k[None, :] < K - k0, other=0.0)
    return v


@triton.jit
def load_k_block(ptrs, offs_k, k_left, EVEN_K: tl.constexpr):
    """A K block of an operand in either layout: offs_k is broadcast along the K axis of ptrs
    ([1, BK] for [rows, BK] tiles, [BK, 1] for [BK, cols]); a ragged last block (not EVEN_K)
    reads zeros past K (k_left: K minus the block's start)."""
    if EVEN_K:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=offs_k < k_left, other=0.0)
    return x


@triton.jit
def scaled_block_dot(acc, a, b, a_s, b_s, ROW_SCALE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + (a @ b) promoted with a's row scales a_s [BM] and b's scales b_s (one scalar with
    ROW_SCALE, else [BN]): one 128-deep K block of the FP8 block-scaled GEMMs (DeepSeek-V3
    recipe)."""
    if UPCAST:  # the CPU interpreter has no fp8 matmul of its own: same math in fp32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if ROW_SCALE:
        # b_s is one scalar for the whole tile (128x128 weight blocks, BLOCK_N <= 128): fold it into
        # the row scale first, so the promotion is one FMA per accumulator element instead of a
        # multiply plus an FMA (H200 sweep: 0.555x -> 0.699x of _scaled_mm at 4096x2112x7168).
        out = acc + tl.dot(a, b) * (a_s * b_s)[:, None]
    else:  # per-column b scales (1x128 row groups of the weight-grad GEMM, or BLOCK_N > 128)
        out = acc + tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    return out


def precise_exp() -> bool:
    """The PRECISE argument of kernels calling `neg_exp`: libdevice's expf, compiled on the GPU;
    the interpreter's numpy exp under TRITON_INTERPRET=1."""
    return not interpreting() and libdevice is not None


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter."""
    return all(t.is_cuda for t in tensors) or interpreting()


def check_tensor(
    t: object,
    name: str,
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    ndim: int | None = None,
    contiguous: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise ValueError naming `name`, the bad value and what is accepted."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; accepted: {', '.join(map(str, dtypes))}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}"
        )
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all inputs on one device)")
    return t


def check_shape(t: torch.Tensor, name: str, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


@triton.jit
def round_to_e4m3(x):
    """Round fp32 values (already clamped to +-448) to the e4m3 grid, nearest-even, in fp32.

    Triton's interpreter (3.6-3.9) converts fp32 -> e4m3 wrongly when rounding carries into the
    exponent (124.4 -> 64 instead of 128). Rounding here first makes the final cast exact, so CPU
    tests check the same function the GPU computes with its native cvt.rn.satfinite.
    """
    bits = x.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    # e4m3: 3 mantissa bits, smallest normal exponent -6; subnormal spacing 2^-9.
    exp = tl.maximum(exp, -6)
    ulp = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)
    v = x / ulp
    r = tl.floor(v)
    d = v - r
    half_r = r * 0.5
    r_is_odd = tl.floor(half_r) != half_r
    up = (d > 0.5) | ((d == 0.5) & r_is_odd)
    r = tl.where(up, r + 1.0, r)
    return r * ulp


@triton.jit
def to_e4m3(x, EXACT: tl.constexpr):
    """fp32 (clamped to +-448) -> e4m3; EXACT rounds in fp32 first (interpreter only)."""
    if EXACT:
        x = round_to_e4m3(x)
    return x.to(tl.float8e4nv)


@triton.jit
def to_dtype_rn(x, dtype: tl.constexpr):
    """fp32 -> `dtype`, round to nearest even. For bf16 the rounding is done on the bits first:
    Triton's interpreter (3.9) truncates fp32 -> bf16 (the GPU's cvt rounds to nearest), so the
    final cast is exact and CPU tests check what the GPU computes (3 integer ops a value)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def neg_exp(x, PRECISE: tl.constexpr):
    """exp(-x) of fp32 x. PRECISE: libdevice's expf, what PyTorch's CUDA kernels call (Triton's
    own tl.exp is ex2.approx, a few ulp off); else tl.exp, numpy's exp under the interpreter (up
    to an ulp from torch's CPU exp)."""
    if PRECISE:
        e = libdevice.exp(-x)
    else:
        e = tl.exp(-x)
    return e


@triton.jit
def silu_rn(x, e, dtype: tl.constexpr):
    """silu(x) = x / (1 + e) with e = neg_exp(x) (fp32, IEEE division), rounded to `dtype`:
    PyTorch's CUDA silu."""
    return to_dtype_rn(tl.math.div_rn(x, 1.0 + e), dtype)


@triton.jit
def swiglu_rn(g, u, PRECISE: tl.constexpr):
    """silu(g) * u as PyTorch's CUDA kernels compute it: silu in fp32 rounded to g's dtype, then
    that times u in fp32, rounded again."""
    gf = g.to(tl.float32)
    act = silu_rn(gf, neg_exp(gf, PRECISE), g.dtype)
    return to_dtype_rn(act.to(tl.float32) * u.to(tl.float32), g.dtype)


def check_gradient_out(
    t: torch.Tensor, name: str, shape: tuple[int, ...], device: torch.device
) -> None:
    """ValueError unless `t` can take `+=` in a GEMM's epilogue: fp32, contiguous, `shape`, on
    `device` (a weight's gradient summed over micro-batches)."""
    check_tensor(t, name, dtypes=(torch.float32,), ndim=len(shape), contiguous=True, device=device)
    check_shape(t, name, shape)


def check_tile_config(cfg: dict, keys: frozenset[str], tiles: tuple[str, ...]) -> None:
    """ValueError naming a bad tile config: exactly the keys `keys`, each key of `tiles` a power
    of two >= 16 (a side of a tl.dot operand), every other value >= 1."""
    if cfg.keys() != keys:
        raise ValueError(f"config keys {sorted(cfg)}: need exactly {sorted(keys)}")
    for key in tiles:
        v = cfg[key]
        if v < 16 or v & (v - 1):
            raise ValueError(f"{key}={v}: must be a power of two >= 16 (tl.dot)")
    low = {k: v for k, v in cfg.items() if k not in tiles and v < 1}
    if low:
        raise ValueError(f"config {cfg}: {', '.join(sorted(low))} must be >= 1")


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def is_pow2(v: int) -> bool:
    """v is a power of two (1, 2, 4, ...)."""
    return v > 0 and v & (v - 1) == 0
