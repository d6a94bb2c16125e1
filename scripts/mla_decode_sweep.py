"""MLA decode (split kernel + merge) at short decode contexts, where a call is latency, not bytes:
each config's time per call and its error against the reference, so that `kernels/mla_decode.py`'s
head block, warps, stages and split count can be set from numbers at the engine bench's shapes
(prompt 128 + 32 decoded tokens: ~160 cached tokens, 3 pages of 64).

Timing: moe_decode_sweep's `time_call`, a CUDA graph of REPS (20) calls, each over its own cache
(as the layers of one decode step), replayed 5 times. Bytes: the cache rows read, q and the output.

    python scripts/mla_decode_sweep.py --out mla-decode-sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from moe_decode_sweep import REPS, time_call  # scripts/, on sys.path when run as a script

from moeray.kernels.bench.mla import _paged_cache
from moeray.kernels.mla_decode import mla_decode, mla_decode_ref

LAYERS = REPS  # one cache per call of the graph, as the layers of a decode step
PAGE, D, R = 64, 576, 512  # _paged_cache's page and row width; the latent rank
SCALE = 192**-0.5
CASES = (  # (heads, batch, context): Moonlight's 16 heads, DeepSeek-V3's 128
    (16, 1, 160),
    (16, 8, 160),
    (16, 1, 1024),
    (128, 1, 160),
    (128, 1, 1024),
)


def run_case(heads: int, batch: int, ctx: int) -> list[dict]:
    # Whole pages for ctx tokens (the lengths end inside the last one); one block table for every
    # layer's cache, as one step's sequences have.
    kv, table = _paged_cache(batch, -(-ctx // PAGE) * PAGE)
    caches = [kv, *(torch.randn_like(kv) for _ in range(LAYERS - 1))]
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, heads, D, device="cuda", dtype=torch.bfloat16)
    ref, _ = mla_decode_ref(q.unsqueeze(1), caches[0], table, lens, SCALE)
    nbytes = batch * ctx * D * 2 + q.numel() * 2 + batch * heads * R * 2
    if heads == 16:
        grid = itertools.product((16,), (2, 4, 8), (1, 2, 3), (1, 2, 3, 6))
    else:
        grid = itertools.product((16, 32, 64), (4, 8), (1, 2), (1, 2, 3, 6))
    rows = []
    for bh, nw, ns, sp in [(None, None, None, None), *grid]:  # the heuristic's choice first
        kw = dict(block_h=bh, num_warps=nw, num_stages=ns, num_splits=sp)
        row = {
            "heads": heads,
            "batch": batch,
            "context": ctx,
            **{k: v or "auto" for k, v in kw.items()},
        }
        try:
            out = mla_decode(q, caches[0], table, lens, SCALE, **kw)
            row["rel_err"] = round(((out.float() - ref[:, 0]).norm() / ref.norm()).item(), 6)
            us = time_call(lambda r, kw=kw: mla_decode(q, caches[r], table, lens, SCALE, **kw))
            row.update(us=round(us, 2), TBps=round(nbytes / us / 1e6, 3))
        except Exception as e:  # a config that does not compile (shared memory, registers)
            row["error"] = f"{type(e).__name__}: {str(e)[:100]}"
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="mla-decode-sweep.json")
    args = p.parse_args()
    result = {"device": torch.cuda.get_device_name(), "layers": LAYERS, "rows": []}
    for case in CASES:
        rows = run_case(*case)
        result["rows"] += rows
        timed = [r for r in rows if "us" in r and r["rel_err"] < 1e-2]
        auto = next(
            r
            for r in rows
            if all(r[k] == "auto" for k in ("block_h", "num_warps", "num_stages", "num_splits"))
        )
        best = sorted(timed, key=lambda r: r["us"])[:3]
        print(f"heads {case[0]} batch {case[1]} ctx {case[2]}: auto {auto.get('us')} us")
        for r in best:
            print(
                f"   {r['us']:7.2f} us  bh={r['block_h']} warps={r['num_warps']} "
                f"stages={r['num_stages']} splits={r['num_splits']}"
            )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
