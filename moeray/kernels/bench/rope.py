"""`moeray bench kernels --only rope_train`: MLA's rotary embedding as one-GPU training runs it
(autograd recording), the kernel (`kernels/rope.py`: one launch forward, one backward rotating
the gradient back) against torch.autograd through `rope_ref`, at Moonlight-16B-A3B's training
shape (B 1, S 4096, 16 heads, R 64, bf16 under autocast): the queries' rope part read in place
from q [B, S, H, 128 + 64] and the shared rope key from the latent projection [B, S, 512 + 64].
Per case: forward and forward+backward times, the CUDA kernels each direction launches
(torch.profiler), the achieved bandwidth against the copy ceiling, and whether output and
gradient are the reference's bits."""

from __future__ import annotations

from typing import Any

import torch

from moeray.kernels.bench.common import _bench
from moeray.kernels.bench.norm import _cuda_kernels
from moeray.kernels.rope import rope, rope_ref

B, S, R = 1, 4096, 64
CASES = (  # (name, heads, width of the projection row the rope part is sliced from)
    ("q_pe", 16, 16 * (128 + R)),  # q_b_proj's output viewed [B, S, 16, 192], the last 64
    ("k_pe", 1, 512 + R),  # kv_a_proj's output [B, S, 576], the last 64, as one head
)


def _case(name: str, H: int, width: int, copy_tbps: float) -> dict:
    g = torch.Generator(device="cuda").manual_seed(width)
    row_BSW = torch.randn(B, S, width, device="cuda", generator=g).bfloat16()
    # a leaf that is the strided rope slice itself, so neither path pays a slice's backward
    x = row_BSW.view(B, S, H, width // H)[..., -R:].detach().requires_grad_()
    ang = torch.arange(S, device="cuda").float()[None, :, None] * torch.rand(R // 2, device="cuda")
    cos, sin = ang.cos(), ang.sin()
    dy = torch.randn(B, S, H, R, device="cuda", generator=g).bfloat16()
    row: dict[str, Any] = {"kernel": name, "B": B, "S": S, "H": H, "R": R, "dtype": "bfloat16"}
    # bytes an ideal pass moves: forward reads x, cos, sin and writes y; backward reads dy, cos,
    # sin and writes dx (bf16 x: 8 MiB at H 16, against 1 MiB of fp32 cos/sin)
    xy_bytes = 2 * B * S * H * R * x.element_size()
    angle_bytes = 2 * B * S * (R // 2) * 4
    fwd_bytes = bwd_bytes = xy_bytes + angle_bytes
    for impl, fn in (("torch", rope_ref), ("fused", rope)):

        def forward(fn=fn):
            return fn(x, cos, sin)

        def fwd_bwd(forward=forward):
            return torch.autograd.grad(forward(), x, dy)

        fwd_ms, both_ms = _bench(forward), _bench(fwd_bwd)
        y = forward()

        def backward(y=y):
            return torch.autograd.grad(y, x, dy, retain_graph=True)

        row[f"{impl}_fwd_ms"] = round(fwd_ms, 4)
        row[f"{impl}_fwd_bwd_ms"] = round(both_ms, 4)
        row[f"{impl}_kernels_fwd"] = _cuda_kernels(forward)
        row[f"{impl}_kernels_bwd"] = _cuda_kernels(backward)
    row["speedup_fwd_bwd"] = round(row["torch_fwd_bwd_ms"] / row["fused_fwd_bwd_ms"], 2)
    row["speedup_fwd"] = round(row["torch_fwd_ms"] / row["fused_fwd_ms"], 2)
    tbps = (fwd_bytes + bwd_bytes) / row["fused_fwd_bwd_ms"] / 1e9
    row["fused_fwd_bwd_TBps"] = round(tbps, 3)
    row["frac_copy_bw"] = round(tbps / copy_tbps, 3)
    y, y_ref = rope(x, cos, sin), rope_ref(x, cos, sin)
    (dx,), (dx_ref,) = torch.autograd.grad(y, x, dy), torch.autograd.grad(y_ref, x, dy)
    row["bit_equal"] = torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    return row


def bench_rope_train(ceil: dict) -> list[dict]:
    return [_case(name, H, width, ceil["copy_TBps"]) for name, H, width in CASES]


def print_rope_train(rows: list[dict]) -> None:
    for r in rows:
        print(
            f"rope_train {r['kernel']:5s} B={r['B']} S={r['S']} H={r['H']:3d} R={r['R']}: fwd+bwd "
            f"{r['torch_fwd_bwd_ms']:.4f} ms torch -> {r['fused_fwd_bwd_ms']:.4f} ms fused "
            f"(x{r['speedup_fwd_bwd']}, {r['frac_copy_bw']:.2f} of copy), fwd "
            f"x{r['speedup_fwd']}; kernels fwd {r['torch_kernels_fwd']} -> "
            f"{r['fused_kernels_fwd']}, bwd {r['torch_kernels_bwd']} -> "
            f"{r['fused_kernels_bwd']}; bit== {r['bit_equal']}"
        )
