"""Benchmark of gemv (weight-only bf16 GEMV for decode, moeray/kernels/gemv.py) against cuBLAS
F.linear at the Moonlight-16B-A3B and DeepSeek-V3 decode linear shapes, M = 1, 2, 4, 8, and a
tile sweep (BLOCK_N, BLOCK_K, num_warps, num_stages) that prints the best per shape and row count.

Each variant runs from a CUDA graph of back-to-back calls (the engine replays decode steps from
graphs, so host launch cost is not what a step pays), cycling over enough weight copies that
their bytes pass 256 MB (bench/common.py `_copies`), so every call reads its weight from HBM.
TB/s counts the weight, x and y bytes; `frac_hbm` is against the H200's 4.8 TB/s datasheet rate,
`frac_copy` against the device-to-device copy measured in the same run."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from moeray.kernels.bench.common import _copies, _cycling, _graph_ms, best_and_chosen
from moeray.kernels.gemv import MAX_BLOCK_K, bcast_config, gemv

HBM_TBPS = 4.8  # H200 datasheet
# (name, N, K) of the dense projections a decode step runs. Moonlight-16B-A3B: hidden 2048, 16
# heads x 192 (q_proj, no q LoRA), kv_a 512 + 64, shared experts 2 x 1408 (gate and up are two
# linears of 2816 rows each), vocab 163840. DeepSeek-V3: hidden 7168, q_lora 1536, 128 heads x 128
# values (o_proj K = 16384), one shared expert of 2048.
DECODE_LINEARS = (
    ("moonlight q_proj", 3072, 2048),
    ("moonlight kv_a", 576, 2048),
    ("moonlight o_proj", 2048, 2048),
    ("moonlight shared_gate", 2816, 2048),
    ("moonlight shared_down", 2048, 2816),
    ("moonlight lm_head", 163840, 2048),
    ("v3 q_a", 1536, 7168),
    ("v3 kv_a", 576, 7168),
    ("v3 o_proj", 7168, 16384),
    ("v3 shared_gate", 2048, 7168),
    ("v3 shared_down", 7168, 2048),
)
DECODE_ROWS = (1, 2, 4, 8)
# The sweep's shapes (the lm_head and V3 kv_a behave like their neighbours) and rows.
SWEEP_LAYERS = ("moonlight q_proj", "moonlight kv_a", "moonlight o_proj", "v3 o_proj")
SWEEP_ROWS = (1, 4)


def _tbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e9


def _try_graph_us(fn) -> float | str:
    try:
        return round(_graph_ms(fn) * 1e3, 2)
    except Exception as e:  # a tile that does not compile (registers, shared memory)
        return f"{type(e).__name__}: {str(e)[:100]}"


def bench_gemv(ceil: dict) -> list[dict]:
    """gemv vs F.linear (cuBLAS), bf16, per decode shape and row count."""
    rows = []
    for name, n, k in DECODE_LINEARS:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        copies = [(w,)] + [(w.clone(),) for _ in range(_copies(2 * n * k) - 1)]
        for m in DECODE_ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_gemv = _graph_ms(_cycling(lambda w, x=x: gemv(x, w), copies))
            t_cublas = _graph_ms(_cycling(lambda w, x=x: F.linear(x, w), copies))
            y, ref = gemv(x, w).float(), F.linear(x.float(), w.float())
            nbytes = 2 * n * k + 2 * m * (n + k)
            rows.append(
                {
                    "kernel": "gemv",
                    "layer": name,
                    "M": m,
                    "N": n,
                    "K": k,
                    "gemv_us": round(t_gemv * 1e3, 2),
                    "gemv_TBps": round(_tbps(nbytes, t_gemv), 3),
                    "gemv_frac_hbm": round(_tbps(nbytes, t_gemv) / HBM_TBPS, 3),
                    "gemv_frac_copy": round(_tbps(nbytes, t_gemv) / ceil["copy_TBps"], 3),
                    "cublas_us": round(t_cublas * 1e3, 2),
                    "cublas_TBps": round(_tbps(nbytes, t_cublas), 3),
                    "speedup_vs_cublas": round(t_cublas / t_gemv, 3),
                    "config": bcast_config(m, n, k, x.device),
                    "rel_err_vs_fp32": round(((y - ref).norm() / ref.norm()).item(), 6),
                }
            )
        del w, copies
        torch.cuda.empty_cache()
    return rows


def print_gemv(rows: list[dict]) -> None:
    print(
        f"\n{'gemv layer':22s} {'M':>2s} {'N':>6s} {'K':>5s} | {'gemv us':>7s} {'TB/s':>5s} "
        f"{'of 4.8':>6s} | {'cuBLAS us':>9s} {'TB/s':>5s} | {'x':>5s} | BN BK split"
    )
    for r in rows:
        c = r["config"]
        print(
            f"{r['layer']:22s} {r['M']:2d} {r['N']:6d} {r['K']:5d} | {r['gemv_us']:7.2f} "
            f"{r['gemv_TBps']:5.2f} {r['gemv_frac_hbm']:6.2f} | {r['cublas_us']:9.2f} "
            f"{r['cublas_TBps']:5.2f} | {r['speedup_vs_cublas']:5.2f} | {c['BLOCK_N']} "
            f"{c['BLOCK_K']} {c['SPLIT_K']}"
        )


def sweep_candidates(base: dict, m: int, n: int, sms: int) -> list[dict]:
    """Tiles around the heuristic's `base`, most telling first: the base; BLOCK_N halved and
    doubled (BLOCK_K at the accumulator budget); (num_warps, num_stages) of (4, 2), (8, 3), (4, 4);
    BLOCK_K halved and doubled; split-K by the heuristic's rule for each BLOCK_N; then 1- and
    2-warp tiles at split-K 2 and 4 (fp8_gemv's fastest batch-1 tiles on an H200 had 1 warp and
    split K: benchmarks/results/kernels-nvidia-h200-fp8-gemv-splits.json)."""
    bm, bn0, bk0 = base["BLOCK_M"], base["BLOCK_N"], base["BLOCK_K"]
    tries: list[tuple[int, int, int, int, int | None]] = [
        (bn0, bk0, base["num_warps"], base["num_stages"], None)
    ]
    for bn in (bn0 // 2, bn0 * 2):
        tries.append((bn, min(MAX_BLOCK_K * 2, 8192 // (bm * max(bn, 1))), 4, 3, None))
    tries += [(bn0, bk0, 4, 2, None), (bn0, bk0, 8, 3, None), (bn0, bk0, 4, 4, None)]
    tries += [(bn0, bk0 // 2, 4, 3, None), (bn0, bk0 * 2, 4, 3, None), (bn0, bk0 * 2, 8, 3, None)]
    for warps in (1, 2):
        bk = 4096 * warps // (bm * bn0)
        tries += [(bn0, bk, warps, 4, sp) for sp in (2, 4)]
    out: list[dict] = []
    for bn, bk, warps, stages, forced_split in tries:
        if not 1 <= bn <= 64 or not 64 <= bk <= 4096 or bm * bn * bk > 128 * 32 * warps:
            continue
        tiles = -(-m // bm) * -(-n // bn)
        split = 1 if tiles >= sms else max(1, -(-4 * sms // tiles))
        if forced_split is not None:
            split = forced_split
        cfg = {**base, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}
        cfg.update(num_warps=warps, num_stages=stages)
        if cfg not in out:
            out.append(cfg)
    return out


def run_sweep(kernel: str, make_weight, call, config_fn, budget_s: float) -> list:
    """Time `sweep_candidates` per sweep layer and row count (CUDA graph, cold weights); each
    (layer, M) gets an equal share of budget_s and times the heuristic's config first."""
    out: list[dict] = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    layers = [lay for lay in DECODE_LINEARS if lay[0] in SWEEP_LAYERS]
    share = budget_s / (len(layers) * len(SWEEP_ROWS))
    for name, n, k in layers:
        weights = make_weight(n, k)
        for m in SWEEP_ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = config_fn(m, n, k, x.device)
            t0 = time.perf_counter()
            for cfg in sweep_candidates(base, m, n, sms):
                if time.perf_counter() - t0 > share and cfg != base:
                    print(f"sweep {kernel} {name} M={m}: {share:.1f} s share used", flush=True)
                    break
                us = _try_graph_us(_cycling(lambda *w, x=x, cfg=cfg: call(x, *w, cfg), weights))
                row = {"kernel": kernel, "layer": name, "M": m, "N": n, "K": k, **cfg}
                out.append({**row, "us": us, "chosen": cfg == base})
        del weights
        torch.cuda.empty_cache()
    return out


def sweep_gemv(budget_s: float = 50.0) -> list[dict]:
    """gemv's tile sweep at the sweep layers, M = 1 and 4; `bcast_config` is tuned from here."""

    def weights(n, k):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        return [(w,)] + [(w.clone(),) for _ in range(_copies(2 * n * k) - 1)]

    return run_sweep(
        "gemv", weights, lambda x, w, cfg: gemv(x, w, config=cfg), bcast_config, budget_s
    )


def print_sweep(rows: list[dict]) -> None:
    """Per (kernel, layer, M): the fastest tile and what the heuristic's took."""
    best, chosen = best_and_chosen(rows, lambda r: (r["kernel"], r["layer"], r["M"]))
    for g, r in best.items():
        c = chosen.get(g)
        print(
            f"sweep {g[0]:8s} {g[1]:22s} M={g[2]}: best BLOCK_N={r['BLOCK_N']} "
            f"BLOCK_K={r['BLOCK_K']} warps={r['num_warps']} stages={r['num_stages']} "
            f"split={r['SPLIT_K']} {r['us']} us; heuristic "
            + (
                f"BLOCK_N={c['BLOCK_N']} BLOCK_K={c['BLOCK_K']} {c['us']} us"
                if c
                else "n/a (did not compile)"
            )
        )
