"""How long does a CUDA graph replay take to start, by kernel nodes and with PDL? A probe for
issue 19's host time between decode steps: `moeray bench engine`'s host phases put "inputs and
launch" at 0.23-0.33 ms a batch-1 step on an H200 for graphs of 91-406 kernels, against 0.10 ms
on a 4-layer cut (benchmarks/notes-engine.md), and the engine's GPU idles through it.

Graphs of L dependent launches of a tiny Triton kernel (one program adding 1 to 256 floats), for
L in --nodes, captured plain and with programmatic dependent launch (each program waits first, as
`moeray.kernels.common.pdl_wait`). For each, from an idle GPU (a sync before every replay, as an
engine step starts after the previous step's read-back):
  host_us   the `graph.replay()` call itself (perf_counter, no sync): the CPU time of the launch
  wall_us   replay() plus a sync: launch, GPU execution and the completion's return to the host
  gpu_us    CUDA events around back-to-back replays: the GPU's own time per replay
so host_us against L says what a 406-kernel decode graph's launch costs, and wall_us - gpu_us how
much of it the GPU waits for. Checks each graph's result (L added to the input) before timing.

    python scripts/graph_launch_probe.py --out benchmarks/results     # one H200, ~10 s
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeray.results import device_slug, write_result

N = 256  # floats per launch: one program, the kernel's work is negligible


@triton.jit
def _add_one_kernel(x_ptr, y_ptr, PDL: tl.constexpr, BLOCK: tl.constexpr):
    if PDL:  # as moeray.kernels.common.pdl_wait: wait for the predecessor, release dependents
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) + 1.0)


def chain(bufs: list[torch.Tensor], pdl: bool) -> None:
    for i in range(len(bufs) - 1):
        _add_one_kernel[(1,)](
            bufs[i],
            bufs[i + 1],
            PDL=pdl,
            BLOCK=N,
            num_warps=1,
            **({"launch_pdl": True} if pdl else {}),
        )


def probe(nodes: int, pdl: bool, reps: int) -> dict:
    dev = torch.device("cuda", 0)
    bufs = [torch.zeros(N, device=dev)] + [torch.empty(N, device=dev) for _ in range(nodes)]
    chain(bufs, pdl)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(bufs, pdl)
    bufs[0].fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    if not torch.equal(bufs[-1], torch.full_like(bufs[-1], 1.0 + nodes)):
        raise RuntimeError(f"{nodes} nodes, pdl={pdl}: wrong result {bufs[-1][:4].tolist()}")
    host, wall = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e6)
        wall.append((t2 - t0) * 1e6)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    gpu = start.elapsed_time(end) * 1e3 / reps
    return {
        "nodes": nodes,
        "pdl": pdl,
        "host_us": statistics.median(host),
        "wall_us": statistics.median(wall),
        "gpu_us": gpu,
        "host_us_per_node": statistics.median(host) / nodes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", default="32,91,128,406,1024", help="kernels per graph")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", type=Path, default=None, help="directory for the result file")
    a = p.parse_args(argv)
    try:
        nodes = [int(v) for v in a.nodes.split(",")]
    except ValueError:
        p.error(f"--nodes {a.nodes!r}: expected comma-separated positive integers")
    if not nodes or min(nodes) < 1 or a.reps < 1:
        p.error(f"--nodes {a.nodes!r}, --reps {a.reps}: expected positive integers")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    pdl_ok = torch.cuda.get_device_capability()[0] >= 9
    rows = [probe(n, pdl, a.reps) for n in nodes for pdl in ((False, True) if pdl_ok else (False,))]
    print(
        f"{'nodes':>6} {'pdl':>5} {'host us':>9} {'wall us':>9} {'gpu us':>9} {'host us/node':>13}"
    )
    for r in rows:
        print(
            f"{r['nodes']:6d} {r['pdl']!s:>5} {r['host_us']:9.1f} {r['wall_us']:9.1f} "
            f"{r['gpu_us']:9.1f} {r['host_us_per_node']:13.3f}"
        )
    if a.out is not None:
        path = write_result(
            f"graph-launch-probe-{device_slug()}",
            {"floats_per_launch": N, "reps": a.reps, "rows": rows},
            directory=a.out,
            command="python scripts/graph_launch_probe.py " + " ".join(sys.argv[1:]),
        )
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
