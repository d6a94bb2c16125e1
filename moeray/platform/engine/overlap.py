"""Async scheduling: decode step N+1 is scheduled and launched before step N's sampled ids are read
back, so the host's work around a step (scheduling, input building, the graph launch, then the
scheduler's update and outputs) runs while the GPU computes instead of between its steps.

The engine reads each step's ids back before it schedules the next; on an H200 that host time is
0.3-0.6 ms a batch-1 step and 1.3-2.7 ms at batch 64 (13-20% of the step), all of it with the GPU
idle (`moeray bench engine`'s decode_host_phases_ms; benchmarks/notes-engine.md). vLLM (async
scheduling) and SGLang (the overlap scheduler) run the host one step ahead the same way.

One step in flight (`_Pending`): its sampled ids stay on the device, where the next step's decode
graph reads them (`ModelRunner.execute(ids_on_device=...)`), and their copy to the host completes
behind the next forward. The scheduler holds each in-flight token's place with `PENDING`
(`Scheduler.advance`) and fills it in one step later (`Scheduler.resolve`, the stop checks and
outputs of `update`), so `Engine.step` returns each step's outputs one call late. A request that
stops on a token found at resolve (EOS, a stop id or string) had one more decode in flight: that
token is dropped. Only plain greedy decodes overlap (and sampled ones with
`EngineConfig.async_scheduling_sampled`: the sampler draws their uniforms at launch and reads
nothing back): a step with a prefill, a waiting or preempted request, drafts, logprobs, logits
processing, a grammar or a KV export runs as before, after the step in flight is resolved
("drained"). A request added with its prefill done elsewhere (`Engine.add_prefilled_request`, the
decode side of prefill/decode disaggregation) joins the next step without a drain: its known
token goes up beside the gathered ids. A request whose in-flight token is its last by
max_tokens or max_model_len is left out of the next step (`Scheduler.ends_in_flight`) while the
rest go on overlapping; the step drains only when all of them end so.
Outputs equal the synchronous engine's token for token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from moeray.platform.engine.scheduler import PENDING, Request, RequestOutput, SchedulerOutput


@dataclass
class _Pending:
    """A launched step of decodes: its schedule, its sampled ids on the device, their copy to
    the host (pinned on CUDA) and the event after that copy (None on CPU)."""

    output: SchedulerOutput
    tokens_B: torch.Tensor
    host_B: torch.Tensor
    copied: torch.cuda.Event | None
    launched_at: float


def _overlaps(req: Request, sampled: bool) -> bool:
    """Whether a request's decode can run one step ahead: greedy (or sampled, with `sampled`:
    `EngineConfig.async_scheduling_sampled`), nothing read per step but its token (no logprobs,
    no logits processing), no grammar."""
    p = req.params
    return (
        (p.greedy or sampled)
        and p.logprobs is None
        and not p.processes_logits
        and p.structured is None
        and req.generator is not None
    )


def _joins(req: Request) -> bool:
    """Whether a running request the step in flight did not run can join the next one: a
    one-token decode of a known token (one added by `add_prefilled_request` meanwhile)."""
    return req.token_ids[-1] != PENDING and len(req.token_ids) - req.num_computed == 1


class DecodeOverlap:
    """Runs an engine's steps with async scheduling (`EngineConfig.async_scheduling`); `step`
    takes the place of `Engine.step`'s body."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine  # the Engine that owns this (typed loosely: engine.py imports us)
        engine.runner.pin_inputs = engine.device.type == "cuda"
        self.sampled = bool(engine.config.async_scheduling_sampled)
        self.pending: _Pending | None = None
        self.overlapped_steps = 0  # steps launched while another was in flight
        self.drained_steps = 0  # calls that resolved the step in flight without launching one

    def step(self) -> list[RequestOutput]:
        eng, sched = self.engine, self.engine.scheduler
        if self.pending is not None:
            if not self._can_continue(self.pending):
                return self._drain()
            out = sched.schedule()
            prev = self.pending
            if out.preempted or not self._plain(out):  # _can_continue rules both out
                raise RuntimeError("async scheduling: the next step is not the in-flight one's")
            self.pending = self._launch(out, self._next_ids(prev, out))
            sched.advance(out)
            self.overlapped_steps += 1
            return self._resolve(prev)
        out = sched.schedule()
        if not out.preempted and self._plain(out) and not sched.finished_at_schedule:
            self.pending = self._launch(out, None)
            sched.advance(out)
            return []
        return eng._step_scheduled(out)

    def _next_ids(self, prev: _Pending, out: SchedulerOutput) -> torch.Tensor:
        """The input ids of a step launched while `prev` is in flight, in its row order: prev's
        sampled ids for the rows it ran, gathered on the device, and the known last token of a
        request that joined since (one added with its prefill done elsewhere) after them; index
        and token uploads, no read-back: the host never waits for them here."""
        eng = self.engine
        pin = eng.device.type == "cuda"
        rows = {s.request.request_id: i for i, s in enumerate(prev.output.scheduled)}
        src, joined, idx = prev.tokens_B, list[int](), list[int]()
        for s in out.scheduled:
            i = rows.get(s.request.request_id)
            if i is None:
                i = len(rows) + len(joined)
                joined.append(s.input_ids[0])
            idx.append(i)
        if joined:
            known = torch.tensor(joined, dtype=src.dtype, pin_memory=pin)
            src = torch.cat([src, known.to(eng.device, non_blocking=True)])
        return src[torch.tensor(idx, pin_memory=pin).to(eng.device, non_blocking=True)]

    def _drain(self) -> list[RequestOutput]:
        """Resolve the step in flight; the next call schedules from known tokens."""
        assert self.pending is not None
        self.drained_steps += 1
        outs = self._resolve(self.pending)
        self.pending = None
        return outs

    def _plain(self, out: SchedulerOutput) -> bool:
        """A step that can be launched ahead: one-token greedy decodes only, nothing exported."""
        eng = self.engine
        return (
            bool(out.scheduled)
            and eng.drafter is None
            and eng.runner.gang is None
            and not eng._exports
            and all(
                s.is_decode and s.num_tokens == 1 and _overlaps(s.request, self.sampled)
                for s in out.scheduled
            )
        )

    def _can_continue(self, prev: _Pending) -> bool:
        """Whether the next schedule will run the in-flight step's running requests as one-token
        decodes: nothing waiting (an admission is a prefill), a page free for each (no
        preemption), room in the token budget. A request whose in-flight token is its last by
        max_tokens or max_model_len is left out of that schedule (`Scheduler.ends_in_flight`)
        and ends at this step's resolve, so a batch whose requests end at different steps keeps
        overlapping; only when every one ends there does the step drain."""
        sched = self.engine.scheduler
        running = sched.running
        launched = {s.request.request_id for s in prev.output.scheduled}
        if sched.waiting or not running or len(running) > sched.config.max_num_batched_tokens:
            return False
        if sched.kv.pool.num_available < len(running):
            return False
        if all(sched.ends_in_flight(req) for req in running):
            return False
        return all(
            _overlaps(req, self.sampled) and (req.request_id in launched or _joins(req))
            for req in running
        )

    def _launch(self, out: SchedulerOutput, ids_B: torch.Tensor | None) -> _Pending:
        """Forward and greedy sampling of a step of decodes, queued without a host sync; the ids'
        copy to the host starts behind them."""
        eng = self.engine
        seqs = out.scheduled
        t0 = time.perf_counter()
        fwd = eng.runner.execute(seqs, ids_on_device=ids_B)
        rows = torch.stack([fwd.logits[i][-1] for i in range(len(seqs))])
        params = [s.request.params for s in seqs]
        gens = [s.request.generator for s in seqs]
        tokens = eng.sampler.tokens(rows, params, gens)
        copied: torch.cuda.Event | None = None
        host = tokens
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        return _Pending(out, tokens, host, copied, t0)

    def _resolve(self, p: _Pending) -> list[RequestOutput]:
        """Wait for a step's ids on the host and apply them (`Scheduler.resolve`)."""
        eng = self.engine
        if p.copied is not None:
            p.copied.synchronize()
        ids = p.host_B.tolist()
        sampled = {s.request.request_id: t for s, t in zip(p.output.scheduled, ids, strict=True)}
        outs = eng.scheduler.resolve(p.output, sampled)
        eng.stats.forward_seconds += time.perf_counter() - p.launched_at
        eng.stats.steps += 1
        eng.stats.generated_tokens += len(outs)
        return eng._attach_exports(outs)
