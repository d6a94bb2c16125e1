"""Does programmatic dependent launch (PDL, sm_90) shorten a chain of decode GEMVs? A probe for
issue 19's batch-1 decode, where a Moonlight step is ~500 kernels of 2-20 us each and every
kernel boundary costs a drain and a ramp.

A chain of L dependent bf16 GEMVs x_{i+1} = W_i x_i (W_i distinct, [N, N], together far larger
than L2), one program per BLOCK_N rows over the full K, timed as CUDA-graph replays:
  plain     launched as today (no PDL)
  pdl       launch_pdl=True; each program waits for its predecessor (gdc_wait) before any load
            and lets its dependents launch at once (gdc_launch_dependents)
  prefetch  pdl, and each program loads its weight tile BEFORE the wait: the weights do not
            depend on the previous kernel, so their read overlaps the predecessor's tail
Checks every variant's output against the plain chain's, then prints us per GEMV and TB/s of
weight bytes.

    python scripts/pdl_probe.py            # one H200, ~20 s
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeray.results import device_slug, write_result


@triton.jit
def _chain_gemv_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    N,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MODE: tl.constexpr,  # 0 plain, 1 pdl, 2 pdl + weight prefetch before the wait
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    if MODE == 2:
        w = tl.load(w_ptrs)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    elif MODE == 1:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs)
    x = tl.load(x_ptr + offs_k)
    y = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


def chain(xs, ws, mode: int, block_n: int, warps: int) -> None:
    n = ws[0].shape[0]
    for i, w in enumerate(ws):
        _chain_gemv_kernel[(triton.cdiv(n, block_n),)](
            xs[i],
            w,
            xs[i + 1],
            n,
            K=n,
            BLOCK_N=block_n,
            MODE=mode,
            num_warps=warps,
            **({"launch_pdl": True} if mode else {}),
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2048, help="N = K (Moonlight hidden size)")
    p.add_argument("--layers", type=int, default=108, help="GEMVs in the chain")
    p.add_argument("--block-n", type=int, default=4)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    dev = torch.device("cuda", 0)
    g = torch.Generator(device=dev).manual_seed(0)
    ws = [
        torch.randn(a.n, a.n, device=dev, generator=g, dtype=torch.bfloat16) * a.n**-0.5
        for _ in range(a.layers)
    ]
    x0 = torch.randn(a.n, device=dev, generator=g, dtype=torch.bfloat16)
    rows, want = {}, None
    for name, mode in (("plain", 0), ("pdl", 1), ("prefetch", 2)):
        xs = [x0.clone()] + [torch.empty_like(x0) for _ in ws]
        try:
            chain(xs, ws, mode, a.block_n, a.warps)  # compile
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                chain(xs, ws, mode, a.block_n, a.warps)
            graph.replay()
            torch.cuda.synchronize()
        except Exception as e:  # a probe: report what this Triton or driver refuses
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{name:9s} failed: {rows[name]['error']}")
            continue
        out = xs[-1].float()
        if want is None:
            want = out
        err = float((out - want).abs().max() / want.abs().max())
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(a.replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1e3 / a.replays / a.layers
        tbps = a.n * a.n * 2 / (us * 1e-6) / 1e12
        rows[name] = {"us_per_gemv": us, "weight_TBps": tbps, "max_rel_err_vs_plain": err}
        print(f"{name:9s} {us:7.2f} us/GEMV  {tbps:5.2f} TB/s  err vs plain {err:.1e}")
    if a.out is not None:
        write_result(
            f"pdl-probe-{device_slug()}",
            {"n": a.n, "layers": a.layers, "block_n": a.block_n, "warps": a.warps, "rows": rows},
            directory=a.out,
            command="python scripts/pdl_probe.py " + " ".join(sys.argv[1:]),
        )
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
