"""The fused MoE's block configs at decode token counts, at published expert shapes: each config's
time per fused_moe call (alignment, gate_up, down and sum; FP8's activation quantization too)
and the bandwidth that reaches, bf16 and FP8 weights, so that `kernels/moe.py` `_moe_config` can
be set from numbers.

Timing: a CUDA graph of REPS calls, each call routed to other experts (disjoint sets in turn), so
that no call finds its weights in L2 (Moonlight's 6 experts are 69 MB of gate_up, the H200's L2
is 50 MB); the time is the graph's replay over REPS. Bytes: the distinct experts' gate_up and
down weights (with their scales) that the call reads.

    python scripts/moe_decode_sweep.py --out moe-decode-sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from moeray.kernels.bench.moe import quantized_experts
from moeray.kernels.moe import _moe_config, fused_moe

SHAPES = {  # name: (hidden, moe_intermediate, routed experts, top-k), from the published configs
    "moonlight": (2048, 1408, 64, 6),
    "v3": (7168, 2048, 256, 8),
}
REPS = 20


def configs(block_m: str, block_n: str, stages: str) -> list[dict]:
    """Every combination of the comma-separated block rows, block columns and stage counts."""
    return [
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, num_warps=4, num_stages=ns)
        for bm, bn, ns in itertools.product(
            *(tuple(map(int, v.split(","))) for v in (block_m, block_n, stages))
        )
    ]


def time_call(fn) -> float:
    """Microseconds per call: a CUDA graph of REPS calls (fn(r) for r in range(REPS))."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for r in range(REPS):  # compile and warm outside the capture
            fn(r)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for r in range(REPS):
            fn(r)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / REPS)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="moonlight,v3")
    p.add_argument("--tokens", default="1,8,64")
    p.add_argument("--block-m", default="16,32")
    p.add_argument("--block-n", default="32,64,128")
    p.add_argument("--stages", default="3,4")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    for shape in args.shapes.split(","):
        h, i, e, k = SHAPES[shape]
        torch.manual_seed(0)
        w13 = torch.randn(e, 2 * i, h, device=dev, dtype=torch.bfloat16) / h**0.5
        w2 = torch.randn(e, h, i, device=dev, dtype=torch.bfloat16) / i**0.5
        q13, s13 = quantized_experts(w13)
        q2, s2 = quantized_experts(w2)
        for t in map(int, args.tokens.split(",")):
            x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
            # call r: each token's k experts drawn from window r of a rotation of all experts
            # (windows of min(E, T * K) experts: at batch 1 disjoint sets of K in turn)
            perm = torch.randperm(e, device=dev)
            win = min(e, t * k)
            ids = []
            for r in range(REPS):
                pool = perm[(r * win + torch.arange(win, device=dev)) % e]
                pick = torch.rand(t, win, device=dev).argsort(1)[:, :k]
                ids.append(pool[pick].to(torch.int32))
            wts = torch.rand(t, k, device=dev, dtype=torch.bfloat16)
            experts = sum(int(torch.unique(a).numel()) for a in ids) / REPS
            for weights, (a13, a2, kw, bpe) in {
                "bf16": (w13, w2, {}, 2.0),
                "fp8": (q13, q2, {"w13_scale": s13, "w2_scale": s2}, 1.0 + 4 / 128**2),
            }.items():
                nbytes = experts * 3 * h * i * bpe
                default = _moe_config(t * k, e, weights == "fp8")
                for cfg in configs(args.block_m, args.block_n, args.stages):

                    def call(r, cfg=cfg, a13=a13, a2=a2, kw=kw, x=x, ids=ids, wts=wts):
                        fused_moe(x, a13, a2, ids[r], wts, config=cfg, **kw)

                    try:
                        us = time_call(call)
                        err = None
                    except Exception as ex:  # a tile that does not fit (shared memory)
                        us, err = None, f"{type(ex).__name__}: {str(ex)[:100]}"
                    rows.append(
                        {
                            "shape": shape,
                            "tokens": t,
                            "weights": weights,
                            **cfg,
                            "default": all(cfg[k2] == default[k2] for k2 in default),
                            "us": us,
                            "tb_per_s": None if us is None else nbytes / us / 1e6,
                            "experts_per_call": experts,
                            "error": err,
                        }
                    )
                    r = rows[-1]
                    print(
                        f"{shape:9} t={t:3} {weights:4} BM{cfg['BLOCK_M']:3} BN{cfg['BLOCK_N']:4} "
                        f"st{cfg['num_stages']} {'*' if r['default'] else ' '} "
                        f"{us if us is None else round(us, 1)!s:>7} us "
                        f"{r['tb_per_s'] and round(r['tb_per_s'], 2)!s:>5} TB/s {err or ''}",
                        flush=True,
                    )
    best = {}
    for r in rows:
        key = f"{r['shape']} t={r['tokens']} {r['weights']}"
        if r["us"] is not None and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    print("\nbest per shape (the default config's time):")
    for key, r in best.items():
        d = next(
            x
            for x in rows
            if x["default"] and f"{x['shape']} t={x['tokens']} {x['weights']}" == key
        )
        print(
            f"{key:26} BM{r['BLOCK_M']} BN{r['BLOCK_N']} st{r['num_stages']} {r['us']:.1f} us "
            f"{r['tb_per_s']:.2f} TB/s (default {d['us']} us)"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"reps": REPS, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
