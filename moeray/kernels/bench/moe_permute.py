"""`moeray bench kernels --only moe_permute_train`: the routed experts' token permute and weighted
combine as one-GPU training runs them (autograd recording), the kernels (`kernels/moe_permute.py`:
one launch each way and direction, `moe_positions` included in their time) against the PyTorch
ops `Experts._routed` runs without them (the gather x[order // K]; the weights' gather, the cast
of y to fp32, the fp32 multiply, index_add_ into fp32 zeros, the cast back and the shared
experts' add; and autograd's reverse of each), at Moonlight-16B-A3B's training shape (T 4096
tokens a micro-batch, top-6 of 64 experts, D 2048, bf16). Per case: forward and forward+backward
times, the CUDA kernels each direction launches (torch.profiler), the achieved bandwidth of the
bytes an ideal pass moves against the copy ceiling, whether the forward equals the reference's
bits, and the saving per training step (12 MoE layers x 4 micro-batches).

Rows `*_pad16` / `*_pad128`: the grouped experts' padded layouts planned on the device (16-row
alignment for BF16's torch._grouped_mm, 128 for the FP8 grouped GEMM; P the plan's bound), the
kernels writing x_PD and reading y_PD directly (`rows=`, positions through dst_A) against the
unpadded kernels followed by the experts' copies into and out of the layout (zeros + index_copy_
for x, index_select for y; autograd's reverses of them backward: index_select of dx, zeros +
index_add_ of dy, as `GroupedExperts.pad` / `unpad` do inside the experts' backward, where dx
takes one index_select more: two input-gradient products are unpadded and added)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moeray.kernels.bench.common import _bench, _rec
from moeray.kernels.bench.norm import _cuda_kernels
from moeray.kernels.moe_permute import moe_combine, moe_combine_ref, moe_permute, moe_positions

T, K, D, E = 4096, 6, 2048, 64
CALLS_PER_STEP = 12 * 4  # Moonlight's MoE layers in the one-H200 bench x micro-batches a step


def _routing() -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts_E): the stable argsort of top-K ids as the router gives them (K distinct
    per token), and the rows of each expert."""
    g = torch.Generator(device="cuda").manual_seed(0)
    ids_TK = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices
    order = torch.argsort(ids_TK.flatten(), stable=True)
    return order, torch.bincount(ids_TK.flatten(), minlength=E)


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


def _padded_rows(counts_E: torch.Tensor, align: int) -> tuple[torch.Tensor, int]:
    """(dst_A, P): the padded row of each sorted row and the layout's row bound, planned on the
    device as the experts plan it (platform/parallel/grouped_experts.py GroupedExperts._device_plan,
    not imported: kernels do not depend on the platform)."""
    A = T * K
    padded_E = (counts_E + (align - 1)) // align * align
    shift_E = (padded_E.cumsum(0) - padded_E) - (counts_E.cumsum(0) - counts_E)
    expert_A = torch.repeat_interleave(torch.arange(E, device="cuda"), counts_E, output_size=A)
    P = (A + E * (align - 1)) // align * align  # the plan's bound: each expert pads < align
    return torch.arange(A, device="cuda") + shift_E[expert_A], P


def _row(
    name: str,
    impls: dict[str, dict],
    ideal_bytes: int,
    copy_tbps: float,
    baseline: str = "autograd through Experts._routed's PyTorch ops",
) -> dict:
    row: dict[str, Any] = {"kernel": name, "T": T, "K": K, "D": D, "E": E, "dtype": "bfloat16"}
    row["baseline"] = baseline
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
    order, counts_E = _routing()
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
    for align in (16, 128):
        rows += _padded_cases(order, counts_E, align, (x, y, w, add, dx_AD, dout), ceil)
    return rows


def _padded_cases(
    order: torch.Tensor,
    counts_E: torch.Tensor,
    align: int,
    tensors: tuple[torch.Tensor, ...],
    ceil: dict,
) -> list[dict]:
    """The permute into and the combine out of a padded layout: the kernels on it ("fused")
    against the unpadded kernels plus the experts' copies ("torch": what runs without it)."""
    x, y, w, add, dx_AD, dout = tensors
    dst_A, P = _padded_rows(counts_E, align)
    row_bytes, tok_bytes, pad_bytes = T * K * D * 2, T * D * 2, P * D * 2
    # y on the layout, for the combine reading it directly: NaN in the rows no token owns
    y_PD = torch.full((P, D), float("nan"), device="cuda", dtype=y.dtype)
    y_PD = y_PD.index_copy_(0, dst_A, y.detach()).requires_grad_()
    dx_PD = torch.zeros(P, D, device="cuda", dtype=dx_AD.dtype).index_copy_(0, dst_A, dx_AD)

    def permute_copy() -> torch.Tensor:
        x_AD = moe_permute(x, moe_positions(order, K))
        return x_AD.new_zeros(P, D).index_copy(0, dst_A, x_AD)

    def permute_padded() -> torch.Tensor:
        return moe_permute(x, moe_positions(order, K, dst_A), rows=P)

    def combine_copy() -> torch.Tensor:
        return moe_combine(y_PD.index_select(0, dst_A), w, moe_positions(order, K), add)

    def combine_padded() -> torch.Tensor:
        return moe_combine(y_PD, w, moe_positions(order, K, dst_A), add)

    baseline = f"the unpadded kernels + the experts' copies into and out of the {align}-row layout"
    rows = []
    permute = {
        "torch": _time(permute_copy, (x,), dx_PD),
        "fused": _time(permute_padded, (x,), dx_PD),
    }
    # forward x read, x_PD written whole (the zero rows too); backward A rows read, dx written
    row = _row(
        f"permute_pad{align}",
        permute,
        2 * tok_bytes + pad_bytes + row_bytes,
        ceil["copy_TBps"],
        baseline,
    )
    row["P"] = P
    row["bit_equal_fwd"] = torch.equal(permute_copy(), permute_padded())
    rows.append(row)
    combine = {
        "torch": _time(combine_copy, (y_PD, w, add), dout),
        "fused": _time(combine_padded, (y_PD, w, add), dout),
    }
    # forward A rows, add read and out written; backward g, A rows read, dy_PD written whole
    row = _row(
        f"combine_pad{align}",
        combine,
        3 * tok_bytes + 2 * row_bytes + pad_bytes,
        ceil["copy_TBps"],
        baseline,
    )
    row["P"] = P
    row["bit_equal_fwd"] = torch.equal(combine_copy(), combine_padded())
    rows.append(row)
    return rows


def print_moe_permute_train(rows: list[dict]) -> None:
    for r in rows:
        print(
            f"moe_permute_train {r['kernel']:14s} T={r['T']} K={r['K']} D={r['D']}"
            f"{' P=' + str(r['P']) if 'P' in r else ''}: fwd+bwd "
            f"{r['torch_fwd_bwd_ms']:.4f} ms torch -> {r['fused_fwd_bwd_ms']:.4f} ms fused "
            f"(x{r['speedup_fwd_bwd']}, {r['fused_fwd_bwd_TBps']} TB/s, {r['frac_copy_bw']:.2f} "
            f"of copy), fwd x{r['speedup_fwd']}; kernels fwd {r['torch_kernels_fwd']} -> "
            f"{r['fused_kernels_fwd']}, bwd {r['torch_kernels_bwd']} -> "
            f"{r['fused_kernels_bwd']}; {r['saved_ms_per_step']} ms a step saved; "
            f"bit== {r['bit_equal_fwd']}"
        )


def moe_permute_records(rows: list[dict]) -> list[dict]:
    """The flat `results` records (runner.flat_results): each row's fused forward+backward against
    its baseline."""
    return [
        _rec(
            f"moe_{r['kernel']} fwd+bwd (autograd)",
            f"T{r['T']} K{r['K']} D{r['D']} E{r['E']} {r['dtype']}",
            r["fused_fwd_bwd_ms"],
            r["frac_copy_bw"],
            "copy bandwidth",
            r.get("baseline", "autograd through Experts._routed's PyTorch ops"),
            r["speedup_fwd_bwd"],
        )
        for r in rows
    ]
