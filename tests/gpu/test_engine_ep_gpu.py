"""The expert-parallel engine on CUDA (NCCL): `--ep 1` runs the same lockstep and all-to-all code
as a gang, and its greedy output equals the plain engine's; with 2 GPUs, ep=2 too. Marker gpu;
skipped without CUDA. The process needs PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync before
torch is imported (parallel/distributed.py, init_distributed)."""

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
from moeray.platform.parallel.distributed import CUDA_ENV, init_distributed
from moeray.platform.parallel.serve_ep import ExpertStack
from moeray.platform.parallel.serve_placement import PROJS
from moeray.platform.placement import place_experts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        os.environ.get("PYTORCH_CUDA_ALLOC_CONF") != CUDA_ENV["PYTORCH_CUDA_ALLOC_CONF"],
        reason="needs PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync from the start",
    ),
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
    init_distributed(rank, world, f"tcp://127.0.0.1:{port}", dev)
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


def _rank_placed(rank: int, world: int, port: int, out_dir: str) -> None:
    """As _rank, with a switch to a placement with redundant slots after the gang's third step
    (experts this rank did not hold come from a full CPU copy of the model)."""
    dev = torch.device("cuda", rank)
    init_distributed(rank, world, f"tcp://127.0.0.1:{port}", dev)
    try:
        full = _model("cpu").moe_layers()

        def source(layer: int, ids: list[int], fp8: bool):
            assert not fp8  # the model is bf16
            e = full[layer].experts
            return tuple(ExpertStack(getattr(e, n)[ids]) for n in PROJS)

        engine = ExpertParallelEngine(_model(str(dev)), ECONF, expert_source=source)
        mine = list(range(rank, len(_prompts()), world))
        ids = {engine.add_request(_prompts()[i], _params()): i for i in mine}
        load = torch.ones(len(full), tiny().n_routed_experts)
        load[:, 0] = 20.0  # expert 0 hot: it gets the redundant slots
        c = tiny()
        placement = place_experts(load, c.n_routed_experts + 2 * world, c.n_group, 1, world)
        tokens: dict[int, list[int]] = {}
        steps = 0
        while True:
            for o in engine.step():
                if o.finished:
                    tokens[ids[o.request_id]] = o.output_token_ids
            steps += 1
            if steps == 3:
                engine.placements.stage(1, placement)
            if not engine.gang_busy:
                break
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
