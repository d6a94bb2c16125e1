"""`moeray bench kernels --only moe_permute_train`: the routed experts' token permute and weighted
combine as one-GPU training runs them (autograd recording), the kernels (`kernels/moe_permute.py`:
one launch each way and direction, `moe_positions` included in their time) against the PyTorch
ops `Experts._routed` runs without them (the gather x[order // K]; the weights' gather, the cast
of y to fp32, the fp32 multiply, index_add_ into fp32 zeros, the cast back and the shared
experts' add; and autograd's reverse of each), at Moonlight-16B-A3B's training shape (T 4096
tokens a micro-batch, top-6 of 64 experts, D 2048, bf16). Per case: forward and forward+backward
times, the CUDA kernels each direction launches (torch.profiler), the achieved bandwidth of the
bytes an ideal pass moves against the copy ceiling, whether the forward equals the reference's
bits, and the saving per training step (12 MoE layers x 4 micro-batches)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moeray.kernels.bench.common import _bench
from moeray.kernels.bench.norm import _cuda_kernels
from moeray.kernels.moe_permute import moe_combine, moe_combine_ref, moe_permute, moe_positions

T, K, D, E = 4096, 6, 2048, 64
CALLS_PER_STEP = 12 * 4  # Moonlight's MoE layers in the one-H200 bench x micro-batches a step


def _routing() -> torch.Tensor:
    """order: the stable argsort of top-K ids as the router gives them (K distinct per token)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    ids_TK = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices
    return torch.argsort(ids_TK.flatten(), stable=True)


def _time(
    forward: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...], dout: torch.Tensor
) -> dict[str, Any]:
    def fwd_bwd() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(forward(), inputs, dout)

    out = forward()

    def backward() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(out, inputs, dout, retain_graph=True)

    return {
        "fwd_ms": round(_bench(forward), 4),
        "fwd_bwd_ms": round(_bench(fwd_bwd), 4),
        "kernels_fwd": _cuda_kernels(forward),
        "kernels_bwd": _cuda_kernels(backward),
    }


def _row(name: str, impls: dict[str, dict], ideal_bytes: int, copy_tbps: float) -> dict:
    row: dict[str, Any] = {"kernel": name, "T": T, "K": K, "D": D, "E": E, "dtype": "bfloat16"}
    for impl, r in impls.items():
        row.update({f"{impl}_{k}": v for k, v in r.items()})
    row["speedup_fwd_bwd"] = round(row["torch_fwd_bwd_ms"] / row["fused_fwd_bwd_ms"], 2)
    row["speedup_fwd"] = round(row["torch_fwd_ms"] / row["fused_fwd_ms"], 2)
    row["ideal_MB"] = round(ideal_bytes / 1e6, 1)
    tbps = ideal_bytes / row["fused_fwd_bwd_ms"] / 1e9
    row["fused_fwd_bwd_TBps"] = round(tbps, 3)
    row["frac_copy_bw"] = round(tbps / copy_tbps, 3)
    saved = row["torch_fwd_bwd_ms"] - row["fused_fwd_bwd_ms"]
    row["saved_ms_per_step"] = round(saved * CALLS_PER_STEP, 2)
    return row


def bench_moe_permute_train(ceil: dict) -> list[dict]:
    order = _routing()
    g = torch.Generator(device="cuda").manual_seed(1)
    bf16 = torch.bfloat16
    x = torch.randn(T, D, device="cuda", generator=g).to(bf16).requires_grad_()
    y = torch.randn(T * K, D, device="cuda", generator=g).to(bf16).requires_grad_()
    w = torch.rand(T, K, device="cuda", generator=g).requires_grad_()  # the router's fp32 weights
    add = torch.randn(T, D, device="cuda", generator=g).to(bf16).requires_grad_()
    dx_AD = torch.randn(T * K, D, device="cuda", generator=g).to(bf16)
    dout = torch.randn(T, D, device="cuda", generator=g).to(bf16)
    row_bytes, tok_bytes = T * K * D * 2, T * D * 2

    def permute_torch() -> torch.Tensor:
        return x[order // K]

    def permute_fused() -> torch.Tensor:
        return moe_permute(x, moe_positions(order, K))

    def combine_torch() -> torch.Tensor:
        out = torch.zeros(T, D, device="cuda")
        idx, tokens = order, order // K
        out.index_add_(0, tokens, y.float() * w.flatten()[idx, None].float())
        return out.to(bf16) + add

    def combine_fused() -> torch.Tensor:
        return moe_combine(y, w, moe_positions(order, K), add)

    rows = []
    # permute: x read and the rows written forward, the reverse backward
    permute = {
        "torch": _time(permute_torch, (x,), dx_AD),
        "fused": _time(permute_fused, (x,), dx_AD),
    }
    row = _row("permute", permute, 2 * (tok_bytes + row_bytes), ceil["copy_TBps"])
    row["bit_equal_fwd"] = torch.equal(permute_torch(), permute_fused())
    rows.append(row)
    # combine: rows, add read and out written forward; g and the rows read, dy written backward
    combine = {
        "torch": _time(combine_torch, (y, w, add), dout),
        "fused": _time(combine_fused, (y, w, add), dout),
    }
    row = _row("combine", combine, 3 * tok_bytes + 3 * row_bytes, ceil["copy_TBps"])
    pos = moe_positions(order, K)
    row["bit_equal_fwd"] = torch.equal(combine_fused(), moe_combine_ref(y, w, pos, add))
    with torch.no_grad():  # PyTorch rounds before adding the shared output, the kernel after
        diff = (combine_torch().float() - combine_fused().float()).abs().max()
    row["fwd_max_abs_diff_vs_torch"] = float(diff)
    rows.append(row)
    return rows


def print_moe_permute_train(rows: list[dict]) -> None:
    for r in rows:
        print(
            f"moe_permute_train {r['kernel']:7s} T={r['T']} K={r['K']} D={r['D']}: fwd+bwd "
            f"{r['torch_fwd_bwd_ms']:.4f} ms torch -> {r['fused_fwd_bwd_ms']:.4f} ms fused "
            f"(x{r['speedup_fwd_bwd']}, {r['fused_fwd_bwd_TBps']} TB/s, {r['frac_copy_bw']:.2f} "
            f"of copy), fwd x{r['speedup_fwd']}; kernels fwd {r['torch_kernels_fwd']} -> "
            f"{r['fused_kernels_fwd']}, bwd {r['torch_kernels_bwd']} -> "
            f"{r['fused_kernels_bwd']}; {r['saved_ms_per_step']} ms a step saved; "
            f"bit== {r['bit_equal_fwd']}"
        )
