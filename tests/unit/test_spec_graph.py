"""Whole-step MTP graphs (engine/spec_step.py `SpecGraph`) on CPU: a stand-in that runs the
captured step at each replay (as test_chunk_graphs' EagerStepGraph does for forwards) gives the
outputs, drafts and acceptance of the two-forward step, greedy and sampled (temperature, top-p, a
greedy row among them), rows ending mid-run at different lengths (the next inputs gathered,
smaller batches padded to the captured sizes), and 3 drafts a step (the MTP chain in the graph),
greedy and sampled; every step a graph can run replays one; a batch with top-k rows runs the
two-forward step; run_step refuses rows that do not fit its kind."""

import pytest
import torch

from moeray.platform.engine import runner_graphs
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.engine.spec_step import SPEC_KINDS, SpecGraph
from moeray.platform.engine.speculative import SpecStats
from tests.unit.test_chunk_graphs import EagerStepGraph
from tests.unit.test_spec_overlap import (  # noqa: F401 (the fixtures, by name)
    _drafts_by_position,
    _engine,
    _run,
    mixed_drafts,
    trained,
)


class EagerSpecGraph(SpecGraph):
    """A SpecGraph that runs its whole step at each replay, its next ids and starts written over
    its static inputs as the captured graph writes them. Its [toks, acc, plain, drafts] are a
    new tensor each replay: on CPU `copy_to_host` hands the host the tensor itself, where on a
    GPU it copies the static output out before the next replay overwrites it."""

    def _capture(self, runner) -> None:
        self.runner = runner  # nothing to run: each replay makes its outputs (EagerStepGraph)

    def _replay(self) -> None:
        self._keep(self._forward(self.runner)[1])


@pytest.fixture(scope="module")
def graphed(trained):  # noqa: F811
    """An engine whose start captured the stand-in graphs up to 4 rows: decode forwards and every
    whole-step kind (built once, shared by the tests that only replay them)."""
    model, _ = trained
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner_graphs, "StepGraph", EagerStepGraph)
        mp.setattr(runner_graphs, "SpecGraph", EagerSpecGraph)
        # no prefill-chunk graphs: their stand-ins' forwards would be most of the start
        eng = _engine(
            model, attention="kernel", capture_graphs_at_start=False, prefill_graph_tokens=0
        )
        eng.runner.use_cuda_graphs = eng.runner.use_mtp_graphs = True
        eng.runner.capture_graphs(4, model.mtp[0], eng.dtype, spec=SPEC_KINDS)
    return eng


def _replays(eng) -> dict[tuple[int, str], int]:
    """Replays so far by (batch size, kind) of every whole-step graph."""
    return {
        (bs, kind): g.replays
        for (bs, _S, kind), g in eng.runner.graphs.items()
        if isinstance(g, SpecGraph)
    }


GREEDY = [SamplingParams(temperature=0, max_tokens=12 - 2 * i) for i in range(4)]
SAMPLED = [
    SamplingParams(temperature=t, top_p=tp, seed=10 + i, max_tokens=12 - i)
    for i, (t, tp) in enumerate([(1.0, 1.0), (0.8, 0.9), (0, 1.0), (0.9, 0.7)])
]


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_whole_step_graphs_give_the_two_graph_steps_outputs(
    trained,  # noqa: F811
    graphed,
    mixed_drafts,  # noqa: F811
    params,
):
    model, prompts = trained
    prompts = prompts[: len(params)]
    two, eng = _engine(model), graphed  # CPU: the two-forward step, eagerly
    assert {k[2] for k in eng.runner.graphs if k[2] in SPEC_KINDS} == set(SPEC_KINDS)
    spec = eng._overlap.spec
    before = (_replays(eng), spec.overlapped_steps)
    launches: list[int] = []  # rows of each step the overlap launched
    launch = spec._launch

    def counted(rows, *args):
        launches.append(len(rows))
        return launch(rows, *args)

    spec._launch = counted
    runs = []
    for e in (two, eng):
        e.drafter.stats = SpecStats()
        drafts = _drafts_by_position(e)
        outs = _run(e, prompts, params)
        st = e.drafter.stats
        # drafts by (request's place in this run, start): the shared engine numbers on
        first = min(int(rid.rsplit("-", 1)[1]) for rid, _ in drafts)
        by_place = {(int(r.rsplit("-", 1)[1]) - first, st_): d for (r, st_), d in drafts.items()}
        runs.append((outs, by_place, st.num_draft_tokens, st.num_accepted_tokens))
    assert runs[1] == runs[0]
    assert 0 < runs[0][3] < runs[0][2]  # drafts accepted and rejected
    del spec._launch
    ahead = spec.overlapped_steps - before[1]
    assert ahead >= 5, ahead
    # every launched step replayed a graph: greedy batches "spec"; the sampled batch
    # "spec_top_p" while a top-p row runs, then "spec_sampled" / "spec"; 4 rows, then fewer
    # padded to the captured sizes, down to 1
    replays = {k: n - before[0].get(k, 0) for k, n in _replays(eng).items()}
    assert sum(replays.values()) == len(launches), (replays, launches)
    ran = {k for k, n in replays.items() if n}
    want = "spec" if params is GREEDY else "spec_top_p"
    assert (4, want) in ran and {1, 4} <= {bs for bs, _ in ran}, ran


def test_a_batch_with_top_k_takes_the_two_graph_step(trained, graphed):  # noqa: F811
    _, prompts = trained
    before = _replays(graphed)
    params = [SamplingParams(temperature=1.0, top_k=5, seed=i, max_tokens=8) for i in range(3)]
    ahead = graphed._overlap.spec.overlapped_steps
    _run(graphed, prompts[:3], params)
    assert graphed._overlap.spec.overlapped_steps > ahead and _replays(graphed) == before


def test_run_step_checks_its_rows(graphed):
    """A sampled graph needs each row's settings, a greedy one takes none: ValueError naming
    the graph's kind otherwise, before anything is copied."""
    ids, starts = torch.tensor([[1, 2]]), torch.zeros(1, dtype=torch.long)
    bt = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="a spec_sampled graph of 1 rows was given rows=None"):
        graphed.runner.spec_graph(1, "spec_sampled").run_step(ids, bt, starts)
    with pytest.raises(ValueError, match="a spec graph of 1 rows was given rows="):
        graphed.runner.spec_graph(1).run_step(ids, bt, starts, [[1.0, 1.0, 0.0, 0.5, 0.5]])
    # one draft: no position limit (the host cuts nothing a sampled verdict of one draft judges)
    with pytest.raises(ValueError, match="accepted 1 rows of 5 settings"):
        graphed.runner.spec_graph(1, "spec_top_p").run_step(ids, bt, starts, [[1.0] * 6])


def test_recapture_keeps_the_whole_step_graphs(graphed, monkeypatch):
    """`ModelRunner.recapture` (after the weights were replaced) captures every whole-step graph
    again, of the same sizes and kinds."""
    old = {k: g for k, g in graphed.runner.graphs.items() if k[2] in SPEC_KINDS}
    monkeypatch.setattr(runner_graphs, "StepGraph", EagerStepGraph)
    monkeypatch.setattr(runner_graphs, "SpecGraph", EagerSpecGraph)
    graphed.runner.recapture()
    new = {k: g for k, g in graphed.runner.graphs.items() if k[2] in SPEC_KINDS}
    assert new.keys() == old.keys() and len(new) == 3 * 3  # sizes 1, 2, 4 x three kinds
    assert all(new[k] is not old[k] and new[k].kind == k[2] for k in new)


THREE_DRAFTS = {
    "greedy": [SamplingParams(temperature=0, max_tokens=14 - 3 * i) for i in range(2)],
    # temperature ~1, drafts often accepted up to the rows' ends, where the device cuts the
    # verdicts at their rooms; the top-p row ends first: "spec_top_p", then "spec_sampled"
    "sampled": [
        SamplingParams(temperature=t, top_p=tp, seed=50 + i, max_tokens=n, ignore_eos=True)
        for i, (t, tp, n) in enumerate([(0.9, 0.9, 13), (1.0, 1, 17), (1.1, 1, 22), (1.0, 1, 9)])
    ],
}


@pytest.mark.parametrize("case", list(THREE_DRAFTS))
def test_three_drafts_a_step_in_one_graph(trained, monkeypatch, request, case):  # noqa: F811
    """Steps of 3 drafts replay graphs of 4 tokens a row, the MTP chain captured with them:
    the two-forward step's outputs, drafts and acceptance, greedy (about half the drafts
    rejected) and sampled (each row's verdict cut on the device at its room as its end
    nears)."""
    model, prompts = trained
    params = THREE_DRAFTS[case]
    if case == "greedy":
        request.getfixturevalue("mixed_drafts")
    kinds = ("spec",) if case == "greedy" else ("spec_sampled", "spec_top_p")  # no greedy row
    prompts = prompts[: len(params)]
    monkeypatch.setattr(runner_graphs, "StepGraph", EagerStepGraph)
    monkeypatch.setattr(runner_graphs, "SpecGraph", EagerSpecGraph)
    eng = _engine(
        model, spec=3, attention="kernel", capture_graphs_at_start=False, prefill_graph_tokens=0
    )
    # the whole-step graphs only: the synchronous steps' decode forwards capture theirs on
    # first use
    eng.runner.use_cuda_graphs = eng.runner.use_mtp_graphs = True
    for bs in (1, 2) if case == "greedy" else (1, 2, 4):
        for kind in kinds:
            assert eng.runner._captured((bs, 4, kind), model.mtp[0], eng.dtype) is not None
    runs = []
    for e in (_engine(model, spec=3), eng):
        drafts = _drafts_by_position(e)
        outs = _run(e, prompts, params)
        first = min(int(rid.rsplit("-", 1)[1]) for rid, _ in drafts)
        by_place = {(int(r.rsplit("-", 1)[1]) - first, st): d for (r, st), d in drafts.items()}
        st = e.drafter.stats
        runs.append((outs, by_place, st.num_draft_tokens, st.num_accepted_tokens))
    assert runs[1] == runs[0]
    assert 0 < runs[0][3] < runs[0][2]
    replays = _replays(eng)
    assert sum(replays.values()) == eng._overlap.spec.launched_steps  # every launched step
    if case == "greedy":
        assert replays[(1, "spec")] and replays[(2, "spec")]  # both rows, then the longer one
    else:
        assert replays[(4, "spec_top_p")] and replays[(1, "spec_sampled")], replays
