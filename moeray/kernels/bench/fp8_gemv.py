"""Benchmark of fp8_gemv (weight-only FP8 GEMM for decode) at DeepSeek-V3 linear shapes, against
the act_quant + fp8_gemm path FP8Linear takes for larger M and bf16 F.linear (cuBLAS). fp8_gemv
runs with a workspace, as FP8Linear calls it (split-K in one launch); `gemv_two_launch_us` times
it without one (split-K partials summed by a second launch). The `act_*` columns time fp8_gemv on
e4m3 x (fp8 x fp8 dots): `act_us` act_quant + the kernel as FP8Linear runs them with
MOERAY_FUSED_FP8_GEMV_ACT=1, `act_kernel_us` the kernel alone on x quantized beforehand.

Each variant runs from a CUDA graph of back-to-back calls (the engine replays decode steps from
graphs, so host launch cost is not what a step pays), cycling over enough weight copies that
their bytes pass 256 MB: a decode step reads 61 layers' weights between two calls of one layer,
so the weight is never in the 50 MB L2 when its layer runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeray.kernels.bench.common import _copies, _cycling, _graph_ms, best_and_chosen
from moeray.kernels.common import cdiv
from moeray.kernels.fp8.dispatch import fp8_gemm
from moeray.kernels.fp8.gemv import _gemv_config, fp8_gemv, fp8_gemv_workspace
from moeray.kernels.fp8.quant import act_quant, weight_dequant, weight_quant
from moeray.kernels.gemv import linear as gemv_linear

# (name, N, K) of DeepSeek-V3's linear layers (hidden 7168, q_lora 1536, kv_lora 512 + rope 64,
# 128 heads x 192 / 128 dims, dense intermediate 18432, expert intermediate 2048).
V3_LINEARS = (
    ("q_a", 1536, 7168),
    ("q_b", 24576, 1536),
    ("kv_a", 576, 7168),
    ("o_proj", 7168, 16384),
    ("dense_gate_up", 18432, 7168),
    ("dense_down", 7168, 18432),
    ("shared_gate_up", 2048, 7168),
    ("shared_down", 7168, 2048),
)
GEMV_BENCH_ROWS = (1, 8, 64)
# Moonlight-16B-A3B's decode projections as the engine runs them (hidden 2048, 16 heads x 192 /
# 128 dims, no q_lora, kv_a 576, dense intermediate 11264; q + kv_a and gate + up merged,
# model/merge.py): K = 2048 is 16 scale blocks, so split-K has little to split and each program
# little to stream.
MOONLIGHT_LINEARS = (
    ("ml_q_kv_a", 3648, 2048),
    ("ml_o_proj", 2048, 2048),
    ("ml_dense_gate_up", 22528, 2048),
    ("ml_dense_down", 2048, 11264),
)


def _row(ceil: dict, name: str, m: int, n: int, k: int, copies_fp8, copies_bf16) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ws = fp8_gemv_workspace(n, m, x.device)
    t_gemv = _graph_ms(_cycling(lambda w, s: fp8_gemv(x, w, s, workspace=ws), copies_fp8))
    t_two = _graph_ms(_cycling(lambda w, s: fp8_gemv(x, w, s), copies_fp8))

    def quant_gemm(w, s):
        xq, xs = act_quant(x, scale_col_major=True)
        return fp8_gemm(xq, xs, w, s)

    t_gemm = _graph_ms(_cycling(quant_gemm, copies_fp8))

    def quant_gemv(w, s):
        xq, xs = act_quant(x)
        return fp8_gemv(xq, w, s, x_scale=xs, workspace=ws)

    t_act = _graph_ms(_cycling(quant_gemv, copies_fp8))
    xq, xs = act_quant(x)
    t_act_kernel = _graph_ms(
        _cycling(lambda w, s: fp8_gemv(xq, w, s, x_scale=xs, workspace=ws), copies_fp8)
    )
    t_bf16 = _graph_ms(_cycling(lambda w: F.linear(x, w), copies_bf16))
    w, s = copies_fp8[0]
    y = fp8_gemv(x, w, s).float()
    y_act = fp8_gemv(xq, w, s, x_scale=xs).float()
    ref = F.linear(x.float(), copies_bf16[0][0].float())
    fp8_bytes = n * k + cdiv(n, 128) * cdiv(k, 128) * 4 + m * (k + n) * 2
    bf16_bytes = 2 * n * k + m * (k + n) * 2
    copy_bw = ceil["copy_TBps"] * 1e3  # GB/s
    gbs = fp8_bytes / t_gemv / 1e6
    # The kernel alone reads e4m3 x and its scales, not bf16 x.
    act_bytes = n * k + cdiv(n, 128) * cdiv(k, 128) * 4 + m * (k + 4 * cdiv(k, 128) + 2 * n)
    act_gbs = act_bytes / t_act_kernel / 1e6
    return {
        "kernel": "fp8_gemv",
        "layer": name,
        "M": m,
        "N": n,
        "K": k,
        "gemv_us": round(t_gemv * 1e3, 2),
        "gemv_GBps": round(gbs, 1),
        "gemv_frac_copy_bw": round(gbs / copy_bw, 3),
        "gemv_two_launch_us": round(t_two * 1e3, 2),
        "quant_gemm_us": round(t_gemm * 1e3, 2),
        "quant_gemm_GBps": round(fp8_bytes / t_gemm / 1e6, 1),
        "bf16_linear_us": round(t_bf16 * 1e3, 2),
        "bf16_linear_GBps": round(bf16_bytes / t_bf16 / 1e6, 1),
        "bf16_frac_copy_bw": round(bf16_bytes / t_bf16 / 1e6 / copy_bw, 3),
        "speedup_vs_quant_gemm": round(t_gemm / t_gemv, 3),
        "speedup_vs_bf16": round(t_bf16 / t_gemv, 3),
        "config": _gemv_config(m, n, k, x.device),
        "rel_err_vs_bf16_dequant": round(((y - ref).norm() / ref.norm()).item(), 5),
        "act_us": round(t_act * 1e3, 2),
        "act_kernel_us": round(t_act_kernel * 1e3, 2),
        "act_kernel_GBps": round(act_gbs, 1),
        "act_kernel_frac_copy_bw": round(act_gbs / copy_bw, 3),
        "act_speedup_vs_gemv": round(t_gemv / t_act, 3),
        "act_speedup_vs_bf16": round(t_bf16 / t_act, 3),
        "act_config": _gemv_config(m, n, k, x.device, act_fp8=True),
        "act_rel_err_vs_bf16_dequant": round(((y_act - ref).norm() / ref.norm()).item(), 5),
    }


def bench_fp8_gemv(ceil: dict) -> list[dict]:
    rows = []
    for name, n, k in V3_LINEARS:
        q, s = weight_quant(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        w = weight_dequant(q, s)
        fp8 = [(q, s)] + [(q.clone(), s.clone()) for _ in range(_copies(n * k) - 1)]
        bf16 = [(w,)] + [(w.clone(),) for _ in range(_copies(2 * n * k) - 1)]
        for m in GEMV_BENCH_ROWS:
            rows.append(_row(ceil, name, m, n, k, fp8, bf16))
        del fp8, bf16
        torch.cuda.empty_cache()
    return rows


def print_fp8_gemv(rows: list[dict]) -> None:
    print(
        f"\n{'fp8_gemv layer':16s} {'M':>3s} {'N':>6s} {'K':>6s} | {'gemv us':>8s} {'GB/s':>6s} "
        f"{'of copy':>7s} | {'quant+gemm us':>13s} {'x':>5s} | {'bf16 us':>8s} {'of copy':>7s} "
        f"{'x':>5s} | {'act us':>7s} {'kernel':>7s} {'of copy':>7s} {'x gemv':>6s} "
        f"{'x bf16':>6s} | err, act err"
    )
    for r in rows:
        print(
            f"{r['layer']:16s} {r['M']:3d} {r['N']:6d} {r['K']:6d} | {r['gemv_us']:8.2f} "
            f"{r['gemv_GBps']:6.0f} {r['gemv_frac_copy_bw']:7.2f} | {r['quant_gemm_us']:13.2f} "
            f"{r['speedup_vs_quant_gemm']:5.2f} | {r['bf16_linear_us']:8.2f} "
            f"{r['bf16_frac_copy_bw']:7.2f} {r['speedup_vs_bf16']:5.2f} | {r['act_us']:7.2f} "
            f"{r['act_kernel_us']:7.2f} {r['act_kernel_frac_copy_bw']:7.2f} "
            f"{r['act_speedup_vs_gemv']:6.2f} {r['act_speedup_vs_bf16']:6.2f} | "
            f"{r['rel_err_vs_bf16_dequant']}, {r['act_rel_err_vs_bf16_dequant']}"
        )


# Candidate tiles for the sweep: (BLOCK_N, num_warps, num_stages) per inner product (float x:
# DOT False / True; "act": e4m3 x); BLOCK_M and SPLIT_K follow the heuristic's rule for the shape.
_SWEEP_TILES = {
    False: ((8, 4, 4), (16, 4, 4), (32, 4, 4), (64, 8, 4), (64, 4, 4), (32, 8, 6), (16, 2, 6)),
    True: ((32, 4, 4), (64, 4, 4), (128, 8, 3), (64, 8, 6)),
    "act": ((32, 4, 4), (64, 4, 4), (64, 4, 6), (128, 4, 4), (128, 8, 4)),
}
_SWEEP_LAYERS = ("q_a", "kv_a", "dense_down", "q_b")


def _same_programs_split(base: dict, n: int, k: int, tiles: int) -> int:
    """The split-K count that gives a candidate tile of `tiles` output tiles about as many
    programs as the heuristic's `base` config has (at most one split a K block)."""
    return max(1, min(cdiv(k, 128), cdiv(base["SPLIT_K"] * cdiv(n, base["BLOCK_N"]), tiles)))


def _time_config(
    x: torch.Tensor, x_scale: torch.Tensor | None, cfg: dict, copies: list, tiles: int
) -> float | str:
    ws = torch.zeros(tiles, dtype=torch.int32, device=x.device)

    def call(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return fp8_gemv(x, w, s, x_scale=x_scale, config=cfg, workspace=ws)

    try:
        return round(_graph_ms(_cycling(call, copies)) * 1e3, 2)
    except Exception as e:  # a tile that does not compile (registers, shared memory)
        return f"{type(e).__name__}: {str(e)[:100]}"


def sweep_fp8_gemv(m_rows: tuple[int, ...] = (1, 4, 8)) -> list[dict]:
    """Time candidate tiles of fp8_gemv (CUDA graph, cold weights) at a few V3 layers, on bf16 x
    and on act_quant's e4m3 x (rows with "act": True; the kernel alone), with the split-K count
    the heuristic rule gives for each tile; `_gemv_config` is tuned from here."""
    out = []
    for name, n, k in (lay for lay in V3_LINEARS if lay[0] in _SWEEP_LAYERS):
        q, s = weight_quant(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        copies = [(q, s)] + [(q.clone(), s.clone()) for _ in range(_copies(n * k) - 1)]
        for m, act in ((m, act) for m in m_rows for act in (False, True)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            x_scale = None
            if act:
                x, x_scale = act_quant(x)
            base = _gemv_config(m, n, k, x.device, act_fp8=act)
            for block_n, warps, stages in _SWEEP_TILES["act" if act else base["DOT"]]:
                bm = base["BLOCK_M"]
                if not base["DOT"] and bm * block_n > 64:  # acc registers (see _gemv_config)
                    continue
                tiles = cdiv(m, bm) * cdiv(n, block_n)
                split = _same_programs_split(base, n, k, tiles)
                cfg = _tile(base, block_n, warps, stages, split)
                us = _time_config(x, x_scale, cfg, copies, tiles)
                row = {"layer": name, "M": m, "N": n, "K": k, "act": act, **cfg, "us": us}
                out.append({**row, "chosen": cfg == base})
        del copies
        torch.cuda.empty_cache()
    return out


def _tile(base: dict, block_n: int, warps: int, stages: int, split: int) -> dict:
    """`base` (a `_gemv_config`) with a swept tile and split-K count."""
    return {**base, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages, "SPLIT_K": split}


def print_fp8_gemv_sweep(rows: list[dict]) -> None:
    best, chosen = best_and_chosen(rows, lambda r: (r["layer"], r["M"], r.get("act", False)))
    for g, r in best.items():
        c = chosen.get(g)
        print(
            f"sweep fp8_gemv{' act' if g[2] else '    '} {g[0]:12s} M={g[1]:2d}: best "
            f"BLOCK_N={r['BLOCK_N']} warps={r['num_warps']} stages={r['num_stages']} "
            f"split={r['SPLIT_K']} {r['us']} us; chosen {c['us'] if c else 'n/a'} us"
        )


# The batch-1 split sweep: broadcast tiles (BLOCK_N, num_warps, num_stages; 4 warps lost
# everywhere in the first sweep) crossed with explicit
# split-K counts (None: the heuristic's count for that tile).
_SPLIT_SWEEP_TILES = tuple((bn, w, st) for bn in (8, 16, 32) for w in (1, 2) for st in (4, 6))
_SPLIT_SWEEP_SPLITS = (None, 1, 2, 4, 8, 16)
_SPLIT_SWEEP_LAYERS = ("q_a", "kv_a")  # V3's small ones, next to Moonlight's


def sweep_fp8_gemv_splits(names: str | None = None) -> list[dict]:
    """fp8_gemv at M = 1 on Moonlight's decode projections and V3's q_a, kv_a (or the comma list
    `names` of MOONLIGHT_LINEARS and V3_LINEARS): every broadcast tile of `_SPLIT_SWEEP_TILES` at
    split-K 1, 2, 4, 8, 16 and the heuristic's count, CUDA graph, cold weights; each layer's row
    also times the bf16 `gemv` on the same shape (twice the bytes: the FP8 kernel should not be
    slower). `_gemv_config` at M = 1 is tuned from here."""
    out = []
    every = MOONLIGHT_LINEARS + V3_LINEARS
    if names is None:
        layers = MOONLIGHT_LINEARS + tuple(v for v in V3_LINEARS if v[0] in _SPLIT_SWEEP_LAYERS)
    else:
        wanted = names.split(",")
        unknown = sorted(set(wanted) - {v[0] for v in every})
        if unknown:
            raise ValueError(f"split sweep layers {unknown}: accepted {[v[0] for v in every]}")
        layers = tuple(v for v in every if v[0] in wanted)
    for name, n, k in layers:
        q, s = weight_quant(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        copies = [(q, s)] + [(q.clone(), s.clone()) for _ in range(_copies(n * k) - 1)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        copies_bf16 = [(wb,)] + [(wb.clone(),) for _ in range(_copies(2 * n * k) - 1)]
        bf16_us = round(_graph_ms(_cycling(lambda w, x=x: gemv_linear(x, w), copies_bf16)) * 1e3, 2)
        del copies_bf16, wb
        base = _gemv_config(1, n, k, x.device)
        kb = cdiv(k, 128)
        for block_n, warps, stages in _SPLIT_SWEEP_TILES:
            tiles = cdiv(n, block_n)
            heuristic = _same_programs_split(base, n, k, tiles)
            splits = (heuristic if sp is None else min(sp, kb) for sp in _SPLIT_SWEEP_SPLITS)
            for split in dict.fromkeys(splits):
                cfg = _tile(base, block_n, warps, stages, split)
                us = _time_config(x, None, cfg, copies, tiles)
                row = {"layer": name, "M": 1, "N": n, "K": k, "act": False, **cfg, "us": us}
                out.append({**row, "bf16_gemv_us": bf16_us, "chosen": cfg == base})
        del copies
        torch.cuda.empty_cache()
    return out


def print_fp8_gemv_split_sweep(rows: list[dict]) -> None:
    best, chosen = best_and_chosen(rows, lambda r: r["layer"])
    for layer, r in best.items():
        c = chosen.get(layer)
        print(
            f"split sweep fp8_gemv {layer:16s} M=1: best BLOCK_N={r['BLOCK_N']} "
            f"warps={r['num_warps']} stages={r['num_stages']} split={r['SPLIT_K']} {r['us']} us; "
            f"chosen {c['us'] if c else 'n/a'} us; bf16 gemv {r['bf16_gemv_us']} us"
        )
