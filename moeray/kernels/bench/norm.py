"""`moeray bench kernels --only norm_train`: RMSNorm as training runs it (autograd recording), the
fused kernels (`kernels/norm.py`: a forward that saves 1/rms, one backward launch and a sum) against
torch.autograd through `rms_norm_ref`, at T=4096 tokens (a Moonlight micro-batch) and the widths
training sees: the layer norms at D=2048 (Moonlight) and 7168 (V3) on the fp32 residual stream,
with a bf16 attention output added to it, and kv_a_layernorm at D=512 on a bf16 latent with an
fp32 weight. Per case: forward and forward+backward times, the CUDA kernels each direction
launches (torch.profiler), and the achieved bandwidth against the copy ceiling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from moeray.kernels.bench.common import _bench
from moeray.kernels.norm import rms_norm, rms_norm_ref

T = 4096
F32, BF16 = torch.float32, torch.bfloat16
CASES = (  # (name, D, x dtype, residual dtype or None, weight dtype)
    ("layer_fp32", 2048, F32, F32, F32),
    ("post_attn_bf16_add", 2048, BF16, F32, F32),
    ("layer_fp32", 7168, F32, F32, F32),
    ("post_attn_bf16_add", 7168, BF16, F32, F32),
    ("kv_a_bf16", 512, BF16, None, F32),
)


def _cuda_kernels(fn: Callable[[], object]) -> int | None:
    """CUDA kernels (and memsets/copies) one call of fn launches; None where the profiler fails."""
    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # a profiler without CUPTI on this machine: the times still count
        return None


def _case(
    name: str,
    D: int,
    x_dtype: torch.dtype,
    r_dtype: torch.dtype | None,
    w_dtype: torch.dtype,
    copy_tbps: float,
) -> dict:
    x = torch.randn(T, D, device="cuda").to(x_dtype).requires_grad_()
    r = None if r_dtype is None else torch.randn(T, D, device="cuda").to(r_dtype)
    r = None if r is None else r.requires_grad_()
    w = (1 + 0.1 * torch.randn(D, device="cuda")).to(w_dtype).requires_grad_()
    inputs = [t for t in (x, w, r) if t is not None]
    y0, h0 = rms_norm_ref(x, w, 1e-6, r)
    dy = torch.randn_like(y0)
    dh = None if r is None else torch.randn_like(h0)
    row: dict[str, Any] = {
        "kernel": name,
        "tokens": T,
        "D": D,
        "dtypes": f"{x_dtype}/{r_dtype}/{w_dtype}",
    }
    # bytes an ideal fused pass moves: forward reads x (r, w), writes y (h) and 1/rms; backward
    # reads h, 1/rms, dy (dh), writes dx (dr)
    el = {t: torch.empty(0, dtype=t).element_size() for t in (F32, BF16)}
    xs, ys, hs = el[x_dtype], y0.element_size(), h0.element_size()
    rs = 0 if r_dtype is None else el[r_dtype]
    fwd_bytes = T * D * (xs + rs + ys + (hs if r is not None else 0)) + 4 * T
    bwd_bytes = T * D * (hs + ys + xs + (hs + rs if r is not None else 0)) + 4 * T
    for impl, norm in (("torch", rms_norm_ref), ("fused", rms_norm)):

        def forward(norm=norm):
            y, h = norm(x, w, 1e-6, r)
            return (y,) if r is None else (y, h)

        def fwd_bwd(forward=forward):
            outs = forward()
            return torch.autograd.grad(outs, inputs, (dy,) if dh is None else (dy, dh))

        fwd_ms, both_ms = _bench(forward), _bench(fwd_bwd)
        outs = forward()

        def backward(outs=outs):
            return torch.autograd.grad(
                outs, inputs, (dy,) if dh is None else (dy, dh), retain_graph=True
            )

        kernels_fwd, kernels_bwd = _cuda_kernels(forward), _cuda_kernels(backward)
        row[f"{impl}_fwd_ms"] = round(fwd_ms, 4)
        row[f"{impl}_fwd_bwd_ms"] = round(both_ms, 4)
        row[f"{impl}_kernels_fwd"] = kernels_fwd
        row[f"{impl}_kernels_bwd"] = kernels_bwd
    row["speedup_fwd_bwd"] = round(row["torch_fwd_bwd_ms"] / row["fused_fwd_bwd_ms"], 2)
    row["speedup_fwd"] = round(row["torch_fwd_ms"] / row["fused_fwd_ms"], 2)
    tbps = (fwd_bytes + bwd_bytes) / row["fused_fwd_bwd_ms"] / 1e9
    row["fused_fwd_bwd_TBps"] = round(tbps, 3)
    row["frac_copy_bw"] = round(tbps / copy_tbps, 3)
    grads = torch.autograd.grad(rms_norm(x, w, 1e-6, r)[0], inputs, dy, allow_unused=True)
    grads_ref = torch.autograd.grad(rms_norm_ref(x, w, 1e-6, r)[0], inputs, dy, allow_unused=True)
    row["grad_rel_err_max"] = max(
        float((a.float() - b.float()).norm() / b.float().norm())
        for a, b in zip(grads, grads_ref, strict=True)
        if b is not None
    )
    return row


def bench_norm_train(ceil: dict) -> list[dict]:
    return [_case(n, D, xd, rd, wd, ceil["copy_TBps"]) for n, D, xd, rd, wd in CASES]


def print_norm_train(rows: list[dict]) -> None:
    for r in rows:
        print(
            f"norm_train {r['kernel']:18s} T={r['tokens']} D={r['D']:5d}: fwd+bwd "
            f"{r['torch_fwd_bwd_ms']:.4f} ms torch -> {r['fused_fwd_bwd_ms']:.4f} ms fused "
            f"(x{r['speedup_fwd_bwd']}, {r['frac_copy_bw']:.2f} of copy), fwd "
            f"x{r['speedup_fwd']}; kernels fwd {r['torch_kernels_fwd']} -> "
            f"{r['fused_kernels_fwd']}, bwd {r['torch_kernels_bwd']} -> "
            f"{r['fused_kernels_bwd']}; grad err {r['grad_rel_err_max']:.1e}"
        )
