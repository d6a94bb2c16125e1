"""Expert-parallel serving on Ray: a gang of rank actors in a placement group, and `EPServer`, the
Serve deployment shell around the gang's front (`platform/serve/gang.py`; wiring in
`platform/serve/app.py`).

One Serve replica = one gang: the replica (no resources of its own) creates a placement group of N
bundles (gpus/cpus_per_replica each), STRICT_PACK while one node has room for all N, PACK beyond
(spanning nodes), and one EPRank actor per bundle. The actors and the placement group belong to
the replica: when Serve replaces the replica (a failed health check: a rank died), they go with
it. The gang's expert placement is decided by its own RouterActor (actors/router.py), also owned
by the replica: the front sends it the ranks' tokens per expert every placement period and stages
what it decides (RouterPlacement). Ray is imported inside the functions, as in the other shells
(importing moeray never imports Ray).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import torch

from moeray.actors.decode import PrefillFetch
from moeray.actors.logs import log_to_stderr
from moeray.actors.router import get_or_create_router
from moeray.platform.config import ModelConfig, ServeConfig
from moeray.platform.parallel.distributed import GRAPHS_CUDA_ENV, TIMEOUT_ENV
from moeray.platform.routing.live_placement import PlacementPolicy, serving_router_config
from moeray.platform.serve.gang import EPRank, GangFront, RankFailed
from moeray.platform.serve.http.protocol import GenerationRequest, GenerationStep
from moeray.platform.serve.worker import PrefillResult

START_TIMEOUT_S = 600.0  # placement, process group and weight loading of a whole gang
# A router call carries [G, L, E] int64 counters (8 x 58 x 256 for V3 on 8 GPUs: 950 KB) and one
# EPLB solve (tens of ms): seconds mean the router is gone or stuck.
ROUTER_TIMEOUT_S = 30.0
log = logging.getLogger(__name__)


def placement_strategy(bundle: dict[str, float], n: int, nodes: list[dict[str, Any]]) -> str:
    """STRICT_PACK when one alive node's resources hold all n bundles, else PACK (the gang
    spans nodes, still packed as tightly as Ray can)."""
    for node in nodes:
        if not node.get("Alive", True):
            continue
        have = node.get("Resources", {})
        if all(have.get(k, 0.0) >= n * v for k, v in bundle.items() if v):
            return "STRICT_PACK"
    return "PACK"


class RayRank:
    """A rank actor behind the front's RankClient protocol; a dead actor raises RankFailed."""

    def __init__(self, actor: Any, rank: int) -> None:
        self.actor = actor
        self.rank = rank

    def _failed(self, e: Exception) -> RankFailed:
        return RankFailed(f"rank {self.rank} died: {type(e).__name__}")

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[GenerationStep, None]:
        import ray

        gen = self.actor.generate.options(num_returns="streaming").remote(req)
        done = False
        try:
            async for ref in gen:
                try:
                    step = await ref
                except ray.exceptions.RayActorError as e:
                    raise self._failed(e) from e
                yield step
                done = step.finish_reason is not None
        except ray.exceptions.RayActorError as e:
            raise self._failed(e) from e
        finally:
            if not done:
                # Client gone or stop string: cancelling the rank's generator aborts the request
                # there, which frees its KV pages.
                ray.cancel(gen)

    async def prefill(
        self, req: GenerationRequest, export_from: int, dest: Any = None
    ) -> PrefillResult:
        import ray

        try:
            return await self.actor.prefill.remote(req, export_from, dest)
        except ray.exceptions.RayActorError as e:
            raise self._failed(e) from e

    async def free_pages(self) -> int:
        return await self.actor.free_pages.remote()

    async def expert_loads(self) -> dict[str, Any]:
        return await self.actor.expert_loads.remote()

    async def stage_placement(self, version: int, placement: dict[str, Any]) -> dict[str, Any]:
        return await self.actor.stage_placement.remote(version, placement)


class RouterPlacement:
    """The front's PlacementService over the gang's RouterActor: every call has a timeout; a
    router that restarted (it answers {"attached": False}) is re-attached at the placement the
    ranks hold, above every version they may have staged."""

    def __init__(self, actor: Any, policy: PlacementPolicy, timeout_s: float = ROUTER_TIMEOUT_S):
        self.actor = actor
        self.policy = policy
        self.timeout_s = timeout_s
        self._applied: tuple[int, dict[str, Any] | None] = (0, None)  # None: the identity
        self._decided: tuple[int, dict[str, Any]] | None = None  # the newest decision

    async def _call(self, method: Any, *args: Any) -> Any:
        return await asyncio.wait_for(method.remote(*args), self.timeout_s)

    async def report(
        self, step: int, loads_GLE: torch.Tensor, rows_GL: torch.Tensor
    ) -> tuple[int, dict[str, Any]] | None:
        out = await self._call(self.actor.serve_report, step, loads_GLE, rows_GL)
        if not out["attached"]:
            version, state = self._applied
            newest = self._decided[0] if self._decided is not None else version
            await self._call(self.actor.serve_attach, self.policy, max(version, newest), state)
            out = await self._call(self.actor.serve_report, step, loads_GLE, rows_GL)
        if out["placement"] is None:
            return None
        self._decided = (out["version"], out["placement"])
        return self._decided

    async def staged(self, version: int, ok: bool) -> None:
        if ok and self._decided is not None and version == self._decided[0]:
            self._applied = self._decided
        await self._call(self.actor.serve_staged, version, ok)


@dataclass
class Gang:
    placement_group: Any
    actors: list[Any]
    reports: list[dict[str, Any]]
    strategy: str


def start_gang(
    cfg: ServeConfig,
    role: str = "colocated",
    fetch: Any = None,
    timeout_s: float = START_TIMEOUT_S,
) -> Gang:
    """Place and start cfg.ep rank actors of `role` (gang.EPRank); returns when every rank has
    joined the process group and loaded its weights (a RuntimeError naming what did not happen
    within timeout_s)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    n = cfg.ep or 1
    bundle = {"CPU": cfg.cpus_per_replica}
    if cfg.gpus_per_replica:
        bundle["GPU"] = cfg.gpus_per_replica
    strategy = placement_strategy(bundle, n, ray.nodes())
    pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(
            f"no room for an EP gang of {n} x {bundle} ({strategy}) within {timeout_s:.0f} s"
        ) from None
    env = {TIMEOUT_ENV: str(cfg.ep_timeout_s)}
    if cfg.gpus_per_replica:
        env.update(GRAPHS_CUDA_ENV)  # before the rank's first CUDA call (init_distributed checks)
    rank_cls = ray.remote(EPRank)
    # Any: Ray's stubs type an actor method as the plain function (no .remote).
    actors: list[Any] = [
        rank_cls.options(
            num_cpus=cfg.cpus_per_replica,
            num_gpus=cfg.gpus_per_replica,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=i
            ),
            runtime_env={"env_vars": env},
        ).remote(cfg.to_dict(), i, n, role, fetch)
        for i in range(n)
    ]
    try:
        node_id = ray.util.placement_group_table(pg)["bundles_to_node_id"][0]
        host = next(nd["NodeManagerAddress"] for nd in ray.nodes() if nd["NodeID"] == node_id)
        addr = ray.get(actors[0].address.remote(host), timeout=timeout_s)
        reports = ray.get([a.start.remote(f"tcp://{addr}") for a in actors], timeout=timeout_s)
        ray.get([a.freeze_gc.remote() for a in actors], timeout=timeout_s)
    except Exception:
        for a in actors:
            ray.kill(a)
        ray.util.remove_placement_group(pg)
        raise
    return Gang(pg, actors, reports, strategy)


class EPServer:
    """Serve deployment shell: one gang and its front. `role` "colocated", "prefill" or
    "decode" (with `prefill`, the prefill deployment's handle)."""

    def __init__(self, config: dict[str, Any], role: str = "colocated", prefill: Any = None):
        import ray

        log_to_stderr()  # the gang's placement stagings and failures
        cfg = ServeConfig.from_dict(config)
        self.gang = start_gang(cfg, role, PrefillFetch(prefill) if prefill is not None else None)
        placements = None
        self.router: Any = None
        self.router_name: str | None = None
        self.gang_name: str | None = None
        self.placement_period_s = cfg.ep_placement_period_s
        if self.placement_period_s > 0:
            model_config = ModelConfig.from_hf(cfg.model)
            policy = PlacementPolicy(
                num_physical=model_config.n_routed_experts + cfg.ep_redundant_experts,
                maxvio_threshold=cfg.ep_placement_maxvio,
            )
            # One router per gang, named so that tools can find it, and owned by this replica.
            # Its metrics carry the gang's name (role and replica id), as several gangs export.
            self.gang_name = f"{role}-{uuid.uuid4().hex[:12]}"
            self.router_name = f"moeray-ep-router-{self.gang_name}"
            router_cfg = serving_router_config(model_config, cfg.ep or 1, policy)
            self.router = get_or_create_router(
                self.router_name, None, router_cfg, detached=False, gang=self.gang_name
            )
            # Attached before the replica serves: the router's process start (seconds) must not
            # delay the first placement decision past the first requests.
            ray.get(self.router.serve_attach.remote(policy), timeout=START_TIMEOUT_S)
            placements = RouterPlacement(self.router, policy)
        self.front = GangFront(
            [RayRank(a, i) for i, a in enumerate(self.gang.actors)],
            page_size=cfg.page_size,
            max_per_rank=cfg.max_num_seqs + cfg.max_waiting,
            stats_period_s=cfg.routing_stats_period_s,
            placements=placements,
        )
        self.health_timeout_s = max(10.0, cfg.ep_timeout_s)
        self._placement_task: asyncio.Task | None = None

    def _start_placement_loop(self) -> None:
        """The placement loop runs on the replica's event loop, started by the first call that
        runs there (a request or Serve's health check)."""
        if self.front.placements is not None and self._placement_task is None:
            self._placement_task = asyncio.get_running_loop().create_task(self._placement_loop())

    async def _placement_loop(self) -> None:
        while self.front.failure is None:
            await asyncio.sleep(self.placement_period_s)
            try:
                await self.front.update_placement()
            except Exception:  # a rank or the router does not answer: logged, tried next period
                log.exception("expert placement update failed")

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationStep, None]:
        self._start_placement_loop()
        async with aclosing(self.front.generate(request)) as steps:
            async for step in steps:
                yield step

    async def prefill(
        self, request: GenerationRequest, export_from: int, dest: Any = None
    ) -> PrefillResult:
        return await self.front.prefill(request, export_from, dest)

    async def check_health(self) -> None:
        """Serve's health check: every rank answers (a dead rank fails it, and Serve replaces
        the replica, gang included)."""
        self._start_placement_loop()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(a.ping.remote() for a in self.gang.actors)),
                self.health_timeout_s,
            )
        except Exception as e:
            # Requests in flight on the surviving ranks end now (503), not when their
            # collectives time out.
            self.front.fail(f"health check: {type(e).__name__}")
            raise

    async def stats(self) -> dict[str, Any]:
        calls = [a.stats.remote() for a in self.gang.actors]
        if self.router is not None:
            calls.append(self.router.serve_info.remote())
        got = await asyncio.wait_for(asyncio.gather(*calls), self.health_timeout_s)
        ranks, router = got[: len(self.gang.actors)], None
        if self.router is not None:
            router = {"name": self.router_name, "gang": self.gang_name, **got[-1]}
        return {
            "strategy": self.gang.strategy,
            "routed_to": list(self.front.routed_to),
            "placement_version": None if self.router is None else self.front.placement_version,
            "router": router,  # the gang's RouterActor: its placement state (serve_info)
            "ranks": ranks,
        }
