"""Which grouped GEMM should the routed experts' forward and input-grad GEMMs of training use on
sm_90? Times, at one micro-batch of the one-GPU Moonlight run (8,192 tokens x top-6 = 49,152 rows
over 64 experts, D 2048, I 1408), every GEMM of an MoE layer (gate and up apart or as one
[2I, D] weight; down; their input gradients) with:

  bf16       torch._grouped_mm (CUTLASS), rows 16-aligned: the BF16 baseline
  fp8blk     moeray's Triton block-scaled grouped GEMM (1x128 x 128x128 scales), 128-aligned,
             as shipped (64x128 tile) and with the split-M 128x128 tile
  fp8row     torch._scaled_grouped_mm (CUTLASS, FP8 rowwise: one scale per row of a and per
             output column of b), 16-aligned

plus the quantizations each needs, and checks every output against the bf16 one; and
`weight_quant_t` (the experts' per-step FP8 weights, 30 launches a step) by warps per program
against a device copy of the same fp32 weight. GPU only:
    PYTHONPATH=. python3 scripts/grouped_gemm_probe.py [--json PATH] [--only gemm|wquant|host]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton

from moeray.kernels import fp8 as k
from moeray.kernels.fp8.gemm import _fp8_gemm_kernel
from moeray.kernels.fp8.quant import _weight_quant_t_kernel

FP8 = torch.float8_e4m3fn
E, D, INTER, ROWS = 64, 2048, 1408, 8192 * 6

TILES = {
    "fp8blk64": dict(BLOCK_M=64, BLOCK_N=128, SPLIT_M=False, num_warps=4, num_stages=3),
    "fp8blk128s": dict(BLOCK_M=128, BLOCK_N=128, SPLIT_M=True, num_warps=4, num_stages=3),
    "fp8blk128w8": dict(BLOCK_M=128, BLOCK_N=128, SPLIT_M=False, num_warps=8, num_stages=3),
}


def counts(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Random-init routing is near uniform with some spread: softmax of N(0, 0.5) logits.
    p = torch.softmax(torch.randn(E, generator=g) * 0.5, 0)
    return torch.multinomial(p, ROWS, replacement=True, generator=g).bincount(minlength=E)


def layout(c: torch.Tensor, align: int):
    padded = (c + align - 1) // align * align
    ends = padded.cumsum(0)
    starts = ends - padded
    P = int(ends[-1])
    mask = torch.zeros(P, dtype=torch.bool)
    for s, n in zip(starts.tolist(), c.tolist(), strict=True):
        mask[s : s + n] = True
    blocks = torch.repeat_interleave(torch.arange(E), padded // 128) if align == 128 else None
    return P, ends.to(torch.int32).cuda(), mask.cuda(), blocks


def rowwise_quant(x: torch.Tensor, dim: int = -1):
    s = x.abs().amax(dim, keepdim=True).float().clamp(min=1e-12) / 448.0
    return (x / s).to(FP8), s.squeeze(dim)


def grouped_fp8(aq, as_, w, cfg):
    p, kk = aq.shape
    n = w.q.shape[1]
    c = torch.empty((p, n), dtype=torch.bfloat16, device=aq.device)
    grid = (triton.cdiv(p, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _fp8_gemm_kernel[grid](
        aq, w.q, c, as_, w.s, p, n, kk, aq.stride(0), aq.stride(1), w.q.stride(1),
        w.q.stride(2), c.stride(0), c.stride(1), as_.stride(0), as_.stride(1), w.s.stride(1),
        w.s.stride(2), w.blocks, w.q.stride(0), w.s.stride(0), B_SCALE_DIV=128, ROW_SCALE=True,
        EVEN_K=kk % 128 == 0, UPCAST=False, GROUPED=True, NUM_STAGES=cfg["num_stages"],
        BLOCK_K=128, GROUP_M=8, **cfg,
    )  # fmt: skip
    return c


class W:
    pass


def rel_err(out, ref, mask) -> float:
    return ((out - ref)[mask].float().norm() / ref[mask].float().norm()).item()


def probe_shape(n: int, kk: int, lay16, lay128) -> dict:
    dev = "cuda"
    w_ENK = torch.randn(E, n, kk, device=dev) * kk**-0.5
    wb = w_ENK.to(torch.bfloat16)
    res = {"N": n, "K": kk}
    # bf16 baseline on the 16-aligned layout
    P, offs, mask, _ = lay16
    a = torch.randn(P, kk, device=dev, dtype=torch.bfloat16) * mask[:, None]
    ref = torch._grouped_mm(a, wb.transpose(-2, -1), offs=offs)
    flops = 2 * ROWS * n * kk

    def bench(fn):
        ms = triton.testing.do_bench(fn, warmup=25, rep=100)
        return {"ms": ms, "tflops": flops / ms / 1e9}

    res["bf16"] = bench(lambda: torch._grouped_mm(a, wb.transpose(-2, -1), offs=offs))
    # fp8 rowwise (torch._scaled_grouped_mm) on the same layout
    aq, as_ = rowwise_quant(a)
    wq, ws = rowwise_quant(w_ENK)  # per (e, n) over K
    out = torch._scaled_grouped_mm(
        aq, wq.transpose(-2, -1), as_, ws, offs=offs, out_dtype=torch.bfloat16
    )
    res["fp8row"] = bench(
        lambda: torch._scaled_grouped_mm(
            aq, wq.transpose(-2, -1), as_, ws, offs=offs, out_dtype=torch.bfloat16
        )
    )
    res["fp8row"]["rel_err"] = rel_err(out, ref, mask)
    res["quant_rowwise_torch"] = bench(lambda: rowwise_quant(a))
    # fp8 block-scaled (Triton) on the 128-aligned layout
    P, _, mask, blocks = lay128
    a = torch.zeros(P, kk, device=dev, dtype=torch.bfloat16)
    a[mask] = torch.randn(int(mask.sum()), kk, device=dev, dtype=torch.bfloat16)
    ref = torch._grouped_mm(a, wb.transpose(-2, -1), offs=lay128[1])
    aq, as_ = k.act_quant(a, scale_col_major=True)
    wt = W()
    wt.q, wt.s = (t.contiguous() for t in k.weight_quant(w_ENK.reshape(-1, kk))[:2])
    wt.q = wt.q.view(E, n, kk)
    wt.s = wt.s.view(E, n // 128, -1)
    wt.blocks = blocks.to(torch.int32).to(dev)
    res["act_quant_1x128"] = bench(lambda: k.act_quant(a, scale_col_major=True))
    for tname, cfg in TILES.items():
        try:
            out = grouped_fp8(aq, as_, wt, cfg)
            res[tname] = bench(lambda cfg=cfg: grouped_fp8(aq, as_, wt, cfg))
            res[tname]["rel_err"] = (
                (out - ref)[mask].float().norm() / ref[mask].float().norm()
            ).item()
        except Exception as exc:  # a tile that does not compile is a result
            res[tname] = {"error": repr(exc)[:200]}
    return res


def probe_weight_quant_t() -> dict:
    """weight_quant_t of the stacked gate weight [E, I, D] fp32 by num_warps: ms and TB/s (fp32
    read + two e4m3 writes), against a device copy of the weight (read + write)."""
    w = torch.randn(E, INTER, D, device="cuda")
    q, s, qt = k.weight_quant_t(w)
    out = {}
    moved = w.numel() * (4 + 1 + 1)
    copy_ms = triton.testing.do_bench(lambda: w.clone(), warmup=10, rep=100)
    out["copy"] = {"ms": copy_ms, "tbps": 2 * w.numel() * 4 / copy_ms / 1e9}
    for warps in (2, 4, 8, 16):

        def launch(warps=warps):
            _weight_quant_t_kernel[(s.shape[1], s.shape[2], E)](
                w, q, s, qt, INTER, D, w.stride(0), w.stride(1), q.stride(0), s.stride(0),
                s.stride(1), qt.stride(0), BLOCK=128, EXACT=False, num_warps=warps,
            )  # fmt: skip

        launch()
        ref = k.weight_quant_t(w)
        same = bool(torch.equal(q.view(torch.uint8), ref[0].view(torch.uint8))) and bool(
            torch.equal(qt.view(torch.uint8), ref[2].view(torch.uint8))
        )
        ms = triton.testing.do_bench(launch, warmup=10, rep=100)
        out[f"warps{warps}"] = {"ms": ms, "tbps": moved / ms / 1e9, "bits_equal": same}
    print("weight_quant_t [E, I, D] fp32:", json.dumps(out), flush=True)
    return out


def probe_host_cost() -> dict:
    """Host microseconds per call (launch and Python, the GPU kept ahead by tiny shapes) of the
    FP8 experts' Triton calls against torch's grouped GEMM and an elementwise op."""
    dev = "cuda"
    x = torch.randn(256, 256, device=dev, dtype=torch.bfloat16)
    w = torch.randn(2, 256, 256, device=dev, dtype=torch.bfloat16)
    offs = torch.tensor([128, 256], device=dev, dtype=torch.int32)
    xq, xs = k.act_quant(x, scale_col_major=True)
    wq, ws, _ = k.weight_quant_t(w.float())
    blocks = torch.tensor([0, 1], device=dev, dtype=torch.int32)
    calls = {
        "torch_grouped_mm": lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
        "torch_mul": lambda: x * x,
        "act_quant": lambda: k.act_quant(x, scale_col_major=True),
        "fp8_gemm_grouped": lambda: k.fp8_gemm_grouped(xq, xs, wq, ws, blocks),
    }
    out = {}
    for name, fn in calls.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            fn()
        out[name] = (time.perf_counter() - t0) / 500 * 1e6
        torch.cuda.synchronize()
    print("host us per call:", json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "probe.json"))
    ap.add_argument("--only", choices=("gemm", "wquant", "host"))
    args = ap.parse_args()
    torch.manual_seed(0)
    wquant = probe_weight_quant_t() if args.only in (None, "wquant") else None
    host = probe_host_cost() if args.only in (None, "host") else None
    if args.only in ("wquant", "host"):
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "weight_quant_t": wquant,
                    "host_us_per_call": host,
                },
                f,
            )
        return
    c = counts()
    shapes = {  # name: (N, K)
        "gate": (INTER, D), "gate_up": (2 * INTER, D), "down": (D, INTER),
        "dgrad_down": (INTER, D), "dgrad_gate": (D, INTER), "dgrad_gate_up": (D, 2 * INTER),
    }  # fmt: skip
    rows = {}
    lay16, lay128 = layout(c, 16), layout(c, 128)
    for name, (n, kk) in shapes.items():
        rows[name] = res = probe_shape(n, kk, lay16, lay128)
        print(name, json.dumps(res), flush=True)
    layer_sets = {
        "apart": ["gate", "gate", "down", "dgrad_down", "dgrad_gate", "dgrad_gate"],
        "fused": ["gate_up", "down", "dgrad_down", "dgrad_gate_up"],
    }
    print(f"\nper MoE layer and micro-batch ({ROWS} rows, P16={lay16[0]}, P128={lay128[0]}), ms")
    methods = ["bf16", "fp8row", *TILES]
    print(f"{'gemms':8s}" + "".join(f"{m:>13s}" for m in methods))
    summary = {}
    for ls, names in layer_sets.items():
        tot = {m: sum(rows[nm][m].get("ms", float("nan")) for nm in names) for m in methods}
        summary[ls] = tot
        print(f"{ls:8s}" + "".join(f"{tot[m]:13.3f}" for m in methods))
    print("act_quant 1x128 [P,2048] ms", rows["gate"]["act_quant_1x128"]["ms"])
    print("rowwise quant (torch ops) [P,2048] ms", rows["gate"]["quant_rowwise_torch"]["ms"])
    with open(args.json, "w") as f:
        json.dump(
            {
                "device": torch.cuda.get_device_name(),
                "rows": rows,
                "summary": summary,
                "weight_quant_t": wquant,
                "host_us_per_call": host,
            },
            f,
        )


if __name__ == "__main__":
    main()
