"""Where FP8 training's error comes from at real widths: every FP8 projection of a model built as
`moeray bench train --pp 1` builds it (random weights, FP8 with BF16 weight gradients), one
micro-batch forward and backward on the GPU kernels, each projection's output y, input gradient
dx and weight gradient dW compared with

- `emul`: the exact emulation of the same recipe on the same operands (`platform/fp8.py`'s qdq_*,
  fp32 matmuls): GPU and emulation differ only by the bf16 rounding of the output (~3e-3 in
  norm); far more means a kernel reads a wrong scale or group;
- `bf16`: the same GEMM with bf16 operands and fp32 accumulation: FP8's own error (E4M3 keeps 3
  mantissa bits: ~3-4% in norm).

Also per projection: how peaked its input's 128-feature groups are (the mean over groups of
amax / rms; ~3.5 for Gaussian rows, large where a few channels carry outliers: those groups lose
the most to a shared scale). Prints a table, writes JSON to --out.

    python scripts/fp8_train_check.py --model moonlight_16b_a3b --layers 2 --out fp8-check.json
"""

from __future__ import annotations

import argparse
import json

import torch

from moeray.platform import fp8 as f8
from moeray.platform.parallel.weight_grad import SplitLinear
from moeray.platform.train import bench_run
from moeray.platform.train import step as tstep
from moeray.platform.train.bench_common import BenchConfig, bigram_stream


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def peakedness(x_MK: torch.Tensor) -> float | None:
    """Mean over the full 128-feature groups of amax / rms; None where K < 128."""
    m, k = x_MK.shape
    if k < 128:
        return None
    g = x_MK[:, : k // 128 * 128].float().reshape(m, -1, 128)
    rms = g.pow(2).mean(-1).sqrt().clamp(min=1e-30)
    return (g.abs().amax(-1) / rms).mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="moonlight_16b_a3b")
    p.add_argument("--layers", default="2")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--scope", default="all")
    p.add_argument("--device", default="cuda", help="cpu: the emulation itself (a smoke run)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    cfg = BenchConfig(
        model=args.model,
        device=args.device,
        pp=1,
        layers=args.layers,
        seq_len=args.seq_len,
        micro_batch_size=args.micro_batch_size,
        fp8_scope=args.scope,
    )
    model_cfg = cfg.model_config()
    model = bench_run.build_model(cfg, model_cfg, True, False, dev, bf16_wgrad=True)
    seen: dict[str, dict] = {}

    def hooks(name: str, mod: SplitLinear):
        def fwd(_m, inputs, out):
            seen[name] = {"x": inputs[0].detach().reshape(-1, inputs[0].shape[-1]), "y": out}

        def bwd(_m, grad_in, grad_out):
            seen[name]["dx"] = grad_in[0].reshape(-1, grad_in[0].shape[-1])
            seen[name]["dy"] = grad_out[0].reshape(-1, grad_out[0].shape[-1])

        mod.register_forward_hook(fwd)
        mod.register_full_backward_hook(bwd)

    for name, mod in model.named_modules():
        if isinstance(mod, SplitLinear) and mod.fp8:
            hooks(name, mod)
    tokens = bigram_stream(model_cfg.vocab_size, args.micro_batch_size * (args.seq_len + 1), 0)
    batch = tokens.view(args.micro_batch_size, args.seq_len + 1).to(dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        parts = tstep.compute_loss(model, batch, tstep.LossConfig())
    parts.total.backward()
    rows = []
    modules = dict(model.named_modules())
    for name, s in seen.items():
        mod = modules[name]
        w = mod.weight.detach().float()
        x, dy = s["x"].float(), s["dy"].float()
        with torch.autocast(dev.type, enabled=False):
            y_emul = f8.qdq_1x128(x) @ f8.qdq_128x128(w).t()
            y_bf16 = (x.bfloat16() @ w.bfloat16().t()).float()
            dx_emul = f8.qdq_1x128(dy) @ f8.qdq_128x128(w)
            dx_bf16 = (dy.bfloat16() @ w.bfloat16()).float()
            dw_ref = dy.t() @ x.bfloat16().float()
        y = s["y"].reshape(-1, w.shape[0]).float()
        row = {
            "name": name,
            "N": w.shape[0],
            "K": w.shape[1],
            "y_vs_emul": rel(y, y_emul),
            "y_emul_vs_bf16": rel(y_emul, y_bf16),
            "y_vs_bf16": rel(y, y_bf16),
            "dx_vs_emul": rel(s["dx"].float(), dx_emul),
            "dx_emul_vs_bf16": rel(dx_emul, dx_bf16),
            "dw_vs_fp32": rel(mod.weight.grad.float(), dw_ref),
            "x_peak": peakedness(x),
            "dy_peak": peakedness(dy),
        }
        rows.append(row)
    cols = [k for k in rows[0] if k != "name"]
    print(f"{'projection':44} " + " ".join(f"{c[:13]:>13}" for c in cols))
    for r in rows:
        print(
            f"{r['name'][:44]:44} "
            + " ".join(
                f"{r[c]:13d}" if isinstance(r[c], int) else f"{r[c] or 0:13.4g}" for c in cols
            )
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "layers": args.layers, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
