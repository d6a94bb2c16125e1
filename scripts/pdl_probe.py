"""Do programmatic dependent launch (PDL, sm_90) or one persistent kernel shorten a chain of decode
GEMVs? A probe for issue 19's batch-1 decode, where a Moonlight step is ~380 kernels of 2-20 us
each and every kernel boundary costs a drain and a ramp.

A chain of L dependent bf16 GEMVs x_{i+1} = W_i x_i (W_i distinct, [N, N], together far larger
than L2), timed as CUDA-graph replays:
  plain       one launch per GEMV, one program per BLOCK_N rows over the full K (no PDL)
  pdl         launch_pdl=True; each program waits for its predecessor (gdc_wait) before any load
              and lets its dependents launch at once (gdc_launch_dependents)
  prefetch    pdl, and each program loads its weight tile BEFORE the wait: the weights do not
              depend on the previous kernel, so their read overlaps the predecessor's tail
  persistent  the whole chain in ONE launch of at most one program per SM (a cooperative launch,
              so all are resident): program p owns tiles p, p + P, ... of every layer, loads a
              task's weights, then waits on a per-layer counter in global memory (acquire) until
              the previous layer's tiles are all stored (each counted in with a release atomic).
              No kernel boundary: the weight stream of layer l + 1 runs while layer l drains.
              `_pf` rows also load the next task's weights before the current compute (two tiles
              in registers); `_ld` rows poll the counter with volatile loads, not atomics.
              The question for a decode megakernel: how far below `prefetch` does a GEMV of the
              chain get? On an H200 it does not: every persistent row is slower than `plain`
              (benchmarks/notes-engine.md, results/pdl-probe-nvidia-h200*.json).
Checks every variant's output against the plain chain's, then prints us per GEMV and TB/s of
weight bytes.

    python scripts/pdl_probe.py                 # one H200, ~30 s
    python scripts/pdl_probe.py --n 1024        # 2 MB GEMVs, where the boundaries weigh more
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

HBM_TBPS = 4.8  # H200 datasheet
DEVICE = "cuda"  # the CPU test runs main under Triton's interpreter


# The persistent chain's protocol: a task waits (`wait_count`) until the layer it reads has counted
# every tile in, reads, computes, stores, and counts itself in (`count_in`: a barrier, then one
# release atomic). A task waits only on earlier layers, which every program reaches before its own
# later tasks, so a launch whose programs are all resident cannot deadlock.


@triton.jit
def _poll(cnt_ptr, SPIN_LOAD: tl.constexpr):
    """One read of the counter: a volatile load, or the acquire atomic."""
    if SPIN_LOAD:
        return tl.load(cnt_ptr, volatile=True)
    return tl.atomic_add(cnt_ptr, 0, sem="acquire")


@triton.jit
def wait_count(cnt_ptr, target, given_up_ptr, MAX_POLLS: tl.constexpr, SPIN_LOAD: tl.constexpr):
    """Spin until the int32 counter at cnt_ptr reaches `target`, at most MAX_POLLS polls, then
    one acquire read-modify-write (what the programs that counted in stored before their release
    is visible after it); a wait that gives up adds 1 at given_up_ptr and returns (the caller
    checks it) rather than hang. SPIN_LOAD: poll with volatile loads, else with the acquire atomic
    itself (the faster of the two on an H200, by 0.1-0.6 us a layer). For persistent kernels whose
    programs are all resident (a cooperative launch)."""
    seen = _poll(cnt_ptr, SPIN_LOAD)
    polls = 0
    while (seen < target) & (polls < MAX_POLLS):
        seen = _poll(cnt_ptr, SPIN_LOAD)
        polls += 1
    if SPIN_LOAD:
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
    if seen < target:
        tl.atomic_add(given_up_ptr, 1)


@triton.jit
def finish(cnt_ptr, n):
    """The launch's end for this program: count it in on counter n; the last program (it has seen
    every program count in, so every wait of the launch is over) zeroes counters 0 .. n for the
    next launch (the caller's counters past n, e.g. the given-up waits, are left)."""
    if tl.atomic_add(cnt_ptr + n, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        for j in range(n + 1):
            tl.atomic_xchg(cnt_ptr + j, 0)


@triton.jit
def count_in(cnt_ptr):
    """Add 1 to the counter at cnt_ptr once every thread of the program has issued its stores
    (the barrier orders them before the one release atomic): `wait_count`'s other half."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release")


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


@triton.jit
def _persistent_chain_kernel(
    x_ptr,  # [L + 1, N]: x_0 given; the kernel writes x_1 .. x_L
    w_ptr,  # [L, N, N] contiguous
    done_ptr,  # int32 [L + 2], zero: tiles stored per layer, finished programs, waits given up
    L,
    N: tl.constexpr,  # constexpr: at N = NP the column mask folds away and loads vectorize
    NP: tl.constexpr,  # N rounded up to a power of two (the row's columns in one block)
    BLOCK_N: tl.constexpr,
    TILES: tl.constexpr,  # cdiv(N, BLOCK_N): the tiles of one layer
    PREFETCH: tl.constexpr,  # load the next task's weights before this task's wait and compute
    MAX_POLLS: tl.constexpr,  # polls of a counter before a wait gives up (seconds: a broken run)
    SPIN_LOAD: tl.constexpr,  # poll with volatile loads (else with the acquire atomic)
):
    # Program p owns tiles p, p + P, ... of every layer; its tasks run layer by layer. A task's
    # weights never depend on the chain, so they are read before the task waits for its input
    # (layer l - 1's tiles all stored); with PREFETCH the next task's are read before this one's
    # compute too (two tiles in registers), so the weight stream need not stop at a layer's end.
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    per_layer = tl.cdiv(TILES - pid, P)  # >= 1: the wrapper launches at most TILES programs
    n_tasks = per_layer * L
    offs = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, NP)
    k_ok = offs_k < N
    rows = pid * BLOCK_N + offs
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * N + offs_k[None, :],
                mask=(rows[:, None] < N) & k_ok[None, :], other=0.0)  # fmt: skip
    for i in range(n_tasks):
        layer = i // per_layer
        rows = (pid + (i % per_layer) * P) * BLOCK_N + offs
        nxt = tl.minimum(i + 1, n_tasks - 1)  # the last task reloads its own tile (unused)
        nrows = (pid + (nxt % per_layer) * P) * BLOCK_N + offs
        n_ptrs = w_ptr + (nxt // per_layer).to(tl.int64) * N * N + nrows[:, None].to(tl.int64) * N
        n_mask = (nrows[:, None] < N) & k_ok[None, :]
        if PREFETCH:
            w_next = tl.load(n_ptrs + offs_k[None, :], mask=n_mask, other=0.0)
        if layer > 0:  # a wait that times out is counted in done[L + 1], not hung
            wait_count(done_ptr + layer - 1, TILES, done_ptr + L + 1, MAX_POLLS, SPIN_LOAD)
        # .cg: x was stored by other SMs; read it from L2, never from this SM's L1
        x = tl.load(x_ptr + layer * N + offs_k, mask=k_ok, other=0.0, cache_modifier=".cg")
        y = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(x_ptr + (layer + 1) * N + rows, y.to(x_ptr.dtype.element_ty), mask=rows < N)
        count_in(done_ptr + layer)
        if PREFETCH:
            w = w_next
        else:
            w = tl.load(n_ptrs + offs_k[None, :], mask=n_mask, other=0.0)
    # The last program to finish has seen every count: it zeroes them for the next launch (not
    # the given-up waits: the caller reads and clears those).
    finish(done_ptr, L)


# Persistent variants: (BLOCK_N, num_warps, PREFETCH, SPIN_LOAD). At N = 2048, BLOCK_N = 16 is
# 128 tiles a layer (one per program on 132 SMs, 64 KB of weights each); 8 and 4 give programs 2
# and 4 tiles.
# A counter polled this often (~0.5-1 us a poll on an H200's L2: seconds) means a broken run.
MAX_POLLS = 1 << 22
PERSISTENT_TILES = (
    (16, 8, False, False),
    (16, 8, True, False),
    (16, 16, True, False),
    (8, 4, True, False),
    (16, 8, False, True),
    (16, 8, True, True),
    (8, 4, True, True),
    (4, 4, True, True),
)


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


def persistent_programs(n: int, block_n: int, device: torch.device) -> int:
    """Programs of the persistent chain: one per SM at most (each waits on the others, so all must
    be resident), and no more than a layer's tiles. One under Triton's interpreter, which runs
    programs one after another: a program waiting on a later one would spin forever."""
    tiles = triton.cdiv(n, block_n)
    if device.type != "cuda":
        return 1
    return min(tiles, torch.cuda.get_device_properties(device).multi_processor_count)


def persistent_chain(
    x_LN: torch.Tensor,
    w_LNN: torch.Tensor,
    done: torch.Tensor,
    block_n: int,
    warps: int,
    prefetch: bool,
    spin_load: bool = False,
    programs: int | None = None,
    coop: bool = True,
) -> None:
    """x_LN[l + 1] = w_LNN[l] @ x_LN[l] for every l, in one launch. x_LN [L + 1, N] and w_LNN
    [L, N, N] contiguous, one dtype; done an int32 [L + 2] of zeros: the kernel leaves the first
    L + 1 zero and counts in the last the waits it gave up after MAX_POLLS polls (a broken run
    ends with wrong numbers instead of hanging; the caller checks it). `coop`: a
    cooperative launch on CUDA (the driver refuses a grid that cannot be resident at once);
    without it residency rests on one program per SM fitting, as it does here."""
    L, n = w_LNN.shape[0], w_LNN.shape[1]
    if x_LN.shape != (L + 1, n) or w_LNN.shape != (L, n, n) or done.shape != (L + 2,):
        raise ValueError(
            f"x {tuple(x_LN.shape)}, w {tuple(w_LNN.shape)}, done {tuple(done.shape)}: "
            f"expected [L + 1, N], [L, N, N], [L + 2] with L={L}, N={n}"
        )
    if not (x_LN.is_contiguous() and w_LNN.is_contiguous()):
        raise ValueError("x and w must be contiguous")
    tiles = triton.cdiv(n, block_n)
    p = programs or persistent_programs(n, block_n, x_LN.device)
    if not 1 <= p <= tiles:
        raise ValueError(f"programs={p}: must be 1..{tiles} (a layer's tiles)")
    coop_kw = {"launch_cooperative_grid": True} if coop and x_LN.is_cuda else {}
    _persistent_chain_kernel[(p,)](
        x_LN,
        w_LNN,
        done,
        L,
        N=n,
        NP=triton.next_power_of_2(n),
        BLOCK_N=block_n,
        TILES=tiles,
        PREFETCH=prefetch,
        MAX_POLLS=MAX_POLLS,
        SPIN_LOAD=spin_load,
        num_warps=warps,
        **coop_kw,
    )


def _timed(run, replays: int) -> float:
    """Capture `run` in a CUDA graph, replay it once, then `replays` times: ms a replay."""
    run()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2048, help="N = K (Moonlight hidden size)")
    p.add_argument("--layers", type=int, default=108, help="GEMVs in the chain")
    p.add_argument("--block-n", type=int, default=4)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    dev = torch.device(DEVICE)
    g = torch.Generator(device=dev).manual_seed(0)
    w_LNN = torch.randn(a.layers, a.n, a.n, device=dev, generator=g, dtype=torch.bfloat16)
    w_LNN *= a.n**-0.5
    ws = list(w_LNN.unbind(0))
    x0 = torch.randn(a.n, device=dev, generator=g, dtype=torch.bfloat16)
    floor_us = a.n * a.n * 2 / HBM_TBPS / 1e6
    variants = [
        (name, lambda xs, mode=mode: chain(list(xs.unbind(0)), ws, mode, a.block_n, a.warps))
        for name, mode in (("plain", 0), ("pdl", 1), ("prefetch", 2))
    ]
    done = torch.zeros(a.layers + 2, dtype=torch.int32, device=dev)
    for bn, warps, pf, spin in PERSISTENT_TILES:
        for coop in (True, False):  # the second only if the first fails (below)
            name = (
                f"persistent_b{bn}_w{warps}"
                + ("_pf" if pf else "")
                + ("_ld" if spin else "")
                + ("" if coop else "_nc")
            )
            variants.append(
                (
                    name,
                    lambda xs, bn=bn, w=warps, pf=pf, sp=spin, c=coop: persistent_chain(
                        xs, w_LNN, done, bn, w, pf, sp, coop=c
                    ),
                )
            )
    rows, want = {}, None
    for name, run in variants:
        if name.endswith("_nc") and "error" not in rows.get(name[: -len("_nc")], {}):
            continue  # the cooperative launch worked: no need for the plain one
        xs = torch.empty(a.layers + 1, a.n, device=dev, dtype=torch.bfloat16)
        xs[0] = x0
        try:
            ms = _timed(lambda run=run, xs=xs: run(xs), a.replays)
        except Exception as e:  # a probe: report what this Triton or driver refuses
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{name:22s} failed: {rows[name]['error']}")
            continue
        out = xs[-1].float()
        if want is None:
            want = out
        err = float((out - want).abs().max() / want.abs().max())
        us = ms * 1e3 / a.layers
        tbps = a.n * a.n * 2 / (us * 1e-6) / 1e12
        rows[name] = {
            "us_per_gemv": us,
            "weight_TBps": tbps,
            "frac_hbm": tbps / HBM_TBPS,
            "max_rel_err_vs_plain": err,
            "counters_zero": bool((done[:-1] == 0).all()),
            "waits_given_up": int(done[-1]),
        }
        done.zero_()
        print(f"{name:22s} {us:7.2f} us/GEMV  err vs plain {err:.1e}", flush=True)
    if a.out is not None:
        write_result(
            f"pdl-probe-{device_slug()}" + ("" if a.n == 2048 else f"-n{a.n}"),
            {
                "n": a.n,
                "layers": a.layers,
                "block_n": a.block_n,
                "warps": a.warps,
                "floor_us_per_gemv": floor_us,
                "persistent_tiles": PERSISTENT_TILES,
                "rows": rows,
            },
            directory=a.out,
            command="python scripts/pdl_probe.py " + " ".join(sys.argv[1:]),
        )
    print(json.dumps(rows))
    print(f"\nN={a.n}, {a.layers} GEMVs, floor {floor_us:.2f} us each at {HBM_TBPS} TB/s")
    print(f"{'variant':22s} {'us/GEMV':>8s} {'TB/s':>6s} {'of HBM':>7s} {'err':>8s}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:22s} failed")
            continue
        print(
            f"{name:22s} {r['us_per_gemv']:8.2f} {r['weight_TBps']:6.2f} "
            f"{r['frac_hbm']:7.1%} {r['max_rel_err_vs_plain']:8.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
