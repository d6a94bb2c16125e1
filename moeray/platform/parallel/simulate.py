"""Timeline simulator for the pipeline schedules in `schedule.py`.

Cost model (docs/deepseek-v3.md, "Pipeline schedules"): a forward chunk takes F, a full
backward B, a weight-grad W, an input-grad BI = B - W, and an overlapped forward+backward slot
F&B (`fb`). Point-to-point transfers are free, as in the report's bubble formulas. A slot starts
when its rank has finished the previous slot and every input has arrived:
  F  of (d, mb, s) needs F  of (d, mb, s-1)                    (s > 0)
  B/BI of (d, mb, s) needs B/BI of (d, mb, s+1), or, on the last stage, its own F
  W  of (d, mb, s) needs BI of (d, mb, s)
An overlapped slot waits for both of its inputs and delivers both results when it ends.

The bubble of a step is the idle time of its busiest-waiting rank: makespan minus that rank's
busy time. 1F1B and ZB1P give every rank the same work and the same idle time; under DualPipe the
ranks overlap different numbers of slots and the middle ranks wait longest.

When the simulation equals the report's formulas (tests/unit/test_schedule.py checks these):
  1F1B      (PP-1)(F+B)           for any F, B;
  ZB1P      (PP-1)(F+B-2W)        when W <= F <= B-W (weight grads fit in the cooldown gaps);
  DualPipe  (PP/2-1)(F&B+B-3W)    when F = W = B-W (the zero-bubble papers' usual assumption that
                                  forward, input grad and weight grad cost the same), for any
                                  F&B between B and F+B.
Outside those regimes the formulas are approximations and the simulation is the better number.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeray.platform.parallel.schedule import Kind, Op, Schedule, Slot


@dataclass(frozen=True)
class Costs:
    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float | None = None  # F&B; None: no overlap benefit, F + B

    def __post_init__(self):
        if min(self.f, self.b, self.w) < 0 or self.w > self.b:
            raise ValueError(f"costs need F, B, W >= 0 and W <= B, got {self}")
        if self.fb is not None and self.fb < 0:
            raise ValueError(f"F&B={self.fb} must be >= 0")

    @property
    def f_and_b(self) -> float:
        return self.f + self.b if self.fb is None else self.fb

    def slot(self, slot: Slot) -> float:
        if len(slot) == 2:
            return self.f_and_b
        kind = slot[0].kind
        return {Kind.F: self.f, Kind.B: self.b, Kind.BI: self.b - self.w, Kind.W: self.w}[kind]


@dataclass(frozen=True)
class Timeline:
    schedule: Schedule
    costs: Costs
    spans: tuple[tuple[tuple[float, float], ...], ...]  # spans[r][t] = (start, end) of slot t

    @property
    def makespan(self) -> float:
        return max(spans[-1][1] for spans in self.spans if spans)

    def busy(self, rank: int) -> float:
        return sum(end - start for start, end in self.spans[rank])

    def idle(self, rank: int) -> float:
        return self.makespan - self.busy(rank)

    def bubble(self) -> float:
        """The step's bubble: the largest idle time of any rank (see the module docstring)."""
        return max(self.idle(r) for r in range(self.schedule.pp))

    def peak_activations(self, rank: int) -> int:
        """Most micro-batch activations alive at once on a rank, counting from the start of the
        forward that stores them to the end of the B (or W) that frees them; an overlapped slot
        holds its new forward's activations while its backward still needs the old ones."""
        return peak_activations(self.schedule, rank)


def peak_activations(schedule: Schedule, rank: int) -> int:
    alive = peak = 0
    for slot in schedule.ranks[rank]:
        alive += sum(op.kind == Kind.F for op in slot)
        peak = max(peak, alive)
        alive -= sum(op.kind in (Kind.B, Kind.W) for op in slot)
    return peak


def _deps(op: Op, pp: int) -> list[tuple[str, tuple[int, int, int]]]:
    d, mb, st = op.key
    if op.kind == Kind.F:
        return [("F", (d, mb, st - 1))] if st > 0 else []
    if op.kind in (Kind.B, Kind.BI):
        return [("B", (d, mb, st + 1))] if st < pp - 1 else [("F", (d, mb, st))]
    return [("BI", (d, mb, st))]


def simulate(schedule: Schedule, costs: Costs = Costs()) -> Timeline:
    """Start every slot as early as its rank and its inputs allow; ValueError on a deadlock."""
    pp = schedule.pp
    done: dict[tuple[str, tuple[int, int, int]], float] = {}
    spans: list[list[tuple[float, float]]] = [[] for _ in range(pp)]
    clock = [0.0] * pp
    nxt = [0] * pp
    remaining = sum(len(r) for r in schedule.ranks)
    while remaining:
        progressed = False
        for r in range(pp):
            while nxt[r] < len(schedule.ranks[r]):
                slot = schedule.ranks[r][nxt[r]]
                deps = [dep for op in slot for dep in _deps(op, pp)]
                if any(dep not in done for dep in deps):
                    break
                start = max([clock[r]] + [done[dep] for dep in deps])
                end = start + costs.slot(slot)
                for op in slot:
                    # a full B also delivers the input grad the previous stage waits for
                    name = {Kind.F: "F", Kind.B: "B", Kind.BI: "B", Kind.W: "W"}[op.kind]
                    done[(name, op.key)] = end
                    if op.kind in (Kind.B, Kind.BI):
                        done[("BI", op.key)] = end
                spans[r].append((start, end))
                clock[r] = end
                nxt[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {
                r: schedule.ranks[r][nxt[r]] for r in range(pp) if nxt[r] < len(schedule.ranks[r])
            }
            raise ValueError(f"schedule {schedule.name} deadlocks; waiting slots: {stuck}")
    return Timeline(schedule, costs, tuple(tuple(s) for s in spans))


def formula_bubble(name: str, pp: int, costs: Costs) -> float:
    """The report's bubble formulas (docs/deepseek-v3.md, "Pipeline schedules")."""
    f, b, w, fb = costs.f, costs.b, costs.w, costs.f_and_b
    if name == "1f1b":
        return (pp - 1) * (f + b)
    if name == "zb1p":
        return (pp - 1) * (f + b - 2 * w)
    if name == "dualpipe":
        return (pp / 2 - 1) * (fb + b - 3 * w)
    raise ValueError(f"unknown schedule {name!r}")
