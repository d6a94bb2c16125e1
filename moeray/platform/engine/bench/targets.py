"""Issue 19's decode targets checked against `moeray bench engine` result files, one line each:

    python -m moeray.platform.engine.bench.targets benchmarks/results/engine-*-defaults4.json

The targets (the issue's basis is one H200; on another GPU the fractions are of that GPU's
roofline): Moonlight-16B-A3B at batch 1 >= 50% of the roofline in bf16 and >= 40% in FP8, at
batch 64 >= 60% (both weights); FP8 faster than bf16 at every batch both runs measured; at
DeepSeek-V3 widths FP8 >= 1.6x bf16 at batch 1 and >= 60% of the roofline at every batch from 1
to 64; MTP speculation at batch 1 >= 1.6x where a run measured it (and the same for its steps
under async scheduling and for each `--mtp-drafts` count, rows of their own). A file counts by
its model GPU, preset, layer count and weights (`device`, `model` in the JSON; FP8 pairs with
bf16 on the same GPU only); the last file given wins a key. Rows say which files they read; a
target with no file is not printed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

MOONLIGHT, V3 = "moonlight_16b_a3b", "deepseek_v3"


@dataclass(frozen=True)
class Check:
    device: str
    target: str
    value: float
    needed: float
    files: tuple[str, ...]

    @property
    def met(self) -> bool:
        return self.value >= self.needed


def _key(r: dict) -> tuple[str, str, int, str]:
    m = r["model"]
    preset, layers = m.get("preset") or "?", int(m.get("num_hidden_layers") or 0)
    return r.get("device", "?"), preset, layers, m.get("weights") or "?"


def checks(results: dict[str, dict]) -> list[Check]:
    """The targets the results {file name: result JSON} can evaluate."""
    runs = {_key(r): (name, r) for name, r in results.items()}
    out: list[Check] = []

    for (device, preset, layers, weights), (name, r) in sorted(runs.items()):
        shape = f"{preset} ({layers} layers) {weights}"
        fracs = r.get("roofline_fraction", {})
        bars: dict[str, float] = {}  # batch -> the roofline fraction it must reach
        if preset == MOONLIGHT:
            bars = {"1": 0.50 if weights == "bf16" else 0.40, "64": 0.60}
        if preset == V3 and weights == "fp8":
            bars = {b: 0.60 for b in fracs if int(b) <= 64}
        for b in sorted(set(bars) & set(fracs), key=int):
            what = f"{shape} batch {b} roofline"
            out.append(Check(device, what, float(fracs[b]), bars[b], (name,)))
        if r.get("mtp_speedup") is not None and "1" in r.get("decode_tokens_per_s", {}):
            mtp = float(r["mtp_speedup"])
            what = f"{shape} MTP at batch 1, synchronous steps"
            out.append(Check(device, what, mtp, 1.6, (name,)))
            # the MTP steps under async scheduling (EngineConfig.async_scheduling_spec, the
            # default), where the run timed them: same target, their own row
            ahead = r.get("mtp", {}).get("1", {}).get("async_spec")
            if ahead:
                what = f"{shape} MTP at batch 1, async scheduling (default)"
                out.append(Check(device, what, float(ahead["speedup"]), 1.6, (name,)))
            # K drafts a step (`--mtp-drafts`), with the acceptance it ran at: the speedup
            # depends on how many chained drafts the MTP gets right
            drafts = r.get("mtp", {}).get("1", {}).get("drafts", {})
            for k, row in sorted(drafts.items(), key=lambda kv: int(kv[0])):
                acc = float(row["acceptance"])
                what = f"{shape} MTP at batch 1, {k} drafts a step (acceptance {acc:.2f})"
                out.append(Check(device, what, float(row["speedup"]), 1.6, (name,)))
        bf16 = runs.get((device, preset, layers, "bf16"))
        if weights == "fp8" and bf16 is not None:
            rates, base = r["decode_tokens_per_s"], bf16[1]["decode_tokens_per_s"]
            for b in sorted(set(rates) & set(base), key=int):
                needed = 1.6 if preset == V3 and b == "1" else 1.0
                what = f"{preset} ({layers} layers) FP8 / bf16 tokens/s at batch {b}"
                out.append(Check(device, what, rates[b] / base[b], needed, (name, bf16[0])))
    return out


def table(found: list[Check]) -> str:
    lines = [f"{'gpu':<22} {'target':<78} {'value':>7} {'needed':>7}  met"]
    for c in found:
        lines.append(
            f"{c.device[:22]:<22} {c.target:<78} {c.value:>7.3f} {c.needed:>7.2f}  "
            f"{'yes' if c.met else 'NO'}  ({', '.join(c.files)})"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    results = {Path(p).name: json.loads(Path(p).read_text()) for p in argv}
    found = checks(results)
    print(table(found) if found else "no issue-19 target in these files (Moonlight / V3 shapes)")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
