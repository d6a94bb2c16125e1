"""FP8 linear layers at decode batches past fp8_gemv's 16 rows: what each candidate takes at M
rows (default 64) on Moonlight's and DeepSeek-V3's projections, weights out of L2.

Candidates, each from a CUDA graph of back-to-back calls over enough weight copies that no call
finds its weight in L2 (`moeray.kernels.bench.common`):
- `quant_gemm`: act_quant + fp8_gemm (cuBLASLt's block-scaled GEMM where it takes the shape, else
  the Triton kernel): what FP8Linear runs above FP8_GEMV_MAX_ROWS today;
- `quant_gemm_triton`: the same with the Triton GEMM;
- `bf16`: F.linear on the dequantized weight (the bf16 model's layer: twice the bytes);
- `gemv`: fp8_gemv's dot tiles on bf16 x (weight-only), and `act`: act_quant + fp8_gemv's dot
  tiles on e4m3 x, each over (BLOCK_N, warps, stages) x split-K counts (None: the heuristic's).

Prints the best of each kind per layer and writes every row as JSON.

    python scripts/fp8_small_m_sweep.py --rows 64 --out fp8-small-m-sweep.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time

import torch
import torch.nn.functional as F

from moeray.kernels.bench.common import _copies, _cycling, _graph_ms
from moeray.kernels.bench.fp8_gemv import V3_LINEARS
from moeray.kernels.common import cdiv
from moeray.kernels.fp8.dispatch import fp8_gemm
from moeray.kernels.fp8.gemv import _gemv_config, fp8_gemv
from moeray.kernels.fp8.quant import act_quant, weight_dequant, weight_quant

# Moonlight's projections as the engine runs them at batch 64 (q and kv_a apart: their merged
# stack is off the 128-row grid, model/linear.py), and the shared experts' (2 x 1408 wide).
LAYERS = (
    ("ml_q", 3072, 2048),
    ("ml_kv_a", 576, 2048),
    ("ml_o_proj", 2048, 2048),
    ("ml_shared_gate_up", 5632, 2048),
    ("ml_shared_down", 2048, 2816),
    *(lay for lay in V3_LINEARS if lay[0] in ("q_a", "o_proj", "shared_gate_up", "shared_down")),
)
DEVICE = "cuda"  # the smoke run on CPU (Triton's interpreter) sets "cpu"
TILES = ((64, 4, 4), (128, 4, 3), (128, 8, 4))
SPLITS = (None, 1, 2, 4, 8)


def _us(fn, copies) -> float | str:
    try:
        return round(_graph_ms(_cycling(fn, copies)) * 1e3, 2)
    except Exception as e:  # a tile that does not compile (registers, shared memory)
        return f"{type(e).__name__}: {str(e)[:100]}"


def _layer(name: str, n: int, k: int, m: int) -> list[dict]:
    """Every candidate's row at one layer and M."""
    q, s = weight_quant(torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02)
    copies = [(q, s)] + [(q.clone(), s.clone()) for _ in range(_copies(n * k) - 1)]
    wb = weight_dequant(q, s).to(torch.bfloat16)
    bf16_copies = [(wb,)] + [(wb.clone(),) for _ in range(_copies(2 * n * k) - 1)]
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    ref = F.linear(x.float(), wb.float())

    def quant_gemm(w, sc, backend="auto"):
        a, a_s = act_quant(x, scale_col_major=True)
        return fp8_gemm(a, a_s, w, sc, backend=backend)

    def gemv(w, sc, cfg, ws, act):
        if act:  # act_quant is part of the layer's cost
            a, a_s = act_quant(x)
            return fp8_gemv(a, w, sc, x_scale=a_s, config=cfg, workspace=ws)
        return fp8_gemv(x, w, sc, config=cfg, workspace=ws)

    base = {"layer": name, "M": m, "N": n, "K": k}
    rows = [
        {**base, "kind": "quant_gemm", "us": _us(quant_gemm, copies)},
        {
            **base,
            "kind": "quant_gemm_triton",
            "us": _us(lambda w, sc: quant_gemm(w, sc, "triton"), copies),
        },
        {**base, "kind": "bf16", "us": _us(lambda w: F.linear(x, w), bf16_copies)},
    ]
    for kind in ("gemv", "act"):
        act = kind == "act"
        heur = _gemv_config(m, n, k, x.device, act_fp8=act)
        for (bn, warps, stages), split in itertools.product(TILES, SPLITS):
            sp = heur["SPLIT_K"] if split is None else min(split, cdiv(k, 128))
            cfg = {**heur, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, "SPLIT_K": sp}
            ws = torch.zeros(
                cdiv(m, heur["BLOCK_M"]) * cdiv(n, bn), dtype=torch.int32, device=DEVICE
            )
            fn = functools.partial(gemv, cfg=cfg, ws=ws, act=act)
            us = _us(fn, copies)
            err = None
            if isinstance(us, float):
                err = round(((fn(q, s).float() - ref).norm() / ref.norm()).item(), 5)
            rows.append({**base, "kind": kind, **cfg, "us": us, "rel_err": err})
    return rows


def sweep(m: int, budget_s: float) -> list[dict]:
    t0 = time.time()
    rows = []
    for name, n, k in LAYERS:
        if time.time() - t0 > budget_s:
            print(f"budget of {budget_s} s spent: {name} and later layers left out")
            break
        got = _layer(name, n, k, m)
        torch.cuda.empty_cache()
        rows += got
        best: dict[str, dict] = {}
        for r in got:
            if isinstance(r["us"], float) and (
                r["kind"] not in best or r["us"] < best[r["kind"]]["us"]
            ):
                best[r["kind"]] = r
        floor = (n * k + cdiv(n, 128) * cdiv(k, 128) * 4) / 4.8e6
        line = " ".join(f"{kd} {r['us']}" for kd, r in best.items())
        print(f"{name:18s} M={m} N={n} K={k} floor {floor:.2f} us | {line}", flush=True)
        for kd in ("gemv", "act"):
            if kd in best:
                r = best[kd]
                print(
                    f"    best {kd}: BN={r['BLOCK_N']} warps={r['num_warps']} "
                    f"stages={r['num_stages']} split={r['SPLIT_K']} err={r['rel_err']}"
                )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="64", help="comma-separated M values")
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = []
    for m in map(int, a.rows.split(",")):
        rows += sweep(m, a.budget_s)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "command": vars(a)}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
