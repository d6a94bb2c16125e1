"""One rank of an expert-parallel serving gang: a full Engine (its own requests, scheduler and paged
latent KV cache: data-parallel attention) over a model whose MoE layers hold this rank's shard of
the routed experts (`parallel/serve_ep.py`).

`step()` is collective: every rank of the gang must call it, work or not, so that the MoE
all-to-alls line up (a rank without work runs empty forwards while its peers run real ones). After
a step `gang_busy` says whether any rank still has requests; `has_unfinished()` is true while it
does, so a loop that steps while there is work keeps this rank stepping for its peers. When the
whole gang is idle, the ranks must still keep calling `step()` now and then (the serving loop does,
`EngineLoop(collective=True)`): a rank that gets a request steps and waits in the lockstep
all-reduce for the others, up to the process group's timeout.

Decode CUDA graphs (GPU): decode forwards exchange tokens by a fixed-size all-gather and
reduce-scatter (`decode_exchange`, see `parallel/serve_ep.py`), so the runner captures them: all
ranks capture the same graphs when the engine starts, replay them together (a rank without work
replays one with padding rows only), and capture them again after a placement switch, which
replaces the expert weights the graphs read.

MTP speculative decoding (`num_speculative_tokens=1`): the MTP module's MoE layer is expert-parallel
too, so its forwards go through the lockstep like the main model's (each round says which module
every rank forwards; a rank without an MTP forward of its own runs an empty one). MTP forwards run
eagerly here, never as CUDA graphs; the main model's decode graphs are captured and replayed as
without MTP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist

from moeray.platform.engine.engine import DEFAULT_PARAMS, Engine, EngineConfig
from moeray.platform.engine.sampler import SamplingParams
from moeray.platform.engine.scheduler import RequestOutput
from moeray.platform.parallel.serve_ep import parallelize_for_serving
from moeray.platform.parallel.serve_placement import ExpertSource, PlacementSwitch


class ExpertParallelEngine(Engine):
    """An Engine over one EP rank of `model` (a plain model, made expert-parallel here).
    `expert_source` reads experts this rank does not hold when a new placement needs them
    (`self.placements.stage`); the gang switches placement between steps. `decode_exchange`
    (serve_ep.DECODE_EXCHANGES, the same on every rank): "auto" gathers decode forwards when the
    gang replays graphs (every forward at ep=1), "gather" always (CPU tests), "all_to_all" never
    (no graphs)."""

    def __init__(
        self,
        model,
        config: EngineConfig,
        *,
        group=None,
        tokenizer=None,
        expert_source: ExpertSource | None = None,
        decode_exchange: str = "auto",
    ):
        self.lockstep = parallelize_for_serving(model, group, decode_exchange)
        # Graphs are captured below, once the runner agrees forwards with the gang; always at
        # start: a capture inside a step would need every rank to capture it in the same round.
        # Decode graphs only: prefill chunks run eagerly in a gang (the runner replays no chunk
        # graph there: its ranks agree each forward's shape first), so none is captured.
        graphs = config.use_cuda_graphs and decode_exchange != "all_to_all"
        super().__init__(
            model,
            dataclasses.replace(
                config,
                use_cuda_graphs=graphs,
                capture_graphs_at_start=False,
                prefill_graph_tokens=0,
            ),
            tokenizer=tokenizer,
        )
        self.runner.gang = self.lockstep
        # MTP forwards run eagerly in a gang (runner module docstring): never capture "mtp" graphs.
        self.runner.use_mtp_graphs = False
        self.lockstep.replay_padding = self.runner.run_padding
        if self.runner.use_cuda_graphs:
            with self.lockstep.graph_capture():
                self.runner.capture_graphs(config.max_num_seqs)
        self.gang_busy = False
        # Every rank leaves step() at the same lockstep round (the one where no rank forwards), so
        # counting step() calls gives one step index for the whole gang; `stats.steps` counts
        # only this rank's non-empty steps and differs between ranks.
        self.gang_steps = 0
        self.last_busy_gang_step = 0  # the last gang step after which some rank had work left
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.placements = PlacementSwitch(model, rank, size, expert_source)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        outs = super().step()
        self.lockstep.ready_version = self.placements.ready_version()
        self.gang_busy = self.lockstep.finish_step(self.scheduler.has_unfinished())
        self.gang_steps += 1
        if self.gang_busy:
            self.last_busy_gang_step = self.gang_steps
        switched = self.placements.switch(self.lockstep.last_round.ready, self.gang_steps)
        if switched and self.runner.graphs:
            with self.lockstep.graph_capture():  # every rank switched after this same step
                self.runner.recapture()
        return outs

    def has_unfinished(self) -> bool:
        return self.gang_busy or self.scheduler.has_unfinished()

    def generate(
        self,
        prompts: Sequence[Sequence[int] | str],
        params: SamplingParams | Sequence[SamplingParams] = DEFAULT_PARAMS,
    ) -> list[RequestOutput]:
        """Run this rank's prompts to completion; collective: every rank calls it (with its own
        prompts, possibly none) and all return together, once no rank has work left."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        final: dict[str, RequestOutput] = {}
        while True:
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
            if not self.gang_busy:
                break
        missing = [i for i in ids if i not in final]
        if missing:
            raise RuntimeError(f"gang idle with unfinished requests {missing}")
        return [final[i] for i in ids]
