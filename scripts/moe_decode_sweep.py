"""The fused MoE's block configs at decode token counts, at published expert shapes: each config's
time per fused_moe call (alignment, gate_up, down and sum; FP8's activation quantization too)
and the bandwidth that reaches, bf16 and FP8 weights, so that `kernels/moe_tiles.py`
`moe_config` can be set from numbers. `--path gemv` times `moe_gemv` (no alignment, FP8
weight-only: gate_up, down and sum) over its tiles instead, `--path both` the two, for
`moe_gemv_config` and MOE_GEMV_MAX_ASSIGNMENTS; rows say which ("path"), "default" marks each
path's heuristic tile.

Timing: a CUDA graph of REPS calls, each call routed to other experts (disjoint sets in turn), so
that no call finds its weights in L2 (Moonlight's 6 experts are 69 MB of gate_up, the H200's L2
is 50 MB); the time is the graph's replay over REPS. Bytes: the distinct experts' gate_up and
down weights (with their scales) that the call reads.

    python scripts/moe_decode_sweep.py --out moe-decode-sweep.json
    python scripts/moe_decode_sweep.py --path both --tokens 1,2 --out moe-gemv-sweep.json
    python scripts/moe_decode_sweep.py --path gemv --tokens 1 --gemv-block-n 16 --gemv-warps 2 \
        --gemv-stages 4 --gemv-down 16:2:4,32:2:4,32:4:4,64:4:4,64:8:3   # down's own tiles
    python scripts/moe_decode_sweep.py --tokens 64 --block-m 16 --block-n 32 --stages 4 \
        --aligned-down 64:4:4,128:4:4,128:8:3   # the aligned down launch's own tiles
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import torch

from moeray.kernels.bench.moe import random_experts
from moeray.kernels.moe import fused_moe
from moeray.kernels.moe_gemv import moe_gemv, moe_gemv_config
from moeray.kernels.moe_tiles import moe_config

SHAPES = {  # name: (hidden, moe_intermediate, routed experts, top-k), from the published configs
    "moonlight": (2048, 1408, 64, 6),
    "v3": (7168, 2048, 256, 8),
    # As the engine runs them with the shared expert fused into the gate (model/shared_fuse.py:
    # one more expert and one more pick a token): V3's 9 picks, and the `small` preset's (the
    # MTP benchmark's model) 1024 x 288 experts, 64 + 1 with 8 + 1 picks.
    "v3+shared": (7168, 2048, 257, 9),
    "small+shared": (1024, 288, 65, 9),
}
REPS = 20


def configs(fixed: dict, **lists: str) -> list[dict]:
    """Every combination of the comma-separated ints given per config key, each with `fixed`."""
    keys = list(lists)
    values = (tuple(map(int, v.split(","))) for v in lists.values())
    return [
        {**fixed, **dict(zip(keys, combo, strict=True))} for combo in itertools.product(*values)
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


def _tile(cfg: dict) -> str:
    """A config in one short column: BM (aligned only), BN, warps, stages (and the down launch's
    tile where it has its own)."""
    bm = f"BM{cfg['BLOCK_M']:3} " if "BLOCK_M" in cfg else "      "
    mask = f" mask{cfg['MASK_ROWS']}" if "MASK_ROWS" in cfg else ""
    d = cfg.get("down")
    down = f" down BN{d['BLOCK_N']} w{d['num_warps']} st{d['num_stages']}" if d else ""
    return f"{bm}BN{cfg['BLOCK_N']:4} w{cfg['num_warps']} st{cfg['num_stages']}{mask}{down}"


def down_tiles(text: str, flag: str = "--gemv-down") -> list[dict | None]:
    """--gemv-down's (or --aligned-down's) tiles as "down" configs, after None (the gate/up
    tile, the baseline each is read against)."""
    out: list[dict | None] = [None]
    for part in filter(None, text.split(",")):
        try:
            bn, warps, stages = map(int, part.split(":"))
        except ValueError:
            want = "want BLOCK_N:warps:stages, e.g. 32:4:4"
            raise SystemExit(f"{flag} {part!r}: {want}") from None
        out.append(dict(BLOCK_N=bn, num_warps=warps, num_stages=stages))
    return out


def _key(r: dict) -> str:
    return f"{r['shape']} t={r['tokens']} {r['weights']} {r['path']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="moonlight,v3")
    p.add_argument("--tokens", default="1,8,64")
    p.add_argument("--block-m", default="16,32")
    p.add_argument("--block-n", default="32,64,128")
    p.add_argument("--stages", default="3,4")
    p.add_argument(
        "--mask-rows",
        default="",
        help="aligned path: MASK_ROWS values to try (e.g. 0,1); default: the kernel's rule",
    )
    p.add_argument(
        "--aligned-down",
        default="",
        help="aligned path: the down launch's own tiles to try, BLOCK_N:warps:stages,... (each "
        'with every gate/up tile; `fused_moe`\'s config "down"); default: the gate/up tile',
    )
    p.add_argument("--path", default="aligned", choices=("aligned", "gemv", "both"))
    p.add_argument("--gemv-block-n", default="8,16,32")
    p.add_argument("--gemv-warps", default="2,4")
    p.add_argument("--gemv-stages", default="4,6")
    p.add_argument(
        "--gemv-down",
        default="",
        help="moe_gemv: the down launch's own tiles to try, BLOCK_N:warps:stages,... (each with "
        "every gate/up tile); default: the gate/up tile",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    for shape in args.shapes.split(","):
        h, i, e, k = SHAPES[shape]
        torch.manual_seed(0)
        w13, w2, q13, s13, q2, s2 = random_experts(e, h, i)
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
            for (weights, (a13, a2, kw, bpe)), path in itertools.product(
                {
                    "bf16": (w13, w2, {}, 2.0),
                    "fp8": (q13, q2, {"w13_scale": s13, "w2_scale": s2}, 1.0 + 4 / 128**2),
                }.items(),
                ("aligned", "gemv") if args.path == "both" else (args.path,),
            ):
                nbytes = experts * 3 * h * i * bpe
                if path == "aligned":
                    default = moe_config(t * k, e, weights == "fp8", h)
                    masks = {"MASK_ROWS": args.mask_rows} if args.mask_rows else {}
                    cfgs = [
                        cfg if down is None else {**cfg, "down": down}
                        for cfg in configs(
                            dict(BLOCK_K=128, num_warps=4),
                            BLOCK_M=args.block_m,
                            BLOCK_N=args.block_n,
                            num_stages=args.stages,
                            **masks,
                        )
                        for down in down_tiles(args.aligned_down, "--aligned-down")
                    ]
                    fn = functools.partial(fused_moe, x, a13, a2, **kw)
                else:  # gate and up as two tensors (views of w13), with their scales
                    default = moe_gemv_config()
                    cfgs = [
                        cfg if down is None else {**cfg, "down": down}
                        for cfg in configs(
                            {},
                            BLOCK_N=args.gemv_block_n,
                            num_warps=args.gemv_warps,
                            num_stages=args.gemv_stages,
                        )
                        for down in down_tiles(args.gemv_down)
                    ]
                    gemv_kw = {}
                    if kw:
                        sc13 = kw["w13_scale"]
                        gemv_kw = dict(w1_scale=sc13[:, : i // 128], w3_scale=sc13[:, i // 128 :])
                        gemv_kw["w2_scale"] = kw["w2_scale"]
                    fn = functools.partial(moe_gemv, x, a13[:, :i], a13[:, i:], a2, **gemv_kw)
                for cfg in cfgs:

                    def call(r, fn=fn, cfg=cfg, ids=ids, wts=wts):
                        fn(ids[r], wts, config=cfg)

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
                            "path": path,
                            **cfg,
                            "default": all(cfg[k2] == default[k2] for k2 in default)
                            and cfg.get("MASK_ROWS", 1) == 1
                            and "down" not in cfg,
                            "us": us,
                            "tb_per_s": None if us is None else nbytes / us / 1e6,
                            "experts_per_call": experts,
                            "error": err,
                        }
                    )
                    r = rows[-1]
                    print(
                        f"{shape:9} t={t:3} {weights:4} {path:7} {_tile(cfg)} "
                        f"{'*' if r['default'] else ' '} "
                        f"{us if us is None else round(us, 1)!s:>7} us "
                        f"{r['tb_per_s'] and round(r['tb_per_s'], 2)!s:>5} TB/s {err or ''}",
                        flush=True,
                    )
    best = {}
    for r in rows:
        if r["us"] is not None and (_key(r) not in best or r["us"] < best[_key(r)]["us"]):
            best[_key(r)] = r
    print("\nbest per shape and path (the default config's time):")
    for key, r in best.items():
        d = next((x for x in rows if x["default"] and _key(x) == key), None)
        print(
            f"{key:34} {_tile(r)} {r['us']:.1f} us {r['tb_per_s']:.2f} TB/s "
            f"(default {d and d['us']} us)"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"reps": REPS, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
