"""MTP speculative decoding in expert-parallel engines (gloo processes, no Ray): the MTP module's
MoE layer is expert-parallel too, so its forwards go through the lockstep with the main model's.
Each rank serves its own prompts (uneven counts, one rank with none, whose MTP forwards are all
empty ones) and its greedy output equals the single-process engine's with MTP and without it, for
the gathered and the all-to-all exchange, with one draft a step and (ranks drafting chains of
different lengths in the same step) with three."""

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
from test_engine_ep import PROMPTS, _assignment  # prompts of uneven lengths, one idle rank

from moeray.platform.config import tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.ep import ExpertParallelEngine
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.distributed import init_distributed
from moeray.platform.parallel.serve_ep import ServingEPMoE
from tests.spawn_ranks import init_file, spawn

MAX_TOKENS = 12
ECONF = EngineConfig(num_pages=48, page_size=8, max_num_batched_tokens=48, use_cuda_graphs=False)
MTP_CONF = EngineConfig(
    num_pages=48,
    page_size=8,
    max_num_batched_tokens=48,
    use_cuda_graphs=False,
    num_speculative_tokens=1,
)


def _model() -> Transformer:
    """tiny() with one MTP depth whose input projection passes the next token's embedding only:
    its drafts then track the main model's next prediction often enough that some are accepted
    and some rejected (random weights accept none), so MTP forwards run over 1 and 2 newly valid
    positions per row."""
    torch.manual_seed(0)
    model = Transformer(tiny().replace(num_nextn_predict_layers=1))
    D = model.config.hidden_size
    with torch.no_grad():
        w = model.mtp[0].eh_proj.weight  # [D, 2D] over [enorm(embedding), hnorm(hidden)]
        w.zero_()
        w[:, :D] = torch.eye(D)
    return model


def _params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _worker(
    rank: int, world: int, init_file: str, out_dir: str, exchange: str, drafts: int
) -> None:
    torch.set_num_threads(1)
    os.environ["MOERAY_DIST_TIMEOUT_S"] = "60"
    init_distributed(rank, world, f"file://{init_file}", torch.device("cpu"))
    try:
        conf = dataclasses.replace(MTP_CONF, num_speculative_tokens=drafts)
        engine = ExpertParallelEngine(_model(), conf, decode_exchange=exchange)
        mine = _assignment(world)[rank]
        outs = engine.generate([PROMPTS[i] for i in mine], _params())
        assert engine.drafter is not None
        stats = engine.drafter.stats
        (mtp_moe,) = [m for m in engine.model.mtp[0].modules() if isinstance(m, ServingEPMoE)]
        torch.save(
            {
                "tokens": {i: o.output_token_ids for i, o in zip(mine, outs, strict=True)},
                "mtp_experts_held": mtp_moe.experts.gate_proj.shape[0],
                "drafts": stats.num_draft_tokens,
                "accepted": stats.num_accepted_tokens,
                "mtp_forwards": engine.lockstep.mtp_forwards,
                "padding_forwards": engine.lockstep.padding_forwards,
                "gathered_forwards": engine.lockstep.gathered_forwards,
                "rounds": engine.lockstep.rounds,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def references() -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Greedy tokens of the single-process engine with MTP drafting, and without."""
    got = []
    for conf in (MTP_CONF, ECONF):
        outs = Engine(_model(), conf).generate(PROMPTS, _params())
        got.append({i: o.output_token_ids for i, o in enumerate(outs)})
    return got[0], got[1]


@pytest.mark.parametrize(
    ("world", "exchange", "drafts"),
    [
        (2, "gather", 1),
        (2, "all_to_all", 1),
        (4, "gather", 1),
        (4, "all_to_all", 1),
        (2, "gather", 3),
    ],
)
def test_ep_mtp_greedy_equals_single_process(world, exchange, drafts, tmp_path, references):
    with_mtp, without_mtp = references
    assert with_mtp == without_mtp  # speculation does not change greedy output
    args = (world, init_file(tmp_path), str(tmp_path), exchange, drafts)
    spawn(_worker, args=args, nprocs=world)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    tokens = {i: t for g in got for i, t in g["tokens"].items()}
    assert sorted(tokens) == list(range(len(PROMPTS)))
    assert tokens == with_mtp
    assert tokens == without_mtp
    E = tiny().n_routed_experts
    assert [g["mtp_experts_held"] for g in got] == [E // world] * world  # the MTP MoE is sharded
    # Every rank with requests drafted; every rank ran MTP forwards (the last rank's include
    # empty ones, at ep=4 only empty ones), as many as each of its peers: one per MTP round.
    for g, mine in zip(got, _assignment(world), strict=True):
        assert (g["drafts"] > 0) == bool(mine)
    accepted, drafts = sum(g["accepted"] for g in got), sum(g["drafts"] for g in got)
    assert 0 < accepted < drafts  # both verify outcomes, so MTP rows of 1 and 2 positions
    assert len({g["mtp_forwards"] for g in got}) == 1 and got[0]["mtp_forwards"] > 0
    assert got[-1]["padding_forwards"] > 0
    gathered = [g["gathered_forwards"] for g in got]
    if exchange == "all_to_all":
        assert gathered == [0] * world
    else:
        assert len(set(gathered)) == 1 and gathered[0] > 0
