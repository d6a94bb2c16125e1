"""Benchmark of grouped_wgrad (every expert's BF16 weight gradient in one launch, fp32 out or added
into the gradient) against the path it replaces in `GroupedExperts`: `torch._grouped_mm` (CUTLASS,
bf16 out), `.to(float32)`, and autograd's in-place add into the fp32 gradient.

Shapes: Moonlight-16B-A3B's experts on one GPU (64 experts, D 2048, I 1408, ~18,432 rows a
micro-batch: gate/up dW [I, D] and down dW [D, I]) and DeepSeek-V3's at EP 32 (8 local experts,
D 7168, I 2048, ~16,384 rows). Rows per expert are random, each expert padded to 16 rows as
`GroupedExperts` lays them out on CUDA, a few experts empty. "accumulate" is the steady state (every
micro-batch after a step's first adds into the gradient), "fresh" the first micro-batch."""

from __future__ import annotations

import torch

from moeray.kernels.bench.common import _bench, print_mode_sweep, time_us_or_reason
from moeray.kernels.grouped_wgrad import DEFAULT_CONFIG, grouped_wgrad, grouped_wgrad_ref

# (name, experts, rows before padding, N, K, empty experts)
SHAPES = (
    ("moonlight gate/up", 64, 18000, 1408, 2048, (3, 40)),
    ("moonlight down", 64, 18000, 2048, 1408, (3, 40)),
    ("v3 gate/up", 8, 16000, 2048, 7168, (5,)),
    ("v3 down", 8, 16000, 7168, 2048, (5,)),
)
# Candidate tiles: (BLOCK_N, BLOCK_K, BLOCK_P, num_warps, num_stages), GROUP_N 8 (Triton's Hopper
# matmul tutorial's 128x256x64 / 8 warps / 3 stages among them)
SWEEP_TILES = (
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (64, 128, 64, 4, 3),
    (128, 64, 64, 4, 4),
    (128, 128, 32, 4, 4),
    (64, 256, 64, 8, 3),
    (128, 128, 128, 8, 2),
)


def _expert_rows(experts: int, total: int, empty: tuple[int, ...], seed: int) -> list[int]:
    """Random rows per expert (one multinomial draw of `total` rows), `empty` experts without any,
    each count rounded up to 16 (GroupedExperts.ALIGN on CUDA)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.multinomial(torch.ones(experts), total, replacement=True, generator=g)
    counts = raw.bincount(minlength=experts)
    counts[list(empty)] = 0
    return [-(-int(c) // 16) * 16 for c in counts]


def _inputs(experts: int, total: int, n: int, k: int, empty: tuple[int, ...], seed: int = 0):
    rows = _expert_rows(experts, total, empty, seed)
    p = sum(rows)
    dy = torch.randn(p, n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(p, k, device="cuda", dtype=torch.bfloat16)
    ends = torch.tensor(rows, device="cuda").cumsum(0).to(torch.int32)
    grad = torch.randn(experts, n, k, device="cuda")
    return rows, dy, x, ends, grad


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(f"{((out - ref).norm() / ref.norm()).item():.2e}")


def _cutlass_fp32(dy: torch.Tensor, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The path grouped_wgrad replaces: CUTLASS's grouped GEMM (bf16 out), cast to fp32."""
    return torch._grouped_mm(dy.t(), x, offs=ends).to(torch.float32)


def _row(ceil: dict, name: str, e: int, total: int, n: int, k: int, empty) -> dict:
    rows, dy, x, ends, grad = _inputs(e, total, n, k, empty)
    p = sum(rows)
    ms = {
        "accumulate": _bench(lambda: grouped_wgrad(dy, x, ends, accumulate_into=grad)),
        "fresh": _bench(lambda: grouped_wgrad(dy, x, ends)),
        "cutlass_cast_add": _bench(lambda: grad.add_(_cutlass_fp32(dy, x, ends))),
        "cutlass_cast": _bench(lambda: _cutlass_fp32(dy, x, ends)),
        "cutlass_bf16": _bench(lambda: torch._grouped_mm(dy.t(), x, offs=ends)),
    }
    ref = grouped_wgrad_ref(dy, x, ends)
    flop = 2 * p * n * k
    in_bytes, out_bytes = p * (n + k) * 2, e * n * k * 4
    floor = {
        mode: max(
            flop / ceil["bf16_matmul_TFLOPs"] / 1e9,
            (in_bytes + out_bytes * (2 if mode == "accumulate" else 1)) / (ceil["copy_TBps"] * 1e9),
        )
        for mode in ("accumulate", "fresh")
    }
    return {
        "kernel": "grouped_wgrad",
        "shape": name,
        "experts": e,
        "rows": p,
        "empty_experts": sum(r == 0 for r in rows),
        "N": n,
        "K": k,
        "config": DEFAULT_CONFIG,
        **{f"{key}_ms": round(v, 4) for key, v in ms.items()},
        "accumulate_TFLOPs": round(flop / ms["accumulate"] / 1e9, 1),
        "fresh_TFLOPs": round(flop / ms["fresh"] / 1e9, 1),
        "speedup_accumulate": round(ms["cutlass_cast_add"] / ms["accumulate"], 3),
        "speedup_fresh": round(ms["cutlass_cast"] / ms["fresh"], 3),
        "accumulate_frac_of_floor": round(floor["accumulate"] / ms["accumulate"], 3),
        "fresh_frac_of_floor": round(floor["fresh"] / ms["fresh"], 3),
        "rel_err_vs_fp32_ref": _rel(grouped_wgrad(dy, x, ends), ref),
        "cutlass_bf16_rel_err_vs_fp32_ref": _rel(_cutlass_fp32(dy, x, ends), ref),
    }


def bench_grouped_wgrad(ceil: dict) -> list[dict]:
    """grouped_wgrad (DEFAULT_CONFIG) fresh and accumulating, against torch._grouped_mm + cast
    (+ add_), at SHAPES; the floor is the larger of the FLOPs at the measured bf16 matmul rate and
    the bytes (inputs once, the fp32 gradient written, and read too when accumulating) at the
    measured copy bandwidth."""
    out = []
    for shape in SHAPES:
        out.append(_row(ceil, *shape))
        torch.cuda.empty_cache()
    return out


def print_grouped_wgrad(rows: list[dict]) -> None:
    print(
        f"\n{'grouped_wgrad':18s} {'E':>3s} {'N':>5s} {'K':>5s} {'P':>6s} | {'acc us':>7s} "
        f"{'TFLOP/s':>7s} {'floor':>5s} {'cutlass+cast+add':>16s} {'x':>5s} | {'fresh us':>8s} "
        f"{'cutlass+cast':>12s} {'x':>5s} | err (cutlass bf16)"
    )
    for r in rows:
        print(
            f"{r['shape']:18s} {r['experts']:3d} {r['N']:5d} {r['K']:5d} {r['rows']:6d} | "
            f"{r['accumulate_ms'] * 1e3:7.0f} {r['accumulate_TFLOPs']:7.0f} "
            f"{r['accumulate_frac_of_floor']:5.2f} {r['cutlass_cast_add_ms'] * 1e3:16.0f} "
            f"{r['speedup_accumulate']:5.2f} | {r['fresh_ms'] * 1e3:8.0f} "
            f"{r['cutlass_cast_ms'] * 1e3:12.0f} {r['speedup_fresh']:5.2f} | "
            f"{r['rel_err_vs_fp32_ref']} ({r['cutlass_bf16_rel_err_vs_fp32_ref']})"
        )


def _sweep_shape(name: str, e: int, total: int, n: int, k: int, empty) -> list[dict]:
    rows, dy, x, ends, grad = _inputs(e, total, n, k, empty)
    flop = 2 * sum(rows) * n * k
    torch_us = {
        "accumulate": time_us_or_reason(lambda: grad.add_(_cutlass_fp32(dy, x, ends))),
        "fresh": time_us_or_reason(lambda: _cutlass_fp32(dy, x, ends)),
    }
    out = []
    for bn, bk, bp, warps, stages in SWEEP_TILES:
        cfg = dict(
            BLOCK_N=bn, BLOCK_K=bk, BLOCK_P=bp, GROUP_N=8, num_warps=warps, num_stages=stages
        )
        for mode, acc in (("accumulate", grad), ("fresh", None)):
            us = time_us_or_reason(
                lambda cfg=cfg, acc=acc: grouped_wgrad(dy, x, ends, accumulate_into=acc, config=cfg)
            )
            base = torch_us[mode]
            ok = isinstance(us, float) and isinstance(base, float)
            out.append(
                {
                    "shape": name,
                    "mode": mode,
                    **cfg,
                    "us": us,
                    "TFLOPs": round(flop / us / 1e6, 1) if isinstance(us, float) else None,
                    "torch_us": base,
                    "speedup": round(base / us, 3) if ok else None,  # type: ignore[operator]
                    "chosen": cfg == DEFAULT_CONFIG,
                }
            )
    return out


def sweep_grouped_wgrad() -> list[dict]:
    """Time SWEEP_TILES at SHAPES, accumulating and fresh, each row with the torch path's time
    (torch._grouped_mm + cast, + add_ when accumulating); `DEFAULT_CONFIG` is chosen from here."""
    out = []
    for shape in SHAPES:
        out += _sweep_shape(*shape)
        torch.cuda.empty_cache()
    return out


def print_grouped_wgrad_sweep(rows: list[dict]) -> None:
    print_mode_sweep(
        "grouped_wgrad", rows, ("BLOCK_N", "BLOCK_K", "BLOCK_P", "num_warps", "num_stages")
    )
