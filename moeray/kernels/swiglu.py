"""SwiGLU's elementwise half, silu(gate) * up, as one Triton launch: `swiglu`, its PyTorch
reference `swiglu_ref`, and the test `swiglu_applies` by which the model's MLP
(`moeray.platform.model.moe.MLP`: the dense layers and the shared experts) chooses between them.

Legend: T rows (tokens), I features (the MLP's width).

Why: PyTorch runs silu and the multiply as two kernels, each ~2 us at decode batch sizes for a few
KB; one per dense layer and shared expert, 27 launches per Moonlight decode step.

Numerics follow PyTorch's CUDA kernels step for step (`swiglu_rn` in kernels/common.py, shared with
the training kernels of kernels/swiglu_train.py): silu = x / (1 + exp(-x)) in fp32 with libdevice's
expf and an IEEE division, rounded to the input dtype, then that times `up` in fp32, rounded again;
so on the GPU the result equals `swiglu_ref` bit for bit. Under the interpreter the exp is numpy's,
which can differ from torch's CPU exp by an ulp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moeray.kernels.common import (
    check_tensor,
    pdl_launch,
    pdl_wait,
    precise_exp,
    swiglu_rn,
    switched_off,
    use_triton,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024


def swiglu_ref(gate_TI: torch.Tensor, up_TI: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (any shape)."""
    return F.silu(gate_TI) * up_TI


@triton.jit
def _swiglu_kernel(
    g_ptr,
    u_ptr,
    y_ptr,
    width,
    stride_g,
    stride_u,
    BLOCK: tl.constexpr,
    PRECISE: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)  # every read here is an activation
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < width
    g = tl.load(g_ptr + row * stride_g + offs, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * stride_u + offs, mask=ok, other=0.0)
    tl.store(y_ptr + row * width + offs, swiglu_rn(g, u, PRECISE), mask=ok)


def swiglu_applies(gate_TI: torch.Tensor, up_TI: torch.Tensor) -> bool:
    """Whether `swiglu` takes these as they are: one dtype and shape, unit stride over features,
    rows that flatten without a copy, on CUDA (or the interpreter). MOERAY_FUSED_SWIGLU=0 keeps
    PyTorch: an A/B switch for the engine bench."""
    if switched_off("SWIGLU"):
        return False
    if gate_TI.dtype not in DTYPES or up_TI.dtype != gate_TI.dtype or gate_TI.dim() < 1:
        return False
    if gate_TI.shape != up_TI.shape or gate_TI.stride(-1) != 1 or up_TI.stride(-1) != 1:
        return False
    return use_triton(gate_TI, up_TI)


def swiglu(gate_TI: torch.Tensor, up_TI: torch.Tensor) -> torch.Tensor:
    """`swiglu_ref` in one launch: a new contiguous tensor of gate's shape and dtype. No gradient
    (inference); no host sync (CUDA graphs). On CPU without the interpreter it is `swiglu_ref`."""
    check_tensor(gate_TI, "gate", dtypes=DTYPES)
    check_tensor(up_TI, "up", dtypes=(gate_TI.dtype,), device=gate_TI.device)
    if gate_TI.shape != up_TI.shape or gate_TI.dim() < 1:
        raise ValueError(
            f"gate {tuple(gate_TI.shape)} and up {tuple(up_TI.shape)} must have one shape, >= 1 dim"
        )
    if not use_triton(gate_TI):
        return swiglu_ref(gate_TI, up_TI)
    width = gate_TI.shape[-1]
    g = gate_TI.reshape(-1, width)
    u = up_TI.reshape(-1, width)
    if g.stride(-1) != 1 or u.stride(-1) != 1:
        g, u = g.contiguous(), u.contiguous()
    y = torch.empty(gate_TI.shape, dtype=gate_TI.dtype, device=gate_TI.device)
    if g.shape[0] and width:
        block = min(BLOCK, triton.next_power_of_2(width))
        pdl = pdl_launch(y.device)
        _swiglu_kernel[(g.shape[0], triton.cdiv(width, block))](
            g,
            u,
            y,
            width,
            g.stride(0),
            u.stride(0),
            BLOCK=block,
            PRECISE=precise_exp(),
            PDL=pdl,
            num_warps=4,
            launch_pdl=pdl,
        )
    return y
