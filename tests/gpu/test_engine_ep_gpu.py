"""The expert-parallel engine on CUDA (NCCL): `--ep 1` runs the same lockstep and all-to-all code
as a gang, and its greedy output equals the plain engine's; with 2 GPUs, ep=2 too. Marker gpu;
skipped without CUDA. Ranks start with GRAPHS_CUDA_ENV (torch's caching allocator: decode graphs
capture Triton kernels, parallel/distributed.py)."""

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeray.platform.config import tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.ep import ExpertParallelEngine
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.distributed import GRAPHS_CUDA_ENV, init_distributed
from moeray.platform.parallel.serve_ep import ExpertStack
from moeray.platform.parallel.serve_placement import PROJS
from moeray.platform.placement import place_experts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
ECONF = EngineConfig(page_size=16, num_pages=64, max_model_len=256, enable_prefix_caching=False)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 1024, (n,), generator=g).tolist() for n in (3, 70, 129, 16)]


def _model(device: str) -> Transformer:
    model = Transformer(tiny().replace(eos_token_id=None, num_nextn_predict_layers=0))
    model.reset_parameters(seed=5)
    with torch.no_grad():  # wide logit margins: greedy choices robust to rounding
        model.lm_head.weight.mul_(30.0)
    return model.to(device, torch.float32)


def _params() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain() -> list[list[int]]:
    return [
        o.output_token_ids for o in Engine(_model("cuda"), ECONF).generate(_prompts(), _params())
    ]


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    dev = torch.device("cuda", rank)
    init_distributed(rank, world, f"tcp://127.0.0.1:{port}", dev, GRAPHS_CUDA_ENV)
    try:
        engine = ExpertParallelEngine(_model(str(dev)), ECONF)
        mine = list(range(rank, len(_prompts()), world))
        outs = engine.generate([_prompts()[i] for i in mine], _params())
        torch.save(
            {i: o.output_token_ids for i, o in zip(mine, outs, strict=True)}, f"{out_dir}/{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def _gang_outputs(fn, world: int, tmp_path, n: int) -> list[list[int]]:
    """Run fn on `world` spawned ranks; every prompt's tokens, gathered from the ranks' files."""
    mp.spawn(fn, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    got: dict[int, list[int]] = {}
    for r in range(world):
        got.update(torch.load(tmp_path / f"{r}.pt"))
    return [got[i] for i in range(n)]


@pytest.mark.parametrize("world", [1, 2])
def test_ep_engine_on_nccl_equals_the_plain_engine(world, tmp_path):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    expected = _plain()
    assert _gang_outputs(_rank, world, tmp_path, len(expected)) == expected


def _source_from(full: list):
    """An ExpertSource reading experts from the MoE layers of a full CPU copy of the model."""

    def source(layer: int, ids: list[int], fp8: bool):
        assert not fp8  # the models here are not FP8
        e = full[layer].experts
        return tuple(ExpertStack(getattr(e, n)[ids]) for n in PROJS)

    return source


def _generate_switching(
    engine: ExpertParallelEngine, rank: int, world: int, layers: int
) -> tuple[dict[int, list[int]], int]:
    """Generate this rank's prompts, staging a placement with two redundant slots per rank for a
    hot expert 0 after the gang's third step. -> (tokens by prompt index, graph replays by then)."""
    mine = list(range(rank, len(_prompts()), world))
    ids = {engine.add_request(_prompts()[i], _params()): i for i in mine}
    load = torch.ones(layers, tiny().n_routed_experts)
    load[:, 0] = 20.0  # expert 0 hot: it gets the redundant slots
    c = tiny()
    placement = place_experts(load, c.n_routed_experts + 2 * world, c.n_group, 1, world)
    tokens: dict[int, list[int]] = {}
    steps = replayed = 0
    while True:
        for o in engine.step():
            if o.finished:
                tokens[ids[o.request_id]] = o.output_token_ids
        steps += 1
        if steps == 3:
            engine.placements.stage(1, placement)
            replayed = engine.lockstep.graph_forwards
        if not engine.gang_busy:
            return tokens, replayed


def _rank_placed(rank: int, world: int, port: int, out_dir: str) -> None:
    """As _rank, with a switch to a placement with redundant slots after the gang's third step
    (experts this rank did not hold come from a full CPU copy of the model)."""
    dev = torch.device("cuda", rank)
    init_distributed(rank, world, f"tcp://127.0.0.1:{port}", dev, GRAPHS_CUDA_ENV)
    try:
        full = _model("cpu").moe_layers()
        engine = ExpertParallelEngine(_model(str(dev)), ECONF, expert_source=_source_from(full))
        tokens, _ = _generate_switching(engine, rank, world, len(full))
        assert [v for v, _ in engine.placements.switches] == [1]
        torch.save(tokens, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_ep_engine_switching_placement_on_nccl_equals_the_plain_engine(world, tmp_path):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    expected = _plain()
    assert _gang_outputs(_rank_placed, world, tmp_path, len(expected)) == expected


# Decode CUDA graphs under EP need the fused (half-precision) MoE: the fp32 one reads counts back.
GRAPH_ECONF = dataclasses.replace(ECONF, max_num_seqs=8)


def _bf16(device: str) -> Transformer:
    return _model(device).to(torch.bfloat16)


def _rank_graphs(rank: int, world: int, port: int, out_dir: str) -> None:
    """A bf16 gang whose decode forwards replay captured graphs; after its third step it switches
    to a placement with two redundant slots per rank, which captures the graphs again."""
    dev = torch.device("cuda", rank)
    init_distributed(rank, world, f"tcp://127.0.0.1:{port}", dev, GRAPHS_CUDA_ENV)
    try:
        full = _bf16("cpu").moe_layers()
        engine = ExpertParallelEngine(
            _bf16(str(dev)), GRAPH_ECONF, expert_source=_source_from(full)
        )
        status = engine.runner.graph_status
        before = list(engine.runner.graphs.values())  # held: ids of freed objects can recur
        tokens, replayed_before_switch = _generate_switching(engine, rank, world, len(full))
        after = list(engine.runner.graphs.values())
        kept = sum(any(g is h for h in after) for g in before)
        torch.save(
            {
                "tokens": tokens,
                "status": (status, engine.runner.graph_status),
                "graphs": (len(before), len(after), kept),
                "kinds": sorted({k[2] for k in engine.runner.graphs}),
                "replays": (replayed_before_switch, engine.lockstep.graph_forwards),
                "switches": [v for v, _ in engine.placements.switches],
            },
            f"{out_dir}/{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_ep_engine_replays_decode_graphs_and_equals_the_plain_engine(world, tmp_path, monkeypatch):
    """ep=1 (and ep=2 on 2 GPUs): the gang captures its decode graphs at start (the gathered
    exchange), decode graphs only, replays them, captures them again after a placement switch
    mid-stream (to two redundant slots per rank), and its greedy output equals the plain bf16
    engine's (with its own decode graphs). The plain reference computes what the gang's layers do:
    eager prefill chunks (the gang replays no chunk graph: they would take MLA's absorbed path)
    and shared experts outside the fused MoE (model/shared_fuse.py fuses plain MoE layers only;
    its fp32 sum parted the bf16 tokens from the gang's), the post-attention norm apart from the
    router (kernels/norm_router.py, plain MoE layers only: its sum of squares runs in another
    order). So at ep=1 the tokens are exact."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    with monkeypatch.context() as m:
        m.setenv("MOERAY_FUSED_SHARED", "0")
        m.setenv("MOERAY_FUSED_NORM_ROUTER", "0")
        plain = Engine(_bf16("cuda"), dataclasses.replace(GRAPH_ECONF, prefill_graph_tokens=0))
        expected = [o.output_token_ids for o in plain.generate(_prompts(), _params())]
    assert plain.runner.graph_status == "captured"
    mp.spawn(_rank_graphs, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    tokens = {i: t for g in got for i, t in g["tokens"].items()}
    assert [tokens[i] for i in range(len(expected))] == expected
    for g in got:
        assert g["status"] == ("captured", "captured")  # at start and after the switch
        n_before, n_after, kept = g["graphs"]
        assert n_before == n_after > 0 and kept == 0  # every graph captured again
        assert g["kinds"] == ["main"]  # no MTP or prefill-chunk graph in a gang
        assert g["switches"] == [1]
        first, total = g["replays"]
        assert 0 < first < total  # decode steps replayed graphs before and after the switch
