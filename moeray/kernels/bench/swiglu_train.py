"""`moeray bench kernels --only swiglu_train`: the routed experts' SwiGLU as training runs it
(`kernels/swiglu_train.py`, called by platform/parallel/experts_mlp.py), at Moonlight-16B-A3B's
training shape (P 52,864 padded rows a MoE layer and micro-batch, I 1408, bf16). Four rows:
forward (PyTorch's silu and multiply against swiglu_fwd), forward with quant (the same plus
act_quant of h, against swiglu_fwd(quant=True): FP8 training), backward (dh * u, silu_backward,
silu and dh * silu against swiglu_bwd) and backward with quant (plus act_quant of dg and du).
Per row: median ms each way, the CUDA kernels each launches (torch.profiler), the bytes each way
moves over its time as TB/s and as a fraction of the device-to-device copy measured in the same
run, the saving per training step (40 layer-micro-batches), whether the outputs' bits are equal
(e4m3 values and scales too), and the kernels' time at 8 to 64 rows a program (the default,
BLOCK_M = 16, is act_quant's tile, not yet measured here)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from moeray.kernels.bench.common import _bench, _rec
from moeray.kernels.bench.norm import _cuda_kernels
from moeray.kernels.common import FP8_BLOCK, cdiv
from moeray.kernels.fp8 import act_quant
from moeray.kernels.swiglu_train import BLOCK_M, swiglu_bwd, swiglu_fwd

P, WIDTH = 52864, 1408  # Moonlight's padded rows a MoE layer and micro-batch; expert width
CALLS_PER_STEP = 40  # Moonlight's MoE layers in the one-H200 bench x micro-batches a step
SWEEP_BLOCK_M = (8, 16, 32, 64)


def _torch_fwd(g: torch.Tensor, u: torch.Tensor, quant: bool) -> tuple:
    h = F.silu(g) * u
    return (h, *act_quant(h, scale_col_major=True)) if quant else (h,)


def _torch_bwd(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, quant: bool) -> tuple:
    dg, du = torch.ops.aten.silu_backward(dh * u, g), dh * F.silu(g)
    if not quant:
        return dg, du
    return dg, du, *act_quant(dg, scale_col_major=True), *act_quant(du, scale_col_major=True)


def _fused_fwd(g: torch.Tensor, u: torch.Tensor, quant: bool, block_m: int = BLOCK_M) -> tuple:
    out = swiglu_fwd(g, u, quant=quant, block_m=block_m)
    return out if isinstance(out, tuple) else (out,)


def _fused_bwd(
    dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, quant: bool, block_m: int = BLOCK_M
) -> tuple:
    dg, du, *pairs = swiglu_bwd(dh, g, u, quant=quant, block_m=block_m)
    return dg, du, *(t for pair in pairs for t in pair)


def _bits_equal(a: tuple, b: tuple) -> bool:
    """Every output equal bit for bit (e4m3 compared as bytes; scales as fp32 values)."""
    return len(a) == len(b) and all(
        x.shape == y.shape
        and torch.equal(
            x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
            y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y,
        )
        for x, y in zip(a, b, strict=True)
    )


def _moved(passes: int, quantized: int, reread: int) -> int:
    """Bytes: `passes` bf16 [P, I] reads and writes, `quantized` e4m3 [P, I] and fp32 scale
    writes, `reread` bf16 re-reads by act_quant."""
    n = P * WIDTH
    return n * 2 * (passes + reread) + quantized * (n + 4 * P * cdiv(WIDTH, FP8_BLOCK))


def _row(
    name: str,
    torch_fn: Callable[[], tuple],
    fused_fn: Callable[..., tuple],
    torch_bytes: int,
    fused_bytes: int,
    copy_tbps: float,
) -> dict[str, Any]:
    row: dict[str, Any] = {"kernel": name, "P": P, "I": WIDTH, "dtype": "bfloat16"}
    row["BLOCK_M"] = BLOCK_M
    row["baseline"] = "PyTorch's ops" + (" + act_quant" if name.endswith("quant") else "")
    for impl, fn, nbytes in (("torch", torch_fn, torch_bytes), ("fused", fused_fn, fused_bytes)):
        ms = _bench(fn)
        tbps = nbytes / ms / 1e9
        row[f"{impl}_ms"] = round(ms, 4)
        row[f"{impl}_MB"] = round(nbytes / 1e6, 1)
        row[f"{impl}_TBps"] = round(tbps, 3)
        row[f"{impl}_frac_copy_bw"] = round(tbps / copy_tbps, 3)
        row[f"{impl}_kernels"] = _cuda_kernels(fn)
    # the kernels' rows a program (BLOCK_M the default): which tile the default should be
    row["fused_ms_by_block_m"] = {
        bm: round(_bench(partial(fused_fn, block_m=bm)), 4) for bm in SWEEP_BLOCK_M
    }
    row["frac_copy_bw"] = row["fused_frac_copy_bw"]
    row["speedup"] = round(row["torch_ms"] / row["fused_ms"], 2)
    row["saved_ms_per_step"] = round((row["torch_ms"] - row["fused_ms"]) * CALLS_PER_STEP, 2)
    row["bit_equal"] = _bits_equal(torch_fn(), fused_fn())
    return row


def bench_swiglu_train(ceil: dict) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    # g and u as the experts' grouped GEMMs write them (two contiguous [P, I] bf16 tensors), g
    # spread as gate pre-activations are; dh as the input-gradient GEMM writes it
    g, u, dh = (
        (torch.randn(P, WIDTH, device="cuda", generator=gen) * scale).to(torch.bfloat16)
        for scale in (4.0, 1.0, 1.0)
    )
    copy = ceil["copy_TBps"]
    rows = []
    for quant in (False, True):
        nq = int(quant)
        suffix = "_quant" if quant else ""
        # forward: torch silu (g read, s written) and the product (s, u read, h written), then
        # act_quant (h re-read, e4m3 and scales written); fused g, u read, h (and e4m3) written
        rows.append(
            _row(
                "fwd" + suffix,
                partial(_torch_fwd, g, u, quant),
                partial(_fused_fwd, g, u, quant),
                _moved(5, nq, nq),
                _moved(3, nq, 0),
                copy,
            )
        )
        # backward: torch dh * u (3 passes), silu_backward (3), silu (2), dh * silu (3), then two
        # act_quant; fused dh, g, u read, dg, du (and their e4m3) written
        rows.append(
            _row(
                "bwd" + suffix,
                partial(_torch_bwd, dh, g, u, quant),
                partial(_fused_bwd, dh, g, u, quant),
                _moved(11, 2 * nq, 2 * nq),
                _moved(5, 2 * nq, 0),
                copy,
            )
        )
    return rows


def print_swiglu_train(rows: list[dict]) -> None:
    for r in rows:
        print(
            f"swiglu_train {r['kernel']:9s} P={r['P']} I={r['I']}: {r['torch_ms']:.4f} ms torch "
            f"({r['torch_kernels']} kernels, {r['torch_TBps']} TB/s) -> {r['fused_ms']:.4f} ms "
            f"fused ({r['fused_kernels']}, {r['fused_TBps']} TB/s, {r['frac_copy_bw']:.2f} of "
            f"copy), x{r['speedup']}; {r['saved_ms_per_step']} ms a step saved; "
            f"bit== {r['bit_equal']}; fused ms by block_m {r['fused_ms_by_block_m']}"
        )
    saved = {r["kernel"]: r["saved_ms_per_step"] for r in rows}
    if {"fwd", "bwd", "fwd_quant", "bwd_quant"} <= saved.keys():
        print(
            f"swiglu_train a step: BF16 {saved['fwd'] + saved['bwd']:.2f} ms saved, FP8 "
            f"{saved['fwd_quant'] + saved['bwd_quant']:.2f} ms saved ({CALLS_PER_STEP} calls)"
        )


def swiglu_records(rows: list[dict]) -> list[dict]:
    """The flat `results` records (runner.flat_results): each row's fused kernel against PyTorch's
    ops (and act_quant)."""
    return [
        _rec(
            f"swiglu_train {r['kernel']}",
            f"P{r['P']} I{r['I']} {r['dtype']}",
            r["fused_ms"],
            r["frac_copy_bw"],
            "copy bandwidth",
            r["baseline"],
            r["speedup"],
        )
        for r in rows
    ]
