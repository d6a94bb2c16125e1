"""AdamW's update of a list of fp32 parameters in one launch, with fp32 or bf16 moments:
`adamw_step`, its PyTorch reference `adamw_step_ref`, and the test `adamw_step_applies` by which
the optimizer (`moeray.platform.train.zero.ShardedAdamW`, chooser `use_fused_adamw`) picks it.

Legend: N tensors in a call, n_i elements of tensor i, BLOCK elements a loop iteration, CHUNK =
BLOCK * ITERS elements a program, t the step (1 on the first update).

Math, in fp32 per element (host: w = 1 - beta1, bc1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t) in
double, each scalar rounded once to fp32 as torch rounds a Python scalar):
  g = grad / grad_scale                      (grad_scale None, or a 0-dim fp32 device tensor)
  m = lerp(m, g, w)                          torch.lerp's formula: fma(w, g - m, m) for |w| < 0.5,
                                             else fma(w - 1, g - m, g)
  v = fma((1 - beta2) * g, g, beta2 * v)     (what addcmul_ computes on the CPU)
  p = p * (1 - lr * weight_decay)            (decoupled weight decay, before the step)
  p = p + (-lr / bc1) * m / (sqrt(v) / c2 + eps)
m and v are stored in their dtype (bf16: rounded to nearest even, as `.copy_` does); the update of
p uses the unrounded fp32 m and v, as the reference does.

Why: issue 20 trains ~6.0B fp32 parameters (Moonlight widths, 10 layers) on one H200. torch's
fused AdamW keeps fp32 moments: 28 B a parameter a step (reads p, g, m, v; writes p, m, v), 168 GB,
57 ms measured (35 ms at 4.8 TB/s). bf16 moments were a Python loop of ~10 PyTorch ops a parameter
with fp32 temporaries. Here one pass moves 20 B a parameter with bf16 moments (reads p4 g4 m2 v2,
writes p4 m2 v2: ~25 ms at 4.8 TB/s for 6.0B) and the moments take 24 GB instead of 48.

Rounding: each line above is one IEEE fp32 operation (fma where written; the kernel is compiled
with enable_fp_fusion=False so no other multiply-add fuses, and uses div_rn / sqrt_rn). On the
CPU this is exactly what `adamw_step_ref` computes (torch's lerp and addcmul fuse as written,
measured in torch 2.13), except that torch's vectorized CPU sqrt is not correctly rounded (~0.6% of
values one ulp off): m and v agree bit for bit, p within about one ulp (tests/kernels/test_adamw.py
checks bit-equality with a correctly rounded sqrt swapped into the reference). On CUDA torch
computes addcmul as fma(1 - beta2, g * g, beta2 * v) and addcdiv as fma(-lr / bc1, m / denom, p),
and divides by the Python scalar c2 through its fp32 reciprocal: m should agree bit for bit
(lerp fuses as written there too), v within one ulp of its dtype (fp32: a few % of values; bf16:
rarely, where the fp32 values straddle a rounding boundary), p within a few ulps (the GPU check
prints the fractions).

Launch: one launch for all N tensors of a call (per gradient dtype; ShardedAdamW makes one call
per weight-decay group, 2 a step). A device table (int64 [6, N]: the addresses of p, g, m, v, n_i
and the running count of chunks) maps each program to its tensor: it counts the tensors whose
chunks end at or before its id (one vector load of up to TABLE_BLOCK = 256 entries; 10 Moonlight
layers have 139 tensors) and loads that tensor's addresses. Why not a launch per tensor: 139
launches a step, 40 of them for tensors under 1M elements (norms, the router's gate) whose few
microseconds of GPU work cost Triton's host-side launch (tens of microseconds each); here the
host builds a table (6.7 KB at N = 139), copies it through pinned memory (no host sync) and
launches once (`moeray bench kernels --only adamw` records the host time of a call). When every
address is 16-byte aligned (any allocation of torch's caching allocator) the kernel is told so:
full blocks can then load 16 bytes at a time; tail blocks are masked. Not CUDA-graph safe: the
table is rebuilt every call (gradients are new tensors every step).
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch.autograd.graph import increment_version

from moeray.kernels.common import (
    TL_DTYPES,
    cdiv,
    check_shape,
    check_tensor,
    check_tile_config,
    interpreting,
    switched_off,
    to_dtype_rn,
    use_triton,
)

DTYPES = (torch.float32, torch.bfloat16)  # of the moments (one per call) and of the gradients
CONFIG_KEYS = frozenset({"BLOCK", "ITERS", "num_warps"})
# 2048 elements a loop iteration over 8 warps: 8 a thread, two 16-byte loads of each fp32 operand
# and one of each bf16 moment; 16 iterations a program (CHUNK 32,768: 655 KB moved with bf16
# moments, ~150 us at an eighth of an H200 SM's share of 4.8 TB/s) against the table lookup at
# its start (three dependent loads, a few us; estimates, not measured). Not yet swept on a GPU:
# `moeray bench kernels --only adamw` times the candidates of bench/adamw.py.
DEFAULT_CONFIG = dict(BLOCK=2048, ITERS=16, num_warps=8)
# The interpreter runs numpy per program: small blocks keep CPU tests fast and make tensors of a
# few thousand elements span many chunks, full blocks and masked tails; the same code path.
INTERPRETER_CONFIG = dict(BLOCK=128, ITERS=2, num_warps=4)
# Entries of the table's chunk-count row one vector load reads (more tensors: a loop).
TABLE_BLOCK = 256


def _f32(x: float) -> float:
    """x rounded to the nearest fp32 value (what torch does to a Python scalar for an fp32 op)."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


def adamw_step_ref(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """`adamw_step` in PyTorch, one tensor at a time (~10 ops and fp32 temporaries each): the
    update `ShardedAdamW` runs where the kernel does not (CPU, MOERAY_FUSED_ADAMW=0). Moments of
    any floating dtype (upcast to fp32 for the arithmetic, rounded back); no checks."""
    step_size = -lr / (1 - beta1**step)
    bias2_sqrt = math.sqrt(1 - beta2**step)
    for p, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        g = grad.float() if grad_scale is None else grad.float() / grad_scale
        m = torch.lerp(exp_avg.float(), g, 1 - beta1)
        v = exp_avg_sq.float().mul(beta2).addcmul_(g, g, value=1 - beta2)
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        p.mul_(1 - lr * weight_decay)
        p.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(eps), value=step_size)


@triton.jit
def _update(
    p_ptrs,
    g_ptrs,
    m_ptrs,
    v_ptrs,
    mask,
    scale,
    lerp_w,
    beta2,
    one_minus_beta2,
    eps,
    decay,
    step_size,
    bias2_sqrt,
    HAS_SCALE: tl.constexpr,
    LERP_FROM_END: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One block of the module docstring's math; MASKED loads and stores only `mask`'s lanes
    (unmasked blocks can use 16-byte accesses: the mask's divisibility is unknown)."""
    if MASKED:
        p = tl.load(p_ptrs, mask=mask, other=0.0)
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        p = tl.load(p_ptrs)
        g = tl.load(g_ptrs).to(tl.float32)
        m = tl.load(m_ptrs).to(tl.float32)
        v = tl.load(v_ptrs).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, scale)
    if LERP_FROM_END:
        m = tl.fma(g - m, lerp_w, g)  # lerp_w = w - 1: end - (end - self) * (1 - w)
    else:
        m = tl.fma(g - m, lerp_w, m)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    p = p * decay
    p = p + tl.div_rn(step_size * m, tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps)
    m_out = to_dtype_rn(m, m_ptrs.dtype.element_ty)
    v_out = to_dtype_rn(v, v_ptrs.dtype.element_ty)
    if MASKED:
        tl.store(m_ptrs, m_out, mask=mask)
        tl.store(v_ptrs, v_out, mask=mask)
        tl.store(p_ptrs, p, mask=mask)
    else:
        tl.store(m_ptrs, m_out)
        tl.store(v_ptrs, v_out)
        tl.store(p_ptrs, p)


@triton.jit
def _table_ptr(table_ptr, row, n_tensors, t, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor t's address in the table's `row` as a pointer to `dtype` (16-byte aligned when
    ALIGNED: the host checked every address)."""
    ptr = tl.load(table_ptr + row * n_tensors + t).to(tl.pointer_type(dtype))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _adamw_kernel(
    table_ptr,  # int64 [6, N]: addresses of p, g, m, v; numel; running count of chunks
    scale_ptr,
    n_tensors,
    lerp_w,
    beta2,
    one_minus_beta2,
    eps,
    decay,
    step_size,
    bias2_sqrt,
    G_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    LERP_FROM_END: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    TABLE_BLOCK: tl.constexpr,
):
    """Program pid: chunk pid - (first chunk of its tensor) of the tensor whose chunks hold pid,
    CHUNK = BLOCK * ITERS elements (fewer at the tensor's end)."""
    CHUNK: tl.constexpr = BLOCK * ITERS
    pid = tl.program_id(0)
    ends_ptr = table_ptr + 5 * n_tensors  # the running chunk counts
    # t = the number of tensors whose chunks all come before pid
    t = 0
    for base in range(0, n_tensors, TABLE_BLOCK):
        idx = base + tl.arange(0, TABLE_BLOCK)
        inside = idx < n_tensors
        ends = tl.load(ends_ptr + idx, mask=inside, other=0)
        t += tl.sum((inside & (ends <= pid)).to(tl.int32), axis=0)
    numel = tl.load(table_ptr + 4 * n_tensors + t)
    first = tl.load(ends_ptr + t) - tl.cdiv(numel, CHUNK)
    start = (pid - first) * CHUNK  # int64: a tensor may pass 2^31 elements
    n_here = tl.minimum(numel - start, CHUNK)
    p_ptr = _table_ptr(table_ptr, 0, n_tensors, t, tl.float32, ALIGNED) + start
    g_ptr = _table_ptr(table_ptr, 1, n_tensors, t, G_DTYPE, ALIGNED) + start
    m_ptr = _table_ptr(table_ptr, 2, n_tensors, t, M_DTYPE, ALIGNED) + start
    v_ptr = _table_ptr(table_ptr, 3, n_tensors, t, M_DTYPE, ALIGNED) + start
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr)
    n_full = n_here // BLOCK
    for i in range(0, n_full):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        _update(
            p_ptr + offs,
            g_ptr + offs,
            m_ptr + offs,
            v_ptr + offs,
            offs < n_here,
            scale,
            lerp_w,
            beta2,
            one_minus_beta2,
            eps,
            decay,
            step_size,
            bias2_sqrt,
            HAS_SCALE,
            LERP_FROM_END,
            MASKED=False,
        )
    tail = n_full * BLOCK
    if tail < n_here:
        offs = tail + tl.arange(0, BLOCK)
        _update(
            p_ptr + offs,
            g_ptr + offs,
            m_ptr + offs,
            v_ptr + offs,
            offs < n_here,
            scale,
            lerp_w,
            beta2,
            one_minus_beta2,
            eps,
            decay,
            step_size,
            bias2_sqrt,
            HAS_SCALE,
            LERP_FROM_END,
            MASKED=True,
        )


def check_config(cfg: dict) -> None:
    """Raise ValueError naming a bad config (keys CONFIG_KEYS; BLOCK a power of two >= 16)."""
    check_tile_config(cfg, CONFIG_KEYS, ("BLOCK",))


def _layout_ok(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
) -> bool:
    """The tensor contract of `adamw_step`, as one boolean (~2 us a parameter on the host: the
    detailed checks run only when it fails, to name what is wrong)."""
    if not params or not len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs):
        return False
    device, m_dtype = params[0].device, exp_avgs[0].dtype
    if m_dtype not in DTYPES:
        return False
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        if p.dtype != torch.float32 or g.dtype not in DTYPES or m.dtype != m_dtype:
            return False
        if v.dtype != m_dtype or not g.shape == m.shape == v.shape == p.shape:
            return False
        if not all(x.is_contiguous() and x.device == device for x in (p, g, m, v)):
            return False
    return True


def adamw_step_applies(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
) -> bool:
    """Whether `adamw_step` takes these tensors as they are and runs its kernel (the optimizer's
    dispatch test): fp32 parameters, gradients fp32/bf16 and moments of one dtype in DTYPES, all
    contiguous, each its parameter's shape, on one device: CUDA (or the CPU under the
    interpreter). MOERAY_FUSED_ADAMW=0 in the environment keeps the PyTorch loop instead: an A/B
    switch for the benches, and a way out if a new Triton miscompiles the kernel."""
    if switched_off("ADAMW") or not _layout_ok(params, grads, exp_avgs, exp_avg_sqs):
        return False
    return use_triton(params[0]) and not (interpreting() and params[0].device.type != "cpu")


def _check(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    grad_scale: torch.Tensor | None,
    beta1: float,
    beta2: float,
    step: float,
) -> None:
    """ValueError naming the bad value and what is accepted (`adamw_step`'s contract)."""
    if not _layout_ok(params, grads, exp_avgs, exp_avg_sqs):
        lens = (len(params), len(grads), len(exp_avgs), len(exp_avg_sqs))
        if len(set(lens)) != 1:
            raise ValueError(
                f"params, grads, exp_avgs, exp_avg_sqs have lengths {lens}: need one entry each "
                "per parameter"
            )
        device = params[0].device
        m_dtype = check_tensor(exp_avgs[0], "exp_avgs[0]", dtypes=DTYPES).dtype
        for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
            check_tensor(p, f"params[{i}]", dtypes=(torch.float32,), contiguous=True, device=device)
            for name, x, dtypes in (
                (f"grads[{i}]", g, DTYPES),
                (f"exp_avgs[{i}]", m, (m_dtype,)),
                (f"exp_avg_sqs[{i}]", v, (m_dtype,)),
            ):
                check_tensor(x, name, dtypes=dtypes, contiguous=True, device=device)
                check_shape(x, name, tuple(p.shape))
    if grad_scale is not None:
        check_tensor(grad_scale, "grad_scale", dtypes=(torch.float32,), ndim=0)
        if grad_scale.device != params[0].device:
            raise ValueError(
                f"grad_scale is on {grad_scale.device}, expected {params[0].device} (read by the "
                "kernel: no host sync)"
            )
    if len({p.data_ptr() for p in params if p.numel()}) != sum(p.numel() > 0 for p in params):
        raise ValueError("params holds one tensor twice: each parameter must appear once")
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"beta1={beta1}, beta2={beta2}: each must be in [0, 1)")
    if not step >= 1:
        raise ValueError(
            f"step={step}: the first update is step 1 (bias correction 1 - beta^0 = 0)"
        )


def _launch(
    tensors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    grad_scale: torch.Tensor | None,
    scalars: dict[str, float],
    lerp_from_end: bool,
    cfg: dict,
) -> None:
    """One launch over `tensors` (p, g, m, v; one gradient dtype, none empty)."""
    p0, g0, m0, _ = tensors[0]
    device = p0.device
    chunk = cfg["BLOCK"] * cfg["ITERS"]
    addresses = [[x.data_ptr() for x in column] for column in zip(*tensors, strict=True)]
    numels = [p.numel() for p, _, _, _ in tensors]
    ends = list(itertools.accumulate(cdiv(n, chunk) for n in numels))
    rows = [*addresses, numels, ends]  # _adamw_kernel's table
    chunks = ends[-1]
    aligned = all(a % 16 == 0 for column in addresses for a in column)
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        # from pageable memory a non_blocking copy may still wait for the stream (the driver
        # stages it); the caching host allocator keeps the pinned buffer until the copy ran
        table = table.pin_memory().to(device, non_blocking=True)
    _adamw_kernel[(chunks,)](
        table,
        p0 if grad_scale is None else grad_scale,
        len(tensors),
        scalars["lerp_w"],
        scalars["beta2"],
        scalars["one_minus_beta2"],
        scalars["eps"],
        scalars["decay"],
        scalars["step_size"],
        scalars["bias2_sqrt"],
        G_DTYPE=TL_DTYPES[g0.dtype],
        M_DTYPE=TL_DTYPES[m0.dtype],
        HAS_SCALE=grad_scale is not None,
        LERP_FROM_END=lerp_from_end,
        ALIGNED=aligned,
        BLOCK=cfg["BLOCK"],
        ITERS=cfg["ITERS"],
        TABLE_BLOCK=TABLE_BLOCK,
        num_warps=cfg["num_warps"],
        # every multiply-add of the math is an explicit tl.fma: no other may fuse (rounding)
        enable_fp_fusion=False,
    )


def adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    grad_scale: torch.Tensor | None = None,
    config: dict | None = None,
) -> None:
    """One AdamW step of every parameter in place (module docstring's math), in one launch per
    gradient dtype: params fp32, grads fp32 or bf16 (each its parameter's shape), exp_avgs and
    exp_avg_sqs of one dtype, fp32 or bf16; all contiguous, on one device, each parameter once.
    `step` (>= 1) is shared by every tensor of the call: the bias corrections are host scalars.
    `grad_scale`: None, or a 0-dim fp32 tensor on the device that divides every gradient, read by
    the kernel (no host sync). The version counters of params and moments move, as an in-place
    torch op's would. `config` (keys CONFIG_KEYS) overrides DEFAULT_CONFIG (the bench's sweep).
    On CPU tensors outside the interpreter it runs `adamw_step_ref`."""
    if not params:
        return
    _check(params, grads, exp_avgs, exp_avg_sqs, grad_scale, beta1, beta2, step)
    cfg = config if config is not None else INTERPRETER_CONFIG if interpreting() else DEFAULT_CONFIG
    check_config(cfg)
    device = params[0].device
    if not use_triton(params[0]) or (interpreting() and device.type != "cpu"):
        # (the interpreter would read the table's CUDA addresses on the host)
        adamw_step_ref(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            step=step,
            grad_scale=grad_scale,
        )
        return
    w = _f32(1 - beta1)
    lerp_from_end = not abs(w) < 0.5  # torch.lerp's choice, on the fp32 weight
    scalars = {
        "lerp_w": _f32(w - 1) if lerp_from_end else w,
        "beta2": _f32(beta2),
        "one_minus_beta2": _f32(1 - beta2),
        "eps": _f32(eps),
        "decay": _f32(1 - lr * weight_decay),
        "step_size": _f32(-lr / (1 - beta1**step)),
        "bias2_sqrt": _f32(math.sqrt(1 - beta2**step)),
    }
    quads = [q for q in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True) if q[0].numel()]
    for g_dtype in DTYPES:
        mine = [q for q in quads if q[1].dtype == g_dtype]
        if mine:
            _launch(mine, grad_scale, scalars, lerp_from_end, cfg)
    increment_version([*params, *exp_avgs, *exp_avg_sqs])
