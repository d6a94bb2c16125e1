"""Benchmarks of the fused MoE (bf16 and FP8 weights, decode and prefill) against the per-expert
PyTorch loop and the bandwidth / compute floor, and its block-config sweep."""

from __future__ import annotations

import functools
from typing import TypedDict

import torch

from moeray.kernels.bench.common import _bench, _bench_slow, _try, device_ms
from moeray.kernels.fp8.quant import weight_quant
from moeray.kernels.moe import fused_moe, fused_moe_ref


class _Scales(TypedDict, total=False):
    """The FP8 weights' scales, as fused_moe / fused_moe_ref keywords (none for bf16)."""

    w13_scale: torch.Tensor
    w2_scale: torch.Tensor


def quantized_experts(w_ENK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's weight quantized on its own: (e4m3 [E, N, K], scales [E, N/128, K/128])."""
    q, s = map(torch.stack, zip(*[weight_quant(w) for w in w_ENK], strict=True))
    return q, s


def _moe_phase_rows(ceil, phase, t, w13, w2, q13, s13, q2, s2, top_k) -> list[dict]:
    """fused_moe with bf16 and with FP8 weights on `t` routed tokens, against the per-expert loop
    and the bandwidth / compute floor."""
    experts, hidden, inter = w2.shape
    x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(t, experts, device="cuda").topk(top_k, dim=1).indices.to(torch.int32)
    wts = torch.rand(t, top_k, device="cuda", dtype=torch.bfloat16)
    touched = int(torch.unique(ids).numel())
    flops = 2 * t * top_k * 3 * hidden * inter

    # Baseline: the per-expert PyTorch loop with bf16 weights (cuBLAS GEMMs per expert); the FP8
    # kernel is compared with it too, since a loop over FP8 experts would dequantize each time.
    def loop():
        return fused_moe_ref(x, w13, w2, ids, wts, compute_dtype=torch.bfloat16)

    loop_ms = _bench_slow(loop)
    loop_gpu_ms = device_ms(loop)  # its kernels alone: the host's speed left out

    def row(wname: str, args: tuple[torch.Tensor, torch.Tensor], kw: _Scales, elt: int) -> dict:
        def fn():
            return fused_moe(x, *args, ids, wts, **kw)

        out = fn()
        ms = _bench(fn, ms=200)
        weight_bytes = touched * 3 * hidden * inter * elt
        floor_bw_ms = (weight_bytes + 2 * t * hidden * 2) / (ceil["copy_TBps"] * 1e9)
        rate = ceil["fp8_matmul_TFLOPs"] if elt == 1 else ceil["bf16_matmul_TFLOPs"]
        floor_fl_ms = flops / (rate * 1e9)
        ref = fused_moe_ref(x[:64], *args, ids[:64], wts[:64], **kw).float()
        err = ((out[:64].float() - ref).norm() / ref.norm()).item()
        return {
            "kernel": f"fused_moe_{wname}",
            "phase": phase,
            "tokens": t,
            "experts": experts,
            "top_k": top_k,
            "hidden": hidden,
            "inter": inter,
            "experts_touched": touched,
            "ms": round(ms, 4),
            "loop_ms": round(loop_ms, 3),
            "speedup_vs_loop": round(loop_ms / ms, 2),
            "loop_gpu_ms": round(loop_gpu_ms, 3) if loop_gpu_ms else None,
            "speedup_vs_loop_gpu": round(loop_gpu_ms / ms, 2) if loop_gpu_ms else None,
            "TBps_weights": round(weight_bytes / ms / 1e9, 3),
            "TFLOPs": round(flops / ms / 1e9, 1),
            "floor_ms": round(max(floor_bw_ms, floor_fl_ms), 4),
            "frac_of_floor": round(max(floor_bw_ms, floor_fl_ms) / ms, 3),
            "floor_is": "bandwidth" if floor_bw_ms > floor_fl_ms else "compute",
            "rel_err_vs_ref_first64": round(err, 5),
        }

    return [
        row("bf16", (w13, w2), {}, 2),
        row("fp8", (q13, q2), {"w13_scale": s13, "w2_scale": s2}, 1),
    ]


# DeepSeek-V3's routed experts: decode at 64 tokens then has ~2 real rows in each 16-row block
# (at 64 experts, 8), the padding-heavy case where unmasked padding-row loads made the FP8 MoE
# 1.2x slower unnoticed (benchmarks/notes-engine.md); timed at decode besides `experts`.
DECODE_WIDE_EXPERTS = 256


def random_experts(experts: int, hidden: int, inter: int) -> tuple[torch.Tensor, ...]:
    """Random bf16 expert weights on the GPU (w13 [E, 2I, H], w2 [E, H, I], scaled by
    1/sqrt(fan-in)) and their FP8 forms: (w13, w2, q13, s13, q2, s2)."""
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) / inter**0.5
    return (w13, w2, *quantized_experts(w13), *quantized_experts(w2))


def bench_moe(ceil: dict, hidden: int, inter: int, experts: int) -> list[dict]:
    """Decode (64 tokens) and prefill (8,192) at `experts`, top-8; decode again at
    DECODE_WIDE_EXPERTS."""
    rows = []
    torch.manual_seed(0)
    top_k = 8
    w13, w2, q13, s13, q2, s2 = random_experts(experts, hidden, inter)
    for phase, t in (("decode", 64), ("prefill", 8192)):
        rows += _moe_phase_rows(ceil, phase, t, w13, w2, q13, s13, q2, s2, top_k)
    if experts != DECODE_WIDE_EXPERTS:
        del w13, w2, q13, s13, q2, s2  # (V3's 256 experts are 22.5 GB in bf16)
        w13, w2, q13, s13, q2, s2 = random_experts(DECODE_WIDE_EXPERTS, hidden, inter)
        rows += _moe_phase_rows(ceil, "decode", 64, w13, w2, q13, s13, q2, s2, top_k)
    return rows


# The prefill sweep's tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the shipped ones
# first, then taller / wider tiles and deeper pipelines. gate/up holds two BM x BN accumulators.
PREFILL_SWEEP = {
    "bf16": [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 32, 8, 5),
        (128, 128, 64, 8, 2),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (128, 64, 64, 8, 4),
        (256, 64, 64, 8, 3),
        (64, 256, 64, 8, 3),
    ],
    "fp8": [
        (64, 128, 128, 4, 3),
        (64, 128, 128, 4, 4),
        (128, 128, 128, 8, 3),
        (128, 128, 128, 8, 2),
        (128, 64, 128, 4, 3),
        (128, 64, 128, 8, 4),
        (64, 64, 128, 4, 5),
        (128, 128, 64, 8, 4),
        (64, 128, 64, 4, 5),
    ],
}


def sweep_fused_moe_prefill(hidden: int, inter: int, experts: int, tokens: int = 8192) -> dict:
    """The prefill shape's tiles (PREFILL_SWEEP) timed against the per-expert loop in one run:
    {"loop_ms", "rows": [{weights, tile, ms, speedup_vs_loop, TFLOPs}]}."""
    torch.manual_seed(0)
    top_k = 8
    w13, w2, q13, s13, q2, s2 = random_experts(experts, hidden, inter)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(tokens, experts, device="cuda").topk(top_k, dim=1).indices.to(torch.int32)
    wts = torch.rand(tokens, top_k, device="cuda", dtype=torch.bfloat16)
    flops = 2 * tokens * top_k * 3 * hidden * inter

    def loop():
        return fused_moe_ref(x, w13, w2, ids, wts, compute_dtype=torch.bfloat16)

    loop_ms = _bench_slow(loop)
    loop_gpu_ms = device_ms(loop)
    variants: dict[str, tuple[tuple[torch.Tensor, torch.Tensor], _Scales]] = {
        "bf16": ((w13, w2), {}),
        "fp8": ((q13, q2), {"w13_scale": s13, "w2_scale": s2}),
    }
    rows = []
    for wname, (args, kw) in variants.items():
        for bm, bn, bk, nw, ns in PREFILL_SWEEP[wname]:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
            tms = _try(functools.partial(fused_moe, x, *args, ids, wts, config=cfg, **kw))
            row: dict = {"weights": wname, **cfg, "ms": tms}
            if isinstance(tms, float):
                row.update(speedup_vs_loop=round(loop_ms / tms, 3), TFLOPs=round(flops / tms / 1e9))
                if loop_gpu_ms:
                    row["speedup_vs_loop_gpu"] = round(loop_gpu_ms / tms, 3)
            rows.append(row)
    shape = f"T{tokens}, top-{top_k} of {experts}, {hidden}/{inter}"
    gpu = round(loop_gpu_ms, 3) if loop_gpu_ms else None
    return {"shape": shape, "loop_ms": round(loop_ms, 3), "loop_gpu_ms": gpu, "rows": rows}


def print_fused_moe_prefill_sweep(sw: dict) -> None:
    print(
        f"fused_moe prefill sweep {sw['shape']}: per-expert loop {sw['loop_ms']} ms "
        f"(its kernels alone {sw.get('loop_gpu_ms')} ms)"
    )
    for r in sw["rows"]:
        tile = f"{r['BLOCK_M']}x{r['BLOCK_N']}x{r['BLOCK_K']} w{r['num_warps']} s{r['num_stages']}"
        tail = (
            f"{r['ms']:8.3f} ms x{r['speedup_vs_loop']} loop "
            f"(x{r.get('speedup_vs_loop_gpu')} its kernels) {r['TFLOPs']} TFLOP/s"
            if "TFLOPs" in r
            else str(r["ms"])[:100]
        )
        print(f"  {r['weights']:4s} {tile:22s} {tail}")


def sweep_fused_moe() -> list[dict]:
    """Time candidate block configs of the fused MoE at decode (T64) and prefill (T8192, the
    PREFILL_SWEEP tiles; `sweep_fused_moe_prefill` times them against the loop too)."""
    out = []
    e, h, i, top_k = 64, 7168, 2048, 8
    w13, w2, q13, s13, q2, s2 = random_experts(e, h, i)
    decode_cfgs = [
        (16, 64, 128, 4, 4),
        (16, 128, 128, 4, 4),
        (16, 32, 128, 4, 4),
        (32, 64, 128, 4, 4),
        (16, 64, 128, 4, 6),
        (16, 64, 64, 4, 6),
    ]
    for phase, t in (("decode", 64), ("prefill", 8192)):
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        ids = torch.rand(t, e, device="cuda").topk(top_k, dim=1).indices.to(torch.int32)
        wts = torch.rand(t, top_k, device="cuda", dtype=torch.bfloat16)
        variants: tuple[tuple[str, tuple[torch.Tensor, torch.Tensor], _Scales], ...] = (
            ("bf16", (w13, w2), {}),
            ("fp8", (q13, q2), {"w13_scale": s13, "w2_scale": s2}),
        )
        for wname, args, kw in variants:
            for bm, bn, bk, nw, ns in decode_cfgs if phase == "decode" else PREFILL_SWEEP[wname]:
                if wname == "fp8" and 128 % bk:
                    continue
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
                tms = _try(functools.partial(fused_moe, x, *args, ids, wts, config=cfg, **kw))
                out.append({"phase": phase, "weights": wname, **cfg, "ms": tms})
    return out
