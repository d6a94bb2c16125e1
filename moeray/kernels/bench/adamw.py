"""`moeray bench kernels --only adamw`: the optimizer step over one Moonlight-16B-A3B MoE layer's
parameters (0.585B: three stacked expert weights [64, 1408, 2048] / [64, 2048, 1408], the
attention and shared-expert matrices, the router's gate, the norms; issue 20 trains 10 such
layers, 6.02B parameters with the embedding and head), fp32 parameters and gradients, two
weight-decay groups (matrices 0.1, vectors 0) as ShardedAdamW steps them:

- `adamw_step` (kernels/adamw.py) with bf16 moments (20 B a parameter: reads p4 g4 m2 v2, writes
  p4 m2 v2), with fp32 moments (28 B), and with bf16 moments under each candidate config of SWEEP;
- `adamw_step_ref` with bf16 moments: the per-parameter loop ShardedAdamW runs without the kernel
  (MOERAY_FUSED_ADAMW=0);
- torch.optim.AdamW(fused=True).step with fp32 moments: what training runs for fp32 moments.

Per row: median ms (CUDA events), the host time of one call (argument checks, table, launch:
what the host spends before the GPU can finish), the bandwidth at the ideal bytes (20 or 28 B a
parameter) against the copy bandwidth measured in the same run, ms per billion parameters and
that scaled to issue 20's 6.02B, and the CUDA kernels (and copies) one call launches."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from moeray.kernels.adamw import DEFAULT_CONFIG, adamw_step, adamw_step_ref
from moeray.kernels.bench.common import _bench, _rec
from moeray.kernels.bench.norm import _cuda_kernels

# One Moonlight MoE layer's parameters (model.layers.N of moonlight_16b_a3b, 10 layers: 139
# tensors, 6.02B parameters in all with the embedding and the head)
LAYER = (
    ("input_layernorm", (2048,)),
    ("q_proj", (3072, 2048)),
    ("kv_a_proj_with_mqa", (576, 2048)),
    ("kv_a_layernorm", (512,)),
    ("kv_b_proj", (4096, 512)),
    ("o_proj", (2048, 2048)),
    ("post_attention_layernorm", (2048,)),
    ("gate", (64, 2048)),
    ("experts.gate_proj", (64, 1408, 2048)),
    ("experts.up_proj", (64, 1408, 2048)),
    ("experts.down_proj", (64, 2048, 1408)),
    ("shared.gate_proj", (2816, 2048)),
    ("shared.up_proj", (2816, 2048)),
    ("shared.down_proj", (2048, 2816)),
)
ISSUE_20_PARAMS = 6.018e9  # Moonlight widths, 10 layers (bench train --layers 10)
# Candidate configs (BLOCK, ITERS, num_warps); DEFAULT_CONFIG among them
SWEEP = (
    (1024, 16, 4),
    (1024, 32, 4),
    (2048, 8, 8),
    (2048, 16, 8),
    (2048, 32, 8),
    (4096, 8, 8),
    (4096, 8, 16),
    (4096, 16, 16),
)
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8)
BF16, F32 = torch.bfloat16, torch.float32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _host_ms(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Median host-side ms of one call, the device idle before it (the optimizer step follows
    the gradient norm's host read in training, so the GPU waits for this)."""
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        _sync(device)
    return statistics.median(times)


class _Layer:
    """The layer's parameters with gradients, in two weight-decay groups, and moments of both
    dtypes (zeros: the work does not depend on the values)."""

    def __init__(self, device: torch.device, shapes) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        self.params = [torch.randn(s, device=device, generator=g) for _, s in shapes]
        self.grads = [torch.randn(s, device=device, generator=g) * 1e-2 for _, s in shapes]
        self.moments = {
            dt: tuple([torch.zeros_like(p, dtype=dt) for p in self.params] for _ in range(2))
            for dt in (BF16, F32)
        }
        self.decay = [i for i, p in enumerate(self.params) if p.dim() >= 2]
        self.no_decay = [i for i, p in enumerate(self.params) if p.dim() < 2]
        self.numel = sum(p.numel() for p in self.params)

    def step(self, fn, m_dtype: torch.dtype, **kw: Any) -> None:
        """One optimizer step: a call of fn per weight-decay group."""
        ms, vs = self.moments[m_dtype]
        for idx, wd in ((self.decay, 0.1), (self.no_decay, 0.0)):
            fn(
                [self.params[i] for i in idx],
                [self.grads[i] for i in idx],
                [ms[i] for i in idx],
                [vs[i] for i in idx],
                **HYPER,
                weight_decay=wd,
                step=3,
                **kw,
            )


def _row(impl: str, moments: str, fn, layer: _Layer, bytes_per_param: int, ceil: dict) -> dict:
    device = layer.params[0].device
    ms = _bench(fn)
    gbps = layer.numel * bytes_per_param / ms / 1e6
    return {
        "impl": impl,
        "moments": moments,
        "params": layer.numel,
        "tensors": len(layer.params),
        "ms": round(ms, 4),
        "host_ms": round(_host_ms(fn, device), 3),
        "ideal_bytes_per_param": bytes_per_param,
        "GBps": round(gbps, 1),
        "frac_copy_bw": round(gbps / (ceil["copy_TBps"] * 1e3), 3),
        "ms_per_Bparams": round(ms / (layer.numel / 1e9), 3),
        "issue20_ms": round(ms / layer.numel * ISSUE_20_PARAMS, 2),
        "kernels": _cuda_kernels(fn) if device.type == "cuda" else None,
    }


def bench_adamw(ceil: dict, device: str = "cuda", shapes=LAYER, sweep=SWEEP) -> list[dict]:
    """The rows of the module docstring, then the sweep's (impl "adamw_step config ...");
    `device`, `shapes`, `sweep` let a CPU test run the same code at small sizes."""
    dev = torch.device(device)
    layer = _Layer(dev, shapes)
    torch_opt = torch.optim.AdamW(
        [
            {"params": [layer.params[i] for i in layer.decay], "weight_decay": 0.1},
            {"params": [layer.params[i] for i in layer.no_decay], "weight_decay": 0.0},
        ],
        lr=HYPER["lr"],
        betas=(HYPER["beta1"], HYPER["beta2"]),
        eps=HYPER["eps"],
        fused=dev.type == "cuda",
    )
    for p, g in zip(layer.params, layer.grads, strict=True):
        p.grad = g
    rows = [
        _row("torch AdamW(fused)", "float32", torch_opt.step, layer, 28, ceil),
        _row("adamw_step", "bfloat16", lambda: layer.step(adamw_step, BF16), layer, 20, ceil),
        _row("adamw_step", "float32", lambda: layer.step(adamw_step, F32), layer, 28, ceil),
        _row(
            "adamw_step_ref", "bfloat16", lambda: layer.step(adamw_step_ref, BF16), layer, 20, ceil
        ),
    ]
    del torch_opt
    torch_ms = rows[0]["ms"]
    for r in rows:
        r["speedup_vs_torch_fused_fp32"] = round(torch_ms / r["ms"], 3)
    for block, iters, warps in sweep:
        cfg = dict(BLOCK=block, ITERS=iters, num_warps=warps)
        row = _row(
            f"adamw_step config {block}x{iters}/{warps}w",
            "bfloat16",
            lambda cfg=cfg: layer.step(adamw_step, BF16, config=cfg),
            layer,
            20,
            ceil,
        )
        row["config"] = cfg
        row["default"] = cfg == DEFAULT_CONFIG
        row["speedup_vs_torch_fused_fp32"] = round(torch_ms / row["ms"], 3)
        rows.append(row)
    return rows


def print_adamw(rows: list[dict]) -> None:
    if rows:
        r0 = rows[0]
        print(f"\nadamw: {r0['params'] / 1e9:.3f}B parameters in {r0['tensors']} tensors")
    for r in rows:
        print(
            f"adamw {r['impl']:30s} {r['moments']:8s}: {r['ms']:8.3f} ms (host {r['host_ms']:6.3f}"
            f" ms), {r['GBps']:7.1f} GB/s at {r['ideal_bytes_per_param']} B/param "
            f"({r['frac_copy_bw']:.2f} of copy), {r['ms_per_Bparams']:6.2f} ms/B params "
            f"-> {r['issue20_ms']:7.2f} ms at 6.02B, x{r['speedup_vs_torch_fused_fp32']} torch "
            f"fused fp32, kernels {r['kernels']}" + ("  (default)" if r.get("default") else "")
        )


def adamw_records(rows: list[dict]) -> list[dict]:
    """The flat `results` records (runner.flat_results): the kernel with each moment dtype and
    the loop it replaces, against torch's fused fp32 AdamW; the sweep's rows stay in the
    section."""
    out = []
    for r in rows:
        if r["impl"] not in ("adamw_step", "adamw_step_ref"):
            continue
        out.append(
            _rec(
                f"{r['impl']} ({r['moments']} moments)",
                f"Moonlight MoE layer: {r['params']} params, {r['tensors']} tensors",
                r["ms"],
                r["frac_copy_bw"],
                f"copy bandwidth at {r['ideal_bytes_per_param']} B/param",
                "torch.optim.AdamW(fused=True), fp32 moments",
                r["speedup_vs_torch_fused_fp32"],
            )
        )
    return out
