"""Live expert placement in an expert-parallel serving gang (gloo processes, no Ray): a placement
with redundant experts, staged on the ranks at different steps, is switched in by all ranks at the
same step in the middle of a stream (new experts read from the checkpoint files), and the greedy
output stays the single-process engine's, token for token. The controller replicates a hot
expert and the GPU MaxVio drops; the gang's RouterActor owns it (the front sends the ranks'
counts there and stages what it decides), and a restarted router is re-attached where the gang
is."""

import asyncio
import logging
import os

import pytest
import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from moeray.actors.ep import RouterPlacement
from moeray.actors.router import RouterActor
from moeray.platform.checkpoint import load_model, save_model
from moeray.platform.config import tiny
from moeray.platform.engine.engine import Engine, EngineConfig
from moeray.platform.engine.ep import ExpertParallelEngine
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.metrics import (
    EXPERT_LOAD,
    GPU_LOAD,
    PLACEMENT_CHANGES,
    PLACEMENT_MAXVIO,
    Metrics,
)
from moeray.platform.model.transformer import Transformer
from moeray.platform.parallel.distributed import init_distributed
from moeray.platform.parallel.expert import enable_expert_parallel
from moeray.platform.parallel.serve_ep import ServingEPMoE, rows_computed
from moeray.platform.parallel.serve_placement import PlacementSwitch
from moeray.platform.placement import Placement, identity_placement, place_experts
from moeray.platform.rank_weights import CheckpointExperts, load_rank_model
from moeray.platform.routing.live_placement import (
    PlacementController,
    PlacementPolicy,
    serving_router_config,
)
from moeray.platform.serve.gang import GangFront, LocalPlacement
from tests.spawn_ranks import init_file, spawn

CONFIG = tiny().replace(num_nextn_predict_layers=0)
PROMPTS = [list(range(3, 40)), [5, 9, 2, 77, 31], list(range(500, 521)), [42]]
MINE = [[0, 1], [2, 3]]  # prompt indices per rank
MAX_TOKENS = 10
ECONF = EngineConfig(num_pages=32, page_size=8, max_num_batched_tokens=48, use_cuda_graphs=False)
# Engine steps after which each rank stages placement v1 and v2 (ranks stage at different steps;
# the gang switches once the later one has it).
STAGE_AT = [{2: 1, 6: 2}, {4: 1, 6: 2}]
L_MOE = CONFIG.num_hidden_layers - CONFIG.first_k_dense_replace
E = CONFIG.n_routed_experts


def _params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _skewed(hot: int) -> torch.Tensor:
    """[L, E] loads with expert `hot` taking 12x an ordinary expert's tokens."""
    load = torch.full((L_MOE, E), 10, dtype=torch.int64)
    load[:, hot] = 120
    return load


def _placements():
    """v1: 18 slots (two redundant) for a hot expert 1 (held by rank 0 at the start); v2: back to
    16 slots, hot expert 12 (moves experts between ranks again)."""
    return {
        1: place_experts(_skewed(1), 18, CONFIG.n_group, 1, 2),
        2: place_experts(_skewed(12), 16, CONFIG.n_group, 1, 2),
    }


def _worker(
    rank: int, world: int, model_dir: str, init_file: str, out_dir: str, fp8: bool, exchange: str
) -> None:
    torch.set_num_threads(1)
    os.environ["MOERAY_DIST_TIMEOUT_S"] = "60"
    init_distributed(rank, world, f"file://{init_file}", torch.device("cpu"))
    try:
        _cfg, model, _report = load_rank_model(model_dir, rank, world, keep_fp8=fp8)
        source = CheckpointExperts(model_dir, model)
        engine = ExpertParallelEngine(model, ECONF, expert_source=source, decode_exchange=exchange)
        placements = _placements()
        ids = {engine.add_request(PROMPTS[i], _params()): i for i in MINE[rank]}
        tokens: dict[int, list[int]] = {}
        step = 0
        while True:
            for o in engine.step():
                if o.finished:
                    tokens[ids[o.request_id]] = o.output_token_ids
            step += 1
            if step in STAGE_AT[rank]:
                v = STAGE_AT[rank][step]
                engine.placements.stage(v, placements[v])
            if not engine.gang_busy:
                break
        moe = [m for m in engine.model.modules() if isinstance(m, ServingEPMoE)]
        torch.save(
            {
                "tokens": tokens,
                "switches": engine.placements.switches,
                "held": [m.held_experts() for m in moe],
                "slots": [m.experts.gate_proj.shape[0] for m in moe],
                "bytes_read": source.stats.bytes,
                "routed": [int(m.load_E.sum()) for m in moe],
                "rows": rows_computed(engine.model),
                "steps": step,
                "gathered": engine.lockstep.gathered_forwards,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    save_model(Transformer(CONFIG), CONFIG, d)
    return d


@pytest.mark.parametrize(
    ("fp8", "exchange"),
    [(False, "auto"), (True, "auto"), (False, "gather")],
    ids=["fp32", "fp8-experts", "fp32-gather"],
)
def test_placement_switch_mid_stream_keeps_greedy_output(model_dir, tmp_path, fp8, exchange):
    """fp8-experts: the checkpoint is written in the official FP8 format and the ranks keep it
    e4m3 (moved experts carry their block scales); the reference keeps it too. fp32-gather: decode
    forwards take the fixed-size gathered exchange (what decode graphs replay), across both
    switches and the redundant slots of v1."""
    if fp8:
        _cfg, plain = load_model(model_dir)
        model_dir = tmp_path / "fp8"
        save_model(plain, CONFIG, model_dir, fp8=True)
    _cfg, full = load_model(model_dir, keep_fp8=fp8)
    reference = Engine(full, ECONF).generate(PROMPTS, _params())
    args = (2, str(model_dir), init_file(tmp_path), str(tmp_path), fp8, exchange)
    spawn(_worker, args=args, nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    tokens = {i: t for g in got for i, t in g["tokens"].items()}
    assert tokens == {i: o.output_token_ids for i, o in enumerate(reference)}
    assert (got[0]["gathered"] > 0) == (exchange == "gather")
    # Both ranks switched to v1 and v2 after the same steps, v1 only once rank 1 had staged it
    # (after its step 4), both before the streams ended.
    assert got[0]["switches"] == got[1]["switches"]
    (v1, s1), (v2, s2) = got[0]["switches"]
    assert (v1, v2) == (1, 2) and 4 <= s1 < s2 < got[0]["steps"]
    final = _placements()[2]
    for r, g in enumerate(got):
        assert g["slots"] == [8] * L_MOE
        assert g["held"] == [
            final.phy2log_LP[i, r * 8 : (r + 1) * 8].tolist() for i in range(L_MOE)
        ]
        assert g["bytes_read"] > 0  # experts taken over were read from the checkpoint files
    # Every (token, expert) row some rank routed was computed exactly once, replicas or not.
    routed = [sum(g["routed"][i] for g in got) for i in range(L_MOE)]
    assert [sum(g["rows"][i] for g in got) for i in range(L_MOE)] == routed
    # v1 held a hot expert's replicas on both ranks (the placement the stream crossed).
    v1p = _placements()[1]
    assert int(v1p.logcnt_LE[:, 1].min()) >= 2
    slot_rank = v1p.gpu_of_slot()
    for i in range(L_MOE):
        assert set(slot_rank[v1p.phy2log_LP[i] == 1].tolist()) == {0, 1}


def test_controller_replicates_hot_expert_and_maxvio_drops(caplog):
    caplog.set_level(logging.INFO, logger="moeray.platform.routing.live_placement")
    policy = PlacementPolicy(num_physical=18, maxvio_threshold=0.2, min_interval_steps=50)
    c = PlacementController.for_model(CONFIG, 2, policy)
    # The ranks report cumulative counters; the controller takes the difference per window.
    balanced = torch.full((L_MOE, E), 10, dtype=torch.int64)
    hot = balanced.clone()
    hot[:, 3] = 400  # expert 3 (rank 0's at the start) gets 40x an ordinary expert's tokens
    seen = [balanced.clone(), balanced.clone()]
    assert c.report(10, seen) is None  # balanced: below the threshold
    assert float(c.gpu_maxvio_L().max()) == 0.0
    new, step = None, 10
    while new is None and step < 100:
        step += 10
        seen = [seen[0] + hot, seen[1] + balanced]
        new = c.report(step, seen, [torch.full((L_MOE,), step), torch.full((L_MOE,), 2 * step)])
    assert new is not None and c.version == 1 and c.placement is new
    (change,) = [r.getMessage() for r in caplog.records if "expert placement v1" in r.getMessage()]
    assert f"at step {step}: GPU MaxVio" in change and "18 slots" in change
    assert bool((new.logcnt_LE[:, 3] >= 2).all())  # the hot expert got a replica
    unplaced = identity_placement(L_MOE, E, 2)
    assert float(c.gpu_maxvio_L().max()) < 0.2 < float(c.gpu_maxvio_L(unplaced).max())
    # Within min_interval_steps no new placement, whatever the load.
    seen = [seen[0] + hot * 5, seen[1]]
    rows = [torch.full((L_MOE,), step + 30), torch.full((L_MOE,), 2 * step + 10)]
    assert c.report(step + 10, seen, rows) is None and c.version == 1
    # Every series carries the gang that exported it (a gang's router sets it: actors/ep.py).
    gang = {"gang": "decode-0a1b"}
    m = Metrics("prometheus", registry=CollectorRegistry(), default_labels=gang)
    c.export(m)
    r = m.registry
    assert r.get_sample_value(PLACEMENT_CHANGES.name + "_total", gang) == 1.0
    # GPU load: the rows each rank reported computing in the last window (30 and 10).
    assert r.get_sample_value(GPU_LOAD.name, {**gang, "layer": "1", "gpu": "0"}) == 30
    assert r.get_sample_value(GPU_LOAD.name, {**gang, "layer": "1", "gpu": "1"}) == 10
    assert r.get_sample_value(PLACEMENT_MAXVIO.name, {**gang, "layer": "1"}) == pytest.approx(0.5)
    assert (
        r.get_sample_value(EXPERT_LOAD.name, {**gang, "layer": "1", "expert": "3"}) == 400 * 5
    )  # the last window


def test_bad_placements_are_refused():
    with pytest.raises(ValueError, match="maxvio_threshold"):
        PlacementPolicy(num_physical=16, maxvio_threshold=-1)
    c = PlacementController.for_model(CONFIG, 2, PlacementPolicy(num_physical=16))
    with pytest.raises(ValueError, match="counts have shape \\(3, 3\\)"):
        c.report(0, [torch.zeros(3, 3)])
    with pytest.raises(ValueError, match=r"policy num_physical=18, load_ema=0\.9 differ"):
        PlacementController(c.router, PlacementPolicy(num_physical=18))


def test_staging_refuses_what_the_rank_cannot_apply():
    """Single process (no collective runs): the checks of PlacementSwitch.stage and .switch."""
    model = Transformer(CONFIG)
    enable_expert_parallel(model, None, 0, 2, ServingEPMoE)
    switch = PlacementSwitch(model, 0, 2, source=None)
    with pytest.raises(ValueError, match="over 1 GPUs; this gang has 2 MoE layers over ep=2"):
        switch.stage(1, identity_placement(L_MOE, E, 1))
    with pytest.raises(ValueError, match="no weight source"):
        switch.stage(1, place_experts(_skewed(12), 18, CONFIG.n_group, 1, 2))
    report = switch.stage(1, identity_placement(L_MOE, E, 2))  # copies only
    assert (report.loaded_experts, report.copied_experts) == (0, L_MOE * E // 2)
    with pytest.raises(ValueError, match="must be newer"):
        switch.stage(1, identity_placement(L_MOE, E, 2))
    assert switch.ready_version() == 1 and switch.version == 0
    with pytest.raises(RuntimeError, match="never staged"):
        switch.switch(2, step=7)
    assert switch.switch(1, step=7) and switch.switches == [(1, 7)]
    assert not switch.switch(1, step=8)


def test_fp8_experts_move_with_their_block_scales(tmp_path):
    """A rank that keeps an FP8 checkpoint's experts in e4m3 stages a placement whose new experts
    are read from the checkpoint as e4m3 with their 128x128 block scales: after the switch every
    slot holds exactly its logical expert's stored bytes and scales (copied or read)."""
    torch.manual_seed(0)
    save_model(Transformer(CONFIG), CONFIG, tmp_path, fp8=True)
    _cfg, full = load_model(tmp_path, keep_fp8=True)
    _cfg, model, _report = load_rank_model(tmp_path, 0, 2, keep_fp8=True)
    source = CheckpointExperts(tmp_path, model)
    enable_expert_parallel(model, None, 0, 2, ServingEPMoE)
    switch = PlacementSwitch(model, 0, 2, source)
    placement = _placements()[2]  # hot expert 12 (rank 1's): rank 0 takes experts it lacks
    report = switch.stage(1, placement)
    assert report.loaded_experts > 0 and source.stats.bytes > 0
    assert switch.switch(1, step=1)
    for i, (moe, ref) in enumerate(zip(switch.layers, full.moe_layers(), strict=True)):
        held = moe.held_experts()
        assert held == placement.phy2log_LP[i, : len(held)].tolist()
        for name in ("gate_proj", "up_proj", "down_proj"):
            got, want = getattr(moe.experts, name), getattr(ref.experts, name)[held]
            assert got.dtype == torch.float8_e4m3fn
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (i, name)
            scales = getattr(ref.experts, f"{name}_scale_inv")[held]
            assert torch.equal(getattr(moe.experts, f"{name}_scale_inv"), scales), (i, name)
    bf16 = tmp_path.parent / f"{tmp_path.name}-bf16"
    save_model(Transformer(CONFIG), CONFIG, bf16)
    with pytest.raises(ValueError, match=r"stored as torch\.float32, not FP8"):
        CheckpointExperts(bf16, model)(0, [0], fp8=True)


class _FakeRank:
    """A gang rank's placement side: cumulative counters, and staging that may fail."""

    def __init__(self) -> None:
        self.steps = 0
        self.loads = torch.zeros(L_MOE, E, dtype=torch.int64)
        self.staged: list[int] = []
        self.fail = False

    async def expert_loads(self) -> dict:
        return {"steps": self.steps, "loads": self.loads.tolist(), "rows": [0] * L_MOE}

    async def stage_placement(self, version: int, placement: dict) -> dict:
        if self.fail:
            raise RuntimeError("rank gone")
        self.staged.append(version)
        return {"version": version}


def test_front_stages_new_placements_and_keeps_the_applied_one_when_staging_fails():
    policy = PlacementPolicy(num_physical=18, maxvio_threshold=0.2, min_interval_steps=10)
    ranks = [_FakeRank(), _FakeRank()]
    controller = PlacementController.for_model(CONFIG, 2, policy)
    front = GangFront(ranks, page_size=16, max_per_rank=4, placements=LocalPlacement(controller))
    applied = controller.placement
    for r in ranks:
        r.steps, r.loads = 5, _skewed(1)
    ranks[1].fail = True
    with pytest.raises(RuntimeError, match="rank gone"):
        asyncio.run(front.update_placement())
    assert controller.placement is applied and ranks[0].staged == [1]
    ranks[1].fail = False
    for r in ranks:
        r.steps, r.loads = 20, r.loads + _skewed(1)
    assert asyncio.run(front.update_placement()) == 2
    assert ranks[0].staged == [1, 2] and ranks[1].staged == [2]
    assert int(controller.placement.logcnt_LE[:, 1].min()) >= 2
    assert controller.applied is controller.placement and front.placement_version == 2


class _Handle:
    """A RouterActor in this process behind a Ray handle's call shape (`h.method.remote(...)`);
    `actor` can be swapped for a fresh one, as a restarted actor is."""

    def __init__(self, actor: RouterActor) -> None:
        self.actor = actor
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        handle = self

        class _Method:
            @staticmethod
            async def remote(*args):
                handle.calls.append(name)
                return getattr(handle.actor, name)(*args)

        return _Method


@pytest.fixture
def moeray_logger():
    """RouterActor sends the moeray loggers to stderr (its process is an actor's); undo it."""
    logger = logging.getLogger("moeray")
    level, handlers = logger.level, list(logger.handlers)
    # An earlier test's RouterActor left a handler bound to that test's stderr: start without it.
    logger.handlers[:] = [h for h in handlers if not getattr(h, "moeray_stderr", False)]
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers


def test_the_router_actor_decides_and_a_restarted_one_is_reattached(moeray_logger, capsys):
    policy = PlacementPolicy(num_physical=18, maxvio_threshold=0.2, min_interval_steps=10)
    config = serving_router_config(CONFIG, 2, policy)
    router = _Handle(RouterActor(config))
    ranks = [_FakeRank(), _FakeRank()]
    front = GangFront(
        ranks, page_size=16, max_per_rank=4, placements=RouterPlacement(router, policy, 5.0)
    )
    for r in ranks:
        r.steps, r.loads = 5, _skewed(1)
    assert asyncio.run(front.update_placement()) == 1
    # Not attached yet: the front attached the router at the identity, version 0, then reported.
    assert router.calls == ["serve_report", "serve_attach", "serve_report", "serve_staged"]
    info = router.actor.serve_info()
    assert info["version"] == 1 and info["reports"] == 1
    assert info["tokens_seen"] == 2 * int(_skewed(1).sum())  # both ranks' counts reached it
    v1 = Placement.from_state_dict(router.actor.placement())
    assert int(v1.logcnt_LE[:, 1].min()) >= 2 and ranks[0].staged == ranks[1].staged == [1]
    assert "INFO moeray.platform.routing.live_placement: expert placement v1 at step 5" in (
        capsys.readouterr().err
    )
    # A restarted router has no gang attached: the front re-attaches it at v1, as the ranks
    # hold it, so it measures MaxVio against v1 and numbers the next placement 2.
    router.actor = RouterActor(config)
    for r in ranks:
        r.steps, r.loads = 30, r.loads + 20 * _skewed(12)
    router.calls.clear()
    assert asyncio.run(front.update_placement()) == 2
    assert router.calls[:3] == ["serve_report", "serve_attach", "serve_report"]
    assert ranks[0].staged == [1, 2] and router.actor.serve_info()["version"] == 2
    # Staging fails on a rank: the router drops v3 and its placement is v2 again.
    v2 = router.actor.placement()
    ranks[1].fail = True
    for r in ranks:
        r.steps, r.loads = 60, r.loads + 200 * _skewed(5)
    with pytest.raises(RuntimeError, match="rank gone"):
        asyncio.run(front.update_placement())
    assert router.calls[-1] == "serve_staged" and router.actor.serve_info()["version"] == 3
    assert torch.equal(router.actor.placement()["phy2log_LP"], v2["phy2log_LP"])
    assert front.placement_version == 2
