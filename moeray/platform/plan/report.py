"""`moeray plan`: will a layout fit, and how fast can it go.

    moeray plan --model deepseek_v3 --gpu h800                 # DeepSeek-V3's own setting
    moeray plan --model config.json --gpu h200 --gpus 256 --json
    moeray plan --search --gpus 2048 --gpu h800                # rank the training layouts

Parameters (total, activated; embedding, head and MTP apart), training memory per GPU of a
PP x EP x DP layout (memory.py) and whether it fits, MoE all-to-all bytes per token (comm.py),
pipeline bubbles per schedule (the simulator), and for serving the KV bytes per token, KV capacity
per decode GPU, the decode step bound from the all-to-all and a prefill/decode split
(serving.py). Without --pp/--ep the layout is DeepSeek-V3's PP16 x EP64 when the model and GPU
count admit it, else the best the search finds.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from typing import Any

from moeray.platform.config import PRESETS, ModelConfig, preset
from moeray.platform.parallel.schedule import SCHEDULES
from moeray.platform.parallel.simulate import formula_bubble
from moeray.platform.plan.comm import decode_all_to_all_layers
from moeray.platform.plan.gpus import GPUS, GpuSpec, gpu
from moeray.platform.plan.memory import (
    DEEPSEEK_V3,
    GB,
    RECIPES,
    Recipe,
    TrainLayout,
    schedule_stats,
    train_memory,
    worst_rank,
)
from moeray.platform.plan.params import Params
from moeray.platform.plan.search import COSTS, Scored, score, search
from moeray.platform.plan.serving import Workload, plan_serving
from moeray.platform.plan.timeline import FORMULA_TEXT

PAPER_PP, PAPER_EP = 16, 64  # DeepSeek-V3's training layout (report section 3.2)


def load_model(name: str) -> ModelConfig:
    if name in PRESETS:
        return preset(name)
    try:
        return ModelConfig.from_hf(name)
    except ValueError as e:
        raise ValueError(
            f"--model {name!r}: {e}; expected a preset {sorted(PRESETS)} or an HF "
            "config.json / model directory"
        ) from None


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def default_layout(
    cfg: ModelConfig,
    spec: GpuSpec,
    gpus: int,
    base: TrainLayout,
    gpus_per_node: int = 8,
    recipe: Recipe = DEEPSEEK_V3,
) -> Scored:
    if gpus % (PAPER_PP * PAPER_EP) == 0:
        try:
            paper = replace(
                base,
                pp=PAPER_PP,
                ep=PAPER_EP,
                dp=gpus // (PAPER_PP * PAPER_EP),
            )
            return score(cfg, spec, paper, gpus_per_node, recipe)
        except ValueError:
            pass
    ranked = search(cfg, spec, gpus, base, gpus_per_node, recipe)
    if not ranked:
        raise ValueError(f"no PP x EP x DP layout of {gpus} GPUs suits this model and batch")
    return ranked[0]


def bubbles(layout: TrainLayout) -> dict[str, dict[str, Any]]:
    """Each schedule at this layout's PP and micro-batches: simulated and formula bubble."""
    out: dict[str, dict[str, Any]] = {}
    for name in SCHEDULES:
        try:
            frac, live = schedule_stats(name, layout.pp, layout.microbatches, COSTS)
        except ValueError as e:
            out[name] = {"error": str(e)}
            continue
        out[name] = {
            "formula": FORMULA_TEXT[name],
            "formula_bubble": formula_bubble(name, layout.pp, COSTS) if layout.pp > 1 else 0.0,
            "bubble_fraction": frac,
            "peak_microbatches": max(live),
        }
    return out


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    cfg, spec = load_model(args.model), gpu(args.gpu)
    recipe = RECIPES[args.recipe]
    # TrainLayout checks the batch split; dp = gpus/shards is set by the search or below
    base = TrainLayout(
        1, 1, 1, args.schedule, args.seq_len, args.global_batch, args.microbatch_seqs
    )
    if args.pp or args.ep:
        pp, ep = args.pp or 1, args.ep or 1
        if args.gpus % (pp * ep):
            raise ValueError(f"--gpus {args.gpus} must be a multiple of pp*ep = {pp * ep}")
        layout = replace(base, pp=pp, ep=ep, dp=args.gpus // (pp * ep))
        chosen = score(cfg, spec, layout, args.gpus_per_node, recipe)
    else:
        chosen = default_layout(cfg, spec, args.gpus, base, args.gpus_per_node, recipe)
    layout = chosen.layout
    p = Params.of(cfg)
    serving = plan_serving(
        cfg,
        spec,
        gpus=args.serve_gpus,
        gpus_per_node=args.gpus_per_node,
        workload=Workload(args.input_tokens, args.output_tokens, args.decode_batch),
    )
    mem = worst_rank(train_memory(cfg, layout, recipe))
    report: dict[str, Any] = {
        "model": args.model,
        "gpu": asdict(spec),
        "gpus": args.gpus,
        "gpus_per_node": args.gpus_per_node,
        "recipe": recipe.name,
        "params_total": p.total,
        "params_activated": p.activated,
        "params": p.as_dict(),
        "layout": {
            **chosen.as_dict(),
            "seq_len": layout.seq_len,
            "global_batch": layout.global_batch,
            "microbatch_seqs": layout.microbatch_seqs,
        },
        "memory_per_gpu_gb": mem.total / GB,
        "hbm_gb": spec.hbm_gb,
        "fits": mem.total <= spec.hbm_gb * GB,
        "memory": mem.as_dict(),
        "all_to_all_per_token_per_moe_layer": chosen.all_to_all.as_dict(),
        "bubbles": bubbles(layout),
        "kv_bytes_per_token": serving.kv_bytes_per_token,
        "decode_tpot_bound_ms": serving.decode_tpot_bound_ms,
        "decode_all_to_all_layers": decode_all_to_all_layers(cfg),
        "serving": serving.as_dict(),
    }
    if args.search:
        ranked = search(cfg, spec, args.gpus, base, args.gpus_per_node, recipe)
        report["layouts"] = [s.as_dict() for s in ranked if s.fits][: args.top]
    return report


def _gb(x: float) -> str:
    return f"{x:.1f} GB"


def render_table(r: dict[str, Any]) -> str:
    p, lay, m, s = r["params"], r["layout"], r["memory"], r["serving"]
    a2a = r["all_to_all_per_token_per_moe_layer"]
    g = r["gpu"]
    lines = [
        f"model {r['model']} on {r['gpus']} x {g['name']} ({g['hbm_gb']:g} GB, "
        f"{r['gpus_per_node']} per node), recipe {r['recipe']}",
        "",
        "parameters",
        f"  total {_count(p['total'])}, activated {_count(p['activated'])} per token",
        f"  embedding {_count(p['embedding'])}, head {_count(p['head'])}, "
        f"MTP {_count(p['mtp'])} (activated {_count(p['mtp_activated'])}), "
        f"routed experts {_count(p['routed_experts'])} (MTP's included)",
        "",
        f"training PP{lay['pp']} x EP{lay['ep']} x DP{lay['dp']} {lay['schedule']}, "
        f"{lay['microbatches']} micro-batches of {lay['microbatch_seqs']} x {lay['seq_len']} "
        "tokens per shard",
        f"  fullest rank {m['rank']} (stages {m['stages']}): weights {_gb(m['weights_gb'])}, "
        f"grads {_gb(m['grads_gb'])}, optimizer {_gb(m['optimizer_gb'])}, activations "
        f"{_gb(m['activations_gb'])} ({m['live_microbatches']} micro-batches), reserve "
        f"{_gb(m['reserve_gb'])}",
        f"  total {_gb(r['memory_per_gpu_gb'])} of {g['hbm_gb']:g} GB: "
        + ("fits" if r["fits"] else "DOES NOT FIT"),
        f"  all-to-all per token per MoE layer: {a2a['ib_bytes']:,} B over IB "
        f"({a2a['ib_copies']} copies), {a2a['nvlink_bytes']:,} B over NVLink "
        f"({a2a['nvlink_copies']} copies); comm/compute {lay['comm_to_compute']:.2f}",
        "",
        f"  {'schedule':<10}{'formula':<22}{'formula bubble':>15}{'simulated':>11}{'peak mb':>9}",
    ]
    for name, b in r["bubbles"].items():
        if "error" in b:
            lines.append(f"  {name:<10}({b['error']})")
            continue
        lines.append(
            f"  {name:<10}{b['formula']:<22}{b['formula_bubble']:>15g}"
            f"{b['bubble_fraction']:>10.1%}{b['peak_microbatches']:>9}"
        )
    lines += [
        "  (formula bubble in units of a forward chunk, F=W=1, B=2; simulated: share of the step)",
        "",
        "serving",
        f"  KV cache {r['kv_bytes_per_token']:,} bytes per token; decode EP{s['decode_ep']} holds "
        f"{_gb(s['decode_weights_gb'])} of weights per GPU, room for "
        f"{s['kv_capacity_tokens_per_decode_gpu']:,} tokens of KV",
        f"  decode step bound {r['decode_tpot_bound_ms']:.2f} ms: all-to-all "
        + (
            f"{s['decode_all_to_all_ms']:.2f} ms ({r['decode_all_to_all_layers']} MoE layers at "
            f"{g['nic_gbs']:g} GB/s)"
            if s["decode_ep"] > 1
            else "none (EP1)"
        )
        + f", HBM reads {s['decode_memory_ms']:.2f} ms; "
        f"{s['decode_tokens_per_s_per_gpu']:,.0f} tokens/s per GPU",
        f"  prefill EP{s['prefill_ep']}: {s['prefill_tokens_per_s_per_gpu']:,.0f} tokens/s per "
        f"GPU; suggested split {s['prefill_groups']} x EP{s['prefill_ep']} prefill : "
        f"{s['decode_groups']} x EP{s['decode_ep']} decode",
    ]
    if "layouts" in r:
        lines += ["", f"layouts that fit, best first (of {r['gpus']} GPUs)"]
        lines.append(
            f"  {'PP':>4}{'EP':>5}{'DP':>5} {'schedule':<10}{'memory':>10}{'bubble':>8}"
            f"{'comm/comp':>10}{'efficiency':>11}"
        )
        for x in r["layouts"]:
            lines.append(
                f"  {x['pp']:>4}{x['ep']:>5}{x['dp']:>5} {x['schedule']:<10}"
                f"{x['memory_per_gpu_gb']:>8.1f}GB{x['bubble_fraction']:>8.1%}"
                f"{x['comm_to_compute']:>10.2f}{x['efficiency']:>11.1%}"
            )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeray plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deepseek_v3", help="preset name or HF config.json path")
    p.add_argument("--gpu", default="h800", choices=sorted(GPUS))
    p.add_argument("--gpus", type=int, default=2048, help="GPUs for training (default 2048)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--pp", type=int, help="pipeline ranks (default: see above)")
    p.add_argument("--ep", type=int, help="expert-parallel ranks")
    p.add_argument("--schedule", choices=SCHEDULES, default="dualpipe")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=15360, help="sequences per step")
    p.add_argument("--microbatch-seqs", type=int, default=1)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="deepseek-v3")
    p.add_argument("--input-tokens", type=int, default=Workload.input_tokens)
    p.add_argument("--output-tokens", type=int, default=Workload.output_tokens)
    p.add_argument(
        "--decode-batch",
        type=int,
        default=Workload.decode_batch_per_gpu,
        help="decode tokens per GPU per step (default 32, the ISCA'25 bound's)",
    )
    p.add_argument(
        "--serve-gpus",
        type=int,
        help="GPUs to split between prefill and decode (default: one group of each, scaled)",
    )
    p.add_argument("--search", action="store_true", help="rank every layout that fits")
    p.add_argument("--top", type=int, default=10, help="layouts shown by --search")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    for name in (
        "gpus",
        "gpus_per_node",
        "seq_len",
        "global_batch",
        "microbatch_seqs",
        "top",
        "pp",
        "ep",
        "serve_gpus",
        "input_tokens",
        "output_tokens",
        "decode_batch",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"moeray plan: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        report = build_report(args)
    except ValueError as e:
        print(f"moeray plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else render_table(report))
    return 0
