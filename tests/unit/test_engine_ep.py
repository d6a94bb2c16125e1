"""Expert-parallel engines (gloo processes, no Ray) give the single-process Engine's greedy output:
each rank serves its own prompts (uneven counts and lengths, one rank with none) while the MoE
layers exchange tokens with all-to-all, or, with decode_exchange="gather", decode forwards take the
fixed-size all-gather + reduce-scatter that decode CUDA graphs replay (prefill chunks stay
all-to-all)."""

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist

from moeray.platform.config import tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.ep import ExpertParallelEngine
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.distributed import init_distributed
from moeray.platform.parallel.serve_ep import (
    Exchange,
    Lockstep,
    Round,
    choose_exchange,
    expert_loads,
    parallelize_for_serving,
)
from tests.spawn_ranks import init_file, spawn

PROMPTS = [
    list(range(3, 40)),  # 37 tokens: two prefill chunks of different lengths with the others
    [5, 9, 2, 77, 31],
    list(range(500, 521)),
    [1000, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    [42],
]
MAX_TOKENS = 10
ECONF = EngineConfig(num_pages=32, page_size=8, max_num_batched_tokens=48, use_cuda_graphs=False)


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny().replace(num_nextn_predict_layers=0))


def _assignment(world: int) -> list[list[int]]:
    """Prompt indices per rank: rank 0 gets most, the last rank none (it only pads)."""
    if world == 1:
        return [list(range(len(PROMPTS)))]
    if world == 2:
        return [[0, 1, 2, 4], [3]]
    return [[0, 1], [2], [3, 4], []]


def _params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _worker(rank: int, world: int, init_file: str, out_dir: str, exchange: str) -> None:
    torch.set_num_threads(1)
    os.environ["MOERAY_DIST_TIMEOUT_S"] = "60"
    init_distributed(rank, world, f"file://{init_file}", torch.device("cpu"))
    try:
        engine = ExpertParallelEngine(_model(), ECONF, decode_exchange=exchange)
        mine = _assignment(world)[rank]
        outs = engine.generate([PROMPTS[i] for i in mine], _params())
        moe = engine.model.moe_layers()[0]
        torch.save(
            {
                "tokens": {i: o.output_token_ids for i, o in zip(mine, outs, strict=True)},
                "experts_held": moe.experts.gate_proj.shape[0],
                "padding_forwards": engine.lockstep.padding_forwards,
                "gathered_forwards": engine.lockstep.gathered_forwards,
                "rounds": engine.lockstep.rounds,
                "expert_loads": expert_loads(engine.model),
                "prefill_graph_tokens": engine.config.prefill_graph_tokens,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference() -> dict[int, list[int]]:
    engine = Engine(_model(), ECONF)
    outs = engine.generate(PROMPTS, _params())
    return {i: o.output_token_ids for i, o in enumerate(outs)}


# ep=4 all-to-all is served over HTTP in tests/ray/test_serve_ep.py; ep=1 gathered is `--ep 1`'s
# decode path on GPU (collectives skipped).
@pytest.mark.parametrize(
    ("world", "exchange"), [(1, "gather"), (2, "auto"), (2, "gather"), (4, "gather")]
)
def test_ep_engine_greedy_equals_single_process(world, exchange, tmp_path, reference):
    args = (world, init_file(tmp_path), str(tmp_path), exchange)
    spawn(_worker, args=args, nprocs=world)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    tokens = {i: t for g in got for i, t in g["tokens"].items()}
    assert sorted(tokens) == list(range(len(PROMPTS)))
    assert tokens == reference
    E = tiny().n_routed_experts
    assert [g["experts_held"] for g in got] == [E // world] * world
    # a gang prefills eagerly: no prefill-chunk graph to capture (ECONF keeps the default 256)
    assert ECONF.prefill_graph_tokens > 0
    assert [g["prefill_graph_tokens"] for g in got] == [0] * world
    # Per-expert loads: every token of every forward (prompt tokens and all generated but the
    # last, which is never fed back) routed to K experts in each MoE layer, summed over the gang.
    c = tiny()
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    tokens = sum(len(p) + MAX_TOKENS - 1 for p in PROMPTS)
    loads = torch.tensor([g["expert_loads"] for g in got]).sum(0)  # [layer, expert]
    assert loads.shape == (moe_layers, E)
    assert loads.sum(1).tolist() == [tokens * c.num_experts_per_tok] * moe_layers
    # The rank with the least work padded with empty forwards while the others ran theirs.
    assert (got[-1]["padding_forwards"] > 0) == (world > 1)
    # "auto" on CPU (no graphs) keeps all-to-all; "gather" gathers the decode forwards only (the
    # rounds of a step's end and the prefill chunks' forwards are not).
    gathered = [g["gathered_forwards"] for g in got]
    if exchange == "auto":
        assert gathered == [0] * world
    else:
        assert len(set(gathered)) == 1 and MAX_TOKENS - 1 <= gathered[0] < got[0]["rounds"]


def test_choose_exchange_replays_graphs_only_when_every_rank_can():
    """The decision table every rank evaluates on the same round (serve_ep.choose_exchange)."""
    # Two ranks decoding 3 and 5 sequences (graphs of 4 and 8), one token each: all replay the
    # graph of 8 (the largest), gathered at 8 rows per rank.
    decode = Round(1, 1, 0, prefill=0, rows=5, graph_batch=8, s_max=1, s_min=1, no_graph=0)
    for mode in ("auto", "gather"):
        assert choose_exchange(decode, mode, 2) == Exchange(True, 8, 8, 1)
    assert choose_exchange(decode, "all_to_all", 2) == Exchange()
    # S = 1 on one rank, 2 on another (graphs are keyed by S), or a rank without the graph for
    # its batch: eager, gathered at the most rows only when asked.
    for r in (
        dataclasses.replace(decode, s_max=2, rows=6),
        dataclasses.replace(decode, no_graph=1),
    ):
        assert choose_exchange(r, "auto", 2) == Exchange()
        assert choose_exchange(r, "gather", 2) == Exchange(True, r.rows)
    # A prefill chunk on any rank: all-to-all, except at ep=1 (the plain MoE, nothing to send).
    prefill = dataclasses.replace(decode, prefill=1, rows=37)
    assert choose_exchange(prefill, "gather", 2) == Exchange()
    assert choose_exchange(prefill, "auto", 1) == Exchange(True, 37)
    assert choose_exchange(prefill, "all_to_all", 1) == Exchange()


def test_bad_decode_exchange_is_refused():
    with pytest.raises(ValueError, match="decode_exchange='graphs': accepted auto, gather"):
        Lockstep(_model(), decode_exchange="graphs")


def _graph_round_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """As in a decode graph replay: rank r forwards B_r real rows padded with garbage rows up to
    the batch the gang agreed on (the runner's graph of 8), through one MoE layer."""
    torch.set_num_threads(1)
    os.environ["MOERAY_DIST_TIMEOUT_S"] = "60"
    init_distributed(rank, world, f"file://{init_file}", torch.device("cpu"))
    try:
        model = _model()
        plain = _model().moe_layers()[0]
        lockstep = parallelize_for_serving(model)
        moe = model.moe_layers()[0]
        B = [3, 5][rank]
        x_BSD = torch.randn(
            8, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(rank)
        )
        # Votes: graphs of 4 and 8 rows; the gang replays the one of 8.
        assert lockstep.before_forward(B, 1, True, [4, 8][rank]) == 8
        with torch.inference_mode():
            y_BSD = moe(x_BSD)  # the padding rows' inputs are garbage, as in a replay
            want_BSD = plain(x_BSD[:B])
        torch.save(
            {
                "close": torch.allclose(y_BSD[:B], want_BSD, atol=1e-5, rtol=1e-5),
                "routed": int(moe.load_E.sum()),
                "computed": int(moe.rows_computed),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_graph_round_masks_the_padding_rows(tmp_path):
    """The gathered exchange at a graph round's shapes (every rank 8 rows, ranks with 3 and 5
    real ones): the real rows equal the single-device MoE's, and padding rows neither count as
    load nor reach an expert."""
    spawn(_graph_round_worker, args=(2, init_file(tmp_path), str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    K = tiny().num_experts_per_tok
    assert [g["close"] for g in got] == [True, True]
    assert [g["routed"] for g in got] == [3 * K, 5 * K]
    assert sum(g["computed"] for g in got) == 8 * K
