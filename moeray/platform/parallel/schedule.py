"""Pipeline schedules as explicit per-rank op lists: 1F1B, ZB1P (ZB-H1) and DualPipe.

Notation (docs/deepseek-v3.md, "Pipeline schedules"): PP pipeline ranks, M micro-batches per step.
  F   forward of one stage for one micro-batch;
  B   full backward (input grad and weight grad together);
  BI  the input-grad half of a backward (what the previous stage waits for);
  W   the weight-grad half, deferred to fill bubbles (BI + W together cost B).
A rank runs a list of *slots*; a slot is one op, or one forward and one backward op overlapped
(DualPipe's F&B chunk: the compute of one runs while the other's all-to-all communication runs).

Each op names its micro-batch `mb`, its `stage` (0 = embedding side, PP-1 = loss side) and its
`direction`. 1F1B and ZB1P have one direction: stage s lives on rank s. DualPipe has two:
direction 0 feeds micro-batches into rank 0 (stage s on rank s), direction 1 feeds them into
rank PP-1 (stage s on rank PP-1-s), so rank r holds stages r and PP-1-r, two copies of the model
spread in opposite orders. Micro-batches 0..M/2-1 go in direction 0, the other M/2 in direction 1;
`mb` counts within a direction.

DualPipe construction (DeepSeek-V3 report, section 3.2.1, figure 5). Let h = PP/2 and, for rank
r, q = min(r, PP-1-r) its distance from the nearer end; phase 0 is the direction entering at
that end (direction 0 for r < h, 1 for r >= h), phase 1 the other. Per rank, in order:
  1. 2(h-q-1)    F0               warm-up of the near pipeline until the far one's first input comes
  2. q+1         F0 F1            both directions
  3. h-q-1       BI1 W F1         first backwards: input grad first, weight grad fills the wait
  4. M/2-PP+q+1  (F0&B1) (F1&B0)  steady state: every slot overlaps a forward and a backward
  5. h-q-1       B1 (F1&B0)       phase-0 forwards are done
  6. q+1         B1 B0            the second half of these as BI (zero bubble: W deferred)
  7. h-q-1       W BI0
  8. q+1         W                the deferred weight grads, oldest first
The middle ranks (q = h-1) do their first steady-state pair F0, B1 unoverlapped: the B1 waits
for this rank's own F1 to come back from its neighbour, and overlapping would delay the F0
the neighbour needs. Requires even PP, and M even with M >= 2*PP (step 4 count >= 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

SCHEDULES = ("1f1b", "zb1p", "dualpipe")


class Kind(StrEnum):
    F = "F"
    B = "B"
    BI = "BI"
    W = "W"


@dataclass(frozen=True)
class Op:
    kind: Kind
    mb: int
    stage: int
    direction: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        """(direction, mb, stage): the unit of work F, B/BI and W each act on once."""
        return (self.direction, self.mb, self.stage)

    def label(self) -> str:
        return f"{self.kind.value}{self.mb}" + ("'" if self.direction else "")


Slot = tuple[Op, ...]  # one op, or (forward, backward) overlapped


@dataclass(frozen=True)
class Schedule:
    name: str
    pp: int
    microbatches: int  # all micro-batches of a step, both directions together
    directions: int
    ranks: tuple[tuple[Slot, ...], ...]  # ranks[r] = the slots rank r runs, in order

    def rank_of(self, stage: int, direction: int = 0) -> int:
        return stage if direction == 0 else self.pp - 1 - stage

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages rank r holds: (r,) for one direction, (r, PP-1-r) for DualPipe."""
        return (rank,) if self.directions == 1 else (rank, self.pp - 1 - rank)

    def microbatches_per_direction(self) -> int:
        return self.microbatches // self.directions


def _check_pp_m(pp: int, m: int) -> None:
    if pp < 1:
        raise ValueError(f"pp={pp} must be >= 1")
    if m < 1:
        raise ValueError(f"microbatches={m} must be >= 1")


def one_f_one_b(pp: int, m: int) -> Schedule:
    """1F1B: stage i runs PP-1-i warm-up forwards, then (F, B) pairs, then the remaining Bs."""
    _check_pp_m(pp, m)
    ranks = []
    for i in range(pp):
        warm = min(pp - 1 - i, m)
        slots: list[Slot] = [(Op(Kind.F, x, i),) for x in range(warm)]
        for j in range(m - warm):
            slots += [(Op(Kind.F, warm + j, i),), (Op(Kind.B, j, i),)]
        slots += [(Op(Kind.B, j, i),) for j in range(m - warm, m)]
        ranks.append(tuple(slots))
    return Schedule("1f1b", pp, m, 1, tuple(ranks))


def zb1p(pp: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023): 1F1B's memory, backward split into BI and a deferred W.

    In round x stage i runs F_x, BI_{x-(PP-1-i)}, W_{x-(PP-1)} (each only if its micro-batch is in
    [0, M)): inputs-grads keep 1F1B's pace, every stage holds back its weight grads PP-1 rounds
    and spends them in the cooldown, where 1F1B idles.
    """
    _check_pp_m(pp, m)
    ranks = []
    for i in range(pp):
        slots: list[Slot] = []
        for x in range(m + pp - 1):
            for kind, mb in ((Kind.F, x), (Kind.BI, x - (pp - 1 - i)), (Kind.W, x - (pp - 1))):
                if 0 <= mb < m:
                    slots.append((Op(kind, mb, i),))
        ranks.append(tuple(slots))
    return Schedule("zb1p", pp, m, 1, tuple(ranks))


class _DualPipeRank:
    """Builds one rank's DualPipe slots; tracks the next micro-batch of each op stream."""

    def __init__(self, pp: int, m: int, rank: int):
        self.pp, self.rank = pp, rank
        self.h = pp // 2
        self.q = min(rank, pp - 1 - rank)
        near = 0 if rank < self.h else 1  # the direction entering at this rank's end
        self.direction = (near, 1 - near)  # phase -> direction
        self.next_f = [0, 0]
        self.next_b = [0, 0]
        self.pending_w: list[Op] = []  # FIFO of deferred weight grads
        self.slots: list[Slot] = []

    def _stage(self, phase: int) -> int:
        d = self.direction[phase]
        return self.rank if d == 0 else self.pp - 1 - self.rank

    def f(self, phase: int) -> Op:
        op = Op(Kind.F, self.next_f[phase], self._stage(phase), self.direction[phase])
        self.next_f[phase] += 1
        return op

    def b(self, phase: int, zero_bubble: bool = False) -> Op:
        kind = Kind.BI if zero_bubble else Kind.B
        op = Op(kind, self.next_b[phase], self._stage(phase), self.direction[phase])
        self.next_b[phase] += 1
        if zero_bubble:
            self.pending_w.append(Op(Kind.W, op.mb, op.stage, op.direction))
        return op

    def w(self) -> Op:
        return self.pending_w.pop(0)

    def add(self, *ops: Op) -> None:
        self.slots.append(tuple(ops))

    def build(self, m: int) -> tuple[Slot, ...]:
        h, q = self.h, self.q
        for _ in range(2 * (h - q - 1)):  # 1
            self.add(self.f(0))
        for _ in range(q + 1):  # 2
            self.add(self.f(0))
            self.add(self.f(1))
        for _ in range(h - q - 1):  # 3
            self.add(self.b(1, zero_bubble=True))
            self.add(self.w())
            self.add(self.f(1))
        for i in range(m // 2 - self.pp + q + 1):  # 4
            if i == 0 and q == h - 1:
                self.add(self.f(0))
                self.add(self.b(1))
            else:
                self.add(self.f(0), self.b(1))
            self.add(self.f(1), self.b(0))
        for _ in range(h - q - 1):  # 5
            self.add(self.b(1))
            self.add(self.f(1), self.b(0))
        # 6: the second half of these 2(q+1) backwards defer W; which one starts it depends on
        # the parity of q so that exactly q+1 are deferred (step 8 spends exactly q+1)
        zb = False
        for i in range(q + 1):
            if i == (q + 1) // 2 and q % 2 == 1:
                zb = True
            self.add(self.b(1, zb))
            if i == (q + 1) // 2 and q % 2 == 0:
                zb = True
            self.add(self.b(0, zb))
        for _ in range(h - q - 1):  # 7
            self.add(self.w())
            self.add(self.b(0, zero_bubble=True))
        for _ in range(q + 1):  # 8
            self.add(self.w())
        assert not self.pending_w and self.next_f == [m // 2] * 2 and self.next_b == [m // 2] * 2
        return tuple(self.slots)


def dualpipe(pp: int, m: int) -> Schedule:
    """DualPipe (see the module docstring). M counts both directions: M/2 enter at each end."""
    _check_pp_m(pp, m)
    if pp % 2 or pp < 2:
        raise ValueError(f"DualPipe needs an even number of pipeline ranks >= 2, got pp={pp}")
    if m % 2 or m < 2 * pp:
        raise ValueError(
            f"DualPipe needs an even number of micro-batches >= 2*pp={2 * pp}, got {m}"
        )
    ranks = tuple(_DualPipeRank(pp, m, r).build(m) for r in range(pp))
    return Schedule("dualpipe", pp, m, 2, ranks)


def build(name: str, pp: int, microbatches: int) -> Schedule:
    builders = {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe}
    if name not in builders:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return builders[name](pp, microbatches)


def validate(s: Schedule) -> None:
    """Raise ValueError unless every unit of work appears once, on its owner, in a legal order.

    For each (direction, mb, stage): exactly one F, and either one B or one BI and one W, all on
    the rank that holds that stage, with F before B/BI before W in that rank's order. Overlapped
    slots pair one forward with one full backward. Cross-rank order (stage s before s+1) is the
    simulator's job: an impossible order deadlocks there.
    """
    seen: dict[tuple[Kind, tuple[int, int, int]], tuple[int, int]] = {}
    per_dir = s.microbatches_per_direction()
    for r, slots in enumerate(s.ranks):
        for t, slot in enumerate(slots):
            if len(slot) == 2 and not (slot[0].kind == Kind.F and slot[1].kind == Kind.B):
                raise ValueError(f"rank {r} slot {t}: an overlapped slot is (F, B), got {slot}")
            if len(slot) not in (1, 2):
                raise ValueError(f"rank {r} slot {t}: a slot holds 1 or 2 ops, got {len(slot)}")
            for op in slot:
                if not (
                    0 <= op.mb < per_dir
                    and 0 <= op.stage < s.pp
                    and 0 <= op.direction < s.directions
                ):
                    raise ValueError(f"{op} is outside pp={s.pp}, microbatches={s.microbatches}")
                if s.rank_of(op.stage, op.direction) != r:
                    raise ValueError(f"{op} runs on rank {r}, but its stage lives elsewhere")
                if (op.kind, op.key) in seen:
                    raise ValueError(f"{op} appears twice")
                seen[(op.kind, op.key)] = (r, t)
    for d in range(s.directions):
        for mb in range(per_dir):
            for st in range(s.pp):
                key = (d, mb, st)
                f = seen.get((Kind.F, key))
                b, bi, w = (seen.get((k, key)) for k in (Kind.B, Kind.BI, Kind.W))
                if f is None:
                    raise ValueError(f"missing F for (direction, mb, stage)={key}")
                if (b is None) == (bi is None) or (bi is None) != (w is None):
                    raise ValueError(
                        f"(direction, mb, stage)={key} needs one B or one BI and one W"
                    )
                back = b or bi
                assert back is not None  # exactly one of B, BI is set (checked above)
                if back[1] <= f[1]:
                    raise ValueError(f"backward of {key} before its forward on rank {f[0]}")
                if w is not None:
                    assert bi is not None  # W is set only together with BI (checked above)
                    if w[1] <= bi[1]:
                        raise ValueError(f"W of {key} before its BI on rank {w[0]}")
