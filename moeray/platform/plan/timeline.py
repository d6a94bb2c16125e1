"""`moeray plan`: pipeline schedules side by side, simulated and by the report's formulas.

    moeray plan --schedule dualpipe --pp 8 --microbatches 20

prints an ASCII timeline per rank for 1F1B, ZB1P and DualPipe (the selected schedule last, with
per-rank detail), then a table of makespan, simulated bubble, formula bubble, parameters per
device and peak activations (in micro-batches of one stage).

Timeline legend: `F7` forward of micro-batch 7, `B7` full backward, `b7` input-grad half, `W7`
weight-grad half, `F7+B2` a forward and a backward overlapped (DualPipe's F&B), `.` idle.
DualPipe numbers its micro-batches 0..M/2-1 from rank 0 and M/2..M-1 from rank PP-1.
"""

from __future__ import annotations

import argparse
import sys

from moeray.platform.parallel.schedule import SCHEDULES, Kind, Op, Schedule, Slot, build
from moeray.platform.parallel.simulate import Costs, Timeline, formula_bubble, simulate

FORMULA_TEXT = {
    "1f1b": "(PP-1)(F+B)",
    "zb1p": "(PP-1)(F+B-2W)",
    "dualpipe": "(PP/2-1)(F&B+B-3W)",
}
SHORT = {Kind.F: "F", Kind.B: "B", Kind.BI: "b", Kind.W: "W"}


def _mb_label(s: Schedule, op: Op) -> str:
    return f"{SHORT[op.kind]}{op.mb + op.direction * s.microbatches_per_direction()}"


def _slot_label(s: Schedule, slot: Slot) -> str:
    return "+".join(_mb_label(s, op) for op in slot)


def render(t: Timeline, scale: float) -> list[str]:
    """One text row per rank; `scale` characters per unit of time."""
    s = t.schedule
    width = round(t.makespan * scale)
    rows = []
    for r in range(s.pp):
        line = ["."] * width
        for slot, (start, end) in zip(s.ranks[r], t.spans[r], strict=False):
            a, b = round(start * scale), round(end * scale)
            text, n = _slot_label(s, slot), b - a
            # a label too long for its cell keeps its first characters and ends in '~'
            cell = text.ljust(n) if len(text) <= n else text[: n - 1] + "~" if n > 1 else text[:n]
            line[a:b] = list(cell)
        rows.append(f"rank {r:>2} |{''.join(line)}|")
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeray plan", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="dualpipe",
        help="schedule shown last, with per-rank detail (default: dualpipe)",
    )
    p.add_argument("--pp", type=int, default=8, help="pipeline ranks (default 8)")
    p.add_argument(
        "--microbatches",
        type=int,
        default=20,
        help="micro-batches per step, both DualPipe directions together (default 20)",
    )
    p.add_argument("--f", type=float, default=1.0, help="forward chunk time F (default 1)")
    p.add_argument("--b", type=float, default=2.0, help="full backward chunk time B (default 2)")
    p.add_argument("--w", type=float, default=1.0, help="weight-grad time W (default 1)")
    p.add_argument(
        "--fb", type=float, default=2.5, help="overlapped forward+backward time F&B (default 2.5)"
    )
    p.add_argument(
        "--scale",
        type=float,
        default=3.0,
        help="timeline characters per unit of time (default 3: 'F12' fills one F)",
    )
    p.add_argument("--no-timeline", action="store_true", help="print only the table")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        costs = Costs(args.f, args.b, args.w, args.fb)
        order = [n for n in SCHEDULES if n != args.schedule] + [args.schedule]
        schedules = {}
        for name in order:
            try:
                schedules[name] = build(name, args.pp, args.microbatches)
            except ValueError as e:
                if name == args.schedule:
                    raise
                print(f"({name} skipped: {e})")
    except ValueError as e:
        print(f"moeray plan: {e}", file=sys.stderr)
        return 2
    timelines = {name: simulate(s, costs) for name, s in schedules.items()}

    print(
        f"PP={args.pp} micro-batches={args.microbatches}  F={costs.f:g} B={costs.b:g} "
        f"W={costs.w:g} F&B={costs.f_and_b:g}"
    )
    if not args.no_timeline:
        for name, t in timelines.items():
            print(f"\n{name}  (makespan {t.makespan:g}, bubble {t.bubble():g})")
            for row in render(t, args.scale):
                print(row)
        chosen = timelines.get(args.schedule)
        if chosen is not None:
            idle = ", ".join(f"{chosen.idle(r):g}" for r in range(args.pp))
            print(f"\n{args.schedule} idle per rank: {idle}")

    print()
    header = (
        f"{'schedule':<10}{'makespan':>10}{'bubble':>10}{'formula':>10}  {'formula text':<20}"
        f"{'params':>7}{'activ.':>7}"
    )
    print(header)
    print("-" * len(header))
    for name in SCHEDULES:
        if name not in timelines:
            continue
        t = timelines[name]
        fb = formula_bubble(name, args.pp, costs)
        params = len(t.schedule.stages_of(0))
        act = max(t.peak_activations(r) for r in range(args.pp))
        print(
            f"{name:<10}{t.makespan:>10g}{t.bubble():>10g}{fb:>10g}  {FORMULA_TEXT[name]:<20}"
            f"{params:>6}x{act:>7}"
        )
    exact = costs.w <= costs.f <= costs.b - costs.w
    if not (costs.f == costs.w == costs.b - costs.w):
        print(
            "\nnote: the formulas are exact for 1F1B always, for ZB1P when W <= F <= B-W"
            f"{' (holds)' if exact else ' (does not hold)'}, for DualPipe when F = W = B-W"
            " (does not hold); elsewhere the simulation is the better estimate."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
