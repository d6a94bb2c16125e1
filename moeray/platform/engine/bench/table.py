"""A short table of `moeray bench engine` result files, one row per (file, batch size):

    python -m moeray.platform.engine.bench.table benchmarks/results/engine-*-moonlight-*.json

Columns: the run's tag (file name past `engine-<device>-`), weights, batch, decode tokens/s, ms per
step, the roofline step at the datasheet bandwidth (the measured one when the GPU is unknown), the
fraction of the roofline at the datasheet and at the measured bandwidth, the GPU time of one replay
of the batch's decode graph (the forward alone; '-' without graphs), and from the profile (when
the run had --profile-steps) kernels per step, device ms per step and the category that took most:
busy and exclusive times where the profile has them (profile.exclusive_us: with PDL a kernel's
duration includes its wait for the one before), else the kernels' summed durations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = (
    ("run", "<28"),
    ("weights", "<7"),
    ("batch", ">5"),
    ("tok/s", ">9"),
    ("step ms", ">8"),
    ("roof ms", ">8"),
    ("frac", ">6"),
    ("frac meas", ">9"),
    ("graph ms", ">8"),
    ("kern/step", ">9"),
    ("dev ms", ">7"),
    ("top category", "<24"),
)


def _fmt(v: object, spec: str, digits: int = 3) -> str:
    if isinstance(v, float):
        v = f"{v:.{digits}g}" if abs(v) < 10**digits else f"{v:.0f}"
    return format("-" if v is None else str(v), spec)


def rows(path: Path) -> list[list[object]]:
    r = json.loads(path.read_text())
    device = "".join(c if c.isalnum() else "-" for c in r["device"].lower()).strip("-")
    run = path.stem.removeprefix(f"engine-{device}").lstrip("-") or path.stem
    out: list[list[object]] = []
    for B, rate in r["decode_tokens_per_s"].items():
        roof = r.get("roofline", {}).get(B, {}).get("step_us", {})
        prof = r.get("decode_profile", {}).get(B)
        top = None
        if prof and prof["by_category"]:
            # exclusive times where recorded (PDL overlap counted once), else durations
            key = "exclusive_ms_per_step" if "busy_ms_per_step" in prof else "ms_per_step"
            name, cat = max(prof["by_category"].items(), key=lambda kv: kv[1][key])
            top = f"{name} {cat[key]:.2f} ms"
        out.append(
            [
                run,
                r["model"].get("weights", r["model"].get("dtype")),
                int(B),
                rate,
                1e3 * int(B) / rate,
                roof.get("datasheet", roof.get("measured", 0.0)) / 1e3 if roof else None,
                r["roofline_fraction"].get(B),
                r.get("roofline_fraction_measured_bandwidth", {}).get(B),
                r.get("decode_graph_ms", {}).get(B),
                prof["kernels_per_step"] if prof else None,
                prof.get("busy_ms_per_step", prof["device_ms_per_step"]) if prof else None,
                top,
            ]
        )
    return out


def render(paths: list[Path]) -> str:
    lines = [" ".join(format(name, spec) for name, spec in COLUMNS)]
    for path in paths:
        for row in rows(path):
            lines.append(" ".join(_fmt(v, spec) for v, (_, spec) in zip(row, COLUMNS, strict=True)))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        print(f"usage: table RESULT.json...; not found: {missing}", file=sys.stderr)
        return 2
    print(render(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
