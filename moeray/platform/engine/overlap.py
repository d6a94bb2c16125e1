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
nothing back), and with `EngineConfig.async_scheduling_prefill` prefill chunks beside them (a
waiting request is admitted while a step is in flight: its chunk's ids are known, its first token
stays on the device like a decode's); a step with a preempted request, drafts, logprobs (prompt
logprobs too), logits processing, a grammar or a KV export runs as before, after the step in flight
is resolved ("drained"), and so does one with a prefill without that setting (MTP steps with
drafts run one ahead their own way with `EngineConfig.async_scheduling_spec`: their next inputs
depend on the verdict, which is computed on the device, spec_overlap.py). A request added with
its prefill done elsewhere (`Engine.add_prefilled_request`, the decode side of prefill/decode
disaggregation) joins the next step without a drain: its known token goes up from the host. A
request whose in-flight token is its last by max_tokens or max_model_len is left out of the next
step (`Scheduler.ends_in_flight`) while the rest go on overlapping; the step drains only when all of
them end so. Outputs equal the synchronous engine's token for token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from moeray.platform.engine.sampler import last_rows
from moeray.platform.engine.scheduler import (
    PENDING,
    Request,
    RequestOutput,
    ScheduledSeq,
    SchedulerOutput,
)
from moeray.platform.engine.spec_overlap import SpecOverlap
from moeray.platform.engine.step_inputs import copy_to_host


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


def _in_flight(s: ScheduledSeq) -> bool:
    """Whether a scheduled row decodes the token of the step in flight (its id on the device)."""
    return s.input_ids == (PENDING,)


def _admits(req: Request) -> bool:
    """Whether a waiting request's prefill can run in a step launched ahead: no prompt logprobs
    (the step's logits are not read back)."""
    return not req.needs_prompt_logprobs


class DecodeOverlap:
    """Runs an engine's steps with async scheduling (`EngineConfig.async_scheduling`); `step`
    takes the place of `Engine.step`'s body."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine  # the Engine that owns this (typed loosely: engine.py imports us)
        engine.runner.inputs.pin = engine.device.type == "cuda"
        self.sampled = bool(engine.config.async_scheduling_sampled)
        self.prefill = bool(engine.config.async_scheduling_prefill)
        self.pending: _Pending | None = None
        # MTP steps one ahead too (EngineConfig.async_scheduling_spec; spec_overlap.py)
        self.spec = SpecOverlap(engine) if engine.config.async_scheduling_spec else None
        self.overlapped_steps = 0  # steps launched while another was in flight
        self.drained_steps = 0  # calls that resolved the step in flight without launching one

    def step(self) -> list[RequestOutput]:
        eng, sched = self.engine, self.engine.scheduler
        if self.spec is not None and self.spec.pending is not None:
            return self.spec.step()
        if self.pending is not None:
            if not self._can_continue(self.pending):
                return self._drain()
            out = sched.schedule()
            prev = self.pending
            if not (out.scheduled or out.preempted or sched.finished_at_schedule):
                return self._drain()  # a waiting request that found no pages: nothing to launch
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
        if self.spec is not None and self.spec.takes(out):
            return self.spec.start(out)
        return eng._step_scheduled(out)

    @property
    def drains(self) -> int:
        """Calls that resolved a step in flight without launching one (speculative ones too)."""
        return self.drained_steps + (self.spec.drained_steps if self.spec is not None else 0)

    def _next_ids(self, prev: _Pending, out: SchedulerOutput) -> torch.Tensor | None:
        """One id per row of a step launched while `prev` is in flight: for a decode of an
        in-flight token (input (PENDING,)) prev's sampled id for the same request, gathered on the
        device; for every other row (a prefill chunk, a request added with its prefill done
        elsewhere) an unread 0, its known ids going up from the host (`ModelRunner.execute`).
        None when no row decodes an in-flight token. An index upload and a gather, no read-back:
        the host never waits for them here; none of either where every row sits where it sat in
        prev (a steady decode batch), whose ids are then prev's as they are."""
        if not any(map(_in_flight, out.scheduled)):
            return None
        rows = {s.request.request_id: i for i, s in enumerate(prev.output.scheduled)}
        idx = [rows[s.request.request_id] if _in_flight(s) else 0 for s in out.scheduled]
        if idx == list(range(len(prev.output.scheduled))):
            return prev.tokens_B
        return prev.tokens_B[self.engine.runner.inputs.device_index(idx)]

    def _drain(self) -> list[RequestOutput]:
        """Resolve the step in flight; the next call schedules from known tokens."""
        assert self.pending is not None
        self.drained_steps += 1
        outs = self._resolve(self.pending)
        self.pending = None
        return outs

    def _plain(self, out: SchedulerOutput) -> bool:
        """A step that can be launched ahead: every row `_ahead`, no drafter, no gang, nothing
        exported."""
        eng = self.engine
        return (
            bool(out.scheduled)
            and eng.drafter is None
            and eng.runner.gang is None
            and not eng._exports
            and all(self._ahead(s) for s in out.scheduled)
        )

    def _ahead(self, s: ScheduledSeq) -> bool:
        """Whether a scheduled row can run in a step launched ahead: a one-token decode, or with
        `prefill` a chunk of a prompt (no draft tokens, no prompt logprobs), of a request that
        `_overlaps`."""
        if s.spec_token_ids or not _overlaps(s.request, self.sampled):
            return False
        if s.is_decode:
            return s.num_tokens == 1
        return self.prefill and _admits(s.request)

    def _can_continue(self, prev: _Pending) -> bool:
        """Whether the next schedule can launch while `prev` is in flight: its running requests
        as one-token decodes (of the in-flight token, or of a known one) or, with `prefill`,
        prompt chunks, and nothing waiting unless `prefill` admits it (no prompt logprobs, no KV
        export); pages free for every decode and every running prompt's rest (no preemption);
        room in the token budget. A request whose in-flight token is its last by max_tokens or
        max_model_len is left out of that schedule (`Scheduler.ends_in_flight`) and ends at
        this step's resolve, so a batch whose requests end at different steps keeps overlapping;
        only when every one ends there, with nothing waiting, does the step drain."""
        eng, sched = self.engine, self.engine.scheduler
        running, waiting = sched.running, sched.waiting
        launched = {s.request.request_id for s in prev.output.scheduled}
        admits = all(_admits(req) and _overlaps(req, self.sampled) for req in waiting)
        if waiting and not (self.prefill and not eng._exports and admits):
            return False  # an admission runs a prefill step after the drain
        if not (running or waiting) or len(running) > sched.config.max_num_batched_tokens:
            return False
        # A page for each decode, and a prompt's remaining pages for each request mid-prefill:
        # the next schedule must not preempt (a preempted request would lose its in-flight id).
        kv = sched.kv
        prefilling = [r for r in running if len(r.token_ids) - r.num_computed > 1]
        need = sum(kv.can_grow(r.request_id, len(r.token_ids)) for r in prefilling)
        if kv.pool.num_available < len(running) + need:
            return False
        if not waiting and all(sched.ends_in_flight(req) for req in running):
            return False
        return all(
            _overlaps(req, self.sampled) and (req.request_id in launched or self._known(req))
            for req in running
        )

    def _known(self, req: Request) -> bool:
        """Whether a running request the step in flight did not run can be in the next one from
        known ids: a one-token decode of a known token (one added by `add_prefilled_request`, or
        left out of that step by the token budget), or with `prefill` a prompt's next chunk."""
        if req.token_ids[-1] == PENDING:
            return False
        return len(req.token_ids) - req.num_computed == 1 or (self.prefill and _admits(req))

    def _launch(self, out: SchedulerOutput, ids_B: torch.Tensor | None) -> _Pending:
        """Forward and sampling of a step (decodes; with `prefill` prompt chunks too), queued
        without a host sync; the ids' copy to the host starts behind them."""
        eng = self.engine
        seqs = out.scheduled
        t0 = time.perf_counter()
        fwd = eng.runner.execute(seqs, ids_on_device=ids_B)
        # Rows that sample (decodes, a prompt's last chunk); a chunk short of its prompt's end
        # draws nothing (its generator untouched, as in the synchronous engine) and gets a 0.
        samp = [i for i, s in enumerate(seqs) if s.samples]
        if len(samp) == len(seqs):  # every row samples (a decode step): no scatter
            rows = last_rows([fwd.logits[i] for i in samp])
            tokens = eng.sampler.tokens(rows, [s.request.params for s in seqs],
                                        [s.request.generator for s in seqs])  # fmt: skip
        else:
            tokens = torch.zeros(len(seqs), dtype=torch.long, device=eng.device)
            if samp:
                rows = last_rows([fwd.logits[i] for i in samp])
                params = [seqs[i].request.params for i in samp]
                drawn = eng.sampler.tokens(rows, params, [seqs[i].request.generator for i in samp])
                tokens[eng.runner.inputs.device_index(samp)] = drawn.to(tokens.dtype)
        host, copied = copy_to_host(tokens)
        return _Pending(out, tokens, host, copied, t0)

    def _resolve(self, p: _Pending) -> list[RequestOutput]:
        """Wait for a step's ids on the host and apply them (`Scheduler.resolve`)."""
        eng = self.engine
        if p.copied is not None:
            p.copied.synchronize()
        ids = p.host_B.tolist()
        seqs = p.output.scheduled
        sampled = {s.request.request_id: t for s, t in zip(seqs, ids, strict=True) if s.samples}
        outs = eng.scheduler.resolve(p.output, sampled)
        eng.stats.forward_seconds += time.perf_counter() - p.launched_at
        eng.stats.steps += 1
        eng.stats.prompt_tokens += sum(s.num_tokens for s in seqs if not s.is_decode)
        eng.stats.generated_tokens += len(outs)
        return eng._attach_exports(outs)
