"""`moeray bench kernels --only cross_entropy`: the training loss's cross-entropy, forward and
backward under autograd, the fused kernel (`kernels/cross_entropy.py`: the gradient computed in
the forward, over the logits in place or into a new tensor) against torch.autograd through
`cross_entropy_ref` (F.cross_entropy on an fp32 copy), at T=4096 tokens (a Moonlight micro-batch)
of bf16 logits, V=163,840 (Moonlight) and 129,280 (DeepSeek-V3), every 17th target ignored. Per
case: the times, the CUDA kernels (torch.profiler), the peak memory beyond the logits, and the
fraction of the bandwidth floor: the bf16 logits read once and the bf16 gradient written once
(4 B a token and vocab entry) at the measured copy bandwidth; the kernel reads each row twice, so
~2/3 of the floor is its own ceiling."""

from __future__ import annotations

from typing import Any

import torch

from moeray.kernels.bench.common import _bench
from moeray.kernels.bench.norm import _cuda_kernels
from moeray.kernels.cross_entropy import cross_entropy, cross_entropy_ref

T = 4096
VOCABS = (("moonlight", 163840), ("deepseek_v3", 129280))


def _peak_extra(fn) -> int:
    """Bytes allocated at the peak of one call of fn beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _case(name: str, V: int, copy_tbps: float) -> dict:
    g = torch.Generator(device="cuda").manual_seed(V)
    # a leaf requiring grad: in place, each call's gradient becomes the next call's logits (small
    # finite values; the work does not depend on them)
    x = (torch.randn(T, V, device="cuda", generator=g) * 3).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, V, (T,), device="cuda", generator=g)
    target[::17] = -100
    row: dict[str, Any] = {"kernel": name, "tokens": T, "V": V, "dtype": "bfloat16"}
    impls = (
        ("torch", lambda: cross_entropy_ref(x, target)),
        ("fused_inplace", lambda: cross_entropy(x, target, inplace=True)),
        ("fused", lambda: cross_entropy(x, target)),
    )
    for impl, loss_fn in impls:

        def fwd_bwd(loss_fn=loss_fn):
            return torch.autograd.grad(loss_fn(), x)

        row[f"{impl}_fwd_bwd_ms"] = round(_bench(fwd_bwd), 4)
        row[f"{impl}_kernels"] = _cuda_kernels(fwd_bwd)
        row[f"{impl}_peak_extra_GB"] = round(_peak_extra(fwd_bwd) / 1e9, 3)
    floor_ms = T * V * 4 / (copy_tbps * 1e12) * 1e3
    row["floor_ms"] = round(floor_ms, 4)
    for impl in ("fused_inplace", "fused"):
        row[f"{impl}_frac_of_floor"] = round(floor_ms / row[f"{impl}_fwd_bwd_ms"], 3)
        row[f"speedup_{impl}"] = round(row["torch_fwd_bwd_ms"] / row[f"{impl}_fwd_bwd_ms"], 2)
    return row


def bench_cross_entropy(ceil: dict) -> list[dict]:
    return [_case(name, V, ceil["copy_TBps"]) for name, V in VOCABS]


def print_cross_entropy(rows: list[dict]) -> None:
    for r in rows:
        print(
            f"cross_entropy {r['kernel']:11s} T={r['tokens']} V={r['V']}: fwd+bwd "
            f"{r['torch_fwd_bwd_ms']:.3f} ms torch -> {r['fused_inplace_fwd_bwd_ms']:.3f} ms "
            f"fused in place (x{r['speedup_fused_inplace']}, "
            f"{r['fused_inplace_frac_of_floor']:.2f} of floor {r['floor_ms']:.3f} ms), "
            f"{r['fused_fwd_bwd_ms']:.3f} ms fused to a new grad; kernels "
            f"{r['torch_kernels']} -> {r['fused_inplace_kernels']}; peak extra "
            f"{r['torch_peak_extra_GB']:.2f} -> {r['fused_inplace_peak_extra_GB']:.2f} GB "
            f"({r['fused_peak_extra_GB']:.2f} to a new grad)"
        )
