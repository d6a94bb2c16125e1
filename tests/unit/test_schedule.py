"""Pipeline schedules: legality, simulated bubbles vs the DeepSeek-V3 report's formulas,
`moeray plan`."""

import itertools
import random

import pytest

from moeray.platform.parallel import schedule as S
from moeray.platform.parallel import simulate as sim

CASES = [(2, 4), (4, 8), (4, 10), (6, 12), (8, 20), (8, 16), (10, 22)]


def _op_times(t):
    times = {}
    for _r, (slots, spans) in enumerate(zip(t.schedule.ranks, t.spans, strict=False)):
        for slot, span in zip(slots, spans, strict=False):
            for op in slot:
                times[(op.kind, op.key)] = span
    return times


def _check_dependencies(t):
    """Independent of the simulator's bookkeeping: every op starts after its inputs end."""
    pp = t.schedule.pp
    times = _op_times(t)
    back = {}
    for (kind, key), span in times.items():
        if kind in (S.Kind.B, S.Kind.BI):
            back[key] = span
    for (kind, (d, mb, st)), (start, end) in times.items():
        assert end >= start
        if kind == S.Kind.F and st > 0:
            assert start >= times[(S.Kind.F, (d, mb, st - 1))][1]
        if kind in (S.Kind.B, S.Kind.BI):
            dep = back[(d, mb, st + 1)] if st < pp - 1 else times[(S.Kind.F, (d, mb, st))]
            assert start >= dep[1]
        if kind == S.Kind.W:
            assert start >= times[(S.Kind.BI, (d, mb, st))][1]
    for spans in t.spans:  # one slot at a time per rank
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


@pytest.mark.parametrize("name", S.SCHEDULES)
@pytest.mark.parametrize("pp,m", CASES)
def test_schedules_are_legal(name, pp, m):
    s = S.build(name, pp, m)
    S.validate(s)  # each (direction, mb, stage): one F, one B or BI+W, on its owner, in order
    n_units = pp * m  # every micro-batch visits every stage once
    ops = [op for slots in s.ranks for slot in slots for op in slot]
    assert sum(op.kind == S.Kind.F for op in ops) == n_units
    assert sum(op.kind in (S.Kind.B, S.Kind.BI) for op in ops) == n_units
    t = sim.simulate(s, sim.Costs(1.0, 2.0, 1.0, 2.5))
    _check_dependencies(t)


@pytest.mark.parametrize("pp,m", [*CASES, (6, 2), (3, 3), (5, 7), (1, 4)])
def test_1f1b_bubble_matches_formula_for_any_costs(pp, m):
    rng = random.Random(pp * 100 + m)
    s = S.one_f_one_b(pp, m)
    for _ in range(10):
        b = rng.uniform(0.5, 4)
        costs = sim.Costs(rng.uniform(0.5, 2), b, rng.uniform(0, b))
        t = sim.simulate(s, costs)
        assert t.bubble() == pytest.approx(sim.formula_bubble("1f1b", pp, costs), abs=1e-9)
        assert all(t.idle(r) == pytest.approx(t.bubble()) for r in range(pp))
        assert t.makespan == pytest.approx(m * (costs.f + costs.b) + t.bubble())


@pytest.mark.parametrize("pp,m", [*CASES, (3, 5), (5, 9)])
def test_zb1p_bubble_matches_formula(pp, m):
    rng = random.Random(pp * 100 + m)
    s = S.zb1p(pp, m)
    for _ in range(10):
        # the formula's regime: W <= F <= B - W
        w = rng.uniform(0.05, 1)
        f = rng.uniform(w, 2)
        costs = sim.Costs(f, rng.uniform(f + w, 4), w)
        t = sim.simulate(s, costs)
        assert t.bubble() == pytest.approx(sim.formula_bubble("zb1p", pp, costs), abs=1e-9)
    # and it beats 1F1B by exactly 2W per rank boundary
    c = sim.Costs(1.0, 2.0, 1.0)
    gain = sim.simulate(S.one_f_one_b(pp, m), c).bubble() - sim.simulate(s, c).bubble()
    assert gain == pytest.approx((pp - 1) * 2 * c.w)


@pytest.mark.parametrize("pp,m", [c for c in CASES if c[1] >= 2 * c[0]] + [(12, 24)])
def test_dualpipe_bubble_matches_formula(pp, m):
    rng = random.Random(pp * 100 + m)
    s = S.dualpipe(pp, m)
    for _ in range(10):
        # the formula's regime: F = W = B - W; F&B anywhere between B (full overlap) and F+B
        f = rng.uniform(0.3, 2)
        costs = sim.Costs(f, 2 * f, f, rng.uniform(2 * f, 3 * f))
        t = sim.simulate(s, costs)
        assert t.bubble() == pytest.approx(sim.formula_bubble("dualpipe", pp, costs), abs=1e-9)
        # the middle ranks wait longest; the end ranks overlap fewer slots and wait less
        assert t.idle(pp // 2) == pytest.approx(t.bubble())


def test_dualpipe_beats_zb1p_beats_1f1b_at_the_papers_example():
    costs = sim.Costs(1.0, 2.0, 1.0, 2.5)
    bubbles = {n: sim.simulate(S.build(n, 8, 20), costs).bubble() for n in S.SCHEDULES}
    assert bubbles == {"1f1b": 21.0, "zb1p": 7.0, "dualpipe": 4.5}


def test_memory_columns_of_the_table():
    for pp, m in [(4, 8), (8, 20), (6, 14)]:
        act = {
            n: max(sim.peak_activations(S.build(n, pp, m), r) for r in range(pp))
            for n in S.SCHEDULES
        }
        assert act == {"1f1b": pp, "zb1p": pp, "dualpipe": pp + 1}
        d = S.dualpipe(pp, m)
        assert all(sorted(d.stages_of(r)) == sorted({r, pp - 1 - r}) for r in range(pp))
        assert S.zb1p(pp, m).stages_of(1) == (1,)


def test_dualpipe_structure_of_the_papers_figure():
    s = S.dualpipe(8, 20)
    # rank 0 (figure 5 of the report): six forwards of its own direction, the seventh, then the
    # first micro-batch from the other end (stage 7 on rank 0), then input-grad, weight, forward
    first = [[(op.kind.value, op.mb, op.direction) for op in slot] for slot in s.ranks[0][:10]]
    assert first == [[("F", i, 0)] for i in range(7)] + [
        [("F", 0, 1)],
        [("BI", 0, 1)],
        [("W", 0, 1)],
    ]
    # the last rank mirrors it with the directions swapped
    mirror = [[(op.kind.value, op.mb, 1 - op.direction) for op in slot] for slot in s.ranks[7]]
    assert mirror == [[(op.kind.value, op.mb, op.direction) for op in slot] for slot in s.ranks[0]]
    # rank 0 runs stage 0 of its own direction and stage 7 (the loss) of the other; rank 7 mirrors
    assert (s.ranks[0][0][0].stage, s.ranks[0][7][0].stage) == (0, 7)
    assert (s.ranks[7][0][0].stage, s.ranks[7][7][0].stage) == (0, 7)
    # steady state: overlapped slots, one forward of each direction with a backward of the other
    overlapped = [slot for slot in s.ranks[2] if len(slot) == 2]
    assert overlapped and all(f.direction != b.direction for f, b in overlapped)


def test_bad_arguments_and_broken_schedules():
    with pytest.raises(ValueError, match="even number of pipeline"):
        S.dualpipe(5, 20)
    with pytest.raises(ValueError, match="micro-batches >= 2\\*pp"):
        S.dualpipe(8, 14)
    with pytest.raises(ValueError, match="even number of micro-batches"):
        S.dualpipe(4, 9)
    with pytest.raises(ValueError, match="unknown schedule"):
        S.build("gpipe", 4, 8)
    with pytest.raises(ValueError, match="W <= B"):
        sim.Costs(1, 1, 2)

    good = S.one_f_one_b(3, 4)

    def edited(rank, slots):
        ranks = list(good.ranks)
        ranks[rank] = tuple(slots)
        return S.Schedule(good.name, good.pp, good.microbatches, 1, tuple(ranks))

    r0 = list(good.ranks[0])
    with pytest.raises(ValueError, match="missing F"):
        S.validate(edited(0, r0[1:]))
    with pytest.raises(ValueError, match="appears twice"):
        S.validate(edited(0, [*r0, r0[-1]]))
    with pytest.raises(ValueError, match="before its forward"):
        i = next(t for t, slot in enumerate(r0) if slot[0].kind == S.Kind.B)
        swapped = r0[:]
        j = next(
            t for t, slot in enumerate(r0) if slot[0].kind == S.Kind.F and slot[0].mb == r0[i][0].mb
        )
        swapped[i], swapped[j] = swapped[j], swapped[i]
        S.validate(edited(0, swapped))
    with pytest.raises(ValueError, match="lives elsewhere"):
        S.validate(edited(1, [*list(good.ranks[1]), (S.Op(S.Kind.F, 0, 2),)]))
    # legal per rank but impossible across ranks: stage 0 without warm-up waits in B0 for stage
    # 1, which (with one warm-up forward) waits for stage 0's F1
    no_warmup = [(S.Op(k, mb, 0),) for mb in range(4) for k in (S.Kind.F, S.Kind.B)]
    bad = edited(0, no_warmup)
    S.validate(bad)
    with pytest.raises(ValueError, match="deadlocks"):
        sim.simulate(bad)


def test_plan_prints_timelines_and_formulas(capsys):
    from moeray.platform import plan

    assert (
        plan.main(["timeline", "--schedule", "dualpipe", "--pp", "8", "--microbatches", "20"]) == 0
    )
    out = capsys.readouterr().out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.split() and line.split()[0] in S.SCHEDULES and len(line.split()) >= 7
    }
    assert rows["1f1b"][1:4] == ["81", "21", "21"]
    assert rows["zb1p"][1:4] == ["67", "7", "7"]
    assert rows["dualpipe"][1:4] == ["59", "4.5", "4.5"]
    assert rows["dualpipe"][5:7] == ["2x", "9"]
    assert out.count("rank  7 |") == 3
    assert (
        plan.main(["timeline", "--schedule", "dualpipe", "--pp", "8", "--microbatches", "10"]) == 2
    )
    assert "2*pp" in capsys.readouterr().err
